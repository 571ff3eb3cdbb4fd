"""``lora-router`` as a process: static routes, its two ports, live reload of the routes file, clean stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from vllmsim import LoraModule, SimConfig
from vllmsim.background import BackgroundSimulator

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, data: bytes | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            status, ctype, raw = resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        status, ctype, raw = exc.code, exc.headers.get("Content-Type", ""), exc.read()
    return status, json.loads(raw) if ctype.startswith("application/json") else raw


def wait_for(cond: Any, limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            if cond():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {limit}s")
        time.sleep(0.05)


def test_router_process_with_a_static_routes_file(tmp_path: Path) -> None:
    cfg = SimConfig(
        model="tiny", host="127.0.0.1", port=0, enable_lora=True, max_loras=2,
        allow_runtime_lora_updating=True, lora_modules=[LoraModule("a", "/adapters/a"), LoraModule("b", "/b")],
    )  # fmt: skip
    with BackgroundSimulator(cfg) as sim:
        pod = f"127.0.0.1:{sim.sim.port}"
        routes = tmp_path / "routes.yaml"
        routes.write_text(f"models:\n  tiny: {{base: true, pods: ['{pod}']}}\n  a: {{preferred: ['{pod}']}}\n")
        port, metrics = free_port(), free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "router", "--routes-file", str(routes), "--host", "127.0.0.1",
             "--port", str(port), "--metrics-port", str(metrics), "--log-level", "warning"],
            cwd=REPO, env={**os.environ, "LORA_ROUTER_API_KEY": "unused"}, start_new_session=True,
        )  # fmt: skip
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(lambda: get(f"{base}/health")[0] == 200, 20, "router healthy")
            status, body = get(f"{base}/v1/completions", b'{"model": "a", "prompt": "x", "max_tokens": 2}')
            assert status == 200 and body["model"] == "a"
            assert get(f"{base}/v1/completions", b'{"model": "b", "prompt": "x"}')[0] == 404
            # The file changes: b becomes routable without a restart.
            routes.write_text(routes.read_text() + f"  b: {{preferred: ['{pod}']}}\n")
            wait_for(
                lambda: get(f"{base}/v1/completions", b'{"model": "b", "prompt": "x", "max_tokens": 1}')[0] == 200,
                10, "b routable after the file changed",
            )  # fmt: skip
            status, load = get(f"http://127.0.0.1:{metrics}/router/load")
            assert status == 200 and load["models"]["a"]["started_total"] == 1
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as resp:
                assert b"lora_router_requests_total" in resp.read()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                assert proc.wait(15) == 0
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)


def test_bad_settings_exit_with_a_reason(tmp_path: Path) -> None:
    bad = tmp_path / "routes.yaml"
    bad.write_text("models: {a: {preferred: ['nohost']}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "router", "--routes-file", str(bad), "--port", "0", "--metrics-port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "not host:port" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "router", "--strategy", "random"],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "invalid choice" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "router", "--move-deferred-after", "-1", "--routes-file", str(bad)],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "--move-deferred-after must be 0 (off) or positive" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "router", "--hold-for-slot", "-0.5", "--routes-file", str(bad)],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "--hold-for-slot must be 0 (off) or positive" in result.stderr
