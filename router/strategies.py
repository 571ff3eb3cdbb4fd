"""How to choose among the holders of an adapter: small, pure classes behind one interface.

Each strategy gets the route (holders with their tier), the router's per-pod state (its own in-flight
counts and each pod's last scrape), the addresses to avoid (a holder that just failed) and a sequence
number used to rotate among equal choices. No I/O, no clock, no randomness: the same inputs always give
the same holder, so tests and benchmarks can compare strategies exactly.

* ``least-outstanding``: fewest requests in flight, preferred holders first on ties.
* ``gie``: the Gateway API Inference Extension's scoring: queue score + KV-cache score + LoRA-affinity
  score (1.0 adapter running on the pod, 0.8 room in its LoRA budget, 0.6 adapter waiting there, else 0),
  each weighted (1:1:1 by default; a LoRA weight of 3 is common), from scraped state only.
* ``lora-aware`` (the default): the router's exact per-adapter in-flight counts per pod tell which
  adapters run where and whether a pod's LoRA budget (``max_loras``) has room; scraped queue, deferred
  count and KV usage add what other senders put on the pod. Preferred holders win unless each of them is
  saturated (no LoRA room for the adapter, a queue above a bound, or a full KV cache); then fallback
  holders take the spill-over.

Whichever strategy chose, a request can wait on a pod where its adapter has no LoRA slot: vLLM keeps
admitting the adapters already running there, so it may wait for as long as they have requests.
:func:`move_target` finds another holder where that adapter would start at once; the proxy moves a
request there when it has waited long enough without its first byte (``--move-deferred-after``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar

from api.labels import TIER_PREFERRED
from router.accounting import PodState
from router.routes import Holder, Route
from router.scrape import PodMetrics


class Strategy(ABC):
    """Picks one holder of ``route`` for a new request, or None when every holder is excluded."""

    name: ClassVar[str]

    @abstractmethod
    def choose(
        self, route: Route, pods: Mapping[str, PodState], exclude: Collection[str] = (), seq: int = 0
    ) -> Holder | None:
        """The holder the next request for ``route.model`` should go to."""

    def describe(self) -> dict[str, Any]:
        """The strategy's name and settings (shown on ``/router/load``)."""
        return {"name": self.name}


def _candidates(route: Route, exclude: Collection[str]) -> Sequence[Holder]:
    if not exclude:
        return route.holders
    return [h for h in route.holders if h.address not in exclude]


def _max_loras(m: PodMetrics | None, default: int | None) -> int | None:
    """The pod's LoRA budget as its scrape reports it, else the configured default."""
    return m.max_loras if m is not None and m.max_loras is not None else default


def _queue_full(m: PodMetrics, queue_bound: float, kv_bound: float) -> bool:
    """More than ``queue_bound`` requests wait for capacity (not for a LoRA slot), or the KV cache is full."""
    return m.waiting - m.deferred > queue_bound or m.kv_usage >= kv_bound


def lora_slot(model: str, st: PodState, default_max_loras: int | None = None) -> bool | None:
    """Whether adapter ``model`` holds a LoRA slot on the pod ``st`` describes (True), would take a free one
    (False), or finds its budget taken by other adapters (None: a request sent there waits for a slot).

    The router's own in-flight counts say which adapters take a slot; when others send to the pod too (load
    the router did not send), what vLLM last reported running or waiting counts as well."""
    if model in st.adapters:
        return True
    active: Collection[str] = st.adapters
    m = st.metrics
    if m is not None and st.external_load() > 0:
        active = set(st.adapters) | m.running_adapters | m.waiting_adapters
        if model in active:
            return True
    max_loras = _max_loras(m, default_max_loras)
    if max_loras is not None and len(active) >= max_loras:
        return None
    return False


def saturated(
    model: str, st: PodState | None, *, is_base: bool = False, default_max_loras: int | None = None,
    queue_bound: float = 8.0, kv_bound: float = 0.95,
) -> bool:
    """Whether a request for ``model`` sent to this pod now would wait there: its adapter has no LoRA slot
    (see :func:`lora_slot`), or more than ``queue_bound`` requests wait for capacity, or the KV cache is full.
    A pod never used or scraped is not saturated as far as anyone knows."""
    if st is None:
        return False
    if not is_base and lora_slot(model, st, default_max_loras) is None:
        return True
    return st.metrics is not None and _queue_full(st.metrics, queue_bound, kv_bound)


def _rotate(best: list[Holder], seq: int) -> Holder:
    return best[0] if len(best) == 1 else best[seq % len(best)]


