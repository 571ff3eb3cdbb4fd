"""Admissions per second and latency of the webhook over TLS, against an allow-everything handler.

The server runs in its own process pinned to one core (``os.sched_setaffinity``) and serves, over the
same TLS listener with keep-alive, the real ``/mutate`` and ``/validate`` and a baseline ``/allow``
that reads the AdmissionReview and allows it without looking (what any webhook pays for HTTP, TLS and
JSON). The load generator runs in this process, pinned to another core, and sends a ~4 KB
LoRAAutoscaler (ten adapters, managedFields like ``kubectl apply`` leaves) in two regimes, each for
every endpoint in the same run:

- steady: 500 admissions/s, open loop (each request leaves at its scheduled time, so a slow server
  shows up as latency, not as a lower rate);
- saturation: a fixed number of requests kept in flight for a fixed time.

It prints p50/p99 latency and throughput per endpoint, then the ratios against ``/allow``. Targets: at
500/s the rules add under 2 ms at p99; at saturation one core answers at least 2,000 admissions/s.
The capacity check is off (it reads the API, a cost of the API server, not of the rules).

Usage: ``python benchmarks/bench_webhook.py [--seconds 10] [--rate 500] [--concurrency 32]``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import ClientSession, TCPConnector, web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.validation import prepare_validators
from common.heap import freeze_startup_heap
from common.tls import client_context, issue_serving_cert, make_ca, server_context
from webhook.review import allow, parse_review, review
from webhook.server import create_app

ENDPOINTS = ("/allow", "/mutate", "/validate")
START_SECONDS = 20.0


def admission_body() -> bytes:
    """An AdmissionReview as the API server sends it for ``kubectl apply`` of a 10-adapter autoscaler."""
    spec = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vllm-llama-3-8b"},
        "adapters": [{"name": f"customer-{i:02d}-sql-lora", "source": f"hf://acme/llama-3-8b-customer-{i:02d}-sql",
                      "minReplicas": 1 + i % 2, "maxReplicas": 4} for i in range(10)],
        "vllm": {"port": 8000, "maxLorasPerReplica": 4, "maxCpuLorasPerReplica": 8},
        "placementMode": "preferred",
        "scaling": {"metric": {"source": "combined", "routerUrl": "http://lora-router.lora-system:9090"},
                    "scaleUp": {"threshold": 4, "windowSeconds": 3},
                    "scaleDown": {"threshold": 1, "windowSeconds": 60}},
        "podAutoscaling": {"mode": "HPA", "hpaName": "vllm-llama-3-8b"},
    }  # fmt: skip
    obj = {
        "apiVersion": "loraautoscaler.io/v1alpha1", "kind": "LoRAAutoscaler",
        "metadata": {
            "name": "llama-3-8b", "namespace": "serving", "uid": "0d9c3f5e-5a8e-4a43-9a55-0b5c1c1f1a11",
            "creationTimestamp": "2025-01-01T00:00:00Z", "generation": 1,
            "labels": {"app.kubernetes.io/name": "vllm-llama-3-8b", "team": "ml-platform"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": orjson.dumps(
                {"apiVersion": "loraautoscaler.io/v1alpha1", "kind": "LoRAAutoscaler", "spec": spec}).decode()},
            "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update",
                               "apiVersion": "loraautoscaler.io/v1alpha1", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:spec": {"f:adapters": {}, "f:scaleTargetRef": {}}}}],
        },
        "spec": spec,
    }  # fmt: skip
    request = {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "loraautoscaler.io", "version": "v1alpha1", "kind": "LoRAAutoscaler"},
        "resource": {"group": "loraautoscaler.io", "version": "v1alpha1", "resource": "loraautoscalers"},
        "requestKind": {"group": "loraautoscaler.io", "version": "v1alpha1", "kind": "LoRAAutoscaler"},
        "name": "llama-3-8b", "namespace": "serving", "operation": "CREATE",
        "userInfo": {"username": "admin", "groups": ["system:masters", "system:authenticated"]},
        "object": obj, "oldObject": None, "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions",
                    "fieldManager": "kubectl-client-side-apply"},
    }  # fmt: skip
    return orjson.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request})


# --- the server process ------------------------------------------------------------------------------


def serve(cert_dir: str, port: int, core: int | None, ready: Any) -> None:
    """The webhook app plus the /allow baseline on one TLS listener, on one core."""
    if core is not None:
        os.sched_setaffinity(0, {core})

    async def allow_everything(request: web.Request) -> web.Response:
        req = parse_review(await request.read())
        return web.Response(body=review(allow(req.uid)), content_type="application/json")

    async def main() -> None:
        app = create_app()
        app.router.add_post("/allow", allow_everything)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        context = server_context(Path(cert_dir) / "tls.crt", Path(cert_dir) / "tls.key")
        prepare_validators()  # start-up as the webhook's own main does it
        freeze_startup_heap()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context, backlog=1024).start()
        ready.set()
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


# --- the load generator ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def steady(session: ClientSession, url: str, body: bytes, rate: float, seconds: float) -> dict[str, float]:
    """Open loop: request i leaves at start + i/rate; latency counts from its scheduled departure."""
    latencies: list[float] = []
    failures = 0
    total = int(rate * seconds)
    start = time.perf_counter() + 0.05
    headers = {"Content-Type": "application/json"}

    async def one(due: float) -> None:
        nonlocal failures
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        async with session.post(url, data=body, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                failures += 1
        latencies.append(time.perf_counter() - due)

    await asyncio.gather(*(one(start + i / rate) for i in range(total)))
    elapsed = time.perf_counter() - start
    return {"rate": total / elapsed, "p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99),
            "failures": failures}


async def saturate(session: ClientSession, url: str, body: bytes, concurrency: int, seconds: float
                   ) -> dict[str, float]:
    """Closed loop: ``concurrency`` requests always in flight for ``seconds``."""
    latencies: list[float] = []
    failures = 0
    headers = {"Content-Type": "application/json"}
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal failures
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    failures += 1
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"rate": len(latencies) / elapsed, "p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99),
            "failures": failures, "count": len(latencies)}


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (from /proc: robust to a busy machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(port: int, ca_pem: bytes, args: argparse.Namespace, server_pid: int
                  ) -> dict[str, dict[str, dict[str, float]]]:
    body = admission_body()
    connector = TCPConnector(ssl=client_context(ca_pem), limit=args.concurrency, force_close=False)
    results: dict[str, dict[str, dict[str, float]]] = {"steady": {}, "saturation": {}}
    async with ClientSession(connector=connector) as session:
        base = f"https://127.0.0.1:{port}"
        for path in ENDPOINTS:  # warm up connections and code paths
            await saturate(session, base + path, body, args.concurrency, 1.0)
        for path in ENDPOINTS:
            results["steady"][path] = await steady(session, base + path, body, args.rate, args.seconds)
        for path in ENDPOINTS:
            cpu0 = cpu_seconds(server_pid)
            row = await saturate(session, base + path, body, args.concurrency, args.seconds)
            row["cpu_ms"] = (cpu_seconds(server_pid) - cpu0) * 1e3 / max(1.0, row["count"])
            results["saturation"][path] = row
    return results


def report(results: dict[str, dict[str, dict[str, float]]], body_size: int, args: argparse.Namespace) -> None:
    print(f"\nAdmissionReview body: {body_size} bytes; TLS with keep-alive; server on one core")
    for regime, rows in results.items():
        label = f"steady {args.rate:g}/s" if regime == "steady" else f"saturation ({args.concurrency} in flight)"
        print(f"\n{label}:")
        cpu = regime == "saturation"
        extra = f" {'server CPU ms/adm':>18} {'adm per CPU-s':>14}" if cpu else ""
        print(f"  {'endpoint':10} {'adm/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'failed':>7}{extra}")
        for path, r in rows.items():
            extra = f" {r['cpu_ms']:18.3f} {1e3 / r['cpu_ms'] if r['cpu_ms'] else 0:14.0f}" if cpu else ""
            line = f"{r['rate']:9.0f} {r['p50'] * 1e3:9.2f} {r['p99'] * 1e3:9.2f} {r['failures']:7.0f}"
            print(f"  {path:10} {line}{extra}")
    base_s, base_x = results["steady"]["/allow"], results["saturation"]["/allow"]
    print("\nagainst /allow (the same run):")
    for path in ("/mutate", "/validate"):
        s, x = results["steady"][path], results["saturation"][path]
        added = (s["p99"] - base_s["p99"]) * 1e3
        per_cpu = 1e3 / x["cpu_ms"] if x["cpu_ms"] else 0.0
        print(f"  {path:10} p99 added at {args.rate:g}/s: {added:+.2f} ms (target < 2 ms: "
              f"{'met' if added < 2 else 'MISSED'}); p99 ratio {s['p99'] / base_s['p99']:.2f}x")
        print(f"  {'':10} saturation {x['rate']:.0f}/s = {x['rate'] / base_x['rate']:.2f}x of /allow (target >= "
              f"2000/s: {'met' if x['rate'] >= 2000 else 'MISSED'}); CPU per admission "
              f"{x['cpu_ms'] / base_x['cpu_ms'] if base_x['cpu_ms'] else 0:.2f}x of /allow, so one whole core "
              f"answers {per_cpu:.0f}/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each measurement")
    parser.add_argument("--rate", type=float, default=500.0, help="admissions per second of the steady regime")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight at saturation")
    parser.add_argument("--server-core", type=int, default=0, help="core the server is pinned to")
    parser.add_argument("--client-core", type=int, default=1, help="core the load generator is pinned to")
    args = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    pin: Callable[[int], int | None] = lambda c: c if c in cores else None  # noqa: E731
    server_core, client_core = pin(args.server_core), pin(args.client_core)
    if server_core is not None and server_core == client_core:
        print("warning: server and load generator share a core", file=sys.stderr)
    with tempfile.TemporaryDirectory() as cert_dir:
        ca = make_ca("bench-ca")
        issue_serving_cert(ca, ["127.0.0.1"]).write(Path(cert_dir) / "tls.crt", Path(cert_dir) / "tls.key")
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Event()
        server = ctx.Process(target=serve, args=(cert_dir, port, server_core, ready), daemon=True)
        server.start()
        try:
            if not ready.wait(START_SECONDS):
                print("the server did not start", file=sys.stderr)
                return 1
            if client_core is not None:
                os.sched_setaffinity(0, {client_core})
            freeze_startup_heap()  # the load generator's own GC pauses would count as server latency
            results = asyncio.run(measure(port, ca.cert_pem, args, server.pid or 0))
        finally:
            server.terminate()
            server.join(10)
            if server.is_alive():
                server.kill()
                server.join(10)
    report(results, len(admission_body()), args)
    loads = os.getloadavg()
    print(f"\nload average during the run: {loads[0]:.1f} on {os.cpu_count()} cores "
          f"({'numbers are pessimistic: the machine was busy' if loads[0] > (os.cpu_count() or 1) else 'quiet'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
