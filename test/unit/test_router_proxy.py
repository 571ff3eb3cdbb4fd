"""The whole router on real sockets in front of vLLM simulators (and, where a test needs a precise upstream
behaviour the simulator does not have, a few lines of aiohttp).

Each test runs its coroutine with ``asyncio.run`` under a deadline; waits are on conditions with deadlines.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from router.proxy import RouterConfig
from router.routes import Holder, RouteTable
from router.server import RouterService
from router.strategies import make_strategy
from vllmsim import LoraModule, SimConfig, Simulator

SIM = SimConfig(
    model="tiny",
    host="127.0.0.1",
    port=0,
    enable_lora=True,
    max_loras=2,
    max_cpu_loras=8,
    allow_runtime_lora_updating=True,
    step_time=0.002,
)


def run(body: Callable[[], Awaitable[None]], limit: float = 60.0) -> None:
    async def main() -> None:
        await asyncio.wait_for(body(), limit)

    asyncio.run(main())


async def wait_until(cond: Callable[[], bool], limit: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {limit}s")
        await asyncio.sleep(0.005)


@asynccontextmanager
async def simulators(adapters: Sequence[Sequence[str]], **overrides: Any) -> AsyncIterator[list[Simulator]]:
    """One simulator per entry, each holding the adapters listed (loaded at start-up)."""
    sims: list[Simulator] = []
    try:
        for names in adapters:
            cfg = replace(SIM, lora_modules=[LoraModule(n, f"/adapters/{n}") for n in names], **overrides)
            sim = Simulator(cfg)
            await sim.start()
            sims.append(sim)
        yield sims
    finally:
        for sim in sims:
            await sim.stop()


def holder(sim: Simulator, name: str | None = None, tier: str = "preferred") -> Holder:
    address = f"127.0.0.1:{sim.port}"
    return Holder(address, name or f"pod-{sim.port}", tier)


@asynccontextmanager
async def router(
    table: RouteTable, strategy: str = "lora-aware", *, scrape: bool = True, **config: Any
) -> AsyncIterator[tuple[RouterService, aiohttp.ClientSession]]:
    table.mark_synced()
    svc = RouterService(
        table,
        make_strategy(strategy, max_loras=2),
        RouterConfig(**config),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        scrape_interval=0.05,
        scrape=scrape,
    )
    await svc.start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{svc.bound_port}") as session:
            yield svc, session
    finally:
        await svc.stop()


def counters(sim: Simulator) -> dict[str, Any]:
    return sim.counters()


async def complete(session: aiohttp.ClientSession, model: str, **extra: Any) -> tuple[int, Any]:
    body = {"model": model, "prompt": "hello there", "max_tokens": 3, **extra}
    async with session.post("/v1/completions", json=body) as resp:
        data = await resp.read()
        return resp.status, orjson.loads(data) if resp.content_type == "application/json" else data


def in_flight(svc: RouterService, h: Holder) -> int:
    state = svc.accounting.pods.get(h.address)
    return state.inflight if state is not None else 0


def free_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- routing -----------------------------------------------------------------------------------------------


def test_every_request_reaches_a_holder_of_its_adapter() -> None:
    async def body() -> None:
        async with simulators([["a", "c"], ["b"], ["c"]]) as sims:
            table = RouteTable()
            table.set_route("a", [holder(sims[0])])
            table.set_route("b", [holder(sims[1])])
            table.set_route("c", [holder(sims[0]), holder(sims[2])])
            table.set_route("tiny", [holder(s) for s in sims], base=True)
            async with router(table) as (_svc, session):
                models = ["a", "b", "c", "tiny"] * 25
                results = await asyncio.gather(*(complete(session, m) for m in models))
                assert [s for s, _ in results] == [200] * len(models)
                assert all(r["model"] == m for (_, r), m in zip(results, models, strict=True))
                # Chat and streams too.
                async with session.post(
                    "/v1/chat/completions",
                    json={"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                ) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["object"] == "chat.completion"
                async with session.post(
                    "/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 4, "stream": True}
                ) as resp:
                    assert resp.headers["Content-Type"].startswith("text/event-stream")
                    text = (await resp.read()).decode()
                    assert text.count("data: ") == 5 and text.rstrip().endswith("data: [DONE]")
        seen = [counters(s) for s in sims]
        assert [c["model_not_found"] for c in seen] == [0, 0, 0]
        assert set(seen[0]["requests_by_model"]) <= {"a", "c", "tiny"}
        assert set(seen[1]["requests_by_model"]) <= {"b", "tiny"}
        assert set(seen[2]["requests_by_model"]) <= {"c", "tiny"}
        assert sum(c["requests_by_model"].get("c", 0) for c in seen) == 25

    run(body)


def test_unknown_model_is_an_immediate_404_listing_the_served_models() -> None:
    async def body() -> None:
        async with simulators([["a"]]) as sims:
            table = RouteTable()
            table.set_route("a", [holder(sims[0])])
            table.set_route("tiny", [holder(sims[0])], base=True)
            table.set_route("drained", [])
            async with router(table, queue_timeout=30.0) as (_svc, session):
                started = time.monotonic()
                status, err = await complete(session, "nope")
                assert time.monotonic() - started < 1.0
                assert status == 404
                assert err["error"]["type"] == "NotFoundError" and err["error"]["param"] == "model"
                assert "`nope` does not exist" in err["error"]["message"]
                assert "a, tiny" in err["error"]["message"]
                async with session.get("/v1/models") as resp:
                    listing = await resp.json()
                assert [(m["id"], m["parent"]) for m in listing["data"]] == [("a", "tiny"), ("tiny", None)]
                async with session.get("/v1/models/a") as resp:
                    assert resp.status == 200 and (await resp.json())["id"] == "a"
                async with session.get("/v1/models/zzz") as resp:
                    assert resp.status == 404
                async with session.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"}) as resp:
                    assert resp.status == 404  # the router never exposes the management API
                    assert "does not serve" in (await resp.json())["error"]["message"]
                async with session.get("/version") as resp:
                    assert resp.status == 200
                async with session.get("/health") as resp:
                    assert resp.status == 200

    run(body)


def test_malformed_requests_get_a_400_and_big_ones_a_413() -> None:
    async def body() -> None:
        async with simulators([["a"]]) as sims:
            table = RouteTable()
            table.set_route("a", [holder(sims[0])])
            async with router(table, max_body_bytes=1000) as (svc, session):
                cases = [
                    (b"{oops", "application/json", "not valid JSON"),
                    (b'{"prompt": "x"}', "application/json", "no 'model'"),
                    (b'{"model": "a"}', "text/plain", "Content-Type must be application/json"),
                    (b"", "application/json", "empty"),
                ]
                for data, ctype, fragment in cases:
                    async with session.post("/v1/completions", data=data, headers={"Content-Type": ctype}) as resp:
                        assert resp.status == 400, fragment
                        err = (await resp.json())["error"]
                        assert fragment in err["message"] and err["code"] == 400
                big = orjson.dumps({"model": "a", "prompt": "x" * 2000})
                async with session.post("/v1/completions", data=big, headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 413 and "limit" in (await r.json())["error"]["message"]

                async def chunked() -> AsyncIterator[bytes]:
                    for _ in range(3):
                        yield b" " * 600

                async with session.post(
                    "/v1/completions", data=chunked(), headers={"Content-Type": "application/json"}
                ) as r:
                    assert r.status == 413
                assert svc.accounting.models.get("a") is None  # nothing reached a pod
        assert counters(sims[0])["requests_by_model"] == {}

    run(body)


# --- drains, retries, stale routes -------------------------------------------------------------------------


def test_a_drained_pod_gets_no_new_requests_while_its_in_flight_ones_finish() -> None:
    async def body() -> None:
        async with simulators([["a"], ["a"]]) as (s0, s1):
            table = RouteTable()
            table.set_route("a", [holder(s0), holder(s1)])
            async with router(table, "least-outstanding") as (svc, session):

                async def long_stream() -> str:
                    async with session.post(
                        "/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 150, "stream": True}
                    ) as resp:
                        assert resp.status == 200
                        return (await resp.read()).decode()

                long = [asyncio.create_task(long_stream()) for _ in range(4)]
                await wait_until(lambda: counters(s0)["in_flight_by_adapter"].get("a", 0) == 2, what="2 on s0")
                before = counters(s0)["requests_by_model"]["a"]
                table.set_route("a", [holder(s1)])  # the drain: s0 leaves a's route table
                results = await asyncio.gather(*(complete(session, "a") for _ in range(30)))
                assert [s for s, _ in results] == [200] * 30
                assert counters(s0)["requests_by_model"]["a"] == before
                assert counters(s0)["in_flight_by_adapter"].get("a", 0) == 2  # still streaming there
                texts = await asyncio.gather(*long)
                assert all(t.rstrip().endswith("data: [DONE]") and t.count("data: ") == 151 for t in texts)
                assert in_flight(svc, holder(s0)) == 0
        assert counters(s0)["aborted_by_model"] == {} and counters(s1)["aborted_by_model"] == {}

    run(body)


def test_a_connection_failure_is_retried_once_on_another_holder() -> None:
    async def body() -> None:
        async with simulators([["a"]]) as (s0,):
            dead = Holder(f"127.0.0.1:{free_port()}", "dead-pod")
            table = RouteTable()
            table.set_route("a", [dead, holder(s0, "live-pod")])
            table.set_route("only-dead", [dead])
            async with router(table, "least-outstanding") as (svc, session):
                results = await asyncio.gather(*(complete(session, "a") for _ in range(20)))
                assert [s for s, _ in results] == [200] * 20
                assert counters(s0)["requests_by_model"]["a"] == 20
                errors = svc.accounting.errors
                assert errors.get(("a", "dead-pod", "connect"), 0) >= 5  # tries spread evenly, then retried
                assert svc.accounting.codes[("a", "live-pod", 200)] == 20
                # With no other holder: one retry on the same, then a clear 502 (never a hang).
                status, err = await complete(session, "only-dead")
                assert status == 502
                assert err["error"]["type"] == "BadGateway" and "dead-pod" in err["error"]["message"]
                assert errors[("only-dead", "dead-pod", "connect")] == 2
                # Counted once, as the answer the client got; the failed attempts are errors, not requests.
                assert svc.accounting.codes == {("a", "live-pod", 200): 20, ("only-dead", "dead-pod", 502): 1}
                assert svc.accounting.models["only-dead"].inflight == 0

    run(body)


def test_a_stale_route_is_retried_on_a_pod_that_holds_the_adapter() -> None:
    async def body() -> None:
        async with simulators([[], ["a"]]) as (s0, s1):
            table = RouteTable()
            table.set_route("a", [holder(s0, "stale"), holder(s1, "good")])
            async with router(table, "least-outstanding") as (svc, session):
                results = await asyncio.gather(*(complete(session, "a") for _ in range(10)))
                assert [s for s, _ in results] == [200] * 10
                assert counters(s1)["requests_by_model"]["a"] == 10
                assert counters(s0)["model_not_found"] == svc.accounting.errors[("a", "stale", "stale_route")] >= 1

    run(body)


def test_a_known_model_without_holders_waits_in_the_router_then_answers_503() -> None:
    async def body() -> None:
        async with simulators([["a"]]) as (s0,):
            table = RouteTable()
            table.set_route("a", [])
            async with router(table, queue_timeout=5.0) as (svc, session):
                pending = asyncio.create_task(complete(session, "a"))
                await wait_until(lambda: svc.accounting.model("a").queued == 1, what="queued")
                port = svc.bound_metrics_port
                async with aiohttp.ClientSession() as m, m.get(f"http://127.0.0.1:{port}/router/load") as resp:
                    load = await resp.json()
                assert load["models"]["a"]["queued"] == 1 and load["models"]["a"]["routable"] is False
                table.set_route("a", [holder(s0)])  # a holder appears: the waiting request goes at once
                status, _ = await pending
                assert status == 200
                assert svc.accounting.model("a").queued == 0
            table.set_route("a", [])
            async with router(table, queue_timeout=0.2) as (svc, session):
                status, err = await complete(session, "a")
                assert status == 503 and err["error"]["type"] == "ServiceUnavailable"

    run(body)


# --- streaming, timeouts, disconnects (a scripted upstream) -------------------------------------------------


@asynccontextmanager
async def scripted_upstream(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> AsyncIterator[Holder]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Holder(f"127.0.0.1:{port}", "scripted")
    finally:
        await runner.cleanup()


def test_stream_chunks_reach_the_client_before_the_upstream_produces_the_last() -> None:
    async def body() -> None:
        release = asyncio.Event()
        produced_last = asyncio.Event()

        async def handler(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b'data: {"n": 1}\n\n')
            await asyncio.wait_for(release.wait(), 10)
            produced_last.set()
            await resp.write(b'data: {"n": 2}\n\ndata: [DONE]\n\n')
            await resp.write_eof()
            return resp

        async with scripted_upstream(handler) as up:
            table = RouteTable()
            table.set_route("a", [up])
            async with router(table, scrape=False) as (svc, session):
                async with session.post("/v1/completions", json={"model": "a", "stream": True}) as resp:
                    first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
                    assert first == b'data: {"n": 1}\n\n'
                    assert not produced_last.is_set()
                    assert svc.accounting.models["a"].inflight == 1
                    release.set()
                    rest = await asyncio.wait_for(resp.content.read(), 5)
                assert rest == b'data: {"n": 2}\n\ndata: [DONE]\n\n'
                assert svc.accounting.models["a"].inflight == 0

    run(body)


def test_timeouts_and_broken_streams_become_clear_errors() -> None:
    async def body() -> None:
        async def slow(request: web.Request) -> web.StreamResponse:
            if request.path == "/v1/completions":
                await asyncio.sleep(5)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b'data: {"n": 1}\n\n')
            request.transport.close()  # type: ignore[union-attr]  # the pod dies mid-stream
            return resp

        async with scripted_upstream(slow) as up:
            table = RouteTable()
            table.set_route("a", [up])
            async with router(table, scrape=False, first_byte_timeout=0.3) as (svc, session):
                started = time.monotonic()
                status, err = await complete(session, "a")
                assert status == 504 and err["error"]["type"] == "GatewayTimeout"
                assert time.monotonic() - started < 2.0
                async with session.post("/v1/chat/completions", json={"model": "a", "stream": True}) as resp:
                    assert resp.status == 200
                    text = (await resp.read()).decode()
                assert text.startswith('data: {"n": 1}')
                assert '"error"' in text and "broke" in text and text.rstrip().endswith("data: [DONE]")
                assert svc.accounting.errors[("a", "scripted", "stream_broken")] == 1
                assert svc.accounting.codes == {("a", "scripted", 504): 1, ("a", "scripted", 502): 1}
                assert svc.accounting.errors[("a", "scripted", "timeout")] == 1
                assert svc.accounting.models["a"].inflight == 0

    run(body)


def test_a_client_that_leaves_mid_stream_frees_its_slot_and_aborts_upstream() -> None:
    async def body() -> None:
        async with simulators([["a"]]) as (s0,):
            table = RouteTable()
            table.set_route("a", [holder(s0, "p0")])
            async with router(table) as (svc, session):
                resp = await session.post(
                    "/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2000, "stream": True}
                )
                await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
                resp.close()  # the client goes away
                await wait_until(lambda: svc.accounting.models["a"].inflight == 0, what="router in-flight drops")
                await wait_until(lambda: counters(s0)["aborted_by_model"].get("a") == 1, what="upstream aborted")
                assert sum(n for (m, _p, c), n in svc.accounting.codes.items() if m == "a" and c == 499) == 1

    run(body)


# --- strategy in a real setting, API key, observability ----------------------------------------------------


def test_lora_aware_sends_an_adapter_away_from_a_pod_whose_budget_is_full() -> None:
    async def body() -> None:
        async with simulators([["a", "b", "c"], ["a"]]) as (s0, s1):
            table = RouteTable()
            table.set_route("a", [holder(s0, "full"), holder(s1, "free")])
            table.set_route("b", [holder(s0, "full")])
            table.set_route("c", [holder(s0, "full")])
            async with router(table) as (svc, session):
                hold = [asyncio.create_task(complete(session, m, max_tokens=300)) for m in ("b", "c", "b", "c")]
                await wait_until(lambda: in_flight(svc, holder(s0)) == 4, what="s0 busy")
                results = await asyncio.gather(*(complete(session, "a") for _ in range(12)))
                assert [s for s, _ in results] == [200] * 12
                assert counters(s1)["requests_by_model"]["a"] == 12
                assert "a" not in counters(s0)["requests_by_model"]
                await asyncio.gather(*hold)

    run(body)


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_waiting_for_a_lora_slot_moves_to_a_holder_where_its_adapter_runs(stream: bool) -> None:
    """pod-0 runs b and c (max_loras 2) for seconds; least-outstanding still sends an `a` request there
    (pod-1 has more in flight). Past --move-deferred-after it leaves for pod-1, where `a` runs."""

    async def body() -> None:
        async with simulators([["a", "b", "c"], ["a"]]) as (s0, s1):
            table = RouteTable()
            table.set_route("a", [holder(s1, "pod-1")])
            for m in ("b", "c"):
                table.set_route(m, [holder(s0, "pod-0")])
            async with router(table, "least-outstanding", move_deferred_after=0.3, move_check_interval=0.05,
                              max_loras=2) as (svc, session):
                hold = [asyncio.create_task(complete(session, m, max_tokens=3000)) for m in ("b", "c")]
                keep = [asyncio.create_task(complete(session, "a", max_tokens=3000)) for _ in range(4)]
                await wait_until(lambda: in_flight(svc, holder(s0)) == 2 and in_flight(svc, holder(s1)) == 4,
                                 what="both pods busy")
                await wait_until(lambda: {"b", "c"} <= set(s0.state.engine.running_lora_adapters())
                                 and "a" in s1.state.engine.running_lora_adapters(), what="adapters running")
                await wait_until(lambda: all(st.metrics is not None for st in svc.accounting.pods.values()),
                                 what="both pods scraped")
                table.set_route("a", [holder(s0, "pod-0"), holder(s1, "pod-1")])
                status, data = await complete(session, "a", max_tokens=5, stream=stream)
                assert status == 200
                if stream:
                    assert b"data: [DONE]" in data
                else:
                    assert data["choices"][0]["finish_reason"] == "length"
                assert svc.accounting.moves == {("a", "pod-0"): 1}
                assert counters(s1)["requests_by_model"]["a"] == 5
                await wait_until(lambda: counters(s0)["aborted_by_model"].get("a") == 1,
                                 what="the request left on pod-0 aborted there")
                for task in hold + keep:
                    task.cancel()
                await asyncio.gather(*hold, *keep, return_exceptions=True)

    run(body)


def test_a_request_whose_holders_have_no_lora_slot_waits_in_the_router_for_the_first_to_free() -> None:
    """Both pods run two other adapters (max_loras 2). With --hold-for-slot, requests for `a` and then `f`
    wait in the router (counted as queued, nothing sent); when an adapter leaves pod-1, the oldest held
    request (`a`) takes its slot there; when `a` leaves in turn, `f` takes it."""

    async def body() -> None:
        async with simulators([["a", "b", "c", "f"], ["a", "d", "e", "f"]]) as (s0, s1):
            table = RouteTable()
            for m in ("a", "f"):
                table.set_route(m, [holder(s0, "pod-0"), holder(s1, "pod-1")])
            for m, sim in (("b", s0), ("c", s0), ("d", s1), ("e", s1)):
                table.set_route(m, [holder(sim, f"pod-{0 if sim is s0 else 1}")])
            async with router(table, hold_for_slot=30.0, max_loras=2) as (svc, session):
                acc = svc.accounting
                busy = {m: asyncio.create_task(complete(session, m, max_tokens=100_000)) for m in "bcde"}
                await wait_until(lambda: in_flight(svc, holder(s0)) == 2 and in_flight(svc, holder(s1)) == 2,
                                 what="both pods busy")
                held_a = asyncio.create_task(complete(session, "a", max_tokens=100_000))
                await wait_until(lambda: acc.model("a").queued == 1, what="`a` held")
                held_f = asyncio.create_task(complete(session, "f", max_tokens=5))
                await wait_until(lambda: acc.model("f").queued == 1, what="`f` held")
                assert "a" not in counters(s0)["requests_by_model"] and "a" not in counters(s1)["requests_by_model"]

                busy["e"].cancel()  # the client leaves: `e` leaves pod-1, `a` (the oldest) takes its slot
                await wait_until(lambda: counters(s1)["requests_by_model"].get("a") == 1, what="`a` sent to pod-1")
                assert acc.model("a").queued == 0 and acc.model("f").queued == 1
                assert "a" not in counters(s0)["requests_by_model"] and "f" not in counters(s1)["requests_by_model"]

                held_a.cancel()  # `a` leaves pod-1 in turn: `f` takes the slot
                status, data = await asyncio.wait_for(held_f, 10)
                assert status == 200 and data["choices"][0]["finish_reason"] == "length"
                assert counters(s1)["requests_by_model"]["f"] == 1 and "f" not in counters(s0)["requests_by_model"]
                assert acc.model("f").queued == 0
                for task in busy.values():
                    task.cancel()
                await asyncio.gather(held_a, *busy.values(), return_exceptions=True)

    run(body)


def test_a_held_request_is_sent_anyway_when_its_time_runs_out() -> None:
    """No slot frees within --hold-for-slot: the request goes to a holder and waits there for a slot."""

    async def body() -> None:
        async with simulators([["a", "b", "c"]]) as (s0,):
            table = RouteTable()
            for m in "abc":
                table.set_route(m, [holder(s0, "pod-0")])
            async with router(table, hold_for_slot=0.3, max_loras=2) as (svc, session):
                busy = {m: asyncio.create_task(complete(session, m, max_tokens=100_000)) for m in "bc"}
                await wait_until(lambda: in_flight(svc, holder(s0)) == 2, what="the pod busy")
                late = asyncio.create_task(complete(session, "a", max_tokens=5))
                await wait_until(lambda: counters(s0)["requests_by_model"].get("a") == 1,
                                 what="`a` sent to the pod after its hold")
                assert svc.accounting.model("a").queued == 0 and not late.done()
                busy["b"].cancel()
                status, _ = await asyncio.wait_for(late, 10)
                assert status == 200
                busy["c"].cancel()
                await asyncio.gather(*busy.values(), return_exceptions=True)

    run(body)


def test_api_key_is_forwarded_to_the_pods() -> None:
    async def body() -> None:
        async with simulators([["a"]], api_keys=["s3cret"]) as (s0,):
            table = RouteTable()
            table.set_route("a", [holder(s0)])
            async with router(table, api_key="s3cret") as (_svc, session):
                status, _ = await complete(session, "a")
                assert status == 200
            async with router(table) as (_svc, session):
                status, _ = await complete(session, "a")
                assert status == 401  # the pod's answer, passed through

    run(body)


def test_load_report_and_prometheus_metrics() -> None:
    async def body() -> None:
        async with simulators([["a"], ["a"]]) as (s0, s1):
            table = RouteTable()
            table.set_route("a", [holder(s0, "p0")], [holder(s1, "p1")])
            table.set_route("tiny", [holder(s0, "p0")], base=True)
            async with router(table) as (svc, session):
                svc.accounting.snapshot(asyncio.get_running_loop().time() - 1.0)
                hold = asyncio.create_task(complete(session, "a", max_tokens=400))
                await wait_until(lambda: svc.accounting.models.get("a") is not None, what="started")
                for _ in range(10):
                    assert (await complete(session, "a"))[0] == 200
                await wait_until(
                    lambda: all(s.metrics is not None for s in svc.accounting.pods.values()), what="scraped"
                )
                base = f"http://127.0.0.1:{svc.bound_metrics_port}"
                async with aiohttp.ClientSession(base) as m:
                    async with m.get("/router/load") as resp:
                        load = await resp.json()
                    async with m.get("/metrics") as resp:
                        prom = await resp.text()
                await hold
        a = load["models"]["a"]
        assert a["in_flight"] == 1 and a["queued"] == 0 and a["routable"] and a["base"] is False
        assert a["started_total"] == 11 and a["rate"] > 0
        assert set(a["pods"]) == {"p0", "p1"}
        assert a["pods"]["p1"]["tier"] == "fallback"
        assert sum(p["in_flight"] for p in a["pods"].values()) == 1
        assert load["models"]["tiny"]["base"] is True
        assert load["strategy"]["name"] == "lora-aware" and load["routes_synced"] is True
        scraped = load["pods"]["p0"]["scraped"]
        assert scraped["max_loras"] == 2
        assert 'lora_router_requests_total{code="200",model="a"' in prom
        assert "lora_router_in_flight_requests{" in prom
        assert "lora_router_time_to_first_byte_seconds_bucket{" in prom
        assert "lora_router_request_duration_seconds_count{" in prom

    run(body)


@pytest.mark.parametrize("strategy", ["least-outstanding", "gie", "lora-aware"])
def test_every_strategy_serves_through_the_proxy(strategy: str) -> None:
    async def body() -> None:
        async with simulators([["a"], ["a"]]) as sims:
            table = RouteTable()
            table.set_route("a", [holder(s) for s in sims])
            async with router(table, strategy) as (_svc, session):
                results = await asyncio.gather(*(complete(session, "a") for _ in range(20)))
                assert [s for s, _ in results] == [200] * 20
        per_sim = [counters(s)["requests_by_model"].get("a", 0) for s in sims]
        assert sum(per_sim) == 20
        assert min(per_sim) > 0  # 20 concurrent requests on two equal holders use both

    run(body)
