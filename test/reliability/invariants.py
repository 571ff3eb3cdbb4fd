"""The invariant checker: watches a cluster and its vLLM simulators while faults are injected.

The product's promises, checked as they happen rather than only at the end:

- **routable**: once an adapter has been routable, it never drops to zero routable replicas while ready
  pods of the target exist. Routable means listed (ready) in the adapter's EndpointSlices *and* on a pod
  that exists, is Ready and is not being deleted, so a slice that still lists a dead pod does not hide a
  loss.
- **duplicate**: never two live LoRAPlacements for the same adapter on the same pod.
- **capacity**: never more than ``maxLorasPerReplica`` placements that claim a slot (not retiring, not
  Failed) on one pod.
- **model_not_found**: the simulators never answer "The model ... does not exist" (read from their
  ``/sim/events`` counters, which count every request that met a pod without its adapter); a router's
  ``stale_route`` count is added by the scenario, since a crashed simulator forgets its counters.

And once the system settles (``settle()``): every Loaded placement matches what its pod really holds
(``/v1/models``), no pod holds an adapter of the autoscaler without a placement, nothing is in progress,
and every adapter is Loaded and routable on at least its ``minReplicas`` pods.

Informer events (watches, so short dips are seen, not sampled) drive the continuous checks; a poller reads
the simulators' counters. Each violation is recorded with the time since the checker started and a reason.
Faults injected and requests sent and failed are counted here too, so one ``Tally`` says how a scenario
went. The checker only reads; it never changes the cluster.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from common.informer import Informer
from common.kube import ENDPOINT_SLICES, LORA_AUTOSCALERS, LORA_PLACEMENTS, PODS, KubeClient

log = logging.getLogger(__name__)

JSON = dict[str, Any]
AUTOSCALER_LABEL = "loraautoscaler.io/autoscaler"
ADAPTER_LABEL = "loraautoscaler.io/adapter"
ROLE_LABEL = "loraautoscaler.io/role"
IN_PROGRESS = ("Pending", "Loading", "Draining", "Unloading")


@dataclass(frozen=True)
class Violation:
    """One broken promise: when (seconds since the checker started), which invariant, and why."""

    at: float
    invariant: str
    reason: str

    def __str__(self) -> str:
        return f"t={self.at:.2f}s {self.invariant}: {self.reason}"


@dataclass
class Tally:
    """What one scenario did and what broke: the figures page is made of these."""

    scenario: str
    faults: Counter[str] = field(default_factory=Counter)
    requests_sent: int = 0
    requests_failed: int = 0
    failures_expected: int = 0  # failed requests that were the injected fault itself (a 5xx the pod answered)
    failures_by_reason: Counter[str] = field(default_factory=Counter)
    placements_lost: int = 0
    placements_duplicated: int = 0
    violations: list[Violation] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def faults_injected(self) -> int:
        return sum(self.faults.values())

    @property
    def unexpected_failures(self) -> int:
        return self.requests_failed - self.failures_expected

    def merge(self, other: Tally) -> None:
        """Add another tally's counts (several runs of one scenario make one row)."""
        self.faults.update(other.faults)
        self.requests_sent += other.requests_sent
        self.requests_failed += other.requests_failed
        self.failures_expected += other.failures_expected
        self.failures_by_reason.update(other.failures_by_reason)
        self.placements_lost += other.placements_lost
        self.placements_duplicated += other.placements_duplicated
        self.violations.extend(other.violations)
        self.seconds += other.seconds
        self.notes.extend(other.notes)


