"""The simulator's HTTP server in-process: faults, the /sim/ control API, auth, caching and metrics.

Each test runs its coroutine with ``asyncio.run`` against a real aiohttp server on a free loopback port; waits
are on conditions with deadlines, and the time scale keeps modelled durations short.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from vllmsim import SimConfig, Simulator
from vllmsim.config import FaultSettings
from vllmsim.promtext import adapter_list, newest_lora_info, parse, value
from vllmsim.server import rank_from_path, text_for

BASE = SimConfig(
    model="tiny",
    host="127.0.0.1",
    port=0,
    enable_lora=True,
    max_loras=2,
    max_cpu_loras=8,
    max_lora_rank=8,
    allow_runtime_lora_updating=True,
    time_scale=20.0,
    load_time=0.02,
)


def run(cfg: SimConfig, body: Callable[[Simulator, aiohttp.ClientSession], Awaitable[None]]) -> None:
    """Start a simulator, run the test body with a client session, always stop."""

    async def main() -> None:
        sim = Simulator(cfg)
        await sim.start()
        try:
            async with aiohttp.ClientSession(base_url=sim.url) as session:
                await asyncio.wait_for(body(sim, session), 60)
        finally:
            await sim.stop()

    asyncio.run(main())


async def wait_for(cond: Callable[[], Awaitable[bool]], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met before deadline")


async def load(s: aiohttp.ClientSession, name: str, path: str | None = None, **extra: Any) -> tuple[int, str]:
    async with s.post(
        "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path or f"/adapters/{name}", **extra}
    ) as r:
        return r.status, await r.text()


async def complete(s: aiohttp.ClientSession, model: str, max_tokens: int = 4) -> tuple[int, dict[str, Any]]:
    async with s.post("/v1/completions", json={"model": model, "prompt": "hi there", "max_tokens": max_tokens}) as r:
        return r.status, await r.json()


async def metrics(s: aiohttp.ClientSession) -> list[Any]:
    async with s.get("/metrics") as r:
        assert r.status == 200
        return parse(await r.text())


async def events(s: aiohttp.ClientSession, since: int = 0) -> dict[str, Any]:
    async with s.get(f"/sim/events?since={since}") as r:
        assert r.status == 200
        return await r.json()


async def faults(s: aiohttp.ClientSession, **settings: Any) -> tuple[int, dict[str, Any]]:
    async with s.post("/sim/faults", json=settings) as r:
        return r.status, await r.json()


def test_load_failures_fail_n_times_with_500_then_succeed() -> None:
    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        status, _ = await faults(s, load_failures=2)
        assert status == 200
        for _ in range(2):
            st, text = await load(s, "a")
            assert st == 500
            assert json.loads(text)["error"]["type"] == "InternalServerError"
        assert (await load(s, "a"))[0] == 200
        ev = await events(s)
        loads = [e for e in ev["events"] if e["kind"] == "load"]
        assert [e["status"] for e in loads] == [500, 500, 200]
        assert ev["counters"]["loads_failed"] == 2 and ev["counters"]["loads_ok"] == 1

    run(BASE, body)


def test_load_failures_per_adapter_and_from_flags() -> None:
    cfg = replace(BASE, faults=FaultSettings(load_failures_by_adapter={"b": 1}))

    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        assert (await load(s, "a"))[0] == 200
        assert (await load(s, "b"))[0] == 500
        assert (await load(s, "b"))[0] == 200

    run(cfg, body)


def test_slow_load_takes_at_least_the_delay() -> None:
    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        await faults(s, load_delay=4.0)  # simulated seconds: 0.2 s real at scale 20
        t0 = time.monotonic()
        assert (await load(s, "a"))[0] == 200
        assert time.monotonic() - t0 >= 4.0 / 20

    run(BASE, body)


def test_error_count_and_error_rate_answer_5xx() -> None:
    async def body_rate(sim: Simulator, s: aiohttp.ClientSession) -> None:
        await faults(s, error_rate=0.5)
        statuses = [(await complete(s, "tiny", 1))[0] for _ in range(40)]
        assert 5 <= statuses.count(500) <= 35
        assert statuses.count(200) + statuses.count(500) == 40

    run(BASE, body_rate)

    async def body_fixed(sim: Simulator, s: aiohttp.ClientSession) -> None:
        await faults(s, error_count=2, error_status=503)
        statuses = [(await complete(s, "tiny", 1))[0] for _ in range(3)]
        assert statuses == [503, 503, 200]
        await faults(s, error_rate=1.0)
        st, err = await complete(s, "tiny", 1)
        assert st == 503  # the status set earlier stays until changed
        assert err["error"]["code"] == 503
        ev = await events(s)
        assert ev["counters"]["errors_injected"] == 3

    run(BASE, body_fixed)


def test_unknown_model_is_404_before_any_injected_error_and_counted() -> None:
    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        await faults(s, error_rate=1.0)
        st, err = await complete(s, "nope")
        assert st == 404
        assert err["error"]["message"] == "The model `nope` does not exist. Valid aliases: tiny."
        ev = await events(s)
        assert ev["counters"]["model_not_found"] == 1
        assert ev["counters"]["not_found_by_model"] == {"nope": 1}

    run(BASE, body)


def test_bad_fault_settings_are_refused_with_a_reason() -> None:
    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"load_failures": -1}, "non-negative integer"),
            ({"error_rate": 2}, "between 0 and 1"),
            ({"bogus": 1}, "unknown fault setting"),
            ({"unhealthy": "yes"}, "true or false"),
            ({"error_status": 200}, "HTTP error status"),
        ]
        for bad, msg in cases:
            st, out = await faults(s, **bad)
            assert st == 400, bad
            assert msg in out["error"]["message"]
        async with s.get("/sim/faults") as r:
            assert (await r.json())["error_status"] == 500  # nothing applied

    run(BASE, body)


def test_unhealthy_fault_and_reset() -> None:
    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        await faults(s, unhealthy=True)
        async with s.get("/health") as r:
            assert r.status == 503
        async with s.delete("/sim/faults") as r:
            assert r.status == 200
        async with s.get("/health") as r:
            assert r.status == 200
            assert await r.read() == b""

    run(BASE, body)


def test_in_process_crash_stops_serving_and_restart_forgets_runtime_adapters() -> None:
    from vllmsim.config import LoraModule

    cfg = replace(BASE, lora_modules=[LoraModule("startup", "/adapters/startup")])

    async def main() -> None:
        sim = Simulator(cfg)
        await sim.start()
        port = sim.port
        try:
            async with aiohttp.ClientSession(base_url=sim.url) as s:
                assert (await load(s, "runtime"))[0] == 200
                await faults(s, crash=True)
                assert sim.crashed is not None
                await asyncio.wait_for(sim.crashed.wait(), 10)
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with s.get("/health"):
                        pass
            sim.port = port
            await sim.start()  # the supervisor's restart
            async with aiohttp.ClientSession(base_url=sim.url) as s, s.get("/v1/models") as r:
                ids = [m["id"] for m in (await r.json())["data"]]
            assert ids == ["tiny", "startup"]
            assert sim.generation == 2
        finally:
            await sim.stop()

    asyncio.run(main())


def test_crash_after_requests_fault_cuts_the_nth_request() -> None:
    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        await faults(s, crash_after_requests=2)
        assert (await complete(s, "tiny", 1))[0] == 200
        with pytest.raises(aiohttp.ClientError):
            await complete(s, "tiny", 1)
        assert sim.crashed is not None and sim.crashed.is_set()

    run(BASE, body)


def test_unload_event_records_in_flight_requests_for_drain_checks() -> None:
    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        assert (await load(s, "a"))[0] == 200
        task = asyncio.ensure_future(complete(s, "a", max_tokens=100_000))
        await wait_for(lambda: _in_flight(sim, "a", 1))
        async with s.post("/v1/unload_lora_adapter", json={"lora_name": "a"}) as r:
            assert r.status == 200
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await wait_for(lambda: _in_flight(sim, "a", 0))
        assert (await load(s, "a"))[0] == 200
        async with s.post("/v1/unload_lora_adapter", json={"lora_name": "a"}) as r:
            assert r.status == 200
        ev = await events(s)
        unloads = [e for e in ev["events"] if e["kind"] == "unload"]
        assert [u["in_flight"] for u in unloads] == [1, 0]
        assert ev["counters"]["aborted_by_model"] == {"a": 1}
        # since= returns only newer events
        last = ev["events"][-1]["seq"]
        assert (await events(s, last))["events"] == []

    run(BASE, body)


async def _in_flight(sim: Simulator, adapter: str, n: int) -> bool:
    return sim.state.engine.in_flight_by_adapter.get(adapter, 0) == n


def test_api_key_guards_v1_routes_only() -> None:
    cfg = replace(BASE, api_keys=["secret"])

    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        async with s.get("/v1/models") as r:
            assert r.status == 401
            assert await r.json() == {"error": "Unauthorized"}
        async with s.get("/v1/models", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with s.get("/v1/models", headers={"Authorization": "Bearer secret"}) as r:
            assert r.status == 200
        async with s.get("/health") as r:
            assert r.status == 200
        async with s.get("/metrics") as r:
            assert r.status == 200

    run(cfg, body)


def test_cpu_cache_eviction_keeps_names_listed_and_reloads_on_use() -> None:
    cfg = replace(BASE, max_loras=1, max_cpu_loras=2, load_time=1.0)

    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        for name in ("a", "b", "c"):
            assert (await load(s, name))[0] == 200
        ev = await events(s)
        assert [e["adapter"] for e in ev["events"] if e["kind"] == "evict"] == ["a"]
        async with s.get("/v1/models") as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["tiny", "a", "b", "c"]
        assert (await complete(s, "a", 1))[0] == 200
        ev = await events(s)
        assert ev["counters"]["adapter_reloads"] == 1
        assert "a" in sim.state.engine.cpu_cache

    run(cfg, body)


def test_rank_convention_for_symbolic_paths_and_rank_from_disk(tmp_path: Path) -> None:
    assert rank_from_path("s3://bucket/rank-32/lora-a") == 32
    assert rank_from_path("/adapters/lora_rank16") == 16
    assert rank_from_path("hf://org/adapter") == 8
    good = tmp_path / "good"
    good.mkdir()
    (good / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q"]}))
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "adapter_config.json").write_text(json.dumps({"r": 64}))
    empty = tmp_path / "empty"
    empty.mkdir()

    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        assert (await load(s, "sym", "s3://bucket/rank-8/x"))[0] == 200
        st, text = await load(s, "sym32", "s3://bucket/rank-32/x")
        assert st == 500 and "LoRA rank 32 is greater than max_lora_rank 8" in text
        assert (await load(s, "good", str(good)))[0] == 200
        st, text = await load(s, "wide", str(wide))
        assert st == 500 and "LoRA rank 64 is greater than max_lora_rank 8" in text
        st, text = await load(s, "empty", str(empty))
        assert st == 404 and "No adapter found" in text
        assert sim.state.registry["good"].rank == 4

    run(BASE, body)


def test_check_paths_refuses_missing_paths() -> None:
    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        st, text = await load(s, "x", "/does/not/exist")
        assert st == 404
        assert json.loads(text)["error"]["type"] == "NotFoundError"

    run(replace(BASE, check_paths=True), body)


def test_streaming_client_disconnect_aborts_the_request() -> None:
    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        assert (await load(s, "a"))[0] == 200
        r = await s.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 1_000_000, "stream": True})
        assert r.status == 200
        first = await r.content.readline()
        assert first.startswith(b"data: {")
        r.close()
        await wait_for(lambda: _in_flight(sim, "a", 0))
        assert not sim.state.engine.has_work()

    run(BASE, body)


def test_deferral_through_http_metrics_names_only_scheduled_adapters() -> None:
    """With --max-loras 2 and 4 adapters in flight the lists name 2 adapters and the rest are deferred."""

    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        async with s.get("/metrics") as r:
            text = await r.text()
        assert "# TYPE vllm:lora_requests_info gauge" in text
        assert newest_lora_info(parse(text)) is None  # no samples before the first request
        for name in ("lora-0", "lora-1", "lora-2", "lora-3"):
            assert (await load(s, name))[0] == 200
        plan = ["lora-0"] * 4 + ["lora-1"] * 4 + ["lora-2"] * 2 + ["lora-3"] * 2
        tasks = []
        for name in plan:  # sequential arrival keeps FCFS order deterministic
            tasks.append(asyncio.ensure_future(complete(s, name, max_tokens=1_000_000)))
            count = len(tasks)
            await wait_for(lambda: _total(sim, count))  # noqa: B023 - awaited before count changes

        async def settled() -> bool:
            m = await metrics(s)
            return value(m, "vllm:num_requests_running") == 8.0 and value(m, "vllm:num_requests_waiting") == 4.0

        await wait_for(settled)
        m = await metrics(s)
        assert value(m, "vllm:num_requests_waiting_by_reason", reason="deferred") == 4.0
        assert value(m, "vllm:num_requests_waiting_by_reason", reason="capacity") == 0.0
        newest = newest_lora_info(m)
        assert newest is not None
        assert sorted(adapter_list(newest.labels["running_lora_adapters"])) == ["lora-0", "lora-1"]
        assert newest.labels["waiting_lora_adapters"] == newest.labels["running_lora_adapters"]
        assert newest.labels["max_lora"] == "2"
        assert abs(newest.value - time.time()) < 5
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        async def drained() -> bool:
            n = newest_lora_info(await metrics(s))
            return n is not None and n.labels["running_lora_adapters"] == ""

        await wait_for(drained)
        m = await metrics(s)
        assert value(m, "vllm:num_requests_running") == 0.0
        series = [x for x in m if x.name == "vllm:lora_requests_info"]
        assert len(series) >= 2  # old label sets linger

    run(BASE, body)


async def _total(sim: Simulator, n: int) -> bool:
    return sum(sim.state.engine.in_flight_by_adapter.values()) == n


def test_disable_log_stats_has_no_vllm_metrics() -> None:
    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        await complete(s, "tiny", 1)
        async with s.get("/metrics") as r:
            assert r.status == 200
            assert "vllm:" not in await r.text()

    run(replace(BASE, disable_log_stats=True), body)


def test_request_validation_errors() -> None:
    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        cases: list[tuple[dict[str, Any], str | None]] = [
            ({"model": "tiny"}, "body.prompt"),
            ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
            ({"model": "tiny", "prompt": "x", "max_tokens": "ten"}, "body.max_tokens"),
            ({"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
            ({"model": "tiny", "prompt": "x", "n": 2}, "n"),
            ({"model": "tiny", "prompt": "x", "stream": "yes"}, "body.stream"),
        ]
        for req, param in cases:
            async with s.post("/v1/completions", json=req) as r:
                assert r.status == 400, req
                assert (await r.json())["error"]["param"] == param
        async with s.post("/v1/chat/completions", json={"model": "tiny"}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "body.messages"
        async with s.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2}) as r:
            assert r.status == 200
            assert (await r.json())["usage"]["prompt_tokens"] == 3

    run(BASE, body)


def test_max_model_len_is_enforced_when_set() -> None:
    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        async with s.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 20}) as r:
            assert r.status == 400
            assert "maximum context length is 16" in (await r.json())["error"]["message"]

    run(replace(BASE, max_model_len=16), body)


def test_output_text_is_deterministic_and_sized() -> None:
    assert text_for(0, 3) == " the quick brown"
    assert text_for(0, 100) == "".join(text_for(i, i + 1) for i in range(100))
    assert len(text_for(0, 1000).split()) == 1000


def test_multiple_simulators_in_one_loop_are_independent() -> None:
    async def main() -> None:
        sims = [Simulator(replace(BASE, model=f"m{i}")) for i in range(3)]
        for sim in sims:
            await sim.start()
        try:
            async with aiohttp.ClientSession() as s:
                for i, sim in enumerate(sims):
                    async with s.post(sim.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}) as r:
                        assert (await r.json())["model"] == f"m{i}"
                async with s.get(sims[0].url + "/metrics") as r:
                    assert 'model_name="m0"' in await r.text()
        finally:
            for sim in sims:
                await sim.stop()

    asyncio.run(main())


def test_time_scale_runs_the_model_faster_and_latency_reports_simulated_seconds() -> None:
    """100 tokens at 10 ms per step is >= 1 simulated second; at scale 20 it takes >= 50 ms of real time."""
    cfg = replace(BASE, step_time=0.01, per_seq_step_time=0.0, prefill_time_per_token=0.0, time_scale=20.0)

    async def body(sim: Simulator, s: aiohttp.ClientSession) -> None:
        t0 = time.monotonic()
        st, out = await complete(s, "tiny", max_tokens=100)
        real = time.monotonic() - t0
        assert st == 200 and out["usage"]["completion_tokens"] == 100
        assert real >= 1.0 / 20
        e2e = sim.state.engine.stats.e2e
        assert e2e.count == 1
        assert e2e.total >= 1.0 - 1e-9  # simulated seconds, not real ones
        assert real < e2e.total  # and much faster than that in real time

    run(cfg, body)
