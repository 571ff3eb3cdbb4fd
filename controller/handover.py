"""The hand-over to pod autoscaling: when every replica is full and adapters still wait, ask for pods.

:class:`PodAutoscalingHandOver` is the reconciler's ``saturation_hook``. Per ``spec.podAutoscaling.mode``:

- ``HPA``: raise the named HorizontalPodAutoscaler's ``minReplicas`` (never above its ``maxReplicas``);
  the HPA controller then scales the target, as it enforces ``minReplicas`` whatever its metrics say. The
  value the HPA had is kept in the annotation ``loraautoscaler.io/original-min-replicas`` on the HPA
  (with ``loraautoscaler.io/raised-min-replicas`` and ``loraautoscaler.io/raised-by``), so that it is
  restored exactly, by this leader or the next, once the adapters have not needed the pods for the
  scale-down window. The target's ``replicas`` are never touched in this mode: that field is the HPA's.
- ``ScaleTarget``: scale the target through its scale subresource up to ``podAutoscaling.maxReplicas``;
  the replicas it had are kept in the annotation ``loraautoscaler.io/original-replicas`` on the
  LoRAAutoscaler and restored the same way.
- ``Off``: report only (the ``Saturated`` condition, ``status.neededReplicas`` and the
  ``lora_autoscaler_needed_replicas`` gauge).

How many pods to hold is :func:`pods_to_hold`: while adapters wait, the serving pods plus the policy's
``needed_pods``; after that, as many as the adapters' current targets need, so the floor comes down only
when the adapters have given their extra replicas back (no saw-tooth of raise, release, raise).
:func:`decide_floor` is the pure rule; the class does the reads and writes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from api import v1alpha1 as v1
from common.kube import HPAS, LORA_AUTOSCALERS, ApiError
from controller import metrics, policy
from controller.runtime import Runtime

log = logging.getLogger(__name__)

ORIGINAL_MIN_ANNOTATION = "loraautoscaler.io/original-min-replicas"
RAISED_MIN_ANNOTATION = "loraautoscaler.io/raised-min-replicas"
RAISED_BY_ANNOTATION = "loraautoscaler.io/raised-by"
ORIGINAL_REPLICAS_ANNOTATION = "loraautoscaler.io/original-replicas"


class HandOverError(Exception):
    """The hand-over cannot act (HPA missing, pointing elsewhere, unreadable); said in ``Degraded``."""


# ---- pure rules ---------------------------------------------------------------------------------------


def pods_for_targets(desired: Iterable[int], capacity: int) -> int:
    """The fewest pods that hold every target: enough slots, and one pod per copy of the largest."""
    wanted = [max(0, d) for d in desired]
    return max(-(-sum(wanted) // max(1, capacity)), max(wanted, default=0))


def pods_to_hold(decision: policy.PolicyDecision, pods: int, capacity: int) -> int:
    """Pods the adapters need now: more while they wait, else what their targets take."""
    required = pods_for_targets((d.desired for d in decision.adapters), capacity)
    if decision.needed_pods > 0:
        return max(required, pods + decision.needed_pods)
    return required


@dataclass(frozen=True)
class FloorDecision:
    """What to do with the floor (an HPA's minReplicas, or the target's replicas)."""

    value: int
    """The floor to have after this sync."""
    release: bool = False
    """Back at the original: drop the record of it."""
    last_high: float | None = None
    """When the adapters last needed at least the current floor (the scale-down window runs from it)."""

    def changed(self, floor: int) -> bool:
        return self.value != floor or self.release


def decide_floor(*, floor: int, original: int | None, hold: int, upper: int, waiting: bool, now: float,
                 last_high: float | None, window: float) -> FloorDecision:
    """One step of the hand-over, pure.

    ``floor`` is the value now, ``original`` the value before the autoscaler raised it (None: not
    raised), ``hold`` the pods the adapters need, ``upper`` the bound (the HPA's maxReplicas,
    podAutoscaling.maxReplicas). Raised at once while adapters wait (never above ``upper``); lowered
    (to ``hold``, never below the original) only after ``hold`` stayed below the floor for ``window``.
    """
    want = min(upper, hold)
    if waiting and want > floor:
        return FloorDecision(want, last_high=now)
    if original is None:
        return FloorDecision(floor)
    if want >= floor:
        return FloorDecision(floor, last_high=now)
    since = now if last_high is None else last_high
    if now - since < window:
        return FloorDecision(floor, last_high=since)
    lowered = max(original, want)
    if lowered <= original:
        return FloorDecision(original, release=True)
    return FloorDecision(lowered, last_high=now)


# ---- the hook -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ask:
    """One sync's question to the hand-over."""

    view: Any
    auto: v1.LoRAAutoscaler
    hold: int
    waiting: bool
    window: float
    now: float
    decision: policy.PolicyDecision


