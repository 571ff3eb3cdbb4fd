"""The webhook's HTTP handling, in process: decisions, uid echo, dry-run, bad bodies, catch-all, metrics.

Each test runs its coroutine with ``asyncio.run`` under a deadline, against the real aiohttp app served
by aiohttp's test server.
"""

from __future__ import annotations

import asyncio
import base64
import copy
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from api import v1alpha1 as v1
from api.defaulting import apply_defaults
from api.validation import TargetScale
from webhook import server as server_module
from webhook.review import MAX_WARNING_LENGTH
from webhook.server import MAX_BODY_BYTES, WebhookMetrics, create_app, create_metrics_app

LIMIT_SECONDS = 30.0
GVK = {"group": v1.GROUP, "version": v1.VERSION, "kind": v1.AUTOSCALER_KIND}


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await asyncio.wait_for(body(), LIMIT_SECONDS)

    asyncio.run(main())


def autoscaler(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "scaleTargetRef": {"kind": "Deployment", "name": "vllm"},
        "adapters": [{"name": "sql-lora", "source": "/models/sql"}],
    }
    base.update(spec)
    return {"apiVersion": v1.API_VERSION, "kind": v1.AUTOSCALER_KIND,
            "metadata": {"name": "demo", "namespace": "team-a"}, "spec": base}


def review(obj: Any = None, *, uid: str = "3f1c-uid", operation: str = "CREATE", old: Any = None,
           gvk: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"uid": uid, "kind": gvk or GVK, "operation": operation, "namespace": "team-a",
                               "name": "demo", "object": autoscaler() if obj is None else obj}
    if old is not None:
        request["oldObject"] = old
    request.update(extra)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


class FixedLookup:
    """A scale target with a set replica count; records what was asked (reads only: it cannot write)."""

    def __init__(self, target: TargetScale) -> None:
        self.target = target
        self.calls: list[tuple[str, str, str, str]] = []

    async def read(self, namespace: str, api_version: str, kind: str, name: str) -> TargetScale:
        self.calls.append((namespace, api_version, kind, name))
        return self.target


class BrokenLookup:
    async def read(self, namespace: str, api_version: str, kind: str, name: str) -> TargetScale:
        raise RuntimeError("lookup exploded")


async def post(client: TestClient, path: str, body: Any, *, content_type: str = "application/json"
               ) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    resp = await client.post(path, data=data, headers={"Content-Type": content_type})
    raw = await resp.read()
    try:
        return resp.status, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return resp.status, raw.decode(errors="replace")


def client_for(app: web.Application) -> TestClient:
    return TestClient(TestServer(app))


def decode_patch(response: dict[str, Any]) -> list[dict[str, Any]]:
    assert response["patchType"] == "JSONPatch"
    ops: list[dict[str, Any]] = orjson.loads(base64.b64decode(response["patch"]))
    return ops


# --- decisions ---------------------------------------------------------------------------------------


def test_mutate_returns_the_defaults_as_a_base64_jsonpatch_and_echoes_the_uid() -> None:
    async def body() -> None:
        async with client_for(create_app()) as client:
            status, doc = await post(client, "/mutate", review(uid="abc-123"))
            assert status == 200
            assert doc["apiVersion"] == "admission.k8s.io/v1" and doc["kind"] == "AdmissionReview"
            response = doc["response"]
            assert response["uid"] == "abc-123" and response["allowed"] is True
            ops = decode_patch(response)
            assert {op["path"] for op in ops} >= {"/spec/vllm", "/spec/scaling", "/spec/adapters/0/minReplicas"}
            again = (await post(client, "/mutate", review(uid="abc-123")))[1]
            assert again == doc  # the same object twice gives the same patch

    run(body)


def test_mutate_of_a_fully_defaulted_object_has_no_patch() -> None:
    async def body() -> None:
        async with client_for(create_app()) as client:
            full = apply_defaults(v1.AUTOSCALER_KIND, autoscaler())
            response = (await post(client, "/mutate", review(full)))[1]["response"]
            assert response == {"uid": "3f1c-uid", "allowed": True}

    run(body)


