"""Strategies: pure choices among an adapter's holders, from the router's counts and scraped pod state."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.accounting import Accounting
from router.routes import Holder, Route
from router.scrape import PodMetrics
from router.strategies import (
    GIE,
    STRATEGIES,
    LeastOutstanding,
    LoraAware,
    deferred_on,
    lora_slot,
    make_strategy,
    move_target,
    saturated,
    starts_at_once,
)

A = Holder("10.0.0.1:8000", "pod-a", "preferred")
B = Holder("10.0.0.2:8000", "pod-b", "preferred")
F = Holder("10.0.0.3:8000", "pod-f", "fallback")


def route(model: str = "lora-x", preferred: tuple[Holder, ...] = (A, B), fallback: tuple[Holder, ...] = ()) -> Route:
    return Route(model=model, is_base=False, preferred=preferred, fallback=fallback)


def busy(acc: Accounting, holder: Holder, model: str, n: int = 1) -> None:
    for _ in range(n):
        acc.start(model, holder.address, holder.pod)


def test_lora_aware_avoids_a_pod_whose_lora_budget_is_full() -> None:
    """pod-a already runs max_loras (2) other adapters; pod-b has room but more requests in flight."""
    acc = Accounting()
    busy(acc, A, "lora-1")
    busy(acc, A, "lora-2")
    busy(acc, B, "lora-3", 5)
    strategy = LoraAware(default_max_loras=2)
    for seq in range(20):
        assert strategy.choose(route(), acc.pods, (), seq) == B
    # What least-outstanding does instead: the emptier pod, which will defer the request.
    assert LeastOutstanding().choose(route(), acc.pods, (), 0) == A


def test_lora_aware_learns_max_loras_from_the_scrape() -> None:
    acc = Accounting()
    busy(acc, A, "lora-1")
    busy(acc, B, "lora-3", 3)
    acc.store_metrics(A.address, PodMetrics(running=1, max_loras=1, running_adapters=frozenset({"lora-1"})))
    assert LoraAware().choose(route(), acc.pods, (), 0) == B


def test_lora_aware_keeps_a_running_adapter_where_it_runs_until_its_load_outweighs_a_new_slot() -> None:
    acc = Accounting()
    busy(acc, A, "lora-x", 2)
    strategy = LoraAware(default_max_loras=4, slot_cost=2.0)
    # pod-a: 2 in flight, adapter already there (cost 2); pod-b: idle but needs a slot (cost 2): a tie.
    assert {strategy.choose(route(), acc.pods, (), s) for s in range(4)} == {A, B}
    busy(acc, A, "lora-x")
    assert strategy.choose(route(), acc.pods, (), 0) == B
    acc2 = Accounting()
    busy(acc2, A, "lora-x")
    assert strategy.choose(route(), acc2.pods, (), 0) == A


def test_lora_aware_prefers_preferred_holders_until_they_saturate() -> None:
    acc = Accounting()
    busy(acc, A, "lora-x", 6)  # loaded, but not saturated: preferred still wins over an idle fallback
    r = route(preferred=(A,), fallback=(F,))
    strategy = LoraAware(default_max_loras=2, queue_bound=4)
    assert strategy.choose(r, acc.pods, (), 0) == A
    # The preferred pod's queue passes the bound: spill-over to the fallback.
    acc.store_metrics(A.address, PodMetrics(running=1, waiting=5, max_loras=2))
    assert strategy.choose(r, acc.pods, (), 0) == F
    # No LoRA room on the preferred pod for this adapter: spill-over too.
    acc3 = Accounting()
    busy(acc3, A, "lora-1")
    busy(acc3, A, "lora-2")
    assert strategy.choose(r, acc3.pods, (), 0) == F


def test_lora_aware_when_everyone_is_saturated_picks_the_least_bad() -> None:
    acc = Accounting()
    for h in (A, B):
        busy(acc, h, "lora-1")
        busy(acc, h, "lora-2")
    acc.store_metrics(A.address, PodMetrics(running=2, waiting=9, deferred=9, max_loras=2))
    acc.store_metrics(B.address, PodMetrics(running=2, waiting=1, deferred=1, max_loras=2))
    assert LoraAware().choose(route(), acc.pods, (), 0) == B


def test_lora_aware_counts_adapters_other_senders_run() -> None:
    """vLLM reports more running than this router sent: its adapter lists count toward the budget."""
    acc = Accounting()
    acc.store_metrics(
        A.address,
        PodMetrics(
            running=2, max_loras=2, running_adapters=frozenset({"o1", "o2"}), waiting_adapters=frozenset({"o1", "o2"})
        ),
    )
    busy(acc, B, "lora-9", 3)
    assert LoraAware().choose(route(), acc.pods, (), 0) == B


def test_base_model_ignores_lora_budgets() -> None:
    acc = Accounting()
    busy(acc, A, "lora-1")
    busy(acc, A, "lora-2")
    busy(acc, B, "tiny", 3)
    base = Route(model="tiny", is_base=True, preferred=(A, B))
    assert LoraAware(default_max_loras=2).choose(base, acc.pods, (), 0) == A


def test_gie_lora_affinity_scores() -> None:
    acc = Accounting()
    gie = GIE()
    acc.store_metrics(A.address, PodMetrics(running=1, max_loras=2, running_adapters=frozenset({"lora-x"})))
    assert gie.lora_score("lora-x", acc.pods[A.address]) == 1.0
    assert gie.lora_score("lora-y", acc.pods[A.address]) == 0.8
    acc.store_metrics(
        A.address,
        PodMetrics(
            running=2,
            max_loras=2,
            running_adapters=frozenset({"a", "b"}),
            waiting_adapters=frozenset({"a", "b", "lora-w"}),
        ),
    )
    assert gie.lora_score("lora-w", acc.pods[A.address]) == 0.6
    assert gie.lora_score("lora-z", acc.pods[A.address]) == 0.0


def test_gie_weights_trade_queue_against_affinity() -> None:
    acc = Accounting()
    # pod-a runs the adapter but has a queue; pod-b is idle with room.
    acc.store_metrics(A.address, PodMetrics(running=4, waiting=4, max_loras=2, running_adapters=frozenset({"lora-x"})))
    acc.store_metrics(B.address, PodMetrics(running=0, waiting=0, max_loras=2))
    # weights 1:1:1: A = 0 + 1 + 1.0 = 2.0, B = 1 + 1 + 0.8 = 2.8
    assert GIE().choose(route(), acc.pods, (), 0) == B
    # LoRA weight 3 does not overcome a full queue score (A = 0 + 1 + 3.0 = 4.0, B = 1 + 1 + 2.4 = 4.4) ...
    assert GIE(lora_weight=3).choose(route(), acc.pods, (), 0) == B
    # ... but weight 10 does.
    assert GIE(lora_weight=10).choose(route(), acc.pods, (), 0) == A
    # A bonus for preferred holders (soft placement) tips a near tie.
    r = route(preferred=(A,), fallback=(Holder(B.address, B.pod, "fallback"),))
    assert GIE(lora_weight=3, preferred_bonus=1.0).choose(r, acc.pods, (), 0) == A


def test_least_outstanding_rotates_among_ties() -> None:
    acc = Accounting()
    picks = Counter(LeastOutstanding().choose(route(), acc.pods, (), s) for s in range(10))
    assert picks == {A: 5, B: 5}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_exclusion_and_empty(name: str) -> None:
    strategy = make_strategy(name)
    acc = Accounting()
    assert strategy.choose(route(), acc.pods, (A.address,), 0) == B
    assert strategy.choose(route(), acc.pods, (A.address, B.address), 0) is None
    assert strategy.choose(route(preferred=()), acc.pods, (), 0) is None
    assert strategy.describe()["name"] == name


def test_unknown_strategy_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match="known: lora-aware"):
        make_strategy("round-robin")


holders = st.lists(
    st.tuples(st.integers(0, 5), st.sampled_from(["preferred", "fallback"]), st.integers(0, 3), st.booleans()),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(holders, st.sampled_from(sorted(STRATEGIES)), st.integers(0, 100))
def test_every_strategy_picks_a_listed_holder_and_is_deterministic(
    spec: list[tuple[int, str, int, bool]], name: str, seq: int
) -> None:
    acc = Accounting()
    preferred: list[Holder] = []
    fallback: list[Holder] = []
    for i, (load, tier, adapters, scraped) in enumerate(spec):
        h = Holder(f"10.0.1.{i}:8000", f"p{i}", tier)
        (preferred if tier == "preferred" else fallback).append(h)
        for a in range(adapters):
            busy(acc, h, f"other-{a}", load + 1)
        if scraped:
            acc.store_metrics(h.address, PodMetrics(running=load, waiting=load, max_loras=2))
    r = route(preferred=tuple(preferred), fallback=tuple(fallback))
    strategy = make_strategy(name, max_loras=2)
    first = strategy.choose(r, acc.pods, (), seq)
    assert first in r.holders
    assert strategy.choose(r, acc.pods, (), seq) == first


def scraped(acc: Accounting, holder: Holder, running: set[str], waiting: set[str] | None = None, *,
            queue: float = 0.0, deferred: float = 0.0, max_loras: int = 2) -> None:
    acc.store_metrics(holder.address, PodMetrics(
        running=len(running), waiting=queue, deferred=deferred, max_loras=max_loras,
        running_adapters=frozenset(running), waiting_adapters=frozenset(waiting or ())))


def test_a_request_deferred_on_its_pod_moves_where_its_adapter_runs_or_has_room() -> None:
    """lora-x waits on pod-a behind two running adapters (max_loras 2); pod-b runs it; pod-f has room."""
    acc = Accounting()
    busy(acc, A, "lora-x")
    scraped(acc, A, {"lora-1", "lora-2"}, {"lora-1"}, queue=1, deferred=1)
    scraped(acc, B, {"lora-x", "lora-3"})
    busy(acc, B, "lora-x", 3)
    scraped(acc, F, {"lora-4"})
    assert deferred_on("lora-x", acc.pods[A.address])
    assert starts_at_once("lora-x", acc.pods[B.address]) and starts_at_once("lora-x", acc.pods[F.address])
    # Preferred holders first, though pod-f has fewer requests in flight.
    assert move_target(route(fallback=(F,)), acc.pods, A.address) == B
    assert move_target(route(preferred=(A,), fallback=(F,)), acc.pods, A.address) == F


def test_no_move_when_the_request_is_not_deferred_or_nowhere_is_better() -> None:
    acc = Accounting()
    busy(acc, A, "lora-x")
    scraped(acc, A, {"lora-x", "lora-1"}, {"lora-x"}, queue=20)  # runs there, only the queue is long
    scraped(acc, B, set())
    assert not deferred_on("lora-x", acc.pods[A.address])
    assert move_target(route(), acc.pods, A.address) is None
    # Not running, but nothing is deferred there (the scrape predates the request): no reason to move.
    scraped(acc, A, {"lora-1", "lora-2"}, {"lora-1"}, queue=1)
    assert not deferred_on("lora-x", acc.pods[A.address])
    # Deferred on pod-a, and pod-b is no better: full budget, its queue too long, or lora-x waits there too.
    scraped(acc, A, {"lora-1", "lora-2"}, {"lora-1"}, queue=1, deferred=1)
    assert deferred_on("lora-x", acc.pods[A.address])
    for running, queue, waits_there in (({"lora-3", "lora-4"}, 0.0, False), ({"lora-x"}, 30.0, False),
                                        ({"lora-3"}, 1.0, True)):
        scraped(acc, B, running, queue=queue, deferred=1 if waits_there else 0)
        if waits_there:
            busy(acc, B, "lora-x")
        assert move_target(route(), acc.pods, A.address) is None, (running, queue, waits_there)
    # A pod never scraped is unknown, not free; the base model never moves.
    del acc.pods[B.address]
    assert move_target(route(), acc.pods, A.address) is None
    base = Route(model="base", is_base=True, preferred=(A, B))
    scraped(acc, B, set())
    assert move_target(base, acc.pods, A.address) is None


def test_the_router_s_own_requests_count_against_a_move_target_s_budget() -> None:
    """Sent since the last scrape: pod-b's scrape shows one adapter, the router has sent it a second."""
    acc = Accounting()
    busy(acc, A, "lora-x")
    scraped(acc, A, {"lora-1", "lora-2"}, queue=1, deferred=1)
    scraped(acc, B, {"lora-3"})
    assert move_target(route(), acc.pods, A.address) == B
    busy(acc, B, "lora-5")
    assert move_target(route(), acc.pods, A.address) is None


