"""Memory of one vLLM simulator holding 500 requests in flight, against a 100 MB budget.

Fleets of simulators stand in for vLLM pods in tests, the demo and benchmarks, so each must stay small.
This starts ``python -m vllmsim`` in a subprocess, measures its resident memory idle (after one request), then
with 500 long requests in flight (running and waiting), and prints both and the ratio to the budget; then
the marginal memory of an extra idle simulator when many share one process (as in-process tests run them).

    .venv/bin/python benchmarks/bench_simulator_memory.py [--requests 500] [--stream]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
BUDGET_MB = 100.0


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc (MB)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(
    session: aiohttp.ClientSession, url: str, pred: Callable[[dict[str, Any]], bool], limit: float
) -> dict[str, Any]:
    """Poll ``url`` (JSON) until ``pred(body)`` holds, within ``limit`` seconds."""
    deadline = time.monotonic() + limit
    last: object = None
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    body: dict[str, Any] = await r.json()
                    if pred(body):
                        return body
                    last = body
        except aiohttp.ClientError as exc:
            last = exc
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{url}: condition not met in {limit}s (last: {str(last)[:300]})")


async def hold(session: aiohttp.ClientSession, url: str, model: str, stream: bool) -> None:
    """One long request; streamed ones are read and discarded so no buffer builds up."""
    body = {"model": model, "prompt": "tell me a long story about seven bright stars", "max_tokens": 10_000_000}
    if stream:
        body["stream"] = True
    async with session.post(url + "/v1/completions", json=body) as r:
        async for _ in r.content.iter_chunked(65536):
            pass


def start_simulator(port: int) -> subprocess.Popen[bytes]:
    """``python -m vllmsim`` with a vLLM-style command line, runtime LoRA updating on."""
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="true")
    cmd = [
        sys.executable, "-m", "vllmsim", "serve", "bench-base", "--host", "127.0.0.1", "--port", str(port),
        "--enable-lora", "--max-loras", "4", "--max-cpu-loras", "8", "--max-num-seqs", "256",
        "--sim-step-time", "0.05", "--log-level", "warning",
    ]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=env)


async def run(proc: subprocess.Popen[bytes], port: int, n: int, stream: bool) -> int:
    """Measure idle and loaded RSS of the simulator, print the ratios; exit status 1 over budget."""
    url = f"http://127.0.0.1:{port}"
    tasks: list[asyncio.Task[None]] = []
    try:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
            await wait_until(s, url + "/sim/state", lambda b: True, 30)
            adapters = [f"lora-{i}" for i in range(6)]
            for a in adapters:
                async with s.post(
                    url + "/v1/load_lora_adapter", json={"lora_name": a, "lora_path": f"/adapters/{a}"}
                ) as r:
                    assert r.status == 200, await r.text()
            async with s.post(url + "/v1/completions", json={"model": "lora-0", "prompt": "hi", "max_tokens": 4}) as r:
                assert r.status == 200
            idle = rss_mb(proc.pid)

            for i in range(n):
                tasks.append(asyncio.create_task(hold(s, url, adapters[i % len(adapters)], stream)))

            def all_in(b: dict[str, Any]) -> bool:
                e = b["engine"]
                return e["running"] + e["waiting"] >= n

            state = await wait_until(s, url + "/sim/state", all_in, 60)
            # let a few steps run with the full batch before measuring
            step0 = state["engine"]["step"]
            state = await wait_until(s, url + "/sim/state", lambda b: b["engine"]["step"] >= step0 + 5, 30)
            loaded = rss_mb(proc.pid)
            e = state["engine"]
            print(f"simulator pid {proc.pid}, {n} requests in flight ({'streamed' if stream else 'plain'})")
            print(
                f"  engine: {e['running']} running, {e['waiting']} waiting "
                f"({e['waiting_deferred']} deferred, {e['waiting_capacity']} capacity)"
            )
            print(f"  idle RSS:           {idle:7.1f} MB")
            print(f"  RSS with {n} in flight: {loaded:7.1f} MB")
            print(f"  per request:        {(loaded - idle) * 1024 / max(n, 1):7.1f} KB")
            print(f"  ratio to budget:    {loaded / BUDGET_MB:7.2f} (budget {BUDGET_MB:.0f} MB)")
            print(f"  ratio loaded/idle:  {loaded / idle:7.2f}")
            ok = loaded < BUDGET_MB
            verdict = f"< {BUDGET_MB:.0f} MB -> OK" if ok else f">= {BUDGET_MB:.0f} MB -> OVER BUDGET"
            print(f"{n} in flight take {loaded:.1f} MB: {verdict}")
            return 0 if ok else 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_FLEET_CHILD = """
import asyncio, sys
from vllmsim import SimConfig, Simulator
async def main(n):
    sims = [Simulator(SimConfig(model="bench-base", host="127.0.0.1", port=0, enable_lora=True, max_loras=4,
                                max_cpu_loras=8, allow_runtime_lora_updating=True)) for _ in range(n)]
    for s in sims:
        await s.start()
    print(" ".join(str(s.port) for s in sims), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for s in sims:
        await s.stop()
asyncio.run(main(int(sys.argv[1])))
"""


def fleet_rss(n: int) -> float:
    """RSS of one process hosting ``n`` idle in-process simulators (how tests and benchmarks run fleets)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _FLEET_CHILD, str(n)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        ports = proc.stdout.readline().split()
        if len(ports) != n:
            raise RuntimeError(f"fleet of {n} did not start")
        return rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> int:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--stream", action="store_true", help="hold streamed requests (client reads every chunk)")
    p.add_argument("--fleet", type=int, default=8, help="also measure N idle simulators in one process")
    a = p.parse_args()
    port = free_port()
    proc = start_simulator(port)
    try:
        rc = asyncio.run(run(proc, port, a.requests, a.stream))
        if a.fleet > 1:
            one, many = fleet_rss(1), fleet_rss(a.fleet)
            print(
                f"in-process fleet: 1 simulator {one:.1f} MB, {a.fleet} simulators {many:.1f} MB, "
                f"{(many - one) / (a.fleet - 1):.2f} MB per extra simulator"
            )
        return rc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
