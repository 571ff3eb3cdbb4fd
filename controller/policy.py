"""How many replicas each adapter should have: the pure scaling policy.

:func:`decide` is one step of a state machine, run every sync: it takes the previous
:class:`PolicyState`, this sync's :class:`PolicyInput` and the time, and returns the next state and a
:class:`PolicyDecision`. It is pure and deterministic: time is an argument, nothing is read or written
elsewhere, so timelines can be replayed exactly in tests.

Rules, per adapter in spec order:

- hot (load > scale-up threshold) continuously for the scale-up window: one more replica, then the timer
  restarts; a replica that needs an adapter load (no warm copy to promote) also waits until the adapter
  has been hot for the load window since its hot spell began (brief spikes cost no load);
  cold (load < scale-down threshold) continuously for the scale-down window: one fewer, then the timer
  restarts; in between both timers reset (hysteresis); an unknown load (None) changes nothing
  and resets nothing. A scale-down threshold of 0 therefore never scales down.
- bounds: never below ``min_replicas``; never above ``max_replicas`` or the number of pods (when
  ``min_replicas`` exceeds the pods, the minimum wins and the shortfall shows as saturation).
- a scale-up waits while an earlier one is still loading (``current < desired``), so a slow load does not
  make the policy overshoot. When the adapter already holds more copies than it wants (idle pods were
  filled with it), the new target counts from those copies.
- capacity: the targets together must fit ``pods x capacity``. Hot adapters are served hottest first; when
  no slot is free, one is taken from a cold adapter above its minimum (known lowest load first, unknown
  loads last, ties by spec order). When none is left, the adapter waits: ``saturated`` with a reason and
  ``needed_pods``, the fewest extra pods that fit every wanted target.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from controller.placement import AdapterTarget

__all__ = [
    "AdapterDecision",
    "AdapterLoad",
    "AdapterState",
    "PolicyDecision",
    "PolicyError",
    "PolicyInput",
    "PolicyState",
    "ScaleEvent",
    "decide",
]


class PolicyError(ValueError):
    """The policy input is inconsistent (bad bounds, thresholds, duplicate names)."""


@dataclass(frozen=True, slots=True)
class AdapterLoad:
    """One adapter as the policy sees it this sync."""

    name: str
    min_replicas: int = 1
    max_replicas: int | None = None
    """None: as many as there are pods."""
    current: int = 0
    """Pods where it is routable or loading now."""
    load: float | None = None
    """Outstanding requests per replica; None when unknown (no fresh sample). NaN counts as unknown."""
    warm: int | None = None
    """Pods where it is resident (``current`` plus warm fallback copies): a replica up to this many is a
    promotion, one beyond it needs an adapter load. None: same as ``current``."""


@dataclass(frozen=True)
class PolicyInput:
    """Everything the policy depends on for one sync."""

    adapters: tuple[AdapterLoad, ...]
    pods: int
    """Ready pods serving the API."""
    capacity: int
    """Adapters one pod may hold (the placement capacity)."""
    scale_up_threshold: float = 4.0
    scale_up_window_seconds: float = 3.0
    load_window_seconds: float | None = None
    """Scale-up window for a replica that needs an adapter load (no warm copy to promote); None: the
    scale-up window. Longer, it keeps brief spikes (an adapter starved for a while by the LoRA budget)
    from costing loads, while promotions stay fast."""
    scale_down_threshold: float = 1.0
    scale_down_window_seconds: float = 60.0
    max_loras: int | None = None
    """vLLM's --max-loras (batch slots per pod) for the recommendation; None: same as ``capacity``."""


@dataclass(frozen=True, slots=True)
class AdapterState:
    """What the policy remembers about one adapter between syncs."""

    desired: int
    above_since: float | None = None
    below_since: float | None = None
    last_scale_time: float | None = None
    hot_since: float | None = None
    """Start of the current hot spell; unlike ``above_since`` it does not restart with each scale-up."""


