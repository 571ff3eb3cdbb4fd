"""The route table: which pods may serve each model, and in which tier.

The live source is the Kubernetes route table the controller publishes (per adapter a selector-less
Service and EndpointSlices labelled with the adapter, told apart by tier; one more slice set for the base
model). The table is kept per slice, so a slice update replaces exactly what that slice said, and the
per-model view the request path reads is rebuilt only for the models a change touches: a lookup is one
dict access.

The same structure is fed from a static file for local use, or updated directly (``set_route``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from api.labels import (
    ADAPTER_LABEL,
    BASE_MODEL_ANNOTATION,
    MODEL_ANNOTATION,
    ROLE_LABEL,
    TIER_BASE,
    TIER_FALLBACK,
    TIER_LABEL,
    TIER_PREFERRED,
)

ROLE_ADAPTER = "adapter"
ROLE_BASE = "base"
PORT_NAME = "http"


class RouteError(ValueError):
    """A route-table object the router cannot use (the message says which field and why)."""


@dataclass(frozen=True, slots=True)
class Holder:
    """One pod that may serve a model: where to reach it, its name for metrics, and its tier."""

    address: str  # "ip:port" (IPv6 as "[ip]:port")
    pod: str
    tier: str = TIER_PREFERRED


@dataclass(frozen=True, slots=True)
class Route:
    """Everything the request path needs to place one request for ``model``."""

    model: str
    is_base: bool
    preferred: tuple[Holder, ...]
    fallback: tuple[Holder, ...] = ()
    holders: tuple[Holder, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "holders", self.preferred + self.fallback)


@dataclass(frozen=True, slots=True)
class SliceInfo:
    """What one EndpointSlice (or one static entry) says: a model, a tier and its ready holders."""

    key: str
    model: str
    role: str
    tier: str
    holders: tuple[Holder, ...]


def _format_address(ip: str, port: int) -> str:
    try:
        if ipaddress.ip_address(ip).version == 6:
            return f"[{ip}]:{port}"
    except ValueError as exc:
        raise RouteError(f"endpoint address {ip!r} is not an IP address") from exc
    return f"{ip}:{port}"


def _slice_port(ports: Any, key: str) -> int:
    """The slice's port named ``http`` (or its only port): the controller names it so."""
    if not isinstance(ports, list) or not ports:
        raise RouteError(f"EndpointSlice {key} has no ports")
    chosen = None
    for p in ports:
        if isinstance(p, Mapping) and p.get("name") == PORT_NAME:
            chosen = p
            break
    if chosen is None:
        if len(ports) != 1:
            raise RouteError(f"EndpointSlice {key} has {len(ports)} ports and none is named {PORT_NAME!r}")
        chosen = ports[0]
    port = chosen.get("port") if isinstance(chosen, Mapping) else None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise RouteError(f"EndpointSlice {key} port {port!r} is not a port number")
    return port


def slice_key(obj: Mapping[str, Any]) -> str:
    """``namespace/name``: how an EndpointSlice is identified across add, update and delete events."""
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def parse_endpoint_slice(obj: Mapping[str, Any]) -> SliceInfo:
    """Read one route-table EndpointSlice (a plain dict as the API server sends it).

    Endpoints whose ``conditions.ready`` is false are left out (Kubernetes reads an absent ``ready`` as
    ready); so are terminating ones.
    """
    if not isinstance(obj, Mapping):
        raise RouteError(f"EndpointSlice must be an object, got {type(obj).__name__}")
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not meta.get("name"):
        raise RouteError("EndpointSlice has no metadata.name")
    key = slice_key(obj)
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    role = labels.get(ROLE_LABEL, ROLE_ADAPTER)
    if role not in (ROLE_ADAPTER, ROLE_BASE):
        raise RouteError(f"EndpointSlice {key}: label {ROLE_LABEL}={role!r} is neither 'adapter' nor 'base'")
    if role == ROLE_BASE:
        model = annotations.get(BASE_MODEL_ANNOTATION) or annotations.get(MODEL_ANNOTATION)
        tier = TIER_BASE
    else:
        model = annotations.get(MODEL_ANNOTATION) or labels.get(ADAPTER_LABEL)
        tier = labels.get(TIER_LABEL, TIER_PREFERRED)
        if tier not in (TIER_PREFERRED, TIER_FALLBACK):
            raise RouteError(f"EndpointSlice {key}: label {TIER_LABEL}={tier!r} is not preferred or fallback")
    if not isinstance(model, str) or not model:
        raise RouteError(f"EndpointSlice {key} names no model (annotation {MODEL_ANNOTATION} is missing)")
    endpoints = obj.get("endpoints") or []
    if not isinstance(endpoints, list):
        raise RouteError(f"EndpointSlice {key}: endpoints must be a list")
    holders: list[Holder] = []
    port: int | None = None
    for ep in endpoints:
        if not isinstance(ep, Mapping):
            raise RouteError(f"EndpointSlice {key}: an endpoint is not an object")
        conditions = ep.get("conditions") or {}
        if conditions.get("ready") is False or conditions.get("terminating") is True:
            continue
        addresses = ep.get("addresses") or []
        if not isinstance(addresses, list) or not addresses or not isinstance(addresses[0], str):
            raise RouteError(f"EndpointSlice {key}: an endpoint has no addresses")
        if port is None:
            port = _slice_port(obj.get("ports"), key)
        ref = ep.get("targetRef") or ep.get("target_ref") or {}
        address = _format_address(addresses[0], port)
        pod = (ref.get("name") if isinstance(ref, Mapping) else None) or ep.get("hostname") or address
        holders.append(Holder(address=address, pod=str(pod), tier=tier))
    return SliceInfo(key=key, model=model, role=role, tier=tier, holders=tuple(holders))


