"""The load signal: one interface, several sources.

vLLM's own metrics say only which adapters are busy on a replica (``vllm:lora_requests_info`` carries
names, no counts, and omits adapters starved by the LoRA budget), so the precise per-adapter signal is the
router's own count of outstanding requests. Sources:

- :class:`RouterSource` reads the router's per-adapter, per-pod in-flight and queued counts;
- :class:`VLLMScrapeSource` scrapes each pod's ``/metrics`` and estimates per-adapter load from the newest
  ``vllm:lora_requests_info`` series (age-checked) and the pod's waiting, deferred and running counts;
- :class:`WaitingLoraAdaptersSource` is the proposal's signal alone: an adapter named in a pod's
  ``waiting_lora_adapters`` is under pressure there;
- :class:`PrometheusSource` asks a Prometheus server that already scrapes vLLM;
- :class:`CombinedSource` (the default) takes the router's counts where it has them and the vLLM estimate
  elsewhere, so adapters starved by the LoRA budget are seen either way.

The unit of the signal is outstanding requests (running + waiting) per routable replica: a number a user
can reason about when setting thresholds. Parsing and arithmetic are pure functions; only ``collect``
methods do I/O. Adding a source is one small class with a ``collect`` method.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlencode

import urllib3
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

LORA_INFO = "vllm:lora_requests_info"
WAITING = "vllm:num_requests_waiting"
WAITING_BY_REASON = "vllm:num_requests_waiting_by_reason"
RUNNING = "vllm:num_requests_running"
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # renamed in vLLM 0.9.2


@dataclass(frozen=True)
class PodTarget:
    """A pod the signal is collected for: its name, address (ip:port) and the adapters placed there."""

    name: str
    address: str
    adapters: frozenset[str]


@dataclass(frozen=True)
class PodSample:
    """One scrape of one pod's vLLM metrics, reduced to what placement and routing need."""

    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    lists_age: float | None = None  # seconds since the newest lora_requests_info series was updated
    max_lora: int | None = None
    running: float = 0.0
    waiting: float = 0.0
    deferred: float = 0.0
    kv_usage: float | None = None


@dataclass(frozen=True)
class LoadSnapshot:
    """Outstanding requests per adapter and pod at one moment; ``None`` where a source knows nothing."""

    outstanding: dict[str, dict[str, float]] = field(default_factory=dict)  # adapter -> pod -> requests
    pods: dict[str, PodSample] = field(default_factory=dict)
    source: str = ""
    errors: tuple[str, ...] = ()

    def per_replica(self, adapter: str, routable_pods: Iterable[str]) -> float | None:
        """The signal the policy compares with its thresholds: outstanding requests per routable replica."""
        per_pod = self.outstanding.get(adapter)
        if per_pod is None:
            return None
        replicas = max(1, len(set(routable_pods)))
        return sum(per_pod.values()) / replicas


class LoadSource(Protocol):
    """Every source answers the same question for the same targets."""

    name: str

    def collect(self, targets: list[PodTarget], now: float) -> LoadSnapshot: ...


# --- parsing (pure) ---------------------------------------------------------------------------------


class MetricsFormatError(ValueError):
    """A pod's /metrics could not be read as Prometheus text."""


