"""Autoscaling wiring without a cluster: the autoscaler reconciler with a fake API, fed by fake load sources
through the real SpecLoadProvider, the real policy and placement, and the real hand-over against a fake HPA.

The integration tests (test/integration/test_autoscaling.py) run the same against a real API server, the
real HPA controller, the router and simulators.
"""

from __future__ import annotations

import builtins
import copy
import http.server
import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from api import labels as L
from common.kube import ApiError, Resource
from controller import policy
from controller.autoscaler_reconciler import AutoscalerReconciler, keep_routable
from controller.handover import (
    ORIGINAL_MIN_ANNOTATION,
    ORIGINAL_REPLICAS_ANNOTATION,
    RAISED_MIN_ANNOTATION,
    HandOverError,
    PodAutoscalingHandOver,
    decide_floor,
    pods_for_targets,
)
from controller.load import RouterInFlightProbe, SourceConfig, SpecLoadProvider, build_source
from controller.pods import slim_pod, view
from controller.runtime import (
    BY_AUTOSCALER,
    ModelsCache,
    Runtime,
    SelectorCache,
    Settings,
    VLLMClients,
    owned_route_index,
    placement_autoscaler_index,
)
from controller.signals import (
    CombinedSource,
    LoadSnapshot,
    PodTarget,
    PrometheusSource,
    RouterSource,
    VLLMScrapeSource,
    WaitingLoraAdaptersSource,
    parse_router_load,
    router_in_flight,
)
from controller.store import Store, key_of
from controller.target import TargetResolver

NS = "ns"
DEPLOYMENT = Resource("apps", "v1", "deployments", True, "Deployment")
T0 = 1_800_000_000.0


# --- a fake API server and caches ------------------------------------------------------------------------


class Cache:
    def __init__(self, index: Any = None) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.index = index
        self.resource_version = ""

    def get(self, key: str) -> dict[str, Any] | None:
        return self.items.get(key)

    def list(self, namespace: str | None = None) -> builtins.list[dict[str, Any]]:
        return [o for k, o in self.items.items() if namespace is None or k.startswith(namespace + "/")]

    def by_index(self, name: str, value: str) -> builtins.list[dict[str, Any]]:
        return [o for o in self.items.values() if self.index and value in self.index(o)]


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


class FakeKube:
    """Applies writes to the caches at once (as a fast informer would) and records them."""

    def __init__(self, caches: dict[str, Cache]) -> None:
        self.caches = caches
        self.writes: list[tuple[str, str, str]] = []
        self.rv = itertools.count(100)
        self.replicas = 2

    def resource_for(self, api_version: str, kind: str) -> Resource:
        return DEPLOYMENT

    def get_scale(self, resource: Resource, name: str, namespace: str | None = None) -> dict[str, Any]:
        if name != "llm":
            raise ApiError(404, "NotFound", "not found")
        return {"spec": {"replicas": self.replicas}, "status": {"replicas": self.replicas, "selector": "app=llm"}}

    def set_scale(self, resource: Resource, name: str, replicas: int, namespace: str | None = None) -> dict[str, Any]:
        self.writes.append(("scale", resource.plural, name))
        self.replicas = replicas
        return self.get_scale(resource, name, namespace)

    def _store(self, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(next(self.rv))
        meta.setdefault("uid", f"uid-{meta['name']}")
        self.caches[plural].items[key_of(obj)] = obj
        return obj

    def get(self, resource: Resource, name: str, namespace: str | None = None) -> dict[str, Any]:
        obj = self.caches[resource.plural].items.get(f"{namespace}/{name}")
        if obj is None:
            raise ApiError(404, "NotFound", f"{resource.plural} {name} not found")
        return copy.deepcopy(obj)

    def create(self, resource: Resource, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        if f"{namespace}/{body['metadata']['name']}" in self.caches[resource.plural].items:
            raise ApiError(409, "AlreadyExists", "exists")
        self.writes.append(("create", resource.plural, body["metadata"]["name"]))
        return self._store(resource.plural, {**body, "metadata": {**body["metadata"], "namespace": namespace}})

    def patch(self, resource: Resource, name: str, patch: dict[str, Any], namespace: str | None = None,
              **kwargs: Any) -> dict[str, Any]:
        obj = copy.deepcopy(self.caches[resource.plural].items[f"{namespace}/{name}"])
        patch = copy.deepcopy(patch)
        rv = (patch.get("metadata") or {}).pop("resourceVersion", None)
        if rv is not None and rv != obj["metadata"].get("resourceVersion"):
            raise ApiError(409, "Conflict", "the object has been modified")
        _merge(obj, patch)
        self.writes.append(("patch", resource.plural, name))
        return self._store(resource.plural, obj)

    def patch_status(self, resource: Resource, name: str, status: dict[str, Any],
                     namespace: str | None = None) -> dict[str, Any]:
        obj = copy.deepcopy(self.caches[resource.plural].items[f"{namespace}/{name}"])
        obj["status"] = status
        self.writes.append(("status", resource.plural, name))
        return self._store(resource.plural, obj)

    def delete(self, resource: Resource, name: str, namespace: str | None = None, **kwargs: Any) -> None:
        self.writes.append(("delete", resource.plural, name))
        self.caches[resource.plural].items.pop(f"{namespace}/{name}", None)


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, str, str]] = []

    def event(self, obj: Any, type: str, reason: str, message: str) -> None:
        self.items.append((type, reason, message))

    def reasons(self) -> list[str]:
        return [r for _, r, _ in self.items]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class FixedSource:
    """A load source whose answer the test sets: adapter -> total outstanding requests."""

    name = "fake"

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.errors: tuple[str, ...] = ()
        self.calls = 0
        self.delay = 0.0

    def collect(self, targets: list[PodTarget], now: float) -> LoadSnapshot:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.errors:
            return LoadSnapshot(source=self.name, errors=self.errors)
        first = targets[0].name if targets else "p"
        return LoadSnapshot({a: {first: v} for a, v in self.totals.items()}, {}, self.name)


