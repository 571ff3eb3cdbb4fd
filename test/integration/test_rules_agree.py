"""The webhook's rules (``api/validation.py``) and the API server's (the CRD's schema and CEL rules) agree.

The rules exist twice: as CEL and OpenAPI bounds in the CRD, which the API server enforces even when the
webhook is down, and in Python, which the webhook runs to explain every problem. This test sends the same
objects to both and compares the verdicts: hundreds of specs made by a seeded generator that sets fields
to values on and around every bound and rule, created with ``dryRun=All`` in a namespace the webhook is
not registered for (so only the API server decides), and checked by ``validate_autoscaler``.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from api import v1alpha1 as v1
from api.validation import validate_autoscaler, validate_autoscaler_update

pytestmark = pytest.mark.usefixtures("crds")

CASES = 400
PLURAL = "loraautoscalers"
ABSENT = object()  # a field left out


def base_spec() -> dict[str, Any]:
    return {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vllm"},
        "adapters": [
            {"name": "sql-lora", "source": "/models/sql", "minReplicas": 1, "maxReplicas": 3},
            {"name": "chat-lora", "source": "hf://acme/chat"},
        ],
        "vllm": {"maxLorasPerReplica": 4},
        "scaling": {"scaleUp": {"threshold": 4, "windowSeconds": 3},
                    "scaleDown": {"threshold": 1, "windowSeconds": 60}},
    }


#: Field paths (keys, or list indices) and values on both sides of their bounds and rules.
CHOICES: list[tuple[tuple[str | int, ...], list[Any]]] = [
    (("scaleTargetRef", "kind"), ["Deployment", "StatefulSet", "deployment", "", "A" * 64]),
    (("scaleTargetRef", "name"), ["vllm", "vllm.b", "Vllm", "", "-x", "a" * 253, "a" * 254]),
    (("scaleTargetRef", "apiVersion"), [ABSENT, "apps/v1", "v1", "Apps/v1", "apps/v1/x", "x.io/v1beta2"]),
    (("adapters", 0, "name"), ["sql-lora", "base", "chat-lora", "Sql", "a" * 63, "a" * 64, "-a", ""]),
    (("adapters", 0, "source"), ["/m", "hf://a/b", "s3://b/k", "ftp://x", "rel/path", "/with space", "file://"]),
    (("adapters", 0, "minReplicas"), [ABSENT, 0, 1, 3, 4, 10000, 10001, -1]),
    (("adapters", 0, "maxReplicas"), [ABSENT, 0, 1, 2, 3, 10000, 10001]),
    (("adapters", 1, "minReplicas"), [ABSENT, 0, 2]),
    (("adapters", 1, "maxReplicas"), [ABSENT, 1, 2]),
    (("vllm", "maxLorasPerReplica"), [ABSENT, 0, 1, 4, 8, 256, 257]),
    (("vllm", "maxCpuLorasPerReplica"), [ABSENT, 0, 1, 3, 4, 8, 256, 257]),
    (("vllm", "port"), [ABSENT, 0, 1, 8000, 65535, 65536]),
    (("vllm", "scheme"), [ABSENT, "http", "https", "grpc"]),
    (("vllm", "loadTimeoutSeconds"), [ABSENT, 0, 1, 3600, 3601]),
    (("vllm", "maxLoadAttempts"), [ABSENT, 0, 1, 100, 101]),
    (("placementMode",), [ABSENT, "strict", "preferred", "loose"]),
    (("scaling", "syncPeriodMilliseconds"), [ABSENT, 99, 100, 1000, 600000, 600001]),
    (("scaling", "scaleUp", "threshold"), [ABSENT, -1, 0, 1, 2, 4, 4.5, 1e6, 1e6 + 1]),
    (("scaling", "scaleDown", "threshold"), [ABSENT, -1, 0, 1, 3.9, 4, 5]),
    (("scaling", "scaleUp", "windowSeconds"), [ABSENT, -1, 0, 3, 60, 61, 86400, 86401]),
    (("scaling", "scaleDown", "windowSeconds"), [ABSENT, -1, 0, 2, 3, 60, 86400, 86401]),
    (("scaling", "scaleDown", "drainTimeoutSeconds"), [ABSENT, -1, 0, 3600, 3601]),
    (("scaling", "metric", "source"), [ABSENT, "combined", "router", "vllm", "waitingLoraAdapters", "prometheus",
                                       "statsd"]),
    (("scaling", "metric", "prometheus"), [ABSENT, {"url": "http://prometheus:9090"}, {"url": "prometheus"}, {}]),
    (("scaling", "metric", "routerUrl"), [ABSENT, "http://lora-router:9090", "lora-router:9090"]),
    (("scaling", "metric", "maxAgeSeconds"), [ABSENT, 0, 1, 86400, 86401]),
    (("podAutoscaling", "mode"), [ABSENT, "Off", "HPA", "ScaleTarget", "KEDA"]),
    (("podAutoscaling", "hpaName"), [ABSENT, "vllm-hpa", "Vllm", ""]),
    (("podAutoscaling", "maxReplicas"), [ABSENT, 0, 1, 10000, 10001]),
    (("podSelector", "matchLabels"), [ABSENT, {"app": "vllm"}, {}]),
    (("podSelector", "matchExpressions"), [
        ABSENT,
        [{"key": "app", "operator": "In", "values": ["vllm"]}],
        [{"key": "app", "operator": "In", "values": []}],
        [{"key": "app", "operator": "In"}],
        [{"key": "app", "operator": "Exists"}],
        [{"key": "app", "operator": "Exists", "values": ["x"]}],
        [{"key": "app", "operator": "Near", "values": ["x"]}],
    ]),
]


def put(spec: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    """Set ``path`` in ``spec`` (making the objects on the way), or remove it for ``ABSENT``."""
    here: Any = spec
    for key in path[:-1]:
        here = here[key] if isinstance(key, int) else here.setdefault(key, {})
    if value is ABSENT:
        here.pop(path[-1], None)
    else:
        here[path[-1]] = copy.deepcopy(value)


def generated_specs(count: int, seed: int = 20261127) -> list[dict[str, Any]]:
    """The valid base spec with one to four fields moved onto or past their bounds."""
    rng = random.Random(seed)
    specs = [base_spec()]
    for path, values in CHOICES:  # every value alone once
        for value in values:
            spec = base_spec()
            put(spec, path, value)
            specs.append(spec)
    while len(specs) < count:
        spec = base_spec()
        for path, values in rng.sample(CHOICES, rng.randint(1, 4)):
            put(spec, path, rng.choice(values))
        specs.append(spec)
    return specs


def server_verdict(create: Callable[[dict[str, Any]], Any], obj: dict[str, Any]) -> str:
    """"allowed", or the API server's reason for refusing the object."""
    try:
        create(obj)
    except ApiException as exc:
        if exc.status not in (400, 422):
            raise
        return f"refused ({exc.status}): {exc.body}"
    return "allowed"


