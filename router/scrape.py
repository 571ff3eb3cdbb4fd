"""Each pod's vLLM state, read from its ``/metrics`` in the background (never on the request path).

Only the few series the strategies use are parsed, found by line prefix, so a scrape of a large metrics
page costs little. Facts respected (see the project's vLLM notes): ``vllm:lora_requests_info`` keeps one
series per label set with its last update time as the value, so the newest series is the current one;
``vllm:kv_cache_usage_perc`` replaced ``vllm:gpu_cache_usage_perc``; several engines may report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp

log = logging.getLogger("router.scrape")

_WAITING = "vllm:num_requests_waiting{"
_WAITING_BARE = "vllm:num_requests_waiting "
_BY_REASON = "vllm:num_requests_waiting_by_reason{"
_RUNNING = "vllm:num_requests_running"
_KV = "vllm:kv_cache_usage_perc"
_GPU_KV = "vllm:gpu_cache_usage_perc"
_LORA_INFO = "vllm:lora_requests_info{"


@dataclass(frozen=True, slots=True)
class PodMetrics:
    """One scrape's view of a pod: queue, batch, KV cache and LoRA state."""

    waiting: float = 0.0
    deferred: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    max_loras: int | None = None
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    #: How many samples of the queue and batch series were read: 0 means the page is not vLLM's.
    samples: int = 0


def _parse_labels(text: str) -> dict[str, str]:
    """Prometheus label text (between the braces) into a dict; handles escaped quotes and commas."""
    labels: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        eq = text.find("=", i)
        if eq < 0:
            break
        name = text[i:eq].strip().lstrip(",").strip()
        if eq + 1 >= n or text[eq + 1] != '"':
            raise ValueError(f"label {name!r} value is not quoted")
        j = eq + 2
        chars: list[str] = []
        while j < n and text[j] != '"':
            if text[j] == "\\" and j + 1 < n:
                nxt = text[j + 1]
                chars.append("\n" if nxt == "n" else nxt)
                j += 2
            else:
                chars.append(text[j])
                j += 1
        labels[name] = "".join(chars)
        i = j + 1
        while i < n and text[i] in ", ":
            i += 1
    return labels


def _split_sample(line: str) -> tuple[dict[str, str], float]:
    """``name{labels} value [timestamp]`` into labels and value."""
    close = line.rfind("}")
    if close >= 0:
        labels = _parse_labels(line[line.index("{") + 1 : close])
        rest = line[close + 1 :].split()
    else:
        labels = {}
        rest = line.split()[1:]
    if not rest:
        raise ValueError(f"sample without value: {line[:80]!r}")
    value = float(rest[0])
    if not math.isfinite(value):  # NaN or infinity would poison every cost compared with it
        raise ValueError(f"sample value is not finite: {line[:80]!r}")
    return labels, value


def _names(value: str) -> frozenset[str]:
    return frozenset(n for n in value.split(",") if n)


def parse_vllm_metrics(text: str) -> PodMetrics:
    """The strategies' view of one ``/metrics`` page (Prometheus text format); malformed lines are skipped."""
    waiting = deferred = running = 0.0
    samples = 0
    kv: list[float] = []
    gpu_kv: list[float] = []
    info_time = -math.inf
    info_labels: dict[str, str] | None = None
    max_loras: int | None = None
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        try:
            if line.startswith(_WAITING) or line.startswith(_WAITING_BARE):
                waiting += _split_sample(line)[1]
                samples += 1
            elif line.startswith(_BY_REASON):
                labels, value = _split_sample(line)
                if labels.get("reason") == "deferred":
                    deferred += value
            elif line.startswith(_RUNNING) and line[len(_RUNNING)] in "{ ":
                running += _split_sample(line)[1]
                samples += 1
            elif line.startswith(_KV) and line[len(_KV)] in "{ ":
                kv.append(_split_sample(line)[1])
            elif line.startswith(_GPU_KV) and line[len(_GPU_KV)] in "{ ":
                gpu_kv.append(_split_sample(line)[1])
            elif line.startswith(_LORA_INFO):
                labels, value = _split_sample(line)
                if "max_lora" in labels:
                    with contextlib.suppress(ValueError):
                        max_loras = int(float(labels["max_lora"]))
                if value > info_time:
                    info_time, info_labels = value, labels
        except (ValueError, IndexError):
            continue
    usage = kv or gpu_kv
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    # After traffic stops the newest series may still list adapters: with nothing running or waiting,
    # nothing is active whatever the old series says.
    if info_labels is not None and (running > 0 or waiting > 0):
        running_adapters = _names(info_labels.get("running_lora_adapters", ""))
        waiting_adapters = _names(info_labels.get("waiting_lora_adapters", ""))
    return PodMetrics(
        waiting=waiting,
        deferred=deferred,
        running=running,
        kv_usage=max(usage) if usage else 0.0,
        max_loras=max_loras,
        running_adapters=running_adapters,
        waiting_adapters=waiting_adapters,
        samples=samples,
    )


class Scraper:
    """Polls every pod in the route table on a fixed period and hands each result to ``store``.

    A pod that fails to answer is reported with ``None`` (its state unknown) after ``max_failures``
    consecutive failures, so a dead pod's last good scrape does not linger.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        targets: Callable[[], Mapping[str, str]],
        store: Callable[[str, PodMetrics | None], None],
        *,
        interval: float = 0.3,
        timeout: float = 1.0,
        headers: Mapping[str, str] | None = None,
        max_failures: int = 3,
    ) -> None:
        self._session = session
        self._targets = targets
        self._store = store
        self._interval = interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = dict(headers or {})
        self._max_failures = max_failures
        self._failures: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="router-scraper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def scrape_once(self) -> None:
        """One round over every target, concurrently."""
        targets = list(self._targets())
        if targets:
            await asyncio.gather(*(self._scrape(addr) for addr in targets))
        for addr in list(self._failures):
            if addr not in targets:
                del self._failures[addr]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.scrape_once()
            except Exception:  # a bug here must not stop scraping for good
                log.exception("scrape round failed")
            await asyncio.sleep(max(0.0, self._interval - (loop.time() - started)))

    async def _scrape(self, address: str) -> None:
        try:
            async with self._session.get(
                f"http://{address}/metrics", headers=self._headers, timeout=self._timeout
            ) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
                # Bytes, not resp.text(): a page that is not UTF-8 must count as garbage, not end the round.
                text = (await resp.read()).decode("utf-8", errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._failed(address, f"unreachable ({exc})")
            return
        metrics = parse_vllm_metrics(text)
        if not metrics.samples:
            # Not vLLM's page (a proxy's error page, another server on the port): its state is unknown,
            # not idle; an idle reading would draw every request to it.
            self._failed(address, "answered without vllm:num_requests_waiting or vllm:num_requests_running")
            return
        self._failures.pop(address, None)
        self._store(address, metrics)

    def _failed(self, address: str, reason: str) -> None:
        n = self._failures.get(address, 0) + 1
        self._failures[address] = n
        if n == self._max_failures:
            log.warning("metrics of %s %s; treating its state as unknown", address, reason)
        if n >= self._max_failures:
            self._store(address, None)
