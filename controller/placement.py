"""Which adapters live on which pods: the pure placement engine.

The controller calls :func:`plan` every sync with the pods it sees, the per-adapter targets the scaling
policy chose and the copies that exist now; it gets back the wanted assignment and the difference to
apply. The function is pure and deterministic (no I/O, no clock, no randomness) so that it can be tested
exhaustively and replayed.

Rules, in order of application:

1. Validity: copies on pods that are gone (``dropped``) or where the adapter must be avoided are lost.
2. Capacity: a pod holding more than ``capacity`` adapters (the limit was lowered) sheds the excess,
   surplus copies first.
3. Surplus: an adapter with more copies than its target loses copies from the pods holding the most
   adapters (ties: the latest pod). With ``fill_idle_pods`` a copy that is alone on its pod is an extra
   (a fill copy) and is kept: removing it would leave the pod idle.
4. Deficit: missing copies go to the least loaded eligible pod (ties: pod order), adapter by adapter
   in spec order. When the free slots cannot hold every missing copy (or some pods must be avoided), in
   rounds instead: every adapter gets its n-th copy before any adapter gets its (n+1)-th, so no adapter
   is left without a replica while another has several; within a round, copies that fit a free slot
   are placed before any copy that needs room made. Only when no eligible
   pod has a free slot are existing copies moved (the shortest chain of moves that frees a slot) or an
   extra copy evicted; what still does not fit is ``shortfall``.
5. Fill: with ``fill_idle_pods`` every pod still empty gets the adapter with the fewest copies.

On an empty ``current`` this is the proposal's even dispatch; afterwards it is sticky: current copies
stay where they are unless a rule above moves them, so the number of loads and unloads is the least the
targets require.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "AdapterTarget",
    "PlacementError",
    "PlacementInput",
    "PlacementPlan",
    "ResidentInput",
    "ResidentPlan",
    "plan",
    "plan_resident",
]


class PlacementError(ValueError):
    """The placement input is inconsistent (duplicate names, bad capacity or targets)."""


@dataclass(frozen=True, slots=True)
class AdapterTarget:
    """How many copies of one adapter the scaling policy wants."""

    name: str
    replicas: int


@dataclass(frozen=True)
class PlacementInput:
    """Everything placement depends on; nothing else is read."""

    pods: tuple[str, ...]
    """Ready pods in a stable order (creation time, then name); earlier pods win ties."""
    capacity: int
    """Most adapters one pod may hold (strict: maxLorasPerReplica; preferred: maxCpuLorasPerReplica)."""
    adapters: tuple[AdapterTarget, ...]
    """Adapters in spec order with the copies wanted; earlier adapters win ties."""
    current: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Adapter -> pods holding it now (pending, loading or loaded; not retiring)."""
    avoid: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Adapter -> pods where it must not go (its load failed there for good)."""
    fill_idle_pods: bool = True
    """Give every otherwise empty pod one adapter, so no replica sits idle."""
    since: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """Adapter -> pod -> when that copy was placed (optional). With ``fill_idle_pods``, an adapter's
    oldest copy counts toward its target even when it is alone on its pod, so a scale-down removes the
    copies that scale-ups added rather than keeping them beside the first."""


@dataclass(frozen=True)
class PlacementPlan:
    """The wanted assignment and the difference from ``current`` that reaches it."""

    assignment: Mapping[str, frozenset[str]]
    """Adapter -> pods that should hold it, for every adapter of the input."""
    add: tuple[tuple[str, str], ...]
    """(adapter, pod) to load, sorted."""
    remove: tuple[tuple[str, str], ...]
    """(adapter, pod) to drain and unload on pods that still exist, sorted. Includes adapters that left
    the spec and copies on avoided pods."""
    dropped: tuple[tuple[str, str], ...]
    """(adapter, pod) of ``current`` on pods that are gone: nothing to unload, only records to clean."""
    shortfall: Mapping[str, int]
    """Adapter -> copies wanted but not placeable (more than the pods, or no room). Only adapters > 0."""
    pod_load: Mapping[str, int]
    """Pod -> adapters assigned to it."""
    relocations: int = 0
    """Copies moved from one pod to another to make room: per adapter, the fewer of its adds and of its
    removes of copies that were valid. Each costs one add and one remove beyond what the targets need."""

    @property
    def changed(self) -> bool:
        """Whether applying the plan does anything."""
        return bool(self.add or self.remove or self.dropped)

    @property
    def total_shortfall(self) -> int:
        """Copies wanted in total but not placed."""
        return sum(self.shortfall.values())


def _validate(inp: PlacementInput) -> None:
    """Reject inputs whose meaning is ambiguous, with a message that names the culprit."""
    if isinstance(inp.capacity, bool) or not isinstance(inp.capacity, int) or inp.capacity < 1:
        raise PlacementError(f"capacity must be a positive integer, got {inp.capacity!r}")
    seen: set[str] = set()
    for pod in inp.pods:
        if not pod:
            raise PlacementError("a pod has an empty name")
        if pod in seen:
            raise PlacementError(f"pod {pod!r} appears twice in pods")
        seen.add(pod)
    names: set[str] = set()
    for target in inp.adapters:
        if not target.name:
            raise PlacementError("an adapter has an empty name")
        if target.name in names:
            raise PlacementError(f"adapter {target.name!r} appears twice in adapters")
        names.add(target.name)
        if isinstance(target.replicas, bool) or not isinstance(target.replicas, int) or target.replicas < 0:
            raise PlacementError(f"adapter {target.name!r}: replicas must be a non-negative integer, "
                                 f"got {target.replicas!r}")


class _Engine:
    """Mutable working state of one :func:`plan` call; indices instead of names for speed."""

    def __init__(self, inp: PlacementInput) -> None:
        self.inp = inp
        self.cap = cap = inp.capacity
        self.fill = inp.fill_idle_pods
        self.n_pods = n_pods = len(inp.pods)
        self.pod_index = pod_index = {name: i for i, name in enumerate(inp.pods)}
        self.target = [t.replicas for t in inp.adapters]
        n = len(inp.adapters)
        empty: frozenset[int] = frozenset()
        self.avoid: list[frozenset[int]] = []
        for t in inp.adapters:
            names = inp.avoid.get(t.name)
            self.avoid.append(frozenset(pod_index[p] for p in names if p in pod_index) if names else empty)
        # The copies that exist and may stay: pod alive, not avoided.
        self.holders: list[set[int]] = []
        self.exact: list[bool] = []  # current held exactly the copies that may stay (nothing to drop)
        self.load = load = [0] * n_pods
        get = pod_index.get
        for a, t in enumerate(inp.adapters):
            names = inp.current.get(t.name)
            if not names:
                self.holders.append(set())
                self.exact.append(True)
                continue
            held: set[int] = {get(p, -1) for p in names}
            held.discard(-1)
            if self.avoid[a]:
                held -= self.avoid[a]
            self.holders.append(held)
            self.exact.append(len(held) == len(names))
            for p in held:
                load[p] += 1
        self.original: list[frozenset[int]] = [frozenset(h) for h in self.holders]
        self.touched: set[int] = set()  # adapters whose copies changed during the plan
        self._on_pod: list[set[int]] | None = None  # pod -> adapters, built only when a rule needs it
        # How many copies each adapter can have at most: one per pod it may go to.
        self.reachable = [min(self.target[a], n_pods - len(self.avoid[a])) for a in range(n)]
        # Pods by (load, pod order), encoded as load * n_pods + pod: int keys compare far faster than
        # tuples. Entries go stale when a load changes (a fresh one is pushed); readers skip them.
        self.stride = stride = max(1, n_pods)
        self.heap: list[int] = [load[p] * stride + p for p in range(n_pods)]
        heapq.heapify(self.heap)
        self.free_slots = sum(cap - x for x in load if x < cap)
        self.stuck: set[int] = set()  # adapters for which no chain of moves frees a slot
        # Learnt by failed searches, valid until the next edit: pods from which no chain leads to room,
        # and whether any adapter has a copy to spare.
        self.edits = 0
        self._memo_at = -1
        self._dead: set[int] = set()
        self._any_surplus = False
        self._floor = 0

    @property
    def on_pod(self) -> list[set[int]]:
        """Pod -> adapters on it; built on first use (shedding, moves), then kept up to date."""
        if self._on_pod is None:
            on_pod: list[set[int]] = [set() for _ in range(self.n_pods)]
            for a, held in enumerate(self.holders):
                for p in held:
                    on_pod[p].add(a)
            self._on_pod = on_pod
        return self._on_pod

    # -- primitive edits ------------------------------------------------------------------------------

    def _put(self, a: int, p: int) -> None:
        self.edits += 1
        self.holders[a].add(p)
        self.touched.add(a)
        if self._on_pod is not None:
            self._on_pod[p].add(a)
        self.load[p] = load = self.load[p] + 1
        if load <= self.cap:
            self.free_slots -= 1
        heapq.heappush(self.heap, load * self.stride + p)

    def _take(self, a: int, p: int) -> None:
        self.edits += 1
        self.holders[a].discard(p)
        self.touched.add(a)
        if self._on_pod is not None:
            self._on_pod[p].discard(a)
        self.load[p] = load = self.load[p] - 1
        if load < self.cap:
            self.free_slots += 1
        heapq.heappush(self.heap, load * self.stride + p)

    # -- rules ----------------------------------------------------------------------------------------

    def shed_overfull(self) -> None:
        """Bring pods above capacity back to it, dropping copies the adapter can spare best."""
        if all(x <= self.cap for x in self.load):
            return
        on_pod = self.on_pod
        for p in range(self.n_pods):
            excess = self.load[p] - self.cap
            if excess <= 0:
                continue
            ranked = sorted(on_pod[p], key=lambda a: (len(self.holders[a]) - self.target[a],
                                                      len(self.holders[a]), a), reverse=True)
            for a in ranked[:excess]:
                self._take(a, p)

    def trim_surplus(self) -> bool:
        """Remove copies above target from the fullest pods; returns whether anything was removed."""
        removed = False
        load = self.load
        for a in range(len(self.target)):
            held = self.holders[a]
            target = self.target[a]
            if len(held) <= target:
                continue
            # With fill on, copies alone on their pod are extras kept to avoid idle pods; the copies
            # that share a pod are the ones that count against the target, and so does the adapter's
            # oldest copy (when known) wherever it is.
            keep_alone = self.fill and target > 0
            candidates = [p for p in held if load[p] >= 2] if keep_alone else list(held)
            counted = len(candidates)
            if keep_alone:
                home = self._home(a)
                if home is not None and home in held and load[home] < 2:
                    counted += 1
            excess = min(counted - target, len(candidates))
            if excess <= 0:
                continue
            candidates.sort(key=lambda p: (load[p], p), reverse=True)
            for p in candidates[:excess]:
                self._take(a, p)
            removed = True
        return removed

    def _home(self, a: int) -> int | None:
        """The pod of the adapter's oldest current copy (ties: pod order), when placement times are known."""
        times = self.inp.since.get(self.inp.adapters[a].name)
        if not times:
            return None
        known = [(t, self.pod_index[p]) for p, t in times.items() if p in self.pod_index
                 and self.pod_index[p] in self.original[a]]
        return min(known)[1] if known else None

    def _least_loaded(self, a: int, k: int = 1) -> list[int]:
        """Up to ``k`` distinct eligible pods with a free slot, fewest adapters first (ties: pod order).

        Taking k at once is the same as taking one k times: a pod that gets a copy of ``a`` is no longer
        eligible for ``a``.
        """
        heap, load, cap = self.heap, self.load, self.cap
        held, avoid = self.holders[a], self.avoid[a]
        aside: list[int] = []
        found: list[int] = []
        chosen: set[int] = set()
        pop, stride = heapq.heappop, self.stride
        while heap and len(found) < k:
            entry = pop(heap)
            x, p = divmod(entry, stride)
            if x != load[p] or x >= cap:
                continue  # stale, or full (a later removal pushes it again)
            if p in held or p in avoid:
                aside.append(entry)
            elif p not in chosen:  # a pod may have two entries with the same load; one is enough
                found.append(p)  # the caller's _put pushes its new load
                chosen.add(p)
        for entry in aside:
            heapq.heappush(heap, entry)
        return found

    def _surplus(self, b: int) -> bool:
        return len(self.holders[b]) > self.target[b]

    def _augment(self, a: int) -> bool:
        """Free a slot for ``a`` by the shortest chain of moves, or by evicting an extra copy.

        A breadth-first search, level by level, over full pods: from a pod that ``a`` could use, some
        adapter ``b`` on it is evicted (it has copies to spare), moves to a pod with a free slot, or moves
        to another full pod from which the search continues. Within a level the cheapest end wins.
        """
        if self._memo_at != self.edits:  # what was learnt holds only until the next edit
            self._memo_at, self._dead = self.edits, set()
            self._any_surplus = any(self._surplus(b) for b in range(len(self.target)))
            # The cheapest move: -2 (undo a load and undo an unload) needs an unloaded original copy.
            self._floor = -2 if any(o and not o <= h for o, h in zip(self.original, self.holders,
                                                                      strict=True)) else 0
        if self.free_slots <= 0 and not self._any_surplus:
            return False  # no free slot and nothing to evict: no chain can end anywhere
        # Without evictions, a move as cheap as the floor cannot be beaten: stop at the end of its pod.
        stop_at = None if self._any_surplus else self._floor
        on_pod, holders, avoid, cap, dead = self.on_pod, self.holders, self.avoid, self.cap, self._dead
        load = self.load
        free_pods = [q for _, q in sorted((load[q], q) for q in range(self.n_pods) if load[q] < cap)]
        # parent[q] = (pod the mover leaves, mover) for a full pod q reached by the search.
        parent: dict[int, tuple[int, int]] = {}
        level = [p for p in range(self.n_pods) if p not in holders[a] and p not in avoid[a] and p not in dead]
        for p in level:
            parent[p] = (-1, -1)
        unvisited = [q for q in range(self.n_pods) if q not in parent and q not in dead]
        original, target = self.original, self.target
        spare: dict[int, bool] = {}  # adapter -> has a copy to spare (may be evicted)
        # mover -> (net edits, free pod) of its cheapest destination: a pod it held before this plan
        # (undoing a removal) before any other, least loaded first; None when no free pod may take it.
        dest_of: dict[int, tuple[int, int] | None] = {}
        end: tuple[int, int, int] | None = None  # (pod freed, mover, destination or -1 for eviction)
        while level and end is None:
            # Cheapest end of this level: fewest net edits, evictions before moves, then pod order
            # (evictions: the latest pod and adapter, as surplus removal does).
            best_key: tuple[int, int, int, int] | None = None
            best_end: tuple[int, int, int] | None = None
            for p in level:
                for b in on_pod[p]:
                    if b == a:
                        continue
                    leave = 1 if p in original[b] else -1  # unloading a copy that was there, or undoing a load
                    has_spare = spare.get(b)
                    if has_spare is None:
                        has_spare = spare[b] = len(holders[b]) > target[b]
                    if has_spare:
                        key = (leave, 0, -p, -b)
                        if best_key is None or key < best_key:
                            best_key, best_end = key, (p, b, -1)
                        continue
                    if b in dest_of:
                        dest = dest_of[b]
                    else:
                        hb, ab, ob = holders[b], avoid[b], original[b]
                        ok = [q for q in free_pods if q not in hb and q not in ab]
                        back = next((q for q in ok if q in ob), None)
                        dest = dest_of[b] = (-1, back) if back is not None else ((1, ok[0]) if ok else None)
                    if dest is None:
                        continue
                    key = (leave + dest[0], 1, p, b)
                    if best_key is None or key < best_key:
                        best_key, best_end = key, (p, b, dest[1])
                if stop_at is not None and best_key is not None and best_key[0] <= stop_at:
                    break
            if best_end is not None:
                end = best_end
                break
            nxt: list[int] = []
            for p in level:
                for b in sorted(on_pod[p]):
                    if b == a:
                        continue
                    hb, ab = holders[b], avoid[b]
                    keep: list[int] = []
                    for q in unvisited:
                        if q in hb or q in ab:
                            keep.append(q)
                        else:
                            parent[q] = (p, b)
                            nxt.append(q)
                    unvisited = keep
            level = nxt
        if end is None:
            if not any(p in holders[a] for p in parent):
                # Nothing reachable from these pods leads to room, whichever adapter asks (a's own
                # copies, skipped for a, are not among them): later searches skip them.
                dead.update(parent)
            return False
        p, b, to = end
        self._take(b, p)
        if to >= 0:
            self._put(b, to)
        # Walk back: each earlier mover leaves its pod for the slot just freed.
        while parent[p][0] >= 0:
            src, mover = parent[p]
            self._take(mover, src)
            self._put(mover, p)
            p = src
        self._put(a, p)
        return True

    def _place_one(self, a: int) -> bool:
        """Add one copy of ``a`` on the least loaded eligible pod, making room if need be."""
        found = self._least_loaded(a)
        if found:
            self._put(a, found[0])
            return True
        if self._augment(a):
            return True
        self.stuck.add(a)
        return False

    def place_deficits(self) -> bool:
        """Add missing copies; returns whether anything was added.

        When the deficits fit in the free slots, adapter by adapter in spec order, each copy on the least
        loaded pod: this keeps pod loads within one of each other (the even dispatch). When they do not
        fit, or pods must be avoided (then not every adapter fits anywhere), in rounds instead: every
        adapter gets its n-th copy before any gets its (n+1)-th (spec order within a round), so no adapter
        is left without a replica while another gets several.
        """
        holders, reachable, stuck = self.holders, self.reachable, self.stuck
        active = [a for a in range(len(self.target)) if len(holders[a]) < reachable[a] and a not in stuck]
        if not active:
            return False
        added = False
        free = self.free_slots
        if any(self.avoid[a] for a in active):
            # With pods to avoid, a copy placed early can block another adapter's only pod: rounds.
            want = [0] * len(reachable)
        elif sum(reachable[a] - len(holders[a]) for a in active) <= free:
            want = reachable
        else:
            # Levels up to the highest one whose copies all fit in the free slots are filled adapter by
            # adapter (every such copy has room, so the order matters little and this is faster); the
            # rounds below share out the rest.
            lo, hi = 0, max(reachable[a] for a in active)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if sum(max(0, min(reachable[a], mid) - len(holders[a])) for a in active) <= free:
                    lo = mid
                else:
                    hi = mid - 1
            want = [min(r, lo) for r in reachable]
        if any(len(holders[a]) < want[a] for a in active):
            heap, load, push, stride = self.heap, self.load, heapq.heappush, self.stride
            for a in active:
                if len(holders[a]) >= want[a]:
                    continue
                found = self._least_loaded(a, want[a] - len(holders[a]))
                if found:
                    # _put inlined: this loop places every copy of a first dispatch.
                    held = holders[a]
                    for p in found:
                        held.add(p)
                        load[p] = x = load[p] + 1
                        push(heap, x * stride + p)
                    if self._on_pod is not None:
                        for p in found:
                            self._on_pod[p].add(a)
                    self.free_slots -= len(found)  # every pod found had a free slot
                    self.edits += 1
                    self.touched.add(a)
                    added = True
                while len(holders[a]) < want[a] and self._place_one(a):
                    added = True
            active = [a for a in active if len(holders[a]) < reachable[a] and a not in stuck]
        if not active:
            return added
        level = min(len(holders[a]) for a in active)
        while active:
            level += 1
            # Within a round, copies that fit a free slot go first; only then are copies moved to make
            # room, so a round never pays for a move that a free slot would have made unnecessary.
            for a in active:
                if len(holders[a]) < min(level, reachable[a]):
                    direct = self._least_loaded(a)
                    if direct:
                        self._put(a, direct[0])
                        added = True
            for a in active:
                if len(holders[a]) < min(level, reachable[a]) and self._place_one(a):
                    added = True
            active = [a for a in active if len(holders[a]) < reachable[a] and a not in stuck]
        return added

    def fill_idle(self) -> None:
        """Give every empty pod the adapter with the fewest copies (ties: spec order)."""
        if not self.fill:
            return
        counts = [(len(self.holders[a]), a) for a in range(len(self.target)) if self.target[a] > 0]
        heapq.heapify(counts)
        for p in range(self.n_pods):
            if self.load[p] or not counts:
                continue
            aside: list[tuple[int, int]] = []
            chosen: tuple[int, int] | None = None
            while counts:
                entry = heapq.heappop(counts)
                if entry[0] != len(self.holders[entry[1]]):
                    continue  # stale
                if p in self.avoid[entry[1]]:
                    aside.append(entry)
                    continue
                chosen = entry
                break
            for entry in aside:
                heapq.heappush(counts, entry)
            if chosen is not None:
                a = chosen[1]
                self._put(a, p)
                heapq.heappush(counts, (len(self.holders[a]), a))

    def run(self) -> None:
        self.shed_overfull()
        self.trim_surplus()
        # Adds can make an extra copy share its pod (so it becomes removable), and those removals can
        # free room for adapters that did not fit: repeat until nothing changes. Each round that adds
        # reduces the total deficit, so this ends.
        for _ in range(len(self.target) * max(1, self.n_pods) + 2):
            added = self.place_deficits()
            if not (self.fill and added and self.trim_surplus()):
                break
            self.stuck.clear()
        self.fill_idle()


