"""The route table: per adapter a selector-less Service and EndpointSlices listing the pods that serve it.

Rendering is pure (placements and pods in, objects out) so it can be tested without a cluster, and the
comparison with what the API server holds looks only at the fields the controller owns, so defaults the
API server adds never cause a rewrite: the controller writes a slice only when its content really changed.

Services are headless (``clusterIP: None``): the table is read through its EndpointSlices (by the router,
by gateways, by DNS), and a virtual IP per adapter would spend the cluster's finite service range (a /24
holds 254) on addresses nothing needs.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from api import labels as L
from controller.pods import PodView

SLICE_API_VERSION = "discovery.k8s.io/v1"
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# The value of endpointslice.kubernetes.io/managed-by. A label value may not contain '/', so the domain
# form is used when api.labels.MANAGED_BY is not a valid value.
MANAGED_BY_VALUE = L.MANAGED_BY if _LABEL_VALUE.match(L.MANAGED_BY) and len(L.MANAGED_BY) <= 63 \
    else "controller.loraautoscaler.io"


@dataclass(frozen=True)
class PlacementRoute:
    """What the route table needs of one LoRAPlacement."""

    adapter: str
    pod_name: str
    pod_uid: str
    phase: str
    retire: bool = False
    preferred: bool = True
    loaded_ip: str | None = None  # the pod's IP and restart count when the adapter was loaded
    loaded_restarts: int | None = None

    @property
    def routable(self) -> bool:
        return self.phase == "Loaded" and not self.retire

    def survived(self, pod: PodView) -> bool:
        """False when the pod restarted since the load: vLLM forgot the adapter, whatever the phase says yet.

        The placement reconciler reloads it (the same comparison); until then requests must not go there.
        """
        if self.loaded_restarts is not None and self.loaded_restarts != pod.restart_count:
            return False
        return self.loaded_ip is None or self.loaded_ip == pod.ip


@dataclass(frozen=True)
class RouteInput:
    autoscaler: str
    namespace: str
    owner: Mapping[str, Any]  # the ownerReference to the autoscaler
    port: int
    adapters: tuple[str, ...]
    preferred_mode: bool
    pods: Mapping[str, PodView]  # every pod of the target by name; only serving ones are listed
    placements: tuple[PlacementRoute, ...]
    base_model: str | None = None


@dataclass
class RouteTable:
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    slices: dict[str, dict[str, Any]] = field(default_factory=dict)
    routable: dict[str, list[str]] = field(default_factory=dict)  # adapter -> pod names (both tiers)
    problems: list[str] = field(default_factory=list)


def _meta(name: str, inp: RouteInput, labels: dict[str, str], annotations: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": inp.namespace, "labels": labels,
                            "ownerReferences": [dict(inp.owner)]}
    if annotations:
        meta["annotations"] = annotations
    return meta


def _service(name: str, inp: RouteInput, labels: dict[str, str], annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, inp, labels, annotations),
        "spec": {
            "clusterIP": "None",
            "ports": [{"name": "http", "port": inp.port, "targetPort": inp.port, "protocol": "TCP"}],
        },
    }


def _endpoint(pod: PodView, namespace: str) -> dict[str, Any]:
    ep: dict[str, Any] = {
        "addresses": [pod.ip],
        "conditions": {"ready": True, "serving": True, "terminating": False},
        "targetRef": {"kind": "Pod", "name": pod.name, "namespace": namespace, "uid": pod.uid},
    }
    if pod.node:
        ep["nodeName"] = pod.node
    return ep


def _slice(name: str, service: str, inp: RouteInput, pods: Iterable[PodView], *, labels: dict[str, str],
           annotations: dict[str, str]) -> dict[str, Any]:
    all_labels = {L.SERVICE_NAME_LABEL: service, L.MANAGED_BY_LABEL: MANAGED_BY_VALUE, **labels}
    return {
        "apiVersion": SLICE_API_VERSION,
        "kind": "EndpointSlice",
        "metadata": _meta(name, inp, all_labels, annotations),
        "addressType": "IPv4",
        "endpoints": [_endpoint(p, inp.namespace) for p in sorted(pods, key=lambda p: p.name)],
        "ports": [{"name": "http", "port": inp.port, "protocol": "TCP"}],
    }


def _listable(pod: PodView | None, uid: str) -> bool:
    return pod is not None and pod.serving and pod.uid == uid and ":" not in (pod.ip or "")


def refused_address(ip: str | None) -> bool:
    """Addresses the API server refuses in an EndpointSlice (loopback, link-local): listing one fails the write."""
    if not ip:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return True
    return addr.is_loopback or addr.is_link_local or addr.is_unspecified or addr.is_multicast


def render(inp: RouteInput) -> RouteTable:
    """The Services and EndpointSlices the autoscaler's route table should consist of."""
    table = RouteTable()
    refused = sorted(p.name for p in inp.pods.values() if p.serving and refused_address(p.ip))
    if refused:
        table.problems.append(f"pods with addresses an EndpointSlice cannot hold (loopback or link-local) are left "
                              f"out of the route table: {', '.join(refused[:5])}")
        inp = dataclasses.replace(inp, pods={n: p for n, p in inp.pods.items() if not refused_address(p.ip)})
    holders: dict[str, dict[str, list[PodView]]] = {a: {L.TIER_PREFERRED: [], L.TIER_FALLBACK: []}
                                                    for a in inp.adapters}
    seen: set[tuple[str, str]] = set()
    for p in inp.placements:
        if p.adapter not in holders or not p.routable or (p.adapter, p.pod_name) in seen:
            continue
        pod = inp.pods.get(p.pod_name)
        if pod is None or not _listable(pod, p.pod_uid) or not p.survived(pod):
            continue
        seen.add((p.adapter, p.pod_name))
        tier = L.TIER_PREFERRED if (p.preferred or not inp.preferred_mode) else L.TIER_FALLBACK
        holders[p.adapter][tier].append(pod)
    for adapter in inp.adapters:
        service = L.route_service_name(inp.autoscaler, adapter)
        common = {L.ADAPTER_LABEL: adapter, L.AUTOSCALER_LABEL: inp.autoscaler, L.ROLE_LABEL: "adapter"}
        annotations = {L.MODEL_ANNOTATION: adapter}
        table.services[service] = _service(service, inp, dict(common), annotations)
        tiers = (L.TIER_PREFERRED, L.TIER_FALLBACK) if inp.preferred_mode else (L.TIER_PREFERRED,)
        for tier in tiers:
            name = L.slice_name(service, tier)
            table.slices[name] = _slice(name, service, inp, holders[adapter][tier],
                                        labels={**common, L.TIER_LABEL: tier}, annotations=annotations)
        table.routable[adapter] = sorted(p.name for tier in tiers for p in holders[adapter][tier])
    base = L.base_service_name(inp.autoscaler)
    if base in table.services:
        table.problems.append(f"the base model's Service name {base!r} is taken by an adapter's route table; "
                              "rename that adapter to publish the base route")
    else:
        common = {L.AUTOSCALER_LABEL: inp.autoscaler, L.ROLE_LABEL: "base"}
        annotations = {L.BASE_MODEL_ANNOTATION: inp.base_model} if inp.base_model else {}
        table.services[base] = _service(base, inp, dict(common), annotations)
        ready = [p for p in inp.pods.values() if _listable(p, p.uid)]
        name = L.slice_name(base, L.TIER_BASE)
        table.slices[name] = _slice(name, base, inp, ready, labels={**common, L.TIER_LABEL: L.TIER_BASE},
                                    annotations=annotations)
    return table


