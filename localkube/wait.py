"""Waiting on a condition with a deadline, and saying what was last seen when it does not come."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(probe: Callable[[], T | None], *, timeout: float, what: str | Callable[[], str],
               interval: float = 0.05) -> T:
    """Call `probe` until it returns something truthy (returned) or raises nothing past the deadline.

    Exceptions from `probe` count as "not yet"; when time runs out, TimeoutError names `what` and the last
    value or exception seen, which is what a failing test needs to show. A callable `what` is called then,
    so a message that shows live state shows it as it was at the deadline, not as it was at the start.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
        except Exception as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            described = what() if callable(what) else what
            raise TimeoutError(f"{described}: not reached within {timeout:.1f}s (last seen: {last!r})")
        time.sleep(interval)