def _ready(pod: Mapping[str, Any]) -> bool:
    meta = pod.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if status.get("phase") != "Running" or not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def _labels_match(labels: Mapping[str, str] | None, selector: Mapping[str, str]) -> bool:
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def http_json(ip: str, port: int, path: str, *, api_key: str | None = None, timeout: float = 3.0) -> Any:
    """GET a JSON document from a pod (simulator); raises OSError or ValueError when it cannot."""
    conn = http.client.HTTPConnection(ip, port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status != 200:
            raise ValueError(f"GET {path} on {ip}:{port} answered {resp.status}: {raw[:200]!r}")
        return json.loads(raw)
    finally:
        conn.close()


class InvariantChecker:
    """Watches one autoscaler's placements, route table, pods and simulators; see the module docstring."""

    def __init__(self, kube: KubeClient, namespace: str, autoscaler: str, *, pod_labels: Mapping[str, str],
                 port: int = 8000, api_key: str | None = None, poll_interval: float = 0.5,
                 scenario: str = "") -> None:
        self.kube = kube
        self.namespace = namespace
        self.autoscaler = autoscaler
        self.pod_labels = dict(pod_labels)
        self.port = port
        self.api_key = api_key
        self.poll_interval = poll_interval
        self.tally = Tally(scenario)
        self.fault_log: list[tuple[float, str, str]] = []
        self._t0 = time.monotonic()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        selector = f"{AUTOSCALER_LABEL}={autoscaler}"
        self.autoscalers = Informer(kube, LORA_AUTOSCALERS, namespace, field_selector=f"metadata.name={autoscaler}",
                                    name="check-autoscalers")
        self.placements = Informer(kube, LORA_PLACEMENTS, namespace, label_selector=selector, name="check-placements")
        self.pods = Informer(kube, PODS, namespace, name="check-pods")
        self.slices = Informer(kube, ENDPOINT_SLICES, namespace, label_selector=selector, name="check-slices")
        self._informers = (self.autoscalers, self.placements, self.pods, self.slices)
        self._placed: set[str] = set()  # adapters seen routable since they (last) entered the spec
        self._zero: dict[str, float] = {}  # adapter -> when its current zero-routable episode began
        self._reported: set[tuple[str, str]] = set()  # (invariant, key) already recorded, until it clears
        self._not_found: dict[str, tuple[str, int, dict[str, int]]] = {}  # pod name -> (uid, count, by model)
        self._exempt: set[str] = set()  # adapters the scenario removes from the spec
        self._poller: threading.Thread | None = None
        self.min_routable_seen: dict[str, int] = {}

    # ---- lifecycle ----------------------------------------------------------------------------------

    def now(self) -> float:
        """Seconds since the checker started."""
        return time.monotonic() - self._t0

    def start(self, timeout: float = 30.0) -> InvariantChecker:
        for inf in self._informers:
            inf.add_handler(lambda _o: self.evaluate(), lambda _a, _b: self.evaluate(), lambda _o: self.evaluate())
            inf.start()
        deadline = time.monotonic() + timeout
        for inf in self._informers:
            if not inf.wait_for_sync(max(0.1, deadline - time.monotonic())):
                raise TimeoutError(f"the checker's informer {inf.name} did not sync: {inf.last_error}")
        self._poller = threading.Thread(target=self._poll_loop, name="check-sims", daemon=True)
        self._poller.start()
        self.evaluate()
        return self

    def stop(self) -> Tally:
        """Stop watching (once); one last read of the simulators' counters first. Returns the tally."""
        if self._stop.is_set():
            return self.tally
        with contextlib.suppress(Exception):
            self._poll_sims()
        self._stop.set()
        if self._poller is not None:
            self._poller.join(10)
        for inf in self._informers:
            inf.stop()
        self.tally.seconds = self.now()
        return self.tally

    def __enter__(self) -> InvariantChecker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- what the scenario tells the checker ---------------------------------------------------------

    def fault(self, kind: str, detail: str = "") -> None:
        """Count one injected fault (kept in ``fault_log`` with its time, for the report)."""
        with self._lock:
            self.tally.faults[kind] += 1
            self.fault_log.append((self.now(), kind, detail))
        log.info("fault %s at %.2fs: %s", kind, self.now(), detail)

    def request(self, ok: bool, reason: str = "", *, expected: bool = False) -> None:
        """Count one request sent; a failure carries its reason, and ``expected`` when it is the fault itself."""
        with self._lock:
            self.tally.requests_sent += 1
            if not ok:
                self.tally.requests_failed += 1
                self.tally.failures_by_reason[reason or "unknown"] += 1
                if expected:
                    self.tally.failures_expected += 1

    def adapter_leaves(self, adapter: str) -> None:
        """The scenario is about to remove ``adapter`` from the spec: its route table may go, legitimately."""
        with self._lock:
            self._exempt.add(adapter)
            self._placed.discard(adapter)
            self._zero.pop(adapter, None)

    def adapter_returns(self, adapter: str) -> None:
        """``adapter`` is back in the spec: checked again from its first routable replica on."""
        with self._lock:
            self._exempt.discard(adapter)
            self._placed.discard(adapter)

    def violation(self, invariant: str, reason: str) -> None:
        with self._lock:
            v = Violation(round(self.now(), 3), invariant, reason)
            self.tally.violations.append(v)
        log.warning("VIOLATION %s", v)

    @property
    def violations(self) -> list[Violation]:
        with self._lock:
            return list(self.tally.violations)

    # ---- continuous checks --------------------------------------------------------------------------

    def _spec(self) -> tuple[dict[str, int], int]:
        obj = self.autoscalers.get(f"{self.namespace}/{self.autoscaler}")
        if obj is None:
            return {}, 0
        spec = obj.get("spec") or {}
        adapters = {str(a.get("name")): int(a.get("minReplicas") or 1) for a in spec.get("adapters") or []}
        return adapters, int((spec.get("vllm") or {}).get("maxLorasPerReplica") or 0)

    def _target_pods(self) -> list[JSON]:
        return [p for p in self.pods.list() if _labels_match((p.get("metadata") or {}).get("labels"), self.pod_labels)]

    def routable(self) -> dict[str, set[str]]:
        """adapter -> names of ready, existing pods its published slices list (what a router may use)."""
        ready = {str((p.get("metadata") or {}).get("uid")): str((p.get("metadata") or {}).get("name"))
                 for p in self.pods.list() if _ready(p)}
        out: dict[str, set[str]] = {}
        for s in self.slices.list():
            labels = (s.get("metadata") or {}).get("labels") or {}
            if labels.get(ROLE_LABEL) != "adapter" or (s.get("metadata") or {}).get("deletionTimestamp"):
                continue
            adapter = labels.get(ADAPTER_LABEL, "")
            for ep in s.get("endpoints") or []:
                cond = ep.get("conditions") or {}
                if cond.get("ready") is False or cond.get("terminating"):
                    continue
                uid = str((ep.get("targetRef") or {}).get("uid"))
                if uid in ready:
                    out.setdefault(adapter, set()).add(ready[uid])
        return out

    def _once(self, invariant: str, key: str, reason: str) -> None:
        if (invariant, key) not in self._reported:
            self._reported.add((invariant, key))
            self.violation(invariant, reason)

    def _clear(self, invariant: str, key: str) -> None:
        self._reported.discard((invariant, key))

    def evaluate(self) -> None:
        """Check the continuous invariants against the informers' current view (called on every event)."""
        if not all(inf.has_synced() for inf in self._informers):
            return
        with self._lock:
            adapters, max_loras = self._spec()
            for gone in set(self._placed) - set(adapters):
                self._placed.discard(gone)
            routable = self.routable()
            any_ready = any(_ready(p) for p in self._target_pods())
            for adapter in adapters:
                count = len(routable.get(adapter, ()))
                if adapter in self._exempt:
                    continue
                if count:
                    self._placed.add(adapter)
                    self._zero.pop(adapter, None)
                    self._clear("routable", adapter)
                    self.min_routable_seen[adapter] = min(self.min_routable_seen.get(adapter, count), count)
                elif adapter in self._placed and any_ready:
                    self._zero.setdefault(adapter, self.now())
                    self.min_routable_seen[adapter] = 0
                    self._once("routable", adapter, f"{adapter} has no routable replica (its slices list no ready "
                                                    f"pod) while {len(self._target_pods())} pods exist")
            live = [p for p in self.placements.list() if not (p.get("metadata") or {}).get("deletionTimestamp")]
            by_key: dict[tuple[str, str], list[str]] = {}
            slots: Counter[str] = Counter()
            for p in live:
                spec, status = p.get("spec") or {}, p.get("status") or {}
                key = (str(spec.get("adapter")), str(spec.get("podUid")))
                by_key.setdefault(key, []).append(str(p["metadata"]["name"]))
                if not spec.get("retire") and status.get("phase") != "Failed":
                    slots[str(spec.get("podName"))] += 1
            for (adapter, uid), names in by_key.items():
                if len(names) > 1:
                    self._once("duplicate", f"{adapter}/{uid}", f"{len(names)} live placements of {adapter} on "
                                                               f"one pod: {sorted(names)}")
            if max_loras:
                for pod, n in slots.items():
                    if n > max_loras:
                        self._once("capacity", f"{pod}/{n}", f"{n} placements claim a slot on {pod}, more than "
                                                             f"maxLorasPerReplica {max_loras}")

    # ---- the simulators -----------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self._poll_sims()
            except Exception:  # a poll must never stop the checker
                log.exception("polling the simulators failed")

    def _poll_sims(self) -> None:
        for pod in self._target_pods():
            meta, status = pod.get("metadata") or {}, pod.get("status") or {}
            ip = status.get("podIP")
            if not ip or status.get("phase") != "Running":
                continue
            try:
                counters = http_json(ip, self.port, "/sim/events?since=999999999", timeout=2.0)["counters"]
            except (OSError, ValueError, KeyError):
                continue  # restarting or gone: its next answer is compared with a fresh baseline
            name, uid = str(meta.get("name")), str(meta.get("uid"))
            count = int(counters.get("model_not_found") or 0)
            by_model = {str(k): int(v) for k, v in (counters.get("not_found_by_model") or {}).items()}
            with self._lock:
                before = self._not_found.get(name)
                if before is None or before[0] != uid or count < before[1]:
                    base_count, base_models = 0, {}  # a new pod, or a restarted simulator: counters began at 0
                else:
                    base_count, base_models = before[1], before[2]
                self._not_found[name] = (uid, count, by_model)
            if count > base_count:
                new = {m: n - base_models.get(m, 0) for m, n in by_model.items() if n > base_models.get(m, 0)}
                self.violation("model_not_found", f"pod {name} answered 'model does not exist' {count - base_count} "
                                                  f"time(s) to routed traffic: {new}")

    # ---- settling -----------------------------------------------------------------------------------

    def settled_problems(self) -> tuple[list[str], list[str], list[str]]:
        """(lost, duplicated, in progress): what keeps the system from its settled state right now."""
        adapters, _ = self._spec()
        lost: list[str] = []
        duplicated: list[str] = []
        busy: list[str] = []
        pods = {str((p.get("metadata") or {}).get("name")): p for p in self._target_pods() if _ready(p)}
        held: dict[str, dict[str, str]] = {}
        for name, pod in pods.items():
            try:
                data = http_json(pod["status"]["podIP"], self.port, "/v1/models", api_key=self.api_key)
            except (OSError, ValueError) as exc:
                busy.append(f"pod {name}'s /v1/models does not answer ({exc})")
                continue
            held[name] = {str(m["id"]): str(m.get("root")) for m in data.get("data") or [] if m.get("parent")}
        placed: dict[str, set[str]] = {}
        loaded: Counter[str] = Counter()
        by_key: Counter[tuple[str, str]] = Counter()
        for p in self.placements.list():
            meta, spec, status = p.get("metadata") or {}, p.get("spec") or {}, p.get("status") or {}
            if meta.get("deletionTimestamp"):
                busy.append(f"placement {meta.get('name')} is being deleted")
                continue
            adapter, pod_name, phase = str(spec.get("adapter")), str(spec.get("podName")), status.get("phase")
            by_key[(adapter, str(spec.get("podUid")))] += 1
            if phase != "Failed":
                placed.setdefault(pod_name, set()).add(adapter)
            if spec.get("retire") or phase in IN_PROGRESS:
                busy.append(f"placement {meta.get('name')} is {phase}{' (retiring)' if spec.get('retire') else ''}")
                continue
            if phase != "Loaded":
                continue
            holder = pods.get(pod_name)
            if holder is None or (holder.get("metadata") or {}).get("uid") != spec.get("podUid"):
                busy.append(f"placement {meta.get('name')} is Loaded on pod {pod_name}, which is not ready")
                continue
            if pod_name in held and adapter not in held[pod_name]:
                lost.append(f"placement {meta.get('name')} says Loaded but pod {pod_name} does not hold {adapter} "
                            f"(it holds {sorted(held[pod_name])})")
                continue
            loaded[adapter] += 1
        for (adapter, uid), n in by_key.items():
            if n > 1:
                duplicated.append(f"{n} placements of {adapter} on pod uid {uid}")
        for pod_name, models in held.items():
            for adapter in sorted(set(models) & set(adapters)):
                if adapter not in placed.get(pod_name, set()):
                    duplicated.append(f"pod {pod_name} holds {adapter} without a placement (an orphan copy)")
        routable = self.routable()
        for adapter, minimum in adapters.items():
            if loaded[adapter] < minimum:
                lost.append(f"{adapter} is Loaded on {loaded[adapter]} pod(s), below its minimum {minimum}")
            elif len(routable.get(adapter, ())) < minimum:
                busy.append(f"{adapter} is routable on {len(routable.get(adapter, ()))} pod(s), below {minimum}")
        return lost, duplicated, busy

    def settle(self, timeout: float = 45.0) -> bool:
        """Wait until the settled invariants hold; on the deadline, record what still does not."""
        deadline = time.monotonic() + timeout
        lost: list[str] = []
        duplicated: list[str] = []
        busy: list[str] = []
        while time.monotonic() < deadline:
            lost, duplicated, busy = self.settled_problems()
            if not lost and not duplicated and not busy:
                return True
            time.sleep(0.5)
        with self._lock:
            self.tally.placements_lost += len(lost)
            self.tally.placements_duplicated += len(duplicated)
        for what in lost:
            self.violation("settle/lost", what)
        for what in duplicated:
            self.violation("settle/duplicated", what)
        for what in busy:
            self.violation("settle/not settled", what)
        return False


def describe(violations: Iterable[Violation]) -> str:
    """Violations one per line, for assertion messages."""
    return "\n".join(str(v) for v in violations) or "none"