@dataclass
class _Memory:
    last_high: float | None = None
    raised: bool | None = None  # None: not known yet (a new leader reads it once)


class PodAutoscalingHandOver:
    """``saturation_hook``: raise an HPA's minReplicas or scale the target, and give it back later."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._lock = threading.Lock()
        self._memory: dict[str, _Memory] = {}

    def forget(self, key: str) -> None:
        with self._lock:
            self._memory.pop(key, None)

    def _mem(self, key: str) -> _Memory:
        with self._lock:
            return self._memory.setdefault(key, _Memory())

    def __call__(self, view: Any, decision: policy.PolicyDecision, now: float) -> str | None:
        auto: v1.LoRAAutoscaler = view.autoscaler
        spec = auto.spec
        pa = spec.pod_autoscaling
        capacity = spec.vllm.max_loras_per_replica
        if spec.placement_mode == "preferred":  # the policy's slots in preferred mode (see the reconciler)
            capacity = max(capacity, spec.vllm.max_cpu_loras_per_replica or capacity)
        pods = len(view.pods)
        hold = pods_to_hold(decision, pods, capacity)
        waiting = decision.needed_pods > 0
        window = float(spec.scaling.scale_down.window_seconds)
        mem = self._mem(view.key)
        ask = _Ask(view, auto, hold, waiting, window, now, decision)
        if pa.mode == "HPA" and pa.hpa_name:
            return self._hpa(ask, pa.hpa_name, mem)
        if pa.mode == "ScaleTarget" and pa.max_replicas:
            return self._scale_target(ask, pa.max_replicas, mem)
        if waiting:
            return (f"podAutoscaling.mode is Off: {decision.needed_pods} more pod(s) would let the waiting "
                    "adapters scale")
        return None

    # ---- HPA mode ---------------------------------------------------------------------------------------

    def _hpa(self, ask: _Ask, name: str, mem: _Memory) -> str | None:
        view, auto, hold, waiting, window, now, decision = (ask.view, ask.auto, ask.hold, ask.waiting, ask.window,
                                                            ask.now, ask.decision)
        if not waiting and mem.raised is False:
            return None  # nothing raised, nothing wanted: no call
        ns = auto.namespace
        try:
            hpa = self.rt.kube.get(HPAS, name, ns)
        except ApiError as exc:
            if exc.not_found:
                raise HandOverError(f"HorizontalPodAutoscaler {ns}/{name} (podAutoscaling.hpaName) not found") \
                    from None
            raise
        ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
        target = auto.spec.scale_target_ref
        if ref.get("kind") != target.kind or ref.get("name") != target.name:
            raise HandOverError(f"HorizontalPodAutoscaler {name} scales {ref.get('kind')} {ref.get('name')}, not "
                                f"the autoscaler's target {target.kind} {target.name}")
        meta = hpa.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        floor = int((hpa.get("spec") or {}).get("minReplicas") or 1)
        upper = int((hpa.get("spec") or {}).get("maxReplicas") or floor)
        original = _int(annotations.get(ORIGINAL_MIN_ANNOTATION))
        raised_to = _int(annotations.get(RAISED_MIN_ANNOTATION))
        if original is not None and raised_to is not None and raised_to != floor:
            # Someone changed minReplicas since it was raised: theirs is the value to come back to.
            original = floor if floor >= original else original
        step = decide_floor(floor=floor, original=original, hold=hold, upper=upper, waiting=waiting, now=now,
                            last_high=mem.last_high, window=window)
        mem.last_high = step.last_high
        mem.raised = (original is not None and not step.release) or (original is None and step.value > floor)
        obj = self.rt.autoscalers.get(view.key)
        if step.release:
            patch: dict[str, Any] = {
                "metadata": {"annotations": {ORIGINAL_MIN_ANNOTATION: None, RAISED_MIN_ANNOTATION: None,
                                             RAISED_BY_ANNOTATION: None},
                             "resourceVersion": meta.get("resourceVersion")}}
            if raised_to is None or raised_to == floor:
                patch["spec"] = {"minReplicas": step.value}
            self._patch_hpa(name, ns, patch)
            metrics.HANDOVERS.labels("HPA", "release").inc()
            mem.raised = False
            self._event(obj, "HandBack", f"HorizontalPodAutoscaler {name} minReplicas restored from {floor} to "
                        f"{step.value}: the adapters have not needed the extra pods for {window:g}s")
            return None
        if step.value != floor:
            annotations_patch = {RAISED_MIN_ANNOTATION: str(step.value), RAISED_BY_ANNOTATION: auto.name}
            if original is None:
                annotations_patch[ORIGINAL_MIN_ANNOTATION] = str(floor)
            self._patch_hpa(name, ns, {"metadata": {"annotations": annotations_patch,
                                                    "resourceVersion": meta.get("resourceVersion")},
                                       "spec": {"minReplicas": step.value}})
            up = step.value > floor
            metrics.HANDOVERS.labels("HPA", "raise" if up else "lower").inc()
            why = (f"{decision.needed_pods} more pod(s) needed: {decision.reason}" if up else
                   f"the adapters need {hold} pod(s) now")
            self._event(obj, "HandOver" if up else "HandBack",
                        f"HorizontalPodAutoscaler {name} minReplicas {'raised' if up else 'lowered'} from {floor} "
                        f"to {step.value} ({why})")
            floor = step.value
        if waiting and min(upper, hold) < hold:
            return f"HorizontalPodAutoscaler {name} is at its maxReplicas {upper}: raise it, or --max-loras"
        if waiting:
            return f"HorizontalPodAutoscaler {name} minReplicas raised to {floor}; waiting for the new pod(s)"
        return None

    def _patch_hpa(self, name: str, ns: str, patch: dict[str, Any]) -> None:
        try:
            self.rt.kube.patch(HPAS, name, patch, ns)
        except ApiError as exc:
            if exc.conflict:  # changed meanwhile: the next sync reads it again
                log.info("HorizontalPodAutoscaler %s/%s changed meanwhile; trying again next sync", ns, name)
                return
            raise
        metrics.WRITES.labels("horizontalpodautoscalers", "patch").inc()

    # ---- ScaleTarget mode -------------------------------------------------------------------------------

    def _scale_target(self, ask: _Ask, upper: int, mem: _Memory) -> str | None:
        view, auto, hold, waiting, window, now, decision = (ask.view, ask.auto, ask.hold, ask.waiting, ask.window,
                                                            ask.now, ask.decision)
        obj = self.rt.autoscalers.get(view.key) or {}
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        original = _int(annotations.get(ORIGINAL_REPLICAS_ANNOTATION))
        if not waiting and original is None:
            mem.last_high = None
            return None
        target = view.target
        if target is None:
            return None
        ref = auto.spec.scale_target_ref
        ns = auto.namespace
        scale = self.rt.kube.get_scale(target.resource, ref.name, ns)
        floor = int((scale.get("spec") or {}).get("replicas") or 0)
        step = decide_floor(floor=floor, original=original, hold=hold, upper=max(upper, original or 0),
                            waiting=waiting, now=now, last_high=mem.last_high, window=window)
        mem.last_high = step.last_high
        what = f"{ref.kind} {ref.name}"
        if step.value != floor:
            self.rt.kube.set_scale(target.resource, ref.name, step.value, ns)
            metrics.WRITES.labels(target.resource.plural, "scale").inc()
            up = step.value > floor
            metrics.HANDOVERS.labels("ScaleTarget", "raise" if up else ("release" if step.release else "lower")).inc()
            why = (f"{decision.needed_pods} more pod(s) needed: {decision.reason}" if up else
                   f"the adapters have not needed the extra pods for {window:g}s")
            self._event(obj, "HandOver" if up else "HandBack",
                        f"{what} scaled from {floor} to {step.value} replicas ({why})")
        if step.release or (original is None and step.value > floor):
            value = None if step.release else str(floor)
            out = self.rt.kube.patch(LORA_AUTOSCALERS, auto.name,
                                     {"metadata": {"annotations": {ORIGINAL_REPLICAS_ANNOTATION: value}}}, ns)
            metrics.WRITES.labels("loraautoscalers", "annotate").inc()
            self.rt.autoscalers.wrote(out)
        if waiting and hold > upper:
            return f"{what} is at podAutoscaling.maxReplicas {upper}: raise it, or --max-loras"
        if waiting:
            return f"{what} scaled to {max(step.value, floor)} replicas; waiting for the new pod(s)"
        return None

    def _event(self, obj: Any, reason: str, message: str) -> None:
        if obj:
            self.rt.recorder.event(obj, "Normal", reason, message)
        log.info("%s: %s", reason, message)


def _int(value: object) -> int | None:
    try:
        out = int(str(value))
    except (TypeError, ValueError):
        return None
    return out if out >= 0 else None
