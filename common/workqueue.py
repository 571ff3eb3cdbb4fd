"""client-go's rate-limited work queue, for threads.

Why these semantics: a controller reconciles *keys*, not events. A key added many times while it waits is
queued once (coalescing bursts); a key added while a worker processes it is not handed to a second worker
but re-queued when the first calls `done` (no concurrent reconciles of one object); failures retry with
per-key exponential backoff capped by an overall token bucket (one broken object cannot hammer the API
server, and a storm of failures cannot either).

Time comes from an injectable `Clock` so tests can drive delays without sleeping.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)


class Clock(Protocol):
    """Monotonic seconds, plus a way to be told when (fake) time jumps."""

    def now(self) -> float:
        """Monotonic seconds."""
        ...

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever time advances other than by itself passing (fake clocks)."""
        ...


class RealClock:
    """`time.monotonic`; real time needs no notifications."""

    def now(self) -> float:
        """Monotonic seconds."""
        return time.monotonic()

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Nothing to do: waits time out on their own."""


class FakeClock:
    """A clock that only moves when told to; waiters are woken on every `advance`."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[], None]] = []

    def now(self) -> float:
        """The fake time."""
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every subscriber."""
        if seconds < 0:
            raise ValueError("time does not go backwards")
        with self._lock:
            self._now += seconds
            subscribers = list(self._subscribers)
        for cb in subscribers:
            cb()

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Register a waker."""
        with self._lock:
            self._subscribers.append(callback)


# --- rate limiters ------------------------------------------------------------------------------------


class RateLimiter(Protocol[K]):  # type: ignore[misc]
    """How long a key must wait before its next retry."""

    def when(self, key: K) -> float:
        """The delay (seconds) for this retry of `key`; counts the retry."""
        ...

    def forget(self, key: K) -> None:
        """Reset `key`'s history (it succeeded)."""
        ...

    def num_requeues(self, key: K) -> int:
        """How many retries `key` has had since it was last forgotten."""
        ...


class ItemExponentialRateLimiter(Generic[K]):
    """Per key: `base * 2**failures`, capped at `cap` (client-go's ItemExponentialFailureRateLimiter)."""

    def __init__(self, base: float = 0.005, cap: float = 1000.0) -> None:
        if base <= 0 or cap < base:
            raise ValueError(f"need 0 < base <= cap, got base={base} cap={cap}")
        self.base = base
        self.cap = cap
        self._failures: dict[K, int] = {}
        self._lock = threading.Lock()

    def when(self, key: K) -> float:
        """Next delay for `key`, doubling each time."""
        with self._lock:
            n = self._failures.get(key, 0)
            self._failures[key] = n + 1
        if n >= 64:  # 2**64 * base overflows any sane cap
            return self.cap
        return min(self.cap, self.base * (2**n))

    def forget(self, key: K) -> None:
        """Reset `key`."""
        with self._lock:
            self._failures.pop(key, None)

    def num_requeues(self, key: K) -> int:
        """Failures counted for `key`."""
        with self._lock:
            return self._failures.get(key, 0)


class BucketRateLimiter(Generic[K]):
    """An overall token bucket (`qps` refill, `burst` size) shared by all keys, like golang's rate.Limiter."""

    def __init__(self, qps: float = 10.0, burst: int = 100, clock: Clock | None = None) -> None:
        if qps <= 0 or burst < 1:
            raise ValueError(f"need qps > 0 and burst >= 1, got qps={qps} burst={burst}")
        self.qps = qps
        self.burst = burst
        self._clock: Clock = clock or RealClock()
        self._tokens = float(burst)
        self._last = self._clock.now()
        self._lock = threading.Lock()

    def when(self, key: K) -> float:
        """Reserve a token; the wait until it exists (tokens may go negative: reservations queue up)."""
        with self._lock:
            now = self._clock.now()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.qps)
            self._last = now
            self._tokens -= 1.0
            return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def forget(self, key: K) -> None:
        """The bucket has no per-key state."""

    def num_requeues(self, key: K) -> int:
        """The bucket has no per-key state."""
        return 0


class MaxOfRateLimiter(Generic[K]):
    """The longest delay of several limiters (client-go's MaxOfRateLimiter); requeues from the first."""

    def __init__(self, *limiters: RateLimiter[K]) -> None:
        if not limiters:
            raise ValueError("need at least one rate limiter")
        self.limiters = limiters

    def when(self, key: K) -> float:
        """Ask every limiter (each counts the retry) and take the longest."""
        return max(lim.when(key) for lim in self.limiters)

    def forget(self, key: K) -> None:
        """Forget in every limiter."""
        for lim in self.limiters:
            lim.forget(key)

    def num_requeues(self, key: K) -> int:
        """The most any limiter counted."""
        return max(lim.num_requeues(key) for lim in self.limiters)


def default_rate_limiter(clock: Clock | None = None) -> MaxOfRateLimiter[K]:
    """client-go's default: 5 ms doubling to 1000 s per key, and 10 qps / burst 100 overall."""
    return MaxOfRateLimiter(ItemExponentialRateLimiter(0.005, 1000.0), BucketRateLimiter(10.0, 100, clock))


# --- the queue -------------------------------------------------------------------------------------


