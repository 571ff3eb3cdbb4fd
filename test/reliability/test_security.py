"""Security checks against the real processes.

- The webhook serves admission over TLS 1.2 or newer only (a TLS 1.1 client is refused by the server, while
  the same client completes a TLS 1.1 handshake elsewhere), and has no plaintext listener for admission:
  its only other socket is the plain-HTTP metrics port, which serves nothing but /metrics.
- vLLM's API key is read from the Secret named in ``spec.vllm.apiKeySecretRef`` (the simulated pods refuse
  calls without it) and never appears in the controller's or the router's logs, even at DEBUG, nor in
  Events, placements or the autoscaler's status.
- Body caps: the router's and the webhook's default caps answer 413 (smaller caps are exercised in
  test_bad_input.py).
- Containers run as non-root: checked on the rendered manifests by
  test/integration/test_manifests.py::test_every_pod_is_locked_down_probed_and_bounded (runAsNonRoot, uid
  65532, no privilege escalation, all capabilities dropped, read-only root filesystem).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from harness import (
    Router,
    Webhook,
    apply,
    autoscaler,
    free_port,
    placements,
    post,
    sim_call,
    start_controller,
    vllm_deployment,
    wait_ready,
)
from scenarios import Env

from common.tls import issue_serving_cert, make_ca
from localkube.wait import wait_until
from router.__main__ import build_parser as router_parser
from vllmsim import LoraModule, SimConfig
from vllmsim.background import BackgroundSimulator
from webhook.server import MAX_BODY_BYTES

pytestmark = pytest.mark.integration


def _tls_client(version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers("ALL:@SECLEVEL=0")  # let this client offer what old servers spoke
    return context


def _handshake(port: int, version: ssl.TLSVersion) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            _tls_client(version).wrap_socket(raw) as tls:
        return str(tls.version())


def _permissive_tls_server(tmp_path: Path) -> tuple[int, threading.Thread]:
    """A one-shot server that still speaks TLS 1.1: the control showing the old client works."""
    ca = make_ca("control")
    issue_serving_cert(ca, ["127.0.0.1"]).write(tmp_path / "c.crt", tmp_path / "c.key")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "c.crt", tmp_path / "c.key")
    server.minimum_version = ssl.TLSVersion.TLSv1_1
    server.set_ciphers("ALL:@SECLEVEL=0")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()

    def serve() -> None:
        with sock:
            conn, _ = sock.accept()
            try:
                server.wrap_socket(conn, server_side=True).close()
            except (OSError, ssl.SSLError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return int(sock.getsockname()[1]), thread


def _listening_ports(pid: int) -> set[int]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if f"pid={pid}," in line}


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_the_webhook_speaks_tls12_or_newer_only_and_admission_is_never_plaintext(tmp_path: Path) -> None:
    hook = Webhook(None, tmp_path, port=free_port()).start()
    try:
        port, control = _permissive_tls_server(tmp_path)
        assert _handshake(port, ssl.TLSVersion.TLSv1_1) == "TLSv1.1"  # the old client works elsewhere
        control.join(5)
        with pytest.raises(OSError):  # an alert or, under uvloop, the connection closed mid-handshake
            _handshake(hook.port, ssl.TLSVersion.TLSv1_1)
        assert _handshake(hook.port, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
        assert _handshake(hook.port, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
        # plain HTTP on the admission port gets no HTTP answer at all
        with socket.create_connection(("127.0.0.1", hook.port), timeout=5) as raw:
            raw.sendall(b"POST /validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 2\r\n\r\n{}")
            try:
                answer = raw.recv(100)
            except OSError:
                answer = b""
        assert not answer.startswith(b"HTTP/"), answer
        # the process listens on exactly two ports: admission (TLS) and metrics (plain, /metrics only)
        assert _listening_ports(hook.proc.pid) == {hook.port, hook.metrics_port}
        for method, path in (("POST", "/validate"), ("POST", "/mutate"), ("GET", "/healthz")):
            done = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method,
                                   f"http://127.0.0.1:{hook.metrics_port}{path}"], capture_output=True, text=True,
                                  check=False)
            assert done.stdout in ("404", "405"), f"{method} {path} on the metrics port: {done.stdout}"
        assert hook.admissions() == 0  # nothing reached admission by any of that
    finally:
        hook.stop()


def test_default_body_caps_answer_413(tmp_path: Path) -> None:
    hook = Webhook(None, tmp_path, port=free_port()).start()
    try:
        status, body = hook.https("POST", "/validate", b'{"pad": "' + b"x" * MAX_BODY_BYTES + b'"}')
        assert status == 413, body[:200]
        assert hook.proc.alive()
    finally:
        hook.stop()
    router_cap = router_parser().parse_args([]).max_body_bytes
    with BackgroundSimulator(SimConfig(model="tiny", host="127.0.0.1", port=0, enable_lora=True,
                                       lora_modules=[LoraModule("lora-1", "/a/1")])) as sim:
        routes = tmp_path / "routes.json"
        routes.write_text(json.dumps({"models": {"lora-1": {"preferred": [sim.url.removeprefix("http://")]}}}))
        router = Router(None, None, None, tmp_path, routes_file=routes).start()
        try:
            status, _ = post(router.url, "/v1/completions",
                             b'{"model": "lora-1", "prompt": "' + b"x" * router_cap + b'"}')
            assert status == 413
            assert post(router.url, "/v1/completions", b'{"model": "lora-1", "prompt": "x", "max_tokens": 1}')[0] == 200
        finally:
            router.stop()


def test_the_vllm_api_key_comes_from_its_secret_and_never_reaches_a_log(env: Env) -> None:
    cp, ns = env.cp, env.namespace
    key = f"sk-reliability-{uuid.uuid4().hex}"
    apply(cp, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vllm-key", "namespace": ns},
               "data": {"key": base64.b64encode(key.encode()).decode()}})
    apply(cp, vllm_deployment("llm", ns, 2, api_key_secret="vllm-key"))
    pods = wait_ready(cp, ns, "llm", 2)
    ip = pods[0]["status"]["podIP"]
    status, _ = sim_call(ip, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/x"})
    assert status == 401, "the pods must refuse calls without the key, or this test proves nothing"
    key_file = env.work / "router-key"
    key_file.write_text(key)
    controller = start_controller(cp, ns, "c0", env.work, log_level="DEBUG")
    router = Router(cp, ns, "a", env.work, api_key_file=key_file, log_level="debug")
    try:
        apply(cp, autoscaler("a", ns, "llm", [("lora-1", 1), ("lora-2", 1)], api_key_secret="vllm-key",
                             drain_timeout=2))
        wait_until(lambda: sum((p.get("status") or {}).get("phase") == "Loaded" for p in placements(cp, ns)) == 2,
                   timeout=60, what="both adapters loaded with the key")
        router.start()
        for model in ("lora-1", "lora-2"):
            def served(m: str = model) -> bool:
                return post(router.url, "/v1/completions",
                            json.dumps({"model": m, "prompt": "hi", "max_tokens": 2}).encode())[0] == 200

            wait_until(served, timeout=30, what=f"{model} served through the router with the key")
        apply(cp, autoscaler("a", ns, "llm", [("lora-1", 1)], api_key_secret="vllm-key", drain_timeout=2))
        wait_until(lambda: not any(p["spec"]["adapter"] == "lora-2" for p in placements(cp, ns)), timeout=60,
                   what="lora-2 drained and unloaded with the key")
        assert controller.alive() and router.proc.alive()
        logs = {"controller": controller.log(), "router": router.proc.log()}
        assert "load lora-1" in logs["controller"]  # the log is the real one
        state = cp.kubectl("get", "events,loraplacements,loraautoscalers,endpointslices", "-n", ns, "-o",
                           "json").stdout
        for where, text in {**logs, "API objects": state}.items():
            assert key not in text, f"the API key appears in the {where}"
            assert not re.search(re.escape(key[:24]), text), f"part of the API key appears in the {where}"
    finally:
        router.stop()
        controller.kill(15)
