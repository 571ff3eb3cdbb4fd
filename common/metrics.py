"""The Prometheus endpoint every component serves, with `/healthz` and `/readyz` beside `/metrics`.

One small threaded HTTP server per process: probes and scrapes must answer even when the component's own
server (the router's proxy, the webhook's TLS listener) is busy or not up yet.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

log = logging.getLogger(__name__)

Check = Callable[[], bool]

# Shared families for the common plumbing (labelled by queue / informer name).
WORKQUEUE_DEPTH = Gauge("lora_workqueue_depth", "Keys ready in the work queue", ["name"])
WORKQUEUE_ADDS = Counter("lora_workqueue_adds_total", "Keys added to the work queue", ["name"])
WORKQUEUE_RETRIES = Counter("lora_workqueue_retries_total", "Rate-limited re-queues", ["name"])
WORKQUEUE_QUEUE_DURATION = Histogram(
    "lora_workqueue_queue_duration_seconds",
    "Time a key waits in the queue before a worker takes it",
    ["name"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60),
)

INFORMER_LISTS = Counter("lora_informer_lists_total", "Full lists made by an informer", ["name"])
INFORMER_WATCHES = Counter("lora_informer_watches_total", "Watches opened by an informer", ["name"])
INFORMER_RELISTS = Counter(
    "lora_informer_relists_total", "Lists after the first, by why (gone, failures, exception)", ["name", "reason"]
)
INFORMER_ERRORS = Counter("lora_informer_errors_total", "List or watch failures", ["name"])
INFORMER_OBJECTS = Gauge("lora_informer_objects", "Objects in an informer's store", ["name"])
LEADER = Gauge("lora_leader_is_leader", "1 while this process holds the lease", ["lease"])


class MetricsServer:
    """Serves `/metrics`, `/healthz` and `/readyz` on a daemon thread; checks are added by name."""

    def __init__(self, port: int, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self._health: dict[str, Check] = {}
        self._ready: dict[str, Check] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/livez"):
                    self._checks(server.run_checks(server._health))
                elif path == "/readyz":
                    self._checks(server.run_checks(server._ready))
                else:
                    self._send(404, b"not found\n", "text/plain; charset=utf-8")

            def _checks(self, failed: list[str]) -> None:
                if failed:
                    self._send(503, ("failed: " + ", ".join(failed) + "\n").encode(), "text/plain; charset=utf-8")
                else:
                    self._send(200, b"ok\n", "text/plain; charset=utf-8")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: keep quiet
                log.debug("metrics %s - %s", self.address_string(), format % args)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        return int(self._httpd.server_address[1])

    def add_health_check(self, name: str, check: Check) -> None:
        """Liveness: a failing check makes `/healthz` answer 503 (the kubelet restarts the container)."""
        with self._lock:
            self._health[name] = check

    def add_ready_check(self, name: str, check: Check) -> None:
        """Readiness: a failing check makes `/readyz` answer 503 (the pod leaves Service endpoints)."""
        with self._lock:
            self._ready[name] = check

    def run_checks(self, checks: dict[str, Check]) -> list[str]:
        """Names of failing checks (a check that raises fails)."""
        with self._lock:
            items = list(checks.items())
        failed = []
        for name, check in items:
            try:
                ok = bool(check())
            except Exception:
                log.exception("check %s raised", name)
                ok = False
            if not ok:
                failed.append(name)
        return failed

    def start(self) -> MetricsServer:
        """Start serving; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()


def start_metrics_server(port: int, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> MetricsServer:
    """Bind and start the endpoint (port 0 picks a free port; read `.port`)."""
    return MetricsServer(port, host, registry).start()
