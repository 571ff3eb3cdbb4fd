"""Validation of LoRAAutoscaler and LoRAPlacement objects: the schema plus the rules a schema cannot say.

Pure functions over plain JSON objects (what the API server sends and what informers hold), shared by the
admission webhook, which denies with these messages on ``kubectl apply``, and the controller, which sets
a ``Degraded`` condition on objects that reached the store while the webhook was down.

Every problem names its field path the way Kubernetes does (``spec.adapters[2].minReplicas``) and says
what to do. Checks:

* the OpenAPI schema of :mod:`api.crd` (types, bounds, patterns, required fields), fast-pathed with a
  compiled ``fastjsonschema`` validator and explained field by field by ``jsonschema`` when it fails;
* the CEL rules of the CRD, evaluated here too so that the webhook says everything at once and the CRD
  is only the backstop: hysteresis, ``maxReplicas >= minReplicas``, ``maxCpuLorasPerReplica``,
  ``podAutoscaling`` consistency, the immutable ``scaleTargetRef``;
* rules only the webhook enforces: unique adapter names, a Prometheus server when the metric source is
  ``prometheus``, a well-formed ``scaleTargetRef``, label-selector operators with the right values.

Warnings (legal but risky) are separate: :func:`autoscaler_warnings`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, NamedTuple

import fastjsonschema
import jsonschema

from api import v1alpha1 as v1
from api.crd import json_schema
from api.defaulting import JsonPatchOp, defaulted

# --- results -----------------------------------------------------------------------------------------

ROOT_PATH = "<object>"


@dataclass(frozen=True)
class Problem:
    """One reason an object is invalid: the field path and what to do about it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class TargetScale:
    """What the scale target's scale subresource said, read by the caller (this module does no I/O).

    ``found``: ``replicas`` is the target's replica count. ``missing``: the target (or its kind) does not
    exist yet. ``unknown``: it could not be read (timeout, forbidden, no scale subresource); ``detail``
    says why.
    """

    state: Literal["found", "missing", "unknown"]
    replicas: int | None = None
    detail: str = ""


#: Enough to fix anything a person wrote; beyond it, messages only get longer.
MAX_PROBLEMS = 100
#: How many problems one message spells out.
MAX_LISTED = 30


def format_problems(kind: str, name: str, problems: Iterable[Problem]) -> str:
    """One message listing every problem, the way ``kubectl`` shows an admission denial."""
    items = list(problems)
    noun = "problem" if len(items) == 1 else "problems"
    label = f'{kind} "{name}"' if name else kind
    text = f"{label} is invalid ({len(items)} {noun}): " + "; ".join(str(p) for p in items[:MAX_LISTED])
    if len(items) > MAX_LISTED:
        text += f"; and {len(items) - MAX_LISTED} more"
    return text


# --- small readers that never raise on the wrong type ------------------------------------------------


