"""The router following a real route table: EndpointSlices in a real kube-apiserver, watched by the shared
informer, in front of vLLM simulators on loopback addresses (one per "pod")."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
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
from common.kube import ENDPOINT_SLICES, SERVICES, KubeClient
from router.kube import KubeRouteSource
from router.proxy import RouterConfig
from router.routes import RouteTable
from router.server import RouterService
from router.strategies import make_strategy
from vllmsim import LoraModule, SimConfig, Simulator

pytestmark = pytest.mark.integration

AUTOSCALER = "demo"
BASE = "tiny"


def host_address() -> str:
    """A non-loopback IPv4 address of this machine: the API server refuses loopback endpoints (422)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.255.255.255", 1))  # UDP: no packet is sent, the kernel only picks a source address
        ip = str(s.getsockname()[0])
    assert not ip.startswith("127."), f"no non-loopback IPv4 address to put in EndpointSlices (got {ip})"
    return ip


def sim_config(ip: str, adapters: list[str]) -> SimConfig:
    return SimConfig(
        model=BASE, host=ip, port=0, enable_lora=True, max_loras=2, max_cpu_loras=8,
        allow_runtime_lora_updating=True, step_time=0.002,
        lora_modules=[LoraModule(a, f"/adapters/{a}") for a in adapters],
    )  # fmt: skip


def route_service(namespace: str, model: str, *, base: bool = False) -> dict[str, Any]:
    """The selector-less Service of one model's route table."""
    name = base_service_name(AUTOSCALER) if base else route_service_name(AUTOSCALER, model)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {AUTOSCALER_LABEL: AUTOSCALER}},
        "spec": {"ports": [{"name": "http", "port": 8000, "targetPort": 8000}]},
    }


def route_slice(
    namespace: str, model: str, pod: str, ip: str, port: int | None, *, base: bool = False
) -> dict[str, Any]:
    """One pod's EndpointSlice of a model's route table, labelled and annotated as the controller does.

    The pods here share one IP and differ by port, and a slice has one port list, so each pod gets its own
    slice (a Service may have any number of slices; the router merges them). ``port=None``: no endpoint.
    """
    service = base_service_name(AUTOSCALER) if base else route_service_name(AUTOSCALER, model)
    tier = "base" if base else "preferred"
    labels = {AUTOSCALER_LABEL: AUTOSCALER, ROLE_LABEL: "base" if base else "adapter", TIER_LABEL: tier}
    if not base:
        labels[ADAPTER_LABEL] = model
    annotations = {BASE_MODEL_ANNOTATION: model} if base else {MODEL_ANNOTATION: model}
    endpoints = []
    if port is not None:
        ref = {"kind": "Pod", "name": pod, "namespace": namespace}
        endpoints.append({"addresses": [ip], "conditions": {"ready": True}, "targetRef": ref})
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{slice_name(service, tier)}-{pod}",
            "namespace": namespace,
            # The controller's managed-by value; a label value cannot contain "/", so not api.labels.MANAGED_BY.
            "labels": {**labels, SERVICE_NAME_LABEL: service, MANAGED_BY_LABEL: "controller.loraautoscaler.io"},
            "annotations": annotations,
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port or 8000, "protocol": "TCP"}],
        "endpoints": endpoints,
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


def test_a_thousand_requests_over_three_adapters_reach_their_holders(api_client: ApiClient, namespace: str) -> None:
    kube = KubeClient(api_client)
    placement = {"lora-a": 0, "lora-b": 1, "lora-c": 2}
    ip = host_address()

    async def main() -> None:
        sims = [Simulator(sim_config(ip, [a for a, i in placement.items() if i == n])) for n in range(3)]
        try:
            for sim in sims:
                await sim.start()
            for adapter, n in placement.items():
                await asyncio.to_thread(kube.create, SERVICES, route_service(namespace, adapter), namespace)
                obj = route_slice(namespace, adapter, f"vllm-{n}", ip, sims[n].port)
                await asyncio.to_thread(kube.create, ENDPOINT_SLICES, obj, namespace)
            await asyncio.to_thread(kube.create, SERVICES, route_service(namespace, BASE, base=True), namespace)
            for n, sim in enumerate(sims):
                obj = route_slice(namespace, BASE, f"vllm-{n}", ip, sim.port, base=True)
                await asyncio.to_thread(kube.create, ENDPOINT_SLICES, obj, namespace)

            async def body(svc: RouterService, session: aiohttp.ClientSession) -> None:
                await wait_until(lambda: len(svc.table.models()) == 4, 10, "four routes")
                base_route = svc.table.lookup(BASE)
                assert base_route is not None and base_route.is_base and len(base_route.holders) == 3
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

            await run_router(api_client, namespace, body)
            for adapter, n in placement.items():
                c = sims[n].counters()
                assert c["model_not_found"] == 0
                assert c["requests_by_model"] == {adapter: 334 if adapter == "lora-a" else 333}
        finally:
            for sim in sims:
                await sim.stop()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_draining_an_adapter_from_one_pod_starts_nothing_there_and_fails_nothing(
    api_client: ApiClient, namespace: str
) -> None:
    kube = KubeClient(api_client)
    ip = host_address()

    async def main() -> None:
        sims = [Simulator(sim_config(ip, ["lora-a"])) for _ in range(2)]
        try:
            for sim in sims:
                await sim.start()
            s0, s1 = sims
            a0 = f"{ip}:{s0.port}"
            await asyncio.to_thread(kube.create, SERVICES, route_service(namespace, "lora-a"), namespace)
            for n, sim in enumerate(sims):
                obj = route_slice(namespace, "lora-a", f"vllm-{n}", ip, sim.port)
                await asyncio.to_thread(kube.create, ENDPOINT_SLICES, obj, namespace)

            async def body(svc: RouterService, session: aiohttp.ClientSession) -> None:
                table, acc = svc.table, svc.accounting

                def holders() -> list[str]:
                    route = table.lookup("lora-a")
                    return [h.address for h in route.holders] if route else []

                await wait_until(lambda: len(holders()) == 2, 10, "both holders routable")
                # Long requests on both pods, so the drained pod has work in flight when its route goes.
                long = [asyncio.create_task(post(session, "lora-a", max_tokens=400)) for _ in range(6)]
                await wait_until(lambda: acc.pods.get(a0) is not None and acc.pods[a0].inflight >= 2, 10, "busy s0")
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
                name = route_slice(namespace, "lora-a", "vllm-0", ip, None)["metadata"]["name"]
                await asyncio.to_thread(kube.patch, ENDPOINT_SLICES, name, {"endpoints": []}, namespace)
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
                assert s0.counters()["requests_by_model"]["lora-a"] == started_at_drain[0]

            await run_router(api_client, namespace, body)
            assert s0.counters()["aborted_by_model"] == {} and s1.counters()["aborted_by_model"] == {}
            assert sum(s.counters()["model_not_found"] for s in sims) == 0
        finally:
            for sim in sims:
                await sim.stop()

    asyncio.run(asyncio.wait_for(main(), 120))
