"""Reading a scale target's replicas for the capacity warning: short timeout, short cache, never an error.

A warning is advice, so this read must never slow admission down much nor fail it: whatever goes wrong
(timeout, RBAC, a kind without a scale subresource) becomes ``TargetScale("unknown", detail=...)`` and the
user is told the capacity could not be checked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Protocol

from api.validation import TargetScale
from common.kube import ApiError, KubeClient

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 1.0
#: Admissions of one object come in bursts (dry-run, then create; mutate, then validate).
DEFAULT_CACHE_SECONDS = 2.0
CACHE_ENTRIES = 1024


class ScaleLookup(Protocol):
    """Something that says how many replicas a scale target has."""

    async def read(self, namespace: str, api_version: str, kind: str, name: str) -> TargetScale | None:
        """The target's replicas, or why they are not known; None when capacity is not to be checked."""
        ...


class NoScaleLookup:
    """Capacity checks switched off: nothing is read, and no capacity warning is given."""

    async def read(self, namespace: str, api_version: str, kind: str, name: str) -> TargetScale | None:
        return None


class ScaleReader:
    """Reads ``<target>/scale`` through the API (discovery finds the resource of any kind)."""

    def __init__(
        self,
        client: KubeClient,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        cache_seconds: float = DEFAULT_CACHE_SECONDS,
    ) -> None:
        self._client = client
        self._timeout = timeout
        self._cache_seconds = cache_seconds
        self._cache: OrderedDict[tuple[str, str, str, str], tuple[float, TargetScale]] = OrderedDict()

    def _read_sync(self, namespace: str, api_version: str, kind: str, name: str) -> TargetScale:
        try:
            resource = self._client.resource_for(api_version, kind)
        except ApiError as exc:
            if exc.not_found:
                return TargetScale("missing", detail=f"no kind {kind} in {api_version} (is its CRD installed?)")
            return TargetScale("unknown", detail=f"API discovery of {api_version} failed: {exc.status} "
                                                 f"{exc.reason}")
        try:
            scale = self._client.get(resource, name, namespace, subresource="scale",
                                     timeout=(self._timeout, self._timeout))
        except ApiError as exc:
            if exc.not_found:
                # 404 names the object when it is missing; a kind without a scale subresource gets a bare 404.
                if exc.details.get("name") == name:
                    return TargetScale("missing")
                return TargetScale("unknown", detail=f"{kind} has no scale subresource")
            if exc.status == 403:
                return TargetScale("unknown", detail="the webhook may not read the scale subresource (RBAC)")
            return TargetScale("unknown", detail=f"{exc.status or 'no response'} {exc.reason}".strip())
        replicas = (scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool):
            replicas = (scale.get("status") or {}).get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool):
            return TargetScale("unknown", detail="its scale subresource reports no replicas")
        return TargetScale("found", replicas=replicas)

    async def read(self, namespace: str, api_version: str, kind: str, name: str) -> TargetScale:
        key = (namespace, api_version, kind, name)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            result = await asyncio.wait_for(
                asyncio.to_thread(self._read_sync, namespace, api_version, kind, name), self._timeout * 2
            )
        except TimeoutError:
            return TargetScale("unknown", detail=f"the API did not answer within {self._timeout * 2:g}s")
        except Exception as exc:  # advice only: any failure of the read is reported, never raised
            log.warning("reading the scale of %s %s/%s failed: %r", kind, namespace, name, exc)
            return TargetScale("unknown", detail=type(exc).__name__)
        if result.state != "unknown":
            self._cache[key] = (now + self._cache_seconds, result)
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return result
