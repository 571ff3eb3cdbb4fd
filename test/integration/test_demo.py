"""`make demo`, shortened: the whole system starts, takes the load, shows it, reports it and cleans up.

Runs `python -m hack.demo` (what `hack/demo.sh` runs after set-up) as a user would, against the real
control plane binaries, and checks what it leaves: exit status, plots, the JSON summary, logs, and no
process still running. Other runs are interrupted during the load, by SIGINT (Ctrl-C) and by SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from localkube.binaries import ENV_BIN_DIR, find_binaries
from localkube.process import pid_alive

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = [f"lora-{i}" for i in range(1, 7)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.integration


def demo_env() -> dict[str, str]:
    return {**os.environ, ENV_BIN_DIR: str(find_binaries()), "PYTHONUNBUFFERED": "1"}


# `python -m hack.demo`, with Ctrl-C handled as from a terminal: a suite run in the background by a shell
# without job control inherits SIGINT ignored, and Python then leaves it ignored.
AS_FROM_A_TERMINAL = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                      "runpy.run_module('hack.demo', run_name='__main__', alter_sys=True)")


def start_demo(out: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", AS_FROM_A_TERMINAL, "--out", str(out), *args], cwd=ROOT,
                            env=demo_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen[str], timeout: float) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"the demo did not end within {timeout:.0f}s; it printed:\n{output[-5000:]}") from None
    return output


def assert_all_stopped(summary: dict[str, Any]) -> None:
    pids = summary["processes"]["pids"]
    # control plane (3), simulators (4), webhook, controller, router; the reaper too
    assert len(pids) >= 10, pids
    assert summary["processes"]["left_running"] == []
    assert [p for p in pids if pid_alive(p)] == []


def test_a_short_demo_runs_to_the_end_and_leaves_plots_summary_and_nothing_running(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = start_demo(out, "--duration", "40")
    output = finish(proc, timeout=300)
    assert proc.returncode == 0, output[-5000:]

    for name in ("replicas.png", "latency.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000, f"{name}: {len(data)} bytes"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is False
    requests = summary["requests"]
    assert requests["sent"] >= 150, requests
    assert requests["failed"] <= requests["sent"] * 0.02, requests
    assert [p["name"] for p in summary["phases"]] == ["lora-1 hot", "lora-4 hot", "quiet"]
    for phase in summary["phases"]:
        assert phase["ok"] > 0 and 500 <= phase["p50_ms"] <= phase["p99_ms"] < 30_000, phase
    # the hot adapter of each phase got most of that phase's requests
    for phase, hot in zip(summary["phases"][:2], ("lora-1", "lora-4"), strict=True):
        assert phase["by_adapter"][hot]["sent"] > phase["sent"] / 2, phase
    # every adapter was loaded by the controller on some pod, and is routable at the end
    assert set(summary["lora_calls"]["loads"]) == set(ADAPTERS), summary["lora_calls"]
    assert all(summary["final"][a]["routable_pods"] for a in ADAPTERS), summary["final"]
    assert set(summary["scale_events"]) == set(ADAPTERS)
    # each hot adapter gained a replica in its phase, seen in the status and in the route table
    for phase, hot in zip(summary["phases"][:2], ("lora-1", "lora-4"), strict=True):
        ups = [e for e in summary["scale_events"][hot] if e["to"] > e["from"]]
        assert ups and phase["start"] <= ups[0]["t"] <= phase["end"] + 5, (hot, summary["scale_events"][hot])
        assert summary["routable_replicas"][hot]["max"] >= 2, summary["routable_replicas"]
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in summary["conditions"])
    assert_all_stopped(summary)

    # the live view showed the placements, and the printed summary says where the files are
    live = (out / "live.txt").read_text()
    assert live.count("--- t=") >= 30 and "lora-4" in live and "Saturated=" in live
    assert "requests:" in output and str(out / "replicas.png") in output and str(out / "summary.json") in output
    for component in ("webhook", "controller", "router"):
        assert (out / "logs" / f"{component}.log").stat().st_size > 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_during_the_load_stops_everything_and_still_reports(tmp_path: Path, signum: int) -> None:
    out = tmp_path / "demo"
    proc = start_demo(out, "--duration", "60")
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 180
    # The demo prints "load: ..." when the requests start, then a frame of its view every 10 s without a
    # terminal: the second frame means the load has run for about 10 s.
    for line in proc.stdout:
        seen.append(line)
        if sum(1 for s in seen if s.startswith("--- t=")) >= 2 or time.monotonic() > deadline:
            break
    assert any("] load: " in line for line in seen), "".join(seen)[-3000:]
    assert sum(1 for s in seen if s.startswith("--- t=")) >= 2, "".join(seen)[-3000:]
    proc.send_signal(signum)
    output = "".join(seen) + finish(proc, timeout=90)
    assert proc.returncode == 128 + signum, output[-5000:]
    assert "interrupted" in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert summary["requests"]["sent"] > 0
    assert_all_stopped(summary)
