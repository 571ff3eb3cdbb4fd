"""Bad input for the real processes: malformed and oversized requests to the router and the webhook, a pod
whose ``/metrics`` is garbage, and LoRAAutoscalers that only the controller can find fault with.

Each function returns a Tally: ``faults`` counts bad inputs by kind, ``requests_failed`` the bad requests
that did not get the promised 4xx, and a violation is recorded for every crash or wrong answer.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from harness import (
    Proc,
    Router,
    Webhook,
    apply,
    autoscaler,
    free_port,
    get_json,
    placements,
    post,
    start_controller,
    vllm_deployment,
    wait_ready,
)
from invariants import InvariantChecker, Tally
from scenarios import Env

from localkube.wait import wait_until
from vllmsim import LoraModule, SimConfig
from vllmsim.background import BackgroundSimulator

ROOT = Path(__file__).resolve().parents[2]
BODY_CAP = 64 * 1024


def _raw(port: int, request: bytes, *, timeout: float = 10.0) -> int:
    """Send raw bytes to 127.0.0.1:port; the HTTP status answered (0: none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def _nested(depth: int) -> bytes:
    return b'{"model": ' + b"[" * depth + b"]" * depth + b"}"


def _check(tally: Tally, kind: str, status: int, wanted: range | int) -> None:
    ok = status in wanted if isinstance(wanted, range) else status == wanted
    tally.faults[kind] += 1
    tally.requests_sent += 1
    if not ok:
        tally.requests_failed += 1
        tally.failures_by_reason[f"{kind}: {status}"] += 1
        tally.violations.append(_violation(kind, f"answered {status}, wanted {wanted}"))


def _violation(invariant: str, reason: str) -> Any:
    from invariants import Violation

    return Violation(0.0, invariant, reason)


def router_bad_requests(work: Path) -> Tally:
    """The router (static routes to one simulator, a 64 KiB body cap) under malformed and oversized input;
    then a good request must still be served."""
    tally = Tally("bad requests to the router")
    started = time.monotonic()
    with BackgroundSimulator(SimConfig(model="tiny", host="127.0.0.1", port=0, enable_lora=True, max_loras=2,
                                       allow_runtime_lora_updating=True,
                                       lora_modules=[LoraModule("lora-1", "/a/1")])) as sim:
        address = sim.url.removeprefix("http://")
        routes = work / "routes.json"
        routes.write_text(json.dumps({"models": {"tiny": {"base": True, "pods": [address]},
                                                 "lora-1": {"preferred": [address]}}}))
        router = Router(None, None, None, work, routes_file=routes, max_body_bytes=BODY_CAP).start()
        try:
            url, port = router.url, router.port
            cases: list[tuple[str, bytes, dict[str, str], range | int]] = [
                ("router: body not JSON", b"{not json", {}, 400),
                ("router: JSON array", b"[1, 2]", {}, 400),
                ("router: no model", b'{"prompt": "x"}', {}, 400),
                ("router: model not a string", b'{"model": 7}', {}, 400),
                ("router: invalid UTF-8", b'{"model": "\xff\xfe"}', {}, 400),
                ("router: nested 100000 deep", _nested(100_000), {}, range(400, 500)),
                ("router: wrong content type", b'{"model": "lora-1"}', {"Content-Type": "text/plain"}, 400),
                ("router: body over the cap", b'{"model": "lora-1", "prompt": "' + b"x" * (2 * BODY_CAP) + b'"}',
                 {}, 413),
                ("router: unknown model", b'{"model": "nope", "prompt": "x"}', {}, 404),
            ]
            for kind, body, headers, wanted in cases:
                status, _ = post(url, "/v1/completions", body, headers=headers)
                _check(tally, kind, status, wanted)
            big_chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(
                               b"%x\r\n" % 8192 + b"x" * 8192 + b"\r\n" for _ in range(16)) + b"0\r\n\r\n")
            _check(tally, "router: chunked body over the cap", _raw(port, big_chunked), 413)
            huge_header = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 100_000 +
                           b"\r\nContent-Length: 2\r\n\r\n{}")
            _check(tally, "router: 100 KB header", _raw(port, huge_header), range(400, 500))
            _check(tally, "router: not HTTP", _raw(port, b"\x16\x03\x01garbage\r\n\r\n"), range(400, 500))
            status, body = post(url, "/v1/completions", b'{"model": "lora-1", "prompt": "hi", "max_tokens": 2}')
            if status != 200 or not router.proc.alive():
                tally.violations.append(_violation("router", f"a good request after the bad ones got {status} "
                                                             f"{body[:200]!r}; alive: {router.proc.alive()}"))
        finally:
            router.stop()
    tally.seconds = time.monotonic() - started
    return tally


