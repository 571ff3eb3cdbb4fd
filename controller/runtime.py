"""What the reconcilers share: the caches (with recent writes laid over them), the API and vLLM clients,
the Event sink, and the pods' observed models. Built once by the manager and passed to each reconciler.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import urllib3

from api import labels as L
from controller.selectors import Selector
from controller.store import Store
from controller.vllm_client import PodModels, VLLMClient

log = logging.getLogger(__name__)

JSON = dict[str, Any]

BY_AUTOSCALER = "autoscaler"  # placements, slices, services -> "ns/autoscaler"
BY_POD = "pod"  # placements -> "ns/pod"


def placement_autoscaler_index(obj: JSON) -> list[str]:
    ns = (obj.get("metadata") or {}).get("namespace")
    name = (obj.get("spec") or {}).get("autoscaler")
    return [f"{ns}/{name}"] if ns and name else []


def placement_pod_index(obj: JSON) -> list[str]:
    ns = (obj.get("metadata") or {}).get("namespace")
    name = (obj.get("spec") or {}).get("podName")
    return [f"{ns}/{name}"] if ns and name else []


def owned_route_index(obj: JSON) -> list[str]:
    meta = obj.get("metadata") or {}
    name = (meta.get("labels") or {}).get(L.AUTOSCALER_LABEL)
    return [f"{meta.get('namespace')}/{name}"] if name else []


class Recorder(Protocol):
    """Where Events go (``common.events.EventRecorder`` in production)."""

    def event(self, obj: Mapping[str, Any], type: Literal["Normal", "Warning"], reason: str,
              message: str) -> None: ...


class LogRecorder:
    """Events to the log only (tests, or when no recorder is wired)."""

    def event(self, obj: Mapping[str, Any], type: Literal["Normal", "Warning"], reason: str,
              message: str) -> None:
        meta = obj.get("metadata") or {}
        log.info("event %s %s %s/%s: %s", type, reason, meta.get("namespace"), meta.get("name"), message)


@dataclass
class ModelsObservation:
    """One answer of a pod's ``/v1/models``; ``started`` is the wall time the request was sent."""

    started: float
    models: PodModels


class ModelsCache:
    """Per pod UID, the last ``/v1/models`` answer (the auditor writes, the lifecycle reads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_uid: dict[str, ModelsObservation] = {}
        self._base: dict[str, str] = {}  # autoscaler key -> base model name

    def put(self, pod_uid: str, obs: ModelsObservation) -> None:
        with self._lock:
            self._by_uid[pod_uid] = obs

    def get(self, pod_uid: str) -> ModelsObservation | None:
        with self._lock:
            return self._by_uid.get(pod_uid)

    def forget_except(self, uids: Iterable[str]) -> None:
        keep = set(uids)
        with self._lock:
            for uid in [u for u in self._by_uid if u not in keep]:
                del self._by_uid[uid]

    def set_base(self, autoscaler_key: str, base: str | None) -> bool:
        """Record the base model an autoscaler's pods serve; True when it changed."""
        if not base:
            return False
        with self._lock:
            changed = self._base.get(autoscaler_key) != base
            self._base[autoscaler_key] = base
            return changed

    def base(self, autoscaler_key: str) -> str | None:
        with self._lock:
            return self._base.get(autoscaler_key)


class VLLMClients:
    """One VLLMClient per (scheme, API key, timeout), all sharing one connection pool."""

    def __init__(self) -> None:
        self._pool = urllib3.PoolManager(num_pools=512, maxsize=4, retries=False)
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str | None, float], VLLMClient] = {}

    def get(self, scheme: str, api_key: str | None, timeout: float) -> VLLMClient:
        key = (scheme, api_key, float(timeout))
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = VLLMClient(timeout_seconds=timeout, api_key=api_key, scheme=scheme, pool=self._pool)
                self._clients[key] = client
            return client


class SecretReader(Protocol):
    def __call__(self, namespace: str, name: str, key: str) -> str | None: ...


@dataclass
class SelectorCache:
    """Autoscaler key -> the pod selector last resolved for it, so pod events find their autoscalers."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _by_key: dict[str, Selector] = field(default_factory=dict)

    def set(self, key: str, selector: Selector) -> None:
        with self._lock:
            self._by_key[key] = selector

    def forget(self, key: str) -> None:
        with self._lock:
            self._by_key.pop(key, None)

    def get(self, key: str) -> Selector | None:
        with self._lock:
            return self._by_key.get(key)

    def autoscaler_keys(self) -> list[str]:
        with self._lock:
            return list(self._by_key)

    def matching(self, namespace: str, labels: Mapping[str, str]) -> list[str]:
        prefix = namespace + "/"
        with self._lock:
            items = list(self._by_key.items())
        return [k for k, sel in items if k.startswith(prefix) and sel.matches(labels)]


@dataclass
class Settings:
    """Controller-wide knobs (flags), as opposed to per-autoscaler spec."""

    audit_period: float = 3.0
    failed_retry_after: float = 300.0
    target_cache_seconds: float = 5.0
    secret_cache_seconds: float = 30.0


@dataclass
class Runtime:
    """Everything a reconciler reads or calls; the manager fills it in."""

    kube: Any  # common.kube.KubeClient (typed loosely so tests can pass a fake)
    autoscalers: Store
    placements: Store
    pods: Store
    slices: Store
    services: Store
    recorder: Recorder
    vllm: VLLMClients
    models: ModelsCache
    selectors: SelectorCache
    settings: Settings
    read_secret: SecretReader
    clock: Callable[[], float] = time.time
    enqueue_autoscaler: Callable[[str], None] = lambda key: None
    enqueue_placement: Callable[[str], None] = lambda key: None