def pod(name: str, ip: str, created: str) -> dict[str, Any]:
    return slim_pod({"metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "labels": {"app": "llm"},
                                  "creationTimestamp": created, "resourceVersion": "1"},
                     "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}})


class World:
    """One autoscaler over fake pods; ``sync()`` runs one reconcile at the clock's time."""

    def __init__(self, *, pods: int = 2, adapters: int = 3, max_loras: int = 4, spec: dict[str, Any] | None = None,
                 hook: bool = False) -> None:
        self.caches = {"loraautoscalers": Cache(), "loraplacements": Cache(placement_autoscaler_index),
                       "pods": Cache(), "endpointslices": Cache(owned_route_index),
                       "services": Cache(owned_route_index), "horizontalpodautoscalers": Cache()}
        self.kube = FakeKube(self.caches)
        self.kube.replicas = pods
        for i in range(pods):
            self.add_pod(i)
        body: dict[str, Any] = {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm"},
            "vllm": {"maxLorasPerReplica": max_loras},
            "placementMode": "strict",  # these tests count copies; preferred mode's are set where they matter
            "adapters": [{"name": f"lora-{i}", "source": f"/adapters/lora-{i}"} for i in range(1, adapters + 1)],
            "scaling": {"scaleUp": {"threshold": 4, "windowSeconds": 2},
                        "scaleDown": {"threshold": 1, "windowSeconds": 10}},
        }
        _merge(body, spec or {})
        self.caches["loraautoscalers"].items[f"{NS}/a"] = {
            "apiVersion": "loraautoscaler.io/v1alpha1", "kind": "LoRAAutoscaler",
            "metadata": {"name": "a", "namespace": NS, "uid": "uid-a", "generation": 1, "resourceVersion": "5"},
            "spec": body,
        }
        stores = {name: Store(c, indexes={BY_AUTOSCALER: c.index} if c.index else None)
                  for name, c in self.caches.items()}
        self.clock = Clock()
        self.events = Events()
        self.rt = Runtime(kube=self.kube, autoscalers=stores["loraautoscalers"], placements=stores["loraplacements"],
                          pods=stores["pods"], slices=stores["endpointslices"], services=stores["services"],
                          recorder=self.events, vllm=VLLMClients(), models=ModelsCache(), selectors=SelectorCache(),
                          settings=Settings(), read_secret=lambda ns, name, key: None, clock=self.clock)
        self.source = FixedSource()
        self.provider = SpecLoadProvider(make_source=lambda auto: self.source, wait=2.0)
        self.hook = PodAutoscalingHandOver(self.rt) if hook else None
        self.rec = AutoscalerReconciler(self.rt, TargetResolver(self.kube, ttl=0), load_provider=self.provider,
                                        saturation_hook=self.hook)

    def add_pod(self, i: int) -> None:
        self.caches["pods"].items[f"{NS}/p-{i}"] = pod(f"p-{i}", f"10.0.0.{10 + i}", f"2026-01-01T00:00:{i:02d}Z")

    def sync(self, seconds: float = 1.0, *, load: bool = True) -> None:
        self.clock.now += seconds
        self.rec.reconcile(f"{NS}/a")
        if load:
            self.settle()

    def settle(self) -> None:
        """What the placement reconciler would do: pending copies load, retired ones go."""
        items = self.caches["loraplacements"].items
        for k, o in list(items.items()):
            if o["spec"].get("retire"):
                del items[k]
            else:
                o["status"] = {"phase": "Loaded"}

    def auto(self) -> dict[str, Any]:
        return self.caches["loraautoscalers"].items[f"{NS}/a"]

    def holders(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for o in self.caches["loraplacements"].items.values():
            if not o["spec"].get("retire"):
                out.setdefault(o["spec"]["adapter"], set()).add(o["spec"]["podName"])
        return out

    def preferred(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for o in self.caches["loraplacements"].items.values():
            if not o["spec"].get("retire") and o["spec"].get("preferred"):
                out.setdefault(o["spec"]["adapter"], set()).add(o["spec"]["podName"])
        return out

    def adapter_status(self, name: str) -> dict[str, Any]:
        return next(a for a in self.auto()["status"]["adapters"] if a["name"] == name)

    def condition(self, ctype: str) -> dict[str, Any]:
        return next(c for c in self.auto()["status"]["conditions"] if c["type"] == ctype)

    def close(self) -> None:
        self.provider.close()


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    try:
        yield w
    finally:
        w.close()


# --- the wiring: signal -> policy -> placement -> status and Events -----------------------------------------


def test_a_hot_adapter_gains_a_replica_after_the_window_and_status_shows_the_signal(world: World) -> None:
    world.sync()
    assert {a: len(p) for a, p in world.holders().items()} == {"lora-1": 1, "lora-2": 1, "lora-3": 1}
    world.source.totals = {"lora-1": 10.0, "lora-2": 0.0, "lora-3": 0.0}
    world.sync()  # hot since now
    world.sync()  # 1 s: not yet
    assert len(world.holders()["lora-1"]) == 1
    world.sync()  # 2 s: the window has passed
    assert len(world.holders()["lora-1"]) == 2
    world.sync()  # the new copy is Loaded now (settle)
    st = world.adapter_status("lora-1")
    assert st["desiredReplicas"] == 2 and st["routableReplicas"] == 2 and st["lastScaleTime"]
    world.sync()
    assert world.adapter_status("lora-1")["load"] == 5.0  # 10 outstanding over 2 routable replicas
    assert any(r == "ScaledUp" and "lora-1: 1 -> 2" in m for _, r, m in world.events.items)


def test_a_cold_adapter_gives_its_replica_back_after_the_down_window_never_below_minimum(world: World) -> None:
    world.sync()
    world.source.totals = {"lora-1": 12.0, "lora-2": 0.0, "lora-3": 0.0}
    for _ in range(4):
        world.sync()
    assert len(world.holders()["lora-1"]) == 2
    world.source.totals = {"lora-1": 0.0, "lora-2": 0.0, "lora-3": 0.0}
    for _ in range(9):
        world.sync()
    assert len(world.holders()["lora-1"]) == 2  # the 10 s window is not over
    world.sync(2.0)
    assert len(world.holders()["lora-1"]) == 1
    assert "ScaledDown" in world.events.reasons()
    for _ in range(15):
        world.sync()
    assert {a: len(p) for a, p in world.holders().items()} == {"lora-1": 1, "lora-2": 1, "lora-3": 1}


def test_a_load_oscillating_around_the_up_threshold_causes_no_churn(world: World) -> None:
    world.sync()
    writes = None
    for i in range(30):
        world.source.totals = {"lora-1": 4.5 if i % 2 else 3.5, "lora-2": 0.5, "lora-3": 0.5}
        world.sync()
        if i == 1:
            writes = [w for w in world.kube.writes if w[1] == "loraplacements"]
    assert {a: len(p) for a, p in world.holders().items()} == {"lora-1": 1, "lora-2": 1, "lora-3": 1}
    assert [w for w in world.kube.writes if w[1] == "loraplacements"] == writes
    assert "ScaledUp" not in world.events.reasons() and "ScaledDown" not in world.events.reasons()


def test_no_free_slot_takes_one_from_a_cold_adapter_above_its_minimum() -> None:
    w = World(pods=2, adapters=3, max_loras=2)
    try:
        w.sync()
        w.source.totals = {"lora-2": 20.0, "lora-1": 0.0, "lora-3": 0.0}
        for _ in range(3):
            w.sync()
        assert len(w.holders()["lora-2"]) == 2  # 4 slots: 3 adapters + 1
        w.source.totals = {"lora-3": 20.0, "lora-1": 0.0, "lora-2": 0.0}
        for _ in range(4):
            w.sync()
        # lora-2 (cold, above its minimum of 1) gave its slot to lora-3
        assert {a: len(p) for a, p in w.holders().items()} == {"lora-1": 1, "lora-2": 1, "lora-3": 2}
        assert any(r == "ScaledDown" and "slot reclaimed for lora-3" in m for _, r, m in w.events.items)
    finally:
        w.close()


def test_every_replica_full_is_saturated_with_the_needed_pods_and_a_recommendation() -> None:
    w = World(pods=2, adapters=3, max_loras=2, hook=True)
    try:
        w.sync()
        w.source.totals = {"lora-1": 20.0, "lora-2": 20.0, "lora-3": 20.0}
        for _ in range(4):
            w.sync()
        status = w.auto()["status"]
        sat = w.condition("Saturated")
        assert status["saturated"] is True and sat["status"] == "True" and sat["reason"] == "NoFreeSlots"
        assert "no free slot for" in sat["message"] and "podAutoscaling.mode is Off" in sat["message"]
        assert status["neededReplicas"] >= 1
        assert status["recommendation"] is None  # 3 active adapters, 2 pods x 2 batch slots: enough
    finally:
        w.close()
    w = World(pods=1, adapters=3, max_loras=2)
    try:
        w.source.totals = {"lora-1": 3.0, "lora-2": 3.0, "lora-3": 3.0}
        w.sync()
        w.sync()
        assert "--max-loras" in (w.auto()["status"]["recommendation"] or "")
    finally:
        w.close()


def test_an_unavailable_signal_is_degraded_and_adapters_hold() -> None:
    w = World()
    try:
        w.sync()
        w.source.errors = ("router http://r:9090/router/load: connection refused",)
        for _ in range(5):
            w.sync()
        degraded = w.condition("Degraded")
        assert degraded["status"] == "True" and degraded["reason"] == "LoadSignalUnavailable"
        assert "connection refused" in degraded["message"]
        assert {a: len(p) for a, p in w.holders().items()} == {"lora-1": 1, "lora-2": 1, "lora-3": 1}
        assert w.adapter_status("lora-1")["load"] is None
        w.source.errors = ()
        w.sync()
        assert w.condition("Degraded")["status"] == "False"
    finally:
        w.close()


def test_keep_routable_holds_back_the_last_routable_copy_of_a_moving_adapter() -> None:
    # lora-2 moves from p-0 to p-1: its only routable copy stays until the new one is Loaded
    held = keep_routable([("lora-2", "p-0")], {"lora-2": ["p-0"]}, {"lora-2": frozenset({"p-1"})})
    assert held == {("lora-2", "p-0")}
    # another routable copy remains: nothing held back
    assert keep_routable([("lora-2", "p-0")], {"lora-2": ["p-0", "p-2"]}, {"lora-2": frozenset({"p-2"})}) == set()
    # an adapter that left the spec is not held back
    assert keep_routable([("gone", "p-0")], {"gone": ["p-0"]}, {}) == set()


# --- the load provider -------------------------------------------------------------------------------------


def _view(key: str, source: str = "combined", router_url: str | None = None, max_age: int = 10) -> Any:
    from api import v1alpha1 as v1

    metric: dict[str, Any] = {"source": source, "maxAgeSeconds": max_age}
    if router_url:
        metric["routerUrl"] = router_url
    if source == "prometheus":
        metric["prometheus"] = {"url": "http://prom:9090"}
    auto = v1.LoRAAutoscaler.from_object({
        "metadata": {"name": key.split("/")[1], "namespace": NS},
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "llm"},
                 "adapters": [{"name": "lora-1", "source": "/a/1"}], "scaling": {"metric": metric}},
    })

    class V:
        pass

    v = V()
    v.key, v.autoscaler, v.port = key, auto, 8000  # type: ignore[attr-defined]
    v.pods = (view(pod("p-0", "10.0.0.10", "2026-01-01T00:00:00Z")),)  # type: ignore[attr-defined]
    v.assignment = {"lora-1": frozenset({"p-0"})}  # type: ignore[attr-defined]
    return v


def test_the_spec_names_the_source() -> None:
    def kinds(source: str, router: str | None = None) -> Any:
        built = build_source(SourceConfig.of(_view("ns/a", source, router).autoscaler), lambda address: "")
        try:
            return built
        finally:
            close = getattr(built, "close", None)
            if callable(close):
                close()

    assert isinstance(kinds("router", "http://r:9090"), RouterSource)
    assert type(kinds("vllm")) is VLLMScrapeSource
    assert isinstance(kinds("waitingLoraAdapters"), WaitingLoraAdaptersSource)
    assert isinstance(kinds("prometheus"), PrometheusSource)
    combined = kinds("combined", "http://r:9090")
    assert isinstance(combined, CombinedSource) and isinstance(combined._router, RouterSource)
    assert kinds("combined")._router is None  # no routerUrl: the vLLM scrape alone
    with pytest.raises(ValueError, match="routerUrl is not set"):
        kinds("router")


def test_a_slow_source_never_holds_the_sync_longer_than_the_wait() -> None:
    source = FixedSource()
    source.totals = {"lora-1": 3.0}
    provider = SpecLoadProvider(make_source=lambda auto: source, wait=0.1)
    try:
        v = _view("ns/a")
        assert provider(v, T0) is not None  # fast: answered within the wait
        source.delay = 0.5
        started = time.monotonic()
        snap = provider(v, T0 + 1)
        assert time.monotonic() - started < 0.4
        assert snap is not None and snap.outstanding["lora-1"]  # the previous sample, still fresh
        calls = source.calls
        provider(v, T0 + 1.05)  # the slow collect is still in flight: no second one is started
        assert source.calls == calls
        deadline = time.monotonic() + 5
        while provider(v, T0 + 2).outstanding == {} and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.05)
        stale = provider(v, T0 + 30)  # nothing newer than 10 s (maxAgeSeconds): an error, not a guess
        assert stale is not None and not stale.outstanding and "no fresh sample" in stale.errors[0]
    finally:
        provider.close()


