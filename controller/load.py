"""The load signal wired to each autoscaler's spec: which source, collected when, and never for long.

:class:`SpecLoadProvider` is the reconciler's ``load_provider``. Per autoscaler it builds the source that
``spec.scaling.metric`` names (``combined``: the router's counts when ``routerUrl`` is set, plus the vLLM
scrape; ``router``; ``vllm``; ``waitingLoraAdapters``; ``prometheus``), rebuilds it when that part of the
spec changes, and collects once per sync for the serving pods.

A collect runs on a small thread pool and the sync waits for it a bounded time (``wait``, 0.8 s by
default; every HTTP call has a 1 s timeout). A collect that takes longer is not abandoned: it finishes in
the background and the sync uses the newest snapshot that is younger than ``maxAgeSeconds``, so a slow
or dead pod or router never holds a reconcile worker for more than ``wait``, and one collect per
autoscaler is in flight at most.

:class:`RouterInFlightProbe` is the placement reconciler's ``in_flight_probe`` for drains: the router's
``/router/load`` says per pod how many requests of an adapter it still has in flight there, and whether it
still routes the adapter to the pod (it has not yet seen the drain).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3

from api import v1alpha1 as v1
from controller import metrics
from controller.pods import PodView
from controller.runtime import Runtime
from controller.signals import (
    CombinedSource,
    LoadSnapshot,
    LoadSource,
    MetricsFetcher,
    PrometheusSource,
    RouterSource,
    VLLMScrapeSource,
    WaitingLoraAdaptersSource,
    merge_targets,
    router_in_flight,
)

log = logging.getLogger(__name__)

HTTP_TIMEOUT = 1.0
"""Seconds for one scrape or one router call: a sync is 1 s, a slower answer is no use to it."""

SourceMaker = Callable[[v1.LoRAAutoscaler], LoadSource]


@dataclass(frozen=True)
class SourceConfig:
    """The parts of a spec a source depends on; a change rebuilds the source."""

    source: str
    router_url: str | None
    prometheus_url: str | None
    max_age: float
    scheme: str
    api_key_ref: tuple[str, str] | None

    @classmethod
    def of(cls, auto: v1.LoRAAutoscaler) -> SourceConfig:
        metric, vllm = auto.spec.scaling.metric, auto.spec.vllm
        ref = vllm.api_key_secret_ref
        return cls(metric.source, metric.router_url, metric.prometheus.url if metric.prometheus else None,
                   float(metric.max_age_seconds), vllm.scheme, (ref.name, ref.key) if ref else None)


def build_source(cfg: SourceConfig, fetch: MetricsFetcher, *, timeout: float = HTTP_TIMEOUT,
                 workers: int = 8, pool: urllib3.PoolManager | None = None) -> LoadSource:
    """The source ``cfg`` names. ``fetch`` reads one pod's ``/metrics`` (address -> text)."""
    if cfg.source == "router":
        if not cfg.router_url:
            raise ValueError("scaling.metric.source is router but scaling.metric.routerUrl is not set")
        return RouterSource(cfg.router_url, timeout=timeout, pool=pool)
    if cfg.source == "vllm":
        return VLLMScrapeSource(fetch, max_age=cfg.max_age, workers=workers)
    if cfg.source == "waitingLoraAdapters":
        return WaitingLoraAdaptersSource(fetch, max_age=cfg.max_age, workers=workers)
    if cfg.source == "prometheus":
        if not cfg.prometheus_url:
            raise ValueError("scaling.metric.source is prometheus but scaling.metric.prometheus.url is not set")
        return PrometheusSource(cfg.prometheus_url, timeout=timeout, max_age=cfg.max_age, pool=pool)
    if cfg.source == "combined":
        router = RouterSource(cfg.router_url, timeout=timeout, pool=pool) if cfg.router_url else None
        return CombinedSource(router, VLLMScrapeSource(fetch, max_age=cfg.max_age, workers=workers))
    raise ValueError(f"unknown scaling.metric.source {cfg.source!r}")