class LeastOutstanding(Strategy):
    """Fewest requests in flight (the router's own count plus what others put there, as last scraped)."""

    name = "least-outstanding"

    def choose(
        self, route: Route, pods: Mapping[str, PodState], exclude: Collection[str] = (), seq: int = 0
    ) -> Holder | None:
        cands = _candidates(route, exclude)
        if not cands:
            return None
        best: list[Holder] = []
        best_key: tuple[float, int] | None = None
        for h in cands:
            st = pods.get(h.address)
            load = (st.inflight + st.external_load()) if st is not None else 0.0
            key = (load, 0 if h.tier == TIER_PREFERRED else 1)
            if best_key is None or key < best_key:
                best_key, best = key, [h]
            elif key == best_key:
                best.append(h)
        return _rotate(best, seq)


class GIE(Strategy):
    """The Gateway API Inference Extension's scorer: queue + KV cache + weighted LoRA affinity."""

    name = "gie"

    def __init__(
        self,
        queue_weight: float = 1.0,
        kv_weight: float = 1.0,
        lora_weight: float = 1.0,
        preferred_bonus: float = 0.0,
        default_max_loras: int | None = None,
    ) -> None:
        self.queue_weight = queue_weight
        self.kv_weight = kv_weight
        self.lora_weight = lora_weight
        self.preferred_bonus = preferred_bonus
        self.default_max_loras = default_max_loras

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "queue_weight": self.queue_weight,
            "kv_weight": self.kv_weight,
            "lora_weight": self.lora_weight,
            "preferred_bonus": self.preferred_bonus,
        }

    def lora_score(self, model: str, st: PodState | None) -> float:
        """1.0 running there, 0.8 room in the pod's LoRA budget, 0.6 waiting there, else 0."""
        m = st.metrics if st is not None else None
        if m is None:
            return 0.8 if self.default_max_loras is None or self.default_max_loras > 0 else 0.0
        if model in m.running_adapters:
            return 1.0
        max_loras = _max_loras(m, self.default_max_loras)
        if max_loras is None or len(m.running_adapters | m.waiting_adapters) < max_loras:
            return 0.8
        if model in m.waiting_adapters:
            return 0.6
        return 0.0

    def choose(
        self, route: Route, pods: Mapping[str, PodState], exclude: Collection[str] = (), seq: int = 0
    ) -> Holder | None:
        cands = _candidates(route, exclude)
        if not cands:
            return None
        states = [pods.get(h.address) for h in cands]
        queues = [st.metrics.waiting if st is not None and st.metrics is not None else 0.0 for st in states]
        lo, hi = min(queues), max(queues)
        best: list[Holder] = []
        best_score = -1e18
        for h, st, q in zip(cands, states, queues, strict=True):
            queue_score = 1.0 if hi == lo else 1.0 - (q - lo) / (hi - lo)
            kv = st.metrics.kv_usage if st is not None and st.metrics is not None else 0.0
            score = self.queue_weight * queue_score + self.kv_weight * (1.0 - kv)
            if not route.is_base:
                score += self.lora_weight * self.lora_score(route.model, st)
            if h.tier == TIER_PREFERRED:
                score += self.preferred_bonus
            if score > best_score + 1e-12:
                best_score, best = score, [h]
            elif abs(score - best_score) <= 1e-12:
                best.append(h)
        return _rotate(best, seq)


class LoraAware(Strategy):
    """Budget-aware choice from the router's exact per-adapter counts; preferred first, then spill-over.

    Cost of sending the request to a pod, in units of "requests ahead of it":
    ``in flight there (own + others) + slot_cost if the adapter is not already running there
    + defer_cost + the pod's deferred count if the pod has no LoRA room for it``.
    A pod is saturated for the adapter when it has no LoRA room, more than ``queue_bound`` requests wait
    there for capacity, or its KV cache is at least ``kv_bound`` full.
    """

    name = "lora-aware"

    def __init__(
        self,
        default_max_loras: int | None = None,
        slot_cost: float = 2.0,
        defer_cost: float = 1000.0,
        queue_bound: float = 8.0,
        kv_bound: float = 0.95,
    ) -> None:
        self.default_max_loras = default_max_loras
        self.slot_cost = slot_cost
        self.defer_cost = defer_cost
        self.queue_bound = queue_bound
        self.kv_bound = kv_bound

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "default_max_loras": self.default_max_loras,
            "slot_cost": self.slot_cost,
            "queue_bound": self.queue_bound,
            "kv_bound": self.kv_bound,
        }

    def assess(self, model: str, is_base: bool, st: PodState | None) -> tuple[float, bool]:
        """(cost, saturated) of sending one more request for ``model`` to the pod ``st`` describes."""
        if st is None:
            # Never used by this router and never scraped: idle as far as anyone knows.
            no_room = not is_base and self.default_max_loras is not None and self.default_max_loras <= 0
            return (self.slot_cost if not is_base else 0.0) + (self.defer_cost if no_room else 0.0), no_room
        m = st.metrics
        cost = st.inflight + st.external_load()
        saturated = False
        if not is_base:
            slot = lora_slot(model, st, self.default_max_loras)
            if slot is None:
                cost += self.defer_cost + (m.deferred if m is not None else 0.0)
                saturated = True
            elif not slot:
                cost += self.slot_cost
        if m is not None and _queue_full(m, self.queue_bound, self.kv_bound):
            saturated = True
        return cost, saturated

    def choose(
        self, route: Route, pods: Mapping[str, PodState], exclude: Collection[str] = (), seq: int = 0
    ) -> Holder | None:
        cands = _candidates(route, exclude)
        if not cands:
            return None
        model, is_base = route.model, route.is_base
        # Three pools in order: preferred unsaturated, fallback unsaturated, everyone.
        pools: tuple[list[tuple[float, Holder]], ...] = ([], [], [])
        for h in cands:
            cost, saturated = self.assess(model, is_base, pods.get(h.address))
            if not saturated:
                pools[0 if h.tier == TIER_PREFERRED or is_base else 1].append((cost, h))
            pools[2].append((cost, h))
        pool = pools[0] or pools[1] or pools[2]
        low = min(c for c, _ in pool)
        return _rotate([h for c, h in pool if c <= low + 1e-9], seq)