def _get(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _num(value: Any) -> float | None:
    """A JSON number (bool is not a number here), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _show(value: Any, limit: int = 60) -> str:
    """A short JSON rendering of a user's value for a message."""
    try:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fmt_num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else str(value)


def path_of(parts: Iterable[str | int]) -> str:
    """``["spec", "adapters", 2, "name"]`` -> ``spec.adapters[2].name``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or ROOT_PATH


#: JSON's containers (exact types: what a JSON decoder makes), checked by ``type(x) in`` on hot paths.
_CONTAINERS = frozenset((dict, list))


class _TooDeep(ValueError):
    pass


def _drop_nulls(value: Any, depth: int = 1) -> Any:
    """A copy without null fields (the API server prunes them from structural CRDs before defaulting).

    Raises `_TooDeep` past ``MAX_DEPTH`` levels, so the recursion is bounded whatever the input.
    """
    if depth > MAX_DEPTH and type(value) in _CONTAINERS:
        raise _TooDeep
    # Scalars are taken as they are, without a call each: most of a spec is scalars.
    if isinstance(value, dict):
        return {k: _drop_nulls(v, depth + 1) if type(v) in _CONTAINERS else v
                for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v, depth + 1) if type(v) in _CONTAINERS else v for v in value]
    return value


# --- schema ------------------------------------------------------------------------------------------


@cache
def admission_schema(kind: str) -> dict[str, Any]:
    """The JSON schema checked at admission: the CRD's, without ``status`` (the controller owns it)."""
    schema = json_schema(kind)
    schema["properties"].pop("status", None)
    return schema


@cache
def _fast_validator(kind: str) -> Callable[[Any], Any]:
    # use_default=False: the compiled validator would otherwise write defaults into the object it checks.
    return fastjsonschema.compile(admission_schema(kind), use_default=False, use_formats=False)


@cache
def _full_validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(admission_schema(kind))


def prepare_validators() -> None:
    """Compile both kinds' validators now (a server calls it at start-up, not on its first request)."""
    for kind in (v1.AUTOSCALER_KIND, v1.PLACEMENT_KIND):
        _fast_validator(kind)
        _full_validator(kind)


_TYPE_WORDS = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "object": "an object (a mapping of fields)",
    "array": "a list",
    "boolean": "true or false",
}
_DNS1123_LABEL_TEXT = (
    "must be a DNS-1123 label: at most 63 lower-case letters, digits and '-', starting and ending with a "
    "letter or digit (e.g. 'sql-lora')"
)
_KNOWN_SOURCES = "an absolute path (/models/x) or " + ", ".join(v1.SOURCE_SCHEMES)
_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _source_advice(value: str) -> str:
    match = _URI_SCHEME.match(value)
    if match and f"{match.group(1)}://" not in v1.SOURCE_SCHEMES:
        return f"unknown scheme '{match.group(1)}://' in {_show(value)}: use {_KNOWN_SOURCES}"
    if re.search(r"\s", value):
        return f"must not contain whitespace (got {_show(value)})"
    if not value.startswith("/") and not match:
        return f"a local path must be absolute (got {_show(value)}); or use {_KNOWN_SOURCES}"
    return f"must be {_KNOWN_SOURCES}, followed by a path (got {_show(value)})"


def _pattern_message(pattern: str, value: Any) -> str:
    if pattern == v1.ADAPTER_NAME_PATTERN:
        return f"{_DNS1123_LABEL_TEXT}; got {_show(value)}"
    if pattern == v1.SOURCE_PATTERN and isinstance(value, str):
        return _source_advice(value)
    if pattern.startswith("^https?://"):
        return f"must be an http:// or https:// URL without spaces (got {_show(value)})"
    return f"must match the pattern {pattern} (got {_show(value)})"


def _schema_error_problems(error: jsonschema.ValidationError) -> list[Problem]:
    parts = list(error.absolute_path)
    where = path_of(parts)
    keyword = error.validator
    rule: Any = error.validator_value
    value = error.instance
    if keyword == "required":
        properties = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        present = value if isinstance(value, dict) else {}
        out = []
        for name in rule:
            if name in present:
                continue
            description = str(properties.get(name, {}).get("description", "")).rstrip(".")
            hint = f": {description[0].lower()}{description[1:]}" if description else ""
            out.append(Problem(path_of([*parts, name]), f"is required{hint}"))
        return out
    if keyword == "type":
        wanted = rule if isinstance(rule, list) else [rule]
        words = " or ".join(_TYPE_WORDS.get(str(w), str(w)) for w in wanted)
        return [Problem(where, f"must be {words} (got {_json_type(value)} {_show(value)})")]
    if keyword in ("minimum", "exclusiveMinimum"):
        strict = " strictly above" if keyword == "exclusiveMinimum" else " at least"
        return [Problem(where, f"must be{strict} {_fmt_num(rule)} (got {_show(value)})")]
    if keyword in ("maximum", "exclusiveMaximum"):
        strict = " strictly below" if keyword == "exclusiveMaximum" else " at most"
        return [Problem(where, f"must be{strict} {_fmt_num(rule)} (got {_show(value)})")]
    if keyword == "minLength":
        if rule == 1:
            return [Problem(where, "must not be empty")]
        return [Problem(where, f"must be at least {rule} characters long (got {len(value)})")]
    if keyword == "maxLength":
        return [Problem(where, f"must be at most {rule} characters long (got {len(value)})")]
    if keyword == "maxItems":
        return [Problem(where, f"must have at most {rule} items (got {len(value)})")]
    if keyword == "minItems":
        return [Problem(where, f"must have at least {rule} items (got {len(value)})")]
    if keyword == "enum":
        choices = ", ".join(str(c) for c in rule)
        return [Problem(where, f"must be one of {choices} (got {_show(value)})")]
    if keyword == "pattern":
        return [Problem(where, _pattern_message(str(rule), value))]
    return [Problem(where, error.message)]


