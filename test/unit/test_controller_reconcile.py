"""The autoscaler reconciler's wiring without a cluster: fake API and caches, the real policy and placement.

The integration tests run the same against a real API server; this one runs in milliseconds and checks
the exact writes of a first sync and that a second sync over the same state writes nothing.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

from api import labels as L
from common.kube import ApiError, Resource
from controller.autoscaler_reconciler import AutoscalerReconciler
from controller.pods import slim_pod
from controller.runtime import (
    BY_AUTOSCALER,
    LogRecorder,
    ModelsCache,
    Runtime,
    SelectorCache,
    Settings,
    VLLMClients,
    owned_route_index,
    placement_autoscaler_index,
)
from controller.store import Store, key_of
from controller.target import TargetResolver

NS = "ns"
DEPLOYMENT = Resource("apps", "v1", "deployments", True, "Deployment")


class Cache:
    def __init__(self, index=None):
        self.items: dict[str, dict[str, Any]] = {}
        self.index = index
        self.resource_version = ""

    def get(self, key):
        return self.items.get(key)

    def list(self, namespace=None):
        return [o for k, o in self.items.items() if namespace is None or k.startswith(namespace + "/")]

    def by_index(self, name, value):
        return [o for o in self.items.values() if self.index and value in self.index(o)]


class FakeKube:
    """Applies writes to the caches at once (as a fast informer would) and records them."""

    def __init__(self, caches):
        self.caches = caches  # plural -> Cache
        self.writes: list[tuple[str, str, str]] = []
        self.rv = itertools.count(100)

    def resource_for(self, api_version, kind):
        return DEPLOYMENT

    def get_scale(self, resource, name, namespace=None):
        if name != "llm":
            raise ApiError(404, "NotFound", "not found")
        return {"spec": {"replicas": 2}, "status": {"replicas": 2, "selector": "app=llm"}}

    def _store(self, resource, obj):
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(next(self.rv))
        meta.setdefault("uid", f"uid-{meta['name']}")
        self.caches[resource.plural].items[key_of(obj)] = obj
        return obj

    def create(self, resource, body, namespace=None):
        key = f"{namespace}/{body['metadata']['name']}"
        if key in self.caches[resource.plural].items:
            raise ApiError(409, "AlreadyExists", "exists")
        self.writes.append(("create", resource.plural, body["metadata"]["name"]))
        return self._store(resource, {**body, "metadata": {**body["metadata"], "namespace": namespace}})

    def patch(self, resource, name, patch, namespace=None):
        obj = copy.deepcopy(self.caches[resource.plural].items[f"{namespace}/{name}"])
        _merge(obj, patch)
        self.writes.append(("patch", resource.plural, name))
        return self._store(resource, obj)

    def patch_status(self, resource, name, status, namespace=None):
        obj = copy.deepcopy(self.caches[resource.plural].items[f"{namespace}/{name}"])
        obj["status"] = status
        self.writes.append(("status", resource.plural, name))
        return self._store(resource, obj)

    def delete(self, resource, name, namespace=None, **kwargs):
        self.writes.append(("delete", resource.plural, name))
        self.caches[resource.plural].items.pop(f"{namespace}/{name}", None)


def _merge(target, patch):
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


def pod(name, ip, created):
    return slim_pod({"metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "labels": {"app": "llm"},
                                  "creationTimestamp": created, "resourceVersion": "1"},
                     "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}})


def setup(target="llm"):
    caches = {"loraautoscalers": Cache(), "loraplacements": Cache(placement_autoscaler_index),
              "pods": Cache(), "endpointslices": Cache(owned_route_index), "services": Cache(owned_route_index)}
    kube = FakeKube(caches)
    caches["pods"].items = {f"{NS}/p-b": pod("p-b", "10.0.0.3", "2026-01-01T00:00:01Z"),
                            f"{NS}/p-a": pod("p-a", "10.0.0.2", "2026-01-01T00:00:02Z")}
    caches["loraautoscalers"].items[f"{NS}/a"] = {
        "apiVersion": "loraautoscaler.io/v1alpha1", "kind": "LoRAAutoscaler",
        "metadata": {"name": "a", "namespace": NS, "uid": "uid-a", "generation": 1, "resourceVersion": "5"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
                 "placementMode": "strict",  # the even dispatch these tests check, without fallback copies
                 "adapters": [{"name": f"lora-{i}", "source": f"/adapters/lora-{i}"} for i in (1, 2, 3)]},
    }
    stores = {name: Store(c, indexes={BY_AUTOSCALER: c.index} if c.index else None) for name, c in caches.items()}
    rt = Runtime(kube=kube, autoscalers=stores["loraautoscalers"], placements=stores["loraplacements"],
                 pods=stores["pods"], slices=stores["endpointslices"], services=stores["services"],
                 recorder=LogRecorder(), vllm=VLLMClients(), models=ModelsCache(), selectors=SelectorCache(),
                 settings=Settings(), read_secret=lambda ns, name, key: None, clock=lambda: 1_800_000_000.0)
    return AutoscalerReconciler(rt, TargetResolver(kube)), kube, caches


def test_first_sync_places_evenly_in_creation_order_and_a_second_sync_writes_nothing():
    rec, kube, caches = setup()
    assert rec.reconcile(f"{NS}/a") == 1.0
    placed = {(o["spec"]["adapter"], o["spec"]["podName"]) for o in caches["loraplacements"].items.values()}
    # p-b was created first: it is replica 1 and gets lora-1 and lora-3
    assert placed == {("lora-1", "p-b"), ("lora-2", "p-a"), ("lora-3", "p-b")}
    p = caches["loraplacements"].items[f"{NS}/{L.placement_name('a', 'lora-1', 'p-b')}"]
    owners = {(o["kind"], o.get("controller", False)) for o in p["metadata"]["ownerReferences"]}
    assert owners == {("LoRAAutoscaler", True), ("Pod", False)}
    assert p["metadata"]["labels"][L.POD_LABEL] == "p-b" and p["spec"]["podUid"] == "uid-p-b"
    auto = caches["loraautoscalers"].items[f"{NS}/a"]
    assert L.FINALIZER in auto["metadata"]["finalizers"]
    assert auto["status"]["replicas"] == 2 and auto["status"]["adapterCount"] == 3
    ready = next(c for c in auto["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"  # nothing is Loaded yet
    assert len(caches["services"].items) == 4 and len(caches["endpointslices"].items) == 4  # 3 adapters + base
    before = len(kube.writes)
    rec.reconcile(f"{NS}/a")
    assert kube.writes[before:] == []


def test_loaded_placements_are_routed_and_removed_adapters_retired():
    rec, kube, caches = setup()
    rec.reconcile(f"{NS}/a")
    for o in caches["loraplacements"].items.values():
        on = caches["pods"].items[f"{NS}/{o['spec']['podName']}"]
        o["status"] = {"phase": "Loaded", "podIp": on["status"]["podIP"], "podRestartCount": 0}
    rec.reconcile(f"{NS}/a")
    slices = caches["endpointslices"].items
    lora1 = slices[f"{NS}/{L.slice_name(L.route_service_name('a', 'lora-1'), L.TIER_PREFERRED)}"]
    assert [ep["targetRef"]["name"] for ep in lora1["endpoints"]] == ["p-b"]
    auto = caches["loraautoscalers"].items[f"{NS}/a"]
    assert next(c for c in auto["status"]["conditions"] if c["type"] == "Ready")["status"] == "True"
    auto["spec"]["adapters"] = auto["spec"]["adapters"][:2]
    auto["metadata"]["generation"] = 2
    rec.reconcile(f"{NS}/a")
    retired = caches["loraplacements"].items[f"{NS}/{L.placement_name('a', 'lora-3', 'p-b')}"]
    assert retired["spec"]["retire"] is True
    assert f"{NS}/{L.slice_name(L.route_service_name('a', 'lora-3'), L.TIER_PREFERRED)}" not in slices
    assert ("delete", "services", L.route_service_name("a", "lora-3")) in kube.writes


def test_a_missing_target_is_degraded_and_nothing_is_placed():
    rec, _, caches = setup(target="nowhere")
    assert rec.reconcile(f"{NS}/a") == 5.0
    assert caches["loraplacements"].items == {}
    auto = caches["loraautoscalers"].items[f"{NS}/a"]
    degraded = next(c for c in auto["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "TargetNotFound"


def test_an_invalid_spec_that_got_past_the_webhook_is_degraded_not_a_crash():
    rec, _, caches = setup()
    auto = caches["loraautoscalers"].items[f"{NS}/a"]
    auto["spec"]["adapters"][0]["minReplicas"] = 0
    auto["spec"]["adapters"][1]["name"] = "Not A DNS Label"
    assert rec.reconcile(f"{NS}/a") == 30.0
    assert caches["loraplacements"].items == {}
    degraded = next(c for c in caches["loraautoscalers"].items[f"{NS}/a"]["status"]["conditions"]
                    if c["type"] == "Degraded")
    assert degraded["reason"] == "InvalidSpec" and "minReplicas" in degraded["message"]