def test_mutate_denies_an_invalid_object_with_every_problem() -> None:
    async def body() -> None:
        async with client_for(create_app()) as client:
            obj = autoscaler(adapters=[{"name": "a", "source": "ftp://x", "minReplicas": 0}],
                             scaling={"scaleUp": {"threshold": 1}})
            response = (await post(client, "/mutate", review(obj)))[1]["response"]
            assert response["allowed"] is False and "patch" not in response
            message = response["status"]["message"]
            assert message.startswith('LoRAAutoscaler "demo" is invalid (3 problems): ')
            assert "spec.adapters[0].source: unknown scheme 'ftp://'" in message
            assert "spec.adapters[0].minReplicas: must be at least 1 (got 0)" in message
            assert "spec.scaling.scaleDown.threshold: must be strictly below" in message
            causes = response["status"]["details"]["causes"]
            assert [c["field"] for c in causes] == ["spec.adapters[0].source", "spec.adapters[0].minReplicas",
                                                    "spec.scaling.scaleDown.threshold"]

    run(body)


def test_validate_allows_with_warnings_from_the_target_read() -> None:
    async def body() -> None:
        lookup = FixedLookup(TargetScale("found", replicas=1))
        async with client_for(create_app(lookup=lookup)) as client:
            obj = autoscaler(adapters=[{"name": f"a{i}", "source": "/m"} for i in range(5)], placementMode="preferred")
            response = (await post(client, "/validate", review(obj)))[1]["response"]
            assert response["allowed"] is True and "patch" not in response
            assert len(response["warnings"]) == 1
            assert "their minReplicas add up to 5 but Deployment vllm has 1 replicas" in response["warnings"][0]
            assert lookup.calls == [("team-a", "apps/v1", "Deployment", "vllm")]

    run(body)


def test_validate_denies_with_the_same_rules_and_reads_nothing_then() -> None:
    async def body() -> None:
        lookup = FixedLookup(TargetScale("found", replicas=1))
        async with client_for(create_app(lookup=lookup)) as client:
            obj = autoscaler(podAutoscaling={"mode": "HPA"})
            response = (await post(client, "/validate", review(obj)))[1]["response"]
            assert response["allowed"] is False
            assert "spec.podAutoscaling.hpaName: is required when spec.podAutoscaling.mode is HPA" in (
                response["status"]["message"])
            assert "warnings" not in response

    run(body)


def test_dry_run_gets_the_same_answer() -> None:
    async def body() -> None:
        lookup = FixedLookup(TargetScale("missing"))
        async with client_for(create_app(lookup=lookup)) as client:
            for path in ("/mutate", "/validate"):
                for obj in (autoscaler(), autoscaler(adapters=[])):
                    wet = (await post(client, path, review(obj)))[1]
                    dry = (await post(client, path, review(obj, dryRun=True)))[1]
                    assert wet == dry

    run(body)


def test_scale_target_is_immutable_on_update() -> None:
    async def body() -> None:
        async with client_for(create_app()) as client:
            new = autoscaler(scaleTargetRef={"kind": "StatefulSet", "name": "vllm"})
            for path in ("/mutate", "/validate"):
                response = (await post(client, path, review(new, operation="UPDATE", old=autoscaler())))[1]["response"]
                assert response["allowed"] is False
                assert "spec.scaleTargetRef: is immutable" in response["status"]["message"]
            same = (await post(client, "/validate", review(autoscaler(), operation="UPDATE", old=autoscaler())))[1]
            assert same["response"]["allowed"] is True

    run(body)


def test_placements_are_defaulted_and_checked() -> None:
    async def body() -> None:
        gvk = {**GVK, "kind": v1.PLACEMENT_KIND}
        obj = {"metadata": {"name": "p"}, "spec": {"autoscaler": "demo", "adapter": "a", "source": "/m",
                                                   "podName": "vllm-0", "podUid": "u"}}
        async with client_for(create_app()) as client:
            response = (await post(client, "/mutate", review(obj, gvk=gvk)))[1]["response"]
            assert decode_patch(response) == [{"op": "add", "path": "/spec/preferred", "value": True},
                                              {"op": "add", "path": "/spec/retire", "value": False}]
            moved = copy.deepcopy(obj)
            moved["spec"]["podName"] = "vllm-1"
            response = (await post(client, "/validate", review(moved, gvk=gvk, operation="UPDATE", old=obj)))[1]
            assert "spec.podName: is immutable" in response["response"]["status"]["message"]

    run(body)