@dataclass(frozen=True)
class PolicyState:
    """The policy's memory: per adapter, keyed by name. Adapters not in the spec drop out."""

    adapters: Mapping[str, AdapterState] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    """One change of an adapter's desired replicas, for Events and logs."""

    adapter: str
    from_replicas: int
    to_replicas: int
    reason: str


@dataclass(frozen=True, slots=True)
class AdapterDecision:
    """One adapter's outcome, for placement and status."""

    name: str
    desired: int
    load: float | None
    last_scale_time: float | None
    waiting: bool = False
    """It should gain a replica but there is no room: the reason the autoscaler is saturated."""


@dataclass(frozen=True)
class PolicyDecision:
    """What the policy decided this sync."""

    adapters: tuple[AdapterDecision, ...]
    events: tuple[ScaleEvent, ...] = ()
    saturated: bool = False
    reason: str | None = None
    """Why it is saturated, naming the adapters waiting; None when not saturated."""
    waiting: tuple[str, ...] = ()
    needed_pods: int = 0
    """Fewest extra pods that would fit every wanted target; 0 when not saturated."""
    recommendation: str | None = None

    def targets(self) -> dict[str, int]:
        """Adapter -> desired replicas."""
        return {d.name: d.desired for d in self.adapters}

    def placement_targets(self) -> tuple[AdapterTarget, ...]:
        """The desired replicas in the form :func:`controller.placement.plan` takes, spec order kept."""
        return tuple(AdapterTarget(d.name, d.desired) for d in self.adapters)


def _validate(inputs: PolicyInput) -> None:
    """Reject inputs the rules cannot interpret, naming the culprit."""
    if isinstance(inputs.pods, bool) or not isinstance(inputs.pods, int) or inputs.pods < 0:
        raise PolicyError(f"pods must be a non-negative integer, got {inputs.pods!r}")
    if isinstance(inputs.capacity, bool) or not isinstance(inputs.capacity, int) or inputs.capacity < 1:
        raise PolicyError(f"capacity must be a positive integer, got {inputs.capacity!r}")
    if inputs.max_loras is not None and (not isinstance(inputs.max_loras, int) or inputs.max_loras < 1):
        raise PolicyError(f"max_loras must be a positive integer, got {inputs.max_loras!r}")
    for label, value in (("scale_up_threshold", inputs.scale_up_threshold),
                         ("scale_down_threshold", inputs.scale_down_threshold),
                         ("scale_up_window_seconds", inputs.scale_up_window_seconds),
                         ("scale_down_window_seconds", inputs.scale_down_window_seconds),
                         *((("load_window_seconds", inputs.load_window_seconds),)
                           if inputs.load_window_seconds is not None else ())):
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise PolicyError(f"{label} must be a finite number >= 0, got {value!r}")
    if inputs.scale_down_threshold >= inputs.scale_up_threshold:
        raise PolicyError(f"scale_down_threshold ({inputs.scale_down_threshold}) must be below "
                          f"scale_up_threshold ({inputs.scale_up_threshold})")
    names: set[str] = set()
    for a in inputs.adapters:
        if not a.name:
            raise PolicyError("an adapter has an empty name")
        if a.name in names:
            raise PolicyError(f"adapter {a.name!r} appears twice")
        names.add(a.name)
        if not isinstance(a.min_replicas, int) or a.min_replicas < 0:
            raise PolicyError(f"adapter {a.name!r}: min_replicas must be >= 0, got {a.min_replicas!r}")
        if a.max_replicas is not None and (not isinstance(a.max_replicas, int)
                                           or a.max_replicas < max(1, a.min_replicas)):
            raise PolicyError(f"adapter {a.name!r}: max_replicas ({a.max_replicas!r}) must be at least "
                              f"min_replicas ({a.min_replicas}) and 1")
        if not isinstance(a.current, int) or a.current < 0:
            raise PolicyError(f"adapter {a.name!r}: current must be >= 0, got {a.current!r}")
        if a.warm is not None and (not isinstance(a.warm, int) or a.warm < 0):
            raise PolicyError(f"adapter {a.name!r}: warm must be >= 0, got {a.warm!r}")
        if a.load is not None and not math.isnan(a.load) and a.load < 0:
            raise PolicyError(f"adapter {a.name!r}: load must be >= 0, got {a.load!r}")


