"""Declarative fields for the API types, and the OpenAPI v3 schema derived from them.

The typed dataclasses in :mod:`api.v1alpha1` are the one source of truth: their type hints give the
schema's types, their defaults give both the schema's ``default`` and the Python defaults, and the
metadata attached with :func:`prop` gives descriptions, bounds, patterns and CEL rules. The CRDs, the
webhook's validation and the typed models therefore cannot disagree.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

_MISSING = dataclasses.MISSING
T = TypeVar("T")


def camel(name: str) -> str:
    """``min_replicas`` -> ``minReplicas``: Kubernetes spells JSON fields in lower camel case."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def prop(
    default: Any = _MISSING,
    *,
    description: str,
    default_factory: Any = _MISSING,
    json_name: str | None = None,
    **schema: Any,
) -> Any:
    """A dataclass field with its schema keywords (``minimum``, ``pattern``, ``x_kubernetes_validations``...).

    Keyword names use underscores and are turned into the schema's spelling (``max_length`` ->
    ``maxLength``; ``x_kubernetes_validations`` -> ``x-kubernetes-validations``).
    """
    metadata = {"description": description, "json_name": json_name, "schema": schema}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _schema_key(key: str) -> str:
    if key.startswith("x_"):
        return key.replace("_", "-")
    return camel(key)


def json_name(field: dataclasses.Field[Any]) -> str:
    return field.metadata.get("json_name") or camel(field.name)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_schema(tp: Any) -> dict[str, Any]:
    tp, _ = _unwrap_optional(tp)
    origin = get_origin(tp)
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer", "format": "int32"}
    if tp is float:
        return {"type": "number"}
    if origin is Literal:
        values = list(get_args(tp))
        return {"type": "string", "enum": values}
    if origin is list:
        (item,) = get_args(tp)
        return {"type": "array", "items": _type_schema(item)}
    if origin is dict:
        key, value = get_args(tp)
        if key is not str:
            raise TypeError(f"map keys must be strings, got {key!r}")
        return {"type": "object", "additionalProperties": _type_schema(value)}
    if tp is Any:
        return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return object_schema(tp)
    raise TypeError(f"no schema for type {tp!r}")


def object_schema(cls: type) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a dataclass: properties, required, defaults and rules."""
    hints = get_type_hints(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for field in dataclasses.fields(cls):
        name = json_name(field)
        schema = _type_schema(hints[field.name])
        if field.metadata.get("description"):
            schema = {"description": field.metadata["description"], **schema}
        for key, value in field.metadata.get("schema", {}).items():
            schema[_schema_key(key)] = value
        has_default = field.default is not _MISSING and field.default is not None
        if has_default and not dataclasses.is_dataclass(field.default):
            schema["default"] = field.default
        elif field.default_factory is not _MISSING:  # a nested object defaulted as a whole
            produced = field.default_factory()
            if dataclasses.is_dataclass(produced) and not isinstance(produced, type):
                # The whole default object, not {}: the API server checks a default against the object's
                # CEL rules as it stands, before nested defaults would fill it in.
                schema["default"] = to_dict(produced)
        _, optional = _unwrap_optional(hints[field.name])
        if field.default is _MISSING and field.default_factory is _MISSING and not optional:
            required.append(name)
        properties[name] = schema
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if cls.__doc__:
        out = {"description": _first_paragraph(cls.__doc__), **out}
    if required:
        out["required"] = required
    rules = getattr(cls, "__cel_rules__", None)
    if rules:
        out["x-kubernetes-validations"] = [{"rule": r, "message": m} for r, m in rules]
    return out


def _first_paragraph(doc: str) -> str:
    return re.sub(r"\s+", " ", doc.strip().split("\n\n")[0])


def strip_extensions(schema: Any) -> Any:
    """The schema without Kubernetes-only keywords, for plain JSON Schema validators."""
    if isinstance(schema, Mapping):
        out = {}
        for key, value in schema.items():
            if key.startswith("x-kubernetes"):
                continue
            if key == "format" and value == "int32":
                continue
            if key == "properties":
                out[key] = {k: strip_extensions(v) for k, v in value.items()}
            else:
                out[key] = strip_extensions(value)
        return out
    if isinstance(schema, list):
        return [strip_extensions(v) for v in schema]
    return schema


def from_dict(cls: type[T], data: Mapping[str, Any] | None) -> T:
    """Build a typed object from JSON (already validated); absent fields take their defaults."""
    data = data or {}
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = json_name(field)
        if name in data and data[name] is not None:
            kwargs[field.name] = _convert(hints[field.name], data[name])
    return cls(**kwargs)


def _convert(tp: Any, value: Any) -> Any:
    tp, _ = _unwrap_optional(tp)
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value)  # type: ignore[arg-type]
    if origin is list:
        (item,) = get_args(tp)
        return [_convert(item, v) for v in value]
    if origin is dict:
        _, item = get_args(tp)
        return {k: _convert(item, v) for k, v in value.items()}
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def to_dict(obj: Any, *, omit_none: bool = True) -> Any:
    """JSON form of a typed object, with camelCase names; ``None`` fields are left out."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if value is None and omit_none:
                continue
            out[json_name(field)] = to_dict(value, omit_none=omit_none)
        return out
    if isinstance(obj, list):
        return [to_dict(v, omit_none=omit_none) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v, omit_none=omit_none) for k, v in obj.items()}
    return obj


def defaults_of(cls: type) -> dict[str, Any]:
    """The JSON of an object that sets nothing: every default, nested objects included."""
    return typing.cast(dict[str, Any], to_dict(from_dict(cls, {})))