def autoscaler(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": v1.API_VERSION, "kind": v1.AUTOSCALER_KIND, "metadata": {"name": name}, "spec": spec}


def test_the_webhook_and_the_api_server_give_the_same_verdict(api_client: ApiClient, namespace: str) -> None:
    objects = client.CustomObjectsApi(api_client)

    def create(obj: dict[str, Any]) -> Any:
        return objects.create_namespaced_custom_object(v1.GROUP, v1.VERSION, namespace, PLURAL, obj, dry_run="All")

    specs = generated_specs(CASES)
    disagreements = []
    refused = 0
    for index, spec in enumerate(specs):
        obj = autoscaler(f"case-{index}", spec)
        problems = validate_autoscaler(copy.deepcopy(obj))
        verdict = server_verdict(create, obj)
        refused += verdict != "allowed"
        if (verdict == "allowed") != (not problems):
            disagreements.append(f"case {index}: {spec}\n  webhook: {[str(p) for p in problems] or 'allowed'}\n"
                                 f"  API server: {verdict}")
    assert not disagreements, f"{len(disagreements)} of {len(specs)} disagree:\n" + "\n".join(disagreements[:10])
    # The generator must exercise both verdicts, or agreement says nothing.
    assert 0.2 * len(specs) < refused < 0.95 * len(specs), f"{refused} of {len(specs)} refused"


def test_an_update_of_the_scale_target_is_refused_by_both(api_client: ApiClient, namespace: str) -> None:
    objects = client.CustomObjectsApi(api_client)
    old = objects.create_namespaced_custom_object(v1.GROUP, v1.VERSION, namespace, PLURAL,
                                                  autoscaler("target", base_spec()))
    for new_name, allowed in (("vllm", True), ("other", False)):
        new = copy.deepcopy(old)
        new["spec"]["scaleTargetRef"]["name"] = new_name
        new["spec"]["adapters"][0]["maxReplicas"] = 2  # a change the rules allow
        problems = validate_autoscaler_update(copy.deepcopy(old), copy.deepcopy(new))
        verdict = server_verdict(lambda obj: objects.replace_namespaced_custom_object(
            v1.GROUP, v1.VERSION, namespace, PLURAL, "target", obj, dry_run="All"), new)
        assert (not problems) is allowed, problems
        assert (verdict == "allowed") is allowed, verdict