@pytest.mark.parametrize(
    ("changes", "allowed", "text"),
    [
        ({"operation": "DELETE", "object": None}, True, None),
        ({"operation": "CONNECT"}, True, None),
        ({"subResource": "status", "object": {"spec": 5}}, True, None),
        ({"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}}, True, "does not check Deployment.apps"),
        ({"kind": {**GVK, "version": "v2"}}, False, "is not served by this webhook"),
        ({"kind": {**GVK, "kind": "Pod"}}, False, "is not served by this webhook"),
        ({"object": None}, False, "request.object is missing"),
        ({"object": "a string"}, False, "<object>: a LoRAAutoscaler must be a JSON object (got string)"),
        ({"object": {"metadata": {"generateName": "demo-"}}, "name": ""}, False, 'LoRAAutoscaler "demo-" is invalid'),
        ({"operation": "UPDATE"}, False, "request.oldObject is missing"),
    ],
)
def test_well_formed_requests_always_get_a_decision(changes: dict[str, Any], allowed: bool, text: str | None) -> None:
    async def body() -> None:
        async with client_for(create_app()) as client:
            doc = review()
            doc["request"].update(changes)
            for path in ("/mutate", "/validate"):
                status, reply = await post(client, path, doc)
                assert status == 200
                response = reply["response"]
                assert response["uid"] == "3f1c-uid" and response["allowed"] is allowed
                if text is not None:
                    said = response["status"]["message"] if not allowed else " ".join(response["warnings"])
                    assert text in said

    run(body)


def test_warnings_are_clipped_for_the_api_server() -> None:
    async def body() -> None:
        lookup = FixedLookup(TargetScale("unknown", detail="x" * 1000))
        async with client_for(create_app(lookup=lookup)) as client:
            response = (await post(client, "/validate", review()))[1]["response"]
            assert response["warnings"] and all(len(w) <= MAX_WARNING_LENGTH for w in response["warnings"])

    run(body)


# --- bad bodies --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "text"),
    [
        (b"{}", "text/plain", "Content-Type must be application/json, got 'text/plain'"),
        (b"{}", "", "Content-Type must be application/json"),
        (b"not json", "application/json", "not valid JSON"),
        (b"", "application/json", "not valid JSON"),
        (b"\xff\xfe", "application/json", "not valid JSON"),
        (b"[1, 2]", "application/json", "must be a JSON object (an AdmissionReview), got list"),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1beta1", "request": {}}', "application/json",
         "admissionReviewVersions: [v1]"),
        (b'{"kind": "Pod", "apiVersion": "v1"}', "application/json", "kind must be AdmissionReview"),
        (b'{"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}', "application/json",
         "request must be an object"),
    ],
)
def test_malformed_bodies_get_400_with_a_message(body: bytes, content_type: str, text: str) -> None:
    async def run_it() -> None:
        async with client_for(create_app()) as client:
            for path in ("/mutate", "/validate"):
                resp = await client.post(path, data=body, headers={"Content-Type": content_type} if content_type
                                         else {})
                assert resp.status == 400
                doc = await resp.json()
                assert doc["kind"] == "Status" and doc["code"] == 400
                assert text in doc["message"]

    run(run_it)


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"uid": None}, "request.uid is required"),
        ({"uid": 5}, "request.uid must be a string"),
        ({"uid": ""}, "request.uid must be 1 to 128 characters"),
        ({"uid": "u" * 129}, "request.uid must be 1 to 128 characters"),
        ({"kind": "LoRAAutoscaler"}, "request.kind must be an object"),
        ({"kind": {"group": v1.GROUP, "kind": "LoRAAutoscaler"}}, "request.kind must be an object"),
        ({"operation": "PATCH"}, "request.operation must be one of CREATE, UPDATE, DELETE, CONNECT"),
        ({"dryRun": "yes"}, "request.dryRun must be true or false"),
        ({"namespace": 3}, "request.namespace must be a string"),
    ],
)
def test_a_broken_envelope_gets_400_naming_the_field(change: dict[str, Any], text: str) -> None:
    async def body() -> None:
        async with client_for(create_app()) as client:
            doc = review()
            doc["request"].update(change)
            if doc["request"]["uid"] is None:
                del doc["request"]["uid"]
            status, reply = await post(client, "/validate", doc)
            assert status == 400 and text in reply["message"]

    run(body)