def parse_vllm_metrics(text: str, now: float, max_age: float = 10.0) -> PodSample:
    """Reduce a pod's ``/metrics`` text to a :class:`PodSample`.

    ``vllm:lora_requests_info`` keeps one series per label set ever seen, valued with its last update time:
    the newest one is the current state, and lists older than ``max_age`` are treated as empty (traffic
    stopped, or the engine is stuck). Malformed text raises :class:`MetricsFormatError`.
    """
    newest: tuple[float, dict[str, str]] | None = None
    running = waiting = deferred = 0.0
    kv: dict[str, float] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises several types on bad input
        raise MetricsFormatError(f"malformed Prometheus text: {exc}") from exc
    for family in families:
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if not isinstance(value, int | float) or math.isnan(value):
                continue
            if name == LORA_INFO:
                if newest is None or value > newest[0]:
                    newest = (float(value), dict(labels))
            elif name == RUNNING:
                running += value
            elif name == WAITING:
                waiting += value
            elif name == WAITING_BY_REASON and labels.get("reason") == "deferred":
                deferred += value
            elif name in KV_USAGE:
                kv[name] = value
    kv_usage = kv.get(KV_USAGE[0], kv.get(KV_USAGE[1]))
    if newest is None:
        return PodSample(running=running, waiting=waiting, deferred=deferred, kv_usage=kv_usage)
    stamp, labels = newest
    age = max(0.0, now - stamp)
    fresh = age <= max_age
    max_lora: int | None
    try:
        max_lora = int(labels.get("max_lora", ""))
    except ValueError:
        max_lora = None
    return PodSample(
        running_adapters=_names(labels.get("running_lora_adapters", "")) if fresh else frozenset(),
        waiting_adapters=_names(labels.get("waiting_lora_adapters", "")) if fresh else frozenset(),
        lists_age=age,
        max_lora=max_lora,
        running=running,
        waiting=waiting,
        deferred=deferred,
        kv_usage=kv_usage,
    )


def _names(joined: str) -> frozenset[str]:
    return frozenset(n.strip() for n in joined.split(",") if n.strip())


def estimate_from_vllm(target: PodTarget, sample: PodSample) -> dict[str, float]:
    """Per-adapter outstanding requests on one pod, from vLLM's coarse metrics.

    Requests that are scheduled (running, or waiting for capacity) are shared among the adapters the pod
    lists as active. Deferred requests belong to adapters starved by the LoRA budget, which vLLM lists
    nowhere: they are shared among the adapters placed on the pod that the lists do not name (if every
    placed adapter is listed, among all listed ones).
    """
    out = dict.fromkeys(target.adapters, 0.0)
    active = sample.running_adapters | sample.waiting_adapters
    scheduled = max(0.0, sample.running + sample.waiting - sample.deferred)
    if active and scheduled:
        share = scheduled / len(active)
        for adapter in active:
            out[adapter] = out.get(adapter, 0.0) + share
    if sample.deferred:
        starved = [a for a in sorted(target.adapters) if a not in active] or sorted(active)
        if starved:
            share = sample.deferred / len(starved)
            for adapter in starved:
                out[adapter] = out.get(adapter, 0.0) + share
    return out


def estimate_from_waiting_lists(target: PodTarget, sample: PodSample) -> dict[str, float]:
    """The proposal's signal: an adapter named in ``waiting_lora_adapters`` is under pressure on the pod.

    Each such adapter is given an equal share of the pod's outstanding requests (running + waiting); no
    other metric is used, so adapters starved by the LoRA budget (listed nowhere) read as idle.
    """
    out = dict.fromkeys(target.adapters, 0.0)
    if sample.waiting_adapters:
        share = (sample.running + sample.waiting) / len(sample.waiting_adapters)
        for adapter in sample.waiting_adapters:
            out[adapter] = out.get(adapter, 0.0) + share
    return out


def parse_router_load(body: bytes) -> dict[str, dict[str, float]]:
    """The router's ``/router/load`` JSON -> adapter -> pod -> outstanding requests.

    The router publishes ``models`` (format in ``router/README.md``): per model its requests queued in the
    router and, per pod, its requests in flight there (pods that left the route table and still finish
    requests included: that load is real). Base-model entries are skipped. Requests queued in the router
    (no ready holder) are pressure on the adapter as a whole, kept under the key ``<router-queue>``. The
    older ``adapters`` shape (per pod ``in_flight`` and ``queued``) is read too.
    """
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("router load: expected a JSON object with 'models'")
    models = data.get("models", data.get("adapters"))
    if not isinstance(models, dict):
        raise ValueError("router load: expected an object with 'models'")
    out: dict[str, dict[str, float]] = {}
    for adapter, entry in models.items():
        if not isinstance(entry, dict) or entry.get("base") is True:
            continue
        pods = entry.get("pods")
        per_pod: dict[str, float] = {}
        if isinstance(pods, dict):
            for pod, counts in pods.items():
                if isinstance(counts, dict):
                    value = _number(counts.get("in_flight")) + _number(counts.get("queued"))
                    per_pod[str(pod)] = per_pod.get(str(pod), 0.0) + value
        queued = _number(entry.get("queued"))
        if queued:  # waiting in the router for any holder: pressure on the adapter as a whole
            per_pod[ROUTER_QUEUE] = per_pod.get(ROUTER_QUEUE, 0.0) + queued
        out[str(adapter)] = per_pod
    return out


