"""The webhook's HTTP side: an aiohttp app over TLS for ``/mutate``, ``/validate``, ``/healthz``, ``/readyz``,
and a separate plain-HTTP app that serves only ``/metrics``.

What the app promises about input: a body that is not an AdmissionReview v1 request (wrong content
type, too large, not JSON, no uid...) gets a 4xx with a message saying what is wrong; a well-formed
request always gets a 200 with a decision, even when the code deciding it fails (then ``/validate``
denies, naming the failure, and ``/mutate`` allows without a patch, since the CRD's schema defaults
and the validating webhook still apply). A 500 would make the API server apply ``failurePolicy`` and
show the user "failed calling webhook" instead of a reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from api import v1alpha1 as v1
from webhook.admission import KINDS, mutate, target_to_read, validate_request
from webhook.review import AdmissionRequest, AdmissionResponseWire, MalformedReview, allow, deny, parse_review, review
from webhook.targets import NoScaleLookup, ScaleLookup

log = logging.getLogger(__name__)

#: The API server's own cap on a request body; nothing larger can be a real admission.
MAX_BODY_BYTES = 3 * 1024 * 1024
Endpoint = Literal["mutate", "validate"]
ReadinessCheck = Callable[[], list[str]]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class WebhookMetrics:
    """Admissions by endpoint, kind, operation and result, their latency, and rejected requests."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.admissions = Counter(
            "lora_webhook_admissions", "Admission requests answered, by decision.",
            ["webhook", "kind", "operation", "result"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "lora_webhook_admission_duration_seconds", "Time from the request's arrival to its answer.",
            ["webhook", "kind"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.rejected = Counter(
            "lora_webhook_rejected_requests", "Requests refused with a 4xx (not an AdmissionReview v1).",
            ["webhook", "code"], registry=self.registry,
        )  # fmt: skip

        self._children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}

    def count(self, endpoint: str, kind: str, operation: str, result: str, seconds: float) -> None:
        key = (endpoint, kind, operation, result)
        children = self._children.get(key)
        if children is None:  # label lookups cost more than the increments; kinds and operations are few
            children = (self.admissions.labels(*key), self.latency.labels(endpoint, kind))
            if len(self._children) < 1024:
                self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)


def _error(status: int, message: str) -> web.Response:
    """A 4xx carrying a metav1.Status, readable by people (curl) and by clients."""
    body = {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": status, "message": message,
            "reason": {400: "BadRequest", 413: "RequestEntityTooLarge"}.get(status, "BadRequest")}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _internal_failure(endpoint: Endpoint, req: AdmissionRequest, exc: BaseException) -> AdmissionResponseWire:
    what = f"{type(exc).__name__}: {exc}"[:300]
    if endpoint == "mutate":
        return allow(req.uid, warnings=[f"the webhook could not apply defaults ({what}); the CRD's defaults "
                                        f"apply instead"])
    return deny(req.uid, f"the webhook failed while checking this {req.kind} ({what}); this is a bug in the "
                         f"webhook, not in your object: please report it. Retrying will not help.", code=500)


class AdmissionHandler:
    """Turns HTTP requests into decisions; all input handling lives here, all deciding in webhook.admission."""

    def __init__(self, lookup: ScaleLookup, metrics: WebhookMetrics, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.lookup = lookup
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    def _reject(self, endpoint: Endpoint, status: int, message: str) -> web.Response:
        self.metrics.rejected.labels(endpoint, str(status)).inc()
        return _error(status, message)

    async def _decide(self, endpoint: Endpoint, req: AdmissionRequest) -> AdmissionResponseWire:
        if endpoint == "mutate":
            return mutate(req)
        ref = target_to_read(req)
        target = await self.lookup.read(req.namespace, *ref) if ref is not None else None
        return validate_request(req, target)

    async def handle(self, endpoint: Endpoint, request: web.Request) -> web.Response:
        started = time.perf_counter()
        if request.content_type != "application/json":
            got = request.headers.get("Content-Type", "none")
            return self._reject(endpoint, 400, f"Content-Type must be application/json, got {got[:100]!r}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._reject(endpoint, 413, f"the body is larger than {self.max_body_bytes} bytes, the most an "
                                               f"API server sends")
        except Exception as exc:  # a broken upload: nothing to decide on
            return self._reject(endpoint, 400, f"could not read the body: {type(exc).__name__}: {exc}"[:500])
        try:
            req = parse_review(body)
        except MalformedReview as exc:
            return self._reject(endpoint, 400, f"not an AdmissionReview v1 request: {exc}"[:1000])
        except Exception as exc:  # the reader must not fail on anything; if it does, the input is still at fault
            log.exception("reading an AdmissionReview failed unexpectedly")
            return self._reject(endpoint, 400, f"not an AdmissionReview v1 request: {type(exc).__name__}"[:500])
        try:
            response = await self._decide(endpoint, req)
            result = "allowed" if response.get("allowed") else "denied"
            payload = review(response)
        except Exception as exc:  # well-formed input and still a failure: ours. Answer, never 500.
            log.exception("%s of %s %s/%s (uid %s) failed", endpoint, req.kind, req.namespace, req.name, req.uid)
            result = "error"
            payload = review(_internal_failure(endpoint, req, exc))
        kind = req.kind if req.group == v1.GROUP and req.kind in KINDS else "other"  # bounded label values
        self.metrics.count(endpoint, kind, req.operation, result, time.perf_counter() - started)
        return web.Response(body=payload, content_type="application/json")


HANDLER = web.AppKey("handler", AdmissionHandler)


def create_app(
    *,
    lookup: ScaleLookup | None = None,
    metrics: WebhookMetrics | None = None,
    readiness: ReadinessCheck | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> web.Application:
    """The admission app (serve it over TLS): ``/mutate``, ``/validate``, ``/healthz``, ``/readyz``."""
    handler = AdmissionHandler(lookup or NoScaleLookup(), metrics or WebhookMetrics(), max_body_bytes)
    app = web.Application(client_max_size=max_body_bytes)

    def route(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def serve(request: web.Request) -> web.Response:
            return await handler.handle(endpoint, request)

        return serve

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_request: web.Request) -> web.Response:
        reasons = readiness() if readiness is not None else []
        if reasons:
            return web.Response(status=503, text="not ready: " + "; ".join(reasons) + "\n")
        return web.Response(text="ok\n")

    app.router.add_post("/mutate", route("mutate"))
    app.router.add_post("/validate", route("validate"))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app[HANDLER] = handler
    return app


def create_metrics_app(registry: CollectorRegistry) -> web.Application:
    """Plain HTTP, one route: ``GET /metrics`` in the Prometheus text format."""
    app = web.Application()

    async def metrics(_request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics)
    return app