def schema_problems(kind: str, obj: Any) -> list[Problem]:
    """The object against the CRD's schema (without status): every violation, with its field path.

    Valid objects cost one call of the compiled validator; only invalid ones pay for ``jsonschema``.
    """
    try:
        _fast_validator(kind)(obj)
        return []
    except fastjsonschema.JsonSchemaValueException:
        pass
    out: list[Problem] = []
    seen: set[Problem] = set()
    for error in _full_validator(kind).iter_errors(obj):
        for problem in _schema_error_problems(error):
            if problem not in seen:
                seen.add(problem)
                out.append(problem)
        if len(out) >= MAX_PROBLEMS:  # iter_errors is lazy: a 3 MiB list of bad items stops here
            break
    return out


# --- semantic rules ----------------------------------------------------------------------------------

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_API_VERSION = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?v[0-9]+((alpha|beta)[0-9]+)?$"
)
_KIND = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


def _is_dns_subdomain(value: str) -> bool:
    return len(value) <= 253 and bool(_DNS1123_SUBDOMAIN.match(value))


def _scale_target_problems(spec: dict[str, Any]) -> list[Problem]:
    ref = spec.get("scaleTargetRef")
    if not isinstance(ref, dict):
        return []
    out = []
    kind, name, api_version = ref.get("kind"), ref.get("name"), ref.get("apiVersion")
    if isinstance(kind, str) and kind and not _KIND.match(kind):
        out.append(Problem("spec.scaleTargetRef.kind", f"must be a kind such as Deployment, StatefulSet or "
                           f"LeaderWorkerSet: letters and digits only, the group goes in apiVersion (got "
                           f"{_show(kind)})"))
    if isinstance(name, str) and name and not _is_dns_subdomain(name):
        out.append(Problem("spec.scaleTargetRef.name", f"must be a Kubernetes object name: lower-case letters, "
                           f"digits, '-' and '.' (got {_show(name)})"))
    if isinstance(api_version, str) and not _API_VERSION.match(api_version):
        out.append(Problem("spec.scaleTargetRef.apiVersion", f"must be group/version (apps/v1, "
                           f"leaderworkerset.x-k8s.io/v1) or a core version (v1); got {_show(api_version)}"))
    return out


