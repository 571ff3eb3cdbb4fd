"""What the live view and the plots show, read once a second from the cluster and the router.

Nothing here is computed by the demo itself: placements, slices, status and conditions come from the API
server, request rates, in-flight counts and latencies from the router (`/router/load` and `/metrics`).
Parsing is pure; :class:`Observer.sample` does the reads.
"""

from __future__ import annotations

import json
import urllib.request
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from api import labels as L
from common.kube import ENDPOINT_SLICES, EVENTS, LORA_AUTOSCALERS, LORA_PLACEMENTS, PODS, KubeClient

LATENCY_METRIC = "lora_router_request_duration_seconds"
LATENCY_WINDOW_SECONDS = 10.0
CONTROLLER = "lora-autoscaler-controller"
"""The reportingController of the controller's Events."""


@dataclass
class AdapterRow:
    """One adapter at one moment."""

    name: str
    desired: int | None = None
    loaded: int | None = None
    routable: int = 0
    load: float | None = None
    rate: float = 0.0
    in_flight: int = 0
    queued: int = 0
    latency: float | None = None
    """Mean seconds per request over the last window, from the router's histogram."""
    placements: dict[str, str] = field(default_factory=dict)
    """pod -> phase (``Draining`` etc.; a retiring placement that is still ``Loaded`` shows as ``Retiring``)."""
    routable_pods: list[str] = field(default_factory=list)


@dataclass
class PodRow:
    """One vLLM pod at one moment."""

    name: str
    ip: str = ""
    ready: bool = False
    in_flight: int = 0
    running_adapters: list[str] = field(default_factory=list)


@dataclass
class Sample:
    """Everything the view shows for one second of the run."""

    t: float
    adapters: list[AdapterRow]
    pods: list[PodRow]
    conditions: dict[str, tuple[str, str, str]]
    """type -> (status, reason, message)."""
    events: list[str] = field(default_factory=list)
    """The controller's latest Events, newest last."""
    errors: list[str] = field(default_factory=list)


def latency_totals(metrics_text: str) -> dict[str, tuple[float, float]]:
    """The router's request-duration histogram per model, summed over pods: (sum of seconds, count).

    Its buckets (..., 1, 2.5, ...) are too coarse for quantiles of one-second requests, but sum and count
    give the exact mean over any window.
    """
    out: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != LATENCY_METRIC:
            continue
        for s in family.samples:
            model = s.labels.get("model", "")
            total, count = out.get(model, (0.0, 0.0))
            if s.name == f"{LATENCY_METRIC}_sum":
                out[model] = (total + s.value, count)
            elif s.name == f"{LATENCY_METRIC}_count":
                out[model] = (total, count + s.value)
    return out


