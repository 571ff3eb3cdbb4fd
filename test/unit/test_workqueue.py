"""The work queue keeps client-go's promises: dedup, no concurrent processing of a key, delays, backoff."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from common.workqueue import (
    BucketRateLimiter,
    FakeClock,
    ItemExponentialRateLimiter,
    MaxOfRateLimiter,
    WorkQueue,
    default_rate_limiter,
)


def drain(q: WorkQueue[str]) -> list[str]:
    """Every key ready now, each marked done."""
    out: list[str] = []
    while True:
        key = q.get(timeout=0)
        if key is None:
            return out
        out.append(key)
        q.done(key)


def test_a_key_added_many_times_while_waiting_is_queued_once() -> None:
    q: WorkQueue[str] = WorkQueue()
    for _ in range(5):
        q.add("a")
    q.add("b")
    q.add("a")
    assert len(q) == 2
    assert drain(q) == ["a", "b"]


def test_a_key_added_while_processing_comes_back_after_done_and_not_before() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    assert q.get(timeout=0) == "a"
    q.add("a")
    q.add("a")
    assert len(q) == 0, "a key in processing must not be handed to a second worker"
    assert q.get(timeout=0) is None
    q.done("a")
    assert len(q) == 1
    assert q.get(timeout=0) == "a"
    q.done("a")
    assert q.get(timeout=0) is None


def test_done_without_re_add_does_not_requeue() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    key = q.get(timeout=0)
    assert key == "a"
    q.done(key)
    assert len(q) == 0 and q.processing() == 0


def test_fifo_order() -> None:
    q: WorkQueue[int] = WorkQueue()
    for i in range(10):
        q.add(i)
    got = []
    while len(q):
        k = q.get(timeout=0)
        assert k is not None
        got.append(k)
        q.done(k)
    assert got == list(range(10))


def test_add_after_waits_for_the_fake_clock() -> None:
    clock = FakeClock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    q.add_after("a", 10.0)
    q.add_after("b", 5.0)
    assert q.get(timeout=0) is None
    assert q.pending_delayed() == 2
    clock.advance(5.0)
    assert q.get(timeout=0) == "b"
    clock.advance(4.9)
    assert q.get(timeout=0) is None
    clock.advance(0.1)
    assert q.get(timeout=0) == "a"


def test_add_after_earlier_time_wins_and_later_is_ignored() -> None:
    clock = FakeClock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    q.add_after("a", 10.0)
    q.add_after("a", 2.0)
    q.add_after("a", 20.0)
    assert q.pending_delayed() == 1
    clock.advance(2.0)
    assert drain(q) == ["a"]
    clock.advance(30.0)
    assert drain(q) == [], "superseded delays must not queue the key again"


def test_a_blocked_getter_wakes_when_the_fake_clock_advances() -> None:
    clock = FakeClock()
    q: WorkQueue[str] = WorkQueue(clock=clock)
    q.add_after("a", 60.0)
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=10)))
    t.start()
    time.sleep(0.05)  # let the getter block; the assertion below does not depend on this timing
    clock.advance(60.0)
    t.join(5)
    assert got == ["a"]


def test_a_blocked_getter_wakes_on_add_from_another_thread() -> None:
    q: WorkQueue[str] = WorkQueue()
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=10)))
    t.start()
    q.add("x")
    t.join(5)
    assert got == ["x"]


def test_get_timeout_returns_none() -> None:
    q: WorkQueue[str] = WorkQueue()
    start = time.monotonic()
    assert q.get(timeout=0.05) is None
    assert time.monotonic() - start < 2.0


def test_item_exponential_backoff_doubles_to_the_cap_and_forget_resets() -> None:
    lim: ItemExponentialRateLimiter[str] = ItemExponentialRateLimiter(0.005, 1000.0)
    delays = [lim.when("k") for _ in range(20)]
    assert delays[:4] == pytest.approx([0.005, 0.01, 0.02, 0.04])
    assert delays[-1] == 1000.0
    assert all(b >= a for a, b in itertools.pairwise(delays))
    assert lim.num_requeues("k") == 20
    assert lim.when("other") == pytest.approx(0.005), "backoff is per key"
    lim.forget("k")
    assert lim.num_requeues("k") == 0
    assert lim.when("k") == pytest.approx(0.005)
    for _ in range(200):
        assert lim.when("huge") <= 1000.0


def test_bucket_allows_a_burst_then_paces_at_qps() -> None:
    clock = FakeClock()
    lim: BucketRateLimiter[str] = BucketRateLimiter(qps=10.0, burst=3, clock=clock)
    assert [lim.when(str(i)) for i in range(3)] == [0.0, 0.0, 0.0]
    assert lim.when("4") == pytest.approx(0.1)
    assert lim.when("5") == pytest.approx(0.2), "reservations queue up behind each other"
    clock.advance(10.0)
    assert lim.when("6") == 0.0, "the bucket refills, up to its burst"


def test_rate_limited_requeue_uses_the_longer_of_item_and_bucket_delays() -> None:
    clock = FakeClock()
    limiter: MaxOfRateLimiter[str] = MaxOfRateLimiter(
        ItemExponentialRateLimiter(1.0, 100.0), BucketRateLimiter(1.0, 1, clock)
    )
    q: WorkQueue[str] = WorkQueue(rate_limiter=limiter, clock=clock)
    q.add_rate_limited("a")  # item 1s, bucket 0 -> 1s
    q.add_rate_limited("b")  # item 1s, bucket 1s -> 1s
    q.add_rate_limited("c")  # item 1s, bucket 2s -> 2s
    clock.advance(0.99)
    assert drain(q) == []
    clock.advance(0.01)
    assert sorted(drain(q)) == ["a", "b"]
    clock.advance(1.0)
    assert drain(q) == ["c"]
    assert q.num_requeues("a") == 1
    q.add_rate_limited("a")  # item now 2s
    clock.advance(1.999)
    assert drain(q) == []
    clock.advance(0.001)
    assert drain(q) == ["a"]
    assert q.num_requeues("a") == 2
    q.forget("a")
    assert q.num_requeues("a") == 0


def test_default_rate_limiter_starts_at_five_ms() -> None:
    lim: MaxOfRateLimiter[str] = default_rate_limiter(FakeClock())
    assert lim.when("k") == pytest.approx(0.005)
    assert lim.when("k") == pytest.approx(0.01)


def test_shutdown_wakes_getters_and_drops_new_keys() -> None:
    q: WorkQueue[str] = WorkQueue()
    results: list[str | None] = []
    threads = [threading.Thread(target=lambda: results.append(q.get())) for _ in range(3)]
    for t in threads:
        t.start()
    q.shutdown()
    for t in threads:
        t.join(5)
        assert not t.is_alive(), "a getter without timeout must return on shutdown"
    assert results == [None, None, None]
    q.add("late")
    q.add_after("later", 0.1)
    assert q.get(timeout=0) is None
    assert q.shutting_down()


def test_shutdown_with_drain_waits_for_processing_keys() -> None:
    q: WorkQueue[str] = WorkQueue()
    q.add("a")
    key = q.get(timeout=0)
    assert key == "a"
    assert q.shutdown_with_drain(0.05) is False
    threading.Timer(0.05, q.done, args=("a",)).start()
    assert q.shutdown_with_drain(5.0) is True


def test_many_workers_never_process_one_key_concurrently() -> None:
    q: WorkQueue[int] = WorkQueue()
    in_flight: set[int] = set()
    lock = threading.Lock()
    violations: list[int] = []
    processed = [0]

    def worker() -> None:
        while True:
            key = q.get(timeout=2)
            if key is None:
                return
            with lock:
                if key in in_flight:
                    violations.append(key)
                in_flight.add(key)
            time.sleep(0.0005)
            with lock:
                in_flight.discard(key)
                processed[0] += 1
            q.done(key)

    workers = [threading.Thread(target=worker) for _ in range(4)]
    for w in workers:
        w.start()
    for i in range(2000):
        q.add(i % 7)
    deadline = time.monotonic() + 20
    while (len(q) or q.processing()) and time.monotonic() < deadline:
        time.sleep(0.01)
    q.shutdown()
    for w in workers:
        w.join(5)
    assert violations == []
    assert processed[0] >= 7
    assert len(q) == 0


def test_named_queue_reports_metrics() -> None:
    from prometheus_client import REGISTRY

    q: WorkQueue[str] = WorkQueue("unit-metrics")
    q.add("a")
    q.add("b")
    assert REGISTRY.get_sample_value("lora_workqueue_depth", {"name": "unit-metrics"}) == 2
    assert REGISTRY.get_sample_value("lora_workqueue_adds_total", {"name": "unit-metrics"}) == 2
    drain(q)
    assert REGISTRY.get_sample_value("lora_workqueue_depth", {"name": "unit-metrics"}) == 0
