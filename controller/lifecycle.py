"""The life of one adapter on one pod, as a pure state machine.

``plan`` looks at a LoRAPlacement and what is known about its pod and says what to do next (load,
unload, delete the object, write a status, wait); ``after_load`` and ``after_unload`` turn the answer of a
vLLM call into the next status. No I/O and no clock: the reconciler gathers the observations, passes
``now``, performs the action and writes the status. That keeps every transition testable with plain data.

Phases: Pending -> Loading -> Loaded -> Draining -> Unloading -> (deleted), and Failed. A placement that is
retired before anything was loaded is deleted at once; one whose pod is gone is deleted without calls.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Literal

from api.v1alpha1 import LoRAPlacement, LoRAPlacementStatus
from controller.pods import PodView
from controller.timeutil import parse_time, rfc3339
from controller.vllm_client import CallResult, Outcome


class Action(enum.Enum):
    NONE = "none"  # only write the status (if any) and requeue (if asked)
    LOAD = "load"
    LOAD_INPLACE = "load_inplace"  # the source changed: replace the weights, keep serving the name
    UNLOAD = "unload"
    DELETE = "delete"  # delete the LoRAPlacement object, no call to the pod


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Config:
    """The timing knobs of the lifecycle, from the autoscaler's spec and the controller's settings."""

    max_attempts: int = 5
    drain_timeout: float = 30.0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    failed_retry_after: float = 300.0  # a Failed (not permanent) placement is removed after this, so the
    # adapter may come back to the pod later; permanent failures stay until the pod or the adapter goes
    drain_poll: float = 0.5


@dataclass(frozen=True)
class Observation:
    """What the reconciler knows about the pod and the route table right now."""

    pod: PodView | None  # None: the pod is gone or is another pod with the same name
    listed_in_routes: bool = False  # the published slice of this adapter still routes to the pod
    in_flight: bool | None = None  # requests of this adapter running on the pod; None: unknown
    adapter_present: bool | None = None  # the pod's /v1/models, observed after the load; None: unknown
    source_matches: bool | None = None  # the pod's loaded root is the spec's source; None: unknown


@dataclass(frozen=True)
class Step:
    action: Action
    status: LoRAPlacementStatus | None = None  # write this before the action (None: nothing to write)
    requeue_after: float | None = None
    event: Event | None = None


def backoff(attempts: int, cfg: Config) -> float:
    """1 s, 2 s, 4 s ... capped: the wait after the ``attempts``-th failure."""
    return float(min(cfg.backoff_cap, cfg.backoff_base * (2 ** max(0, attempts - 1))))


def _with(status: LoRAPlacementStatus, generation: int | None, **changes: object) -> LoRAPlacementStatus:
    return dataclasses.replace(status, observed_generation=generation, **changes)  # type: ignore[arg-type]


def plan(p: LoRAPlacement, obs: Observation, cfg: Config, now: float) -> Step:
    """The next step for placement ``p``."""
    st, sp = p.status, p.spec
    gen = p.metadata.get("generation")
    pod = obs.pod
    if pod is None:
        return Step(Action.DELETE, event=None)
    phase = st.phase
    if sp.retire:
        return _plan_retire(p, obs, cfg, now)
    if phase in ("Draining",):  # retire was withdrawn: serve again
        return Step(Action.NONE, _with(st, gen, phase="Loaded", drain_start_time=None), requeue_after=0.0)
    if phase == "Unloading":  # withdrawn mid-unload: load again from scratch
        return Step(Action.NONE, _with(st, gen, phase="Pending", attempts=0, drain_start_time=None),
                    requeue_after=0.0)
    if phase == "Failed":
        if st.permanent:
            return Step(Action.NONE)
        due = parse_time(st.next_attempt_time)
        if due is None or now >= due:
            return Step(Action.DELETE, event=Event("Normal", "RetryAllowed",
                                                   f"{sp.adapter} may be placed on {sp.pod_name} again"))
        return Step(Action.NONE, requeue_after=due - now)
    if not pod.serving:
        return Step(Action.NONE)  # a pod event brings us back when it is ready
    if phase == "Pending":
        return Step(Action.LOAD, _with(st, gen, phase="Loading", attempts=0, last_error=None, permanent=False,
                                       next_attempt_time=None))
    if phase == "Loading":
        due = parse_time(st.next_attempt_time)
        if due is not None and now < due:
            return Step(Action.NONE, requeue_after=due - now)
        return Step(Action.LOAD)
    # Loaded
    if st.pod_restart_count != pod.restart_count or st.pod_ip != pod.ip:
        return Step(Action.LOAD, _with(st, gen, phase="Loading", attempts=0, next_attempt_time=None,
                                       last_error=f"pod {sp.pod_name} restarted; loading the adapter again"),
                    event=Event("Warning", "AdapterLost",
                                f"pod {sp.pod_name} restarted (vLLM forgets runtime-loaded adapters): "
                                f"loading {sp.adapter} again"))
    if obs.adapter_present is False:
        return Step(Action.LOAD, _with(st, gen, phase="Loading", attempts=0, next_attempt_time=None,
                                       last_error=f"{sp.adapter} is no longer listed by the pod's /v1/models"),
                    event=Event("Warning", "AdapterLost",
                                f"{sp.adapter} vanished from pod {sp.pod_name}'s /v1/models: loading it again"))
    if obs.source_matches is False:
        due = parse_time(st.next_attempt_time)
        if due is not None and now < due:
            return Step(Action.NONE, requeue_after=due - now)
        return Step(Action.LOAD_INPLACE)
    if gen is not None and st.observed_generation != gen:
        return Step(Action.NONE, _with(st, gen))
    return Step(Action.NONE)


def _plan_retire(p: LoRAPlacement, obs: Observation, cfg: Config, now: float) -> Step:
    st = p.status
    gen = p.metadata.get("generation")
    phase = st.phase
    if phase in ("Pending", "Failed") or (phase == "Loading" and st.attempts == 0):
        return Step(Action.DELETE)  # nothing was (surely) loaded: nothing to drain or unload
    if phase == "Loading":  # a failed or timed-out attempt may have loaded it after all
        return Step(Action.UNLOAD, _with(st, gen, phase="Unloading", attempts=0, next_attempt_time=None))
    if phase == "Loaded":
        return Step(Action.NONE, _with(st, gen, phase="Draining", drain_start_time=rfc3339(now)),
                    requeue_after=cfg.drain_poll)
    if phase == "Draining":
        if obs.listed_in_routes:
            return Step(Action.NONE, requeue_after=cfg.drain_poll)  # the route table has not dropped it yet
        started = parse_time(st.drain_start_time) or now
        remaining = started + cfg.drain_timeout - now
        if obs.in_flight is False or remaining <= 0 or obs.pod is None or not obs.pod.serving:
            return Step(Action.UNLOAD, _with(st, gen, phase="Unloading", attempts=0, next_attempt_time=None,
                                             last_error=None))
        return Step(Action.NONE, requeue_after=min(cfg.drain_poll * 2, remaining))
    # Unloading
    due = parse_time(st.next_attempt_time)
    if due is not None and now < due:
        return Step(Action.NONE, requeue_after=due - now)
    return Step(Action.UNLOAD)


def after_load(p: LoRAPlacement, pod: PodView, result: CallResult, cfg: Config, now: float, *,
               in_place: bool = False) -> Step:
    """The status after a load call answered ``result``."""
    st, sp = p.status, p.spec
    gen = p.metadata.get("generation")
    attempts = st.attempts + 1
    if result.outcome is Outcome.OK:
        reloaded = st.loaded_time is not None
        status = _with(st, gen, phase="Loaded", attempts=attempts, last_error=None, permanent=False,
                       next_attempt_time=None, loaded_time=rfc3339(now), pod_ip=pod.ip,
                       pod_restart_count=pod.restart_count)
        verb = "reloaded in place" if in_place else ("loaded again" if reloaded else "loaded")
        return Step(Action.NONE, status, event=Event("Normal", "Loaded", f"{sp.adapter} {verb} on pod {sp.pod_name}"))
    if in_place:  # the old weights keep serving; try again later
        status = _with(st, gen, last_error=result.message, next_attempt_time=rfc3339(now + backoff(attempts, cfg)))
        return Step(Action.NONE, status, requeue_after=backoff(attempts, cfg),
                    event=Event("Warning", result.reason or "LoadFailed", result.message))
    if result.outcome is Outcome.PERMANENT:
        status = _with(st, gen, phase="Failed", attempts=attempts, last_error=result.message, permanent=True,
                       next_attempt_time=None)
        return Step(Action.NONE, status, event=Event("Warning", result.reason or "LoadFailed", result.message))
    if attempts >= cfg.max_attempts:
        status = _with(st, gen, phase="Failed", attempts=attempts, permanent=False,
                       last_error=f"gave up after {attempts} attempts: {result.message}",
                       next_attempt_time=rfc3339(now + cfg.failed_retry_after))
        return Step(Action.NONE, status, requeue_after=cfg.failed_retry_after,
                    event=Event("Warning", "LoadFailed",
                                f"{sp.adapter} on pod {sp.pod_name}: gave up after {attempts} attempts "
                                f"({result.message}); placing it on another pod"))
    wait = backoff(attempts, cfg)
    status = _with(st, gen, phase="Loading", attempts=attempts, last_error=result.message, permanent=False,
                   next_attempt_time=rfc3339(now + wait))
    return Step(Action.NONE, status, requeue_after=wait,
                event=Event("Warning", "LoadFailed",
                            f"{sp.adapter} on pod {sp.pod_name}, attempt {attempts}/{cfg.max_attempts}: "
                            f"{result.message}"))


def after_unload(p: LoRAPlacement, result: CallResult, cfg: Config, now: float) -> Step:
    """Delete the object once unloaded; a transient failure is retried, a hopeless one gives up loudly."""
    st, sp = p.status, p.spec
    gen = p.metadata.get("generation")
    if result.outcome is Outcome.OK:
        return Step(Action.DELETE, event=Event("Normal", "Unloaded", f"{sp.adapter} unloaded from pod {sp.pod_name}"))
    attempts = st.attempts + 1
    if result.outcome is Outcome.PERMANENT or attempts >= cfg.max_attempts:
        return Step(Action.DELETE, event=Event("Warning", result.reason or "UnloadFailed",
                                               f"{sp.adapter} on pod {sp.pod_name}: giving up the unload after "
                                               f"{attempts} attempts: {result.message}"))
    wait = backoff(attempts, cfg)
    return Step(Action.NONE, _with(st, gen, attempts=attempts, last_error=result.message,
                                   next_attempt_time=rfc3339(now + wait)), requeue_after=wait,
                event=Event("Warning", result.reason or "UnloadFailed", result.message))
