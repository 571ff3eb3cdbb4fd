"""The route table rendered from placements and pods: who is listed, in which tier, and when it is rewritten."""

from __future__ import annotations

import copy

from api import labels as L
from controller.pods import PodView
from controller.routes import (
    MANAGED_BY_VALUE,
    PlacementRoute,
    RouteInput,
    listed_pods,
    render,
    service_differs,
    slice_differs,
)

OWNER = {"apiVersion": "loraautoscaler.io/v1alpha1", "kind": "LoRAAutoscaler", "name": "a", "uid": "u-a",
         "controller": True}


def pod(name: str, ip: str, *, ready: bool = True, uid: str | None = None, node: str | None = "n1") -> PodView:
    return PodView(name=name, uid=uid or f"uid-{name}", ip=ip, ready=ready, restart_count=0,
                   created="2026-01-01T00:00:00Z", node=node)


def inp(placements, pods, *, preferred=False, adapters=("lora-1", "lora-2", "lora-3"), base="tiny"):
    return RouteInput(autoscaler="a", namespace="ns", owner=OWNER, port=8000, adapters=tuple(adapters),
                      preferred_mode=preferred, pods={p.name: p for p in pods}, placements=tuple(placements),
                      base_model=base)


def loaded(adapter, pod_name, *, phase="Loaded", retire=False, preferred=True, uid=None):
    return PlacementRoute(adapter, pod_name, uid or f"uid-{pod_name}", phase, retire, preferred)


def test_a_copy_on_a_pod_that_restarted_since_its_load_is_not_listed():
    """vLLM forgets runtime-loaded adapters on a restart; the placement still says Loaded until reloaded."""
    restarted = PodView(name="p1", uid="uid-p1", ip="10.0.0.2", ready=True, restart_count=1,
                        created="2026-01-01T00:00:00Z", node="n1")
    moved = pod("p2", "10.0.0.9")
    same = pod("p3", "10.0.0.4")
    table = render(inp([
        PlacementRoute("lora-1", "p1", "uid-p1", "Loaded", loaded_ip="10.0.0.2", loaded_restarts=0),
        PlacementRoute("lora-1", "p2", "uid-p2", "Loaded", loaded_ip="10.0.0.3", loaded_restarts=0),
        PlacementRoute("lora-1", "p3", "uid-p3", "Loaded", loaded_ip="10.0.0.4", loaded_restarts=0),
        PlacementRoute("lora-2", "p1", "uid-p1", "Loaded"),  # nothing recorded at load: listed as before
    ], [restarted, moved, same]))
    assert table.routable["lora-1"] == ["p3"]
    assert table.routable["lora-2"] == ["p1"]


def slice_of(table, adapter, tier=L.TIER_PREFERRED):
    return table.slices[L.slice_name(L.route_service_name("a", adapter), tier)]


def test_lists_only_loaded_not_retiring_on_ready_pods_of_the_same_uid():
    pods = [pod("p1", "10.0.0.2"), pod("p2", "10.0.0.3"), pod("p3", "10.0.0.4", ready=False)]
    table = render(inp([
        loaded("lora-1", "p1"),
        loaded("lora-3", "p1"),
        loaded("lora-2", "p2"),
        loaded("lora-1", "p2", phase="Loading"),
        loaded("lora-2", "p1", retire=True),
        loaded("lora-3", "p3"),  # pod not ready
        loaded("lora-3", "p2", uid="old-uid"),  # a previous pod of the same name
    ], pods))
    assert listed_pods(slice_of(table, "lora-1")) == {"p1"}
    assert listed_pods(slice_of(table, "lora-2")) == {"p2"}
    assert listed_pods(slice_of(table, "lora-3")) == {"p1"}
    assert table.routable == {"lora-1": ["p1"], "lora-2": ["p2"], "lora-3": ["p1"]}


def test_slice_shape_follows_the_labels_contract():
    table = render(inp([loaded("lora-1", "p1")], [pod("p1", "10.0.0.2")]))
    s = slice_of(table, "lora-1")
    svc = L.route_service_name("a", "lora-1")
    assert s["apiVersion"] == "discovery.k8s.io/v1" and s["addressType"] == "IPv4"
    labels = s["metadata"]["labels"]
    assert labels[L.SERVICE_NAME_LABEL] == svc
    assert labels[L.MANAGED_BY_LABEL] == MANAGED_BY_VALUE and "/" not in MANAGED_BY_VALUE
    assert labels[L.ADAPTER_LABEL] == "lora-1" and labels[L.AUTOSCALER_LABEL] == "a"
    assert labels[L.ROLE_LABEL] == "adapter" and labels[L.TIER_LABEL] == L.TIER_PREFERRED
    assert s["metadata"]["annotations"] == {L.MODEL_ANNOTATION: "lora-1"}
    assert s["metadata"]["ownerReferences"] == [OWNER]
    (ep,) = s["endpoints"]
    assert ep["addresses"] == ["10.0.0.2"] and ep["conditions"]["ready"] is True
    assert ep["targetRef"] == {"kind": "Pod", "name": "p1", "namespace": "ns", "uid": "uid-p1"}
    assert ep["nodeName"] == "n1"
    assert s["ports"] == [{"name": "http", "port": 8000, "protocol": "TCP"}]
    service = table.services[svc]
    assert "selector" not in service["spec"] and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"][0]["name"] == "http"