ROUTER_QUEUE = "<router-queue>"


def _number(value: object) -> float:
    """A count from JSON; anything that is not a finite non-negative number counts as 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return 0.0
    return float(value)


def router_in_flight(body: bytes, adapter: str, pod: str) -> bool | None:
    """From ``/router/load``: does the router still send ``adapter`` to ``pod``, or have requests there?

    True while the router lists the pod as a routable holder (it has not seen the drain yet) or has
    requests of the adapter in flight on it; False when neither; None when the document is unreadable.
    """
    try:
        data = json.loads(body)
    except ValueError:
        return None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        return None
    entry = models.get(adapter)
    if not isinstance(entry, dict):
        return False  # the router knows no such model: nothing of it is in flight anywhere
    counts = (entry.get("pods") or {}).get(pod) if isinstance(entry.get("pods"), dict) else None
    if not isinstance(counts, dict):
        return False
    return bool(counts.get("routable")) or _number(counts.get("in_flight")) > 0


# --- sources (I/O at the edge) ----------------------------------------------------------------------


MetricsFetcher = Callable[[str], str]  # address -> /metrics text


class VLLMScrapeSource:
    """Scrapes every pod's ``/metrics`` in parallel; per-adapter load is estimated (see module doc)."""

    name = "vllm"

    def __init__(self, fetch: MetricsFetcher, *, max_age: float = 10.0, workers: int = 16,
                 estimate: Callable[[PodTarget, PodSample], dict[str, float]] = estimate_from_vllm) -> None:
        self._fetch = fetch
        self._max_age = max_age
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scrape")
        self._estimate = estimate

    def collect(self, targets: list[PodTarget], now: float) -> LoadSnapshot:
        results = list(self._pool.map(self._scrape_one, targets, [now] * len(targets)))
        outstanding: dict[str, dict[str, float]] = {}
        pods: dict[str, PodSample] = {}
        errors: list[str] = []
        for target, result in zip(targets, results, strict=True):
            if isinstance(result, str):
                errors.append(result)
                continue
            pods[target.name] = result
            for adapter, value in self._estimate(target, result).items():
                outstanding.setdefault(adapter, {})[target.name] = value
        return LoadSnapshot(outstanding, pods, self.name, tuple(errors))

    def _scrape_one(self, target: PodTarget, now: float) -> PodSample | str:
        try:
            return parse_vllm_metrics(self._fetch(target.address), now, self._max_age)
        except Exception as exc:  # one bad pod must not blind the others
            return f"{target.name}: {exc}"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class WaitingLoraAdaptersSource(VLLMScrapeSource):
    """Only the proposal's ``waiting_lora_adapters`` lists (see :func:`estimate_from_waiting_lists`)."""

    name = "waitingLoraAdapters"

    def __init__(self, fetch: MetricsFetcher, *, max_age: float = 10.0, workers: int = 16) -> None:
        super().__init__(fetch, max_age=max_age, workers=workers, estimate=estimate_from_waiting_lists)


class RouterSource:
    """The router's exact per-adapter, per-pod outstanding counts."""

    name = "router"

    def __init__(self, url: str, *, timeout: float = 1.0, pool: urllib3.PoolManager | None = None) -> None:
        self._url = url.rstrip("/") + "/router/load"
        self._pool = pool or urllib3.PoolManager(retries=False)
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)

    def collect(self, targets: list[PodTarget], now: float) -> LoadSnapshot:
        try:
            response = self._pool.request("GET", self._url, timeout=self._timeout)
            if response.status != 200:
                raise ValueError(f"router answered {response.status}")
            outstanding = parse_router_load(response.data)
        except Exception as exc:
            return LoadSnapshot(source=self.name, errors=(f"router {self._url}: {exc}",))
        for target in targets:  # adapters the router has not seen are idle, not unknown
            for adapter in target.adapters:
                outstanding.setdefault(adapter, {})
        return LoadSnapshot(outstanding, {}, self.name)


