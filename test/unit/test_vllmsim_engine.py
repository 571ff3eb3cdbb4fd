"""The simulator's engine model: vLLM's LoRA scheduling rule, batching, timing and the lora_requests_info series.

The engine is pure (explicit clock), so these tests drive it step by step with no server and no sleeps.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllmsim.engine import FINISHED, RUNNING, WAITING, Engine, EngineParams, Request, run_until_idle


def make(**kw: float) -> Engine:
    params = EngineParams(
        max_num_seqs=int(kw.pop("max_num_seqs", 256)),
        max_loras=int(kw.pop("max_loras", 2)),
        max_cpu_loras=int(kw.pop("max_cpu_loras", 8)),
        step_time=kw.pop("step_time", 0.01),
        per_seq_step_time=kw.pop("per_seq_step_time", 0.001),
        prefill_time_per_token=kw.pop("prefill_time_per_token", 0.0001),
        load_time=kw.pop("load_time", 0.5),
        kv_cache_tokens=int(kw.pop("kv_cache_tokens", 1_000_000)),
    )
    assert not kw
    return Engine(params)


class Feeder:
    """Creates requests with increasing ids."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rid = 0

    def add(self, adapter: str | None, *, max_tokens: int = 1000, prompt: int = 10, now: float = 0.0) -> Request:
        self.rid += 1
        req = Request(self.rid, adapter, prompt, max_tokens)
        self.engine.add_request(req, now)
        return req


def test_max_loras_two_with_four_adapters_defers_the_unscheduled_ones_and_lists_only_scheduled() -> None:
    """vllm-behaviour.md: 4 adapters in flight, --max-loras 2 -> 8 running, 4 deferred, lists name only a, b."""
    eng = make(max_loras=2)
    f = Feeder(eng)
    reqs = [f.add(a) for a in ["lora-0"] * 4 + ["lora-1"] * 4 + ["lora-2"] * 2 + ["lora-3"] * 2]
    eng.start_step(0.0)
    eng.complete_step(0.05)
    snap = eng.snapshot()
    assert snap["running"] == 8
    assert snap["waiting"] == 4
    assert snap["waiting_deferred"] == 4
    assert snap["waiting_capacity"] == 0
    assert eng.running_lora_adapters() == ["lora-0", "lora-1"]
    assert snap["deferred_adapters"] == ["lora-2", "lora-3"]
    assert all(r.state == RUNNING for r in reqs[:8])
    assert all(r.state == WAITING for r in reqs[8:])
    # the only lora_requests_info series names the scheduled adapters, never the deferred ones
    assert list(eng.lora_info) == ["lora-0,lora-1"]


def test_deferral_skips_only_the_blocked_request_fcfs_otherwise() -> None:
    """A request whose adapter is already in the batch is admitted past a deferred one (vLLM skips, not stops)."""
    eng = make(max_loras=1)
    f = Feeder(eng)
    a1 = f.add("a")
    b1 = f.add("b")
    a2 = f.add("a")
    base = f.add(None)
    eng.start_step(0.0)
    assert [a1.state, b1.state, a2.state, base.state] == [RUNNING, WAITING, RUNNING, RUNNING]
    assert eng.num_deferred == 1
    assert list(eng.waiting) == [b1]


def test_full_batch_waits_for_capacity_not_deferred() -> None:
    eng = make(max_num_seqs=2, max_loras=1)
    f = Feeder(eng)
    f.add("a")
    f.add("a")
    third = f.add("b")  # would be deferred too, but the batch is full first
    fourth = f.add("a")
    eng.start_step(0.0)
    assert len(eng.running) == 2
    assert eng.num_capacity == 2
    assert eng.num_deferred == 0
    assert list(eng.waiting) == [third, fourth]


def test_deferred_request_runs_once_its_adapter_fits() -> None:
    eng = make(max_loras=1, step_time=0.01, per_seq_step_time=0.0, prefill_time_per_token=0.0, load_time=0.0)
    f = Feeder(eng)
    a = f.add("a", max_tokens=3)
    b = f.add("b", max_tokens=2)
    now = 0.0
    order: list[str] = []
    for _ in range(20):
        if not eng.has_work():
            break
        now += eng.start_step(now)
        order.extend(r.adapter or "" for r in eng.complete_step(now).finished)
    assert order == ["a", "b"]
    assert a.finished_at == pytest.approx(0.03)
    # b waited three steps (deferred), then ran two
    assert b.first_token_at == pytest.approx(0.04)
    assert b.finished_at == pytest.approx(0.05)
    assert eng.stats.queue_time.count == 2


