"""Over 10,000 malformed or random AdmissionReview bodies against the real app: every answer is a 200 with a
decision for the request's uid, or a 4xx with a message; never a 5xx, a crash or an internal error.

One aiohttp test server serves the whole module on its own event loop; each example is one HTTP request.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api import v1alpha1 as v1
from api.crd import openapi_schema
from api.validation import TargetScale
from webhook.server import WebhookMetrics, create_app

REQUEST_SECONDS = 10.0
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))


class Harness:
    """The app on a private loop, with a synchronous ``post`` for hypothesis' synchronous tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.metrics = WebhookMetrics()

        class Lookup:
            async def read(self, namespace: str, api_version: str, kind: str, name: str) -> TargetScale:
                return TargetScale("found", replicas=len(name) % 4)

        self.client = TestClient(TestServer(create_app(lookup=Lookup(), metrics=self.metrics)), loop=self.loop)
        self.loop.run_until_complete(self.client.start_server())
        self.sent = 0

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
        async def go() -> tuple[int, bytes]:
            resp = await self.client.post(path, data=body, headers={"Content-Type": content_type})
            return resp.status, await resp.read()

        self.sent += 1
        return self.loop.run_until_complete(asyncio.wait_for(go(), REQUEST_SECONDS))

    def internal_errors(self) -> float:
        total = 0.0
        for metric in self.metrics.admissions.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels.get("result") == "error":
                    total += sample.value
        return total

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
        assert h.internal_errors() == 0, "random input reached the catch-all: a rule raised"
        assert h.sent >= 10_000, f"only {h.sent} bodies were sent"
    finally:
        h.close()


def check(status: int, raw: bytes, sent: Any) -> None:
    """The contract: 200 with a decision for this uid, or a 4xx carrying a message."""
    assert status < 500, raw[:500]
    doc = orjson.loads(raw)
    if status == 200:
        assert doc["apiVersion"] == "admission.k8s.io/v1" and doc["kind"] == "AdmissionReview"
        response = doc["response"]
        assert isinstance(response["allowed"], bool)
        if isinstance(sent, dict) and isinstance(sent.get("request"), dict):
            assert response["uid"] == sent["request"]["uid"]
        if not response["allowed"]:
            assert response["status"]["message"].strip()
        else:
            assert "error" not in str(response.get("warnings", ""))
    else:
        assert 400 <= status < 500
        assert doc["kind"] == "Status" and doc["message"].strip()


def send(harness: Harness, path: str, doc: Any) -> None:
    raw = orjson.dumps(doc)
    status, body = harness.post(path, raw)
    check(status, body, doc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)  # fmt: skip
#: Cheap stand-ins for "any JSON value" inside schema-shaped objects (generation cost dominates otherwise).
junk: st.SearchStrategy[Any] = st.sampled_from([
    None, True, False, 0, -1, 1.5, 2**63 - 1, -(2**63), 1e300, "", "x", "ä\u0000", [], {}, [None], {"a": 1}, [[[]]],
    {"": {"": None}},
])
paths = st.sampled_from(["/mutate", "/validate"])
GVKS = [
    {"group": v1.GROUP, "version": v1.VERSION, "kind": v1.AUTOSCALER_KIND},
    {"group": v1.GROUP, "version": v1.VERSION, "kind": v1.PLACEMENT_KIND},
]
gvks = st.sampled_from(GVKS) | st.fixed_dictionaries(
    {"group": st.sampled_from([v1.GROUP, "apps", ""]), "version": st.sampled_from([v1.VERSION, "v1", "v2"]),
     "kind": st.sampled_from([v1.AUTOSCALER_KIND, v1.PLACEMENT_KIND, "Pod", ""])}
)  # fmt: skip
operations = st.sampled_from(["CREATE", "UPDATE", "DELETE", "CONNECT"])
uids = st.text(min_size=1, max_size=40)