class WorkQueue(Generic[K]):
    """Deduplicating, delaying, rate-limited FIFO of keys, safe for many producers and worker threads."""

    def __init__(
        self,
        name: str = "",
        *,
        rate_limiter: RateLimiter[K] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.name = name
        self._clock: Clock = clock or RealClock()
        self._limiter: RateLimiter[K] = rate_limiter or default_rate_limiter(self._clock)
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()  # waiting to be processed (in _queue, or re-queued after done)
        self._processing: set[K] = set()
        self._waiting: list[tuple[float, int, K]] = []  # heap of (ready_at, seq, key) for add_after
        self._waiting_at: dict[K, float] = {}  # earliest ready time per delayed key
        self._seq = itertools.count()
        self._shutting_down = False
        self._drain = False
        self._clock.subscribe(self._wake)
        self._metrics = _queue_metrics(name) if name else None
        self._added_at: dict[K, float] = {}

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- producers ------------------------------------------------------------------------------

    def add(self, key: K) -> None:
        """Queue `key` unless it is already waiting; if it is being processed it comes back after `done`."""
        with self._cond:
            self._add_locked(key)

    def _add_locked(self, key: K) -> None:
        if self._shutting_down or key in self._dirty:
            return
        if self._metrics is not None:
            self._metrics.adds.inc()
        self._dirty.add(key)
        self._added_at.setdefault(key, self._clock.now())
        if key in self._processing:
            return
        self._queue.append(key)
        self._update_depth()
        self._cond.notify()

    def add_after(self, key: K, delay: float) -> None:
        """Queue `key` once `delay` seconds have passed (an earlier pending time for the key wins)."""
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            if self._shutting_down:
                return
            ready_at = self._clock.now() + delay
            current = self._waiting_at.get(key)
            if current is not None and current <= ready_at:
                return
            self._waiting_at[key] = ready_at
            heapq.heappush(self._waiting, (ready_at, next(self._seq), key))
            self._cond.notify_all()

    def add_rate_limited(self, key: K) -> None:
        """Queue `key` after its rate limiter's delay (exponential per key, bucketed overall)."""
        if self._metrics is not None:
            self._metrics.retries.inc()
        self.add_after(key, self._limiter.when(key))

    def forget(self, key: K) -> None:
        """Reset `key`'s failure history (call after a successful reconcile)."""
        self._limiter.forget(key)

    def num_requeues(self, key: K) -> int:
        """Rate-limited re-queues of `key` since it was last forgotten."""
        return self._limiter.num_requeues(key)

    # --- consumers ------------------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> K | None:
        """The next key, marked processing (call `done(key)` after); None on shutdown or after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._promote_due_locked()
                if self._queue:
                    key = self._queue.popleft()
                    self._processing.add(key)
                    self._dirty.discard(key)
                    self._update_depth()
                    if self._metrics is not None:
                        added = self._added_at.pop(key, None)
                        if added is not None:
                            self._metrics.queue_duration.observe(max(0.0, self._clock.now() - added))
                    else:
                        self._added_at.pop(key, None)
                    return key
                if self._shutting_down:
                    return None
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    return None
                if self._waiting:
                    until_due = max(0.0, self._waiting[0][0] - self._clock.now())
                    wait = until_due if wait is None else min(wait, until_due)
                self._cond.wait(wait)

    def _promote_due_locked(self) -> None:
        now = self._clock.now()
        while self._waiting and self._waiting[0][0] <= now:
            ready_at, _, key = heapq.heappop(self._waiting)
            if self._waiting_at.get(key) != ready_at:
                continue  # superseded by an earlier add_after of the same key
            del self._waiting_at[key]
            self._add_locked(key)

    def done(self, key: K) -> None:
        """Finish processing `key`; if it was added meanwhile, it goes back in the queue now."""
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty and not self._shutting_down:
                self._queue.append(key)
                self._update_depth()
                self._cond.notify()
            elif key in self._dirty:
                self._dirty.discard(key)
            self._cond.notify_all()  # shutdown_with_drain waits for processing to empty

    # --- lifecycle ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop accepting keys and wake every getter; queued keys are dropped, getters return None."""
        with self._cond:
            self._shutting_down = True
            self._queue.clear()
            self._dirty.clear()
            self._waiting.clear()
            self._waiting_at.clear()
            self._update_depth()
            self._cond.notify_all()

    def shutdown_with_drain(self, timeout: float) -> bool:
        """Shut down, then wait up to `timeout` for keys in processing to be `done`; True if they were."""
        self.shutdown()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._processing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def shutting_down(self) -> bool:
        """True after `shutdown()`."""
        with self._cond:
            return self._shutting_down

    def __len__(self) -> int:
        """Keys ready to be handed out (not delayed ones, not ones in processing)."""
        with self._cond:
            return len(self._queue)

    def pending_delayed(self) -> int:
        """Keys waiting for an `add_after`/`add_rate_limited` delay."""
        with self._cond:
            return len(self._waiting_at)

    def processing(self) -> int:
        """Keys handed out and not yet `done`."""
        with self._cond:
            return len(self._processing)

    def _update_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.depth.set(len(self._queue))


class _QueueMetrics:
    def __init__(self, name: str) -> None:
        from common import metrics

        self.depth = metrics.WORKQUEUE_DEPTH.labels(name)
        self.adds = metrics.WORKQUEUE_ADDS.labels(name)
        self.retries = metrics.WORKQUEUE_RETRIES.labels(name)
        self.queue_duration = metrics.WORKQUEUE_QUEUE_DURATION.labels(name)


def _queue_metrics(name: str) -> _QueueMetrics:
    return _QueueMetrics(name)
