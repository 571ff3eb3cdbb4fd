"""The end of the run: a summary (printed and as JSON) and PNG plots, from the samples and the requests.

Summaries are pure functions of what was recorded; only :func:`write_plots` and :func:`write_json` touch
files. Plots use matplotlib's Agg backend: no display is needed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hack.demo.load import Phase, RequestRecord
from hack.demo.observe import Sample

LATENCY_BIN_SECONDS = 5.0
PHASE_COLOURS = ("#fde8d7", "#dcebf7", "#eeeeee", "#e6f2e0")
SATURATED_COLOUR = "#e03131"


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def request_stats(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Counts and client-side latency (answered with 200 only) of some requests."""
    ok = [r.latency for r in records if r.status == 200]
    failed: dict[str, int] = {}
    for r in records:
        if r.status != 200:
            key = {0: "no answer", -1: "not sent (client limit)"}.get(r.status, str(r.status))
            failed[key] = failed.get(key, 0) + 1
    return {"sent": len(records), "ok": len(ok), "failed": len(records) - len(ok), "failed_by_status": failed,
            "p50_ms": _ms(percentile(ok, 50)), "p99_ms": _ms(percentile(ok, 99))}


def scale_events(samples: Sequence[Sample]) -> dict[str, list[dict[str, Any]]]:
    """Every change of each adapter's desired replicas (the autoscaler's status), with its time."""
    out: dict[str, list[dict[str, Any]]] = {}
    last: dict[str, int] = {}
    for s in samples:
        for row in s.adapters:
            out.setdefault(row.name, [])
            if row.desired is None:
                continue
            before = last.get(row.name)
            if before is not None and row.desired != before:
                out[row.name].append({"t": round(s.t, 1), "from": before, "to": row.desired})
            last[row.name] = row.desired
    return out