def shaped(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Objects shaped like the schema: each field present or not, and sometimes any JSON value instead."""
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        fields = {k: shaped(v) for k, v in schema["properties"].items()}
        inner: st.SearchStrategy[Any] = st.fixed_dictionaries({}, optional=fields)
    elif kind == "array":
        inner = st.lists(shaped(schema["items"]), max_size=3)
    elif kind == "integer":
        inner = st.integers(-3, 300) | st.sampled_from([0, 1, 2, 10_000, 10_001, 2**40])
    elif kind == "number":
        inner = st.floats(-2, 2e6, allow_nan=False)
    elif kind == "boolean":
        inner = st.booleans()
    elif "enum" in schema:
        inner = st.sampled_from(schema["enum"]) | st.text(max_size=6)
    else:
        inner = st.sampled_from(["", "vllm", "Deployment", "apps/v1", "/m", "hf://a/b", "ftp://x", "A_b", "a" * 70]) \
            | st.text(max_size=10)
    return st.one_of(inner, inner, inner, junk)


AUTOSCALER_SPEC = shaped(openapi_schema(v1.AUTOSCALER_KIND)["properties"]["spec"])
PLACEMENT_SPEC = shaped(openapi_schema(v1.PLACEMENT_KIND)["properties"]["spec"])


@settings(FUZZ, max_examples=2500)
@given(path=paths, body=st.binary(max_size=300), content_type=st.sampled_from(
    ["application/json", "text/plain", "", "application/json; charset=utf-8", "application/yaml"]))
def test_random_bytes(harness: Harness, path: str, body: bytes, content_type: str) -> None:
    status, raw = harness.post(path, body, content_type)
    check(status, raw, None)


@settings(FUZZ, max_examples=2000)
@given(path=paths, doc=json_values)
def test_random_json(harness: Harness, path: str, doc: Any) -> None:
    send(harness, path, doc)


@settings(FUZZ, max_examples=2000)
@given(
    path=paths,
    api_version=st.sampled_from(["admission.k8s.io/v1", "admission.k8s.io/v1beta1"]) | json_values,
    kind=st.sampled_from(["AdmissionReview"]) | json_values,
    request=st.fixed_dictionaries({}, optional={
        "uid": uids | json_values, "kind": gvks | json_values, "operation": operations | json_values,
        "namespace": st.text(max_size=10) | json_values, "name": st.text(max_size=10) | json_values,
        "object": json_values, "oldObject": json_values, "dryRun": st.booleans() | json_values,
        "subResource": st.sampled_from(["", "status", "scale"]) | json_values,
    }) | json_values,
)  # fmt: skip
def test_random_envelopes(harness: Harness, path: str, api_version: Any, kind: Any, request: Any) -> None:
    send(harness, path, {"apiVersion": api_version, "kind": kind, "request": request})


def _review(uid: str, gvk: dict[str, str], operation: str, obj: Any, *, old: Any, dry_run: bool) -> dict[str, Any]:
    request = {"uid": uid, "kind": gvk, "operation": operation, "namespace": "ns", "name": "x", "object": obj,
               "dryRun": dry_run}
    if operation == "UPDATE":
        request["oldObject"] = old
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


@settings(FUZZ, max_examples=2000)
@given(
    path=paths, uid=uids, placement=st.booleans(), operation=st.sampled_from(["CREATE", "UPDATE"]),
    spec=AUTOSCALER_SPEC, pspec=PLACEMENT_SPEC, old_spec=AUTOSCALER_SPEC, dry_run=st.booleans(),
    metadata=st.fixed_dictionaries({}, optional={"name": st.text(max_size=10) | json_values,
                                                 "generateName": junk}) | junk,
)  # fmt: skip
def test_schema_shaped_objects(  # noqa: PLR0917
    harness: Harness, path: str, uid: str, placement: bool, operation: str, spec: Any,
    pspec: Any, old_spec: Any, dry_run: bool, metadata: Any,
) -> None:
    gvk = GVKS[1] if placement else GVKS[0]
    obj = {"apiVersion": v1.API_VERSION, "kind": gvk["kind"], "metadata": metadata,
           "spec": pspec if placement else spec}
    old = {"metadata": {"name": "x"}, "spec": pspec if placement else old_spec}
    send(harness, path, _review(uid, gvk, operation, obj, old=old, dry_run=dry_run))


VALID_SPEC = {
    "scaleTargetRef": {"kind": "Deployment", "name": "vllm"},
    "adapters": [{"name": "a", "source": "/m", "minReplicas": 2, "maxReplicas": 3}, {"name": "b", "source": "hf://x/y"}],
    "vllm": {"maxLorasPerReplica": 2, "maxCpuLorasPerReplica": 4},
    "scaling": {"scaleUp": {"threshold": 3, "windowSeconds": 5}, "scaleDown": {"threshold": 1, "windowSeconds": 60}},
    "podAutoscaling": {"mode": "ScaleTarget", "maxReplicas": 4},
}


def _leaf_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _leaf_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _leaf_paths(v, (*prefix, i))
    return out


SPOTS = _leaf_paths(VALID_SPEC)


@settings(FUZZ, max_examples=1500)
@given(path=paths, spots=st.lists(st.sampled_from(SPOTS), min_size=1, max_size=3), values=st.lists(json_values,
       min_size=3, max_size=3), operation=st.sampled_from(["CREATE", "UPDATE"]))  # fmt: skip
def test_one_valid_object_with_fields_replaced(harness: Harness, path: str, spots: list[tuple[Any, ...]],
                                               values: list[Any], operation: str) -> None:
    spec: Any = copy.deepcopy(VALID_SPEC)
    for spot, value in zip(spots, values, strict=False):
        parent = spec
        try:
            for key in spot[:-1]:
                parent = parent[key]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier replacement removed this spot
        key = spot[-1]
        fits = isinstance(parent, dict) if isinstance(key, str) else isinstance(parent, list) and key < len(parent)
        if fits:
            parent[key] = value
    obj = {"apiVersion": v1.API_VERSION, "kind": v1.AUTOSCALER_KIND, "metadata": {"name": "x"}, "spec": spec}
    send(harness, path, _review("u", GVKS[0], operation, obj, old={"spec": VALID_SPEC}, dry_run=False))
