"""`localkube.wait.wait_until`: what a timeout says."""

from __future__ import annotations

import pytest

from localkube.wait import wait_until


def test_a_callable_description_is_read_at_the_deadline_not_at_the_start() -> None:
    state = {"seen": "at the start"}

    def probe() -> bool:
        state["seen"] = "at the deadline"
        return False

    with pytest.raises(TimeoutError, match=r"state at the deadline: not reached within 0\.1s \(last seen: False\)"):
        wait_until(probe, timeout=0.1, what=lambda: f"state {state['seen']}", interval=0.01)


def test_a_truthy_probe_value_is_returned() -> None:
    assert wait_until(lambda: "ready", timeout=1, what="never shown") == "ready"
