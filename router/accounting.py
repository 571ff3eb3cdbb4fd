"""The router's own per-adapter, per-pod load: the precise load signal vLLM's metrics do not give.

vLLM lists busy adapters without counts and leaves out the ones deferred by the LoRA budget; the router
knows exactly how many requests of each adapter it has in flight on each pod and how many wait in the
router for a holder. The strategies read this, the ``/router/load`` endpoint publishes it, and the
Prometheus collector exports it. Plain in-memory state, touched only from the event loop; times are
passed in, never read here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from router.scrape import PodMetrics


class PodState:
    """One pod as the router sees it: its in-flight requests by adapter, and its last scrape."""

    __slots__ = ("adapters", "address", "by_model", "inflight", "inflight_at_scrape", "metrics", "pod")

    def __init__(self, address: str, pod: str) -> None:
        self.address = address
        self.pod = pod
        self.inflight = 0
        self.by_model: dict[str, int] = {}
        """In-flight requests per model, base model included."""
        self.adapters: dict[str, int] = {}
        """In-flight requests per LoRA adapter only: its keys are the adapters that hold a LoRA slot."""
        self.metrics: PodMetrics | None = None
        self.inflight_at_scrape = 0

    def external_load(self) -> float:
        """Requests on the pod the router did not send (other routers or clients), as of the last scrape."""
        m = self.metrics
        if m is None:
            return 0.0
        return max(0.0, m.running + m.waiting - self.inflight_at_scrape)


@dataclass(slots=True)
class ModelStats:
    """Totals of one model (adapter or base) across pods."""

    inflight: int = 0
    queued: int = 0
    started: int = 0
    finished: int = 0


@dataclass(slots=True)
class _Snapshot:
    time: float
    started: dict[str, int] = field(default_factory=dict)
    pair_started: dict[tuple[str, str], int] = field(default_factory=dict)


class Accounting:
    """Counters the request path updates with a few dict operations per request."""

    def __init__(self, rate_window: float = 10.0) -> None:
        self.pods: dict[str, PodState] = {}
        self.models: dict[str, ModelStats] = {}
        self.pair_started: dict[tuple[str, str], int] = {}
        self.codes: dict[tuple[str, str, int], int] = {}
        self.errors: dict[tuple[str, str, str], int] = {}
        self.moves: dict[tuple[str, str], int] = {}
        """(model, pod) -> requests moved off that pod while they waited there for a LoRA slot."""
        self.rate_window = rate_window
        self._snapshots: deque[_Snapshot] = deque()

    # --- the request path ---------------------------------------------------------------------------------

    def model(self, model: str) -> ModelStats:
        stats = self.models.get(model)
        if stats is None:
            stats = self.models[model] = ModelStats()
        return stats

    def pod(self, address: str, pod: str = "") -> PodState:
        state = self.pods.get(address)
        if state is None:
            state = self.pods[address] = PodState(address, pod or address)
        elif pod and state.pod != pod:
            state.pod = pod
        return state

    def start(self, model: str, address: str, pod: str, is_base: bool = False) -> PodState:
        """A request for ``model`` is being sent to ``address``."""
        state = self.pod(address, pod)
        state.inflight += 1
        by_model = state.by_model
        by_model[model] = by_model.get(model, 0) + 1
        if not is_base:
            adapters = state.adapters
            adapters[model] = adapters.get(model, 0) + 1
        stats = self.model(model)
        stats.inflight += 1
        stats.started += 1
        key = (model, address)
        self.pair_started[key] = self.pair_started.get(key, 0) + 1
        return state

    def finish(self, model: str, address: str, is_base: bool = False) -> None:
        """The request sent by ``start`` ended (answered, failed or abandoned)."""
        state = self.pods.get(address)
        if state is not None:
            state.inflight -= 1
            left = state.by_model.get(model, 0) - 1
            if left > 0:
                state.by_model[model] = left
            else:
                state.by_model.pop(model, None)
            if not is_base:
                left = state.adapters.get(model, 0) - 1
                if left > 0:
                    state.adapters[model] = left
                else:
                    state.adapters.pop(model, None)
        stats = self.model(model)
        stats.inflight -= 1
        stats.finished += 1

    def count_code(self, model: str, pod: str, code: int) -> None:
        key = (model, pod, code)
        self.codes[key] = self.codes.get(key, 0) + 1

    def count_move(self, model: str, pod: str) -> None:
        """A request for ``model`` left ``pod``, where it waited for a LoRA slot, for another holder."""
        key = (model, pod)
        self.moves[key] = self.moves.get(key, 0) + 1

    def count_error(self, model: str, pod: str, kind: str) -> None:
        key = (model, pod, kind)
        self.errors[key] = self.errors.get(key, 0) + 1

    # --- background ---------------------------------------------------------------------------------------

    def store_metrics(self, address: str, metrics: PodMetrics | None) -> None:
        """A scrape of ``address`` finished (None: its state is unknown)."""
        state = self.pods.get(address)
        if state is None:
            if metrics is None:
                return
            state = self.pod(address)
        state.metrics = metrics
        state.inflight_at_scrape = state.inflight

    def forget_pods(self, keep: dict[str, str]) -> set[str]:
        """Drop idle pods that left the route table (``keep``: address -> pod name of those in it), with
        their counters, so the state does not grow with pod churn; returns the pod names dropped."""
        for address in [a for a, s in self.pods.items() if a not in keep and s.inflight <= 0]:
            del self.pods[address]
        for key in [k for k in self.pair_started if k[1] not in keep and k[1] not in self.pods]:
            del self.pair_started[key]
        live = set(keep.values()) | {s.pod for s in self.pods.values()} | {""}
        gone = {k[1] for k in self.codes if k[1] not in live} | {k[1] for k in self.errors if k[1] not in live}
        for code_key in [k for k in self.codes if k[1] in gone]:
            del self.codes[code_key]
        for error_key in [k for k in self.errors if k[1] in gone]:
            del self.errors[error_key]
        return gone

    def snapshot(self, now: float) -> None:
        """Record the counters at ``now``; rates are computed over the snapshots inside the window."""
        self._snapshots.append(_Snapshot(now, {m: s.started for m, s in self.models.items()}, dict(self.pair_started)))
        while len(self._snapshots) > 2 and now - self._snapshots[1].time >= self.rate_window:
            self._snapshots.popleft()

    def rates(self, now: float) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
        """Requests started per second, per model and per (model, pod address), over the rate window."""
        if not self._snapshots:
            return {}, {}
        old = self._snapshots[0]
        dt = now - old.time
        if dt <= 0:
            return {}, {}
        per_model = {m: (s.started - old.started.get(m, 0)) / dt for m, s in self.models.items()}
        per_pair = {k: (v - old.pair_started.get(k, 0)) / dt for k, v in self.pair_started.items()}
        return per_model, per_pair