def test_a_body_above_three_mebibytes_gets_413() -> None:
    async def body() -> None:
        async with client_for(create_app()) as client:
            doc = review()
            doc["request"]["object"]["metadata"]["annotations"] = {"big": "x" * MAX_BODY_BYTES}
            status, reply = await post(client, "/validate", doc)
            assert status == 413
            assert f"larger than {MAX_BODY_BYTES} bytes" in reply["message"]
            # just under the cap is read and decided
            doc["request"]["object"]["metadata"]["annotations"] = {"big": "x" * (MAX_BODY_BYTES - 2000)}
            status, reply = await post(client, "/validate", doc)
            assert status == 200 and reply["response"]["allowed"] is True

    run(body)


def test_other_methods_and_paths_are_4xx() -> None:
    async def body() -> None:
        async with client_for(create_app()) as client:
            assert (await client.get("/validate")).status == 405
            assert (await client.post("/metrics", data=b"{}")).status == 404
            assert (await client.get("/healthz")).status == 200

    run(body)


# --- the catch-all -----------------------------------------------------------------------------------


def test_an_internal_failure_on_well_formed_input_is_a_200_denial_on_validate() -> None:
    async def body() -> None:
        metrics = WebhookMetrics()
        async with client_for(create_app(lookup=BrokenLookup(), metrics=metrics)) as client:
            status, reply = await post(client, "/validate", review())
            assert status == 200
            response = reply["response"]
            assert response["uid"] == "3f1c-uid" and response["allowed"] is False
            assert "the webhook failed while checking this LoRAAutoscaler (RuntimeError: lookup exploded)" in (
                response["status"]["message"])
            assert metrics.admissions.labels("validate", v1.AUTOSCALER_KIND, "CREATE", "error")._value.get() == 1

    run(body)


def test_an_internal_failure_on_mutate_allows_without_a_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_req: Any) -> Any:
        raise KeyError("surprise")

    monkeypatch.setattr(server_module, "mutate", broken)

    async def body() -> None:
        async with client_for(create_app()) as client:
            status, reply = await post(client, "/mutate", review())
            assert status == 200
            response = reply["response"]
            assert response["allowed"] is True and "patch" not in response
            assert "could not apply defaults (KeyError: 'surprise')" in response["warnings"][0]

    run(body)


# --- health and metrics ------------------------------------------------------------------------------


def test_readyz_reports_why_it_is_not_ready() -> None:
    async def body() -> None:
        reasons: list[str] = ["the CA bundle is not published yet"]
        async with client_for(create_app(readiness=lambda: reasons)) as client:
            resp = await client.get("/readyz")
            assert resp.status == 503 and "the CA bundle is not published yet" in await resp.text()
            reasons.clear()
            assert (await client.get("/readyz")).status == 200

    run(body)


def test_metrics_count_admissions_by_kind_operation_and_result_on_their_own_app() -> None:
    async def body() -> None:
        metrics = WebhookMetrics()
        async with client_for(create_app(metrics=metrics)) as client:
            await post(client, "/validate", review())
            await post(client, "/validate", review(autoscaler(adapters=[{"name": "A", "source": "/m"}])))
            await post(client, "/mutate", review(operation="UPDATE", old=autoscaler()))
            await post(client, "/mutate", b"nope")
        async with client_for(create_metrics_app(metrics.registry)) as mclient:
            text = await (await mclient.get("/metrics")).text()
            assert ('lora_webhook_admissions_total{kind="LoRAAutoscaler",operation="CREATE",result="allowed",'
                    'webhook="validate"} 1.0') in text
            assert ('lora_webhook_admissions_total{kind="LoRAAutoscaler",operation="CREATE",result="denied",'
                    'webhook="validate"} 1.0') in text
            assert ('lora_webhook_admissions_total{kind="LoRAAutoscaler",operation="UPDATE",result="allowed",'
                    'webhook="mutate"} 1.0') in text
            assert 'lora_webhook_rejected_requests_total{code="400",webhook="mutate"} 1.0' in text
            assert 'lora_webhook_admission_duration_seconds_count{kind="LoRAAutoscaler",webhook="validate"} 2.0' in text
            assert (await mclient.post("/mutate", data=b"{}")).status in (404, 405)

    run(body)