def window_means(new: Mapping[str, tuple[float, float]], old: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Mean latency per model between two scrapes; models without requests in between are left out."""
    out = {}
    for model, (total, count) in new.items():
        old_total, old_count = old.get(model, (0.0, 0.0))
        if count > old_count:
            out[model] = (total - old_total) / (count - old_count)
    return out


def _condition_map(obj: Mapping[str, Any] | None) -> dict[str, tuple[str, str, str]]:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return {c["type"]: (c.get("status", ""), c.get("reason", ""), c.get("message", "")) for c in conditions}


def build_rows(
    adapters: Iterable[str],
    *,
    autoscaler: Mapping[str, Any] | None,
    placements: Iterable[Mapping[str, Any]],
    slices: Iterable[Mapping[str, Any]],
    router_load: Mapping[str, Any] | None,
    latency: Mapping[str, float],
) -> list[AdapterRow]:
    """Join the API objects and the router's view into one row per adapter (pure)."""
    rows = {name: AdapterRow(name) for name in adapters}
    for st in ((autoscaler or {}).get("status") or {}).get("adapters") or []:
        row = rows.get(st.get("name", ""))
        if row is not None:
            row.desired, row.loaded, row.load = st.get("desiredReplicas"), st.get("loadedReplicas"), st.get("load")
    for p in placements:
        spec, status = p.get("spec") or {}, p.get("status") or {}
        row = rows.get(spec.get("adapter", ""))
        if row is not None:
            phase = status.get("phase", "Pending")
            row.placements[spec.get("podName", "?")] = "Retiring" if spec.get("retire") and phase == "Loaded" else phase
    for s in slices:
        meta = s.get("metadata") or {}
        row = rows.get((meta.get("labels") or {}).get(L.ADAPTER_LABEL, ""))
        if row is None:
            continue
        for ep in s.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready") is False:
                continue
            row.routable_pods.append((ep.get("targetRef") or {}).get("name", "?"))
    for row in rows.values():
        row.routable_pods.sort()
        row.routable = len(row.routable_pods)
    for name, model in ((router_load or {}).get("models") or {}).items():
        row = rows.get(name)
        if row is not None:
            row.rate = float(model.get("rate") or 0.0)
            row.in_flight = int(model.get("in_flight") or 0)
            row.queued = int(model.get("queued") or 0)
    for name, mean in latency.items():
        row = rows.get(name)
        if row is not None:
            row.latency = mean
    return list(rows.values())


def recent_events(events: Iterable[Mapping[str, Any]], controller: str, count: int = 5) -> list[str]:
    """The newest Events the controller reported (a series counts at its last repeat), as short lines."""
    def when(ev: Mapping[str, Any]) -> str:
        return str((ev.get("series") or {}).get("lastObservedTime") or ev.get("eventTime") or "")

    mine = sorted((e for e in events if e.get("reportingController") == controller), key=when)[-count:]
    lines = []
    for ev in mine:
        repeats = (ev.get("series") or {}).get("count")
        lines.append(f"{when(ev)[11:19]} {ev.get('reason', '')}: {ev.get('note', '')}"
                     + (f" (x{repeats})" if repeats else ""))
    return lines


def build_pods(pods: Iterable[Mapping[str, Any]], router_load: Mapping[str, Any] | None) -> list[PodRow]:
    """One row per pod of the fleet, with the router's in-flight count and the adapters vLLM is running."""
    seen = ((router_load or {}).get("pods") or {})
    rows = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if meta.get("deletionTimestamp"):
            continue
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        info = seen.get(meta.get("name", "")) or {}
        scraped = info.get("scraped") or {}
        rows.append(PodRow(meta.get("name", "?"), status.get("podIP", ""), ready, int(info.get("in_flight") or 0),
                           sorted(scraped.get("running_adapters") or [])))
    return sorted(rows, key=lambda r: r.name)


def http_get(url: str, timeout: float = 2.0) -> bytes:
    """GET without any proxy from the environment (everything here is loopback or the pod network)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as resp:
        return bytes(resp.read())


class Observer:
    """Reads the autoscaler, its placements and route table, the fleet's pods, and the router, each second."""

    def __init__(self, kube: KubeClient, namespace: str, autoscaler: str, *, adapters: list[str],
                 pod_selector: str, router_metrics_url: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.autoscaler = autoscaler
        self.adapters = adapters
        self.pod_selector = pod_selector
        self.router = router_metrics_url.rstrip("/")
        self._history: deque[tuple[float, dict[str, tuple[float, float]]]] = deque()

    def _windowed_latency(self, t: float, now: dict[str, tuple[float, float]]) -> dict[str, float]:
        """Mean latency per model over the last LATENCY_WINDOW_SECONDS (from the oldest scrape kept)."""
        self._history.append((t, now))
        while len(self._history) > 1 and self._history[1][0] <= t - LATENCY_WINDOW_SECONDS:
            self._history.popleft()
        return window_means(now, self._history[0][1])

    def sample(self, t: float) -> Sample:
        """One reading; a source that fails is reported in ``errors`` and the rest is still shown."""
        errors: list[str] = []

        def attempt(what: str, read: Any, default: Any) -> Any:
            try:
                return read()
            except Exception as exc:
                errors.append(f"{what}: {exc}")
                return default

        ns = self.namespace
        autoscaler = attempt("autoscaler", lambda: self.kube.get_or_none(LORA_AUTOSCALERS, self.autoscaler, ns), None)
        placements = attempt("placements", lambda: self.kube.list(
            LORA_PLACEMENTS, ns, label_selector=f"{L.AUTOSCALER_LABEL}={self.autoscaler}")["items"], [])
        slices = attempt("endpointslices", lambda: self.kube.list(
            ENDPOINT_SLICES, ns, label_selector=f"{L.AUTOSCALER_LABEL}={self.autoscaler},{L.ROLE_LABEL}=adapter",
        )["items"], [])
        pods = attempt("pods", lambda: self.kube.list(PODS, ns, label_selector=self.pod_selector)["items"], [])
        router_load = attempt("router /router/load", lambda: json.loads(http_get(f"{self.router}/router/load")), None)
        events = attempt("events", lambda: self.kube.list(EVENTS, ns)["items"], [])
        text = attempt("router /metrics", lambda: http_get(f"{self.router}/metrics").decode(), "")
        latency = self._windowed_latency(t, latency_totals(text)) if text else {}
        return Sample(
            t=t,
            adapters=build_rows(self.adapters, autoscaler=autoscaler, placements=placements, slices=slices,
                                router_load=router_load, latency=latency),
            pods=build_pods(pods, router_load),
            conditions=_condition_map(autoscaler),
            events=recent_events(events, CONTROLLER),
            errors=errors,
        )