def plan(inp: PlacementInput) -> PlacementPlan:
    """Decide the assignment of adapters to pods and the loads and unloads that reach it."""
    _validate(inp)
    engine = _Engine(inp)
    engine.run()
    pods = inp.pods
    assignment: dict[str, frozenset[str]] = {}
    add: list[tuple[str, str]] = []
    remove: list[tuple[str, str]] = []
    dropped: list[tuple[str, str]] = []
    shortfall: dict[str, int] = {}
    spec_names = set()
    relocations = 0
    touched, exact, holders, original = engine.touched, engine.exact, engine.holders, engine.original
    empty: frozenset[str] = frozenset()
    for a, t in enumerate(inp.adapters):
        name = t.name
        spec_names.add(name)
        before = inp.current.get(name, empty)
        if not isinstance(before, frozenset):
            before = frozenset(before)  # any collection of pod names will do
        if a not in touched and exact[a]:
            # Unchanged: the copies that exist are the assignment (the common case every sync).
            final = before
        else:
            names = [pods[p] for p in holders[a]]
            final = frozenset(names)
            if not before:
                add += [(name, pod) for pod in names]
            else:
                held, kept = holders[a], original[a]
                relocations += min(len(held - kept), len(kept - held))
                add += [(name, pod) for pod in final - before]
                for pod in before - final:
                    (remove if pod in engine.pod_index else dropped).append((name, pod))
        assignment[name] = final
        missing = t.replicas - len(final)
        if missing > 0:
            shortfall[name] = missing
    for name, others in inp.current.items():
        if name in spec_names:
            continue
        for pod in others:
            (remove if pod in engine.pod_index else dropped).append((name, pod))
    add.sort()
    remove.sort()
    dropped.sort()
    return PlacementPlan(
        assignment=assignment,
        add=tuple(add),
        remove=tuple(remove),
        dropped=tuple(dropped),
        shortfall=shortfall,
        pod_load=dict(zip(pods, engine.load, strict=True)),
        relocations=relocations,
    )


