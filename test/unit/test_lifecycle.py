"""The adapter lifecycle on one pod as a pure state machine, driven by a fake vLLM that answers as real vLLM
does (see docs/vllm-behaviour facts: "already loaded" is success, 404 route means runtime updating is off)."""

from __future__ import annotations

from collections import deque

import pytest

from api.schema import camel
from api.v1alpha1 import LoRAPlacement
from controller import lifecycle as lc
from controller.lifecycle import Action, Observation
from controller.pods import PodView
from controller.timeutil import parse_time
from controller.vllm_client import CallResult, Outcome, classify_load, classify_unload

POD = PodView(name="p1", uid="uid-p1", ip="127.0.0.2", ready=True, restart_count=0, created="2026-01-01T00:00:00Z")
CFG = lc.Config(max_attempts=3, drain_timeout=30.0)
T0 = 1_800_000_000.0


def placement(phase: str | None = None, *, retire: bool = False, generation: int = 1, **status) -> LoRAPlacement:
    st = {camel(k): v for k, v in status.items()}
    if phase:
        st["phase"] = phase
    return LoRAPlacement.from_object({
        "metadata": {"name": "a-lora-1-p1", "namespace": "ns", "generation": generation},
        "spec": {"autoscaler": "a", "adapter": "lora-1", "source": "/adapters/lora-1", "podName": "p1",
                 "podUid": "uid-p1", "retire": retire},
        "status": st,
    })


class FakeVLLM:
    """Answers load and unload calls from a script of (status, body), recording the calls made."""

    def __init__(self, loads=(), unloads=()):
        self.loads = deque(loads)
        self.unloads = deque(unloads)
        self.calls: list[str] = []

    def load(self) -> CallResult:
        self.calls.append("load")
        status, body = self.loads.popleft() if self.loads else (200, b"Success: LoRA adapter 'lora-1' added")
        return classify_load(status, body, "p1")

    def unload(self) -> CallResult:
        self.calls.append("unload")
        status, body = self.unloads.popleft() if self.unloads else (200, b"Success")
        return classify_unload(status, body, "p1")


def run(p: LoRAPlacement, obs: Observation, vllm: FakeVLLM, now: float, cfg: lc.Config = CFG):
    """One reconcile as the reconciler performs it: plan, write, act, write. Returns (placement or None, step)."""
    step = lc.plan(p, obs, cfg, now)
    if step.action is Action.DELETE:
        return None, step
    if step.status is not None:
        p = LoRAPlacement(p.metadata, p.spec, step.status)
    if step.action in (Action.LOAD, Action.LOAD_INPLACE):
        assert obs.pod is not None
        step = lc.after_load(p, obs.pod, vllm.load(), cfg, now, in_place=step.action is Action.LOAD_INPLACE)
    elif step.action is Action.UNLOAD:
        step = lc.after_unload(p, vllm.unload(), cfg, now)
        if step.action is Action.DELETE:
            return None, step
    if step.status is not None:
        p = LoRAPlacement(p.metadata, p.spec, step.status)
    return p, step


def test_pending_loads_once_and_records_where():
    vllm = FakeVLLM()
    p, step = run(placement(), Observation(pod=POD), vllm, T0)
    assert vllm.calls == ["load"]
    assert p.status.phase == "Loaded" and p.status.attempts == 1 and p.status.pod_ip == "127.0.0.2"
    assert p.status.pod_restart_count == 0 and p.status.observed_generation == 1
    assert step.event is not None and step.event.reason == "Loaded"
    _, step = run(p, Observation(pod=POD), vllm, T0 + 5)
    assert vllm.calls == ["load"] and step.action is Action.NONE and step.status is None  # steady: no writes


def test_already_loaded_is_success():
    vllm = FakeVLLM(loads=[(400, b'{"error":{"message":"The lora adapter \'lora-1\' has already been loaded.",'
                                b'"type":"InvalidUserInput","code":400}}')])
    p, _ = run(placement(), Observation(pod=POD), vllm, T0)
    assert p.status.phase == "Loaded"