def test_a_changed_metric_spec_rebuilds_the_source() -> None:
    built: list[str] = []

    def make(auto: Any) -> FixedSource:
        built.append(auto.spec.scaling.metric.source)
        return FixedSource()

    provider = SpecLoadProvider(make_source=make, wait=1.0)
    try:
        provider(_view("ns/a", "vllm"), T0)
        provider(_view("ns/a", "vllm"), T0 + 1)
        provider(_view("ns/a", "waitingLoraAdapters"), T0 + 2)
        assert built == ["vllm", "waitingLoraAdapters"]
    finally:
        provider.close()


ROUTER_LOAD = {
    "version": 1, "time": T0, "window_seconds": 10.0, "routes_synced": True, "strategy": {},
    "models": {
        "tiny": {"base": True, "routable": True, "in_flight": 4, "queued": 0, "rate": 1.0, "started_total": 9,
                 "pods": {"vllm-0": {"address": "10.0.0.5:8000", "tier": "base", "routable": True, "in_flight": 4}}},
        "lora-1": {"base": False, "routable": True, "in_flight": 3, "queued": 2, "rate": 12.5, "started_total": 5120,
                   "pods": {"vllm-0": {"address": "10.0.0.5:8000", "tier": "preferred", "routable": True,
                                       "in_flight": 2, "rate": 8.1},
                            "vllm-2": {"address": "10.0.0.7:8000", "tier": None, "routable": False,
                                       "in_flight": 1, "rate": 0.4}}},
        "lora-2": {"base": False, "routable": True, "in_flight": 0, "queued": 0, "rate": 0, "started_total": 1,
                   "pods": {"vllm-1": {"address": "10.0.0.6:8000", "tier": "fallback", "routable": True,
                                       "in_flight": 0}}},
    },
    "pods": {},
}