def condition_changes(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """When each condition of the autoscaler changed status, as seen by the samples."""
    out: list[dict[str, Any]] = []
    last: dict[str, str] = {}
    for s in samples:
        for ctype, (status, reason, message) in sorted(s.conditions.items()):
            if last.get(ctype) != status:
                out.append({"t": round(s.t, 1), "type": ctype, "status": status, "reason": reason,
                            "message": message})
                last[ctype] = status
    return out


def true_intervals(samples: Sequence[Sample], ctype: str) -> list[tuple[float, float]]:
    """The stretches of time (start, end) during which a condition was True, from sample to sample."""
    out: list[tuple[float, float]] = []
    start: float | None = None
    for s in samples:
        holds = s.conditions.get(ctype, ("",))[0] == "True"
        if holds and start is None:
            start = s.t
        elif not holds and start is not None:
            out.append((start, s.t))
            start = None
    if start is not None and samples:
        out.append((start, samples[-1].t))
    return out


def summarise(
    records: Sequence[RequestRecord],
    phases: Sequence[Phase],
    samples: Sequence[Sample],
    lora_calls: Mapping[str, Mapping[str, int]],
    *,
    interrupted: bool = False,
) -> dict[str, Any]:
    """The run in numbers (pure): requests, latency per phase, scale events, loads and unloads."""
    per_phase = []
    for i, phase in enumerate(phases):
        mine = [r for r in records if r.phase == i]
        stats = request_stats(mine)
        stats["by_adapter"] = {a: request_stats([r for r in mine if r.adapter == a])
                               for a in sorted({r.adapter for r in mine})}
        per_phase.append({"name": phase.name, "start": round(phase.start, 1), "end": round(phase.end, 1), **stats})
    routable: dict[str, list[int]] = {}
    for s in samples:
        for row in s.adapters:
            routable.setdefault(row.name, []).append(row.routable)
    final = samples[-1] if samples else None
    return {
        "interrupted": interrupted,
        "requests": request_stats(records),
        "phases": per_phase,
        "scale_events": scale_events(samples),
        "routable_replicas": {a: {"min": min(v), "max": max(v)} for a, v in routable.items() if v},
        "conditions": condition_changes(samples),
        "lora_calls": {k: dict(v) for k, v in lora_calls.items()},
        "final": {row.name: {"desired": row.desired, "routable_pods": row.routable_pods}
                  for row in (final.adapters if final else [])},
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as a few lines for the terminal."""
    req = summary["requests"]
    failed = ", ".join(f"{k}: {v}" for k, v in req["failed_by_status"].items()) or "none"
    lines = [f"requests: {req['sent']} sent, {req['ok']} ok, {req['failed']} failed ({failed})", "",
             f"{'phase':<14} {'sent':>6} {'failed':>6} {'p50 ms':>8} {'p99 ms':>8}"]
    for p in summary["phases"]:
        lines.append(f"{p['name']:<14} {p['sent']:>6} {p['failed']:>6} {_fmt(p['p50_ms']):>8} {_fmt(p['p99_ms']):>8}")
    lines += ["", f"{'adapter':<8} {'replicas':>8} {'loads':>6} {'unloads':>7}  scale events (t: from->to)"]
    calls = summary["lora_calls"]
    for adapter, events in summary["scale_events"].items():
        span = summary["routable_replicas"].get(adapter, {})
        replicas = f"{span.get('min', '-')}..{span.get('max', '-')}"
        changes = "  ".join(f"{e['t']:.0f}s: {e['from']}->{e['to']}" for e in events) or "none"
        lines.append(f"{adapter:<8} {replicas:>8} {calls.get('loads', {}).get(adapter, 0):>6} "
                     f"{calls.get('unloads', {}).get(adapter, 0):>7}  {changes}")
    transitions = [f"{c['t']:.0f}s {c['type']}={c['status']}" + (f" ({c['reason']})" if c["reason"] else "")
               for c in summary["conditions"] if c["type"] in ("Saturated", "Degraded", "Ready")]
    if transitions:
        lines += ["", "conditions: " + ", ".join(transitions)]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def write_json(path: Path, summary: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")


def _shade_phases(ax: Any, phases: Sequence[Phase], *, label: bool) -> None:
    for i, phase in enumerate(phases):
        ax.axvspan(phase.start, phase.end, color=PHASE_COLOURS[i % len(PHASE_COLOURS)], zorder=0, lw=0)
        if label:
            ax.text((phase.start + phase.end) / 2, 1.02, phase.name, transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=9)


def latency_series(
    records: Sequence[RequestRecord], end: float, bin_seconds: float = LATENCY_BIN_SECONDS
) -> dict[str, list[float | None]]:
    """Client latency p50/p99 (ok requests) and throughput per time bin, by request start (pure)."""
    bins = max(1, math.ceil(end / bin_seconds))
    ok: list[list[float]] = [[] for _ in range(bins)]
    failed = [0] * bins
    for r in records:
        i = min(bins - 1, max(0, int(r.start // bin_seconds)))
        if r.status == 200:
            ok[i].append(r.latency)
        else:
            failed[i] += 1
    return {
        "t": [(i + 0.5) * bin_seconds for i in range(bins)],
        "p50": [percentile(v, 50) for v in ok],
        "p99": [percentile(v, 99) for v in ok],
        "ok_rate": [len(v) / bin_seconds for v in ok],
        "failed_rate": [f / bin_seconds for f in failed],
    }


def write_plots(out: Path, samples: Sequence[Sample], records: Sequence[RequestRecord],
                phases: Sequence[Phase]) -> list[Path]:
    """replicas.png (per adapter: routable and desired replicas, request rate) and latency.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    end = max([phases[-1].end, *(s.t for s in samples)]) if phases else 1.0
    adapters = [row.name for row in samples[0].adapters] if samples else []
    paths = []

    fig, axes = plt.subplots(len(adapters) or 1, 1, sharex=True, figsize=(11, 1.55 * max(1, len(adapters)) + 1.2),
                             squeeze=False)
    top = max([1, *(max(r.routable, r.desired or 0) for s in samples for r in s.adapters)]) + 1
    top_rate = max([1.0, *(r.rate for s in samples for r in s.adapters)]) * 1.15
    ts = [s.t for s in samples]
    saturated = true_intervals(samples, "Saturated")
    for i, adapter in enumerate(adapters):
        ax = axes[i][0]
        rows = [next(r for r in s.adapters if r.name == adapter) for s in samples]
        rate_ax = ax.twinx()
        _shade_phases(rate_ax, phases, label=i == 0)
        rate_ax.fill_between(ts, [r.rate for r in rows], step="post", color="#9aa5b1", alpha=0.45, lw=0)
        rate_ax.set_ylim(0, top_rate)
        rate_ax.tick_params(axis="y", labelsize=8, colors="#6b7683")
        rate_ax.set_ylabel("req/s", fontsize=8, color="#6b7683")
        ax.set_zorder(rate_ax.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.step(ts, [r.routable for r in rows], where="post", color="#1f5fa8", lw=2.2, label="routable replicas")
        ax.step(ts, [r.desired if r.desired is not None else math.nan for r in rows], where="post", color="#d9480f",
                lw=1.3, ls="--", label="desired replicas")
        for begin, finish in saturated:
            ax.axvspan(begin, max(finish, begin + 0.5), color=SATURATED_COLOUR, alpha=0.35, lw=0)
        ax.set_ylim(0, top)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(adapter, fontsize=10, rotation=0, ha="right", va="center", fontweight="bold")
        ax.grid(axis="y", color="#cccccc", lw=0.5)
    bottom = axes[-1][0]
    bottom.set_xlim(0, end)
    bottom.set_xlabel("seconds since the load started")
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles.append(Patch(color="#9aa5b1", alpha=0.45))
    labels.append("requests/s (router, right axis)")
    if saturated:
        handles.append(Patch(color=SATURATED_COLOUR, alpha=0.35))
        labels.append("Saturated (no free LoRA slot)")
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle("Replicas per adapter: routable = pods in its EndpointSlice, desired = the LoRAAutoscaler's status",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    path = out / "replicas.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    series = latency_series(records, end)
    fig, (lat, thr) = plt.subplots(2, 1, sharex=True, figsize=(11, 6), gridspec_kw={"height_ratios": [3, 1.3]})
    _shade_phases(lat, phases, label=True)
    _shade_phases(thr, phases, label=False)
    for key, colour, width in (("p50", "#1f5fa8", 2.0), ("p99", "#d9480f", 2.0)):
        values = [math.nan if v is None else v * 1000 for v in series[key]]
        lat.plot(series["t"], values, color=colour, lw=width, marker="o", ms=3, label=f"{key}")
    lat.set_ylabel("latency (ms)")
    lat.set_ylim(bottom=0)
    lat.grid(color="#cccccc", lw=0.5)
    lat.legend(loc="upper right", fontsize=9)
    lat.set_title(f"Client-side latency per {LATENCY_BIN_SECONDS:.0f} s of request starts (answered requests)",
                  fontsize=11, pad=18)
    thr.bar(series["t"], series["ok_rate"], width=LATENCY_BIN_SECONDS * 0.9, color="#5c940d", label="ok")
    thr.bar(series["t"], series["failed_rate"], width=LATENCY_BIN_SECONDS * 0.9, bottom=series["ok_rate"],
            color="#c92a2a", label="failed")
    thr.set_ylabel("requests/s")
    thr.set_xlabel("seconds since the load started")
    thr.set_xlim(0, end)
    thr.legend(loc="upper right", fontsize=8, ncol=2)
    fig.tight_layout()
    path = out / "latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths
