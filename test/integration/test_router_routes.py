"""The router following a real route table: EndpointSlices in a real kube-apiserver, watched by the shared
informer, in front of real pods. The test kubelet runs a vLLM simulator for each pod on its pod network, so
every pod has its own IP, which the slices list as the controller writes them (the API server refuses
loopback endpoints); the tests read each simulator's counters over HTTP at its pod IP."""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from kubernetes.client import ApiClient

from api.labels import (
    ADAPTER_LABEL,
    AUTOSCALER_LABEL,
    BASE_MODEL_ANNOTATION,
    MANAGED_BY_LABEL,
    MODEL_ANNOTATION,
    ROLE_LABEL,
    SERVICE_NAME_LABEL,
    TIER_LABEL,
    base_service_name,
    route_service_name,
    slice_name,
)
from common.kube import ENDPOINT_SLICES, PODS, SERVICES, KubeClient
from localkube.kubelet import TestKubelet
from localkube.podspec import SIM_ARGS_ANNOTATION
from localkube.wait import wait_until as wait_for
from router.kube import KubeRouteSource
from router.proxy import RouterConfig
from router.routes import RouteTable
from router.server import RouterService
from router.strategies import make_strategy

pytestmark = pytest.mark.integration

AUTOSCALER = "demo"
BASE = "tiny"


PORT = 8000


@dataclass(frozen=True)
class Pod:
    """A running simulator pod: what a slice lists and where its counters are read."""

    name: str
    uid: str
    ip: str
    node: str

    @property
    def address(self) -> str:
        """How the router names the pod (ip:port)."""
        return f"{self.ip}:{PORT}"


def sim_pod(namespace: str, name: str, adapters: list[str]) -> dict[str, Any]:
    """A vLLM pod as a user would write it, with `adapters` loaded at start-up (`--lora-modules`)."""
    flags = ["--enable-lora", "--max-loras", "2", "--max-cpu-loras", "8"]
    if adapters:
        flags += ["--lora-modules", *(f"{a}=/adapters/{a}" for a in adapters)]
    container = {
        "name": "vllm",
        "image": "vllm/vllm-openai:v0.11.0",
        "command": ["vllm", "serve", BASE, *flags],
        "ports": [{"name": "http", "containerPort": PORT}],
        "env": [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "true"}],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name, "namespace": namespace, "labels": {"app": "vllm"},
            "annotations": {SIM_ARGS_ANNOTATION: "--sim-step-time 0.002"},
        },
        "spec": {"containers": [container]},
    }  # fmt: skip


def run_pods(kube: KubeClient, kubelet: TestKubelet, namespace: str, placement: list[list[str]]) -> list[Pod]:
    """One pod per entry of `placement` (its adapters), Ready on the kubelet's pod network."""
    for n, adapters in enumerate(placement):
        kube.create(PODS, sim_pod(namespace, f"vllm-{n}", adapters), namespace)

    def ready() -> list[Pod] | None:
        out = []
        for n in range(len(placement)):
            obj = kube.get(PODS, f"vllm-{n}", namespace)
            status = obj.get("status") or {}
            conditions = status.get("conditions") or []
            if not status.get("podIP") or not any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                return None
            meta = obj["metadata"]
            out.append(Pod(meta["name"], meta["uid"], status["podIP"], obj["spec"]["nodeName"]))
        return out

    pods = wait_for(ready, timeout=30, what=f"{len(placement)} simulator pods Ready")
    for pod in pods:
        assert not ipaddress.ip_address(pod.ip).is_loopback, f"{pod.name} has no pod network address: {pod.ip}"
        assert kubelet.pod_address(namespace, pod.name) == (pod.ip, PORT)
    assert len({pod.ip for pod in pods}) == len(pods)
    return pods


def counters(pod: Pod) -> dict[str, Any]:
    """The simulator's counters (`GET /sim/events`, asking for no events)."""
    conn = http.client.HTTPConnection(pod.ip, PORT, timeout=5)
    try:
        conn.request("GET", "/sim/events?since=1000000000000")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, body
        return dict(json.loads(body)["counters"])
    finally:
        conn.close()


def route_service(namespace: str, model: str, *, base: bool = False) -> dict[str, Any]:
    """The selector-less Service of one model's route table."""
    name = base_service_name(AUTOSCALER) if base else route_service_name(AUTOSCALER, model)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {AUTOSCALER_LABEL: AUTOSCALER}},
        "spec": {"ports": [{"name": "http", "port": 8000, "targetPort": 8000}]},
    }


def endpoint(namespace: str, pod: Pod) -> dict[str, Any]:
    """A pod's endpoint in a slice, as the controller writes it."""
    return {
        "addresses": [pod.ip],
        "conditions": {"ready": True, "serving": True, "terminating": False},
        "targetRef": {"kind": "Pod", "name": pod.name, "namespace": namespace, "uid": pod.uid},
        "nodeName": pod.node,
    }


def route_slice(namespace: str, model: str, pods: list[Pod], *, base: bool = False) -> dict[str, Any]:
    """A model's EndpointSlice of the route table listing `pods`, labelled and annotated as the controller does."""
    service = base_service_name(AUTOSCALER) if base else route_service_name(AUTOSCALER, model)
    tier = "base" if base else "preferred"
    labels = {AUTOSCALER_LABEL: AUTOSCALER, ROLE_LABEL: "base" if base else "adapter", TIER_LABEL: tier}
    if not base:
        labels[ADAPTER_LABEL] = model
    annotations = {BASE_MODEL_ANNOTATION: model} if base else {MODEL_ANNOTATION: model}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name(service, tier),
            "namespace": namespace,
            # The controller's managed-by value; a label value cannot contain "/", so not api.labels.MANAGED_BY.
            "labels": {**labels, SERVICE_NAME_LABEL: service, MANAGED_BY_LABEL: "controller.loraautoscaler.io"},
            "annotations": annotations,
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
        "endpoints": [endpoint(namespace, pod) for pod in pods],
    }