# ---- preferred mode: preferred holders within the batch budget, warm fallback copies around them ----------


@dataclass(frozen=True)
class ResidentInput:
    """Placement in ``preferred`` mode: two tiers on the same pods.

    The preferred tier is what the scaling policy wants (``adapters``), at most ``capacity`` per pod,
    exactly as :func:`plan` places it (the controller passes ``--max-cpu-loras`` for both capacities: which
    of a pod's adapters share its batch is the router's choice). Around it, every pod keeps adapters
    resident up to ``resident_capacity`` (``--max-cpu-loras``) as fallback holders the router spills over
    to. Copies that are resident already are used first: a new preferred holder is a resident copy
    promoted when one has room (no load at all), a preferred holder given back stays resident as a
    fallback, and fallback copies stay where they are until their room is needed.
    """

    pods: tuple[str, ...]
    capacity: int
    resident_capacity: int
    adapters: tuple[AdapterTarget, ...]
    preferred: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Adapter -> pods where it is a preferred holder now."""
    fallback: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Adapter -> pods where it is resident as a fallback holder now."""
    avoid: Mapping[str, frozenset[str]] = field(default_factory=dict)
    spare_order: tuple[str, ...] = ()
    """Adapters that should get spare copies first (e.g. hottest first); the rest follow in spec order."""
    max_new_fallback: int | None = None
    """At most this many fallback copies are loaded per plan (spreads loads over syncs); None: no bound."""
    leaving: Mapping[str, int] = field(default_factory=dict)
    """Pod -> copies being removed from it (draining, unloading). They still take a slot of its cache, so
    no spare copy is loaded into that slot before they are gone: loading one would make vLLM evict
    another adapter from its cache, and that adapter would reload on its next request."""


