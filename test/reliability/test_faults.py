"""Fault scenarios under load with the invariant checker on: no placement lost or duplicated, no adapter
left without a routable replica, no request routed to a pod without its adapter.

Counts are modest so the set fits in a few minutes (8 controller kills here; `hack/reliability_figures.py`
runs 50 and writes docs/reliability.md). `RELIABILITY_KILLS` overrides the number of kills.
"""

from __future__ import annotations

import os

import pytest
from invariants import Tally, describe
from scenarios import Env, WebhookFindings, apiserver_restarts, controller_kills, simulator_faults, webhook_down

from api.defaulting import apply_defaults

pytestmark = pytest.mark.integration

KILLS = int(os.environ.get("RELIABILITY_KILLS", "8"))


def _clean(tally: Tally, env: Env) -> None:
    """Nothing broken, and every failed request was the injected fault itself."""
    print(f"\n{tally.scenario}: faults {dict(tally.faults)}, requests {tally.requests_sent} sent, "
          f"{tally.requests_failed} failed ({tally.failures_expected} injected), {len(tally.violations)} violations, "
          f"{tally.seconds:.0f}s; {tally.notes}")
    assert not tally.violations, f"{describe(tally.violations)}\n(logs in {env.work})"
    assert tally.placements_lost == 0 and tally.placements_duplicated == 0
    assert tally.unexpected_failures == 0, f"{dict(tally.failures_by_reason)} (logs in {env.work})"


def test_the_leader_killed_at_random_moments_loses_and_duplicates_nothing(env: Env) -> None:
    tally = controller_kills(env, kills=KILLS)
    assert tally.faults["controller SIGKILL"] == KILLS
    assert tally.requests_sent >= 8 * KILLS  # load really flowed (about 8 requests a second)
    _clean(tally, env)


def test_apiserver_restarts_even_during_a_scale_up_miss_nothing(env: Env) -> None:
    tally = apiserver_restarts(env)
    assert tally.faults["kube-apiserver restart"] == 2
    assert tally.requests_sent > 0
    _clean(tally, env)


def test_simulators_that_fail_stall_crash_or_vanish_never_break_a_promise(env: Env) -> None:
    tally = simulator_faults(env)
    assert tally.faults["simulator crash"] == 2 and tally.faults["pod vanished mid-drain"] == 1
    assert tally.failures_expected > 0, "the injected 5xx answers never reached a client"
    _clean(tally, env)


def test_webhook_down_fails_closed_for_autoscalers_and_blocks_nothing_else(env: Env) -> None:
    f = WebhookFindings()
    tally = webhook_down(env, f)
    _clean(tally, env)
    # mutation fails open: the create went through, with the CRD's defaults
    assert f.stored_defaults is not None, f.mutate_down_create
    assert f.stored_defaults["spec"] == apply_defaults("LoRAAutoscaler", f.stored_defaults)["spec"]
    # validation fails closed, with the API server naming the webhook and why
    for code, message in (f.validate_down_create, f.validate_down_update):
        assert code != 0
        assert 'failed calling webhook "validate.loraautoscaler.io"' in message, message
        assert "connection refused" in message, message
    # nothing else is blocked: other kinds, placements (fail open), autoscalers outside the selector
    assert f.other_resources and all(code == 0 for code, _ in f.other_resources.values()), f.other_resources
    assert f.placement_create[0] == 0, f.placement_create
    assert f.outside_scope_create[0] == 0, f.outside_scope_create
    # back up: the update refused meanwhile goes through the webhook and is admitted
    assert f.update_after_return[0] == 0, f.update_after_return
