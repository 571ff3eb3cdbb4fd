"""The LoRAPlacement reconciler: performs the adapter lifecycle that ``controller.lifecycle`` decides.

It gathers what the pure state machine needs (the pod, whether the route table still lists the pod,
in-flight requests, the pod's ``/v1/models``), performs the one action planned (a load, an unload, a
delete) and writes the resulting status, one placement at a time per key (the work queue never hands the
same key to two workers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from api import labels as L
from api import v1alpha1 as v1
from api.schema import to_dict
from common.kube import LORA_PLACEMENTS, ApiError
from controller import lifecycle, metrics, routes
from controller.lifecycle import Action
from controller.pods import PodView, view
from controller.runtime import ModelsObservation, Runtime
from controller.signals import MetricsFormatError, parse_vllm_metrics
from controller.timeutil import parse_time
from controller.vllm_client import CallResult, Outcome, VLLMClient, lora_path

log = logging.getLogger(__name__)

JSON = dict[str, Any]

# (pod view, adapter, autoscaler) -> requests of the adapter in flight on the pod; None when unknown.
InFlightProbe = Callable[[PodView, str, v1.LoRAAutoscaler], bool | None]


class PlacementReconciler:
    kind = v1.PLACEMENT_KIND

    def __init__(self, rt: Runtime, *, in_flight_probe: InFlightProbe | None = None) -> None:
        self.rt = rt
        self.in_flight_probe = in_flight_probe or self._vllm_in_flight

    def reconcile(self, key: str) -> float | None:
        rt = self.rt
        obj = rt.placements.get(key)
        if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp"):
            return None
        p = v1.LoRAPlacement.from_object(obj)
        ns = p.namespace
        auto_obj = rt.autoscalers.get(f"{ns}/{p.spec.autoscaler}")
        if auto_obj is None:
            return None  # garbage collection removes placements with their autoscaler
        try:
            auto = v1.LoRAAutoscaler.from_object(auto_obj)
        except Exception as exc:
            log.warning("autoscaler of %s is unreadable (%s); waiting", key, exc)
            return 30.0
        cfg = lifecycle.Config(max_attempts=auto.spec.vllm.max_load_attempts,
                               drain_timeout=float(auto.spec.scaling.scale_down.drain_timeout_seconds),
                               failed_retry_after=rt.settings.failed_retry_after)
        pod_obj = rt.pods.get(f"{ns}/{p.spec.pod_name}")
        pod = view(pod_obj) if pod_obj is not None else None
        if pod is not None and (pod.uid != p.spec.pod_uid or pod.deleting):
            pod = None
        obs = self._observe(p, pod, auto)
        step = lifecycle.plan(p, obs, cfg, rt.clock())
        return self._execute(obj, p, pod, auto, step=step, cfg=cfg)

    # ---- observations -----------------------------------------------------------------------------------

    def _observe(self, p: v1.LoRAPlacement, pod: PodView | None, auto: v1.LoRAAutoscaler) -> lifecycle.Observation:
        if pod is None:
            return lifecycle.Observation(pod=None)
        sp, st = p.spec, p.status
        listed = False
        in_flight: bool | None = None
        present: bool | None = None
        matches: bool | None = None
        if sp.retire and st.phase == "Draining":
            listed = self._listed(p)
            if not listed and pod.serving:
                in_flight = self.in_flight_probe(pod, sp.adapter, auto)
        elif not sp.retire and st.phase == "Loaded" and pod.serving:
            models = self.rt.models.get(pod.uid)
            generation = p.metadata.get("generation")
            if generation is not None and st.observed_generation != generation:
                models = self._fetch_models(pod, auto) or models  # the spec changed: look now
            loaded_at = parse_time(st.loaded_time)
            if models is not None and loaded_at is not None and models.started > loaded_at + 1.0:
                present = sp.adapter in models.models.adapters
                root = models.models.adapters.get(sp.adapter)
                if present and root:
                    matches = root == lora_path(sp.source)
            elif models is not None and generation is not None and st.observed_generation != generation:
                root = models.models.adapters.get(sp.adapter)
                if root:
                    matches = root == lora_path(sp.source)
        return lifecycle.Observation(pod=pod, listed_in_routes=listed, in_flight=in_flight, adapter_present=present,
                                     source_matches=matches)

    def _listed(self, p: v1.LoRAPlacement) -> bool:
        """Whether a published slice of the adapter still routes to the pod (what the drain waits for)."""
        service = L.route_service_name(p.spec.autoscaler, p.spec.adapter)
        for tier in (L.TIER_PREFERRED, L.TIER_FALLBACK):
            got = self.rt.slices.get(f"{p.namespace}/{L.slice_name(service, tier)}")
            if p.spec.pod_name in routes.listed_pods(got):
                return True
        return False

    def _vllm_in_flight(self, pod: PodView, adapter: str, auto: v1.LoRAAutoscaler) -> bool | None:
        """From the pod's ``vllm:lora_requests_info``: is the adapter still running or waiting there?"""
        client = self._client(auto)
        try:
            text = client.metrics(f"{pod.ip}:{auto.spec.vllm.port}")
            sample = parse_vllm_metrics(text, self.rt.clock(), max_age=float(auto.spec.scaling.metric.max_age_seconds))
        except (OSError, ValueError, MetricsFormatError, Exception) as exc:  # unknown: wait for the timeout
            log.debug("in-flight probe of %s on %s failed: %s", adapter, pod.name, exc)
            return None
        if sample.lists_age is None:
            return False  # no LoRA request was ever seen, or the lists are stale: nothing runs
        return adapter in sample.running_adapters or adapter in sample.waiting_adapters

    def _fetch_models(self, pod: PodView, auto: v1.LoRAAutoscaler) -> ModelsObservation | None:
        started = time.time()
        try:
            models = self._client(auto).models(f"{pod.ip}:{auto.spec.vllm.port}")
        except Exception as exc:
            log.debug("/v1/models of %s failed: %s", pod.name, exc)
            return None
        obs = ModelsObservation(started, models)
        self.rt.models.put(pod.uid, obs)
        return obs

    def _client(self, auto: v1.LoRAAutoscaler) -> VLLMClient:
        vllm = auto.spec.vllm
        key = None
        if vllm.api_key_secret_ref is not None:
            key = self.rt.read_secret(auto.namespace, vllm.api_key_secret_ref.name, vllm.api_key_secret_ref.key)
        return self.rt.vllm.get(vllm.scheme, key, float(vllm.load_timeout_seconds))

    # ---- actions ----------------------------------------------------------------------------------------

    def _execute(self, obj: JSON, p: v1.LoRAPlacement, pod: PodView | None, auto: v1.LoRAAutoscaler, *,
                 step: lifecycle.Step, cfg: lifecycle.Config) -> float | None:
        rt = self.rt
        if step.action is Action.DELETE:
            self._delete(obj, p, step.event)
            return None
        if step.status is not None:
            written = self._write_status(obj, step.status)
            if written is None:
                return None
            obj, p = written, v1.LoRAPlacement.from_object(written)
        if step.event is not None:
            self._event(obj, auto, step.event)
        if step.action in (Action.LOAD, Action.LOAD_INPLACE):
            assert pod is not None
            in_place = step.action is Action.LOAD_INPLACE
            result = self._load(p, pod, auto, in_place)
            after = lifecycle.after_load(p, pod, result, cfg, rt.clock(), in_place=in_place)
            return self._finish(obj, p, auto, after)
        if step.action is Action.UNLOAD:
            assert pod is not None
            result = self._unload(p, pod, auto)
            after = lifecycle.after_unload(p, result, cfg, rt.clock())
            return self._finish(obj, p, auto, after)
        return step.requeue_after

    def _finish(self, obj: JSON, p: v1.LoRAPlacement, auto: v1.LoRAAutoscaler, step: lifecycle.Step) -> float | None:
        if step.action is Action.DELETE:
            self._delete(obj, p, step.event)
            return None
        if step.status is not None:
            written = self._write_status(obj, step.status)
            if written is None:
                return None
            obj = written
        if step.event is not None:
            self._event(obj, auto, step.event)
        return step.requeue_after

    def _load(self, p: v1.LoRAPlacement, pod: PodView, auto: v1.LoRAAutoscaler, in_place: bool) -> CallResult:
        client = self._client(auto)
        started = time.monotonic()
        result = client.load(f"{pod.ip}:{auto.spec.vllm.port}", pod.name, p.spec.adapter, p.spec.source,
                             in_place=in_place)
        metrics.LOAD_SECONDS.labels(result.outcome.value).observe(time.monotonic() - started)
        if result.outcome is not Outcome.OK:
            metrics.LOAD_FAILURES.labels(result.reason or "LoadFailed").inc()
        elif p.status.phase == "Loading" and p.status.loaded_time:
            metrics.ADAPTERS_LOST.inc()
        log.info("load %s on %s: %s (%s)", p.spec.adapter, pod.name, result.outcome.value, result.message)
        return result

    def _unload(self, p: v1.LoRAPlacement, pod: PodView, auto: v1.LoRAAutoscaler) -> CallResult:
        result = self._client(auto).unload(f"{pod.ip}:{auto.spec.vllm.port}", pod.name, p.spec.adapter)
        metrics.UNLOADS.labels(result.outcome.value).inc()
        log.info("unload %s from %s: %s (%s)", p.spec.adapter, pod.name, result.outcome.value, result.message)
        return result

    # ---- writes -----------------------------------------------------------------------------------------

    def _write_status(self, obj: JSON, status: v1.LoRAPlacementStatus) -> JSON | None:
        meta = obj["metadata"]
        try:
            out: JSON = self.rt.kube.patch_status(LORA_PLACEMENTS, meta["name"], to_dict(status, omit_none=False),
                                                  meta["namespace"])
        except ApiError as exc:
            if exc.not_found:
                return None
            raise
        metrics.WRITES.labels("loraplacements", "status").inc()
        self.rt.placements.wrote(out)
        self.rt.enqueue_autoscaler(f"{meta['namespace']}/{(obj.get('spec') or {}).get('autoscaler')}")
        return out

    def _delete(self, obj: JSON, p: v1.LoRAPlacement, event: lifecycle.Event | None) -> None:
        meta = obj["metadata"]
        try:
            self.rt.kube.delete(LORA_PLACEMENTS, meta["name"], meta["namespace"], uid=meta.get("uid"),
                                ignore_not_found=True)
        except ApiError as exc:
            if exc.status != 409:
                raise
        metrics.WRITES.labels("loraplacements", "delete").inc()
        self.rt.placements.deleted(f"{meta['namespace']}/{meta['name']}", obj)
        self.rt.enqueue_autoscaler(f"{meta['namespace']}/{p.spec.autoscaler}")
        if event is not None:
            auto = self.rt.autoscalers.get(f"{meta['namespace']}/{p.spec.autoscaler}")
            if auto is not None:
                self.rt.recorder.event(auto, event.type, event.reason, event.message)

    def _event(self, obj: Mapping[str, Any], auto: v1.LoRAAutoscaler, event: lifecycle.Event) -> None:
        self.rt.recorder.event(obj, event.type, event.reason, event.message)
        if event.type == "Warning":
            auto_obj = self.rt.autoscalers.get(f"{auto.namespace}/{auto.name}")
            if auto_obj is not None:
                self.rt.recorder.event(auto_obj, event.type, event.reason, event.message)


def is_ok(result: CallResult) -> bool:
    return result.outcome is Outcome.OK