def _upper(a: AdapterLoad, pods: int) -> int:
    """The most replicas the adapter may have now: its maximum and the pods, never below its minimum."""
    cap = pods if a.max_replicas is None else min(a.max_replicas, pods)
    return max(a.min_replicas, cap)


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass(slots=True)
class _Work:
    """One adapter's mutable working copy during a decision."""

    spec: AdapterLoad
    index: int
    load: float | None
    lo: int
    hi: int
    desired: int
    above_since: float | None
    below_since: float | None
    last_scale_time: float | None
    hot_since: float | None = None
    want_up: bool = False
    waiting: bool = False

    def cold(self, threshold: float) -> bool:
        return self.load is None or self.load < threshold

    def donor_key(self) -> tuple[int, float, int]:
        """Known low loads give first, unknown loads last, then spec order."""
        return (1, 0.0, self.index) if self.load is None else (0, self.load, self.index)


def decide(state: PolicyState, inputs: PolicyInput, now: float) -> tuple[PolicyState, PolicyDecision]:
    """One policy step: the next state and this sync's decision."""
    _validate(inputs)
    pods, capacity = inputs.pods, inputs.capacity
    up_t, down_t = inputs.scale_up_threshold, inputs.scale_down_threshold
    up_w, down_w = inputs.scale_up_window_seconds, inputs.scale_down_window_seconds
    load_w = up_w if inputs.load_window_seconds is None else inputs.load_window_seconds
    events: list[ScaleEvent] = []
    work: list[_Work] = []

    def change(w: _Work, to: int, reason: str) -> None:
        events.append(ScaleEvent(w.spec.name, w.desired, to, reason))
        w.desired = to
        w.last_scale_time = now

    # 1. Remember, clamp, advance the timers, and scale down what has been cold long enough.
    for i, a in enumerate(inputs.adapters):
        load = None if a.load is None or math.isnan(a.load) else float(a.load)
        lo, hi = a.min_replicas, _upper(a, pods)
        prev = state.adapters.get(a.name)
        if prev is None:
            prev = AdapterState(desired=min(max(a.current, lo), hi))
        w = _Work(a, i, load, lo, hi, prev.desired, prev.above_since, prev.below_since, prev.last_scale_time,
                  prev.hot_since)
        work.append(w)
        if w.desired < lo:
            change(w, lo, f"raised to minReplicas {lo}")
        elif w.desired > hi:
            what = "maxReplicas" if a.max_replicas is not None and a.max_replicas <= pods else "the pod count"
            change(w, hi, f"lowered to {what} {hi}")
        if load is None:
            continue
        if load > up_t:
            w.below_since = None
            if w.above_since is None:
                w.above_since = now
            if w.hot_since is None:
                w.hot_since = w.above_since
            # A replica the adapter is warm on already is a promotion; one more needs a load, and only
            # once the adapter has been hot for the load window (then at the scale-up window's pace).
            warm = a.current if a.warm is None else max(a.warm, a.current)
            promotion = max(w.desired, min(a.current, hi)) < warm
            w.want_up = now - w.above_since >= up_w and (promotion or now - w.hot_since >= load_w)
        elif load < down_t:
            w.above_since = None
            w.hot_since = None
            if w.below_since is None:
                w.below_since = now
            if now - w.below_since >= down_w and w.desired > lo:
                change(w, w.desired - 1, f"load {_fmt(load)} below {_fmt(down_t)} for {_fmt(down_w)}s")
                w.below_since = now
        else:
            w.above_since = None
            w.below_since = None
            w.hot_since = None

    slots = pods * capacity
    used = sum(w.desired for w in work)

    # 2. Targets that no longer fit (pods went away, minimums rose): shrink the coldest first.
    if used > slots:
        order = sorted((w for w in work if w.desired > w.lo),
                       key=lambda w: (0 if w.cold(down_t) else 1, *w.donor_key()))
        for w in order:
            if used <= slots:
                break
            give = min(w.desired - w.lo, used - slots)
            change(w, w.desired - give, f"{pods} pods x {capacity} slots cannot hold every target")
            used -= give

    # 3. Scale up the hot adapters, hottest first, taking slots from cold adapters when none is free.
    donors = sorted((w for w in work if w.cold(down_t) and not w.want_up), key=_Work.donor_key)
    donor_pos = 0
    for w in sorted((w for w in work if w.want_up), key=lambda w: (-(w.load or 0.0), w.index)):
        if w.spec.current < w.desired:
            continue  # the previous scale-up is still loading; the timer keeps running
        base = max(w.desired, min(w.spec.current, w.hi))
        if base >= w.hi:
            if w.spec.max_replicas is None or w.spec.max_replicas > pods:
                w.waiting = True  # on every pod already: only more pods help
            continue
        need = base + 1 - w.desired
        while slots - used < need and donor_pos < len(donors):
            d = donors[donor_pos]
            if d.desired <= d.lo:
                donor_pos += 1
                continue
            change(d, d.desired - 1, f"slot reclaimed for {w.spec.name}")
            if d.load is not None:
                d.below_since = now
            used -= 1
        grant = min(need, slots - used)
        if grant <= 0:
            w.waiting = True
            continue
        assert w.load is not None  # want_up implies a known load
        change(w, w.desired + grant, f"load {_fmt(w.load)} above {_fmt(up_t)} for {_fmt(up_w)}s")
        w.above_since = now
        used += grant

    # 4. Saturation and the hand-over to pod autoscaling.
    waiting = tuple(w.spec.name for w in work if w.waiting)
    below_min = [w for w in work if w.lo > pods]
    reasons: list[str] = []
    if waiting:
        reasons.append("no free slot for " + ", ".join(waiting))
    if used > slots:
        reasons.append(f"minimum replicas need {used} slots but {pods} pods x {capacity} give {slots}")
    if below_min:
        reasons.append("minReplicas above the pod count for " + ", ".join(w.spec.name for w in below_min))
    needed = 0
    if reasons:
        wanted = [w.desired + (1 if w.waiting else 0) for w in work]
        total = sum(wanted)
        needed = max(0, -(-total // capacity) - pods, max(wanted, default=0) - pods)
        reasons.append(f"{needed} more pod(s) would fit every wanted target")

    # 5. Advice: the batch budget, not placement, is the bottleneck.
    recommendation = None
    active = sum(1 for w in work if w.load is not None and w.load > 0)
    batch = inputs.max_loras or capacity
    if pods > 0 and pods * batch < active:
        recommendation = (f"{active} adapters are active at once but {pods} pods x --max-loras {batch} give "
                          f"only {pods * batch} batch slots: raising vLLM's --max-loras "
                          f"(vllm.maxLorasPerReplica) would help more than placement")

    new_state = PolicyState({
        w.spec.name: AdapterState(w.desired, w.above_since, w.below_since, w.last_scale_time, w.hot_since)
        for w in work
    })
    decision = PolicyDecision(
        adapters=tuple(AdapterDecision(w.spec.name, w.desired, w.load, w.last_scale_time, w.waiting)
                       for w in work),
        events=tuple(events),
        saturated=bool(reasons),
        reason="; ".join(reasons) if reasons else None,
        waiting=waiting,
        needed_pods=needed,
        recommendation=recommendation,
    )
    return new_state, decision
