"""Wiring: informers on every replica, reconcilers and the pod auditor only on the leader.

Informers run on every replica so a standby that wins the lease acts at once on a warm cache. Handlers
map each change to the keys it concerns (pod -> the autoscalers whose cached selector matches it and the
placements on it; placement -> its autoscaler; slice -> its autoscaler and its draining placements) and
add them to the current term's queues; between terms (standby) they drop keys, and a new term starts
with a full resync of every autoscaler and placement.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from api import labels as L
from common.informer import Informer, wait_for_cache_sync
from common.kube import (
    ENDPOINT_SLICES,
    LORA_AUTOSCALERS,
    LORA_PLACEMENTS,
    PODS,
    SECRETS,
    SERVICES,
    ApiError,
    KubeClient,
)
from common.workqueue import WorkQueue
from controller import metrics
from controller.auditor import PodAuditor
from controller.autoscaler_reconciler import AutoscalerReconciler, LoadProvider, SaturationHook
from controller.handover import PodAutoscalingHandOver
from controller.load import RouterInFlightProbe, SpecLoadProvider
from controller.placement_reconciler import InFlightProbe, PlacementReconciler
from controller.pods import labels_of, slim_pod, view
from controller.runtime import (
    BY_AUTOSCALER,
    BY_POD,
    LogRecorder,
    ModelsCache,
    Recorder,
    Runtime,
    SelectorCache,
    Settings,
    VLLMClients,
    owned_route_index,
    placement_autoscaler_index,
    placement_pod_index,
)
from controller.store import Store, key_of
from controller.target import TargetResolver

log = logging.getLogger(__name__)

JSON = dict[str, Any]


class Reconciler(Protocol):
    kind: str

    def reconcile(self, key: str) -> float | None: ...


@dataclass
class Options:
    namespace: str | None = None  # None: every namespace
    workers: int = 8  # placement workers (loads can take seconds); autoscaler workers are a quarter
    leader_election: bool = True
    lease_name: str = "lora-autoscaler-controller"
    lease_namespace: str = "default"
    identity: str | None = None
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    audit_period: float = 3.0
    sync_timeout: float = 60.0
    autoscaling: bool = True  # load signal, hand-over and router drain probe from each autoscaler's spec


class _Term:
    """One leadership term: its queues and worker threads."""

    def __init__(self) -> None:
        self.autoscalers: WorkQueue[str] = WorkQueue("loraautoscalers")
        self.placements: WorkQueue[str] = WorkQueue("loraplacements")
        self.threads: list[threading.Thread] = []


class Controller:
    """The controller process's core; ``start()`` and ``stop()`` from a main thread or a test."""

    def __init__(self, kube: KubeClient, options: Options | None = None, *, recorder: Recorder | None = None,
                 load_provider: LoadProvider | None = None, saturation_hook: SaturationHook | None = None,
                 in_flight_probe: InFlightProbe | None = None) -> None:
        self.kube = kube
        self.options = opts = options or Options()
        ns = opts.namespace
        self.autoscaler_informer = Informer(kube, LORA_AUTOSCALERS, ns, name="loraautoscalers")
        self.placement_informer = Informer(kube, LORA_PLACEMENTS, ns, name="loraplacements")
        self.placement_informer.add_index(BY_AUTOSCALER, placement_autoscaler_index)
        self.placement_informer.add_index(BY_POD, placement_pod_index)
        self.pod_informer = Informer(kube, PODS, ns, transform=slim_pod, name="pods")
        self.slice_informer = Informer(kube, ENDPOINT_SLICES, ns, label_selector=L.AUTOSCALER_LABEL, name="slices")
        self.slice_informer.add_index(BY_AUTOSCALER, owned_route_index)
        self.service_informer = Informer(kube, SERVICES, ns, label_selector=L.AUTOSCALER_LABEL, name="services")
        self.service_informer.add_index(BY_AUTOSCALER, owned_route_index)
        self.informers = [self.autoscaler_informer, self.placement_informer, self.pod_informer,
                          self.slice_informer, self.service_informer]
        self._secrets: dict[tuple[str, str, str], tuple[float, str | None]] = {}
        self._secrets_lock = threading.Lock()
        self.rt = Runtime(
            kube=kube,
            autoscalers=Store(self.autoscaler_informer),
            placements=Store(self.placement_informer, indexes={BY_AUTOSCALER: placement_autoscaler_index,
                                                               BY_POD: placement_pod_index}),
            pods=Store(self.pod_informer),
            slices=Store(self.slice_informer, indexes={BY_AUTOSCALER: owned_route_index}),
            services=Store(self.service_informer, indexes={BY_AUTOSCALER: owned_route_index}),
            recorder=recorder or LogRecorder(),
            vllm=VLLMClients(),
            models=ModelsCache(),
            selectors=SelectorCache(),
            settings=Settings(audit_period=opts.audit_period),
            read_secret=self._read_secret,
            enqueue_autoscaler=self._enqueue_autoscaler,
            enqueue_placement=self._enqueue_placement,
        )
        self.resolver = TargetResolver(kube, ttl=self.rt.settings.target_cache_seconds)
        self._own_load_provider: SpecLoadProvider | None = None
        if opts.autoscaling:
            if load_provider is None:
                load_provider = self._own_load_provider = SpecLoadProvider(self.rt)
            if saturation_hook is None:
                saturation_hook = PodAutoscalingHandOver(self.rt)
        self.autoscaler_reconciler = AutoscalerReconciler(self.rt, self.resolver, load_provider=load_provider,
                                                          saturation_hook=saturation_hook)
        self.placement_reconciler = PlacementReconciler(self.rt, in_flight_probe=in_flight_probe)
        if opts.autoscaling and in_flight_probe is None:
            # The router's per-pod counts when spec.scaling.metric.routerUrl is set, the pod's own metrics too.
            self.placement_reconciler.in_flight_probe = RouterInFlightProbe(
                fallback=self.placement_reconciler.in_flight_probe)
        self._term: _Term | None = None
        self._term_lock = threading.Lock()
        self._elector: Any = None
        self._stopped = threading.Event()
        self._leading_stop: threading.Event | None = None
        self._lead_thread: threading.Thread | None = None
        self._handlers()

    # ---- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the informers, wait for their first lists, then campaign (or lead at once without election)."""
        for inf in self.informers:
            inf.start()
        if not wait_for_cache_sync(self.informers, self.options.sync_timeout):
            unsynced = [i.name for i in self.informers if not i.has_synced()]
            raise TimeoutError(f"informers did not sync within {self.options.sync_timeout:.0f}s: {unsynced} "
                               f"(last errors: {[str(i.last_error) for i in self.informers if i.last_error]})")
        opts = self.options
        if opts.leader_election:
            from common.leader import LeaderElector

            self._elector = LeaderElector(
                self.kube, opts.lease_name, opts.lease_namespace, opts.identity,
                lease_duration=opts.lease_duration, renew_deadline=opts.renew_deadline,
                retry_period=opts.retry_period, on_started_leading=self._lead, on_stopped_leading=self._stepped_down)
            self._elector.start()
        else:
            stop = self._leading_stop = threading.Event()
            self._lead_thread = threading.Thread(target=self._lead, args=(stop,), name="leading", daemon=True)
            self._lead_thread.start()

    def stop(self, *, release: bool = True, timeout: float = 15.0) -> None:
        """Stop the workers, release the lease (unless ``release`` is False, as a crash would), stop informers."""
        self._stopped.set()
        if self._elector is not None:
            self._elector.stop(release=release, timeout=timeout)
        if self._leading_stop is not None:
            self._leading_stop.set()
        if self._lead_thread is not None:
            self._lead_thread.join(timeout)
        for inf in self.informers:
            inf.stop()
        if self._own_load_provider is not None:
            self._own_load_provider.close()
        close = getattr(self.rt.recorder, "close", None)
        if callable(close):
            close(2.0)

    def is_leader(self) -> bool:
        if self._elector is not None:
            return bool(self._elector.is_leader())
        return self._term is not None

    def wait_for_leadership(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._term is not None:
                return True
            time.sleep(0.05)
        return self._term is not None

    # ---- leadership terms -------------------------------------------------------------------------------

    def _lead(self, stop: threading.Event) -> None:
        """Run reconcilers and the auditor until ``stop``; returns when they have wound down."""
        term = _Term()
        workers = max(1, self.options.workers)
        for i in range(max(1, workers // 4)):
            term.threads.append(self._worker(term.autoscalers, self.autoscaler_reconciler, f"autoscaler-{i}"))
        for i in range(workers):
            term.threads.append(self._worker(term.placements, self.placement_reconciler, f"placement-{i}"))
        auditor = PodAuditor(self.rt, period=self.options.audit_period)
        audit_thread = threading.Thread(target=auditor.run, args=(stop,), name="pod-auditor", daemon=True)
        with self._term_lock:
            self._term = term
        metrics.LEADER.set(1)
        log.info("leading: %d autoscaler and %d placement workers", max(1, workers // 4), workers)
        for t in term.threads:
            t.start()
        audit_thread.start()
        for obj in self.autoscaler_informer.list():
            term.autoscalers.add(key_of(obj))
        for obj in self.placement_informer.list():
            term.placements.add(key_of(obj))
        stop.wait()
        with self._term_lock:
            self._term = None
        metrics.LEADER.set(0)
        term.autoscalers.shutdown()
        term.placements.shutdown()
        deadline = time.monotonic() + 10.0
        for t in [*term.threads, audit_thread]:
            t.join(max(0.1, deadline - time.monotonic()))
        log.info("stopped leading")

    def _stepped_down(self) -> None:
        metrics.LEADER.set(0)

    def _worker(self, queue: WorkQueue[str], rec: Reconciler, name: str) -> threading.Thread:
        def loop() -> None:
            while True:
                key = queue.get()
                if key is None:
                    return
                started = time.monotonic()
                try:
                    after = rec.reconcile(key)
                except ApiError as exc:
                    metrics.RECONCILE_ERRORS.labels(rec.kind).inc()
                    level = logging.INFO if exc.retriable or exc.conflict else logging.WARNING
                    log.log(level, "%s %s: %s; retrying", rec.kind, key, exc)
                    queue.add_rate_limited(key)
                except Exception:
                    metrics.RECONCILE_ERRORS.labels(rec.kind).inc()
                    log.exception("%s %s failed; retrying", rec.kind, key)
                    queue.add_rate_limited(key)
                else:
                    queue.forget(key)
                    if after is not None:
                        queue.add_after(key, after)
                finally:
                    metrics.RECONCILE_SECONDS.labels(rec.kind).observe(time.monotonic() - started)
                    queue.done(key)

        return threading.Thread(target=loop, name=name, daemon=True)

    # ---- event handlers ---------------------------------------------------------------------------------

    def _enqueue_autoscaler(self, key: str) -> None:
        term = self._term
        if term is not None:
            term.autoscalers.add(key)

    def _enqueue_placement(self, key: str) -> None:
        term = self._term
        if term is not None:
            term.placements.add(key)

    def _handlers(self) -> None:
        self.autoscaler_informer.add_handler(
            lambda o: self._enqueue_autoscaler(key_of(o)), self._autoscaler_changed,
            lambda o: self._enqueue_autoscaler(key_of(o)))
        self.placement_informer.add_handler(self._placement_event, lambda old, new: self._placement_event(new),
                                            self._placement_deleted)
        self.pod_informer.add_handler(lambda o: self._pod_event(None, o), self._pod_event,
                                      lambda o: self._pod_event(o, None))
        for inf in (self.slice_informer, self.service_informer):
            inf.add_handler(self._route_event, lambda old, new: self._route_event(new), self._route_event)

    def _autoscaler_changed(self, old: JSON, new: JSON) -> None:
        if (old.get("spec") != new.get("spec")) or (old.get("metadata") or {}).get("generation") != \
                (new.get("metadata") or {}).get("generation"):
            for p in self.placement_informer.by_index(BY_AUTOSCALER, key_of(new)):
                self._enqueue_placement(key_of(p))
        old_meta, new_meta = old.get("metadata") or {}, new.get("metadata") or {}
        if old.get("spec") != new.get("spec") or new_meta.get("deletionTimestamp") or \
                old_meta.get("finalizers") != new_meta.get("finalizers"):
            self._enqueue_autoscaler(key_of(new))

    def _placement_event(self, obj: JSON) -> None:
        self._enqueue_placement(key_of(obj))
        akey = placement_autoscaler_index(obj)
        if akey:
            self._enqueue_autoscaler(akey[0])

    def _placement_deleted(self, obj: JSON) -> None:
        akey = placement_autoscaler_index(obj)
        if akey:
            self._enqueue_autoscaler(akey[0])

    def _pod_event(self, old: JSON | None, new: JSON | None) -> None:
        obj = new if new is not None else old
        assert obj is not None
        ns = (obj.get("metadata") or {}).get("namespace") or ""
        if old is not None and new is not None:
            a, b = view(old), view(new)
            if a == b and labels_of(old) == labels_of(new):
                return  # nothing the controller reads changed
        keys = set(self.rt.selectors.matching(ns, labels_of(obj)))
        if old is not None and new is not None and labels_of(old) != labels_of(new):
            keys |= set(self.rt.selectors.matching(ns, labels_of(old)))
        for k in keys:
            self._enqueue_autoscaler(k)
        for p in self.placement_informer.by_index(BY_POD, f"{ns}/{(obj.get('metadata') or {}).get('name')}"):
            self._enqueue_placement(key_of(p))

    def _route_event(self, obj: JSON) -> None:
        keys = owned_route_index(obj)
        for k in keys:
            self._enqueue_autoscaler(k)
        adapter = ((obj.get("metadata") or {}).get("labels") or {}).get(L.ADAPTER_LABEL)
        if adapter and keys:
            for p in self.placement_informer.by_index(BY_AUTOSCALER, keys[0]):
                spec = p.get("spec") or {}
                if spec.get("adapter") == adapter and spec.get("retire"):
                    self._enqueue_placement(key_of(p))

    # ---- secrets ----------------------------------------------------------------------------------------

    def _read_secret(self, namespace: str, name: str, key: str) -> str | None:
        """A Secret's value by GET (no list/watch of Secrets: least privilege), cached briefly."""
        import base64

        now = time.monotonic()
        ck = (namespace, name, key)
        with self._secrets_lock:
            hit = self._secrets.get(ck)
        if hit is not None and hit[0] > now:
            return hit[1]
        value: str | None = None
        try:
            secret = self.kube.get(SECRETS, name, namespace)
            raw = (secret.get("data") or {}).get(key)
            value = base64.b64decode(raw).decode().strip() if raw else None
            if value is None:
                log.warning("Secret %s/%s has no key %r: calling vLLM without an API key", namespace, name, key)
        except ApiError as exc:
            log.warning("cannot read Secret %s/%s: %s", namespace, name, exc)
        with self._secrets_lock:
            self._secrets[ck] = (now + self.rt.settings.secret_cache_seconds, value)
        return value


def stores_of(c: Controller) -> Mapping[str, Store]:
    """The controller's stores by kind (tests and benchmarks read them)."""
    return {"autoscalers": c.rt.autoscalers, "placements": c.rt.placements, "pods": c.rt.pods,
            "slices": c.rt.slices, "services": c.rt.services}


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
