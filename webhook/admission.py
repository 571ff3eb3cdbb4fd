"""The admission decisions: pure functions from a parsed request (and a read of the target) to a response.

Where each check runs, and why the mutating endpoint may deny: the API server runs mutating webhooks,
then the CRD's own schema and CEL validation, then validating webhooks. A schema violation would stop
the request before the validating webhook sees it, and the user would read the API server's terse
message. So ``/mutate`` validates the defaulted object and denies with the full, field-by-field message;
``/validate`` runs the same rules again (the object may have been changed by another mutating webhook
since) and adds the warnings, which need a read of the scale target.
"""

from __future__ import annotations

from typing import Any

from api import v1alpha1 as v1
from api.validation import Problem, TargetScale, format_problems, review, scale_target_ref
from webhook.review import AdmissionRequest, AdmissionResponseWire, StatusCause, allow, deny

KINDS = (v1.AUTOSCALER_KIND, v1.PLACEMENT_KIND)
CHECKED_OPERATIONS = ("CREATE", "UPDATE")
#: Each cause repeats a line of the message; the message already lists every problem.
MAX_CAUSES = 30


def _object_name(req: AdmissionRequest) -> str:
    if req.name:
        return req.name
    meta = req.object.get("metadata") if isinstance(req.object, dict) else None
    if isinstance(meta, dict):
        name = meta.get("name") or meta.get("generateName")
        if isinstance(name, str):
            return name
    return ""


def _gate(req: AdmissionRequest) -> AdmissionResponseWire | None:
    """A response for requests this webhook does not check (or cannot), else None (go on and check)."""
    if req.operation not in CHECKED_OPERATIONS or req.sub_resource:
        return allow(req.uid)
    if req.group != v1.GROUP:
        # A configuration that sends foreign kinds here is wrong, but blocking them would be worse.
        return allow(req.uid, warnings=[f"the LoRA Autoscaler webhook does not check {req.kind}.{req.group}; "
                                        f"its webhook configuration matches too much"])
    if req.version != v1.VERSION or req.kind not in KINDS:
        return deny(req.uid, f"{req.kind}.{req.group}/{req.version} is not served by this webhook (it checks "
                             f"{' and '.join(KINDS)} {v1.VERSION}); is the webhook older than the CRDs?")
    if req.object is None:
        return deny(req.uid, f"request.object is missing: a {req.operation} carries the {req.kind}")
    if req.operation == "UPDATE" and req.old_object is None:
        return deny(req.uid, f"request.oldObject is missing: an UPDATE carries the {req.kind} as it was")
    return None


def _causes(problems: list[Problem]) -> list[StatusCause]:
    return [{"reason": "FieldValueInvalid", "field": p.path, "message": p.message} for p in problems[:MAX_CAUSES]]


def _old(req: AdmissionRequest) -> Any:
    return req.old_object if req.operation == "UPDATE" else None


def _denial(req: AdmissionRequest, problems: list[Problem]) -> AdmissionResponseWire:
    return deny(req.uid, format_problems(req.kind, _object_name(req), problems), causes=_causes(problems))


def mutate(req: AdmissionRequest) -> AdmissionResponseWire:
    """Defaults as a JSONPatch; a denial listing every problem when the defaulted object is invalid."""
    gated = _gate(req)
    if gated is not None:
        return gated
    result = review(req.kind, req.object, _old(req))
    if result.problems:
        return _denial(req, result.problems)
    return allow(req.uid, patch=list(result.patch))


def target_to_read(req: AdmissionRequest) -> tuple[str, str, str] | None:
    """(apiVersion, kind, name) of the scale target whose replicas the warnings need, if any."""
    if _gate(req) is not None or req.kind != v1.AUTOSCALER_KIND or not req.namespace:
        return None
    return scale_target_ref(req.object)


def validate_request(req: AdmissionRequest, target: TargetScale | None = None) -> AdmissionResponseWire:
    """Allowed or denied with every problem; warnings for risky settings when allowed."""
    gated = _gate(req)
    if gated is not None:
        return gated
    result = review(req.kind, req.object, _old(req), target)
    if result.problems:
        return _denial(req, result.problems)
    return allow(req.uid, warnings=result.warnings)
