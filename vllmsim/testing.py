"""A small synchronous client for one vLLM (real or simulated), used by the conformance suite and tests.

Plain ``http.client`` so it works from any thread without an event loop; waits poll with deadlines.
"""

from __future__ import annotations

import http.client
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .background import BackgroundSimulator
from .promtext import Sample, parse


@dataclass
class Response:
    """One HTTP answer."""

    status: int
    body: bytes
    headers: dict[str, str]

    @property
    def text(self) -> str:
        """Body as text."""
        return self.body.decode()

    def json(self) -> Any:
        """Body as JSON."""
        return json.loads(self.body)


@dataclass
class Target:
    """The vLLM under test and what is known about it."""

    url: str
    base: str
    is_sim: bool
    adapter_path: str | None = None
    alt_adapter_path: str | None = None
    high_rank_path: str | None = None
    max_loras: int | None = None
    max_cpu_loras: int | None = None
    api_key: str | None = None
    chat: bool = False
    sim: BackgroundSimulator | None = None
    loaded: list[str] = field(default_factory=list)

    # ---- HTTP -----------------------------------------------------------------------------------------
    def _conn(self, timeout: float = 30.0) -> http.client.HTTPConnection:
        parts = urlsplit(self.url)
        assert parts.hostname is not None
        if parts.scheme == "https":
            return http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout)
        return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        h.update(extra or {})
        return h

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Response:
        """One request; ``body`` is sent as JSON, ``raw`` as is."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn = self._conn()
        try:
            conn.request(method, path, body=data, headers=self._headers())
            r = conn.getresponse()
            return Response(r.status, r.read(), {k.lower(): v for k, v in r.getheaders()})
        finally:
            conn.close()

    def get(self, path: str) -> Response:
        """GET."""
        return self.request("GET", path)

    def post(self, path: str, body: Any = None, raw: bytes | None = None) -> Response:
        """POST."""
        return self.request("POST", path, body, raw)

    def metrics(self) -> list[Sample]:
        """Parsed /metrics."""
        r = self.get("/metrics")
        assert r.status == 200
        return parse(r.text)

    # ---- adapters -------------------------------------------------------------------------------------
    def unique(self, prefix: str = "conf") -> str:
        """A fresh adapter name, so runs against a shared real vLLM do not collide."""
        return f"{prefix}-{uuid.uuid4().hex[:8]}"

    def load(self, name: str, path: str, **extra: Any) -> Response:
        """Load an adapter (remembered for unloading at teardown)."""
        r = self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path, **extra})
        if r.status == 200 and name not in self.loaded:
            self.loaded.append(name)
        return r

    def wait_until(self, cond: Callable[[], bool], what: str, limit: float = 60.0) -> None:
        """Poll a condition with a deadline (no fixed sleeps)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")

    def running_waiting(self) -> tuple[float, float]:
        """``vllm:num_requests_running`` and ``vllm:num_requests_waiting``."""
        m = self.metrics()
        running = next((s.value for s in m if s.name == "vllm:num_requests_running"), 0.0)
        waiting = next((s.value for s in m if s.name == "vllm:num_requests_waiting"), 0.0)
        return running, waiting

    def cleanup(self) -> None:
        """Unload what the test loaded."""
        for name in self.loaded:
            try:
                self.post("/v1/unload_lora_adapter", {"lora_name": name})
            except OSError:
                pass
        self.loaded.clear()


class InFlight:
    """Long streamed requests held open (each on its own connection) and cut by closing the sockets."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.conns: list[http.client.HTTPConnection] = []

    def start(self, model: str, max_tokens: int = 1_000_000) -> None:
        """Send one long streamed completion without reading its answer."""
        conn = self.target._conn(timeout=120)
        body = {"model": model, "prompt": "hello there", "max_tokens": max_tokens, "stream": True}
        body["ignore_eos"] = True
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(), headers=self.target._headers())
        self.conns.append(conn)

    def send_in_order(self, models: list[str]) -> None:
        """Send long requests one by one, each seen by the server before the next (keeps FCFS order)."""
        t = self.target
        base = sum(t.running_waiting())
        for i, model in enumerate(models, start=1):
            self.start(model)
            want = base + i
            t.wait_until(lambda want=want: sum(t.running_waiting()) >= want, f"request {i} to arrive")  # type: ignore[misc]

    def close(self) -> None:
        """Disconnect every request (vLLM aborts them)."""
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
        self.conns.clear()