def _adapter_problems(spec: dict[str, Any]) -> list[Problem]:
    adapters = spec.get("adapters")
    if not isinstance(adapters, list):
        return []
    out = []
    first_use: dict[str, int] = {}
    for index, adapter in enumerate(adapters):
        if not isinstance(adapter, dict):
            continue
        name = adapter.get("name")
        if name == "base":
            out.append(Problem(f"spec.adapters[{index}].name", "'base' is reserved: the route table's Service for "
                               "the base model is <autoscaler>-base; choose another adapter name"))
        if isinstance(name, str):
            if name in first_use:
                out.append(Problem(f"spec.adapters[{index}].name", f"{_show(name)} is already used by "
                                   f"spec.adapters[{first_use[name]}]: adapter names must be unique (they are "
                                   f"the model names clients send)"))
            else:
                first_use[name] = index
        low, high = _num(adapter.get("minReplicas")), _num(adapter.get("maxReplicas"))
        if low is not None and high is not None and high < low:
            out.append(Problem(f"spec.adapters[{index}].maxReplicas", f"must be at least minReplicas "
                               f"({_fmt_num(low)}), got {_fmt_num(high)}: raise maxReplicas or lower minReplicas"))
    return out


def _said(value: float, given: Any, *keys: str) -> str:
    """A number for a message, marked when the user did not write it (the default filled it in)."""
    return _fmt_num(value) + ("" if _get(given, *keys) is not None else ", the default")


def _vllm_problems(spec: dict[str, Any], given: Any) -> list[Problem]:
    loras = _num(_get(spec, "vllm", "maxLorasPerReplica"))
    cpu = _num(_get(spec, "vllm", "maxCpuLorasPerReplica"))
    if loras is not None and cpu is not None and cpu < loras:
        return [Problem("spec.vllm.maxCpuLorasPerReplica", f"must be at least spec.vllm.maxLorasPerReplica "
                        f"({_said(loras, given, 'vllm', 'maxLorasPerReplica')}), got {_fmt_num(cpu)}: vLLM "
                        f"refuses to start when --max-cpu-loras is below --max-loras")]
    return []


def _window_order(spec: dict[str, Any], given: Any, later: tuple[str, str], why: str) -> list[Problem]:
    """``spec.scaling.<later>`` must be at least ``spec.scaling.scaleUp.windowSeconds``."""
    first = _num(_get(spec, "scaling", "scaleUp", "windowSeconds"))
    second = _num(_get(spec, "scaling", *later))
    if first is None or second is None or second >= first:
        return []
    return [Problem(f"spec.scaling.{later[0]}.{later[1]}", f"must be at least spec.scaling.scaleUp.windowSeconds "
                    f"({_said(first, given, 'scaling', 'scaleUp', 'windowSeconds')}), got "
                    f"{_said(second, given, 'scaling', *later)}: {why}")]


def _scaling_problems(spec: dict[str, Any], given: Any) -> list[Problem]:
    out = []
    up_threshold = _num(_get(spec, "scaling", "scaleUp", "threshold"))
    down_threshold = _num(_get(spec, "scaling", "scaleDown", "threshold"))
    if up_threshold is not None and down_threshold is not None and not down_threshold < up_threshold:
        out.append(Problem("spec.scaling.scaleDown.threshold", f"must be strictly below "
                           f"spec.scaling.scaleUp.threshold "
                           f"({_said(up_threshold, given, 'scaling', 'scaleUp', 'threshold')}), got "
                           f"{_said(down_threshold, given, 'scaling', 'scaleDown', 'threshold')}: lower "
                           f"scaleDown.threshold or raise scaleUp.threshold, so that an adapter between them "
                           f"neither grows nor shrinks (hysteresis)"))
    for later, why in ((("scaleDown", "windowSeconds"), "scale down more slowly than up, or replicas flap"),
                       (("scaleUp", "loadWindowSeconds"), "a scale-up that needs a load waits at least as "
                        "long as a promotion")):
        out += _window_order(spec, given, later, why)
    metric = _get(spec, "scaling", "metric")
    if isinstance(metric, dict) and metric.get("source") == "prometheus" and "prometheus" not in metric:
        out.append(Problem("spec.scaling.metric.prometheus", "is required when spec.scaling.metric.source is "
                           "prometheus: set prometheus.url to the Prometheus server that scrapes vLLM"))
    return out