@dataclass(frozen=True)
class ResidentPlan:
    """Both tiers and the loads and unloads that reach them."""

    preferred: Mapping[str, frozenset[str]]
    """Adapter -> its preferred holders."""
    assignment: Mapping[str, frozenset[str]]
    """Adapter -> every pod where it should be resident (preferred and fallback)."""
    add: tuple[tuple[str, str], ...]
    remove: tuple[tuple[str, str], ...]
    dropped: tuple[tuple[str, str], ...]
    shortfall: Mapping[str, int]
    """Preferred copies wanted but not placeable."""
    promoted: int = 0
    """Preferred holders made from copies that were resident already (no load)."""

    @property
    def total_shortfall(self) -> int:
        return sum(self.shortfall.values())

    def is_preferred(self, adapter: str, pod: str) -> bool:
        return pod in self.preferred.get(adapter, frozenset())


def _give_idle_pods_a_preferred_holder(preferred: dict[str, set[str]], resident: Mapping[str, set[str]],
                                       pods: Sequence[str], avoid: Mapping[str, frozenset[str]],
                                       coldest_first: Sequence[str]) -> None:
    """Move a preferred holder to each pod that has none, from a pod with two or more, where it is resident.

    Such a move is free (a promotion and a demotion, no load). Placement is sticky, so a scale-down can
    leave a pod without any preferred holder while another has several; strict mode would add an extra
    copy there, which in preferred mode would keep an adapter above its desired count. Only idle pods are
    served, and the coldest adapters move first: moving holders between busy pods would shift traffic
    (and LoRA slots) for nothing. Deterministic: pod order, then ``coldest_first``.
    """
    order = {p: i for i, p in enumerate(pods)}
    count = dict.fromkeys(pods, 0)
    for holders in preferred.values():
        for p in holders:
            if p in count:
                count[p] += 1
    idle = [p for p in pods if not count[p]]
    if not idle:
        return
    resident_here: dict[str, list[str]] = {p: [] for p in idle}  # coldest first
    for adapter in coldest_first:
        for p in resident.get(adapter, ()):
            if p in resident_here:
                resident_here[p].append(adapter)
    for dst in idle:
        for adapter in resident_here[dst]:
            held = preferred.get(adapter)
            if not held or dst in held or dst in avoid.get(adapter, ()):
                continue
            src = min((p for p in held if count.get(p, 0) >= 2), key=order.__getitem__, default=None)
            if src is None:
                continue
            held.discard(src)
            held.add(dst)
            count[src] -= 1
            count[dst] += 1
            break