def webhook_bad_requests(work: Path) -> Tally:
    """The webhook process (TLS, 64 KiB cap) under malformed and oversized reviews; then a real review."""
    tally = Tally("bad requests to the webhook")
    started = time.monotonic()
    hook = Webhook(None, work, port=free_port(), max_body_bytes=BODY_CAP).start()
    try:
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "u-1", "kind": {"group": "loraautoscaler.io", "version": "v1alpha1", "kind": "LoRAAutoscaler"},
            "resource": {"group": "loraautoscaler.io", "version": "v1alpha1", "resource": "loraautoscalers"},
            "operation": "CREATE", "namespace": "ns", "name": "x",
            "object": {"apiVersion": "loraautoscaler.io/v1alpha1", "kind": "LoRAAutoscaler",
                       "metadata": {"name": "x", "namespace": "ns"}, "spec": {}}}}
        no_uid = json.loads(json.dumps(review))
        del no_uid["request"]["uid"]
        cases: list[tuple[str, bytes, str, range | int]] = [
            ("webhook: wrong content type", json.dumps(review).encode(), "text/plain", 400),
            ("webhook: body not JSON", b"{not json", "application/json", 400),
            ("webhook: not an AdmissionReview", b'{"kind": "Pod"}', "application/json", 400),
            ("webhook: review without uid", json.dumps(no_uid).encode(), "application/json", 400),
            ("webhook: nested 100000 deep", b'{"request": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
             "application/json", range(400, 500)),
            ("webhook: body over the cap", b'{"pad": "' + b"x" * (2 * BODY_CAP) + b'"}', "application/json", 413),
        ]
        for path in ("/validate", "/mutate"):
            for kind, body, ctype, wanted in cases:
                try:
                    status, _ = hook.https("POST", path, body, content_type=ctype)
                except OSError:
                    status = 0
                _check(tally, f"{kind} ({path})", status, wanted)
        status, answer = hook.https("POST", "/validate", json.dumps(review).encode())
        decision = json.loads(answer).get("response", {}) if status == 200 else {}
        if status != 200 or decision.get("uid") != "u-1" or not hook.proc.alive():
            tally.violations.append(_violation("webhook", f"a real review after the bad ones got {status} "
                                                          f"{answer[:200]!r}; alive: {hook.proc.alive()}"))
    finally:
        hook.stop()
    tally.seconds = time.monotonic() - started
    return tally


# ---- a pod whose /metrics is garbage --------------------------------------------------------------


_GARBAGE: list[bytes] = [
    bytes(random.Random(1).randrange(256) for _ in range(4096)),
    b'vllm:lora_requests_info{max_lora="2",running_lora_adapters="lora-1',
    b"vllm:lora_requests_info{" + b'a="b",' * 50_000 + b"} 1\n",
    b'vllm:lora_requests_info{max_lora="x",running_lora_adapters="lora-1",waiting_lora_adapters=""} NaN\n'
    b"vllm:num_requests_waiting{} -Inf\nvllm:num_requests_running{} 1e999\n",
    b"# TYPE vllm:lora_requests_info gauge\n" + b"\xff\xfe\xfd" * 1000,
    b"",
    b"<html><body>502 Bad Gateway</body></html>",
]


