"""Bad input never crashes anything: malformed and oversized requests get a 4xx from the router and the
webhook (which then go on serving), a pod answering garbage on /metrics leaves the controller and the
router working, and a LoRAAutoscaler that only the controller can find fault with is Degraded, not fatal.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from badinput import invalid_autoscalers, malformed_metrics, router_bad_requests, webhook_bad_requests
from invariants import Tally, describe
from scenarios import Env

pytestmark = pytest.mark.integration


def _clean(tally: Tally) -> None:
    print(f"\n{tally.scenario}: {tally.faults_injected} bad inputs, {tally.requests_sent} requests, "
          f"{tally.requests_failed} not answered as promised, {len(tally.violations)} violations; {tally.notes}")
    assert not tally.violations, describe(tally.violations)
    assert tally.requests_failed == 0, dict(tally.failures_by_reason)


def test_malformed_and_oversized_requests_to_the_router_get_4xx_and_it_serves_on(tmp_path: Path) -> None:
    tally = router_bad_requests(tmp_path)
    assert tally.requests_sent >= 12
    _clean(tally)


def test_malformed_and_oversized_reviews_to_the_webhook_get_4xx_and_it_serves_on(tmp_path: Path) -> None:
    tally = webhook_bad_requests(tmp_path)
    assert tally.requests_sent >= 12
    _clean(tally)


def test_a_pod_with_garbage_metrics_crashes_neither_the_controller_nor_the_router(env: Env) -> None:
    tally = malformed_metrics(env)
    assert tally.faults["garbage /metrics answers"] >= 14
    _clean(tally)


def test_invalid_autoscalers_are_refused_by_the_api_server_or_degraded_by_the_controller(env: Env) -> None:
    tally, found = invalid_autoscalers(env)
    assert found["accepted"] == [], f"the API server (schema and CEL) let these through: {found['accepted']}"
    # A label value the API server and the webhook both let through: only the controller can say no.
    assert found["bad_selector_accepted"]
    degraded = found["degraded"]
    assert degraded["reason"] == "InvalidSpec" and "spec.podSelector" in degraded["message"], degraded
    assert found["placements_of_bad"] == []
    assert found["controller_alive"]
    _clean(tally)