def _close(source: object) -> None:
    """Sources that own threads close them; others (and wrappers) are left to the collector."""
    for inner in (getattr(source, "_vllm", None), getattr(source, "_router", None), source):
        close = getattr(inner, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # closing must never fail a sync
                log.debug("closing a load source failed", exc_info=True)


@dataclass
class _Entry:
    config: object
    source: LoadSource
    future: cf.Future[LoadSnapshot] | None = None
    started: float = 0.0
    snapshot: LoadSnapshot | None = None
    taken: float = 0.0


class SpecLoadProvider:
    """``load_provider`` for the autoscaler reconciler: the source of each autoscaler's spec, collected
    every sync without blocking the sync for longer than ``wait`` seconds."""

    def __init__(self, rt: Runtime | None = None, *, make_source: SourceMaker | None = None, wait: float = 0.8,
                 workers: int = 4) -> None:
        if rt is None and make_source is None:
            raise ValueError("SpecLoadProvider needs a Runtime or a make_source")
        self._rt = rt
        self._make = make_source
        self._wait = wait
        self._pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="load-signal")
        self._http = urllib3.PoolManager(num_pools=8, maxsize=4, retries=False)
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    # ---- the seam ---------------------------------------------------------------------------------------

    def __call__(self, view: Any, now: float) -> LoadSnapshot | None:
        """This sync's snapshot for ``view.key`` (a :class:`controller.autoscaler_reconciler.SyncView`)."""
        auto: v1.LoRAAutoscaler = view.autoscaler
        entry = self._entry(view.key, auto)
        max_age = float(auto.spec.scaling.metric.max_age_seconds)
        addresses = {p.name: f"{p.ip}:{view.port}" for p in view.pods if p.ip}
        targets = merge_targets(view.assignment, addresses)
        with self._lock:
            if entry.future is None:
                entry.started = now
                entry.future = self._pool.submit(self._collect, entry.source, targets, now)
            future = entry.future
        done, _ = cf.wait([future], timeout=self._wait)
        if done:
            try:
                snap = future.result()
            except Exception as exc:  # _collect catches; this is belt and braces
                snap = LoadSnapshot(source=getattr(entry.source, "name", ""), errors=(str(exc),))
            with self._lock:
                if entry.future is future:
                    entry.future = None
                    entry.snapshot, entry.taken = snap, entry.started
        with self._lock:
            latest, taken = entry.snapshot, entry.taken
        if latest is None:
            return None  # the first collect is still running: unknown, not a failure
        if now - taken > max_age:
            return LoadSnapshot(source=latest.source, errors=(
                f"no fresh sample: the last collect finished {now - taken:.1f}s ago (maxAgeSeconds {max_age:g})",))
        return latest

    def forget(self, key: str) -> None:
        """The autoscaler is gone: close its source."""
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is not None:
            _close(entry.source)

    def close(self) -> None:
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            _close(entry.source)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.clear()

    # ---- internals --------------------------------------------------------------------------------------

    def _entry(self, key: str, auto: v1.LoRAAutoscaler) -> _Entry:
        config: object = SourceConfig.of(auto) if self._make is None else (SourceConfig.of(auto), id(self._make))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.config == config:
                return entry
        source = self._make(auto) if self._make is not None else self._build(auto)
        with self._lock:
            old = self._entries.get(key)
            entry = self._entries[key] = _Entry(config, source)
        if old is not None:
            _close(old.source)
        return entry

    def _build(self, auto: v1.LoRAAutoscaler) -> LoadSource:
        rt = self._rt
        assert rt is not None
        vllm = auto.spec.vllm
        ref = vllm.api_key_secret_ref
        ns = auto.namespace

        def fetch(address: str) -> str:
            key = rt.read_secret(ns, ref.name, ref.key) if ref is not None else None
            return rt.vllm.get(vllm.scheme, key, HTTP_TIMEOUT).metrics(address, timeout=HTTP_TIMEOUT)

        return build_source(SourceConfig.of(auto), fetch, pool=self._http)

    @staticmethod
    def _collect(source: LoadSource, targets: list[Any], now: float) -> LoadSnapshot:
        started = time.monotonic()
        name = getattr(source, "name", "unknown")
        try:
            snap = source.collect(targets, now)
        except Exception as exc:  # one broken source must not break the sync
            snap = LoadSnapshot(source=name, errors=(f"{name}: {exc}",))
        metrics.SIGNAL_SECONDS.labels(name).observe(time.monotonic() - started)
        if snap.errors:
            metrics.SIGNAL_ERRORS.labels(name).inc(len(snap.errors))
            log.debug("load signal (%s): %s", name, "; ".join(snap.errors[:3]))
        return snap


class RouterInFlightProbe:
    """``in_flight_probe`` for drains: the router's per-pod counts when ``routerUrl`` is set.

    The router's answer wins when it says requests are in flight (or it still routes the adapter to the
    pod); otherwise the fallback (the pod's own ``vllm:lora_requests_info``) is asked too, since clients
    may reach pods by other ways. Router answers are cached for ``ttl`` seconds per URL, so a drain of
    many placements costs one call.
    """

    def __init__(self, fallback: Callable[[PodView, str, v1.LoRAAutoscaler], bool | None] | None = None, *,
                 timeout: float = HTTP_TIMEOUT, ttl: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fallback = fallback
        self._pool = urllib3.PoolManager(num_pools=4, maxsize=2, retries=False)
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, bytes | None]] = {}

    def _load(self, url: str) -> bytes | None:
        now = self._clock()
        with self._lock:
            hit = self._cache.get(url)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        body: bytes | None = None
        try:
            response = self._pool.request("GET", url.rstrip("/") + "/router/load", timeout=self._timeout)
            body = response.data if response.status == 200 else None
        except Exception as exc:
            log.debug("router load from %s failed: %s", url, exc)
        with self._lock:
            self._cache[url] = (now, body)
        return body

    def __call__(self, pod: PodView, adapter: str, auto: v1.LoRAAutoscaler) -> bool | None:
        url = auto.spec.scaling.metric.router_url
        routed: bool | None = None
        if url:
            body = self._load(url)
            routed = router_in_flight(body, adapter, pod.name) if body is not None else None
            if routed:
                return True
        other = self._fallback(pod, adapter, auto) if self._fallback is not None else None
        if other:
            return True
        if routed is False:
            return False  # the router has nothing there, and the pod shows nothing (or cannot say)
        return other