def test_the_routers_load_document_is_read_as_the_router_writes_it() -> None:
    body = json.dumps(ROUTER_LOAD).encode()
    assert parse_router_load(body) == {"lora-1": {"vllm-0": 2.0, "vllm-2": 1.0, "<router-queue>": 2.0},
                                       "lora-2": {"vllm-1": 0.0}}
    assert LoadSnapshot(parse_router_load(body)).per_replica("lora-1", ["vllm-0"]) == 5.0
    assert router_in_flight(body, "lora-1", "vllm-2") is True  # draining, one request still there
    assert router_in_flight(body, "lora-2", "vllm-1") is True  # still routed: the router has not seen the drain
    assert router_in_flight(body, "lora-1", "vllm-9") is False
    assert router_in_flight(body, "nope", "vllm-0") is False
    assert router_in_flight(b"not json", "lora-1", "vllm-0") is None


class _RouterHandler(http.server.BaseHTTPRequestHandler):
    doc: dict[str, Any] = ROUTER_LOAD
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        body = json.dumps(self.doc).encode()
        self.send_response(200 if self.path == "/router/load" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_the_router_probe_answers_drains_from_the_routers_counts_and_asks_the_pod_too() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RouterHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        asked: list[str] = []

        def pod_says(p: Any, adapter: str, auto: Any) -> bool | None:
            asked.append(adapter)
            return None

        probe = RouterInFlightProbe(fallback=pod_says, ttl=10.0)
        auto = _view("ns/a", router_url=url).autoscaler
        p2 = view(pod("vllm-2", "10.0.0.7", "2026-01-01T00:00:00Z"))
        p9 = view(pod("vllm-9", "10.0.0.9", "2026-01-01T00:00:00Z"))
        assert probe(p2, "lora-1", auto) is True and asked == []  # the router has one in flight there
        assert probe(p9, "lora-1", auto) is False and asked == ["lora-1"]  # nothing there; the pod cannot say
        assert _RouterHandler.hits == 1  # cached within ttl
        down = RouterInFlightProbe(fallback=lambda p, a, auto: True)
        gone = _view("ns/a", router_url="http://127.0.0.1:1").autoscaler
        assert down(p9, "lora-1", gone) is True  # the router is down: the pod's own answer counts
        assert RouterInFlightProbe()(p9, "lora-1", gone) is None
    finally:
        server.shutdown()
        server.server_close()


# --- the hand-over -----------------------------------------------------------------------------------------


def test_the_floor_rises_at_once_and_comes_down_only_after_the_window() -> None:
    raise_ = decide_floor(floor=2, original=None, hold=3, upper=5, waiting=True, now=0, last_high=None, window=10)
    assert raise_.value == 3 and not raise_.release
    capped = decide_floor(floor=5, original=2, hold=7, upper=5, waiting=True, now=0, last_high=None, window=10)
    assert capped.value == 5  # never above the HPA's maxReplicas
    hold = decide_floor(floor=3, original=2, hold=3, upper=5, waiting=False, now=5, last_high=0, window=10)
    assert hold.value == 3 and hold.last_high == 5  # the pods are still used: the window restarts
    wait = decide_floor(floor=3, original=2, hold=2, upper=5, waiting=False, now=9, last_high=5, window=10)
    assert wait.value == 3 and not wait.release and wait.last_high == 5
    release = decide_floor(floor=3, original=2, hold=2, upper=5, waiting=False, now=15, last_high=5, window=10)
    assert release.value == 2 and release.release
    partial = decide_floor(floor=5, original=2, hold=3, upper=5, waiting=False, now=15, last_high=5, window=10)
    assert partial.value == 3 and not partial.release
    untouched = decide_floor(floor=4, original=None, hold=1, upper=5, waiting=False, now=0, last_high=None, window=1)
    assert untouched.value == 4 and not untouched.changed(4)
    assert pods_for_targets([2, 1, 1], 2) == 2 and pods_for_targets([3, 1], 4) == 3


def hpa(name: str = "llm", min_replicas: int = 2, max_replicas: int = 4) -> dict[str, Any]:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": name, "namespace": NS, "resourceVersion": "1"},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm"},
                     "minReplicas": min_replicas, "maxReplicas": max_replicas}}