class RouteTable:
    """model -> holders (preferred and fallback) and the base model's pods; single-threaded (event loop).

    ``synced`` turns true once the source has delivered its first full listing; until then an unknown
    model cannot be told from one not yet seen.
    """

    def __init__(self) -> None:
        self._slices: dict[str, SliceInfo] = {}
        self._by_model: dict[str, set[str]] = {}
        self._routes: dict[str, Route] = {}
        self._listeners: list[Callable[[], None]] = []
        self.synced = False
        self.version = 0

    # --- reads (the request path) -------------------------------------------------------------------------

    def lookup(self, model: str) -> Route | None:
        """The route of ``model``, or None when no slice names it."""
        return self._routes.get(model)

    def models(self) -> list[str]:
        """Every routable model name, sorted (for 404 messages and ``/v1/models``)."""
        return sorted(self._routes)

    def routes(self) -> list[Route]:
        return [self._routes[m] for m in sorted(self._routes)]

    def addresses(self) -> dict[str, str]:
        """Every pod address in the table, with its pod name: what the scraper polls."""
        out: dict[str, str] = {}
        for route in self._routes.values():
            for h in route.holders:
                out[h.address] = h.pod
        return out

    # --- writes -------------------------------------------------------------------------------------------

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` after every change (wakes requests waiting for a holder)."""
        self._listeners.append(fn)

    def apply_slice(self, obj: Mapping[str, Any]) -> None:
        """An EndpointSlice was added or changed."""
        self.put(parse_endpoint_slice(obj))

    def delete_slice(self, obj: Mapping[str, Any]) -> None:
        """An EndpointSlice was deleted."""
        self.remove(slice_key(obj))

    def replace_slices(self, objs: Iterable[Mapping[str, Any]]) -> list[str]:
        """Replace the whole table by a listing; returns the errors of slices that were skipped."""
        infos: list[SliceInfo] = []
        errors: list[str] = []
        for obj in objs:
            try:
                infos.append(parse_endpoint_slice(obj))
            except RouteError as exc:
                errors.append(str(exc))
        self.replace(infos)
        return errors

    def put(self, info: SliceInfo) -> None:
        """Store one slice's view, replacing what the same key said before."""
        old = self._slices.get(info.key)
        self._slices[info.key] = info
        self._by_model.setdefault(info.model, set()).add(info.key)
        touched = {info.model}
        if old is not None and old.model != info.model:
            self._by_model[old.model].discard(info.key)
            touched.add(old.model)
        self._rebuild(touched)

    def remove(self, key: str) -> None:
        old = self._slices.pop(key, None)
        if old is None:
            return
        self._by_model[old.model].discard(key)
        self._rebuild({old.model})

    def replace(self, infos: Iterable[SliceInfo]) -> None:
        self._slices = {}
        self._by_model = {}
        for info in infos:
            self._slices[info.key] = info
            self._by_model.setdefault(info.model, set()).add(info.key)
        self._routes = {}
        self._rebuild(set(self._by_model))

    def set_route(
        self,
        model: str,
        preferred: Sequence[Holder | str] = (),
        fallback: Sequence[Holder | str] = (),
        *,
        base: bool = False,
    ) -> None:
        """Direct update (static routes, tests): ``model`` is served by exactly these holders."""
        infos = []
        if base:
            infos.append(_static_info(model, ROLE_BASE, TIER_BASE, preferred))
        else:
            infos.append(_static_info(model, ROLE_ADAPTER, TIER_PREFERRED, preferred))
            infos.append(_static_info(model, ROLE_ADAPTER, TIER_FALLBACK, fallback))
        for key in list(self._by_model.get(model, ())):
            if key.startswith("static/"):
                self._slices.pop(key, None)
                self._by_model[model].discard(key)
        for info in infos:
            self._slices[info.key] = info
            self._by_model.setdefault(model, set()).add(info.key)
        self._rebuild({model})

    def remove_model(self, model: str) -> None:
        """Forget every slice of ``model`` (it becomes unknown: 404)."""
        for key in self._by_model.pop(model, set()):
            self._slices.pop(key, None)
        self._rebuild({model})

    def mark_synced(self) -> None:
        self.synced = True
        self._notify()

    def _rebuild(self, models: set[str]) -> None:
        for model in models:
            keys = self._by_model.get(model)
            if not keys:
                self._by_model.pop(model, None)
                self._routes.pop(model, None)
                continue
            infos = sorted((self._slices[k] for k in keys), key=lambda i: i.key)
            is_base = any(i.role == ROLE_BASE for i in infos)
            seen: set[str] = set()
            preferred: list[Holder] = []
            fallback: list[Holder] = []
            for tier, bucket in ((TIER_BASE, preferred), (TIER_PREFERRED, preferred), (TIER_FALLBACK, fallback)):
                for info in infos:
                    if info.tier != tier:
                        continue
                    for h in info.holders:
                        if h.address not in seen:
                            seen.add(h.address)
                            bucket.append(h)
            self._routes[model] = Route(
                model=model, is_base=is_base, preferred=tuple(preferred), fallback=tuple(fallback)
            )
        self.version += 1
        self._notify()

    def _notify(self) -> None:
        for fn in self._listeners:
            fn()


def _static_info(model: str, role: str, tier: str, entries: Sequence[Holder | str]) -> SliceInfo:
    holders = []
    for e in entries:
        if isinstance(e, Holder):
            holders.append(Holder(address=e.address, pod=e.pod, tier=tier))
        else:
            holders.append(Holder(address=e, pod=e, tier=tier))
    return SliceInfo(key=f"static/{model}/{tier}", model=model, role=role, tier=tier, holders=tuple(holders))


def _static_holder(entry: Any, where: str) -> Holder:
    if isinstance(entry, str):
        address, pod = entry, entry
    elif isinstance(entry, Mapping) and isinstance(entry.get("address"), str):
        address = entry["address"]
        pod = str(entry.get("pod") or address)
    else:
        raise RouteError(f"{where}: each holder is 'host:port' or {{address: 'host:port', pod: name}}, got {entry!r}")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RouteError(f"{where}: holder address {address!r} is not host:port")
    return Holder(address=address, pod=pod)


def parse_static_routes(doc: Any) -> list[SliceInfo]:
    """Read a static route file's content.

    Two shapes are accepted: the router's own (``{"models": {name: {"preferred": [...], "fallback":
    [...]}, base_name: {"base": true, "pods": [...]}}}``), or EndpointSlices as Kubernetes prints them
    (one slice, or a ``List`` with ``items``), so a dump of a live route table can be replayed.
    """
    if isinstance(doc, Mapping) and doc.get("kind") == "EndpointSlice":
        return [parse_endpoint_slice(doc)]
    if isinstance(doc, Mapping) and isinstance(doc.get("items"), list):
        return [parse_endpoint_slice(item) for item in doc["items"]]
    if not isinstance(doc, Mapping) or not isinstance(doc.get("models"), Mapping):
        raise RouteError("static routes: expected a mapping with 'models' (or EndpointSlices with 'items')")
    infos: list[SliceInfo] = []
    for model, spec in doc["models"].items():
        where = f"static routes: model {model!r}"
        if not isinstance(spec, Mapping):
            raise RouteError(f"{where}: expected a mapping")
        unknown = set(spec) - {"base", "pods", "preferred", "fallback"}
        if unknown:
            raise RouteError(f"{where}: unknown keys {sorted(unknown)}")
        if spec.get("base"):
            pods = [_static_holder(e, where) for e in spec.get("pods") or spec.get("preferred") or []]
            infos.append(_static_info(str(model), ROLE_BASE, TIER_BASE, pods))
            continue
        for tier, key in ((TIER_PREFERRED, "preferred"), (TIER_FALLBACK, "fallback")):
            items = spec.get(key) or (spec.get("pods") if key == "preferred" else None) or []
            if not isinstance(items, list):
                raise RouteError(f"{where}: {key} must be a list")
            infos.append(_static_info(str(model), ROLE_ADAPTER, tier, [_static_holder(e, where) for e in items]))
    return infos


def load_static_routes(path: str | Path) -> list[SliceInfo]:
    """Read a JSON or YAML static route file."""
    raw = Path(path).read_bytes()
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            doc = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise RouteError(f"static routes {path}: neither JSON nor YAML: {exc}") from exc
    return parse_static_routes(doc)
