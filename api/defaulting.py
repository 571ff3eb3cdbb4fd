"""Defaulting of LoRAAutoscaler and LoRAPlacement objects, as a JSONPatch: pure, deterministic.

The defaults are read from the typed API's dataclass fields (through :mod:`api.schema`), the same place
the CRD's structural-schema defaults come from, so the webhook, the API server and the controller all
fill in the same values. Only ``spec`` is defaulted: ``status`` belongs to the controller.

Rules, mirroring Kubernetes structural defaulting: an absent (or null) field with a default gets it; an
absent nested object whose fields have defaults is added whole (``defaults_of``); present objects and the
objects inside present lists are walked. Values of the wrong type are left alone for validation to name.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Mapping
from typing import Any, Literal, TypedDict, Union, get_args, get_origin, get_type_hints

from api import v1alpha1 as v1
from api.schema import defaults_of, json_name

#: The spec class of each kind: where its defaults live.
SPEC_CLASSES: dict[str, type] = {
    v1.AUTOSCALER_KIND: v1.LoRAAutoscalerSpec,
    v1.PLACEMENT_KIND: v1.LoRAPlacementSpec,
}


class JsonPatchOp(TypedDict):
    """One RFC 6902 operation; defaulting only ever adds."""

    op: Literal["add"]
    path: str
    value: Any


def _pointer_token(key: str) -> str:
    """RFC 6901 escaping of one path segment."""
    return key.replace("~", "~0").replace("/", "~1")


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> ``X`` (other types unchanged)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_default(field: dataclasses.Field[Any], tp: Any) -> tuple[bool, Any]:
    """(has a default worth writing, its JSON value) for one field."""
    if field.default is not dataclasses.MISSING:
        return field.default is not None, field.default
    if field.default_factory is not dataclasses.MISSING:
        if _is_dataclass_type(tp):
            return True, defaults_of(tp)
        # Lists and maps that default to empty are left out, as the CRD does: empty means absent.
        return False, None
    return False, None


def _walk(cls: type, data: dict[str, Any], pointer: str, ops: list[JsonPatchOp]) -> None:
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        name = json_name(field)
        tp = _unwrap(hints[field.name])
        here = f"{pointer}/{_pointer_token(name)}"
        value = data.get(name)
        if value is None:
            has_default, default = _field_default(field, tp)
            if has_default:
                data[name] = copy.deepcopy(default)
                ops.append({"op": "add", "path": here, "value": copy.deepcopy(default)})
            continue
        if _is_dataclass_type(tp) and isinstance(value, dict):
            _walk(tp, value, here, ops)
        elif get_origin(tp) is list and isinstance(value, list):
            (item_tp,) = get_args(tp)
            item_tp = _unwrap(item_tp)
            if _is_dataclass_type(item_tp):
                for index, item in enumerate(value):
                    if isinstance(item, dict):
                        _walk(item_tp, item, f"{here}/{index}", ops)


def defaulted(kind: str, obj: Mapping[str, Any]) -> tuple[dict[str, Any], list[JsonPatchOp]]:
    """The object with its spec defaults filled in (a deep copy), and the JSONPatch that does the same.

    Applying the patch to ``obj`` gives the returned object; defaulting that object again gives an empty
    patch. Unknown kinds and objects without a ``spec`` mapping are returned unchanged with no patch.
    """
    out = copy.deepcopy(dict(obj))
    ops: list[JsonPatchOp] = []
    cls = SPEC_CLASSES.get(kind)
    spec = out.get("spec")
    if cls is not None and isinstance(spec, dict):
        _walk(cls, spec, "/spec", ops)
    return out, ops


def defaulting_patch(kind: str, obj: Mapping[str, Any]) -> list[JsonPatchOp]:
    """The JSONPatch (RFC 6902, ``add`` operations only) that fills in the spec defaults of ``obj``."""
    return defaulted(kind, obj)[1]


def apply_defaults(kind: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` with its spec defaults filled in."""
    return defaulted(kind, obj)[0]
