"""The demo's pure parts (no cluster): the load plan, the joins behind the live view, the summary.

Beside test_demo.py, which runs the whole demo; these run in the fast suite.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from hack.demo.load import RequestRecord, arrivals, phase_at, plan_phases
from hack.demo.observe import AdapterRow, Sample, build_rows, recent_events, window_means
from hack.demo.report import format_summary, latency_series, percentile, summarise, true_intervals
from hack.demo.view import Progress, render

ADAPTERS = [f"lora-{i}" for i in range(1, 7)]


def test_the_plan_moves_the_hot_adapter_and_ends_quiet() -> None:
    phases = plan_phases(150, ADAPTERS, hot_rate=10, background_rate=0.5)
    assert [p.name for p in phases] == ["lora-1 hot", "lora-4 hot", "quiet"]
    assert phases[0].start == 0 and phases[-1].end == 150
    assert all(a.end == b.start for a, b in itertools.pairwise(phases))
    assert phases[0].rates["lora-1"] == 10 and phases[1].rates["lora-4"] == 10
    assert set(phases[2].rates.values()) == {0.25}
    plan = arrivals(phases, seed=3)
    assert plan == sorted(plan) and plan == arrivals(phases, seed=3)
    assert all(phases[i].start <= t < phases[i].end for t, _, i in plan)
    hot = sum(1 for t, a, i in plan if i == 0 and a == "lora-1")
    assert 0.8 * 10 * phases[0].end < hot < 1.2 * 10 * phases[0].end  # Poisson at the planned rate
    assert phase_at(phases, 0) == 0 and phase_at(phases, 149.9) == 2 and phase_at(phases, 1e9) == 2


def test_a_plan_with_bad_input_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="duration must be positive"):
        plan_phases(0, ADAPTERS)
    with pytest.raises(ValueError, match=r"hot adapters \['lora-9'\]"):
        plan_phases(60, ADAPTERS, hot=("lora-1", "lora-9"))


def test_rows_join_status_placements_slices_and_router() -> None:
    autoscaler = {"status": {"adapters": [{"name": "lora-1", "desiredReplicas": 2, "loadedReplicas": 2, "load": 5.5}]}}
    placements: list[dict[str, Any]] = [
        {"spec": {"adapter": "lora-1", "podName": "a"}, "status": {"phase": "Loaded"}},
        {"spec": {"adapter": "lora-1", "podName": "b"}, "status": {"phase": "Loading"}},
        {"spec": {"adapter": "lora-2", "podName": "a", "retire": True}, "status": {"phase": "Loaded"}},
    ]
    slices = [{"metadata": {"labels": {"loraautoscaler.io/adapter": "lora-1"}},
               "endpoints": [{"targetRef": {"name": "a"}},
                             {"targetRef": {"name": "c"}, "conditions": {"ready": False}}]}]
    router = {"models": {"lora-1": {"rate": 9.5, "in_flight": 7, "queued": 1}}}
    rows = {r.name: r for r in build_rows(["lora-1", "lora-2"], autoscaler=autoscaler, placements=placements,
                                          slices=slices, router_load=router, latency={"lora-1": 1.25})}
    one, two = rows["lora-1"], rows["lora-2"]
    assert (one.desired, one.load, one.routable, one.routable_pods) == (2, 5.5, 1, ["a"])
    assert one.placements == {"a": "Loaded", "b": "Loading"} and two.placements == {"a": "Retiring"}
    assert (one.rate, one.in_flight, one.queued, one.latency) == (9.5, 7, 1, 1.25)
    assert (two.desired, two.routable, two.rate, two.latency) == (None, 0, 0.0, None)


def test_window_means_and_events() -> None:
    assert window_means({"a": (12.0, 10.0), "b": (3.0, 3.0)}, {"a": (2.0, 2.0), "b": (3.0, 3.0)}) == {"a": 1.25}
    events: list[dict[str, Any]] = [
        {"reportingController": "lora-autoscaler-controller", "eventTime": "2030-01-01T10:00:02.000000Z",
         "reason": "Loaded", "note": "lora-1 on a", "regarding": {"kind": "LoRAPlacement", "name": "p1"}},
        {"reportingController": "someone-else", "eventTime": "2030-01-01T10:00:03.000000Z", "reason": "X"},
        {"reportingController": "lora-autoscaler-controller", "eventTime": "2030-01-01T10:00:01.000000Z",
         "series": {"count": 3, "lastObservedTime": "2030-01-01T10:00:09.000000Z"}, "reason": "Placed", "note": "n",
         "regarding": {"kind": "LoRAAutoscaler", "name": "demo"}},
    ]
    assert recent_events(events, "lora-autoscaler-controller") == [
        "10:00:02 Loaded: lora-1 on a", "10:00:09 Placed: n (x3)"]


def _sample(t: float, desired: int, routable: int) -> Sample:
    rows = [AdapterRow("lora-1", desired=desired, routable=routable, routable_pods=["a"] * routable),
            AdapterRow("lora-2", desired=1, routable=1, routable_pods=["b"])]
    return Sample(t, rows, [], {"Ready": ("True", "AllAdaptersRoutable", ""),
                                "Saturated": ("True" if desired > 2 else "False", "NoFreeSlots", "full")})


def test_the_summary_counts_what_was_recorded() -> None:
    phases = plan_phases(30, ADAPTERS)
    records = [RequestRecord(1.0 + i * 0.1, "lora-1", 0, 200, 1.0 + i / 100) for i in range(100)]
    records += [RequestRecord(12.0, "lora-4", 1, 503, 10.0, "no holder"), RequestRecord(25.0, "lora-2", 2, 0, 30.0)]
    samples = [_sample(0, 1, 1), _sample(1, 2, 1), _sample(2, 2, 2), _sample(3, 3, 2), _sample(9, 1, 1)]
    summary = summarise(records, phases, samples, {"loads": {"lora-1": 3}, "unloads": {"lora-1": 2}})
    assert summary["requests"] == {"sent": 102, "ok": 100, "failed": 2, "failed_by_status": {"503": 1, "no answer": 1},
                                   "p50_ms": 1490.0, "p99_ms": 1980.0}
    assert [p["sent"] for p in summary["phases"]] == [100, 1, 1]
    assert summary["phases"][1]["p50_ms"] is None
    assert summary["scale_events"]["lora-1"] == [{"t": 1, "from": 1, "to": 2}, {"t": 3, "from": 2, "to": 3},
                                                 {"t": 9, "from": 3, "to": 1}]
    assert summary["scale_events"]["lora-2"] == []
    assert summary["routable_replicas"]["lora-1"] == {"min": 1, "max": 2}
    saturated = [(c["t"], c["status"]) for c in summary["conditions"] if c["type"] == "Saturated"]
    assert saturated == [(0, "False"), (3, "True"), (9, "False")]
    assert true_intervals(samples, "Saturated") == [(3, 9)] and true_intervals(samples[:4], "Saturated") == [(3, 3)]
    text = format_summary(summary)
    assert "102 sent, 100 ok, 2 failed" in text and "1s: 1->2" in text and "3s Saturated=True" in text
    series = latency_series(records, 30, bin_seconds=5)
    assert len(series["t"]) == 6 and series["failed_rate"][2] == 0.2 and series["p50"][5] is None


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile(list(range(1, 101)), 99) == 99


def test_the_screen_shows_every_adapter_and_the_unusual_conditions() -> None:
    phases = plan_phases(30, ADAPTERS)
    screen = render(_sample(3, 3, 2), Progress(3, 30, 0, 50, 45, 1, 4, 1.2, 1.9), phases, "demo")
    assert "phase 1/3: lora-1 hot (lora-1 at 10 req/s, others 0.4)" in screen
    assert "Saturated=True (NoFreeSlots)" in screen and "Ready=True " in screen and "AllAdaptersRoutable" not in screen
    assert "p50 1200 ms, p99 1900 ms" in screen
    assert max(len(line) for line in screen.splitlines()) <= 132
