"""The LoRAAutoscaler reconciler: pods in, placements, route table and status out.

Every sync (``spec.scaling.syncPeriodMilliseconds``) and on every relevant event it resolves the target's
pods through the scale subresource, reads the placements from the cache, runs the scaling policy and the
placement engine (both pure), creates LoRAPlacements for additions, marks removals ``retire`` (the
placement reconciler drains and unloads them), publishes the route table and writes the status. Writes
happen only where the wanted state differs from what the API server holds.

Seams for the autoscaling work: ``LoadProvider`` gives the policy its load snapshot, and
``SaturationHook`` is called with the policy's decision every sync (the hand-over to pod autoscaling).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from api import labels as L
from api import v1alpha1 as v1
from api.schema import to_dict
from api.validation import ROOT_PATH, Problem, format_problems, validate_autoscaler
from common.kube import ENDPOINT_SLICES, LORA_AUTOSCALERS, LORA_PLACEMENTS, SERVICES, ApiError, Resource
from controller import metrics, policy, routes
from controller import placement as engine
from controller import status as st
from controller.pods import PodView, creation_order, labels_of, view
from controller.runtime import BY_AUTOSCALER, Runtime
from controller.selectors import Selector, SelectorError, from_label_selector
from controller.signals import LoadSnapshot
from controller.store import Store, key_of
from controller.target import Target, TargetError, TargetResolver
from controller.timeutil import parse_time

log = logging.getLogger(__name__)

JSON = dict[str, Any]
TARGET_RETRY_SECONDS = 5.0
INVALID_RETRY_SECONDS = 30.0


@dataclass(frozen=True)
class SyncView:
    """What one sync saw: handed to the load provider and the saturation hook."""

    key: str
    autoscaler: v1.LoRAAutoscaler
    target: Target | None
    pods: tuple[PodView, ...]  # serving pods in creation order
    assignment: Mapping[str, frozenset[str]]  # adapter -> pods holding it (pending, loading or loaded)
    routable: Mapping[str, Sequence[str]]  # adapter -> pods in its route table
    port: int


class LoadProvider(Protocol):
    """Gives the policy its load signal for one autoscaler; None means unknown (the policy then holds)."""

    def __call__(self, view: SyncView, now: float) -> LoadSnapshot | None: ...


class SaturationHook(Protocol):
    """Acts on saturation (raise an HPA's minReplicas, scale the target); returns a status note or None."""

    def __call__(self, view: SyncView, decision: policy.PolicyDecision, now: float) -> str | None: ...


def owner_reference(obj: Mapping[str, Any]) -> JSON:
    meta = obj.get("metadata") or {}
    return {"apiVersion": v1.API_VERSION, "kind": v1.AUTOSCALER_KIND, "name": meta.get("name"),
            "uid": meta.get("uid"), "controller": True}


@dataclass
class _Placement:
    obj: JSON
    typed: v1.LoRAPlacement

    @property
    def key(self) -> str:
        return key_of(self.obj)


@dataclass
class _SyncErrors:
    errors: list[str] = field(default_factory=list)

    def add(self, what: str, exc: Exception) -> None:
        self.errors.append(f"{what}: {exc}")


class AutoscalerReconciler:
    kind = v1.AUTOSCALER_KIND

    def __init__(self, rt: Runtime, resolver: TargetResolver, *, load_provider: LoadProvider | None = None,
                 saturation_hook: SaturationHook | None = None) -> None:
        self.rt = rt
        self.resolver = resolver
        self.load_provider = load_provider
        self.saturation_hook = saturation_hook
        self._lock = threading.Lock()
        self._policy: dict[str, policy.PolicyState] = {}
        self._adapters: dict[str, set[str]] = {}  # autoscaler key -> adapters with metric series

    # ---- the sync ---------------------------------------------------------------------------------------

    def reconcile(self, key: str) -> float | None:
        """One sync of autoscaler ``key``; returns when to come back (seconds) or None."""
        rt = self.rt
        obj = rt.autoscalers.get(key)
        if obj is None:
            rt.selectors.forget(key)
            self._forget(key)
            return None
        now = rt.clock()
        ns, name = key.split("/", 1)
        if (obj.get("metadata") or {}).get("deletionTimestamp"):
            self._forget(key)
            return self._finalize(key, obj)
        if not self._ensure_finalizer(obj):
            return 1.0
        try:
            problems = validate_autoscaler(obj)
        except Exception as exc:  # the rules themselves failed: say so rather than crash the worker
            log.exception("validating %s failed", key)
            problems = [Problem(ROOT_PATH, f"validation failed: {exc}")]
        if problems:
            message = format_problems(v1.AUTOSCALER_KIND, name, problems)
            self._write_invalid(obj, message, now)
            return INVALID_RETRY_SECONDS
        auto = v1.LoRAAutoscaler.from_object(obj)
        spec = auto.spec
        sync_period = spec.scaling.sync_period_milliseconds / 1000.0
        problem_list: list[st.Problem] = []

        target: Target | None = None
        selector: Selector | None = None
        ref = spec.scale_target_ref
        try:
            target = self.resolver.resolve(ns, ref.api_version, ref.kind, ref.name)
            extra = from_label_selector(to_dict(spec.pod_selector) if spec.pod_selector else None)
            if not target.selector_text:
                if spec.pod_selector is None:
                    raise TargetError("TargetHasNoSelector", f"{ref.kind} {ref.name}'s scale subresource reports no "
                                      "status.selector; set spec.podSelector to say which pods serve vLLM")
                selector = extra
            else:
                selector = target.selector.and_(extra)
        except TargetError as exc:
            problem_list.append(st.Problem(exc.reason, exc.message))
        except SelectorError as exc:
            problem_list.append(st.Problem("InvalidSpec", f"spec.podSelector: {exc}"))

        if selector is None:  # keep what exists (the target may come back), report, retry
            placements = self._placements(key)
            self._write_status(obj, auto, st.StatusInput(
                generation=auto.metadata.get("generation"),
                adapters=[(a.name, a.min_replicas) for a in spec.adapters], replicas=0,
                placements=[_fact(p) for p in placements], problems=problem_list, previous=auto.status), now)
            return max(sync_period, TARGET_RETRY_SECONDS)
        rt.selectors.set(key, selector)

        selected = [view(p) for p in rt.pods.list(ns) if selector.matches(labels_of(p))]
        by_name = {p.name: p for p in selected}
        serving = tuple(creation_order(p for p in selected if p.serving))
        serving_names = {p.name for p in serving}
        adapter_names = [a.name for a in spec.adapters]
        sources = {a.name: a.source for a in spec.adapters}
        errors = _SyncErrors()

        placements = self._placements(key)
        current: dict[str, set[str]] = {a: set() for a in adapter_names}
        current_preferred: dict[str, set[str]] = {a: set() for a in adapter_names}
        avoid: dict[str, set[str]] = {}
        retire: list[_Placement] = []
        leaving: dict[str, int] = {}
        for p in placements:
            sp = p.typed.spec
            if sp.retire:
                pod = by_name.get(sp.pod_name)
                if pod is not None and pod.uid == sp.pod_uid:
                    leaving[sp.pod_name] = leaving.get(sp.pod_name, 0) + 1  # still in its cache
                continue
            if sp.adapter not in sources:
                retire.append(p)
                continue
            pod = by_name.get(sp.pod_name)
            if pod is None or pod.uid != sp.pod_uid or pod.deleting:
                other = rt.pods.get(f"{ns}/{sp.pod_name}")
                if other is not None and view(other).uid == sp.pod_uid and not view(other).deleting:
                    retire.append(p)  # the pod lives on but is no longer one of the target's pods
                continue  # gone: the placement reconciler deletes the record without calls
            if p.typed.status.phase == "Failed":
                avoid.setdefault(sp.adapter, set()).add(sp.pod_name)
                continue
            if sp.pod_name not in serving_names:
                continue  # not ready now: kept, not counted, so the adapter is placed elsewhere meanwhile
            current[sp.adapter].add(sp.pod_name)
            if sp.preferred:
                current_preferred[sp.adapter].add(sp.pod_name)

        # Strict mode: every copy is a preferred holder, at most --max-loras per pod. Preferred mode: adapters
        # are resident on up to --max-cpu-loras per pod; the policy sizes the preferred holders within that,
        # and the resident copies beyond them are fallback holders the router spills over to
        # (controller.placement.plan_resident). Which of a pod's adapters run at once is the router's choice
        # (it sees each pod's LoRA budget), so the preferred tier is not held to --max-loras per pod: with
        # as many adapters as batch slots, that would leave the policy no room at all.
        preferred_mode = spec.placement_mode == "preferred"
        resident_capacity = max(spec.vllm.max_loras_per_replica,
                                spec.vllm.max_cpu_loras_per_replica or spec.vllm.max_loras_per_replica)
        capacity = resident_capacity if preferred_mode else spec.vllm.max_loras_per_replica
        counted = current_preferred if preferred_mode else current
        routable_now = self._routable(placements, by_name)
        routable_preferred = self._routable(placements, by_name, preferred_only=True)
        snapshot = None
        sync_view = SyncView(key, auto, target, serving, {a: frozenset(s) for a, s in current.items()},
                             routable_now, spec.vllm.port)
        if self.load_provider is not None:
            try:
                snapshot = self.load_provider(sync_view, now)
            except Exception as exc:  # a broken signal must not stop placement
                log.warning("load signal for %s failed: %s", key, exc)
                snapshot = LoadSnapshot(errors=(str(exc),))
        signal_holders = routable_preferred if preferred_mode else routable_now
        loads = {a: (snapshot.per_replica(a, signal_holders.get(a, ())) if snapshot else None) for a in adapter_names}
        if serving and snapshot is not None and snapshot.errors and not snapshot.outstanding:
            detail = "; ".join(snapshot.errors[:2])
            problem_list.append(st.Problem(
                "LoadSignalUnavailable",
                f"the load signal ({spec.scaling.metric.source}) is unavailable, so adapters hold their replicas: "
                f"{detail}"))
        scaling = spec.scaling
        pinput = policy.PolicyInput(
            adapters=tuple(policy.AdapterLoad(a.name, a.min_replicas, a.max_replicas, len(counted[a.name]),
                                              loads.get(a.name), warm=len(current[a.name]))
                           for a in spec.adapters),
            pods=len(serving), capacity=capacity,
            scale_up_threshold=scaling.scale_up.threshold, scale_up_window_seconds=scaling.scale_up.window_seconds,
            load_window_seconds=scaling.scale_up.load_window_seconds,
            scale_down_threshold=scaling.scale_down.threshold,
            scale_down_window_seconds=scaling.scale_down.window_seconds,
            max_loras=spec.vllm.max_loras_per_replica,
        )
        with self._lock:
            state = self._policy.get(key, policy.PolicyState())
        pod_names = tuple(p.name for p in serving)
        avoid_sets = {a: frozenset(s) for a, s in avoid.items()}
        try:
            state, decision = policy.decide(state, pinput, now)
            if preferred_mode:
                hot_first = tuple(a for a, _ in sorted(((a, v) for a, v in loads.items() if v is not None),
                                                       key=lambda item: -item[1]))
                rplan = engine.plan_resident(engine.ResidentInput(
                    pods=pod_names, capacity=capacity, resident_capacity=resident_capacity,
                    adapters=decision.placement_targets(),
                    preferred={a: frozenset(s) for a, s in current_preferred.items()},
                    fallback={a: frozenset(current[a] - current_preferred[a]) for a in adapter_names},
                    avoid=avoid_sets, spare_order=hot_first, max_new_fallback=max(1, len(pod_names)),
                    leaving=leaving))
                assignment, adds, removes = rplan.assignment, rplan.add, rplan.remove
                shortfall_by = dict(rplan.shortfall)
                tiers = {(a, pod): rplan.is_preferred(a, pod) for a, pods in rplan.assignment.items() for pod in pods}
            else:
                plan = engine.plan(engine.PlacementInput(
                    pods=pod_names, capacity=capacity, adapters=decision.placement_targets(),
                    current={a: frozenset(s) for a, s in current.items()}, avoid=avoid_sets, fill_idle_pods=True,
                    since=_placed_since(placements, current)))
                assignment, adds, removes = plan.assignment, plan.add, plan.remove
                shortfall_by = dict(plan.shortfall)
                tiers = {(a, pod): True for a, pods in plan.assignment.items() for pod in pods}
        except (policy.PolicyError, engine.PlacementError) as exc:
            problem_list.append(st.Problem("InvalidSpec", str(exc)))
            self._write_status(obj, auto, st.StatusInput(
                generation=auto.metadata.get("generation"), adapters=[(a.name, a.min_replicas) for a in spec.adapters],
                replicas=len(serving), placements=[_fact(p) for p in placements], problems=problem_list,
                previous=auto.status), now)
            return INVALID_RETRY_SECONDS
        with self._lock:
            self._policy[key] = state
        self._scale_events(obj, ns, name, decision, loads)

        # ---- act on the plan ----
        existing = {(p.typed.spec.adapter, p.typed.spec.pod_name): p for p in placements}
        for adapter, pod_name in adds:
            self._add(obj, auto, existing.get((adapter, pod_name)), adapter=adapter, pod=by_name[pod_name],
                      errors=errors, preferred=tiers.get((adapter, pod_name), True))
        held_back = keep_routable(removes, routable_now, assignment)
        for adapter, pod_name in removes:
            gone = existing.get((adapter, pod_name))
            if gone is not None and not gone.typed.spec.retire and (adapter, pod_name) not in held_back:
                self._retire(gone, f"{adapter} leaves pod {pod_name}", errors)
        for p in retire:
            self._retire(p, f"{p.typed.spec.adapter} leaves pod {p.typed.spec.pod_name}", errors)
        for p in placements:
            sp = p.typed.spec
            if not sp.retire and sp.adapter in sources and sp.source != sources[sp.adapter]:
                self._patch_placement(p, {"spec": {"source": sources[sp.adapter]}}, errors)

        placements = self._placements(key)
        for p in placements:
            sp = p.typed.spec
            want = tiers.get((sp.adapter, sp.pod_name))
            if not sp.retire and want is not None and want != sp.preferred:
                self._patch_placement(p, {"spec": {"preferred": want}}, errors)

        placements = self._placements(key)
        table = routes.render(routes.RouteInput(
            autoscaler=name, namespace=ns, owner=owner_reference(obj), port=spec.vllm.port,
            adapters=tuple(adapter_names), preferred_mode=spec.placement_mode == "preferred",
            pods=by_name, placements=tuple(_route(p) for p in placements), base_model=rt.models.base(key)))
        self._publish(key, ns, table, errors)
        problem_list += [st.Problem("RouteTableConflict", m) for m in table.problems]

        note = None
        if self.saturation_hook is not None:
            try:
                note = self.saturation_hook(sync_view, decision, now)
            except Exception as exc:
                log.warning("pod autoscaling hand-over for %s failed: %s", key, exc)
                problem_list.append(st.Problem("PodAutoscalingFailed", f"pod autoscaling hand-over: {exc}"))
        shortfall = sum(shortfall_by.values())
        saturated = decision.saturated or shortfall > 0
        reason_text = decision.reason or (f"{shortfall} adapter cop(ies) could not be placed: "
                                          + ", ".join(f"{a} ({n})" for a, n in sorted(shortfall_by.items()))
                                          if shortfall else "")
        saturation = st.Saturation(
            saturated=saturated, needed_replicas=decision.needed_pods,
            reason="NoFreeSlots" if saturated else "RoomAvailable",
            message=(reason_text + (f"; {note}" if note else "")) if saturated else
            "replicas have room for the adapters", recommendation=decision.recommendation)
        metrics.NEEDED_REPLICAS.labels(ns, name).set(decision.needed_pods)
        metrics.SATURATED.labels(ns, name).set(1 if saturated else 0)
        if errors.errors:
            problem_list.append(st.Problem("ApiErrors", "; ".join(errors.errors[:3])))
        desired = {d.name: d.desired for d in decision.adapters}
        self._write_status(obj, auto, st.StatusInput(
            generation=auto.metadata.get("generation"), adapters=[(a.name, a.min_replicas) for a in spec.adapters],
            replicas=len(serving), placements=[_fact(p) for p in placements], desired=desired,
            routable=table.routable, loads=loads, problems=problem_list, saturation=saturation,
            previous=auto.status), now)
        if errors.errors:
            return min(sync_period, 2.0)
        return sync_period

    def _scale_events(self, obj: JSON, ns: str, name: str, decision: policy.PolicyDecision,
                      loads: Mapping[str, float | None]) -> None:
        """An Event and a counter for every change of an adapter's desired replicas; gauges of the signal."""
        for e in decision.events:
            up = e.to_replicas > e.from_replicas
            metrics.SCALE_EVENTS.labels(ns, name, "up" if up else "down").inc()
            self.rt.recorder.event(obj, "Normal", "ScaledUp" if up else "ScaledDown",
                                   f"{e.adapter}: {e.from_replicas} -> {e.to_replicas} replicas ({e.reason})")
        for d in decision.adapters:
            metrics.ADAPTER_DESIRED.labels(ns, name, d.name).set(d.desired)
            load = loads.get(d.name)
            if load is not None:
                metrics.ADAPTER_LOAD.labels(ns, name, d.name).set(load)
        with self._lock:
            gone = self._adapters.get(f"{ns}/{name}", set()) - {d.name for d in decision.adapters}
            self._adapters[f"{ns}/{name}"] = {d.name for d in decision.adapters}
        if gone:
            metrics.forget_adapters(ns, name, sorted(gone))

    def _forget(self, key: str) -> None:
        """The autoscaler is gone or going: drop its policy memory, signal source, hand-over memory, series."""
        with self._lock:
            self._policy.pop(key, None)
            adapters = sorted(self._adapters.pop(key, set()))
        for part in (self.load_provider, self.saturation_hook):
            forget = getattr(part, "forget", None)
            if callable(forget):
                forget(key)
        ns, name = key.split("/", 1)
        metrics.forget_autoscaler(ns, name, adapters)

    # ---- deletion: unload everything, then let the object go ---------------------------------------------

    def _ensure_finalizer(self, obj: JSON) -> bool:
        """Add the finalizer that lets a deleted autoscaler unload its adapters first; False: retry soon."""
        meta = obj["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if L.FINALIZER in finalizers:
            return True
        patch = {"metadata": {"finalizers": [*finalizers, L.FINALIZER],
                              "resourceVersion": meta.get("resourceVersion")}}
        try:
            out = self.rt.kube.patch(LORA_AUTOSCALERS, meta["name"], patch, meta["namespace"])
        except ApiError as exc:
            if exc.status == 409 or exc.not_found:
                return False  # changed meanwhile: the cache brings the new version
            raise
        metrics.WRITES.labels("loraautoscalers", "finalizer").inc()
        self.rt.autoscalers.wrote(out)
        return True

    def _finalize(self, key: str, obj: JSON) -> float | None:
        """Retire every placement (drain, unload), keep the route table truthful meanwhile, then release."""
        meta = obj["metadata"]
        if L.FINALIZER not in (meta.get("finalizers") or []):
            return None
        ns, name = meta["namespace"], meta["name"]
        errors = _SyncErrors()
        placements = self._placements(key)
        for p in placements:
            if not p.typed.spec.retire:
                self._retire(p, f"{p.typed.spec.adapter} leaves pod {p.typed.spec.pod_name}: the autoscaler is "
                             "being deleted", errors)
        placements = self._placements(key)
        if placements:
            try:
                auto = v1.LoRAAutoscaler.from_object(obj)
                port, adapters = auto.spec.vllm.port, tuple(a.name for a in auto.spec.adapters)
                preferred = auto.spec.placement_mode == "preferred"
            except Exception:
                port, adapters, preferred = 8000, tuple(sorted({p.typed.spec.adapter for p in placements})), False
            pods = {v.name: v for v in (view(o) for o in self.rt.pods.list(ns))}
            table = routes.render(routes.RouteInput(
                autoscaler=name, namespace=ns, owner=owner_reference(obj), port=port, adapters=adapters,
                preferred_mode=preferred, pods=pods, placements=tuple(_route(p) for p in placements),
                base_model=self.rt.models.base(key)))
            self._publish(key, ns, table, errors)
            return 1.0
        finalizers = [f for f in meta.get("finalizers") or [] if f != L.FINALIZER]
        try:
            self.rt.kube.patch(LORA_AUTOSCALERS, name, {"metadata": {
                "finalizers": finalizers or None, "resourceVersion": meta.get("resourceVersion")}}, ns)
        except ApiError as exc:
            if exc.not_found:
                return None
            if exc.status == 409:
                return 0.5
            raise
        metrics.WRITES.labels("loraautoscalers", "finalizer").inc()
        self.rt.recorder.event(obj, "Normal", "Released", "every adapter unloaded; the autoscaler can go")
        return None

    # ---- reads ------------------------------------------------------------------------------------------

    def _placements(self, key: str) -> list[_Placement]:
        out = []
        for o in self.rt.placements.by_index(BY_AUTOSCALER, key):
            try:
                out.append(_Placement(o, v1.LoRAPlacement.from_object(o)))
            except Exception as exc:  # a hand-written object the schema let through: skip it, say so
                log.warning("skipping unreadable LoRAPlacement %s: %s", key_of(o), exc)
        return sorted(out, key=lambda p: p.key)

    @staticmethod
    def _routable(placements: Sequence[_Placement], pods: Mapping[str, PodView], *,
                  preferred_only: bool = False) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for p in placements:
            sp = p.typed.spec
            pod = pods.get(sp.pod_name)
            if preferred_only and not sp.preferred:
                continue
            if p.typed.status.phase == "Loaded" and not sp.retire and pod is not None and pod.serving \
                    and pod.uid == sp.pod_uid:
                out.setdefault(sp.adapter, []).append(sp.pod_name)
        return out

    # ---- placement writes -------------------------------------------------------------------------------

    def _add(self, obj: JSON, auto: v1.LoRAAutoscaler, existing: _Placement | None, *, adapter: str, pod: PodView,
             errors: _SyncErrors, preferred: bool = True) -> None:
        rt = self.rt
        ns = auto.namespace
        name = L.placement_name(auto.name, adapter, pod.name)
        if existing is not None:
            if existing.typed.spec.retire and existing.typed.spec.pod_uid == pod.uid:
                self._patch_placement(existing, {"spec": {"retire": False}}, errors)  # wanted again: keep it
                return
            if existing.typed.spec.pod_uid != pod.uid:  # a record of the previous pod of this name
                self._delete_placement(existing, errors)
                return
            return
        source = next(a.source for a in auto.spec.adapters if a.name == adapter)
        body = {
            "apiVersion": v1.API_VERSION, "kind": v1.PLACEMENT_KIND,
            "metadata": {
                "name": name, "namespace": ns,
                "labels": {L.AUTOSCALER_LABEL: auto.name, L.ADAPTER_LABEL: adapter, L.POD_LABEL: pod.name},
                "ownerReferences": [
                    owner_reference(obj),
                    {"apiVersion": "v1", "kind": "Pod", "name": pod.name, "uid": pod.uid},
                ],
            },
            "spec": {"autoscaler": auto.name, "adapter": adapter, "source": source, "podName": pod.name,
                     "podUid": pod.uid, "preferred": preferred, "retire": False},
        }
        log.info("%s/%s: placing %s on %s (%s holder)", ns, auto.name, adapter, pod.name,
                 "preferred" if preferred else "fallback")
        try:
            created = rt.kube.create(LORA_PLACEMENTS, body, ns)
        except ApiError as exc:
            if exc.already_exists:
                rt.enqueue_autoscaler(f"{ns}/{auto.name}")  # the cache will show it shortly
                return
            errors.add(f"create LoRAPlacement {name}", exc)
            return
        metrics.WRITES.labels("loraplacements", "create").inc()
        rt.placements.wrote(created)
        rt.recorder.event(obj, "Normal", "Placed", f"{adapter} placed on pod {pod.name}"
                          + ("" if preferred else " (fallback holder)"))

    def _retire(self, p: _Placement, why: str, errors: _SyncErrors) -> None:
        if self._patch_placement(p, {"spec": {"retire": True}}, errors):
            log.info("%s/%s: retiring: %s", p.typed.namespace, p.typed.spec.autoscaler, why)
            auto = self.rt.autoscalers.get(f"{p.typed.namespace}/{p.typed.spec.autoscaler}")
            if auto is not None:
                self.rt.recorder.event(auto, "Normal", "Retiring", why + " (drain, then unload)")

    def _patch_placement(self, p: _Placement, patch: JSON, errors: _SyncErrors) -> bool:
        try:
            out = self.rt.kube.patch(LORA_PLACEMENTS, p.typed.name, patch, p.typed.namespace)
        except ApiError as exc:
            if not exc.not_found:
                errors.add(f"patch LoRAPlacement {p.typed.name}", exc)
            return False
        metrics.WRITES.labels("loraplacements", "patch").inc()
        self.rt.placements.wrote(out)
        self.rt.enqueue_placement(p.key)
        return True

    def _delete_placement(self, p: _Placement, errors: _SyncErrors) -> None:
        try:
            self.rt.kube.delete(LORA_PLACEMENTS, p.typed.name, p.typed.namespace,
                                uid=p.obj["metadata"].get("uid"), ignore_not_found=True)
        except ApiError as exc:
            if exc.status != 409:  # precondition failed: already another object
                errors.add(f"delete LoRAPlacement {p.typed.name}", exc)
            return
        metrics.WRITES.labels("loraplacements", "delete").inc()
        self.rt.placements.deleted(p.key, p.obj)

    # ---- route table ------------------------------------------------------------------------------------

    def _publish(self, key: str, ns: str, table: routes.RouteTable, errors: _SyncErrors) -> None:
        rt = self.rt
        self._sync_kind(key, ns, store=rt.services, resource=SERVICES, desired=table.services,
                        differs=routes.service_differs, errors=errors)
        self._sync_kind(key, ns, store=rt.slices, resource=ENDPOINT_SLICES, desired=table.slices,
                        differs=routes.slice_differs, errors=errors)

    def _sync_kind(self, key: str, ns: str, *, store: Store, resource: Resource, desired: Mapping[str, JSON],
                   differs: Any, errors: _SyncErrors) -> None:
        rt = self.rt
        owned = {key_of(o): o for o in store.by_index(BY_AUTOSCALER, key)}
        for name, want in desired.items():
            k = f"{ns}/{name}"
            actual = owned.pop(k, None) or store.get(k)
            try:
                if actual is None:
                    try:
                        out = rt.kube.create(resource, want, ns)
                        metrics.WRITES.labels(resource.plural, "create").inc()
                    except ApiError as exc:
                        if not exc.already_exists:
                            raise
                        actual = rt.kube.get(resource, name, ns)
                        if (actual.get("metadata") or {}).get("labels", {}).get(L.AUTOSCALER_LABEL) is None:
                            errors.add(f"{resource.kind} {name}", RuntimeError("the name is taken by an object "
                                                                               "this controller does not manage"))
                            continue
                        out = self._update(resource, want, actual, ns)
                    store.wrote(out)
                elif differs(want, actual):
                    if routes.service_needs_recreate(want, actual):
                        rt.kube.delete(resource, name, ns, ignore_not_found=True)
                        out = rt.kube.create(resource, want, ns)
                        metrics.WRITES.labels(resource.plural, "recreate").inc()
                    else:
                        out = self._update(resource, want, actual, ns)
                    store.wrote(out)
            except ApiError as exc:
                errors.add(f"{resource.kind} {name}", exc)
        for k, leftover in owned.items():  # adapters that left the spec, a tier no longer used
            try:
                rt.kube.delete(resource, leftover["metadata"]["name"], ns, ignore_not_found=True)
                metrics.WRITES.labels(resource.plural, "delete").inc()
                store.deleted(k, leftover)
            except ApiError as exc:
                errors.add(f"delete {resource.kind} {k}", exc)

    def _update(self, resource: Resource, want: JSON, actual: JSON, ns: str) -> JSON:
        meta = want["metadata"]
        stale = {k: None for k in ((actual.get("metadata") or {}).get("annotations") or {})
                 if k in (L.BASE_MODEL_ANNOTATION, L.MODEL_ANNOTATION) and k not in (meta.get("annotations") or {})}
        annotations = {**stale, **(meta.get("annotations") or {})}
        patch: JSON = {"metadata": {"labels": meta["labels"], "annotations": annotations,
                                    "ownerReferences": meta["ownerReferences"]}}
        if resource is ENDPOINT_SLICES:
            patch["endpoints"] = want["endpoints"]
            patch["ports"] = want["ports"]
        else:
            patch["spec"] = {"ports": want["spec"]["ports"]}
            if (actual.get("spec") or {}).get("selector"):
                patch["spec"]["selector"] = None
        out: JSON = self.rt.kube.patch(resource, meta["name"], patch, ns)
        metrics.WRITES.labels(resource.plural, "patch").inc()
        return out

    # ---- status -----------------------------------------------------------------------------------------

    def _write_status(self, obj: JSON, auto: v1.LoRAAutoscaler, inp: st.StatusInput, now: float) -> None:
        new = st.compute(inp, now)
        if new == auto.status:
            return
        self._put_status(obj, to_dict(new, omit_none=False))
        self._events_for_conditions(obj, auto.status, new)

    def _write_invalid(self, obj: JSON, message: str, now: float) -> None:
        previous = None
        try:
            previous = v1.LoRAAutoscaler.from_object(obj).status
        except Exception:
            previous = None
        new = st.compute(st.StatusInput(generation=(obj.get("metadata") or {}).get("generation"), adapters=[],
                                        replicas=0, problems=[st.Problem("InvalidSpec", message)],
                                        previous=previous), now)
        if previous is not None and new == previous:
            return
        self._put_status(obj, to_dict(new, omit_none=False))
        self.rt.recorder.event(obj, "Warning", "InvalidSpec", message)

    def _put_status(self, obj: JSON, status: JSON) -> None:
        meta = obj["metadata"]
        try:
            out = self.rt.kube.patch_status(LORA_AUTOSCALERS, meta["name"], status, meta["namespace"])
        except ApiError as exc:
            if exc.not_found:
                return
            raise
        metrics.WRITES.labels("loraautoscalers", "status").inc()
        self.rt.autoscalers.wrote(out)

    def _events_for_conditions(self, obj: JSON, old: v1.LoRAAutoscalerStatus, new: v1.LoRAAutoscalerStatus) -> None:
        before = {c.type: c for c in old.conditions}
        for c in new.conditions:
            prev = before.get(c.type)
            if prev is not None and prev.status == c.status and prev.reason == c.reason:
                continue
            if c.type == st.DEGRADED and c.status == "True":
                self.rt.recorder.event(obj, "Warning", c.reason, c.message)
            elif c.type == st.READY and c.status == "True" and (prev is None or prev.status != "True"):
                self.rt.recorder.event(obj, "Normal", "Ready", c.message)
            elif c.type == st.SATURATED and c.status == "True":
                self.rt.recorder.event(obj, "Warning", "Saturated", c.message)


def preferred_holders(assignment: Mapping[str, frozenset[str]], desired: Mapping[str, int],
                      preferred_now: set[tuple[str, str]], pod_order: Mapping[str, int],
                      preferred_mode: bool) -> dict[tuple[str, str], bool]:
    """(adapter, pod) -> preferred holder or fallback; pure.

    In strict mode every holder is preferred. In preferred mode the first ``desired`` holders of an adapter
    are preferred (those already preferred first, so the tiers are sticky, then pod order) and the copies
    beyond (resident for spill-over) are fallback.
    """
    out: dict[tuple[str, str], bool] = {}
    for adapter, pods in assignment.items():
        ranked = sorted(pods, key=lambda pod: ((adapter, pod) not in preferred_now, pod_order.get(pod, 1 << 30), pod))
        keep = max(1, desired.get(adapter, 1))
        for i, pod in enumerate(ranked):
            out[(adapter, pod)] = (not preferred_mode) or i < keep
    return out


def keep_routable(removes: Sequence[tuple[str, str]], routable: Mapping[str, Sequence[str]],
                  assignment: Mapping[str, frozenset[str]]) -> set[tuple[str, str]]:
    """Removals to hold back this sync so that no adapter is left without a routable replica; pure.

    A plan may move an adapter's only copy to another pod (to make room); retiring the old copy at once
    would take the adapter out of the route table until the new one has loaded. So a removal waits while
    the adapter would have no routable copy left and a new copy is still on its way; it proceeds on the
    sync after the new copy is Loaded. Adapters that left the spec are not held back.
    """
    by_adapter: dict[str, set[str]] = {}
    for adapter, pod in removes:
        by_adapter.setdefault(adapter, set()).add(pod)
    held: set[tuple[str, str]] = set()
    for adapter, pods in by_adapter.items():
        if adapter not in assignment:
            continue
        now_routable = set(routable.get(adapter, ()))
        if now_routable and not (now_routable - pods):
            keep = sorted(now_routable & pods)[:1]  # one routable copy is enough to bridge the gap
            held.update((adapter, pod) for pod in keep)
    return held


def _placed_since(placements: Sequence[_Placement], current: Mapping[str, set[str]]) -> dict[str, dict[str, float]]:
    """Adapter -> pod -> when the copy was created, for the copies placement counts (so it knows which copy
    came first and which ones scale-ups added)."""
    out: dict[str, dict[str, float]] = {}
    for p in placements:
        sp = p.typed.spec
        if sp.retire or sp.pod_name not in current.get(sp.adapter, ()):
            continue
        created = parse_time(p.typed.metadata.get("creationTimestamp"))
        if created is not None:
            out.setdefault(sp.adapter, {})[sp.pod_name] = created
    return out


def _fact(p: _Placement) -> st.PlacementFact:
    t = p.typed
    return st.PlacementFact(t.spec.adapter, t.spec.pod_name, t.status.phase, t.spec.retire, t.status.permanent,
                            t.status.last_error)


def _route(p: _Placement) -> routes.PlacementRoute:
    t = p.typed
    return routes.PlacementRoute(t.spec.adapter, t.spec.pod_name, t.spec.pod_uid, t.status.phase, t.spec.retire,
                                 t.spec.preferred, loaded_ip=t.status.pod_ip,
                                 loaded_restarts=t.status.pod_restart_count)
