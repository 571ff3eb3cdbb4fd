"""The LoRAAutoscaler's status, computed purely from what the reconciler saw and decided.

Conditions keep their ``lastTransitionTime`` while their status holds, and per-adapter ``lastScaleTime``
moves only when the desired replica count moves, so a status computed twice from the same facts is the
same status and the reconciler can skip the write.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from api.v1alpha1 import AdapterStatus, Condition, LoRAAutoscalerStatus
from controller.timeutil import rfc3339

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
SATURATED = "Saturated"
# Problems that mean nothing can be placed at all: Ready is False for them whatever the pods hold.
BLOCKING_REASONS = ("InvalidSpec", "TargetNotFound", "TargetForbidden", "TargetHasNoSelector",
                    "TargetSelectorInvalid")


@dataclass(frozen=True)
class Problem:
    """Something that makes the autoscaler Degraded: a CamelCase reason and a message for people."""

    reason: str
    message: str


@dataclass(frozen=True)
class PlacementFact:
    adapter: str
    pod: str
    phase: str
    retire: bool = False
    permanent: bool = False
    last_error: str | None = None


@dataclass(frozen=True)
class Saturation:
    """The hand-over hook's view: every replica is full and adapters still need room."""

    saturated: bool
    needed_replicas: int = 0
    reason: str = ""
    message: str = ""
    recommendation: str | None = None


@dataclass(frozen=True)
class StatusInput:
    generation: int | None
    adapters: Sequence[tuple[str, int]]  # (name, minReplicas) in spec order
    replicas: int  # serving pods of the target
    placements: Sequence[PlacementFact] = ()
    desired: Mapping[str, int] = field(default_factory=dict)
    routable: Mapping[str, Sequence[str]] = field(default_factory=dict)
    loads: Mapping[str, float | None] = field(default_factory=dict)
    problems: Sequence[Problem] = ()  # target missing, spec invalid, route-table clashes
    saturation: Saturation | None = None
    previous: LoRAAutoscalerStatus | None = None


def _condition(prev: Mapping[str, Condition], ctype: str, ok: bool, reason: str, message: str, *,
               generation: int | None, now: float) -> Condition:
    status: Literal["True", "False"] = "True" if ok else "False"
    old = prev.get(ctype)
    since = old.last_transition_time if old is not None and old.status == status and old.last_transition_time \
        else rfc3339(now)
    return Condition(type=ctype, status=status, reason=reason, message=message, last_transition_time=since,
                     observed_generation=generation)


def _join(items: Sequence[str], limit: int = 5) -> str:
    head = ", ".join(items[:limit])
    return head + (f" and {len(items) - limit} more" if len(items) > limit else "")


def compute(inp: StatusInput, now: float) -> LoRAAutoscalerStatus:
    """The status for ``inp``; pure."""
    prev = inp.previous or LoRAAutoscalerStatus()
    prev_conditions = {c.type: c for c in prev.conditions}
    prev_adapters = {a.name: a for a in prev.adapters}
    by_adapter: dict[str, list[PlacementFact]] = {}
    for p in inp.placements:
        by_adapter.setdefault(p.adapter, []).append(p)

    adapters: list[AdapterStatus] = []
    below_min: list[str] = []
    ready_count = 0
    for name, minimum in inp.adapters:
        facts = by_adapter.get(name, [])
        desired = int(inp.desired.get(name, minimum))
        loaded = sum(1 for p in facts if p.phase in ("Loaded", "Draining"))
        pods = sorted(inp.routable.get(name, ()))
        old = prev_adapters.get(name)
        scaled = old.last_scale_time if old is not None and old.desired_replicas == desired else (
            rfc3339(now) if old is not None else None)
        load = inp.loads.get(name)
        adapters.append(AdapterStatus(
            name=name, desired_replicas=desired, loaded_replicas=loaded, routable_replicas=len(pods), pods=pods,
            load=None if load is None or not math.isfinite(load) else round(float(load), 3),
            last_scale_time=scaled,
        ))
        if pods:
            ready_count += 1
        if len(pods) < minimum:
            below_min.append(f"{name} ({len(pods)}/{minimum})")

    problems = list(inp.problems)
    failed = [p for p in inp.placements if p.phase == "Failed" and not p.retire]
    permanent = [p for p in failed if p.permanent]
    if permanent:
        first = permanent[0]
        problems.append(Problem("LoadFailedPermanently",
                                f"{len(permanent)} placement(s) failed for good, e.g. {first.adapter} on "
                                f"{first.pod}: {first.last_error or 'no message'}"))
    elif failed:
        first = failed[0]
        problems.append(Problem("LoadFailed", f"{len(failed)} placement(s) failed, e.g. {first.adapter} on "
                                f"{first.pod}: {first.last_error or 'no message'}; placed elsewhere where possible"))

    gen = inp.generation
    conds: list[Condition] = []

    def cond(ctype: str, ok: bool, reason: str, message: str) -> None:
        conds.append(_condition(prev_conditions, ctype, ok, reason, message, generation=gen, now=now))

    blocking = [p for p in inp.problems if p.reason in BLOCKING_REASONS]
    if blocking:
        cond(READY, False, blocking[0].reason, blocking[0].message)
    elif below_min:
        short = any(m > inp.replicas for _, m in inp.adapters)
        cond(READY, False, "InsufficientReplicas" if short else "AdaptersNotRoutable",
             f"adapters below their minimum routable replicas: {_join(below_min)}")
    else:
        cond(READY, True, "AllAdaptersRoutable", f"{len(inp.adapters)} adapter(s) routable at their minimum")

    moving = [p for p in inp.placements if p.phase in ("Pending", "Loading") and not p.retire]
    draining = [p for p in inp.placements
                if p.phase in ("Draining", "Unloading") or (p.retire and p.phase == "Loaded")]
    if moving or draining:
        parts = []
        if moving:
            parts.append(f"{len(moving)} load(s)")
        if draining:
            parts.append(f"{len(draining)} drain(s) or unload(s)")
        cond(PROGRESSING, True, "LoadsInProgress" if moving else "DrainsInProgress",
             " and ".join(parts) + " under way")
    else:
        cond(PROGRESSING, False, "Stable", "no load or drain under way")

    if problems:
        cond(DEGRADED, True, problems[0].reason, "; ".join(p.message for p in problems[:3]))
    else:
        cond(DEGRADED, False, "AsExpected", "no failures")

    sat = inp.saturation
    if sat is not None:
        cond(SATURATED, sat.saturated, sat.reason or ("NoFreeSlots" if sat.saturated else "RoomAvailable"),
             sat.message or ("every replica is full and adapters need room" if sat.saturated
                             else "replicas have room for the adapters"))
    elif SATURATED in prev_conditions:
        conds.append(prev_conditions[SATURATED])

    return LoRAAutoscalerStatus(
        observed_generation=gen,
        replicas=inp.replicas,
        adapter_count=len(inp.adapters),
        ready_adapters=ready_count,
        saturated=bool(sat and sat.saturated),
        needed_replicas=sat.needed_replicas if sat else 0,
        recommendation=sat.recommendation if sat else prev.recommendation,
        adapters=adapters,
        conditions=conds,
    )
