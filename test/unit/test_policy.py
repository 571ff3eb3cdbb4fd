"""The scaling policy on explicit timelines (now = 0, 1, 2 ...) and under arbitrary ones."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.placement import AdapterTarget
from controller.policy import (
    AdapterLoad,
    AdapterState,
    PolicyDecision,
    PolicyError,
    PolicyInput,
    PolicyState,
    ScaleEvent,
    decide,
)

UP, UP_W, DOWN, DOWN_W = 4.0, 3.0, 1.0, 60.0


def inputs(*adapters: AdapterLoad, pods: int = 4, capacity: int = 4, **kw) -> PolicyInput:
    params = {"scale_up_threshold": UP, "scale_up_window_seconds": UP_W, "scale_down_threshold": DOWN,
              "scale_down_window_seconds": DOWN_W} | kw
    return PolicyInput(tuple(adapters), pods, capacity, **params)


def run(load: Callable[[int], float | None], seconds: int, *, start: int = 1, current_follows: bool = True,
        minimum: int = 1, maximum: int | None = None, pods: int = 4, **kw) -> list[tuple[int, PolicyDecision]]:
    """Drive one adapter through a timeline; its current replicas follow the decision when asked."""
    state = PolicyState()
    current = start
    out = []
    for now in range(seconds + 1):
        a = AdapterLoad("lora-1", minimum, maximum, current, load(now))
        state, d = decide(state, inputs(a, pods=pods, **kw), float(now))
        out.append((now, d))
        if current_follows:
            current = d.adapters[0].desired
    return out


def changes(timeline: Sequence[tuple[int, PolicyDecision]]) -> list[tuple[int, int, int]]:
    return [(now, e.from_replicas, e.to_replicas) for now, d in timeline for e in d.events]


# -- one rule at a time ---------------------------------------------------------------------------

def test_hot_for_the_window_gains_one_replica_and_the_timer_restarts():
    timeline = run(lambda now: 5.0, 10)
    # Above from t=0: after 3 s one more replica, then another 3 s later, and so on up to the pods.
    assert changes(timeline) == [(3, 1, 2), (6, 2, 3), (9, 3, 4)]
    assert timeline[3][1].adapters[0].last_scale_time == 3.0
    assert timeline[3][1].events[0].reason == "load 5 above 4 for 3s"


def test_cold_for_the_window_loses_one_replica_never_below_min():
    timeline = run(lambda now: 0.5, 200, start=3)
    assert changes(timeline) == [(60, 3, 2), (120, 2, 1)]
    timeline = run(lambda now: 0.0, 200, start=3, minimum=2)
    assert changes(timeline) == [(60, 3, 2)]


def test_between_the_thresholds_both_timers_reset():
    loads = {3: 2.0}  # one sample in between at t=3
    timeline = run(lambda now: loads.get(now, 5.0), 8)
    assert changes(timeline) == [(7, 1, 2)]  # the window starts again at t=4
    cold = {30: 2.0}
    timeline = run(lambda now: cold.get(now, 0.5), 100, start=2)
    assert changes(timeline) == [(91, 2, 1)]


def test_unknown_load_changes_nothing_and_resets_nothing():
    loads = {2: None}
    timeline = run(lambda now: loads.get(now, 5.0), 3)
    assert changes(timeline) == [(3, 1, 2)]  # the timer from t=0 survived the gap
    # An unknown load never scales by itself, however long the timer has run.
    state, _ = decide(PolicyState(), inputs(AdapterLoad("a", current=1, load=9.0)), 0.0)
    state, d = decide(state, inputs(AdapterLoad("a", current=1, load=None)), 100.0)
    assert d.events == () and state.adapters["a"].above_since == 0.0


def test_equal_to_a_threshold_is_in_between():
    assert changes(run(lambda now: UP, 20)) == []
    assert changes(run(lambda now: DOWN, 200, start=2)) == []


def test_zero_windows_act_on_the_first_sample():
    timeline = run(lambda now: 5.0, 2, scale_up_window_seconds=0.0, scale_down_window_seconds=0.0)
    assert changes(timeline) == [(0, 1, 2), (1, 2, 3), (2, 3, 4)]


def test_never_above_max_replicas_or_the_pods():
    assert changes(run(lambda now: 9.0, 30, maximum=2)) == [(3, 1, 2)]
    timeline = run(lambda now: 9.0, 30, pods=2)
    assert changes(timeline) == [(3, 1, 2)]
    assert timeline[-1][1].saturated and timeline[-1][1].needed_pods == 1  # on every pod, still hot


def test_a_scale_up_waits_for_the_previous_one_to_load():
    timeline = run(lambda now: 5.0, 12, current_follows=False)
    assert changes(timeline) == [(3, 1, 2)]
    # Once the copy is there, the timer (still running since t=3) fires at once.
    state = PolicyState({"lora-1": AdapterState(2, above_since=3.0, last_scale_time=3.0)})
    _, d = decide(state, inputs(AdapterLoad("lora-1", current=2, load=5.0)), 12.0)
    assert [(e.from_replicas, e.to_replicas) for e in d.events] == [(2, 3)]


def test_fill_copies_count_once_the_adapter_is_hot():
    state = PolicyState({"lora-1": AdapterState(1, above_since=0.0)})
    _, d = decide(state, inputs(AdapterLoad("lora-1", current=3, load=5.0)), 3.0)
    assert d.targets() == {"lora-1": 4}


def test_a_replica_that_needs_a_load_waits_for_the_load_window_a_promotion_does_not():
    """Warm on 3 pods (1 preferred + 2 fallback copies): two promotions come after the scale-up window; the
    fourth replica needs a load and waits until the adapter has been hot for the load window since its
    hot spell began; later loads come at the scale-up window's pace."""
    state = PolicyState()
    current, seen = 1, []
    for now in range(30):
        a = AdapterLoad("lora-1", current=current, load=5.0, warm=3)
        state, d = decide(state, inputs(a, pods=8, load_window_seconds=10.0), float(now))
        seen += [(now, e.from_replicas, e.to_replicas) for e in d.events]
        current = d.adapters[0].desired
    assert seen == [(3, 1, 2), (6, 2, 3), (10, 3, 4), (13, 4, 5), (16, 5, 6), (19, 6, 7), (22, 7, 8)]
    # Unset, the load window is the scale-up window; warm unset means nothing is warm beyond current.
    assert changes(run(lambda now: 5.0, 10)) == [(3, 1, 2), (6, 2, 3), (9, 3, 4)]
    assert changes(run(lambda now: 5.0, 12, load_window_seconds=5.0)) == [(5, 1, 2), (8, 2, 3), (11, 3, 4)]
    # A spell that ends (one sample in between) starts the load window again.
    gap = {7: 2.0}
    assert changes(run(lambda now: gap.get(now, 5.0), 20, load_window_seconds=5.0)) == [(5, 1, 2), (13, 2, 3),
                                                                                      (16, 3, 4)]


