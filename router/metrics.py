"""The router's observability: Prometheus metrics and the compact ``/router/load`` JSON.

Counts that change on every request (in flight, queued, requests by code, errors) live in the
Accounting as plain integers, and the two latency histograms are plain bucket lists; collectors export
them when Prometheus scrapes, so the request path pays a few additions for its observability.

``/router/load`` is the load source the controller's metric layer reads (format in ``router/README.md``).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from router.accounting import Accounting
from router.routes import RouteTable

LOAD_FORMAT_VERSION = 1

# Dense between 0.5 s and 5 s, where LLM requests' first bytes and short completions land, so that
# quantiles estimated from the buckets are not off by a whole bucket.
_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0,
    20.0, 30.0, 40.0, 60.0, 80.0, 120.0, 160.0, 320.0, 640.0,
)  # fmt: skip


class _AccountingCollector(Collector):
    """Exports the Accounting's counters at scrape time."""

    def __init__(self, accounting: Accounting) -> None:
        self._acc = accounting

    def collect(self) -> Iterator[Any]:
        acc = self._acc
        inflight = GaugeMetricFamily(
            "lora_router_in_flight_requests",
            "Requests the router has sent and not yet finished.",
            labels=["model", "pod"],
        )
        for state in list(acc.pods.values()):
            for model, n in list(state.by_model.items()):
                inflight.add_metric([model, state.pod], n)
        yield inflight
        queued = GaugeMetricFamily(
            "lora_router_queued_requests",
            "Requests waiting in the router for a holder of their model.",
            labels=["model"],
        )
        for model, stats in list(acc.models.items()):
            queued.add_metric([model], stats.queued)
        yield queued
        requests = CounterMetricFamily(
            "lora_router_requests",
            "Requests answered, by model, pod and HTTP status (499: client left).",
            labels=["model", "pod", "code"],
        )
        for (model, pod, code), n in list(acc.codes.items()):
            requests.add_metric([model, pod, str(code)], n)
        yield requests
        errors = CounterMetricFamily(
            "lora_router_errors",
            "Failed upstream attempts by kind (connect, connect_timeout, timeout, stale_route, upstream_5xx, "
            "stream_broken, client_closed).",
            labels=["model", "pod", "kind"],
        )
        for (model, pod, kind), n in list(acc.errors.items()):
            errors.add_metric([model, pod, kind], n)
        yield errors
        moved = CounterMetricFamily(
            "lora_router_deferred_moves",
            "Requests moved off a pod where their adapter waited for a LoRA slot, before any byte of the "
            "answer, to a holder where it runs or has room (--move-deferred-after).",
            labels=["model", "pod"],
        )
        for (model, pod), n in list(acc.moves.items()):
            moved.add_metric([model, pod], n)
        yield moved
        scraped = GaugeMetricFamily(
            "lora_router_pod_scrape_ok", "1 when the pod's last /metrics scrape succeeded.", labels=["pod"]
        )
        for state in list(acc.pods.values()):
            scraped.add_metric([state.pod], 0.0 if state.metrics is None else 1.0)
        yield scraped