def test_transient_failures_back_off_then_fail_and_are_released_later():
    err = (500, b'{"error":{"message":"Loading lora lora-1 failed: simulated","code":500}}')
    vllm = FakeVLLM(loads=[err, err, err])
    p, step = run(placement(), Observation(pod=POD), vllm, T0)
    assert p.status.phase == "Loading" and p.status.attempts == 1 and "simulated" in p.status.last_error
    assert step.requeue_after == pytest.approx(1.0)
    # before the backoff is over nothing is called
    _, early = run(p, Observation(pod=POD), vllm, T0 + 0.2)
    assert early.action is Action.NONE and vllm.calls == ["load"]
    p, step = run(p, Observation(pod=POD), vllm, T0 + 1.5)
    assert p.status.attempts == 2 and step.requeue_after == pytest.approx(2.0)
    p, step = run(p, Observation(pod=POD), vllm, T0 + 4)
    assert p.status.phase == "Failed" and not p.status.permanent and p.status.attempts == 3
    assert "gave up after 3 attempts" in p.status.last_error
    assert step.event is not None and step.event.type == "Warning"
    # a Failed (not permanent) placement is removed after the retry delay so the pod may be tried again
    _, wait = run(p, Observation(pod=POD), vllm, T0 + 10)
    assert wait.action is Action.NONE
    gone, step = run(p, Observation(pod=POD), vllm, T0 + 4 + CFG.failed_retry_after + 1)
    assert gone is None and step.action is Action.DELETE
    assert vllm.calls == ["load"] * 3


@pytest.mark.parametrize(("status", "body", "reason"), [
    (404, b'{"detail":"Not Found"}', "RuntimeLoRAUpdatingOff"),
    (500, b'{"error":{"message":"LoRA rank 32 is greater than max_lora_rank 8","code":500}}', "LoRARankTooLarge"),
    (400, b'{"error":{"message":"The lora adapter \'tiny\' conflicts with a served base model.","code":400}}',
     "NameClashesWithBaseModel"),
    (404, b'{"error":{"message":"Loading lora x failed: No adapter found for <path>","code":404}}', "SourceNotFound"),
])
def test_permanent_errors_fail_at_once_and_are_never_retried(status, body, reason):
    vllm = FakeVLLM(loads=[(status, body)])
    p, step = run(placement(), Observation(pod=POD), vllm, T0)
    assert p.status.phase == "Failed" and p.status.permanent and p.status.attempts == 1
    assert step.event is not None and step.event.reason == reason and step.event.type == "Warning"
    for later in (T0 + 10, T0 + 100_000):
        _, again = run(p, Observation(pod=POD), vllm, later)
        assert again.action is Action.NONE
    assert vllm.calls == ["load"]


def test_pod_gone_deletes_without_calls_in_every_phase():
    vllm = FakeVLLM()
    for phase in ("Pending", "Loading", "Loaded", "Draining", "Unloading", "Failed"):
        gone, step = run(placement(phase, retire=phase in ("Draining", "Unloading")), Observation(pod=None), vllm, T0)
        assert gone is None and step.action is Action.DELETE
    assert vllm.calls == []


def test_not_ready_pod_waits_without_spending_attempts():
    vllm = FakeVLLM()
    unready = PodView(**{**POD.__dict__, "ready": False})
    p, step = run(placement(), Observation(pod=unready), vllm, T0)
    assert vllm.calls == [] and step.action is Action.NONE and p.status.attempts == 0


def test_restart_or_new_ip_reloads_and_reports_adapter_lost():
    vllm = FakeVLLM()
    p, _ = run(placement(), Observation(pod=POD), vllm, T0)
    restarted = PodView(**{**POD.__dict__, "restart_count": 1})
    step = lc.plan(p, Observation(pod=restarted), CFG, T0 + 10)
    assert step.action is Action.LOAD and step.status is not None and step.status.phase == "Loading"
    assert step.event is not None and step.event.reason == "AdapterLost"
    p, _ = run(p, Observation(pod=restarted), vllm, T0 + 10)
    assert p.status.phase == "Loaded" and p.status.pod_restart_count == 1
    moved = PodView(**{**restarted.__dict__, "ip": "127.0.0.9"})
    p, _ = run(p, Observation(pod=moved), vllm, T0 + 20)
    assert p.status.pod_ip == "127.0.0.9" and vllm.calls == ["load"] * 3


def test_adapter_missing_from_models_is_loaded_again_and_changed_source_in_place():
    vllm = FakeVLLM()
    p, _ = run(placement(), Observation(pod=POD), vllm, T0)
    p, _ = run(p, Observation(pod=POD, adapter_present=False), vllm, T0 + 10)
    assert p.status.phase == "Loaded" and vllm.calls == ["load", "load"]
    step = lc.plan(p, Observation(pod=POD, adapter_present=True, source_matches=False), CFG, T0 + 20)
    assert step.action is Action.LOAD_INPLACE and step.status is None  # keeps serving the old weights meanwhile
    err = (500, b'{"error":{"message":"boom","code":500}}')
    vllm.loads.append(err)
    p2, step = run(p, Observation(pod=POD, source_matches=False), vllm, T0 + 20)
    assert p2.status.phase == "Loaded" and p2.status.last_error == "vLLM answered 500: boom"
    assert step.requeue_after is not None