def test_initial_state_starts_from_current_clamped():
    _, d = decide(PolicyState(), inputs(AdapterLoad("a", 1, 2, current=4), AdapterLoad("b", 2, None, current=0),
                                        AdapterLoad("c", 1, None, current=3)), 0.0)
    assert d.targets() == {"a": 2, "b": 2, "c": 3}
    assert d.events == ()


def test_bounds_changed_in_the_spec_are_applied_with_an_event():
    state = PolicyState({"a": AdapterState(1), "b": AdapterState(4)})
    state, d = decide(state, inputs(AdapterLoad("a", 2, None, 1), AdapterLoad("b", 1, 2, 4)), 5.0)
    assert d.targets() == {"a": 2, "b": 2}
    assert d.events == (ScaleEvent("a", 1, 2, "raised to minReplicas 2"),
                        ScaleEvent("b", 4, 2, "lowered to maxReplicas 2"))
    assert state.adapters["a"].last_scale_time == 5.0


def test_adapters_removed_from_the_spec_drop_out_of_the_state():
    state, _ = decide(PolicyState(), inputs(AdapterLoad("a", current=1), AdapterLoad("b", current=1)), 0.0)
    state, d = decide(state, inputs(AdapterLoad("b", current=1)), 1.0)
    assert set(state.adapters) == {"b"} and [x.name for x in d.adapters] == ["b"]


# -- capacity, saturation and advice ------------------------------------------------------------------

