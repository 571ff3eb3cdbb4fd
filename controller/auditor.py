"""The pod auditor: what each pod really holds, checked through ``/v1/models`` every few seconds.

vLLM forgets runtime-loaded adapters when it restarts, and a restart is not always visible in the pod's
status (a process supervisor inside the container, a restart between two status updates). So, per pod
rather than per placement (one request per pod however many adapters it holds), the auditor asks what
the pod serves, records it for the lifecycle, and wakes the placements whose adapter is missing or has
another source. It also learns the base model's name for the route table's base slice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from api import v1alpha1 as v1
from controller import metrics
from controller.pods import PodView, labels_of, view
from controller.runtime import BY_POD, ModelsObservation, Runtime
from controller.store import key_of
from controller.timeutil import parse_time
from controller.vllm_client import PodModels, lora_path

log = logging.getLogger(__name__)


@dataclass
class _PodWork:
    namespace: str
    pod: PodView
    autoscaler: v1.LoRAAutoscaler
    autoscaler_key: str
    placements: list[tuple[str, v1.LoRAPlacement]]  # Loaded placements on the pod (key, object)


class PodAuditor:
    def __init__(self, rt: Runtime, *, period: float = 3.0, workers: int = 8) -> None:
        self.rt = rt
        self.period = period
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="audit")
        self._suspects: set[tuple[str, str]] = set()  # (pod uid, adapter) seen orphaned in the last round

    def run(self, stop: threading.Event) -> None:
        """Audit every ``period`` seconds until ``stop`` is set."""
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    self.audit_once()
                except Exception:
                    log.exception("pod audit failed")
                stop.wait(max(0.1, self.period - (time.monotonic() - started)))
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def audit_once(self) -> int:
        """One round; returns how many pods were asked."""
        rt = self.rt
        work: dict[tuple[str, str], _PodWork] = {}
        phases: Counter[str] = Counter()
        autoscalers: dict[str, v1.LoRAAutoscaler | None] = {}
        for obj in rt.placements.list():
            try:
                p = v1.LoRAPlacement.from_object(obj)
            except Exception:
                continue
            phases[p.status.phase] += 1
            if p.spec.retire or p.status.phase != "Loaded":
                continue
            ns = p.namespace
            akey = f"{ns}/{p.spec.autoscaler}"
            if akey not in autoscalers:
                autoscalers[akey] = _autoscaler(rt, akey)
            auto = autoscalers[akey]
            if auto is None:
                continue
            slot = work.get((ns, p.spec.pod_name))
            if slot is None:
                pod_obj = rt.pods.get(f"{ns}/{p.spec.pod_name}")
                if pod_obj is None:
                    continue
                pod = view(pod_obj)
                if not pod.serving or pod.uid != p.spec.pod_uid:
                    continue
                slot = work[(ns, p.spec.pod_name)] = _PodWork(ns, pod, auto, akey, [])
            slot.placements.append((key_of(obj), p))
        for phase in v1.PLACEMENT_PHASES:
            metrics.PLACEMENTS.labels(phase).set(phases.get(phase, 0))
        # The base model's name, for autoscalers whose pods hold no adapter yet.
        for akey in rt.selectors.autoscaler_keys():
            if rt.models.base(akey) or any(w.autoscaler_key == akey for w in work.values()):
                continue
            auto = _autoscaler(rt, akey)
            if auto is None:
                continue
            selector = rt.selectors.get(akey)
            ns = akey.split("/", 1)[0]
            for pod_obj in rt.pods.list(ns):
                if selector is not None and selector.matches(labels_of(pod_obj)):
                    pod = view(pod_obj)
                    if pod.serving:
                        work[(ns, pod.name)] = _PodWork(ns, pod, auto, akey, [])
                        break
        items = list(work.values())
        seen: set[tuple[str, str]] = set()
        for item, result in zip(items, self._pool.map(self._ask, items), strict=True):
            if result is not None:
                seen |= self._judge(item, result)
        self._suspects = seen
        return len(items)

    def _ask(self, item: _PodWork) -> ModelsObservation | None:
        vllm = item.autoscaler.spec.vllm
        api_key = None
        if vllm.api_key_secret_ref is not None:
            api_key = self.rt.read_secret(item.namespace, vllm.api_key_secret_ref.name, vllm.api_key_secret_ref.key)
        client = self.rt.vllm.get(vllm.scheme, api_key, float(vllm.load_timeout_seconds))
        started = time.time()
        try:
            models = client.models(f"{item.pod.ip}:{vllm.port}")
        except Exception as exc:
            metrics.AUDITS.labels("unreachable").inc()
            log.debug("audit of pod %s/%s failed: %s", item.namespace, item.pod.name, exc)
            return None
        metrics.AUDITS.labels("ok").inc()
        obs = ModelsObservation(started, models)
        self.rt.models.put(item.pod.uid, obs)
        return obs

    def _judge(self, item: _PodWork, obs: ModelsObservation) -> set[tuple[str, str]]:
        """Wake placements that lost their adapter; unload orphans seen twice. Returns this round's orphans."""
        rt = self.rt
        if rt.models.set_base(item.autoscaler_key, obs.models.base):
            rt.enqueue_autoscaler(item.autoscaler_key)
        for key, p in item.placements:
            if lost_or_changed(p, obs.models, obs.started):
                rt.enqueue_placement(key)
        placed = set()
        for o in rt.placements.by_index(BY_POD, f"{item.namespace}/{item.pod.name}"):
            spec = o.get("spec") or {}
            if spec.get("autoscaler") == item.autoscaler.name:
                placed.add(str(spec.get("adapter")))
        names = {a.name for a in item.autoscaler.spec.adapters}
        found = {(item.pod.uid, a) for a in orphans(obs.models.adapters, names, placed)}
        for _uid, adapter in sorted(found & self._suspects):
            self._unload_orphan(item, adapter)
        return found

    def _unload_orphan(self, item: _PodWork, adapter: str) -> None:
        vllm = item.autoscaler.spec.vllm
        api_key = None
        if vllm.api_key_secret_ref is not None:
            api_key = self.rt.read_secret(item.namespace, vllm.api_key_secret_ref.name, vllm.api_key_secret_ref.key)
        client = self.rt.vllm.get(vllm.scheme, api_key, float(vllm.load_timeout_seconds))
        result = client.unload(f"{item.pod.ip}:{vllm.port}", item.pod.name, adapter)
        metrics.UNLOADS.labels(result.outcome.value).inc()
        log.info("unloaded orphan %s from %s: %s", adapter, item.pod.name, result.message)
        auto_obj = self.rt.autoscalers.get(item.autoscaler_key)
        if auto_obj is not None and result.ok:
            self.rt.recorder.event(auto_obj, "Normal", "OrphanUnloaded",
                                   f"{adapter} was loaded on pod {item.pod.name} without a placement: unloaded")


def orphans(held: Mapping[str, str], managed: set[str], placed: set[str]) -> set[str]:
    """Adapters of this autoscaler that a pod holds without any placement saying it should (pure).

    Only names the autoscaler manages count: adapters someone else loaded stay alone.
    """
    return {a for a in held if a in managed and a not in placed}


def lost_or_changed(p: v1.LoRAPlacement, models: PodModels, observed_at: float) -> bool:
    """Whether a Loaded placement needs the lifecycle's attention after this observation (pure)."""
    loaded_at = parse_time(p.status.loaded_time)
    if loaded_at is None or observed_at <= loaded_at + 1.0:
        return False  # the request may have raced the load; the next round decides
    root = models.adapters.get(p.spec.adapter)
    if root is None:
        return True
    return bool(root) and root != lora_path(p.spec.source)


def _autoscaler(rt: Runtime, key: str) -> v1.LoRAAutoscaler | None:
    obj = rt.autoscalers.get(key)
    if obj is None:
        return None
    try:
        return v1.LoRAAutoscaler.from_object(obj)
    except Exception:
        return None