# ---- comparison with what the API server holds ---------------------------------------------------------

def _owned_subset(desired: Mapping[str, str] | None, actual: Mapping[str, str] | None) -> bool:
    actual = actual or {}
    return all(actual.get(k) == v for k, v in (desired or {}).items())


def _meta_same(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    dm, am = desired.get("metadata") or {}, actual.get("metadata") or {}
    if not _owned_subset(dm.get("labels"), am.get("labels")):
        return False
    if not _owned_subset(dm.get("annotations"), am.get("annotations")):
        return False
    owners = {(o.get("uid"), bool(o.get("controller"))) for o in am.get("ownerReferences") or []}
    return all((o.get("uid"), bool(o.get("controller"))) in owners for o in dm.get("ownerReferences") or [])


def _stale_annotations(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    """A base-model annotation present on the server but no longer wanted."""
    dm = (desired.get("metadata") or {}).get("annotations") or {}
    am = (actual.get("metadata") or {}).get("annotations") or {}
    return any(k in am and k not in dm for k in (L.BASE_MODEL_ANNOTATION, L.MODEL_ANNOTATION))


def _norm_endpoint(ep: Mapping[str, Any]) -> tuple[Any, ...]:
    cond = ep.get("conditions") or {}
    ref = ep.get("targetRef") or {}
    return (tuple(ep.get("addresses") or ()), cond.get("ready"), cond.get("serving"), cond.get("terminating"),
            ref.get("kind"), ref.get("name"), ref.get("uid"), ep.get("nodeName"))


def _norm_ports(ports: Iterable[Mapping[str, Any]] | None, *, target: bool = False) -> list[tuple[Any, ...]]:
    out = []
    for p in ports or []:
        item: tuple[Any, ...] = (p.get("name"), p.get("port"), p.get("protocol") or "TCP")
        if target:
            item += (p.get("targetPort", p.get("port")),)
        out.append(item)
    return sorted(out, key=repr)


def slice_differs(desired: Mapping[str, Any], actual: Mapping[str, Any] | None) -> bool:
    """True when the server's slice must be rewritten to match ``desired``."""
    if actual is None:
        return True
    if not _meta_same(desired, actual) or _stale_annotations(desired, actual):
        return True
    if desired.get("addressType") != actual.get("addressType"):
        return True
    if _norm_ports(desired.get("ports")) != _norm_ports(actual.get("ports")):
        return True
    return sorted(map(_norm_endpoint, desired.get("endpoints") or [])) != sorted(
        map(_norm_endpoint, actual.get("endpoints") or []))


def service_differs(desired: Mapping[str, Any], actual: Mapping[str, Any] | None) -> bool:
    if actual is None:
        return True
    if not _meta_same(desired, actual) or _stale_annotations(desired, actual):
        return True
    ds, as_ = desired.get("spec") or {}, actual.get("spec") or {}
    if as_.get("selector"):
        return True
    return _norm_ports(ds.get("ports"), target=True) != _norm_ports(as_.get("ports"), target=True)


def service_needs_recreate(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    """``clusterIP`` and ``addressType`` are immutable: a mismatch can only be fixed by delete and create."""
    if actual.get("kind") == "EndpointSlice" or "addressType" in actual:
        return actual.get("addressType") != desired.get("addressType")
    return ((actual.get("spec") or {}).get("clusterIP") or "None") != (desired.get("spec") or {}).get("clusterIP")


def listed_pods(slice_obj: Mapping[str, Any] | None) -> set[str]:
    """The pod names a published slice routes to (what a drain waits on)."""
    if not slice_obj:
        return set()
    return {str((ep.get("targetRef") or {}).get("name")) for ep in slice_obj.get("endpoints") or []
            if (ep.get("targetRef") or {}).get("name")}