def test_a_hot_adapter_takes_a_slot_from_the_coldest_adapter_above_its_minimum():
    # 4 pods x 2 slots, all 8 used.
    state = PolicyState({"hot": AdapterState(1, above_since=0.0), "warm": AdapterState(2), "c1": AdapterState(2),
                         "c2": AdapterState(1), "none": AdapterState(2)})
    adapters = (AdapterLoad("hot", 1, None, 1, 9.0), AdapterLoad("warm", 1, None, 2, 2.0),
                AdapterLoad("c1", 1, None, 2, 0.5), AdapterLoad("c2", 1, None, 1, 0.1),
                AdapterLoad("none", 1, None, 2, None))
    state, d = decide(state, inputs(*adapters, pods=4, capacity=2), 3.0)
    # c2 is colder but at its minimum; c1 is the coldest known load above it; warm is not cold.
    assert d.targets() == {"hot": 2, "warm": 2, "c1": 1, "c2": 1, "none": 2}
    assert d.events == (ScaleEvent("c1", 2, 1, "slot reclaimed for hot"),
                        ScaleEvent("hot", 1, 2, "load 9 above 4 for 3s"))
    assert not d.saturated
    # Three seconds later the only donor left is the one whose load is unknown.
    adapters = (AdapterLoad("hot", 1, None, 2, 9.0), adapters[1], AdapterLoad("c1", 1, None, 1, 0.5),
                *adapters[3:])
    state, d = decide(state, inputs(*adapters, pods=4, capacity=2), 6.0)
    assert d.targets() == {"hot": 3, "warm": 2, "c1": 1, "c2": 1, "none": 1}
    # And then none: saturated, warm keeps its replicas.
    adapters = (AdapterLoad("hot", 1, None, 3, 9.0), adapters[1], adapters[2], adapters[3],
                AdapterLoad("none", 1, None, 1, None))
    _, d = decide(state, inputs(*adapters, pods=4, capacity=2), 9.0)
    assert d.targets() == {"hot": 3, "warm": 2, "c1": 1, "c2": 1, "none": 1}
    assert d.saturated and d.waiting == ("hot",) and d.needed_pods == 1


def test_hottest_adapters_are_served_first():
    state = PolicyState({"a": AdapterState(1, above_since=0.0), "b": AdapterState(1, above_since=0.0)})
    adapters = (AdapterLoad("a", 1, None, 1, 5.0), AdapterLoad("b", 1, None, 1, 8.0))
    _, d = decide(state, inputs(*adapters, pods=3, capacity=1), 3.0)
    assert d.targets() == {"a": 1, "b": 2}
    assert d.saturated and d.waiting == ("a",)
    assert d.reason is not None and "no free slot for a" in d.reason


def test_saturated_names_the_waiting_adapters_and_the_pods_needed():
    state = PolicyState({"a": AdapterState(2, above_since=0.0), "b": AdapterState(2, above_since=0.0),
                         "c": AdapterState(2)})
    adapters = (AdapterLoad("a", 1, None, 2, 9.0), AdapterLoad("b", 1, None, 2, 6.0),
                AdapterLoad("c", 2, None, 2, 0.0))
    _, d = decide(state, inputs(*adapters, pods=3, capacity=2), 3.0)
    assert d.targets() == {"a": 2, "b": 2, "c": 2}
    assert d.saturated and d.waiting == ("a", "b") and d.events == ()
    # Wanted 3 + 3 + 2 = 8 slots: 4 pods of 2 hold them, and 3 copies need 3 pods: one more pod.
    assert d.needed_pods == 1
    assert d.reason == "no free slot for a, b; 1 more pod(s) would fit every wanted target"


def test_needed_pods_counts_one_copy_per_pod():
    # Plenty of slots per pod, but an adapter on every pod can only grow with more pods.
    state = PolicyState({"a": AdapterState(3, above_since=0.0)})
    _, d = decide(state, inputs(AdapterLoad("a", 1, None, 3, 9.0), pods=3, capacity=8), 3.0)
    assert d.saturated and d.needed_pods == 1 and d.waiting == ("a",)