def _saturate(w: World) -> None:
    w.sync()
    w.source.totals = {"lora-1": 6.0, "lora-2": 0.0, "lora-3": 0.0}  # hot on 1 replica, not on 2
    for _ in range(3):
        w.sync()


def test_hpa_mode_raises_min_replicas_and_restores_it_exactly_after_the_window() -> None:
    w = World(pods=2, adapters=2, max_loras=1, hook=True,
              spec={"podAutoscaling": {"mode": "HPA", "hpaName": "llm"}})
    w.caches["horizontalpodautoscalers"].items[f"{NS}/llm"] = hpa()
    try:
        _saturate(w)
        got = w.caches["horizontalpodautoscalers"].items[f"{NS}/llm"]
        assert got["spec"]["minReplicas"] == 3
        assert got["metadata"]["annotations"][ORIGINAL_MIN_ANNOTATION] == "2"
        assert got["metadata"]["annotations"][RAISED_MIN_ANNOTATION] == "3"
        assert "HandOver" in w.events.reasons()
        assert "minReplicas raised to 3" in w.condition("Saturated")["message"]
        assert ("scale", "deployments", "llm") not in w.kube.writes  # the HPA's field is never touched
        # The HPA controller adds the pod; the hot adapter gets it.
        w.add_pod(2)
        w.kube.replicas = 3
        for _ in range(3):
            w.sync()
        assert len(w.holders()["lora-1"]) == 2 and w.auto()["status"]["saturated"] is False
        # Load ends: the adapter gives the replica back after its window, then the HPA after another.
        w.source.totals = {"lora-1": 0.0, "lora-2": 0.0, "lora-3": 0.0}
        for _ in range(12):
            w.sync()
            assert w.caches["horizontalpodautoscalers"].items[f"{NS}/llm"]["spec"]["minReplicas"] == 3
        for _ in range(12):
            w.sync()
        got = w.caches["horizontalpodautoscalers"].items[f"{NS}/llm"]
        assert got["spec"]["minReplicas"] == 2 and not got["metadata"].get("annotations")
        assert "HandBack" in w.events.reasons()
        writes = len(w.kube.writes)
        w.sync()
        w.sync()
        assert not [x for x in w.kube.writes[writes:] if x[1] == "horizontalpodautoscalers"]
    finally:
        w.close()


