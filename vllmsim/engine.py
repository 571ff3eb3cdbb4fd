"""The modelled vLLM engine: continuous batching with vLLM's LoRA scheduling rule.

Pure and deterministic: no I/O, no clock reads. The caller passes ``now`` (simulated seconds) to every call,
so unit tests can drive it step by step and the server loop can drive it from a real clock.

The model, per engine step:

* Scheduling (vLLM v1): running requests stay; waiting requests are taken in arrival order. When the batch
  holds ``max_num_seqs`` requests, scheduling stops and everything still waiting waits for ``capacity``. A
  request whose adapter is not in the batch while the batch already has ``max_loras`` distinct adapters is
  skipped (``deferred``) and the next one is considered. A request that does not fit the KV cache stops
  scheduling (``capacity``).
* Duration: ``step_time + per_seq_step_time * running + prefill_time_per_token * prompt tokens admitted
  + load_time * adapters loaded from disk`` (an adapter evicted from the CPU cache reloads on its next use).
* Output: every running request gets one token at the end of the step (a request admitted in the step gets
  its first token, the prefill step produces it). A request finishes after ``max_tokens`` tokens.

Tokens are counted lazily (a request's count is ``steps since admission``), so a step costs time in the
number of requests admitted, finished or streaming, not in the batch size.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
E2E_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

WAITING = 0
RUNNING = 1
FINISHED = 2
ABORTED = 3

MAX_LORA_INFO_SERIES = 10_000


@dataclass
class EngineParams:
    """The engine's capacity and cost model (all durations in simulated seconds)."""

    max_num_seqs: int = 256
    max_loras: int = 1
    max_cpu_loras: int = 1
    step_time: float = 0.005
    per_seq_step_time: float = 0.0001
    prefill_time_per_token: float = 0.00002
    load_time: float = 0.02
    kv_cache_tokens: int = 262144


class Request:
    """One generation request inside the engine; ``handle`` is the caller's (the engine never touches it)."""

    __slots__ = (
        "adapter",
        "admitted_at",
        "admitted_step",
        "arrival",
        "finished_at",
        "first_token_at",
        "handle",
        "max_tokens",
        "prompt_tokens",
        "rid",
        "state",
        "stream",
    )

    def __init__(
        self,
        rid: int,
        adapter: str | None,
        prompt_tokens: int,
        max_tokens: int,
        *,
        stream: bool = False,
        handle: Any = None,
    ) -> None:
        self.rid = rid
        self.adapter = adapter
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.stream = stream
        self.handle = handle
        self.state = WAITING
        self.arrival = 0.0
        self.admitted_step = -1
        self.admitted_at = 0.0
        self.first_token_at = -1.0
        self.finished_at = -1.0

    def __repr__(self) -> str:
        return f"Request(rid={self.rid}, adapter={self.adapter!r}, state={self.state})"


