"""The pieces around the informer that need no API server: resource paths, error parsing, client loading,
the event recorder's promise never to block or raise, and the metrics/health endpoint."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s_client
from prometheus_client import CollectorRegistry, Counter

from common.events import EventRecorder, ObjectRef
from common.kube import (
    EVENTS,
    LORA_AUTOSCALERS,
    NAMESPACES,
    PODS,
    ApiConnectionError,
    KubeClient,
    error_from_response,
    load_api_client,
    object_key,
    split_key,
)
from common.metrics import start_metrics_server


def test_resource_paths() -> None:
    assert PODS.path("ns", "p", "status") == "/api/v1/namespaces/ns/pods/p/status"
    assert PODS.path() == "/api/v1/pods"
    assert LORA_AUTOSCALERS.path("ns") == "/apis/loraautoscaler.io/v1alpha1/namespaces/ns/loraautoscalers"
    assert LORA_AUTOSCALERS.api_version == "loraautoscaler.io/v1alpha1"
    assert NAMESPACES.path(name="x") == "/api/v1/namespaces/x"
    assert PODS.path("ns", "a/b") == "/api/v1/namespaces/ns/pods/a%2Fb", "names are escaped, never path syntax"
    with pytest.raises(ValueError, match="cluster-scoped"):
        NAMESPACES.path("ns", "x")
    with pytest.raises(ValueError, match="needs a name"):
        PODS.path("ns", subresource="status")
    with pytest.raises(ValueError, match="empty name"):
        PODS.path("ns", "")


def test_keys() -> None:
    assert object_key({"metadata": {"namespace": "a", "name": "b"}}) == "a/b"
    assert object_key({"metadata": {"name": "node-1"}}) == "node-1"
    assert split_key("a/b") == ("a", "b")
    assert split_key("node-1") == (None, "node-1")


def test_error_from_a_status_body_and_from_garbage() -> None:
    body = b'{"kind":"Status","apiVersion":"v1","status":"Failure","message":"pods \\"x\\" not found",' \
        b'"reason":"NotFound","details":{"name":"x","kind":"pods"},"code":404}'  # fmt: skip
    err = error_from_response("GET", "/api/v1/namespaces/a/pods/x", 404, body, {})
    assert (err.status, err.reason, err.message) == (404, "NotFound", 'pods "x" not found')
    assert err.details == {"name": "x", "kind": "pods"} and err.not_found and not err.retriable
    assert "GET /api/v1/namespaces/a/pods/x: 404 NotFound" in str(err)
    proxy = error_from_response("GET", "/x", 503, b"<html>upstream down</html>", {"Retry-After": "7"})
    assert (proxy.reason, proxy.message, proxy.retry_after) == ("ServiceUnavailable", "<html>upstream down</html>", 7)
    assert proxy.retriable
    conflict = error_from_response("PUT", "/x", 409, b'{"kind":"Status","reason":"Conflict","message":"m"}', {})
    assert conflict.conflict and not conflict.already_exists


def test_load_api_client_from_a_kubeconfig_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://10.1.2.3:6443", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "secret-token"}}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "ctx",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    api = load_api_client(str(path))
    assert api.configuration.host == "https://10.1.2.3:6443"
    assert api.configuration.connection_pool_maxsize >= 32
    kube = KubeClient(api)
    assert kube._headers(None)["authorization"] == "Bearer secret-token"
    monkeypatch.setenv("KUBECONFIG", str(path))
    assert load_api_client().configuration.host == "https://10.1.2.3:6443"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_api_client(str(tmp_path / "missing"))


def test_unreachable_server_is_an_api_connection_error_within_the_timeout() -> None:
    conf = k8s_client.Configuration()
    conf.host = "http://127.0.0.1:9"  # discard port: nothing listens
    kube = KubeClient(k8s_client.ApiClient(conf), timeout=(1.0, 1.0))
    started = time.monotonic()
    with pytest.raises(ApiConnectionError) as exc:
        kube.get(PODS, "p", "ns")
    assert exc.value.status == 0 and exc.value.retriable
    assert time.monotonic() - started < 5


def test_bad_patch_arguments_are_clear_errors() -> None:
    kube = KubeClient(k8s_client.ApiClient(k8s_client.Configuration()))
    with pytest.raises(ValueError, match="list of operations"):
        kube.patch(PODS, "p", {"op": "add"}, "ns", patch_type="json")
    with pytest.raises(ValueError, match="unknown patch type"):
        kube.patch(PODS, "p", {}, "ns", patch_type="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="force only applies"):
        kube.patch(PODS, "p", {}, "ns", force=True)
    with pytest.raises(ValueError, match="namespaced"):
        kube.create(PODS, {"metadata": {"name": "p"}})


class SlowEvents(BaseHTTPRequestHandler):
    """An API server whose Event writes take `delay` seconds each; counts what it was sent."""

    protocol_version = "HTTP/1.1"
    delay = 0.0
    received: list[tuple[str, str, dict]] = []
    lock = threading.Lock()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        import json

        data = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        with self.lock:
            self.received.append((self.command, self.path, data))
        time.sleep(self.delay)
        if self.command == "POST":
            out = dict(data)
            out["metadata"] = dict(data["metadata"], uid="u")
            self._reply(201, json.dumps(out).encode())
        else:
            self._reply(200, b"{}")

    do_POST = _handle
    do_PATCH = _handle


@pytest.fixture
def events_server() -> Iterator[tuple[type[SlowEvents], KubeClient]]:
    handler = type("H", (SlowEvents,), {"received": [], "delay": 0.0, "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    conf = k8s_client.Configuration()
    conf.host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield handler, KubeClient(k8s_client.ApiClient(conf))
    finally:
        server.shutdown()
        server.server_close()


POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns", "uid": "pod-uid"}}


def test_recorder_creates_then_aggregates_repeats_into_a_series(
    events_server: tuple[type[SlowEvents], KubeClient],
) -> None:
    handler, kube = events_server
    rec = EventRecorder(kube, "ctl", instance="i-1")
    try:
        rec.normal(POD, "Loaded", "lora-1 loaded")
        assert rec.flush(5)
        for _ in range(3):
            rec.normal(POD, "Loaded", "lora-1 loaded")
        rec.warning(POD, "Loaded", "a different message is a different event")
        assert rec.flush(5)
        sent = handler.received
        posts = [d for m, _, d in sent if m == "POST"]
        patches = [(p, d) for m, p, d in sent if m == "PATCH"]
        assert len(posts) == 2, "one Event per distinct (object, type, reason, message)"
        first = posts[0]
        regarding = {"kind": "Pod", "name": "p", "namespace": "ns", "uid": "pod-uid", "apiVersion": "v1"}
        assert first["regarding"] == regarding
        assert first["metadata"]["namespace"] == "ns" and first["metadata"]["name"].startswith("p.")
        assert (first["reportingController"], first["reportingInstance"], first["action"]) == ("ctl", "i-1", "Loaded")
        assert all(p.startswith(EVENTS.path("ns")) for p, _ in patches)
        assert patches, "repeats patch the existing Event"
        assert patches[-1][1]["series"]["count"] == 4
        assert rec.written == len(posts) + len(patches) and rec.failed == 0
    finally:
        rec.close()


def test_recorder_never_blocks_and_drops_when_its_queue_is_full(
    events_server: tuple[type[SlowEvents], KubeClient],
) -> None:
    handler, kube = events_server
    handler.delay = 0.5
    rec = EventRecorder(kube, "ctl", queue_size=2)
    try:
        started = time.monotonic()
        for i in range(20):
            rec.normal(ObjectRef("Pod", f"p{i}", "ns"), "Loaded", f"m{i}")
        assert time.monotonic() - started < 0.2, "recording must not wait for the API server"
        assert rec.dropped >= 15
    finally:
        handler.delay = 0.0
        rec.close()


def test_recorder_swallows_bad_input_and_api_failures(events_server: tuple[type[SlowEvents], KubeClient]) -> None:
    _, kube = events_server
    rec = EventRecorder(kube, "ctl")
    try:
        rec.event({"kind": "Pod"}, "Normal", "R", "no name")  # logged, not raised
        rec.event(POD, "Bogus", "R", "m")  # type: ignore[arg-type]
        rec.event(POD, "Normal", "", "m")
        assert rec.flush(2)
        assert rec.written == 0
    finally:
        rec.close()
    conf = k8s_client.Configuration()
    conf.host = "http://127.0.0.1:9"
    down = EventRecorder(KubeClient(k8s_client.ApiClient(conf), timeout=(0.5, 0.5)), "ctl")
    try:
        down.warning(POD, "R", "m")
        assert down.flush(10)
        assert down.failed == 1 and down.written == 0
    finally:
        down.close()


def test_metrics_server_serves_metrics_and_health_checks() -> None:
    registry = CollectorRegistry()
    Counter("unit_things_total", "Things", registry=registry).inc(3)
    server = start_metrics_server(0, "127.0.0.1", registry)
    ready = {"ok": False}
    server.add_ready_check("informers-synced", lambda: ready["ok"])
    server.add_health_check("boom", lambda: 1 / 0 == 0)

    def get(path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    try:
        status, body = get("/metrics")
        assert status == 200 and "unit_things_total 3.0" in body
        assert get("/readyz") == (503, "failed: informers-synced\n")
        ready["ok"] = True
        assert get("/readyz") == (200, "ok\n")
        assert get("/healthz") == (503, "failed: boom\n"), "a check that raises fails"
        assert get("/nope")[0] == 404
    finally:
        server.stop()