def test_hpa_mode_without_the_hpa_is_degraded_not_a_crash() -> None:
    w = World(pods=2, adapters=2, max_loras=1, hook=True,
              spec={"podAutoscaling": {"mode": "HPA", "hpaName": "missing"}})
    try:
        _saturate(w)
        degraded = w.condition("Degraded")
        assert degraded["status"] == "True" and degraded["reason"] == "PodAutoscalingFailed"
        assert "missing" in degraded["message"] and "not found" in degraded["message"]
        with pytest.raises(HandOverError):
            assert w.hook is not None
            decision = policy.PolicyDecision(adapters=(), saturated=True, needed_pods=1)
            w.hook(_view_for(w), decision, w.clock.now)
    finally:
        w.close()


def _view_for(w: World) -> Any:
    from api import v1alpha1 as v1

    class V:
        pass

    v = V()
    v.key, v.autoscaler, v.pods, v.target = f"{NS}/a", v1.LoRAAutoscaler.from_object(w.auto()), (), None  # type: ignore[attr-defined]
    return v


def test_scale_target_mode_scales_through_the_subresource_and_back() -> None:
    w = World(pods=2, adapters=2, max_loras=1, hook=True,
              spec={"podAutoscaling": {"mode": "ScaleTarget", "maxReplicas": 3}})
    try:
        _saturate(w)
        assert w.kube.replicas == 3 and ("scale", "deployments", "llm") in w.kube.writes
        assert w.auto()["metadata"]["annotations"][ORIGINAL_REPLICAS_ANNOTATION] == "2"
        w.add_pod(2)
        w.source.totals = {"lora-1": 0.0, "lora-2": 0.0}
        for _ in range(30):
            w.sync()
        assert w.kube.replicas == 2
        assert ORIGINAL_REPLICAS_ANNOTATION not in (w.auto()["metadata"].get("annotations") or {})
    finally:
        w.close()


# --- preferred mode ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("load_window", [None, 30])
def test_preferred_mode_keeps_warm_fallback_copies_and_promotes_them_when_hot(load_window: int | None) -> None:
    """With a long loadWindowSeconds, the promotion still comes after the scale-up window (2 s); a replica
    that needs a load waits until lora-1 has been hot for the load window."""
    spec: dict[str, Any] = {"placementMode": "preferred", "vllm": {"maxCpuLorasPerReplica": 4}}
    if load_window is not None:
        spec["scaling"] = {"scaleUp": {"threshold": 4, "windowSeconds": 2, "loadWindowSeconds": load_window}}
    w = World(pods=4, adapters=6, max_loras=2, spec=spec)
    try:
        for _ in range(5):  # fallback copies are spread a few per sync (at most one per pod)
            w.sync()
        resident = w.holders()
        preferred = w.preferred()
        per_pod: dict[str, int] = {}
        pref_pod: dict[str, int] = {}
        for pods in resident.values():
            for p in pods:
                per_pod[p] = per_pod.get(p, 0) + 1
        for pods in preferred.values():
            for p in pods:
                pref_pod[p] = pref_pod.get(p, 0) + 1
        assert max(pref_pod.values()) <= 4 and max(per_pod.values()) <= 4
        assert sum(per_pod.values()) == 16  # every spare resident slot holds a fallback copy
        assert all(len(preferred[a]) == 1 for a in preferred)
        # lora-1 turns hot: its new preferred holder is one where it was already resident (no load)
        warm = resident["lora-1"] - preferred["lora-1"]
        assert warm, "lora-1 should have a warm fallback copy"
        creates = sum(1 for x in w.kube.writes if x[0] == "create" and x[1] == "loraplacements")
        w.source.totals = {"lora-1": 40.0}
        for _ in range(3):
            w.sync()
        assert len(w.preferred()["lora-1"]) == 2 and w.preferred()["lora-1"] - preferred["lora-1"] <= warm
        assert sum(1 for x in w.kube.writes if x[0] == "create" and x[1] == "loraplacements") == creates
        if load_window is not None:
            w.source.totals = {"lora-1": 80.0}
            for _ in range(2 * len(warm) + 4):  # promotions onto every warm copy, then the load window
                w.sync()
            wanted = w.adapter_status("lora-1")
            assert wanted["desiredReplicas"] == 1 + len(warm), wanted
            for _ in range(load_window):
                w.sync()
            assert w.adapter_status("lora-1")["desiredReplicas"] == 4  # the loads follow: every pod
        slices = w.caches["endpointslices"].items
        fallback = slices.get(f"{NS}/{L.slice_name(L.route_service_name('a', 'lora-2'), L.TIER_FALLBACK)}")
        assert fallback is not None and fallback["metadata"]["labels"][L.TIER_LABEL] == L.TIER_FALLBACK
    finally:
        w.close()