def test_retire_drains_only_after_the_route_table_dropped_the_pod_then_unloads_and_deletes():
    vllm = FakeVLLM()
    p, _ = run(placement(), Observation(pod=POD), vllm, T0)
    p = LoRAPlacement(p.metadata, p.spec.__class__(**{**p.spec.__dict__, "retire": True}), p.status)
    p, step = run(p, Observation(pod=POD, listed_in_routes=True), vllm, T0 + 1)
    assert p.status.phase == "Draining" and parse_time(p.status.drain_start_time) == pytest.approx(T0 + 1, abs=1)
    # still listed: nothing happens, however long
    for t in (T0 + 2, T0 + 100):
        _, step = run(p, Observation(pod=POD, listed_in_routes=True, in_flight=False), vllm, t)
        assert step.action is Action.NONE
    assert vllm.calls == ["load"]
    # dropped from routes but requests in flight: wait (within the drain timeout)
    _, step = run(p, Observation(pod=POD, listed_in_routes=False, in_flight=True), vllm, T0 + 5)
    assert step.action is Action.NONE
    gone, step = run(p, Observation(pod=POD, listed_in_routes=False, in_flight=False), vllm, T0 + 6)
    assert gone is None and vllm.calls == ["load", "unload"]
    assert step.event is not None and step.event.reason == "Unloaded"


def test_drain_timeout_unloads_even_with_requests_in_flight():
    vllm = FakeVLLM()
    p = placement("Draining", retire=True, drain_start_time="2027-01-15T08:00:00Z",
                  loaded_time="2027-01-15T07:00:00Z")
    start = parse_time("2027-01-15T08:00:00Z")
    assert start is not None
    _, step = run(p, Observation(pod=POD, in_flight=True), vllm, start + 29)
    assert step.action is Action.NONE
    gone, _ = run(p, Observation(pod=POD, in_flight=True), vllm, start + 31)
    assert gone is None and vllm.calls == ["unload"]


def test_unknown_unload_name_is_success_and_transient_unload_failures_retry():
    vllm = FakeVLLM(unloads=[(503, b"busy"), (404, b'{"error":{"message":"The lora adapter \'lora-1\' cannot be '
                                                    b'found.","code":404}}')])
    p = placement("Unloading", retire=True)
    p, step = run(p, Observation(pod=POD), vllm, T0)
    assert p is not None and p.status.phase == "Unloading" and step.requeue_after == pytest.approx(1.0)
    gone, _ = run(p, Observation(pod=POD), vllm, T0 + 2)
    assert gone is None and vllm.calls == ["unload", "unload"]


def test_retire_before_any_load_deletes_without_calls():
    vllm = FakeVLLM()
    for p in (placement(), placement("Failed", permanent=True), placement("Loading")):
        retired = LoRAPlacement(p.metadata, p.spec.__class__(**{**p.spec.__dict__, "retire": True}), p.status)
        gone, _ = run(retired, Observation(pod=POD), vllm, T0)
        assert gone is None
    assert vllm.calls == []
    # a Loading placement with a failed attempt may hold the adapter: it is unloaded, without a drain
    p = placement("Loading", retire=True, attempts=1)
    gone, _ = run(p, Observation(pod=POD), vllm, T0)
    assert gone is None and vllm.calls == ["unload"]


def test_withdrawn_retire_serves_again():
    p = placement("Draining", retire=False, drain_start_time="2027-01-15T08:00:00Z")
    step = lc.plan(p, Observation(pod=POD), CFG, T0)
    assert step.status is not None and step.status.phase == "Loaded" and step.status.drain_start_time is None


def test_backoff_doubles_and_is_capped():
    assert [lc.backoff(n, CFG) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert lc.backoff(30, CFG) == CFG.backoff_cap


def test_outcome_of_unreachable_pod_is_transient():
    r = CallResult(Outcome.TRANSIENT, "cannot reach vLLM", None, "PodUnreachable")
    p = placement("Loading")
    step = lc.after_load(p, POD, r, CFG, T0)
    assert step.status is not None and step.status.phase == "Loading" and step.status.attempts == 1