def test_step_duration_model_and_first_token_at_end_of_prefill_step() -> None:
    eng = make(step_time=0.01, per_seq_step_time=0.002, prefill_time_per_token=0.001, load_time=0.0)
    f = Feeder(eng)
    r1 = f.add(None, prompt=10, max_tokens=2)
    r2 = f.add(None, prompt=30, max_tokens=2)
    dur = eng.start_step(0.0)
    assert dur == pytest.approx(0.01 + 2 * 0.002 + 40 * 0.001)
    assert eng.tokens_of(r1) == 0
    eng.complete_step(dur)
    assert eng.tokens_of(r1) == 1
    assert r1.first_token_at == pytest.approx(dur)
    assert eng.stats.ttft.count == 2
    dur2 = eng.start_step(dur)
    assert dur2 == pytest.approx(0.01 + 2 * 0.002)  # no prefill in a decode step
    res = eng.complete_step(dur + dur2)
    assert {r.rid for r in res.finished} == {r1.rid, r2.rid}
    assert r1.state == FINISHED
    assert eng.tokens_of(r1) == 2
    assert eng.stats.success_by_reason["length"] == 2
    assert eng.stats.generation_tokens == 4
    assert eng.stats.prompt_tokens == 40


def test_one_token_per_step_until_max_tokens() -> None:
    eng = make()
    f = Feeder(eng)
    r = f.add(None, max_tokens=5)
    seen = []
    now = 0.0
    for _ in range(10):
        if not eng.has_work():
            break
        now += eng.start_step(now)
        eng.complete_step(now)
        seen.append(eng.tokens_of(r))
    assert seen == [1, 2, 3, 4, 5]


def test_lora_info_absent_before_first_request_and_empty_after_last() -> None:
    eng = make(max_loras=2)
    assert eng.lora_info == {}
    f = Feeder(eng)
    f.add("a", max_tokens=3, now=0.0)
    now = eng.start_step(0.0)
    eng.complete_step(now)
    f.add("b", max_tokens=3, now=now)
    end, _ = run_until_idle(eng, now)
    keys = list(eng.lora_info)
    assert "a" in keys and "a,b" in keys
    newest = max(eng.lora_info, key=eng.lora_info.__getitem__)
    assert newest == ""
    # old label sets linger with their older timestamps
    assert eng.lora_info["a"] < eng.lora_info["a,b"] <= eng.lora_info[""] == end


def test_base_model_requests_do_not_count_against_max_loras() -> None:
    eng = make(max_loras=1)
    f = Feeder(eng)
    f.add("a")
    base = [f.add(None) for _ in range(3)]
    eng.start_step(0.0)
    assert all(r.state == RUNNING for r in base)
    assert eng.running_lora_adapters() == ["a"]


def test_cpu_cache_lru_eviction_costs_a_reload_on_next_use() -> None:
    eng = make(max_loras=1, max_cpu_loras=2, step_time=0.01, per_seq_step_time=0.0, prefill_time_per_token=0.0)
    assert eng.cache_adapter("a") == []
    assert eng.cache_adapter("b") == []
    assert eng.cache_adapter("c") == ["a"]  # least recently used goes
    assert list(eng.cpu_cache) == ["b", "c"]
    f = Feeder(eng)
    f.add("b", max_tokens=1)
    dur = eng.start_step(0.0)
    assert dur == pytest.approx(0.01)  # cached: no load cost
    eng.complete_step(dur)
    assert list(eng.cpu_cache) == ["c", "b"]  # b was used: now most recent
    f.add("a", max_tokens=1)
    dur = eng.start_step(1.0)
    assert dur == pytest.approx(0.01 + 0.5)  # evicted earlier: reloaded from its path
    eng.complete_step(1.0 + dur)
    assert eng.stats.adapter_reloads == 1
    assert list(eng.cpu_cache) == ["b", "a"]


def test_cache_never_evicts_an_adapter_in_the_running_batch() -> None:
    eng = make(max_loras=2, max_cpu_loras=2)
    eng.cache_adapter("a")
    eng.cache_adapter("b")
    f = Feeder(eng)
    f.add("a")
    f.add("b")
    eng.start_step(0.0)
    eng.complete_step(0.1)
    assert eng.cache_adapter("c") == []  # nothing evictable: cache may exceed while both run
    assert set(eng.cpu_cache) == {"a", "b", "c"}


def test_kv_usage_counts_prompt_and_generated_tokens() -> None:
    eng = make(kv_cache_tokens=1000)
    f = Feeder(eng)
    f.add(None, prompt=100, max_tokens=50)
    f.add(None, prompt=200, max_tokens=50)
    now = eng.start_step(0.0)
    eng.complete_step(now)
    assert eng.kv_tokens() == 300 + 2
    now += eng.start_step(now)
    eng.complete_step(now)
    assert eng.kv_tokens() == 300 + 4
    assert eng.kv_usage() == pytest.approx(0.304)