@dataclass
class Histogram:
    """A Prometheus histogram kept as plain numbers (cumulative counts are made when rendered)."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        """Record one value."""
        self.total += value
        self.count += 1
        i = bisect_left(self.buckets, value)  # first bound >= value (Prometheus buckets are "le")
        if i < len(self.counts):
            self.counts[i] += 1


@dataclass
class EngineStats:
    """Counters and histograms the /metrics endpoint renders (labelled with the base model only)."""

    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    queue_time: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    success_by_reason: dict[str, int] = field(default_factory=lambda: {"length": 0, "stop": 0, "abort": 0})
    prompt_tokens: int = 0
    generation_tokens: int = 0
    adapter_reloads: int = 0
    steps: int = 0


@dataclass
class StepResult:
    """What one completed step produced: who to notify (streaming) and who finished."""

    tokens: list[Request]
    finished: list[Request]


class Engine:
    """Continuous batching under vLLM's ``max_num_seqs`` / ``max_loras`` rules, driven by an explicit clock."""

    def __init__(self, params: EngineParams) -> None:
        if params.max_cpu_loras < params.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        self.p = params
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}
        self.streaming: dict[int, Request] = {}
        self.running_adapters: dict[str, int] = {}
        self.cpu_cache: OrderedDict[str, None] = OrderedDict()
        self.stats = EngineStats()
        self.step_no = 0
        self.num_capacity = 0
        self.num_deferred = 0
        self.deferred_adapters: set[str] = set()
        self.lora_info: dict[str, float] = {}
        """Label value (comma-joined running adapters) -> time of last update; old series linger."""
        self.in_flight_by_adapter: dict[str, int] = {}
        self._finish_at: dict[int, list[Request]] = {}
        self._admitted_now: list[Request] = []
        self._in_step = False
        self._step_started = 0.0
        # KV accounting without touching every request: tokens = sum(prompt) + sum(steps since admission)
        self._kv_prompt = 0
        self._kv_admit_sum = 0

    # ---- requests -------------------------------------------------------------------------------------
    def add_request(self, req: Request, now: float) -> None:
        """Queue a request (it is scheduled at the next step boundary)."""
        req.arrival = now
        req.state = WAITING
        self.waiting.append(req)
        if req.adapter is not None:
            self.in_flight_by_adapter[req.adapter] = self.in_flight_by_adapter.get(req.adapter, 0) + 1

    def abort(self, req: Request, now: float) -> None:
        """Drop a request whose client went away (vLLM aborts on disconnect)."""
        if req.state == WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        elif req.state == RUNNING:
            self._leave_running(req)
            if not self._in_step:
                self._record_lora_info(now)
        else:
            return
        req.state = ABORTED
        req.finished_at = now
        self._release(req)

    def tokens_of(self, req: Request) -> int:
        """Output tokens a request has so far."""
        if req.state == WAITING or req.admitted_step < 0:
            return 0
        if req.state == RUNNING:
            return min(self.step_no - req.admitted_step, req.max_tokens)
        if req.state == FINISHED:
            return req.max_tokens
        return min(max(self.step_no - req.admitted_step, 0), req.max_tokens)

    # ---- adapters -------------------------------------------------------------------------------------
    def cache_adapter(self, name: str) -> list[str]:
        """Put an adapter in the CPU cache (a load call); returns the names evicted to make room."""
        self.cpu_cache.pop(name, None)
        evicted = self._make_room()
        self.cpu_cache[name] = None
        return evicted

    def uncache_adapter(self, name: str) -> None:
        """Forget cached weights (in-place reload with a new path invalidates them)."""
        self.cpu_cache.pop(name, None)

    def _make_room(self) -> list[str]:
        evicted: list[str] = []
        while len(self.cpu_cache) >= self.p.max_cpu_loras:
            victim = next((n for n in self.cpu_cache if n not in self.running_adapters), None)
            if victim is None:
                break
            del self.cpu_cache[victim]
            evicted.append(victim)
        return evicted

    # ---- stepping -------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        """True while any request is running or waiting."""
        return bool(self.running) or bool(self.waiting)

    def start_step(self, now: float) -> float:
        """Schedule the next step at ``now``; return its duration (0.0 when there is nothing to run)."""
        if self._in_step:
            raise RuntimeError("start_step called twice without complete_step")
        self._admitted_now = admitted = []
        loads = 0
        prefill = 0
        p = self.p
        running = self.running
        ra = self.running_adapters
        num_deferred = 0
        deferred_adapters: set[str] = set()
        if self.waiting and len(running) < p.max_num_seqs:
            keep: deque[Request] = deque()
            waiting = self.waiting
            kv_used = self.kv_tokens()
            while waiting:
                req = waiting.popleft()
                if len(running) >= p.max_num_seqs:
                    waiting.appendleft(req)
                    break
                a = req.adapter
                if a is not None and a not in ra and len(ra) >= p.max_loras:
                    keep.append(req)
                    num_deferred += 1
                    deferred_adapters.add(a)
                    continue
                if kv_used + req.prompt_tokens > p.kv_cache_tokens and running:
                    waiting.appendleft(req)
                    break
                # admit
                req.state = RUNNING
                req.admitted_step = self.step_no
                req.admitted_at = now
                running[req.rid] = req
                if req.stream:
                    self.streaming[req.rid] = req
                if a is not None:
                    ra[a] = ra.get(a, 0) + 1
                    if a in self.cpu_cache:
                        self.cpu_cache.move_to_end(a)
                    else:
                        self._make_room()
                        self.cpu_cache[a] = None
                        loads += 1
                prefill += req.prompt_tokens
                kv_used += req.prompt_tokens
                self._kv_prompt += req.prompt_tokens
                self._kv_admit_sum += self.step_no
                admitted.append(req)
                end = self.step_no + req.max_tokens - 1
                bucket = self._finish_at.get(end)
                if bucket is None:
                    self._finish_at[end] = [req]
                else:
                    bucket.append(req)
            if keep:
                keep.extend(waiting)
                self.waiting = keep
        for a in ra:
            if a in self.cpu_cache:
                self.cpu_cache.move_to_end(a)
        self.num_deferred = num_deferred
        self.deferred_adapters = deferred_adapters
        self.num_capacity = len(self.waiting) - num_deferred
        self.stats.adapter_reloads += loads
        if not running:
            return 0.0
        self._in_step = True
        self._step_started = now
        return (
            p.step_time + p.per_seq_step_time * len(running) + p.prefill_time_per_token * prefill + p.load_time * loads
        )

    def complete_step(self, now: float) -> StepResult:
        """End the current step at ``now``: hand out one token per running request, finish the done ones."""
        if not self._in_step:
            return StepResult([], [])
        self._in_step = False
        stats = self.stats
        for req in self._admitted_now:
            if req.state == RUNNING:
                req.first_token_at = now
                stats.ttft.observe(now - req.arrival)
                stats.queue_time.observe(req.admitted_at - req.arrival)
                stats.prompt_tokens += req.prompt_tokens
        stats.generation_tokens += len(self.running)
        self._admitted_now = []
        finished: list[Request] = []
        bucket = self._finish_at.pop(self.step_no, None)
        self.step_no += 1
        stats.steps += 1
        if bucket:
            for req in bucket:
                if req.state != RUNNING:
                    continue
                self._leave_running(req)
                req.state = FINISHED
                req.finished_at = now
                stats.e2e.observe(now - req.arrival)
                stats.success_by_reason["length"] += 1
                self._release(req)
                finished.append(req)
        tokens = list(self.streaming.values()) if self.streaming else []
        self._record_lora_info(now)
        return StepResult(tokens, finished)

    def _leave_running(self, req: Request) -> None:
        del self.running[req.rid]
        self.streaming.pop(req.rid, None)
        self._kv_prompt -= req.prompt_tokens
        self._kv_admit_sum -= req.admitted_step
        a = req.adapter
        if a is not None:
            n = self.running_adapters[a] - 1
            if n:
                self.running_adapters[a] = n
            else:
                del self.running_adapters[a]

    def _release(self, req: Request) -> None:
        a = req.adapter
        if a is not None:
            n = self.in_flight_by_adapter.get(a, 0) - 1
            if n > 0:
                self.in_flight_by_adapter[a] = n
            else:
                self.in_flight_by_adapter.pop(a, None)

    def _record_lora_info(self, now: float) -> None:
        key = ",".join(self.running_adapters)
        info = self.lora_info
        if key not in info and len(info) >= MAX_LORA_INFO_SERIES:
            del info[min(info, key=info.__getitem__)]
        info[key] = now

    # ---- observations ---------------------------------------------------------------------------------
    def kv_tokens(self) -> int:
        """KV cache tokens held by running requests (prompt plus output so far)."""
        n = len(self.running)
        return self._kv_prompt + n * self.step_no - self._kv_admit_sum

    def kv_usage(self) -> float:
        """Fraction of the KV cache in use, as ``vllm:kv_cache_usage_perc`` reports it (0..1)."""
        return min(1.0, self.kv_tokens() / self.p.kv_cache_tokens)

    def running_lora_adapters(self) -> list[str]:
        """Adapters with a request in the running batch, in order of entry."""
        return list(self.running_adapters)

    def num_waiting(self) -> int:
        """Requests waiting (capacity plus deferred)."""
        return len(self.waiting)

    def snapshot(self) -> dict[str, object]:
        """A JSON-able view of the scheduler for tests and ``GET /sim/state``."""
        return {
            "step": self.step_no,
            "running": len(self.running),
            "waiting": len(self.waiting),
            "waiting_capacity": self.num_capacity,
            "waiting_deferred": self.num_deferred,
            "running_adapters": list(self.running_adapters),
            "running_by_adapter": dict(self.running_adapters),
            "deferred_adapters": sorted(self.deferred_adapters),
            "in_flight_by_adapter": dict(self.in_flight_by_adapter),
            "cpu_cache": list(self.cpu_cache),
            "kv_cache_usage": self.kv_usage(),
            "adapter_reloads": self.stats.adapter_reloads,
        }


def run_until_idle(engine: Engine, now: float, max_steps: int = 1_000_000) -> tuple[float, list[Request]]:
    """Step a pure engine with its own modelled time until no work is left (for tests and studies)."""
    finished: list[Request] = []
    for _ in range(max_steps):
        if not engine.has_work():
            break
        dur = engine.start_step(now)
        now += dur
        finished.extend(engine.complete_step(now).finished)
    return now, finished


def adapters_of(requests: Iterable[Request]) -> list[str]:
    """Distinct adapters of some requests, in order."""
    return list(dict.fromkeys(r.adapter for r in requests if r.adapter is not None))