def _pod_autoscaling_problems(spec: dict[str, Any]) -> list[Problem]:
    pa = spec.get("podAutoscaling")
    if not isinstance(pa, dict):
        return []
    out = []
    mode = pa.get("mode")
    hpa = pa.get("hpaName")
    if mode == "HPA" and hpa is None:
        out.append(Problem("spec.podAutoscaling.hpaName", "is required when spec.podAutoscaling.mode is HPA: "
                           "name the HorizontalPodAutoscaler of the scale target"))
    if isinstance(hpa, str) and not _is_dns_subdomain(hpa):
        out.append(Problem("spec.podAutoscaling.hpaName", f"must be a Kubernetes object name: lower-case "
                           f"letters, digits, '-' and '.' (got {_show(hpa)})"))
    if mode == "ScaleTarget" and pa.get("maxReplicas") is None:
        out.append(Problem("spec.podAutoscaling.maxReplicas", "is required when spec.podAutoscaling.mode is "
                           "ScaleTarget: the most replicas the autoscaler may scale the target to"))
    return out


def _selector_problems(spec: dict[str, Any]) -> list[Problem]:
    expressions = _get(spec, "podSelector", "matchExpressions")
    if not isinstance(expressions, list):
        return []
    out = []
    for index, expr in enumerate(expressions):
        if not isinstance(expr, dict):
            continue
        operator, values = expr.get("operator"), expr.get("values")
        where = f"spec.podSelector.matchExpressions[{index}].values"
        if operator in ("In", "NotIn") and (not isinstance(values, list) or not values):
            out.append(Problem(where, f"must list at least one value for operator {operator}"))
        if operator in ("Exists", "DoesNotExist") and isinstance(values, list) and values:
            out.append(Problem(where, f"must be empty for operator {operator}"))
    return out


