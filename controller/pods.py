"""What the controller keeps of a Pod, and the questions it asks of one.

The Pod informer runs on every controller replica and may hold 10,000 pods, so ``slim_pod`` keeps only
what placement, the lifecycle and the route table read, in the shape of a Pod (so any code that reads a
Pod reads this one) and with repeated strings interned (label keys and values, phases, node names are
shared by thousands of pods).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Obj = Mapping[str, Any]


def _i(value: Any) -> Any:
    return sys.intern(value) if isinstance(value, str) else value


# Shared, read-only pieces: informer objects are never modified, so pods with the same readiness or the
# same owner hold the very same list instead of a copy each.
_READY = {s: [{"type": "Ready", "status": s}] for s in ("True", "False", "Unknown")}
_OWNERS: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
_OWNERS_MAX = 4096


def _owners(owners: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    key = tuple((o.get("apiVersion"), o.get("kind"), o.get("name"), o.get("uid"), bool(o.get("controller")))
                for o in owners)
    shared = _OWNERS.get(key)
    if shared is None:
        shared = [{"apiVersion": _i(o.get("apiVersion")), "kind": _i(o.get("kind")), "name": _i(o.get("name")),
                   "uid": o.get("uid"), **({"controller": True} if o.get("controller") else {})} for o in owners]
        if len(_OWNERS) >= _OWNERS_MAX:
            _OWNERS.clear()
        _OWNERS[key] = shared
    return shared


_LABELS: dict[frozenset[tuple[str, str]], dict[str, str]] = {}


def _labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Pods of one ReplicaSet carry the same labels: one shared dict for all of them."""
    key = frozenset(labels.items())
    shared = _LABELS.get(key)
    if shared is None:
        shared = {_i(k): _i(v) for k, v in labels.items()}
        if len(_LABELS) >= _OWNERS_MAX:
            _LABELS.clear()
        _LABELS[key] = shared
    return shared


def slim_pod(pod: Obj) -> dict[str, Any]:
    """The informer's transform: keep identity, labels, owners, timestamps, IP, phase, readiness, restarts."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    slim_meta: dict[str, Any] = {
        "name": meta.get("name"),
        "namespace": _i(meta.get("namespace")),
        "uid": meta.get("uid"),
        "resourceVersion": meta.get("resourceVersion"),
        "creationTimestamp": meta.get("creationTimestamp"),
    }
    labels = meta.get("labels")
    if labels:
        slim_meta["labels"] = _labels(labels)
    owners = meta.get("ownerReferences")
    if owners:
        slim_meta["ownerReferences"] = _owners(owners)
    if meta.get("deletionTimestamp"):
        slim_meta["deletionTimestamp"] = meta["deletionTimestamp"]
    ready = "False"
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            ready = cond.get("status") or "False"
    restarts = sum(int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or [])
    slim_status: dict[str, Any] = {
        "phase": _i(status.get("phase")),
        "conditions": _READY.get(ready) or [{"type": "Ready", "status": _i(ready)}],
        "restartCount": restarts,
    }
    if status.get("podIP"):
        slim_status["podIP"] = status["podIP"]
    out: dict[str, Any] = {"metadata": slim_meta, "status": slim_status}
    node = (pod.get("spec") or {}).get("nodeName")
    if node:
        out["spec"] = {"nodeName": _i(node)}
    return out


@dataclass(frozen=True)
class PodView:
    """A pod as the decision code sees it."""

    name: str
    uid: str
    ip: str | None
    ready: bool
    restart_count: int
    created: str
    node: str | None = None
    deleting: bool = False

    @property
    def serving(self) -> bool:
        """Ready, addressed and not going away: the only pods adapters are placed on or routed to."""
        return self.ready and bool(self.ip) and not self.deleting


def view(pod: Obj) -> PodView:
    """The typed view of a (slim or full) Pod object."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    restarts = status.get("restartCount")
    if restarts is None:
        restarts = sum(int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or [])
    return PodView(
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        ip=status.get("podIP") or None,
        ready=ready and status.get("phase") == "Running",
        restart_count=int(restarts),
        created=str(meta.get("creationTimestamp") or ""),
        node=(pod.get("spec") or {}).get("nodeName") or None,
        deleting=bool(meta.get("deletionTimestamp")),
    )


def creation_order(pods: Iterable[PodView]) -> list[PodView]:
    """Oldest first, then by name: the order the proposal's examples number replicas in.

    RFC 3339 timestamps in UTC with a ``Z`` suffix (what the API server writes) sort as strings.
    """
    return sorted(pods, key=lambda p: (p.created, p.name))


def labels_of(pod: Obj) -> Mapping[str, str]:
    return (pod.get("metadata") or {}).get("labels") or {}
