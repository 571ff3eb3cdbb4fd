"""CustomResourceDefinitions and JSON schemas, derived from the typed API."""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from api import v1alpha1 as v1
from api.schema import object_schema, strip_extensions

METADATA_SCHEMA = {"type": "object"}


def _resource_schema(spec_cls: type, status_cls: type, description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": METADATA_SCHEMA,
            "spec": object_schema(spec_cls),
            "status": object_schema(status_cls),
        },
    }


@cache
def _schemas() -> dict[str, dict[str, Any]]:
    return {
        v1.AUTOSCALER_KIND: _resource_schema(
            v1.LoRAAutoscalerSpec,
            v1.LoRAAutoscalerStatus,
            "LoRAAutoscaler places LoRA adapters on the pods of a vLLM workload, loads and unloads them at "
            "run time, scales each adapter's replicas from load, and hands over to pod autoscaling when "
            "every replica is full.",
        ),
        v1.PLACEMENT_KIND: _resource_schema(
            v1.LoRAPlacementSpec,
            v1.LoRAPlacementStatus,
            "LoRAPlacement records one adapter on one pod: loading, loaded, draining, failed.",
        ),
    }


def openapi_schema(kind: str) -> dict[str, Any]:
    """The OpenAPI v3 schema of a kind, with Kubernetes extensions (a fresh copy)."""
    return copy.deepcopy(_schemas()[kind])


def json_schema(kind: str) -> dict[str, Any]:
    """The same schema for plain JSON Schema validators (no Kubernetes-only keywords)."""
    schema: dict[str, Any] = strip_extensions(openapi_schema(kind))
    return schema


def crd(kind: str) -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CustomResourceDefinition of a kind."""
    plural, singular, short = {
        v1.AUTOSCALER_KIND: (v1.AUTOSCALER_PLURAL, "loraautoscaler", ["lora", "las"]),
        v1.PLACEMENT_KIND: (v1.PLACEMENT_PLURAL, "loraplacement", ["lp", "lorap"]),
    }[kind]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{v1.GROUP}"},
        "spec": {
            "group": v1.GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": short,
                "categories": ["lora"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": v1.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema(kind)},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": v1.printer_columns(kind),
                }
            ],
        },
    }