def test_minimums_that_do_not_fit_are_saturation():
    adapters = tuple(AdapterLoad(f"a{i}", 2, None, 0, None) for i in range(5))
    _, d = decide(PolicyState(), inputs(*adapters, pods=2, capacity=4), 0.0)
    assert d.saturated and d.needed_pods == 1  # 10 copies over 4 slots per pod: 3 pods
    assert d.reason is not None and "minimum replicas need 10 slots" in d.reason
    _, d = decide(PolicyState(), inputs(AdapterLoad("a", 3, None, 0, None), pods=2), 0.0)
    assert d.saturated and d.needed_pods == 1 and d.targets() == {"a": 3}


def test_fewer_pods_shrink_the_coldest_targets_first():
    state = PolicyState({"hot": AdapterState(3), "cold": AdapterState(3), "warm": AdapterState(2)})
    adapters = (AdapterLoad("hot", 1, None, 3, 6.0), AdapterLoad("cold", 1, None, 3, 0.2),
                AdapterLoad("warm", 1, None, 2, 2.0))
    _, d = decide(state, inputs(*adapters, pods=3, capacity=2), 0.0)
    assert d.targets() == {"hot": 3, "cold": 1, "warm": 2}
    assert not d.saturated


def test_recommends_more_max_loras_when_active_adapters_exceed_batch_slots():
    adapters = tuple(AdapterLoad(f"a{i}", 1, None, 1, 0.5) for i in range(9))
    _, d = decide(PolicyState(), inputs(*adapters, pods=2, capacity=4), 0.0)
    assert d.recommendation is not None and "9 adapters are active" in d.recommendation
    assert "--max-loras" in d.recommendation
    _, d = decide(PolicyState(), inputs(*adapters, pods=2, capacity=8, max_loras=4), 0.0)
    assert d.recommendation is not None and "2 pods x --max-loras 4" in d.recommendation
    _, d = decide(PolicyState(), inputs(*adapters[:8], pods=2, capacity=4), 0.0)
    assert d.recommendation is None


def test_placement_targets_keep_spec_order():
    _, d = decide(PolicyState(), inputs(AdapterLoad("z", current=2), AdapterLoad("a", current=1)), 0.0)
    assert d.placement_targets() == (AdapterTarget("z", 2), AdapterTarget("a", 1))


@pytest.mark.parametrize(("inp", "message"), [
    (inputs(AdapterLoad("a"), pods=-1), "pods must be"),
    (inputs(AdapterLoad("a"), capacity=0), "capacity must be"),
    (inputs(AdapterLoad("a"), scale_down_threshold=4.0), "must be below scale_up_threshold"),
    (inputs(AdapterLoad("a"), scale_up_window_seconds=-1.0), "scale_up_window_seconds"),
    (inputs(AdapterLoad("a"), scale_up_threshold=math.inf), "scale_up_threshold"),
    (inputs(AdapterLoad("a"), AdapterLoad("a")), "adapter 'a' appears twice"),
    (inputs(AdapterLoad("a", 3, 2)), "max_replicas"),
    (inputs(AdapterLoad("a", load=-1.0)), "load must be"),
    (inputs(AdapterLoad("a", current=-1)), "current must be"),
    (inputs(AdapterLoad("a", warm=-1)), "warm must be"),
    (inputs(AdapterLoad("a"), load_window_seconds=math.nan), "load_window_seconds"),
])
def test_bad_input_is_rejected_with_a_specific_error(inp, message):
    with pytest.raises(PolicyError, match=message):
        decide(PolicyState(), inp, 0.0)


def test_nan_load_counts_as_unknown():
    _, d = decide(PolicyState(), inputs(AdapterLoad("a", current=1, load=math.nan)), 0.0)
    assert d.adapters[0].load is None


# -- no churn ------------------------------------------------------------------------------------------

def test_load_flapping_across_the_up_threshold_faster_than_the_window_never_scales():
    for period in (2, 3):  # above for 1 or 2 s, then below: never 3 s in a row
        timeline = run(functools.partial(lambda p, now: 5.0 if now % p else 3.0, period), 600)
        assert changes(timeline) == []
    timeline = run(lambda now: 4.01 if now % 2 else 3.99, 600)
    assert changes(timeline) == []


