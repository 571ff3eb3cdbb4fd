"""The AdmissionReview v1 wire format: typed structures, a strict reader and the reply builders.

Reading is strict about the envelope (what the API server always sends: ``apiVersion``, ``kind``, a
``request`` with a ``uid``, a ``kind`` and an ``operation``) and lenient about the object inside it: a
bad envelope is a malformed request (HTTP 400), a bad object is a decision (HTTP 200, denied).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import orjson

ADMISSION_API_VERSION = "admission.k8s.io/v1"
ADMISSION_KIND = "AdmissionReview"
OPERATIONS = ("CREATE", "UPDATE", "DELETE", "CONNECT")
Operation = Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]
#: Longer than any UID the API server makes (a UUID); a longer one is not from an API server.
MAX_UID_LENGTH = 128
#: The API server keeps at most 4096 characters of warnings in all, and may cut each above 256.
MAX_WARNING_LENGTH = 256


class GroupVersionKind(TypedDict):
    """metav1.GroupVersionKind as it is on the wire."""

    group: str
    version: str
    kind: str


class StatusCause(TypedDict, total=False):
    """One cause of a failure: the field and what is wrong with it."""

    reason: str
    message: str
    field: str


class StatusDetails(TypedDict, total=False):
    """Which object failed, and why field by field."""

    name: str
    group: str
    kind: str
    causes: list[StatusCause]


class Status(TypedDict, total=False):
    """metav1.Status: what a denial tells the user (``message`` is what kubectl prints)."""

    status: Literal["Success", "Failure"]
    code: int
    reason: str
    message: str
    details: StatusDetails


class AdmissionRequestWire(TypedDict, total=False):
    """admission.k8s.io/v1 AdmissionRequest (the fields this webhook reads are checked on the way in)."""

    uid: str
    kind: GroupVersionKind
    resource: dict[str, str]
    subResource: str
    requestKind: GroupVersionKind
    requestResource: dict[str, str]
    requestSubResource: str
    name: str
    namespace: str
    operation: Operation
    userInfo: dict[str, Any]
    object: Any
    oldObject: Any
    dryRun: bool
    options: Any


class AdmissionResponseWire(TypedDict, total=False):
    """admission.k8s.io/v1 AdmissionResponse."""

    uid: str
    allowed: bool
    status: Status
    patch: str
    patchType: Literal["JSONPatch"]
    warnings: list[str]
    auditAnnotations: dict[str, str]


class AdmissionReviewWire(TypedDict, total=False):
    """The envelope, both ways."""

    apiVersion: str
    kind: str
    request: AdmissionRequestWire
    response: AdmissionResponseWire


class MalformedReview(ValueError):
    """The body is not an AdmissionReview v1 request; the message says what is wrong (HTTP 400)."""


@dataclass(frozen=True)
class AdmissionRequest:
    """The parts of a request that decisions use, checked and typed."""

    uid: str
    group: str
    version: str
    kind: str
    operation: Operation
    namespace: str
    name: str
    object: Any
    old_object: Any
    dry_run: bool
    sub_resource: str


def _string(request: dict[str, Any], key: str, *, required: bool = False) -> str:
    value = request.get(key)
    if value is None:
        if required:
            raise MalformedReview(f"request.{key} is required")
        return ""
    if not isinstance(value, str):
        raise MalformedReview(f"request.{key} must be a string, got {type(value).__name__}")
    return value


def parse_review(body: bytes) -> AdmissionRequest:
    """Read an AdmissionReview v1 request from JSON bytes, or raise `MalformedReview` saying why."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedReview(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise MalformedReview(f"the body must be a JSON object (an AdmissionReview), got {type(doc).__name__}")
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if kind != ADMISSION_KIND:
        raise MalformedReview(f"kind must be {ADMISSION_KIND}, got {kind!r}")
    if api_version != ADMISSION_API_VERSION:
        raise MalformedReview(f"apiVersion must be {ADMISSION_API_VERSION} (set admissionReviewVersions: [v1] in "
                              f"the webhook configuration), got {api_version!r}")
    request = doc.get("request")
    if not isinstance(request, dict):
        raise MalformedReview("request must be an object (an AdmissionReview sent to a webhook carries one)")
    uid = _string(request, "uid", required=True)
    if not uid or len(uid) > MAX_UID_LENGTH:
        raise MalformedReview(f"request.uid must be 1 to {MAX_UID_LENGTH} characters, got {len(uid)}")
    gvk = request.get("kind")
    if not isinstance(gvk, dict) or not all(isinstance(gvk.get(k), str) for k in ("group", "version", "kind")):
        raise MalformedReview("request.kind must be an object with string group, version and kind")
    operation = request.get("operation")
    if operation not in OPERATIONS:
        raise MalformedReview(f"request.operation must be one of {', '.join(OPERATIONS)}, got {operation!r}")
    dry_run = request.get("dryRun", False)
    if dry_run is None:
        dry_run = False
    if not isinstance(dry_run, bool):
        raise MalformedReview(f"request.dryRun must be true or false, got {dry_run!r}")
    return AdmissionRequest(
        uid=uid,
        group=gvk["group"],
        version=gvk["version"],
        kind=gvk["kind"],
        operation=operation,
        namespace=_string(request, "namespace"),
        name=_string(request, "name"),
        object=request.get("object"),
        old_object=request.get("oldObject"),
        dry_run=dry_run,
        sub_resource=_string(request, "subResource"),
    )


def _clip_warnings(warnings: list[str]) -> list[str]:
    out = []
    for warning in warnings:
        text = " ".join(warning.split())
        if len(text) > MAX_WARNING_LENGTH:
            text = text[: MAX_WARNING_LENGTH - 3] + "..."
        out.append(text)
    return out


def allow(uid: str, *, patch: list[Any] | None = None, warnings: list[str] | None = None) -> AdmissionResponseWire:
    """An allowing response, with a JSONPatch when there is anything to change."""
    response: AdmissionResponseWire = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(orjson.dumps(patch)).decode("ascii")
    if warnings:
        response["warnings"] = _clip_warnings(warnings)
    return response


def deny(uid: str, message: str, *, code: int = 400, causes: list[StatusCause] | None = None,
         warnings: list[str] | None = None) -> AdmissionResponseWire:
    """A denying response; ``message`` is what the user reads after "admission webhook ... denied the request"."""
    status: Status = {"status": "Failure", "code": code, "message": message}
    if causes:
        status["details"] = {"causes": causes}
    response: AdmissionResponseWire = {"uid": uid, "allowed": False, "status": status}
    if warnings:
        response["warnings"] = _clip_warnings(warnings)
    return response


def review(response: AdmissionResponseWire) -> bytes:
    """The reply body: an AdmissionReview v1 carrying ``response``."""
    envelope: AdmissionReviewWire = {"apiVersion": ADMISSION_API_VERSION, "kind": ADMISSION_KIND,
                                     "response": response}
    return orjson.dumps(envelope)
