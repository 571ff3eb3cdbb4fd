"""Names, labels and annotations shared by the controller, the router and any gateway.

The route table is plain Kubernetes: per adapter a selector-less Service and EndpointSlices labelled
with the adapter's name; the preferred and fallback holders of ``preferred`` mode sit in separate slices
told apart by the tier label, so a gateway that reads only the preferred slice still routes correctly.
"""

from __future__ import annotations

import hashlib
import re

from api.v1alpha1 import GROUP

AUTOSCALER_LABEL = f"{GROUP}/autoscaler"
ADAPTER_LABEL = f"{GROUP}/adapter"
POD_LABEL = f"{GROUP}/pod"
TIER_LABEL = f"{GROUP}/tier"  # "preferred" or "fallback"; the base model's slice is "base"
ROLE_LABEL = f"{GROUP}/role"  # "adapter" or "base"
MODEL_ANNOTATION = f"{GROUP}/model"  # the exact model name clients send
BASE_MODEL_ANNOTATION = f"{GROUP}/base-model"
MANAGED_BY = f"controller.{GROUP}"  # a label value: no slash allowed
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
FINALIZER = f"{GROUP}/unload"

TIER_PREFERRED = "preferred"
TIER_FALLBACK = "fallback"
TIER_BASE = "base"

_DNS_LABEL_MAX = 63


def _bounded(name: str, limit: int) -> str:
    """``name`` if it fits, else a prefix and a stable hash: Kubernetes names have length limits."""
    name = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-") or "x"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[: limit - 11].rstrip('-')}-{digest}"


def route_service_name(autoscaler: str, adapter: str) -> str:
    """The Service of one adapter's route table (a DNS label, so at most 63 characters)."""
    return _bounded(f"{autoscaler}-{adapter}", _DNS_LABEL_MAX)


def base_service_name(autoscaler: str) -> str:
    """The Service listing every ready pod, for requests to the base model."""
    return _bounded(f"{autoscaler}-base", _DNS_LABEL_MAX)


def slice_name(service: str, tier: str) -> str:
    return _bounded(f"{service}-{tier}", 253)


def placement_name(autoscaler: str, adapter: str, pod: str) -> str:
    """One LoRAPlacement per (autoscaler, adapter, pod): deterministic, so a retried create is idempotent."""
    return _bounded(f"{autoscaler}-{adapter}-{pod}", 253)