def _autoscaler_semantic(obj: dict[str, Any], given: Any) -> list[Problem]:
    """The rules beyond the schema, on the defaulted object; ``given`` is what the user wrote."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return []
    given_spec = _get(given, "spec")
    return [
        *_scale_target_problems(spec),
        *_adapter_problems(spec),
        *_selector_problems(spec),
        *_vllm_problems(spec, given_spec),
        *_scaling_problems(spec, given_spec),
        *_pod_autoscaling_problems(spec),
    ]


#: Deeper than any real object (the schema is six levels deep; managedFields a few more); deeper input is
#: refused before anything recursive touches it.
MAX_DEPTH = 64


def nesting_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply lists and objects nest in ``value``, counted without recursion; stops past ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict | list):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)
    return deepest


#: The parts of an object that admission checks; the rest (status, unknown top-level fields) is not read.
_CHECKED_TOP_LEVEL = ("apiVersion", "kind", "metadata")


class _Checked(NamedTuple):
    """One pass over an object: the prepared (null-free, defaulted) form, its problems, the defaults patch."""

    obj: dict[str, Any] | None
    problems: list[Problem]
    patch: list[JsonPatchOp]


def _prepare(kind: str, obj: Any) -> _Checked:
    """The object as the rules see it: nulls dropped and defaults applied to a private copy of its spec.

    Metadata is only type-checked, never walked, so its size (managedFields, a last-applied annotation)
    costs nothing; the spec is refused before any recursion when it nests absurdly deep. The patch adds
    the defaults to ``obj`` itself: an ``add`` onto a null field replaces it, and list items are never
    dropped, so its paths hold in the original too.
    """
    if not isinstance(obj, dict):
        return _Checked(None, [Problem(ROOT_PATH, f"a {kind} must be a JSON object (got {_json_type(obj)})")], [])
    slim = {key: obj[key] for key in _CHECKED_TOP_LEVEL if obj.get(key) is not None}
    spec = obj.get("spec")
    if spec is not None:
        try:
            slim["spec"] = _drop_nulls(spec)
        except _TooDeep:
            return _Checked(None, [Problem("spec", f"lists and objects nest more than {MAX_DEPTH} levels deep; "
                                           f"no valid {kind} comes close")], [])
    prepared, patch = defaulted(kind, slim, in_place=True)  # _drop_nulls made a private copy of the spec
    return _Checked(prepared, [], patch)


def _scale_target(obj: Mapping[str, Any]) -> tuple[Any, Any, Any] | None:
    ref = _get(obj, "spec", "scaleTargetRef")
    if not isinstance(ref, dict):
        return None
    return ref.get("apiVersion"), ref.get("kind"), ref.get("name")


def _check_autoscaler(new: Any, old: Any, *, update: bool) -> _Checked:
    checked = _prepare(v1.AUTOSCALER_KIND, new)
    prepared_new = checked.obj
    if prepared_new is None:
        return checked
    prepared_old = _prepare(v1.AUTOSCALER_KIND, old).obj if update and isinstance(old, dict) else None
    if prepared_old is not None and prepared_old.get("spec") == prepared_new.get("spec"):
        return checked
    semantic = _autoscaler_semantic(prepared_new, new)
    explained = {p.path for p in semantic}
    # Where a semantic rule and the schema flag the same field, the semantic message (which says what to
    # do) stands alone.
    problems: list[Problem] = []
    for problem in schema_problems(v1.AUTOSCALER_KIND, prepared_new):
        if problem.path not in explained:
            explained.add(problem.path)  # one schema message per field: the first says enough
            problems.append(problem)
    problems += semantic
    before = _scale_target(prepared_old) if prepared_old is not None else None
    after = _scale_target(prepared_new)
    if before is not None and after is not None and before != after and all(isinstance(x, str) for x in before):
        was = f"{before[1]} {before[2]} ({before[0]})"
        now = f"{after[1]} {after[2]} ({after[0]})"
        problems.append(Problem("spec.scaleTargetRef", f"is immutable (was {was}, now {now}): create a new "
                                f"LoRAAutoscaler for another target and delete this one"))
    return checked._replace(problems=problems)


def validate_autoscaler(obj: Any) -> list[Problem]:
    """Every problem of a LoRAAutoscaler (as created), defaults applied first; empty when valid."""
    return _check_autoscaler(obj, None, update=False).problems


def validate_autoscaler_update(old: Any, new: Any) -> list[Problem]:
    """Problems of an update: the rules on the new object, plus the immutable ``scaleTargetRef``.

    An update that leaves the spec as it was (metadata, finalizers, labels) is always allowed, so that an
    object stored before a rule was tightened can still be relabelled, finalized and deleted.
    """
    return _check_autoscaler(new, old, update=True).problems


_PLACEMENT_IDENTITY = ("autoscaler", "adapter", "podName", "podUid")


def _placement_semantic(obj: dict[str, Any]) -> list[Problem]:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return []
    out = []
    for key in (*_PLACEMENT_IDENTITY, "source"):
        if spec.get(key) == "":
            out.append(Problem(f"spec.{key}", "must not be empty"))
    return out


def _check_placement(new: Any, old: Any, *, update: bool) -> _Checked:
    checked = _prepare(v1.PLACEMENT_KIND, new)
    prepared_new = checked.obj
    if prepared_new is None:
        return checked
    old_spec = _get(_prepare(v1.PLACEMENT_KIND, old).obj, "spec") if update else None
    if isinstance(old_spec, dict) and old_spec == prepared_new.get("spec"):
        return checked
    problems = schema_problems(v1.PLACEMENT_KIND, prepared_new) + _placement_semantic(prepared_new)
    new_spec = prepared_new.get("spec")
    if isinstance(old_spec, dict) and isinstance(new_spec, dict):
        for key in _PLACEMENT_IDENTITY:
            if key in old_spec and old_spec.get(key) != new_spec.get(key):
                problems.append(Problem(f"spec.{key}", f"is immutable (was {_show(old_spec.get(key))}, now "
                                        f"{_show(new_spec.get(key))}): a placement is one adapter on one pod; "
                                        f"create another placement instead"))
    return checked._replace(problems=problems)


def validate_placement(obj: Any) -> list[Problem]:
    """Every problem of a LoRAPlacement (written by the controller; checked so that hand edits are sane)."""
    return _check_placement(obj, None, update=False).problems


def validate_placement_update(old: Any, new: Any) -> list[Problem]:
    """Problems of a LoRAPlacement update: the rules on the new object; which adapter on which pod is fixed."""
    return _check_placement(new, old, update=True).problems


def _check(kind: str, obj: Any, old: Any) -> _Checked:
    if kind == v1.AUTOSCALER_KIND:
        return _check_autoscaler(obj, old, update=old is not None)
    if kind == v1.PLACEMENT_KIND:
        return _check_placement(obj, old, update=old is not None)
    raise ValueError(f"unknown kind {kind!r}: expected {v1.AUTOSCALER_KIND} or {v1.PLACEMENT_KIND}")


def validate(kind: str, obj: Any, old: Any = None) -> list[Problem]:
    """Dispatch by kind: creation rules when ``old`` is None, update rules otherwise."""
    return _check(kind, obj, old).problems


@dataclass(frozen=True)
class Review:
    """What an admission answers about one object: problems (deny) or warnings and the defaults patch."""

    problems: list[Problem]
    warnings: list[str]
    patch: list[JsonPatchOp]


def review(kind: str, obj: Any, old: Any = None, target: TargetScale | None = None) -> Review:
    """Problems, warnings and the defaults patch in one pass over the object (what the webhook runs).

    ``old`` is the stored object on an update (None on create); ``target`` the caller's read of a
    LoRAAutoscaler's scale target (None: no capacity warning). Warnings are only given for valid objects;
    the patch adds the defaults to ``obj`` as given.
    """
    checked = _check(kind, obj, old)
    if checked.problems:
        return Review(checked.problems, [], [])
    warnings = _warnings(checked.obj, target) if kind == v1.AUTOSCALER_KIND else []
    return Review([], warnings, checked.patch)


# --- warnings ----------------------------------------------------------------------------------------

#: Above this sync period a hot adapter waits noticeably for its next replica.
SYNC_PERIOD_WARN_MILLISECONDS = 5000


_DEFAULT_TARGET_API_VERSION = next(
    f.default for f in dataclasses.fields(v1.CrossVersionObjectReference) if f.name == "api_version"
)


def scale_target_ref(obj: Any) -> tuple[str, str, str] | None:
    """(apiVersion, kind, name) of a LoRAAutoscaler's target when all three are usable strings, else None."""
    ref = _get(obj, "spec", "scaleTargetRef")
    if not isinstance(ref, dict):
        return None
    api_version = ref.get("apiVersion")
    return _usable_ref({"spec": {"scaleTargetRef": {
        "apiVersion": _DEFAULT_TARGET_API_VERSION if api_version is None else api_version,
        "kind": ref.get("kind"), "name": ref.get("name"),
    }}})  # fmt: skip