def test_strict_mode_has_no_fallback_slice_and_preferred_mode_splits_tiers():
    pods = [pod("p1", "10.0.0.2"), pod("p2", "10.0.0.3")]
    placements = [loaded("lora-1", "p1"), loaded("lora-1", "p2", preferred=False)]
    strict = render(inp(placements, pods))
    assert L.slice_name(L.route_service_name("a", "lora-1"), L.TIER_FALLBACK) not in strict.slices
    assert listed_pods(slice_of(strict, "lora-1")) == {"p1", "p2"}  # strict ignores the preferred flag
    pref = render(inp(placements, pods, preferred=True))
    assert listed_pods(slice_of(pref, "lora-1")) == {"p1"}
    assert listed_pods(slice_of(pref, "lora-1", L.TIER_FALLBACK)) == {"p2"}
    assert pref.routable["lora-1"] == ["p1", "p2"]


def test_base_slice_lists_every_serving_pod_with_the_base_model():
    pods = [pod("p1", "10.0.0.2"), pod("p2", "10.0.0.3"), pod("p3", "10.0.0.4", ready=False)]
    table = render(inp([], pods))
    base = table.slices[L.slice_name(L.base_service_name("a"), L.TIER_BASE)]
    assert listed_pods(base) == {"p1", "p2"}
    assert base["metadata"]["labels"][L.ROLE_LABEL] == "base"
    assert base["metadata"]["annotations"] == {L.BASE_MODEL_ANNOTATION: "tiny"}
    unknown = render(inp([], pods, base=None))
    assert "annotations" not in unknown.slices[L.slice_name(L.base_service_name("a"), L.TIER_BASE)]["metadata"]


def test_an_adapter_named_base_does_not_overwrite_the_base_route():
    table = render(inp([], [pod("p1", "10.0.0.2")], adapters=("base",)))
    svc = L.base_service_name("a")
    assert table.services[svc]["metadata"]["labels"][L.ROLE_LABEL] == "adapter"
    assert table.problems and "base" in table.problems[0]


def test_server_defaults_do_not_cause_a_rewrite_but_content_changes_do():
    pods = [pod("p1", "10.0.0.2"), pod("p2", "10.0.0.3")]
    table = render(inp([loaded("lora-1", "p1"), loaded("lora-1", "p2")], pods))
    want = slice_of(table, "lora-1")
    server = copy.deepcopy(want)
    server["metadata"].update(resourceVersion="7", uid="x", creationTimestamp="2026-01-01T00:00:00Z",
                              generation=1, labels={**want["metadata"]["labels"], "extra": "kept"})
    server["endpoints"] = list(reversed(server["endpoints"]))  # order does not matter
    assert not slice_differs(want, server)
    server["endpoints"] = server["endpoints"][:1]
    assert slice_differs(want, server)
    assert slice_differs(want, None)
    svc_want = table.services[L.route_service_name("a", "lora-1")]
    svc_server = copy.deepcopy(svc_want)
    svc_server["spec"].update(clusterIPs=["None"], sessionAffinity="None", ipFamilies=["IPv4"], type="ClusterIP")
    assert not service_differs(svc_want, svc_server)
    svc_server["spec"]["ports"][0]["port"] = 9000
    assert service_differs(svc_want, svc_server)


def test_rendering_is_deterministic():
    pods = [pod(f"p{i}", f"10.0.0.{i + 2}") for i in range(5)]
    placements = [loaded(f"lora-{1 + i % 3}", f"p{i}") for i in range(5)]
    assert render(inp(placements, pods)) == render(inp(list(reversed(placements)), list(reversed(pods))))


def test_addresses_an_endpointslice_cannot_hold_are_left_out_with_a_problem():
    pods = [pod("p1", "127.0.0.2"), pod("p2", "10.0.0.3"), pod("p3", "169.254.1.1")]
    table = render(inp([loaded("lora-1", "p1"), loaded("lora-1", "p2"), loaded("lora-1", "p3")], pods))
    assert listed_pods(slice_of(table, "lora-1")) == {"p2"}
    assert table.problems and "p1" in table.problems[0] and "p3" in table.problems[0]
