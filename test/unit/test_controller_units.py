"""Pure parts of the controller: status, selectors, the pod transform, the recent-writes store, the audit rule."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from api.v1alpha1 import LoRAPlacement
from controller import selectors
from controller import status as st
from controller.auditor import lost_or_changed
from controller.pods import creation_order, slim_pod, view
from controller.runtime import SelectorCache
from controller.selectors import SelectorError
from controller.store import Store
from controller.timeutil import parse_time, rfc3339
from controller.vllm_client import PodModels

T0 = 1_800_000_000.0
ADAPTERS = [("lora-1", 1), ("lora-2", 1), ("lora-3", 2)]


def facts(*items):
    return [st.PlacementFact(*i) for i in items]


# ---- status --------------------------------------------------------------------------------------------

def test_status_ready_when_every_adapter_is_routable_at_its_minimum():
    inp = st.StatusInput(generation=3, adapters=ADAPTERS, replicas=2,
                         placements=facts(("lora-1", "p1", "Loaded"), ("lora-2", "p2", "Loaded"),
                                          ("lora-3", "p1", "Loaded"), ("lora-3", "p2", "Loaded")),
                         desired={"lora-1": 1, "lora-2": 1, "lora-3": 2},
                         routable={"lora-1": ["p1"], "lora-2": ["p2"], "lora-3": ["p2", "p1"]},
                         loads={"lora-1": 0.5})
    out = st.compute(inp, T0)
    conds = {c.type: c for c in out.conditions}
    assert conds["Ready"].status == "True" and conds["Progressing"].status == "False"
    assert conds["Degraded"].status == "False" and out.observed_generation == 3
    assert out.ready_adapters == 3 and out.adapter_count == 3 and out.replicas == 2
    a3 = next(a for a in out.adapters if a.name == "lora-3")
    assert a3.pods == ["p1", "p2"] and a3.routable_replicas == 2 and a3.loaded_replicas == 2
    assert out.adapters[0].load == 0.5 and out.adapters[1].load is None
    # the same facts later give the same status (no rewrite), transition times included
    again = st.compute(st.StatusInput(**{**inp.__dict__, "previous": out}), T0 + 60)
    assert again == out


def test_status_not_ready_progressing_and_degraded_with_reasons():
    inp = st.StatusInput(generation=1, adapters=ADAPTERS, replicas=1,
                         placements=facts(("lora-1", "p1", "Loading"),
                                          ("lora-2", "p1", "Failed", False, True, "runtime LoRA updating is off"),
                                          ("lora-3", "p1", "Loaded")),
                         routable={"lora-3": ["p1"]})
    out = st.compute(inp, T0)
    conds = {c.type: c for c in out.conditions}
    assert conds["Ready"].status == "False" and conds["Ready"].reason == "InsufficientReplicas"
    assert "lora-1 (0/1)" in conds["Ready"].message and "lora-3 (1/2)" in conds["Ready"].message
    assert conds["Progressing"].status == "True" and conds["Progressing"].reason == "LoadsInProgress"
    assert conds["Degraded"].reason == "LoadFailedPermanently" and "updating is off" in conds["Degraded"].message


def test_status_transition_time_moves_only_when_the_status_flips():
    base = st.StatusInput(generation=1, adapters=[("lora-1", 1)], replicas=1, routable={"lora-1": ["p1"]})
    first = st.compute(base, T0)
    ready_at = next(c for c in first.conditions if c.type == "Ready").last_transition_time
    assert ready_at == rfc3339(T0)
    lost = st.compute(st.StatusInput(**{**base.__dict__, "routable": {}, "previous": first}), T0 + 30)
    assert next(c for c in lost.conditions if c.type == "Ready").last_transition_time == rfc3339(T0 + 30)


def test_invalid_spec_and_missing_target_block_ready_and_saturation_is_reported():
    out = st.compute(st.StatusInput(generation=2, adapters=[("lora-1", 1)], replicas=0,
                                    problems=[st.Problem("TargetNotFound", "Deployment ns/x not found")],
                                    saturation=st.Saturation(True, 2, message="no free slot for lora-1")), T0)
    conds = {c.type: c for c in out.conditions}
    assert conds["Ready"].reason == "TargetNotFound" and conds["Degraded"].reason == "TargetNotFound"
    assert conds["Saturated"].status == "True" and out.saturated and out.needed_replicas == 2


def test_last_scale_time_moves_with_desired_only():
    first = st.compute(st.StatusInput(generation=1, adapters=[("lora-1", 1)], replicas=2, desired={"lora-1": 1}), T0)
    assert first.adapters[0].last_scale_time is None
    same = st.compute(st.StatusInput(generation=1, adapters=[("lora-1", 1)], replicas=2, desired={"lora-1": 1},
                                     previous=first), T0 + 5)
    assert same.adapters[0].last_scale_time is None
    up = st.compute(st.StatusInput(generation=1, adapters=[("lora-1", 1)], replicas=2, desired={"lora-1": 2},
                                   previous=same), T0 + 9)
    assert up.adapters[0].last_scale_time == rfc3339(T0 + 9)


# ---- selectors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "labels", "expected"), [
    ("app=vllm", {"app": "vllm"}, True),
    ("app=vllm", {"app": "other"}, False),
    ("app==vllm,tier!=canary", {"app": "vllm", "tier": "main"}, True),
    ("app==vllm,tier!=canary", {"app": "vllm", "tier": "canary"}, False),
    ("env in (a, b),!legacy", {"env": "b"}, True),
    ("env in (a, b),!legacy", {"env": "b", "legacy": "1"}, False),
    ("env notin (a),role", {"env": "c", "role": "leader"}, True),
    ("env notin (a),role", {"env": "c"}, False),
    ("", {"anything": "x"}, True),
])
def test_selector_strings(text, labels, expected):
    assert selectors.parse(text).matches(labels) is expected


@pytest.mark.parametrize("bad", ["app in a", "app in (a", "=x", "a b"])
def test_bad_selector_strings_are_refused_with_the_text(bad):
    with pytest.raises(SelectorError, match="selector"):
        selectors.parse(bad)


def test_structured_selector_and_narrowing():
    target = selectors.parse("app=vllm")
    narrow = selectors.from_label_selector({"matchLabels": {"role": "leader"},
                                            "matchExpressions": [{"key": "zone", "operator": "In",
                                                                  "values": ["a"]}]})
    both = target.and_(narrow)
    assert both.matches({"app": "vllm", "role": "leader", "zone": "a"})
    assert not both.matches({"app": "vllm", "role": "worker", "zone": "a"})
    assert not selectors.NOTHING.matches({})
    with pytest.raises(SelectorError):
        selectors.from_label_selector({"matchExpressions": [{"key": "k", "operator": "Near"}]})


def test_selector_cache_maps_pod_labels_to_autoscalers_per_namespace():
    cache = SelectorCache()
    cache.set("ns1/a", selectors.parse("app=x"))
    cache.set("ns2/b", selectors.parse("app=x"))
    cache.set("ns1/c", selectors.parse("app=y"))
    assert cache.matching("ns1", {"app": "x"}) == ["ns1/a"]
    cache.forget("ns1/a")
    assert cache.matching("ns1", {"app": "x"}) == []


# ---- pods ----------------------------------------------------------------------------------------------

FULL_POD: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "p1", "namespace": "ns", "uid": "u1", "resourceVersion": "9",
                 "creationTimestamp": "2026-01-01T00:00:02Z", "labels": {"app": "vllm"},
                 "annotations": {"big": "x" * 5000}, "managedFields": [{"manager": "kubectl"}],
                 "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "r",
                                      "controller": True, "blockOwnerDeletion": True}]},
    "spec": {"nodeName": "n1", "containers": [{"name": "vllm", "image": "vllm", "args": ["--x"] * 50}]},
    "status": {"phase": "Running", "podIP": "127.0.0.2",
               "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
               "containerStatuses": [{"name": "vllm", "restartCount": 2, "image": "vllm", "state": {}}]},
}


def test_slim_pod_keeps_what_the_controller_reads_and_drops_the_rest():
    slim = slim_pod(FULL_POD)
    assert view(slim) == view(FULL_POD)
    v = view(slim)
    assert v.serving and v.restart_count == 2 and v.node == "n1" and v.uid == "u1"
    assert "annotations" not in slim["metadata"] and "managedFields" not in slim["metadata"]
    assert "containers" not in slim.get("spec", {})
    assert slim["metadata"]["labels"] == {"app": "vllm"}
    assert sys.getsizeof(str(slim)) < sys.getsizeof(str(FULL_POD)) / 5
    # interned: label strings are shared between pods
    other = slim_pod({**FULL_POD, "metadata": {**FULL_POD["metadata"], "labels": {"app": "vl" + "lm"}}})
    assert other["metadata"]["labels"]["app"] is slim["metadata"]["labels"]["app"]


def test_pod_readiness_and_order():
    not_running = {**FULL_POD, "status": {**FULL_POD["status"], "phase": "Pending"}}
    assert not view(not_running).serving
    deleting = {**FULL_POD, "metadata": {**FULL_POD["metadata"], "deletionTimestamp": "2026-01-01T00:00:09Z"}}
    assert not view(slim_pod(deleting)).serving
    early = {**FULL_POD["metadata"], "creationTimestamp": "2026-01-01T00:00:01Z"}
    a = view({**FULL_POD, "metadata": {**early, "name": "b"}})
    b = view({**FULL_POD, "metadata": {**early, "name": "a"}})
    c = view(FULL_POD)
    assert [p.name for p in creation_order([c, a, b])] == ["a", "b", "p1"]


# ---- the store of recent writes ------------------------------------------------------------------------

class FakeCache:
    def __init__(self):
        self.items = {}
        self.resource_version = ""

    def get(self, key):
        return self.items.get(key)

    def list(self, namespace=None):
        return [o for k, o in self.items.items() if namespace is None or k.startswith(namespace + "/")]

    def by_index(self, name, value):
        return [o for o in self.items.values() if (o.get("spec") or {}).get("autoscaler") == value.split("/")[1]]


def obj(name, rv, uid="u", **spec):
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": str(rv), "uid": uid}, "spec": spec}


def test_store_prefers_own_writes_until_the_cache_catches_up():
    now = [0.0]
    cache = FakeCache()
    store = Store(cache, ttl=10, clock=lambda: now[0],
                  indexes={"autoscaler": lambda o: [f"ns/{o['spec'].get('autoscaler')}"]})
    created = obj("p", 5, autoscaler="a")
    store.wrote(created)
    assert store.get("ns/p") == created and store.by_index("autoscaler", "ns/a") == [created]
    assert store.list("ns") == [created]
    cache.items["ns/p"] = obj("p", 4, autoscaler="a", old=True)  # older than our write
    assert store.get("ns/p") == created
    newer = obj("p", 6, autoscaler="a")
    cache.items["ns/p"] = newer
    assert store.get("ns/p") == newer
    store.deleted("ns/p", newer)
    assert store.get("ns/p") is None and store.list("ns") == [] and store.by_index("autoscaler", "ns/a") == []
    del cache.items["ns/p"]
    assert store.get("ns/p") is None
    store.wrote(obj("q", 9))
    now[0] = 11.0  # expired: the cache is the truth again
    assert store.get("ns/q") is None


def test_store_sees_a_recreated_object_after_own_delete():
    cache = FakeCache()
    store = Store(cache)
    old = obj("p", 5, uid="u1")
    cache.items["ns/p"] = old
    store.deleted("ns/p", old)
    assert store.get("ns/p") is None
    cache.items["ns/p"] = obj("p", 8, uid="u2")
    got = store.get("ns/p")
    assert got is not None and got["metadata"]["uid"] == "u2"


# ---- audit rule ----------------------------------------------------------------------------------------

def test_audit_flags_lost_and_changed_adapters_but_not_loads_that_raced_the_check():
    p = LoRAPlacement.from_object({
        "metadata": {"name": "x", "namespace": "ns"},
        "spec": {"autoscaler": "a", "adapter": "lora-1", "source": "file:///adapters/lora-1", "podName": "p1",
                 "podUid": "u"},
        "status": {"phase": "Loaded", "loadedTime": "2027-01-15T08:00:00Z"},
    })
    loaded = parse_time("2027-01-15T08:00:00Z")
    assert loaded is not None
    have = PodModels("tiny", {"lora-1": "/adapters/lora-1"})
    missing = PodModels("tiny", {})
    assert not lost_or_changed(p, have, loaded + 10)
    assert lost_or_changed(p, missing, loaded + 10)
    assert not lost_or_changed(p, missing, loaded + 0.5)  # the request may have been sent before the load
    assert lost_or_changed(p, PodModels("tiny", {"lora-1": "/adapters/other"}), loaded + 10)


def test_preferred_tiers_are_sticky_and_strict_mode_prefers_all():
    from controller.autoscaler_reconciler import preferred_holders

    order = {"p1": 0, "p2": 1, "p3": 2}
    assignment = {"lora-1": frozenset({"p1", "p2", "p3"}), "lora-2": frozenset({"p2"})}
    first = preferred_holders(assignment, {"lora-1": 1, "lora-2": 1}, set(), order, True)
    assert first == {("lora-1", "p1"): True, ("lora-1", "p2"): False, ("lora-1", "p3"): False,
                     ("lora-2", "p2"): True}
    sticky = preferred_holders(assignment, {"lora-1": 1, "lora-2": 1}, {("lora-1", "p3")}, order, True)
    assert sticky[("lora-1", "p3")] and not sticky[("lora-1", "p1")]
    grown = preferred_holders(assignment, {"lora-1": 2, "lora-2": 1}, {("lora-1", "p3")}, order, True)
    assert [p for p in ("p1", "p2", "p3") if grown[("lora-1", p)]] == ["p1", "p3"]
    assert all(preferred_holders(assignment, {"lora-1": 1}, set(), order, False).values())


def test_orphans_are_only_managed_names_without_a_placement():
    from controller.auditor import orphans

    held = {"lora-1": "/a/1", "lora-2": "/a/2", "someone-elses": "/x"}
    assert orphans(held, {"lora-1", "lora-2", "lora-3"}, {"lora-1"}) == {"lora-2"}
    assert orphans(held, {"lora-1"}, {"lora-1"}) == set()


def test_store_forgets_a_write_once_the_cache_saw_it_and_then_the_deletion():
    cache = FakeCache()
    store = Store(cache)
    store.wrote(obj("p", 10))
    cache.resource_version = "9"
    assert store.get("ns/p") is not None  # the informer is behind our write
    cache.resource_version = "12"  # it saw rv 10 and then a deletion by someone else
    assert store.get("ns/p") is None and store.list("ns") == []