def plan_resident(inp: ResidentInput) -> ResidentPlan:
    """Preferred-mode placement; pure and deterministic like :func:`plan`."""
    if isinstance(inp.resident_capacity, bool) or not isinstance(inp.resident_capacity, int) \
            or inp.resident_capacity < inp.capacity:
        raise PlacementError(f"resident_capacity must be an integer >= capacity ({inp.capacity}), "
                             f"got {inp.resident_capacity!r}")
    if inp.max_new_fallback is not None and inp.max_new_fallback < 0:
        raise PlacementError(f"max_new_fallback must be >= 0, got {inp.max_new_fallback!r}")
    for pod, n in inp.leaving.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PlacementError(f"leaving[{pod!r}] must be a non-negative integer, got {n!r}")
    empty: frozenset[str] = frozenset()
    alive = set(inp.pods)
    names = [t.name for t in inp.adapters]
    avoid = {a: inp.avoid.get(a, empty) for a in names}

    def valid(a: str, pods: frozenset[str] | None) -> set[str]:
        return {p for p in (pods or empty) if p in alive and p not in avoid.get(a, empty)}

    pref_now = {a: valid(a, inp.preferred.get(a)) for a in names}
    fb_now = {a: valid(a, inp.fallback.get(a)) - pref_now[a] for a in names}

    # 1. Promotions: a missing preferred copy goes first to a pod where the adapter is resident already
    # and whose batch budget has room (fewest preferred adapters first, then pod order).
    order = {p: i for i, p in enumerate(inp.pods)}
    pref_load = dict.fromkeys(inp.pods, 0)
    for a in names:
        for p in pref_now[a]:
            pref_load[p] += 1
    seeded = {a: set(pref_now[a]) for a in names}
    promoted = 0
    for t in inp.adapters:
        missing = min(t.replicas, len(inp.pods) - len(avoid[t.name])) - len(seeded[t.name])
        if missing <= 0:
            continue
        warm = sorted((p for p in fb_now[t.name] if pref_load[p] < inp.capacity),
                      key=lambda p: (pref_load[p], order[p]))
        for p in warm[:missing]:
            seeded[t.name].add(p)
            pref_load[p] += 1
            promoted += 1

    # 2. The preferred tier, as strict mode places it (sticky, even), but exactly as many holders as the
    # policy wants (no extra copies on idle pods, which would keep an adapter above its desired count);
    # a pod left without preferred holders gets one by a free move where possible.
    tier = plan(PlacementInput(pods=inp.pods, capacity=inp.capacity, adapters=inp.adapters,
                               current={a: frozenset(s) for a, s in seeded.items()},
                               avoid={a: s for a, s in avoid.items() if s}, fill_idle_pods=False))
    preferred = {a: set(tier.assignment.get(a, empty)) for a in names}
    heat = {a: len(inp.spare_order) - i for i, a in enumerate(inp.spare_order)}  # hottest highest; unknown 0
    coldest_first = [a for _, a in sorted((heat.get(a, 0), a) for a in names)]
    _give_idle_pods_a_preferred_holder(preferred, {a: pref_now[a] | fb_now[a] for a in names}, inp.pods, avoid,
                                       coldest_first)
    promoted = sum(len((preferred[a] - pref_now[a]) & fb_now[a]) for a in names)

    # 3. Fallback copies: what was resident (preferred or not) and is no longer preferred stays resident
    # while its pod has room; a pod over its resident capacity drops the copies of adapters with the most
    # copies first (ties: later spec order).
    spec_index = {a: i for i, a in enumerate(names)}
    fallback = {a: (pref_now[a] | fb_now[a]) - preferred[a] for a in names}
    total = dict.fromkeys(inp.pods, 0)
    for a in names:
        for p in preferred[a] | fallback[a]:
            total[p] += 1
    for p in inp.pods:
        excess = total[p] - inp.resident_capacity
        if excess <= 0:
            continue
        here = sorted((a for a in names if p in fallback[a]),
                      key=lambda a: (-(len(preferred[a]) + len(fallback[a])), -spec_index[a]))
        for a in here[:excess]:
            fallback[a].discard(p)
            total[p] -= 1

    # 4. Spare room: spread fallback copies, the adapter with the fewest resident copies first (ties:
    # ``spare_order``, then spec order), each on the pod with the most room that lacks it.
    rank = {a: i for i, a in enumerate(inp.spare_order) if a in spec_index}
    budget = inp.max_new_fallback
    if budget is None:
        budget = len(inp.pods) * inp.resident_capacity
    wanted = {t.name for t in inp.adapters if t.replicas > 0}
    heap = [(len(preferred[a]) + len(fallback[a]), rank.get(a, len(rank) + spec_index[a]), a)
            for a in names if a in wanted]
    heapq.heapify(heap)
    # Pods with room, the emptiest first (ties: pod order); entries go stale when a pod's total changes.
    # Copies on their way out still take their slot until they are unloaded.
    for p in inp.pods:
        total[p] += inp.leaving.get(p, 0)
    rooms = [(total[p], order[p], p) for p in inp.pods if total[p] < inp.resident_capacity]
    heapq.heapify(rooms)
    while heap and budget > 0 and rooms:
        copies, r, a = heapq.heappop(heap)
        if copies != len(preferred[a]) + len(fallback[a]):
            continue  # stale
        held = preferred[a] | fallback[a]
        aside: list[tuple[int, int, str]] = []
        chosen: str | None = None
        while rooms:
            entry = heapq.heappop(rooms)
            if entry[0] != total[entry[2]]:
                continue  # stale
            if entry[2] in held or entry[2] in avoid[a]:
                aside.append(entry)
                continue
            chosen = entry[2]
            break
        for entry in aside:
            heapq.heappush(rooms, entry)
        if chosen is None:
            continue  # this adapter is resident everywhere it may be
        fallback[a].add(chosen)
        total[chosen] += 1
        if total[chosen] < inp.resident_capacity:
            heapq.heappush(rooms, (total[chosen], order[chosen], chosen))
        budget -= 1
        heapq.heappush(heap, (copies + 1, r, a))

    # 5. The difference from what exists.
    assignment = {a: frozenset(preferred[a] | fallback[a]) for a in names}
    add: list[tuple[str, str]] = []
    remove: list[tuple[str, str]] = []
    dropped: list[tuple[str, str]] = []
    for a in names:
        before = set(inp.preferred.get(a, empty)) | set(inp.fallback.get(a, empty))
        add += [(a, p) for p in assignment[a] - before]
        for p in before - assignment[a]:
            (remove if p in alive else dropped).append((a, p))
    for a in set(inp.preferred) | set(inp.fallback):
        if a in spec_index:
            continue
        for p in set(inp.preferred.get(a, empty)) | set(inp.fallback.get(a, empty)):
            (remove if p in alive else dropped).append((a, p))
    return ResidentPlan(
        preferred={a: frozenset(s) for a, s in preferred.items()},
        assignment=assignment,
        add=tuple(sorted(add)),
        remove=tuple(sorted(set(remove))),
        dropped=tuple(sorted(set(dropped))),
        shortfall=dict(tier.shortfall),
        promoted=promoted,
    )