def test_lora_slot_and_saturation_say_whether_a_request_sent_now_would_wait() -> None:
    """What --hold-for-slot holds a request on: every holder saturated for its adapter."""
    acc = Accounting()
    assert not saturated("lora-x", None)  # never used, never scraped: not known to be busy
    busy(acc, A, "lora-1")
    busy(acc, A, "lora-2")
    a = acc.pods[A.address]
    assert lora_slot("lora-1", a, 2) is True  # holds a slot
    assert lora_slot("lora-x", a, 2) is None and saturated("lora-x", a, default_max_loras=2)  # budget taken
    assert lora_slot("lora-x", a, 3) is False and not saturated("lora-x", a, default_max_loras=3)  # room
    assert lora_slot("lora-x", a, None) is False  # budget unknown: room as far as anyone knows
    assert not saturated("base", a, is_base=True, default_max_loras=2)  # the base model takes no LoRA slot
    # The scrape's max_lora wins over the default; a queue above the bound or a full KV cache saturates too.
    scraped(acc, A, {"lora-1", "lora-2"}, max_loras=4)
    assert not saturated("lora-x", a, default_max_loras=2)
    scraped(acc, A, {"lora-1", "lora-2"}, queue=9, max_loras=4)
    assert saturated("lora-1", a, queue_bound=8) and not saturated("lora-1", a, queue_bound=9)
    assert saturated("base", a, is_base=True, queue_bound=8)
    # Deferred requests wait for a slot, not for capacity: they do not count against the queue bound.
    scraped(acc, A, {"lora-1", "lora-2"}, queue=9, deferred=5, max_loras=4)
    assert not saturated("lora-1", a, queue_bound=8)
    acc.store_metrics(A.address, PodMetrics(running=2, kv_usage=0.97, max_loras=4))
    assert saturated("lora-1", a) and not saturated("lora-1", a, kv_bound=0.99)
    # Adapters other senders run there count once the pod carries load the router did not send.
    acc.store_metrics(B.address, PodMetrics(running=3, max_loras=2, running_adapters=frozenset({"lora-7", "lora-8"})))
    b = acc.pods[B.address]
    assert lora_slot("lora-7", b) is True and lora_slot("lora-x", b) is None


def test_accounting_forgets_pods_that_left_the_table_once_idle() -> None:
    acc = Accounting()
    busy(acc, A, "lora-x")
    busy(acc, B, "lora-x")
    acc.count_code("lora-x", A.pod, 200)
    acc.count_code("lora-x", B.pod, 200)
    acc.count_error("lora-x", B.pod, "connect")
    acc.finish("lora-x", B.address)
    # B left the table and is idle; A left too but still has a request in flight.
    gone = acc.forget_pods({})
    assert gone == {B.pod}
    assert set(acc.pods) == {A.address}
    assert set(acc.codes) == {("lora-x", A.pod, 200)} and acc.errors == {}
    assert acc.models["lora-x"].inflight == 1