def deferred_on(model: str, st: PodState | None) -> bool:
    """Whether requests of ``model`` the router sent to this pod wait there for a LoRA slot, as its last
    scrape tells: the adapter is not running there and the pod defers requests. (vLLM lists a deferred
    adapter in neither ``running_lora_adapters`` nor ``waiting_lora_adapters``.)"""
    if st is None or st.metrics is None:
        return False
    m = st.metrics
    return model in st.adapters and model not in m.running_adapters and m.deferred > 0


def starts_at_once(
    model: str, st: PodState | None, default_max_loras: int | None = None, queue_bound: float = 8.0,
    kv_bound: float = 0.95,
) -> bool:
    """Whether a request for adapter ``model`` sent to this pod now would be scheduled without waiting for a
    LoRA slot: the adapter runs there, or the pod's budget has room for one more, and the pod's queue and KV
    cache are not full. Unknown state (never scraped) is not enough to say yes."""
    if st is None or st.metrics is None:
        return False
    m = st.metrics
    if _queue_full(m, queue_bound, kv_bound):
        return False
    if model in m.running_adapters:
        return True
    active = set(st.adapters) | m.running_adapters | m.waiting_adapters
    if model in active:
        return False  # it waits there already
    max_loras = _max_loras(m, default_max_loras)
    return max_loras is None or len(active) < max_loras


def move_target(
    route: Route, pods: Mapping[str, PodState], current: str, *, default_max_loras: int | None = None,
    queue_bound: float = 8.0, seq: int = 0,
) -> Holder | None:
    """Where a request for ``route.model`` waiting for a LoRA slot on the holder at ``current`` should go:
    a holder where it would start at once (preferred holders first, then the fewest requests in flight),
    or None when it is not deferred there or no holder would do better."""
    if route.is_base or not deferred_on(route.model, pods.get(current)):
        return None
    best: list[Holder] = []
    best_key: tuple[int, float] | None = None
    for h in route.holders:
        if h.address == current:
            continue
        st = pods.get(h.address)
        if st is None or not starts_at_once(route.model, st, default_max_loras, queue_bound):
            continue
        key = (0 if h.tier == TIER_PREFERRED else 1, st.inflight + st.external_load())
        if best_key is None or key < best_key:
            best_key, best = key, [h]
        elif key == best_key:
            best.append(h)
    return _rotate(best, seq) if best else None


STRATEGIES: dict[str, type[Strategy]] = {
    LoraAware.name: LoraAware,
    GIE.name: GIE,
    LeastOutstanding.name: LeastOutstanding,
}


def make_strategy(
    name: str,
    *,
    max_loras: int | None = None,
    lora_weight: float = 1.0,
    preferred_bonus: float = 0.0,
    queue_bound: float = 8.0,
    slot_cost: float = 2.0,
) -> Strategy:
    """The strategy called ``name``, with the settings that apply to it."""
    if name == LoraAware.name:
        return LoraAware(default_max_loras=max_loras, queue_bound=queue_bound, slot_cost=slot_cost)
    if name == GIE.name:
        return GIE(lora_weight=lora_weight, preferred_bonus=preferred_bonus, default_max_loras=max_loras)
    if name == LeastOutstanding.name:
        return LeastOutstanding()
    raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
