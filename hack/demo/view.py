"""The live view: one screen of plain text per second (ANSI clear on a terminal, nothing else needed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hack.demo.load import Phase
from hack.demo.observe import Sample

CLEAR = "\x1b[H\x1b[2J"
PHASE_MARKS = {"Loaded": "", "Loading": "+", "Pending": "+", "Retiring": "-", "Draining": "-", "Unloading": "-",
               "Failed": "!"}
"""Suffix of a pod name in the adapter table: + on its way in, - on its way out, ! failed."""
NORMAL = {"Ready": "True", "Progressing": "False", "Saturated": "False", "Degraded": "False"}
"""Each condition's usual status; the reason is shown only when it differs."""


@dataclass(frozen=True)
class Progress:
    """Where the run is: time, phase and the client's counts."""

    elapsed: float
    duration: float
    phase: int
    sent: int
    ok: int
    failed: int
    in_flight: int
    p50: float | None = None
    p99: float | None = None
    """Client-side latency of the requests answered in the last few seconds."""


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _num(value: float | int | None, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def short_pod(name: str) -> str:
    """The part of a Deployment pod's name that tells replicas apart (its last segment)."""
    return name.rsplit("-", 1)[-1] if "-" in name else name


def render(sample: Sample, progress: Progress, phases: Sequence[Phase], autoscaler: str) -> str:
    """The whole screen as text (pure)."""
    phase = phases[progress.phase]
    top, low = max(phase.rates.values()), min(phase.rates.values())
    hot = [a for a, r in phase.rates.items() if r == top]
    rates = (f" ({', '.join(hot)} at {top:g} req/s, others {low:g})" if top > low
             else f" (every adapter at {top:g} req/s)")
    lines = [
        f"LoRA autoscaler demo   t={progress.elapsed:5.0f}s of {progress.duration:.0f}s   "
        f"phase {progress.phase + 1}/{len(phases)}: {phase.name}{rates}",
        f"client: sent {progress.sent}  ok {progress.ok}  failed {progress.failed}  in flight {progress.in_flight}  "
        f"latency of the last 10 s: p50 {_ms(progress.p50)} ms, p99 {_ms(progress.p99)} ms",
        "",
    ]
    conds = "  ".join(
        f"{ctype}={sample.conditions[ctype][0]}"
        + (f" ({sample.conditions[ctype][1]})" if sample.conditions[ctype][0] != NORMAL[ctype] else "")
        for ctype in NORMAL if ctype in sample.conditions
    )
    lines.append(f"LoRAAutoscaler {autoscaler}: {conds or '(no conditions yet)'}")
    for ctype in ("Saturated", "Degraded"):
        status, _, message = sample.conditions.get(ctype, ("", "", ""))
        if status == "True" and message:
            lines.append(f"  {ctype}: {message[:150]}")
    lines += ["", f"{'adapter':<8} {'desired':>7} {'routable':>8} {'load':>6} {'req/s':>6} {'in-fl':>5} "
              f"{'mean ms':>7}  pods (+ loading, - draining)"]
    for row in sample.adapters:
        pods = sorted(set(row.placements) | set(row.routable_pods))
        marks = " ".join(short_pod(p) + PHASE_MARKS.get(row.placements.get(p, "Loaded"), "?") for p in pods)
        lines.append(
            f"{row.name:<8} {_num(row.desired):>7} {row.routable:>8} {_num(row.load, '{:.1f}'):>6} "
            f"{row.rate:>6.1f} {row.in_flight:>5} {_ms(row.latency):>7}  {marks}"
        )
    lines.append("(desired, load: the autoscaler's status; routable: the EndpointSlices; the rest: the router)")
    lines += ["", f"{'pod':<8} {'ip':<15} {'ready':<5} {'in-fl':>5}  adapters placed        running in vLLM now"]
    placed: dict[str, list[str]] = {}
    for row in sample.adapters:
        for pod, ph in row.placements.items():
            placed.setdefault(pod, []).append(row.name + PHASE_MARKS.get(ph, "?"))
    for p in sample.pods:
        lines.append(
            f"{short_pod(p.name):<8} {p.ip:<15} {'yes' if p.ready else 'no':<5} {p.in_flight:>5}  "
            f"{' '.join(sorted(placed.get(p.name, []))):<22} {' '.join(p.running_adapters)}"
        )
    if sample.events:
        lines += ["", "latest events:", *(f"  {e[:130]}" for e in sample.events)]
    if sample.errors:
        lines += ["", *(f"! {e[:150]}" for e in sample.errors[:3])]
    return "\n".join(lines)