def _usable_ref(prepared: dict[str, Any] | None) -> tuple[str, str, str] | None:
    ref = _scale_target(prepared) if prepared is not None else None
    if ref is None or not all(isinstance(x, str) and x for x in ref):
        return None
    api_version, kind, name = ref
    if not (_API_VERSION.match(api_version) and _KIND.match(kind) and _is_dns_subdomain(name)):
        return None
    return api_version, kind, name


def _capacity_warnings(spec: dict[str, Any], target: TargetScale, ref: tuple[str, str, str] | None) -> list[str]:
    what = f"{ref[1]} {ref[2]}" if ref else "the scale target"
    if target.state == "missing":
        return [f"spec.scaleTargetRef: {what} does not exist yet; adapters are placed once it has replicas"]
    if target.state == "unknown":
        detail = f": {target.detail}" if target.detail else ""
        return [f"spec.scaleTargetRef: could not read the replicas of {what}, so the adapters' capacity was "
                f"not checked{detail}"]
    replicas = target.replicas or 0
    listed = spec.get("adapters")
    adapters = [a for a in listed if isinstance(a, dict)] if isinstance(listed, list) else []
    if not adapters:
        return []
    if replicas <= 0:
        return [f"spec.scaleTargetRef: {what} has 0 replicas: no adapter is served until it scales up"]
    preferred = spec.get("placementMode") == "preferred"
    per_replica = _num(_get(spec, "vllm", "maxLorasPerReplica")) or 0
    field = "maxLorasPerReplica"
    cpu = _num(_get(spec, "vllm", "maxCpuLorasPerReplica"))
    if preferred and cpu is not None:
        per_replica, field = cpu, "maxCpuLorasPerReplica"
    out = []
    mins = [(_num(a.get("minReplicas")) or 0) for a in adapters]
    needed = sum(mins)
    slots = replicas * per_replica
    if needed > slots:
        out.append(f"spec.adapters: their minReplicas add up to {_fmt_num(needed)} but {what} has {replicas} "
                   f"replicas x {field} {_fmt_num(per_replica)} = {_fmt_num(slots)} slots; add replicas, raise "
                   f"{field}, or lower minReplicas")
    elif slots - needed < replicas:
        # Less than a free slot per replica: a hot adapter has nowhere to gain a replica, and the autoscaler
        # does what static dispatch does (the benchmark's strict mode with as many adapters as slots).
        advice = ("run vLLM with a larger --max-cpu-loras (adapters cached in host memory; room for every adapter "
                  "twice across the fleet is a good start) and set spec.vllm.maxCpuLorasPerReplica to it"
                  if preferred else "use placementMode preferred with a larger --max-cpu-loras, raise "
                  "--max-loras, or add replicas")
        out.append(f"spec.adapters: their minReplicas take {_fmt_num(needed)} of the {_fmt_num(slots)} slots of "
                   f"{what} ({replicas} replicas x {field} {_fmt_num(per_replica)}), less than one free slot per "
                   f"replica: hot adapters have no room to scale; {advice}")
    for index, low in enumerate(mins):
        if low > replicas:
            out.append(f"spec.adapters[{index}].minReplicas: {_fmt_num(low)} is more than the {replicas} "
                       f"replicas of {what} (one copy per replica at most)")
            break
    return out