class PrometheusSource:
    """Reads the vLLM metrics from a Prometheus server that already scrapes the pods (matched by pod IP)."""

    name = "prometheus"

    def __init__(self, url: str, *, timeout: float = 2.0, max_age: float = 10.0,
                 pool: urllib3.PoolManager | None = None) -> None:
        self._url = url.rstrip("/") + "/api/v1/query"
        self._pool = pool or urllib3.PoolManager(retries=False)
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)
        self._max_age = max_age

    def _query(self, promql: str) -> list[dict[str, object]]:
        response = self._pool.request("GET", f"{self._url}?{urlencode({'query': promql})}", timeout=self._timeout)
        data = json.loads(response.data)
        if response.status != 200 or data.get("status") != "success":
            raise ValueError(f"prometheus answered {response.status}: {data.get('error', '')}")
        result = data.get("data", {}).get("result", [])
        return result if isinstance(result, list) else []

    def collect(self, targets: list[PodTarget], now: float) -> LoadSnapshot:
        by_ip = {t.address.rsplit(":", 1)[0]: t for t in targets}
        lines: dict[str, list[str]] = {t.name: [] for t in targets}
        try:
            for metric in (LORA_INFO, RUNNING, WAITING, WAITING_BY_REASON):
                for row in self._query(metric):
                    labels = row.get("metric") if isinstance(row.get("metric"), dict) else {}
                    assert isinstance(labels, dict)
                    ip = str(labels.get("instance", "")).rsplit(":", 1)[0]
                    target = by_ip.get(ip)
                    value = row.get("value")
                    if target is None or not isinstance(value, list) or len(value) != 2:
                        continue
                    keep = {k: v for k, v in labels.items() if k not in ("__name__", "instance", "job")}
                    rendered = ",".join(f'{k}="{v}"' for k, v in sorted(keep.items()))
                    lines[target.name].append(f"{metric}{{{rendered}}} {value[1]}")
        except Exception as exc:
            return LoadSnapshot(source=self.name, errors=(f"prometheus {self._url}: {exc}",))
        outstanding: dict[str, dict[str, float]] = {}
        pods: dict[str, PodSample] = {}
        for target in targets:
            if not lines[target.name]:
                continue
            sample = parse_vllm_metrics("\n".join(lines[target.name]) + "\n", now, self._max_age)
            pods[target.name] = sample
            for adapter, value in estimate_from_vllm(target, sample).items():
                outstanding.setdefault(adapter, {})[target.name] = value
        return LoadSnapshot(outstanding, pods, self.name)


class CombinedSource:
    """The router's exact counts where it has them, vLLM's estimate elsewhere; both sets of pod samples."""

    name = "combined"

    def __init__(self, router: LoadSource | None, vllm: LoadSource) -> None:
        self._router = router
        self._vllm = vllm

    def collect(self, targets: list[PodTarget], now: float) -> LoadSnapshot:
        scraped = self._vllm.collect(targets, now)
        if self._router is None:
            return LoadSnapshot(scraped.outstanding, scraped.pods, self.name, scraped.errors)
        routed = self._router.collect(targets, now)
        if routed.errors and not routed.outstanding:
            return LoadSnapshot(scraped.outstanding, scraped.pods, self.name, routed.errors + scraped.errors)
        outstanding = {a: dict(p) for a, p in scraped.outstanding.items()}
        outstanding.update(routed.outstanding)
        return LoadSnapshot(outstanding, scraped.pods, self.name, routed.errors + scraped.errors)


def merge_targets(assignment: Mapping[str, Iterable[str]], addresses: Mapping[str, str]) -> list[PodTarget]:
    """Targets from a placement (adapter -> pods) and pod addresses (pod -> ip:port)."""
    per_pod: dict[str, set[str]] = {pod: set() for pod in addresses}
    for adapter, pods in assignment.items():
        for pod in pods:
            if pod in per_pod:
                per_pod[pod].add(adapter)
    return [PodTarget(pod, addresses[pod], frozenset(adapters)) for pod, adapters in sorted(per_pod.items())]