# --- preferred-mode placement, exhaustively on small inputs -----------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402

from controller.placement import AdapterTarget, PlacementError, ResidentInput, plan_resident  # noqa: E402


@hs.composite
def resident_inputs(draw: Any) -> ResidentInput:
    pods = tuple(f"p{i}" for i in range(draw(hs.integers(1, 4))))
    cap = draw(hs.integers(1, 3))
    rcap = cap + draw(hs.integers(0, 3))
    names = [f"a{i}" for i in range(draw(hs.integers(1, 6)))]
    adapters = tuple(AdapterTarget(n, draw(hs.integers(0, 3))) for n in names)
    subsets = hs.frozensets(hs.sampled_from((*pods, "gone")), max_size=3)
    preferred = {n: draw(subsets) for n in names}
    fallback = {n: draw(subsets) - preferred[n] for n in names}
    avoid = {n: draw(hs.frozensets(hs.sampled_from(pods), max_size=1)) for n in names}
    leaving = {p: draw(hs.integers(0, 2)) for p in pods}
    return ResidentInput(pods=pods, capacity=cap, resident_capacity=rcap, adapters=adapters, preferred=preferred,
                         fallback=fallback, avoid=avoid, spare_order=tuple(reversed(names)), leaving=leaving)


@settings(max_examples=300, deadline=None)
@given(resident_inputs())
def test_resident_plans_keep_both_budgets_and_stay_sticky(inp: ResidentInput) -> None:
    out = plan_resident(inp)
    per_pod = dict.fromkeys(inp.pods, 0)
    pref_pod = dict.fromkeys(inp.pods, 0)
    for a, pods in out.assignment.items():
        assert out.preferred[a] <= pods
        assert not (pods & inp.avoid.get(a, frozenset())), "an avoided pod holds the adapter"
        assert pods <= set(inp.pods)
        for p in pods:
            per_pod[p] += 1
        for p in out.preferred[a]:
            pref_pod[p] += 1
    assert max(pref_pod.values(), default=0) <= inp.capacity
    assert max(per_pod.values(), default=0) <= inp.resident_capacity
    for t in inp.adapters:  # the preferred tier gets what fits, the shortfall says what does not
        reachable = min(t.replicas, len(inp.pods) - len(inp.avoid.get(t.name, frozenset())))
        assert len(out.preferred[t.name]) + out.shortfall.get(t.name, 0) >= reachable
        assert len(out.preferred[t.name]) <= t.replicas, "more preferred holders than the policy wants"
    for t in inp.adapters:  # no pod is left without a preferred holder when a free move could give it one
        for src in out.preferred[t.name]:
            for dst in out.assignment[t.name] - out.preferred[t.name] - inp.avoid.get(t.name, frozenset()):
                if dst in (inp.preferred.get(t.name, frozenset()) | inp.fallback.get(t.name, frozenset())):
                    assert pref_pod[dst] or pref_pod[src] < 2, f"{t.name} could move from {src} to idle {dst}"
    for t in inp.adapters:  # a copy that was resident stays while its pod has room
        before = (inp.preferred.get(t.name, frozenset()) | inp.fallback.get(t.name, frozenset())) & set(inp.pods)
        for p in before - inp.avoid.get(t.name, frozenset()):
            if per_pod[p] < inp.resident_capacity:
                assert p in out.assignment[t.name], f"{t.name} left {p} though it had room"
    before_all = {(a, p) for a in {t.name for t in inp.adapters}
                  for p in inp.preferred.get(a, frozenset()) | inp.fallback.get(a, frozenset())}
    after_all = {(a, p) for a, pods in out.assignment.items() for p in pods}
    assert set(out.add) == after_all - before_all
    assert set(out.remove) | set(out.dropped) >= {(a, p) for a, p in before_all - after_all}
    for a, p in out.add:  # a spare copy never goes into a slot a leaving copy still takes
        if p not in out.preferred[a]:
            assert per_pod[p] + inp.leaving.get(p, 0) <= inp.resident_capacity, f"{a} loaded into a full {p}"


def test_no_spare_copy_goes_into_a_slot_a_leaving_copy_still_takes() -> None:
    """p0 shows a free slot, but a copy being unloaded still takes it: the spare copy goes to p1; once
    p1's slot is taken by a leaving copy too, nothing is loaded until the unloads are done."""
    targets = (AdapterTarget("a", 1), AdapterTarget("b", 1))
    base = ResidentInput(pods=("p0", "p1"), capacity=2, resident_capacity=2, adapters=targets,
                         preferred={"a": frozenset({"p0"}), "b": frozenset({"p1"})})
    assert sorted(plan_resident(base).add) == [("a", "p1"), ("b", "p0")]
    one = plan_resident(replace(base, leaving={"p0": 1}))
    assert one.add == (("a", "p1"),)
    both = plan_resident(replace(base, leaving={"p0": 1, "p1": 1}))
    assert not both.add and not both.remove
    with pytest.raises(PlacementError, match="leaving"):
        plan_resident(replace(base, leaving={"p0": -1}))