async def wait_until(cond: Callable[[], bool], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {limit}s")
        await asyncio.sleep(0.01)


async def run_router(
    api_client: ApiClient, namespace: str, body: Callable[[RouterService, aiohttp.ClientSession], Awaitable[None]]
) -> None:
    table = RouteTable()
    source = KubeRouteSource(table, KubeClient(api_client), namespace, AUTOSCALER)
    svc = RouterService(
        table, make_strategy("lora-aware"), RouterConfig(queue_timeout=5.0), host="127.0.0.1", port=0,
        metrics_port=None, scrape_interval=0.1,
    )  # fmt: skip
    assert await source.start(30.0)
    await svc.start()
    try:
        await wait_until(lambda: table.synced, 10, "route table synced")
        async with aiohttp.ClientSession(f"http://127.0.0.1:{svc.bound_port}") as session:
            await body(svc, session)
    finally:
        await svc.stop()
        await source.stop()


async def post(session: aiohttp.ClientSession, model: str, max_tokens: int = 2) -> int:
    async with session.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": max_tokens}) as r:
        await r.read()
        return r.status


def test_a_thousand_requests_over_three_adapters_reach_their_holders(
    api_client: ApiClient, namespace: str, kubelet: TestKubelet
) -> None:
    kube = KubeClient(api_client)
    placement = {"lora-a": 0, "lora-b": 1, "lora-c": 2}
    pods = run_pods(kube, kubelet, namespace, [[a for a, i in placement.items() if i == n] for n in range(3)])
    for adapter, n in placement.items():
        kube.create(SERVICES, route_service(namespace, adapter), namespace)
        kube.create(ENDPOINT_SLICES, route_slice(namespace, adapter, [pods[n]]), namespace)
    kube.create(SERVICES, route_service(namespace, BASE, base=True), namespace)
    kube.create(ENDPOINT_SLICES, route_slice(namespace, BASE, pods, base=True), namespace)

    async def body(svc: RouterService, session: aiohttp.ClientSession) -> None:
        await wait_until(lambda: len(svc.table.models()) == 4, 10, "four routes")
        base_route = svc.table.lookup(BASE)
        assert base_route is not None and base_route.is_base and len(base_route.holders) == 3
        assert {h.address for h in base_route.holders} == {pod.address for pod in pods}
        async with session.get("/v1/models") as resp:
            ids = sorted(m["id"] for m in (await resp.json())["data"])
        assert ids == ["lora-a", "lora-b", "lora-c", BASE]
        sem = asyncio.Semaphore(64)
        models = [("lora-a", "lora-b", "lora-c")[i % 3] for i in range(1000)]

        async def one(model: str) -> int:
            async with sem:
                return await post(session, model)

        statuses = await asyncio.gather(*(one(m) for m in models))
        assert statuses == [200] * 1000
        assert await post(session, "lora-z") == 404

    asyncio.run(asyncio.wait_for(run_router(api_client, namespace, body), 120))
    for adapter, n in placement.items():
        c = counters(pods[n])
        assert c["model_not_found"] == 0
        assert c["requests_by_model"] == {adapter: 334 if adapter == "lora-a" else 333}


def test_draining_an_adapter_from_one_pod_starts_nothing_there_and_fails_nothing(
    api_client: ApiClient, namespace: str, kubelet: TestKubelet
) -> None:
    kube = KubeClient(api_client)
    pods = run_pods(kube, kubelet, namespace, [["lora-a"], ["lora-a"]])
    p0, p1 = pods
    a0 = p0.address
    kube.create(SERVICES, route_service(namespace, "lora-a"), namespace)
    lora_a = route_slice(namespace, "lora-a", pods)
    kube.create(ENDPOINT_SLICES, lora_a, namespace)

    async def body(svc: RouterService, session: aiohttp.ClientSession) -> None:
        table, acc = svc.table, svc.accounting

        def holders() -> list[str]:
            route = table.lookup("lora-a")
            return [h.address for h in route.holders] if route else []

        await wait_until(lambda: len(holders()) == 2, 10, "both holders routable")
        # Long requests on both pods, so the drained pod has work in flight when its route goes.
        long = [asyncio.create_task(post(session, "lora-a", max_tokens=400)) for _ in range(6)]
        await wait_until(lambda: acc.pods.get(a0) is not None and acc.pods[a0].inflight >= 2, 10, "busy vllm-0")
        stop = asyncio.Event()
        statuses: list[int] = []

        async def steady() -> None:
            while not stop.is_set():
                statuses.append(await post(session, "lora-a"))

        workers = [asyncio.create_task(steady()) for _ in range(8)]
        await wait_until(lambda: len(statuses) >= 50, 10, "steady traffic")
        # The drain: the controller removes vllm-0's endpoint from lora-a's slice.
        started_at_drain: list[int] = []
        table.add_listener(
            lambda: (
                started_at_drain.append(acc.pair_started.get(("lora-a", a0), 0))
                if a0 not in holders() and not started_at_drain
                else None
            )
        )
        drained = {"endpoints": [endpoint(namespace, p1)]}
        await asyncio.to_thread(kube.patch, ENDPOINT_SLICES, lora_a["metadata"]["name"], drained, namespace)
        await wait_until(lambda: a0 not in holders(), 10, "drain seen by the router")
        after = len(statuses)
        await wait_until(lambda: len(statuses) >= after + 200, 20, "traffic after the drain")
        stop.set()
        await asyncio.gather(*workers)
        long_statuses = await asyncio.gather(*long)
        assert started_at_drain, "the route change was seen"
        assert acc.pair_started.get(("lora-a", a0), 0) == started_at_drain[0]  # nothing new on vllm-0
        assert set(statuses) == {200} and long_statuses == [200] * 6  # nothing failed
        assert acc.pods[a0].inflight == 0
        # vllm-0 saw exactly the requests the router started there, all before the drain.
        c0 = await asyncio.to_thread(counters, p0)
        assert c0["requests_by_model"]["lora-a"] == started_at_drain[0]

    asyncio.run(asyncio.wait_for(run_router(api_client, namespace, body), 120))
    c0, c1 = counters(p0), counters(p1)
    assert c0["aborted_by_model"] == {} and c1["aborted_by_model"] == {}
    assert c0["model_not_found"] + c1["model_not_found"] == 0