def test_kv_cache_full_makes_requests_wait_for_capacity() -> None:
    eng = make(kv_cache_tokens=250)
    f = Feeder(eng)
    f.add(None, prompt=200)
    second = f.add(None, prompt=100)
    eng.start_step(0.0)
    assert second.state == WAITING
    assert eng.num_capacity == 1


def test_abort_running_and_waiting_requests() -> None:
    eng = make(max_loras=1)
    f = Feeder(eng)
    a = f.add("a")
    b = f.add("b")
    eng.start_step(0.0)
    eng.complete_step(0.1)
    eng.abort(b, 0.1)
    assert not eng.waiting
    eng.abort(a, 0.2)
    assert not eng.running
    assert not eng.has_work()
    assert eng.in_flight_by_adapter == {}
    newest = max(eng.lora_info, key=eng.lora_info.__getitem__)
    assert newest == ""  # aborting the last request empties the current series
    assert eng.kv_tokens() == 0


def test_start_step_twice_is_a_programming_error() -> None:
    eng = make()
    Feeder(eng).add(None)
    eng.start_step(0.0)
    with pytest.raises(RuntimeError):
        eng.start_step(0.0)


def test_max_cpu_loras_below_max_loras_is_refused() -> None:
    with pytest.raises(ValueError, match="max_cpu_loras"):
        Engine(EngineParams(max_loras=4, max_cpu_loras=2))


requests_strategy = st.lists(
    st.tuples(
        st.sampled_from([None, "a", "b", "c", "d", "e"]),
        st.integers(min_value=1, max_value=12),  # max_tokens
        st.integers(min_value=1, max_value=40),  # prompt tokens
        st.integers(min_value=0, max_value=6),  # arrival step
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    reqs=requests_strategy,
    max_loras=st.integers(min_value=1, max_value=3),
    max_num_seqs=st.integers(min_value=1, max_value=8),
)
def test_scheduler_invariants(reqs: list[tuple[str | None, int, int, int]], max_loras: int, max_num_seqs: int) -> None:
    """Whatever arrives: the batch respects both budgets, waiting = capacity + deferred, all finish."""
    eng = make(max_loras=max_loras, max_num_seqs=max_num_seqs, max_cpu_loras=max_loras + 1)
    by_step: dict[int, list[Request]] = {}
    all_reqs: list[Request] = []
    for i, (adapter, max_tokens, prompt, at) in enumerate(reqs):
        r = Request(i + 1, adapter, prompt, max_tokens)
        by_step.setdefault(at, []).append(r)
        all_reqs.append(r)
    now = 0.0
    done: list[Request] = []
    for step in range(2000):
        for r in by_step.pop(step, []):
            eng.add_request(r, now)
        if not eng.has_work() and not by_step:
            break
        if not eng.has_work():
            now += 0.01
            continue
        now += eng.start_step(now)
        running = list(eng.running.values())
        assert len(running) <= max_num_seqs
        adapters = {r.adapter for r in running if r.adapter is not None}
        assert len(adapters) <= max_loras
        assert eng.num_capacity + eng.num_deferred == len(eng.waiting)
        # a deferred request's adapter is never in the batch, and the batch is at its LoRA budget
        for a in eng.deferred_adapters:
            assert a not in adapters
            assert len(adapters) == max_loras
        assert ",".join(eng.running_adapters) == ",".join(dict.fromkeys(eng.running_adapters))
        done.extend(eng.complete_step(now).finished)
        latest = max(eng.lora_info, key=eng.lora_info.__getitem__)
        assert set(filter(None, latest.split(","))) <= {"a", "b", "c", "d", "e"}
    assert sorted(r.rid for r in done) == sorted(r.rid for r in all_reqs)
    assert all(r.first_token_at >= r.arrival for r in all_reqs)
    assert all(r.finished_at >= r.first_token_at for r in all_reqs)
    assert max(eng.lora_info, key=eng.lora_info.__getitem__) == ""
    assert eng.kv_tokens() == 0


def test_engine_is_deterministic() -> None:
    def run() -> list[tuple[int, float]]:
        eng = make(max_loras=2, max_num_seqs=3)
        f = Feeder(eng)
        for i, a in enumerate(["a", "b", "c", None, "a", "c", "b", None]):
            f.add(a, max_tokens=3 + i % 4, prompt=5 + i)
        _, finished = run_until_idle(eng, 0.0)
        return [(r.rid, r.finished_at) for r in finished]

    assert run() == run()


def test_histogram_buckets_are_le_bounds() -> None:
    from vllmsim.engine import Histogram

    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 2.0):
        h.observe(v)
    assert h.counts == [2, 2]  # 0.05, 0.1 <= 0.1; 0.5, 1.0 <= 1.0; 2.0 only in +Inf
    assert h.count == 5
    assert h.total == pytest.approx(3.65)