class GarbageVLLM:
    """Answers vLLM's adapter API and completions correctly, and ``/metrics`` with garbage (rotating kinds).

    Runs on the host side of the kubelet's pod network, so a hand-made Pod can name it as its IP.
    """

    def __init__(self, host: str, port: int = 8000) -> None:
        self.loaded: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.metrics_served = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/metrics":
                    body = _GARBAGE[outer.metrics_served % len(_GARBAGE)]
                    outer.metrics_served += 1
                    self._send(200, body, "text/plain; version=0.0.4")
                elif self.path == "/v1/models":
                    data = [{"id": "tiny", "object": "model", "root": "tiny", "parent": None}]
                    data += [{"id": n, "object": "model", "root": r, "parent": "tiny"} for n, r in outer.loaded.items()]
                    self._send(200, json.dumps({"object": "list", "data": data}).encode())
                elif self.path == "/health":
                    self._send(200, b"")
                else:
                    self._send(404, b'{"detail":"Not Found"}')

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/v1/load_lora_adapter":
                    outer.loaded[body["lora_name"]] = body["lora_path"]
                    outer.calls.append(("load", body["lora_name"]))
                    self._send(200, f"Success: LoRA adapter '{body['lora_name']}' added successfully.".encode(),
                               "text/plain")
                elif self.path == "/v1/unload_lora_adapter":
                    outer.loaded.pop(body["lora_name"], None)
                    outer.calls.append(("unload", body["lora_name"]))
                    self._send(200, f"Success: LoRA adapter '{body['lora_name']}' removed successfully.".encode(),
                               "text/plain")
                elif self.path == "/v1/completions":
                    model = body.get("model")
                    if model != "tiny" and model not in outer.loaded:
                        self._send(404, json.dumps({"error": {"message": f"The model `{model}` does not exist.",
                                                              "type": "NotFoundError", "code": 404}}).encode())
                        return
                    self._send(200, json.dumps({"id": "c", "object": "text_completion", "model": model, "choices": [
                        {"index": 0, "text": " ok", "finish_reason": "length"}]}).encode())
                else:
                    self._send(404, b'{"detail":"Not Found"}')

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="garbage-vllm", daemon=True)

    def start(self) -> GarbageVLLM:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def _fake_pod(env: Env, name: str, ip: str) -> Iterator[None]:
    """A Pod of the target that no kubelet runs: bound to a node that does not exist, reported Running and
    Ready at ``ip`` by hand. Without pod-template-hash its ReplicaSet never adopts it."""
    cp, ns = env.cp, env.namespace
    apply(cp, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": "llm"}},
               "spec": {"nodeName": f"nowhere-{ns}", "containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]}})
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "startTime": now,
                         "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
                         "containerStatuses": [{"name": "vllm", "ready": True, "restartCount": 0, "image": "vllm",
                                                "imageID": "", "started": True,
                                                "state": {"running": {"startedAt": now}}}]}}
    cp.kubectl("patch", "pod", name, "-n", ns, "--subresource=status", "--type=merge", "-p", json.dumps(status))
    try:
        yield
    finally:
        cp.kubectl("delete", "pod", name, "-n", ns, "--grace-period=0", "--force", "--wait=false", check=False)


def malformed_metrics(env: Env) -> Tally:
    """A target pod whose /metrics is garbage: the router scrapes it and routes to it, the controller loads
    on it and drains from it (its in-flight probe reads the garbage). Neither may crash, and both go on
    working: requests succeed, the drain ends by its timeout, a new adapter is still placed."""
    cp, ns = env.cp, env.namespace
    tally = Tally("malformed /metrics from a pod")
    started = time.monotonic()
    host = env.kubelet.host_ip
    if env.kubelet.network is None:
        raise AssertionError("the kubelet has no pod network: a hand-made pod needs an address EndpointSlices accept")
    apply(cp, vllm_deployment("llm", ns, 1))
    wait_ready(cp, ns, "llm", 1)
    from common.kube import KubeClient

    kube = KubeClient(cp.api_client())
    garbage = GarbageVLLM(host).start()
    controller: Proc | None = None
    router: Router | None = None
    checker = InvariantChecker(kube, ns, "a", pod_labels={"app": "llm"}, scenario=tally.scenario)
    try:
        with _fake_pod(env, "garbage-0", host):
            controller = start_controller(cp, ns, "c0", env.work)
            apply(cp, autoscaler("a", ns, "llm", [("lora-1", 2), ("lora-2", 1)], max_loras=4, drain_timeout=3))
            checker.start()
            router = Router(cp, ns, "a", env.work).start()
            if not checker.settle(60):
                raise AssertionError(f"no settled placement with the garbage pod: {checker.violations}")
            assert "lora-1" in garbage.loaded, garbage.calls
            wait_until(lambda: garbage.metrics_served >= 2 * len(_GARBAGE), timeout=30,
                       what="the router scraping the garbage /metrics")
            tally.faults["garbage /metrics answers"] += garbage.metrics_served
            for _ in range(20):
                status, _ = post(router.url, "/v1/completions", b'{"model": "lora-1", "prompt": "x", "max_tokens": 2}')
                checker.request(status == 200, str(status))
            scrape_ok = router.metric("lora_router_pod_scrape_ok", pod="garbage-0")
            tally.notes.append(f"router scrape_ok for the garbage pod: {scrape_ok:.0f}")
            # a drain reads the garbage pod's /metrics for in-flight requests: unknown, so it waits its timeout
            checker.adapter_leaves("lora-1")
            apply(cp, autoscaler("a", ns, "llm", [("lora-2", 1), ("lora-3", 1)], max_loras=4, drain_timeout=3))
            wait_until(lambda: ("unload", "lora-1") in garbage.calls, timeout=30,
                       what="lora-1 drained from the garbage pod and unloaded")
            checker.settle(60)
            tally.faults["garbage /metrics answers"] = garbage.metrics_served
            for what, proc in (("controller", controller), ("router", router.proc)):
                if not proc.alive():
                    checker.violation("crash", f"the {what} exited: {proc.log()[-2000:]}")
            for word in ("Traceback", "CRITICAL"):
                for what, proc in (("controller", controller), ("router", router.proc)):
                    if word in proc.log():
                        checker.violation("crash", f"the {what} logged a {word}: "
                                                   f"{proc.log()[proc.log().index(word):][:1500]}")
            checker.stop()  # before the garbage pod goes: its adapters leave with it
    finally:
        if router is not None:
            router.stop()
        checker.stop()
        if controller is not None:
            controller.kill(15)
        garbage.stop()
        kube.api_client.close()
    tally.merge(checker.tally)
    tally.scenario = "malformed /metrics from a pod"
    tally.seconds = time.monotonic() - started
    return tally