def autoscaler_warnings(obj: Any, target: TargetScale | None = None) -> list[str]:
    """Legal but risky settings of a LoRAAutoscaler, each naming its field; ``target`` from the caller's read."""
    return _warnings(_prepare(v1.AUTOSCALER_KIND, obj).obj, target)


def _warnings(prepared: dict[str, Any] | None, target: TargetScale | None) -> list[str]:
    spec = _get(prepared, "spec")
    if not isinstance(spec, dict):
        return []
    out = []
    period = _num(_get(spec, "scaling", "syncPeriodMilliseconds"))
    if period is not None and period > SYNC_PERIOD_WARN_MILLISECONDS:
        out.append(f"spec.scaling.syncPeriodMilliseconds is {_fmt_num(period)}: above "
                   f"{SYNC_PERIOD_WARN_MILLISECONDS} a hot adapter waits that long for a new replica, which "
                   f"costs tail latency")
    if spec.get("adapters") == []:
        out.append("spec.adapters is empty: nothing will be placed")
    pa = spec.get("podAutoscaling")
    if isinstance(pa, dict) and pa.get("mode") == "Off" and pa.get("hpaName") is not None:
        out.append("spec.podAutoscaling.hpaName is ignored while spec.podAutoscaling.mode is Off")
    if target is not None:
        out.extend(_capacity_warnings(spec, target, _usable_ref(prepared)))
    return out
