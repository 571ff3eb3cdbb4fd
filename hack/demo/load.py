"""The demo's traffic: a skewed load whose hot adapter moves, sent through the router.

The plan (phases and the exact arrival times) is pure and seeded, so a run can be replayed; only
:class:`LoadRunner` does I/O. Every request goes to the router on loopback, the count is bounded by the
plan, and each request has a timeout, so the load always ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

REQUEST_TIMEOUT_SECONDS = 30.0
MAX_IN_FLIGHT = 256
"""Arrivals beyond this many unanswered requests are not sent but counted as failed (status -1)."""
MAX_TOKENS = 16
PROMPT = "Summarise the quarterly report in one sentence."


@dataclass(frozen=True)
class Phase:
    """A stretch of the run with its own request rate per adapter (requests per second)."""

    name: str
    start: float
    end: float
    rates: dict[str, float]


@dataclass(frozen=True)
class RequestRecord:
    """One request as the client saw it. status 0: no HTTP answer; -1: not sent (client limit)."""

    start: float
    """Seconds since the load started."""
    adapter: str
    phase: int
    status: int
    latency: float
    error: str = ""


def plan_phases(
    duration: float,
    adapters: Sequence[str],
    hot: Sequence[str] = ("lora-1", "lora-4"),
    *,
    hot_rate: float = 10.0,
    background_rate: float = 0.4,
) -> list[Phase]:
    """Three phases: the first hot adapter, then the second, then quiet (half the background trickle).

    The quiet phase is the longest, so two scale-down windows can pass in it; its lower rate makes bursts
    that look like load (and rightly hold a replica) rarer.
    """
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    missing = [a for a in hot if a not in adapters]
    if missing:
        raise ValueError(f"hot adapters {missing} are not among the adapters {list(adapters)}")
    cuts = (0.0, duration * 0.32, duration * 0.64, duration)
    names = [f"{hot[0]} hot", f"{hot[1]} hot", "quiet"]
    phases = []
    for i, name in enumerate(names):
        rates = {a: background_rate if i < len(hot) else background_rate / 2 for a in adapters}
        if i < len(hot):
            rates[hot[i]] = hot_rate
        phases.append(Phase(name, cuts[i], cuts[i + 1], rates))
    return phases


def arrivals(phases: Sequence[Phase], seed: int = 1) -> list[tuple[float, str, int]]:
    """Poisson arrivals (time, adapter, phase index) for every adapter in every phase, in time order."""
    rng = random.Random(seed)
    out: list[tuple[float, str, int]] = []
    for index, phase in enumerate(phases):
        for adapter, rate in sorted(phase.rates.items()):
            if rate <= 0:
                continue
            t = phase.start + rng.expovariate(rate)
            while t < phase.end:
                out.append((t, adapter, index))
                t += rng.expovariate(rate)
    out.sort()
    return out


def phase_at(phases: Sequence[Phase], t: float) -> int:
    """Index of the phase that holds time t (the last one past the end)."""
    for i, phase in enumerate(phases):
        if t < phase.end:
            return i
    return len(phases) - 1


class LoadRunner:
    """Sends the planned requests to the router from a thread of its own (an asyncio loop)."""

    def __init__(self, base_url: str, plan: list[tuple[float, str, int]]) -> None:
        self.base_url = base_url.rstrip("/")
        self.plan = plan
        self.records: list[RequestRecord] = []
        self.in_flight = 0
        self.started_at: float | None = None
        """time.monotonic() when the first arrival's clock started."""
        self._stop = threading.Event()
        self._wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._thread: threading.Thread | None = None

    @property
    def sent(self) -> int:
        return len(self.records) + self.in_flight

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="demo-load", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def stop(self, timeout: float = REQUEST_TIMEOUT_SECONDS + 5) -> None:
        """Stop sending; requests in flight are cancelled."""
        self._stop.set()
        wake = self._wake
        if wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                wake[0].call_soon_threadsafe(wake[1].set)
        if self._thread is not None:
            self._thread.join(timeout)

    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    async def _run(self) -> None:
        assert self.started_at is not None
        stop = asyncio.Event()
        self._wake = (asyncio.get_running_loop(), stop)
        if self._stop.is_set():
            return
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
        connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False) as session:
            for at, adapter, phase in self.plan:
                delay = self.started_at + at - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    break
                if self.in_flight >= MAX_IN_FLIGHT:
                    self.records.append(RequestRecord(at, adapter, phase, -1, 0.0, "client in-flight limit"))
                    continue
                task = asyncio.create_task(self._one(session, at, adapter, phase))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            stopper = asyncio.create_task(stop.wait())
            while tasks and not stop.is_set():
                await asyncio.wait({*tasks, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            for task in list(tasks):
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, session: aiohttp.ClientSession, at: float, adapter: str, phase: int) -> None:
        body = {"model": adapter, "prompt": PROMPT, "max_tokens": MAX_TOKENS}
        self.in_flight += 1
        t0 = time.monotonic()
        status, error = 0, ""
        try:
            async with session.post(f"{self.base_url}/v1/completions", json=body) as resp:
                status = resp.status
                payload = await resp.read()
                if status != 200:
                    error = payload[:200].decode(errors="replace")
        except asyncio.CancelledError:
            error = "cancelled at the end of the run"
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self.in_flight -= 1
            self.records.append(RequestRecord(at, adapter, phase, status, time.monotonic() - t0, error))