# ---- autoscalers only the controller can find fault with ------------------------------------------


def invalid_autoscalers(env: Env) -> tuple[Tally, dict[str, Any]]:
    """With no webhook in the way: every manifest of test/manifests/invalid is refused by the API server
    (schema and CEL rules); a pod selector with an invalid label value, which passes both the CRD and the
    webhook's rules, is `Degraded` by the controller, which goes on serving another autoscaler."""
    cp, ns = env.cp, env.namespace
    tally = Tally("invalid LoRAAutoscalers without the webhook")
    started = time.monotonic()
    found: dict[str, Any] = {"accepted": []}
    for path in sorted((ROOT / "test" / "manifests" / "invalid").glob("*.yaml")):
        done = cp.kubectl("apply", "-n", ns, "-f", str(path), check=False)
        tally.faults["invalid manifest"] += 1
        tally.requests_sent += 1
        if done.returncode == 0:
            tally.requests_failed += 1
            found["accepted"].append(path.name)
    apply(cp, vllm_deployment("llm", ns, 1))
    wait_ready(cp, ns, "llm", 1)
    controller = start_controller(cp, ns, "c0", env.work)
    try:
        bad = autoscaler("bad-selector", ns, "llm", [("lora-1", 1)],
                         podSelector={"matchLabels": {"role": "not valid!"}})
        done = cp.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
        found["bad_selector_accepted"] = done.returncode == 0
        tally.faults["selector only the controller can refuse"] += 1
        apply(cp, autoscaler("good", ns, "llm", [("lora-2", 1)]))

        def degraded() -> dict[str, Any] | None:
            obj = get_json(cp, "loraautoscaler", "bad-selector", "-n", ns)
            c = next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == "Degraded"), None)
            return c if c and c["status"] == "True" else None

        found["degraded"] = wait_until(degraded, timeout=30, what="bad-selector Degraded")
        wait_until(lambda: any(p["spec"]["adapter"] == "lora-2" and (p.get("status") or {}).get("phase") == "Loaded"
                               for p in placements(cp, ns)), timeout=30, what="the good autoscaler served meanwhile")
        found["placements_of_bad"] = [p["metadata"]["name"] for p in placements(cp, ns)
                                      if p["spec"]["autoscaler"] == "bad-selector"]
        found["controller_alive"] = controller.alive()
        if not controller.alive():
            tally.violations.append(_violation("crash", f"the controller exited: {controller.log()[-2000:]}"))
    finally:
        controller.kill(15)
    tally.seconds = time.monotonic() - started
    return tally, found
