"""Defaulting of LoRAAutoscaler and LoRAPlacement objects, as a JSONPatch: pure, deterministic.

The defaults are read from the typed API's dataclass fields (through :mod:`api.schema`), the same place
the CRD's structural-schema defaults come from, so the webhook, the API server and the controller all
fill in the same values. Only ``spec`` is defaulted: ``status`` belongs to the controller.

Rules, mirroring Kubernetes structural defaulting: an absent (or null) field with a default gets it; an
absent nested object whose fields have defaults is added whole (``defaults_of``); present objects and the
objects inside present lists are walked. Values of the wrong type are left alone for validation to name.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from functools import cache
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


@dataclasses.dataclass(frozen=True)
class _FieldPlan:
    """What defaulting needs to know about one field, worked out once per class."""

    name: str
    token: str  # the name escaped for a JSON pointer
    has_default: bool
    default: Any
    child: type | None  # a dataclass to walk into (the field's type, or its list's item type)
    is_list: bool


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


@cache
def _plan(cls: type) -> tuple[_FieldPlan, ...]:
    """The fields of ``cls`` with their defaults and nested classes (type hints are slow to resolve)."""
    hints = get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        tp = _unwrap(hints[field.name])
        has_default, default = _field_default(field, tp)
        child: type | None = None
        is_list = False
        if _is_dataclass_type(tp):
            child = tp
        elif get_origin(tp) is list:
            (item_tp,) = get_args(tp)
            item_tp = _unwrap(item_tp)
            if _is_dataclass_type(item_tp):
                child, is_list = item_tp, True
        name = json_name(field)
        out.append(_FieldPlan(name, _pointer_token(name), has_default, default, child, is_list))
    return tuple(out)


def _walk(cls: type, data: dict[str, Any], pointer: str, ops: list[JsonPatchOp]) -> None:
    for plan in _plan(cls):
        value = data.get(plan.name)
        if value is None:
            if plan.has_default:
                data[plan.name] = _json_copy(plan.default)
                ops.append({"op": "add", "path": f"{pointer}/{plan.token}", "value": _json_copy(plan.default)})
            continue
        if plan.child is None:
            continue
        here = f"{pointer}/{plan.token}"
        if not plan.is_list and isinstance(value, dict):
            _walk(plan.child, value, here, ops)
        elif plan.is_list and isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    _walk(plan.child, item, f"{here}/{index}", ops)


def _json_copy(value: Any) -> Any:
    """A deep copy of JSON data (dicts, lists, scalars): several times faster than ``copy.deepcopy``."""
    if isinstance(value, dict):
        return {k: _json_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_copy(v) for v in value]
    return value


def defaulted(
    kind: str, obj: Mapping[str, Any], *, in_place: bool = False
) -> tuple[dict[str, Any], list[JsonPatchOp]]:
    """The object with its spec defaults filled in, and the JSONPatch that does the same.

    Applying the patch to ``obj`` gives the returned object; defaulting that object again gives an empty
    patch. Unknown kinds and objects without a ``spec`` mapping are returned unchanged with no patch. The
    spec is copied first unless ``in_place`` (for callers that already hold a private copy); the rest of
    the object is shared, never modified.
    """
    out = dict(obj)
    ops: list[JsonPatchOp] = []
    cls = SPEC_CLASSES.get(kind)
    spec = out.get("spec")
    if cls is not None and isinstance(spec, dict):
        if not in_place:
            spec = out["spec"] = _json_copy(spec)
        _walk(cls, spec, "/spec", ops)
    return out, ops


def defaulting_patch(kind: str, obj: Mapping[str, Any]) -> list[JsonPatchOp]:
    """The JSONPatch (RFC 6902, ``add`` operations only) that fills in the spec defaults of ``obj``."""
    return defaulted(kind, obj)[1]


def apply_defaults(kind: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` with its spec defaults filled in."""
    return defaulted(kind, obj)[0]