def test_a_new_preferred_holder_is_a_warm_copy_when_one_has_room() -> None:
    inp = ResidentInput(pods=("p0", "p1", "p2"), capacity=1, resident_capacity=3,
                        adapters=(AdapterTarget("hot", 2), AdapterTarget("b", 1)),
                        preferred={"hot": frozenset({"p0"}), "b": frozenset({"p1"})},
                        fallback={"hot": frozenset({"p1", "p2"}), "b": frozenset({"p0"})})
    out = plan_resident(inp)
    assert out.preferred["hot"] == {"p0", "p2"} and out.promoted == 1  # p1's budget is b's: p2 it is
    assert ("hot", "p2") not in out.add and not out.remove
    # the copy that stops being preferred stays resident as a fallback holder
    back = plan_resident(ResidentInput(pods=inp.pods, capacity=2, resident_capacity=3,
                                       adapters=(AdapterTarget("hot", 1), AdapterTarget("b", 1),
                                                 AdapterTarget("c", 1), AdapterTarget("d", 1)),
                                       preferred={"hot": frozenset({"p0", "p2"}), "b": frozenset({"p0"}),
                                                  "c": frozenset({"p2"}), "d": frozenset({"p1"})},
                                       fallback={"hot": frozenset({"p1"})}))
    assert back.preferred["hot"] == {"p0"} and back.assignment["hot"] == {"p0", "p1", "p2"}
    assert not back.remove and all(a != "hot" for a, _ in back.add)


def test_a_preferred_tier_scaled_down_holds_what_the_policy_wants_and_leaves_no_pod_idle() -> None:
    pods = ("p0", "p1", "p2")
    everywhere = frozenset(pods)
    targets = (AdapterTarget("lora-1", 1), AdapterTarget("lora-2", 1), AdapterTarget("lora-3", 1))
    # lora-1 was hot on every pod; lora-2 and lora-3 share p0's tier. Back to one replica each, lora-1
    # keeps one preferred holder (not one more on the pod it would leave idle), and the idle pod gets the
    # colder of p0's two by a promotion and a demotion: nothing is loaded or unloaded.
    preferred = {"lora-1": everywhere, "lora-2": frozenset({"p0"}), "lora-3": frozenset({"p0"})}
    out = plan_resident(ResidentInput(pods=pods, capacity=3, resident_capacity=3, adapters=targets,
                                      preferred=preferred, spare_order=("lora-1", "lora-2", "lora-3"),
                                      fallback={a: everywhere - held for a, held in preferred.items()}))
    assert {a: len(held) for a, held in out.preferred.items()} == {"lora-1": 1, "lora-2": 1, "lora-3": 1}
    assert sorted(p for held in out.preferred.values() for p in held) == ["p0", "p1", "p2"]
    assert out.preferred["lora-2"] == {"p0"}, "the colder adapter moves, the warmer stays"
    assert not out.add and not out.remove and out.promoted == 1
    # Pods that all have preferred holders are left as they are (3, 1 and 1 is not evened out): moving
    # holders between busy pods would shift traffic for nothing.
    names = ("a", "b", "c", "d", "e")
    busy = {"a": frozenset({"p0"}), "b": frozenset({"p0"}), "c": frozenset({"p0"}), "d": frozenset({"p1"}),
            "e": frozenset({"p2"})}
    calm = plan_resident(ResidentInput(pods=pods, capacity=5, resident_capacity=5,
                                       adapters=tuple(AdapterTarget(n, 1) for n in names), preferred=busy,
                                       fallback={n: everywhere - held for n, held in busy.items()}))
    assert calm.preferred == busy and not calm.add and not calm.remove
    # A pod where the adapter is not resident is no free move: the tier stays as it is.
    stuck = plan_resident(ResidentInput(pods=pods, capacity=3, resident_capacity=3, adapters=targets[1:],
                                        preferred={"lora-2": frozenset({"p0"}), "lora-3": frozenset({"p0"})},
                                        fallback={}, max_new_fallback=0))
    assert stuck.preferred == {"lora-2": {"p0"}, "lora-3": {"p0"}} and not stuck.add


def test_a_scale_down_removes_the_copies_scale_ups_added_not_the_first() -> None:
    from controller.placement import PlacementInput, plan

    # lora-1 was alone on p0 first; scale-ups put it beside lora-2 and lora-3. Back to one replica: the
    # later copies go, the first stays (without the times, the copy alone on p0 would be kept as a fill
    # copy and one shared copy with it).
    current = {"lora-1": frozenset({"p0", "p1", "p2"}), "lora-2": frozenset({"p1"}), "lora-3": frozenset({"p2"})}
    targets = (AdapterTarget("lora-1", 1), AdapterTarget("lora-2", 1), AdapterTarget("lora-3", 1))
    since = {"lora-1": {"p0": 100.0, "p1": 200.0, "p2": 210.0}}
    out = plan(PlacementInput(pods=("p0", "p1", "p2"), capacity=2, adapters=targets, current=current, since=since))
    assert out.assignment["lora-1"] == {"p0"} and set(out.remove) == {("lora-1", "p1"), ("lora-1", "p2")}
    without = plan(PlacementInput(pods=("p0", "p1", "p2"), capacity=2, adapters=targets, current=current))
    assert len(without.assignment["lora-1"]) == 2
    # A fill copy that came later (alone on a new pod) stays beside the first copy that shares its pod.
    current = {"lora-1": frozenset({"p0", "p2"}), "lora-2": frozenset({"p0"}), "lora-3": frozenset({"p1"})}
    since = {"lora-1": {"p0": 100.0, "p2": 300.0}}
    kept = plan(PlacementInput(pods=("p0", "p1", "p2"), capacity=2, adapters=targets, current=current, since=since))
    assert kept.assignment["lora-1"] == {"p0", "p2"} and not kept.remove
