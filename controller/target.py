"""Finding a target's pods through its scale subresource, for any kind that has one.

``GET .../{plural}/{name}/scale`` answers ``status.selector`` for Deployments, StatefulSets, LeaderWorkerSets
and any custom resource that declares a scale subresource, so the controller needs no per-kind code; kind
to plural comes from API discovery (cached by the client). The answer is cached for a few seconds: it
rarely changes and the autoscaler reconciles every second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from common.kube import ApiError, Resource
from controller import selectors
from controller.selectors import Selector, SelectorError


class ScaleClient(Protocol):
    def resource_for(self, api_version: str, kind: str) -> Resource: ...

    def get_scale(self, resource: Resource, name: str, namespace: str | None = None) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Target:
    """What the scale subresource says about the target."""

    resource: Resource
    selector: Selector
    selector_text: str
    spec_replicas: int | None
    status_replicas: int | None


class TargetError(Exception):
    """The target cannot be used; ``reason`` is a CamelCase word for the Degraded condition."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class TargetResolver:
    def __init__(self, client: ScaleClient, *, ttl: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str, str, str], tuple[float, Target]] = {}

    def invalidate(self, namespace: str, api_version: str, kind: str, name: str) -> None:
        with self._lock:
            self._cache.pop((namespace, api_version, kind, name), None)

    def resolve(self, namespace: str, api_version: str, kind: str, name: str) -> Target:
        """The target's selector and replicas; raises TargetError with a message a user can act on."""
        key = (namespace, api_version, kind, name)
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        what = f"{kind} {namespace}/{name} ({api_version})"
        try:
            resource = self._client.resource_for(api_version, kind)
        except ApiError as exc:
            if exc.not_found:
                raise TargetError("TargetNotFound", f"the API server knows no kind {kind} in {api_version}: "
                                  "check spec.scaleTargetRef (is its CRD installed?)") from None
            if exc.status == 403:
                raise TargetError("TargetForbidden",
                                  f"discovery of {api_version} is forbidden: {exc.message}") from None
            raise
        except ValueError as exc:
            raise TargetError("InvalidSpec", f"spec.scaleTargetRef: {exc}") from None
        try:
            scale = self._client.get_scale(resource, name, namespace)
        except ApiError as exc:
            if exc.not_found:
                raise TargetError("TargetNotFound", f"{what} not found, or its kind has no scale subresource") \
                    from None
            if exc.status == 403:
                raise TargetError("TargetForbidden", f"reading the scale of {what} is forbidden (grant get on "
                                  f"{resource.plural}/scale to the controller): {exc.message}") from None
            raise
        text = str((scale.get("status") or {}).get("selector") or "")
        try:
            sel = selectors.parse(text) if text else selectors.NOTHING
        except SelectorError as exc:
            raise TargetError("TargetSelectorInvalid", f"{what} reports a selector that cannot be parsed: {exc}") \
                from None
        target = Target(resource, sel, text, (scale.get("spec") or {}).get("replicas"),
                        (scale.get("status") or {}).get("replicas"))
        with self._lock:
            self._cache[key] = (now + self._ttl, target)
        return target