class _Histogram:
    """Bucket counts of one label set: an observation is a bisection and two additions, no lock (the event
    loop is the only writer; a scrape reads whole integers)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(_LATENCY_BUCKETS, value)] += 1
        self.sum += value


class _HistogramCollector(Collector):
    def __init__(self, name: str, documentation: str, series: dict[tuple[str, str], _Histogram]) -> None:
        self._name = name
        self._doc = documentation
        self._series = series

    def collect(self) -> Iterator[Any]:
        family = HistogramMetricFamily(self._name, self._doc, labels=["model", "pod"])
        for (model, pod), hist in list(self._series.items()):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip((*_LATENCY_BUCKETS, math.inf), list(hist.counts), strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric([model, pod], buckets, hist.sum)
        yield family


class RouterMetrics:
    """A private registry (so several routers can live in one test process) and the latency histograms."""

    def __init__(self, accounting: Accounting) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_AccountingCollector(accounting))
        self._first_byte: dict[tuple[str, str], _Histogram] = {}
        self._total: dict[tuple[str, str], _Histogram] = {}
        self.registry.register(
            _HistogramCollector(
                "lora_router_time_to_first_byte_seconds",
                "From the request's arrival to the first byte relayed to the client.",
                self._first_byte,
            )
        )
        self.registry.register(
            _HistogramCollector(
                "lora_router_request_duration_seconds",
                "From the request's arrival to the last byte relayed (or the failure).",
                self._total,
            )
        )

    def forget(self, pods: set[str]) -> None:
        """Drop the histograms of pods that are gone."""
        for series in (self._first_byte, self._total):
            for key in [k for k in series if k[1] in pods]:
                del series[key]

    def observe_first_byte(self, model: str, pod: str, seconds: float) -> None:
        hist = self._first_byte.get((model, pod))
        if hist is None:
            hist = self._first_byte[(model, pod)] = _Histogram()
        hist.observe(seconds)

    def observe_total(self, model: str, pod: str, seconds: float) -> None:
        hist = self._total.get((model, pod))
        if hist is None:
            hist = self._total[(model, pod)] = _Histogram()
        hist.observe(seconds)


def load_report(
    table: RouteTable, acc: Accounting, now: float, wall_time: float, strategy: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``/router/load`` document: per model and per pod, in-flight and queued counts and rates.

    ``now`` is the monotonic time the rate snapshots were taken with; ``wall_time`` is reported as is.
    """
    model_rates, pair_rates = acc.rates(now)
    pods_by_address = acc.pods
    models: dict[str, Any] = {}

    def model_entry(model: str, is_base: bool | None) -> dict[str, Any]:
        entry = models.get(model)
        if entry is None:
            stats = acc.models.get(model)
            entry = models[model] = {
                "base": is_base,
                "routable": False,
                "in_flight": stats.inflight if stats else 0,
                "queued": stats.queued if stats else 0,
                "rate": round(model_rates.get(model, 0.0), 4),
                "started_total": stats.started if stats else 0,
                "pods": {},
            }
        return entry

    def pod_entry(entry: dict[str, Any], model: str, address: str, pod: str, tier: str | None) -> None:
        state = pods_by_address.get(address)
        entry["pods"][pod] = {
            "address": address,
            "tier": tier,
            "routable": tier is not None,
            "in_flight": state.by_model.get(model, 0) if state else 0,
            "rate": round(pair_rates.get((model, address), 0.0), 4),
        }

    for route in table.routes():
        entry = model_entry(route.model, route.is_base)
        entry["routable"] = bool(route.holders)
        for h in route.holders:
            pod_entry(entry, route.model, h.address, h.pod, h.tier)
    # Pods that left a model's table but still finish requests for it (a drain in progress).
    for address, state in pods_by_address.items():
        for model in state.by_model:
            entry = model_entry(model, None)
            if state.pod not in entry["pods"]:
                pod_entry(entry, model, address, state.pod, None)
    for model, stats in acc.models.items():
        if stats.queued and model not in models:
            model_entry(model, None)

    pods: dict[str, Any] = {}
    for address, state in pods_by_address.items():
        m = state.metrics
        pods[state.pod if state.pod not in pods else address] = {
            "address": address,
            "in_flight": state.inflight,
            "in_flight_by_model": dict(state.by_model),
            "scraped": None
            if m is None
            else {
                "waiting": m.waiting,
                "deferred": m.deferred,
                "running": m.running,
                "kv_cache_usage": m.kv_usage,
                "max_loras": m.max_loras,
                "running_adapters": sorted(m.running_adapters),
                "waiting_adapters": sorted(m.waiting_adapters),
            },
        }
    return {
        "version": LOAD_FORMAT_VERSION,
        "time": wall_time,
        "window_seconds": acc.rate_window,
        "routes_synced": table.synced,
        "strategy": strategy or {},
        "models": models,
        "pods": pods,
    }