def test_load_flapping_across_the_down_threshold_never_scales_down():
    # Below for 59 s, then one sample above: the 60 s window is never completed.
    timeline = run(lambda now: 1.5 if now % 60 == 59 else 0.5, 3600, start=3)
    assert changes(timeline) == []
    timeline = run(lambda now: 0.99 if now % 2 else 1.01, 3600, start=3)
    assert changes(timeline) == []


# -- any timeline -----------------------------------------------------------------------------------------

loads = st.one_of(st.none(), st.floats(0, 10), st.sampled_from([0.0, DOWN, UP, 0.5, 4.5]))


@st.composite
def timelines(draw):
    n = draw(st.integers(1, 5))
    specs = []
    for i in range(n):
        lo = draw(st.integers(0, 3))
        hi = draw(st.one_of(st.none(), st.integers(max(1, lo), 6)))
        specs.append((f"a{i}", lo, hi))
    steps = draw(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 4), st.lists(loads, min_size=n, max_size=n),
                                    st.integers(1, 20)), min_size=1, max_size=40))
    windows = draw(st.tuples(st.integers(0, 10), st.integers(0, 30)))
    return specs, steps, (windows[0], max(windows))


def replay(specs, steps, windows):
    state = PolicyState()
    current = {name: 0 for name, _, _ in specs}
    now = 0.0
    out = []
    for pods, capacity, step_loads, dt in steps:
        now += dt
        adapters = tuple(AdapterLoad(name, lo, hi, current[name], load)
                         for (name, lo, hi), load in zip(specs, step_loads, strict=True))
        inp = inputs(*adapters, pods=pods, capacity=capacity, scale_up_window_seconds=float(windows[0]),
                     scale_down_window_seconds=float(windows[1]))
        state, d = decide(state, inp, now)
        out.append((inp, state, d))
        current = {x.name: min(x.desired, pods) for x in d.adapters}
    return out


@settings(max_examples=300, deadline=None)
@given(timelines())
def test_bounds_always_hold(timeline):
    specs, steps, windows = timeline
    for inp, state, d in replay(specs, steps, windows):
        assert [x.name for x in d.adapters] == [a.name for a in inp.adapters] == list(state.adapters)
        for a, x in zip(inp.adapters, d.adapters, strict=True):
            assert x.desired >= a.min_replicas
            if a.max_replicas is not None:
                assert x.desired <= max(a.max_replicas, a.min_replicas)
            assert x.desired <= max(inp.pods, a.min_replicas)
            assert state.adapters[a.name].desired == x.desired
        total = sum(x.desired for x in d.adapters)
        slots = inp.pods * inp.capacity
        assert total <= max(slots, sum(a.min_replicas for a in inp.adapters))
        if total > slots or any(a.min_replicas > inp.pods for a in inp.adapters):
            assert d.saturated and d.needed_pods >= 1
        assert d.saturated == (d.reason is not None)
        if not d.saturated:
            assert d.needed_pods == 0 and d.waiting == ()
        # Load-driven changes: one step per adapter per sync, down by exactly one.
        load_driven = [e for e in d.events if e.reason.startswith("load")]
        assert len({e.adapter for e in load_driven}) == len(load_driven)
        for e in load_driven:
            if " below " in e.reason:
                assert e.to_replicas == e.from_replicas - 1
            else:
                assert e.to_replicas > e.from_replicas


@settings(max_examples=200, deadline=None)
@given(timelines())
def test_deterministic(timeline):
    specs, steps, windows = timeline
    assert replay(specs, steps, windows) == replay(specs, steps, windows)


@settings(max_examples=200, deadline=None)
@given(timelines())
def test_needed_pods_is_the_fewest_that_fit_every_wanted_target(timeline):
    specs, steps, windows = timeline
    for inp, _, d in replay(specs, steps, windows):
        if not d.saturated:
            continue
        wanted = [x.desired + (1 if x.waiting else 0) for x in d.adapters]

        def fits(extra: int, wanted=wanted, inp=inp) -> bool:
            pods = inp.pods + extra
            return sum(wanted) <= pods * inp.capacity and max(wanted, default=0) <= pods

        assert fits(d.needed_pods)
        assert d.needed_pods == 0 or not fits(d.needed_pods - 1)
