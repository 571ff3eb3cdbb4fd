"""The rules of api.validation and the defaults of api.defaulting: each rule at its boundary, every manifest
kept in test/manifests, and agreement with the CRD (schema validators and structural defaulting)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api import v1alpha1 as v1
from api.crd import openapi_schema
from api.defaulting import apply_defaults, defaulting_patch
from api.validation import (
    MAX_DEPTH,
    MAX_LISTED,
    Problem,
    TargetScale,
    _fast_validator,
    admission_schema,
    autoscaler_warnings,
    format_problems,
    nesting_depth,
    scale_target_ref,
    schema_problems,
    validate,
    validate_autoscaler,
    validate_autoscaler_update,
    validate_placement,
    validate_placement_update,
)

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
AS = v1.AUTOSCALER_KIND


def autoscaler(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "scaleTargetRef": {"kind": "Deployment", "name": "vllm"},
        "adapters": [{"name": "sql-lora", "source": "/models/sql"}],
    }
    base.update(spec)
    return {"apiVersion": v1.API_VERSION, "kind": AS, "metadata": {"name": "demo", "namespace": "ns"}, "spec": base}


def placement(**spec: Any) -> dict[str, Any]:
    base = {"autoscaler": "demo", "adapter": "sql-lora", "source": "/m", "podName": "vllm-0", "podUid": "u-1"}
    base.update(spec)
    return {"apiVersion": v1.API_VERSION, "kind": v1.PLACEMENT_KIND, "metadata": {"name": "p"}, "spec": base}


def paths(problems: list[Problem]) -> list[str]:
    return [p.path for p in problems]


def messages(problems: list[Problem]) -> str:
    return format_problems(AS, "demo", problems)


# --- the manifests users and the integration test apply ----------------------------------------------


def _manifest(path: Path) -> tuple[dict[str, Any], list[str], list[str]]:
    text = path.read_text()
    expects = [line.split("# expect: ", 1)[1] for line in text.splitlines() if line.startswith("# expect: ")]
    warns = [line.split("# warn: ", 1)[1] for line in text.splitlines() if line.startswith("# warn: ")]
    return yaml.safe_load(text), expects, warns


INVALID = sorted((MANIFESTS / "invalid").glob("*.yaml"))
VALID = sorted((MANIFESTS / "valid").glob("*.yaml"))


def test_there_are_enough_manifests() -> None:
    assert len(INVALID) >= 15
    assert len(VALID) >= 4


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_each_invalid_manifest_is_denied_with_its_message(path: Path) -> None:
    obj, expects, _ = _manifest(path)
    assert expects, f"{path.name} says nothing about what it expects"
    problems = validate(obj["kind"], obj)
    text = format_problems(obj["kind"], obj["metadata"]["name"], problems)
    for expected in expects:
        assert expected in text


@pytest.mark.parametrize("path", VALID, ids=[p.stem for p in VALID])
def test_each_valid_manifest_passes_with_its_warnings(path: Path) -> None:
    obj, _, warns = _manifest(path)
    assert validate(obj["kind"], obj) == []
    if obj["kind"] == AS:
        got = autoscaler_warnings(obj)
        assert len(got) == len(warns)
        for expected in warns:
            assert any(expected in w for w in got), (expected, got)


# --- each rule at its boundary -----------------------------------------------------------------------


def test_a_minimal_object_is_valid() -> None:
    assert validate_autoscaler(autoscaler()) == []


@pytest.mark.parametrize(("value", "ok"), [(0, False), (1, True), (10_000, True), (10_001, False), (-1, False)])
def test_min_replicas_is_at_least_one(value: int, ok: bool) -> None:
    problems = validate_autoscaler(autoscaler(adapters=[{"name": "a", "source": "/m", "minReplicas": value}]))
    assert (problems == []) is ok
    if not ok:
        assert paths(problems) == ["spec.adapters[0].minReplicas"]


@pytest.mark.parametrize(("low", "high", "ok"), [(2, 1, False), (2, 2, True), (2, 3, True), (1, 1, True)])
def test_max_replicas_is_at_least_min_replicas(low: int, high: int, ok: bool) -> None:
    problems = validate_autoscaler(
        autoscaler(adapters=[{"name": "a", "source": "/m", "minReplicas": low, "maxReplicas": high}])
    )
    assert (problems == []) is ok
    if not ok:
        assert problems == [Problem("spec.adapters[0].maxReplicas", "must be at least minReplicas (2), got 1: raise "
                                    "maxReplicas or lower minReplicas")]


def test_max_replicas_rule_uses_the_default_min() -> None:
    # minReplicas absent means 1, so maxReplicas 1 is fine and 0 is a bound violation, not a cross-field one.
    assert validate_autoscaler(autoscaler(adapters=[{"name": "a", "source": "/m", "maxReplicas": 1}])) == []
    problems = validate_autoscaler(autoscaler(adapters=[{"name": "a", "source": "/m", "maxReplicas": 0}]))
    # One message per field: the cross-field rule says what to do, so the bare bound is not repeated.
    assert paths(problems) == ["spec.adapters[0].maxReplicas"]
    assert "must be at least minReplicas (1), got 0" in messages(problems)


@pytest.mark.parametrize(("value", "ok"), [(0, False), (1, True), (256, True), (257, False)])
def test_max_loras_per_replica_is_bounded(value: int, ok: bool) -> None:
    problems = validate_autoscaler(autoscaler(vllm={"maxLorasPerReplica": value}))
    assert (problems == []) is ok
    if not ok:
        assert paths(problems) == ["spec.vllm.maxLorasPerReplica"]


@pytest.mark.parametrize(("loras", "cpu", "ok"), [(4, 3, False), (4, 4, True), (4, 8, True), (8, None, True)])
def test_max_loras_is_at_most_max_cpu_loras_when_set(loras: int, cpu: int | None, ok: bool) -> None:
    vllm: dict[str, Any] = {"maxLorasPerReplica": loras}
    if cpu is not None:
        vllm["maxCpuLorasPerReplica"] = cpu
    problems = validate_autoscaler(autoscaler(vllm=vllm))
    assert (problems == []) is ok
    if not ok:
        assert paths(problems) == ["spec.vllm.maxCpuLorasPerReplica"]


def test_max_cpu_loras_against_the_default_max_loras_says_so() -> None:
    problems = validate_autoscaler(autoscaler(vllm={"maxCpuLorasPerReplica": 2}))
    assert "must be at least spec.vllm.maxLorasPerReplica (4, the default), got 2" in messages(problems)


@pytest.mark.parametrize(
    ("down", "up", "ok"), [(1.0, 1.0, False), (1.5, 1.0, False), (0.99, 1.0, True), (0, 0.01, True)]
)
def test_scale_down_threshold_is_strictly_below_scale_up(down: float, up: float, ok: bool) -> None:
    scaling = {"scaleUp": {"threshold": up}, "scaleDown": {"threshold": down}}
    problems = validate_autoscaler(autoscaler(scaling=scaling))
    assert (problems == []) is ok
    if not ok:
        assert paths(problems) == ["spec.scaling.scaleDown.threshold"]
        assert "hysteresis" in problems[0].message


@pytest.mark.parametrize(("down", "up", "ok"), [(59, 60, False), (60, 60, True), (0, 0, True), (0, 1, False)])
def test_scale_down_window_is_at_least_scale_up_window(down: int, up: int, ok: bool) -> None:
    problems = validate_autoscaler(
        autoscaler(scaling={"scaleUp": {"windowSeconds": up}, "scaleDown": {"windowSeconds": down}})
    )
    assert (problems == []) is ok
    if not ok:
        assert paths(problems) == ["spec.scaling.scaleDown.windowSeconds"]


@pytest.mark.parametrize(
    ("scaling", "path"),
    [
        ({"scaleUp": {"threshold": -0.5}}, "spec.scaling.scaleUp.threshold"),
        ({"scaleUp": {"threshold": 2e6}}, "spec.scaling.scaleUp.threshold"),
        ({"scaleUp": {"windowSeconds": -1}}, "spec.scaling.scaleUp.windowSeconds"),
        ({"scaleDown": {"windowSeconds": 86_401}}, "spec.scaling.scaleDown.windowSeconds"),
        ({"scaleDown": {"drainTimeoutSeconds": -1}}, "spec.scaling.scaleDown.drainTimeoutSeconds"),
        ({"scaleDown": {"drainTimeoutSeconds": 3601}}, "spec.scaling.scaleDown.drainTimeoutSeconds"),
        ({"syncPeriodMilliseconds": 99}, "spec.scaling.syncPeriodMilliseconds"),
        ({"metric": {"maxAgeSeconds": 0}}, "spec.scaling.metric.maxAgeSeconds"),
    ],
)
def test_thresholds_windows_and_timeouts_are_non_negative_and_bounded(scaling: dict[str, Any], path: str) -> None:
    problems = validate_autoscaler(autoscaler(scaling=scaling))
    assert path in paths(problems)


def test_vllm_timeouts_are_bounded() -> None:
    problems = validate_autoscaler(autoscaler(vllm={"loadTimeoutSeconds": 0, "maxLoadAttempts": 101, "port": 70000}))
    assert paths(problems) == ["spec.vllm.port", "spec.vllm.loadTimeoutSeconds", "spec.vllm.maxLoadAttempts"]


def test_adapter_names_are_unique_and_each_duplicate_is_named() -> None:
    adapters = [{"name": n, "source": "/m"} for n in ("a", "b", "a", "a")]
    problems = validate_autoscaler(autoscaler(adapters=adapters))
    assert paths(problems) == ["spec.adapters[2].name", "spec.adapters[3].name"]
    assert all("already used by spec.adapters[0]" in p.message for p in problems)


@pytest.mark.parametrize(
    ("name", "ok"),
    [("a", True), ("sql-lora-2", True), ("a" * 63, True), ("a" * 64, False), ("Sql", False), ("-a", False),
     ("a-", False), ("a_b", False), ("a.b", False), ("", False)],
)  # fmt: skip
def test_adapter_names_are_dns_labels(name: str, ok: bool) -> None:
    problems = validate_autoscaler(autoscaler(adapters=[{"name": name, "source": "/m"}]))
    assert (problems == []) is ok
    if not ok:
        assert set(paths(problems)) == {"spec.adapters[0].name"}


@pytest.mark.parametrize(
    ("source", "advice"),
    [
        ("/models/x", None), ("file:///models/x", None), ("hf://org/repo", None), ("s3://b/k", None),
        ("gs://b/k", None), ("oci://reg/img:tag", None), ("https://h/x", None), ("http://h/x", None),
        ("ftp://h/x", "unknown scheme 'ftp://'"), ("HF://org/repo", "unknown scheme 'HF://'"),
        ("models/x", "a local path must be absolute"), ("/models/my adapter", "must not contain whitespace"),
        ("hf://", "followed by a path"), ("", "a local path must be absolute"),
    ],
)  # fmt: skip
def test_sources_need_a_known_scheme(source: str, advice: str | None) -> None:
    problems = validate_autoscaler(autoscaler(adapters=[{"name": "a", "source": source}]))
    if advice is None:
        assert problems == []
    else:
        assert paths(problems) == ["spec.adapters[0].source"]
        assert advice in problems[0].message


@pytest.mark.parametrize(
    ("pa", "path"),
    [
        ({"mode": "HPA"}, "spec.podAutoscaling.hpaName"),
        ({"mode": "HPA", "hpaName": "Bad_Name"}, "spec.podAutoscaling.hpaName"),
        ({"mode": "ScaleTarget"}, "spec.podAutoscaling.maxReplicas"),
        ({"mode": "ScaleTarget", "maxReplicas": 0}, "spec.podAutoscaling.maxReplicas"),
        ({"mode": "Sometimes"}, "spec.podAutoscaling.mode"),
    ],
)
def test_pod_autoscaling_is_consistent(pa: dict[str, Any], path: str) -> None:
    assert paths(validate_autoscaler(autoscaler(podAutoscaling=pa))) == [path]


@pytest.mark.parametrize("pa", [{"mode": "HPA", "hpaName": "vllm"}, {"mode": "ScaleTarget", "maxReplicas": 4}, {}])
def test_consistent_pod_autoscaling_passes(pa: dict[str, Any]) -> None:
    assert validate_autoscaler(autoscaler(podAutoscaling=pa)) == []


def test_prometheus_source_needs_a_server() -> None:
    problems = validate_autoscaler(autoscaler(scaling={"metric": {"source": "prometheus"}}))
    assert paths(problems) == ["spec.scaling.metric.prometheus"]
    ok = autoscaler(scaling={"metric": {"source": "prometheus", "prometheus": {"url": "http://p:9090"}}})
    assert validate_autoscaler(ok) == []
    bad_url = autoscaler(scaling={"metric": {"source": "prometheus", "prometheus": {"url": "p:9090"}}})
    assert paths(validate_autoscaler(bad_url)) == ["spec.scaling.metric.prometheus.url"]


@pytest.mark.parametrize(
    ("ref", "path"),
    [
        ({"name": "vllm"}, "spec.scaleTargetRef.kind"),
        ({"kind": "Deployment"}, "spec.scaleTargetRef.name"),
        ({"kind": "Deployment", "name": ""}, "spec.scaleTargetRef.name"),
        ({"kind": "deployment.apps", "name": "vllm"}, "spec.scaleTargetRef.kind"),
        ({"kind": "Deployment", "name": "VLLM"}, "spec.scaleTargetRef.name"),
        ({"kind": "Deployment", "name": "vllm", "apiVersion": "apps"}, "spec.scaleTargetRef.apiVersion"),
        ({"kind": "Deployment", "name": "vllm", "apiVersion": "Apps/V1"}, "spec.scaleTargetRef.apiVersion"),
    ],
)
def test_scale_target_ref_is_well_formed(ref: dict[str, Any], path: str) -> None:
    assert paths(validate_autoscaler(autoscaler(scaleTargetRef=ref))) == [path]


@pytest.mark.parametrize("api_version", ["apps/v1", "v1", "leaderworkerset.x-k8s.io/v1", "inference.llmaz.io/v1alpha1"])
def test_scale_target_api_versions_that_exist_pass(api_version: str) -> None:
    ref = {"kind": "Playground", "name": "llama", "apiVersion": api_version}
    assert validate_autoscaler(autoscaler(scaleTargetRef=ref)) == []


def test_selector_operators_need_the_right_values() -> None:
    exprs = [
        {"key": "a", "operator": "In"},
        {"key": "b", "operator": "NotIn", "values": []},
        {"key": "c", "operator": "Exists", "values": ["x"]},
        {"key": "d", "operator": "DoesNotExist"},
        {"key": "e", "operator": "In", "values": ["x"]},
    ]
    problems = validate_autoscaler(autoscaler(podSelector={"matchExpressions": exprs}))
    assert paths(problems) == [f"spec.podSelector.matchExpressions[{i}].values" for i in (0, 1, 2)]


def test_every_problem_is_listed_at_once_with_its_path() -> None:
    obj = autoscaler(
        adapters=[{"name": "A", "source": "ftp://x", "minReplicas": 0}, {"name": "A", "source": "/m"}],
        vllm={"maxLorasPerReplica": 0},
        scaling={"scaleUp": {"threshold": 1}, "scaleDown": {"windowSeconds": 1}},
        podAutoscaling={"mode": "HPA"},
    )
    found = paths(validate_autoscaler(obj))
    assert found == [
        "spec.adapters[0].name", "spec.adapters[0].source", "spec.adapters[0].minReplicas",
        "spec.vllm.maxLorasPerReplica", "spec.adapters[1].name", "spec.scaling.scaleDown.threshold",
        "spec.scaling.scaleDown.windowSeconds", "spec.podAutoscaling.hpaName",
    ]  # fmt: skip


def test_wrong_types_are_named_and_do_not_break_the_other_rules() -> None:
    obj = autoscaler(adapters="sql-lora", vllm={"maxLorasPerReplica": "4"}, scaling={"scaleUp": True})
    problems = validate_autoscaler(obj)
    assert paths(problems) == ["spec.adapters", "spec.vllm.maxLorasPerReplica", "spec.scaling.scaleUp"]
    assert 'must be a list (got string "sql-lora")' in problems[0].message
    assert "must be an integer" in problems[1].message
    assert "must be an object" in problems[2].message


def test_bool_is_not_a_number() -> None:
    assert paths(validate_autoscaler(autoscaler(vllm={"maxLorasPerReplica": True}))) == ["spec.vllm.maxLorasPerReplica"]


def test_nulls_count_as_absent_like_the_api_server_prunes_them() -> None:
    obj = autoscaler(vllm=None, scaling={"scaleUp": None, "metric": {"routerUrl": None}})
    obj["spec"]["adapters"][0]["maxReplicas"] = None
    assert validate_autoscaler(obj) == []


def test_status_and_metadata_contents_are_not_walked() -> None:
    deep: Any = "x"
    for _ in range(5000):
        deep = {"a": deep}
    obj = autoscaler()
    obj["status"] = {"replicas": "many", "conditions": deep}
    obj["metadata"]["managedFields"] = [deep]
    assert validate_autoscaler(obj) == []
    assert paths(validate_autoscaler({**obj, "metadata": "x"})) == ["metadata"]


def test_non_objects_and_missing_spec_are_problems_not_crashes() -> None:
    assert paths(validate_autoscaler([])) == ["<object>"]
    assert paths(validate_autoscaler({})) == ["spec"]
    assert paths(validate_autoscaler({"spec": None})) == ["spec"]
    assert paths(validate_autoscaler({"spec": []})) == ["spec"]
    assert paths(validate_placement("x")) == ["<object>"]


def test_deep_nesting_is_refused_without_recursion() -> None:
    deep: Any = "x"
    for _ in range(5000):
        deep = [deep]
    obj = autoscaler(podSelector={"matchLabels": deep})
    assert nesting_depth(obj) > MAX_DEPTH
    problems = validate_autoscaler(obj)
    assert paths(problems) == ["spec"] and "nest more than" in problems[0].message
    assert validate_autoscaler_update(obj, obj) == problems
    assert autoscaler_warnings(obj) == []


def test_huge_lists_are_capped_in_the_message() -> None:
    adapters = [{"name": f"A{i}", "source": "/m"} for i in range(1000)]
    problems = validate_autoscaler(autoscaler(adapters=adapters))
    text = messages(problems)
    assert f"and {len(problems) - MAX_LISTED} more" in text
    assert text.count("spec.adapters[") == MAX_LISTED


# --- updates -----------------------------------------------------------------------------------------


def test_scale_target_is_immutable() -> None:
    old = autoscaler()
    new = autoscaler(scaleTargetRef={"kind": "StatefulSet", "name": "vllm"})
    problems = validate_autoscaler_update(old, new)
    assert paths(problems) == ["spec.scaleTargetRef"]
    assert "was Deployment vllm (apps/v1), now StatefulSet vllm (apps/v1)" in problems[0].message


def test_spelling_out_the_default_api_version_is_not_a_change() -> None:
    old = autoscaler()
    new = autoscaler(scaleTargetRef={"kind": "Deployment", "name": "vllm", "apiVersion": "apps/v1"},
                     vllm={"maxLorasPerReplica": 8})
    assert validate_autoscaler_update(old, new) == []


def test_updates_run_the_same_rules_on_the_new_object() -> None:
    new = autoscaler(adapters=[{"name": "a", "source": "/m", "minReplicas": 0}])
    assert paths(validate_autoscaler_update(autoscaler(), new)) == ["spec.adapters[0].minReplicas"]


def test_an_update_that_keeps_the_spec_is_allowed_even_if_rules_tightened_since() -> None:
    stored = autoscaler(adapters=[{"name": "a", "source": "ftp://legacy/x"}])
    relabelled = copy.deepcopy(stored)
    relabelled["metadata"]["finalizers"] = []
    relabelled["metadata"]["labels"] = {"team": "x"}
    assert validate_autoscaler_update(stored, relabelled) == []
    touched = copy.deepcopy(stored)
    touched["spec"]["vllm"] = {"maxLorasPerReplica": 2}
    assert paths(validate_autoscaler_update(stored, touched)) == ["spec.adapters[0].source"]


def test_a_target_fixed_from_an_invalid_one_is_not_called_immutable() -> None:
    old = autoscaler(scaleTargetRef={"kind": "Deployment"})
    assert validate_autoscaler_update(old, autoscaler()) == []


def test_placement_identity_is_immutable_but_retire_and_preferred_change() -> None:
    old = placement()
    assert validate_placement_update(old, placement(retire=True, preferred=False)) == []
    problems = validate_placement_update(old, placement(podName="vllm-1", podUid="u-2"))
    assert paths(problems) == ["spec.podName", "spec.podUid"]


def test_placement_rules() -> None:
    assert validate_placement(placement()) == []
    assert paths(validate_placement(placement(adapter="Bad"))) == ["spec.adapter"]
    assert paths(validate_placement(placement(podUid=""))) == ["spec.podUid"]
    missing = placement()
    del missing["spec"]["podName"]
    assert paths(validate_placement(missing)) == ["spec.podName"]


def test_validate_refuses_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        validate("Pod", {})


# --- warnings ----------------------------------------------------------------------------------------


def test_capacity_warning_when_minimum_replicas_cannot_fit() -> None:
    adapters = [{"name": f"a{i}", "source": "/m", "minReplicas": 2} for i in range(5)]  # 10 copies
    obj = autoscaler(adapters=adapters, vllm={"maxLorasPerReplica": 4})
    assert autoscaler_warnings(obj, TargetScale("found", replicas=4)) == []  # 16 slots, 6 free
    warns = autoscaler_warnings(obj, TargetScale("found", replicas=2))  # 8 slots
    assert warns == ["spec.adapters: their minReplicas add up to 10 but Deployment vllm has 2 replicas x "
                     "maxLorasPerReplica 4 = 8 slots; add replicas, raise maxLorasPerReplica, or lower minReplicas"]


def test_capacity_in_preferred_mode_counts_cpu_loras() -> None:
    adapters = [{"name": f"a{i}", "source": "/m"} for i in range(6)]
    obj = autoscaler(adapters=adapters, placementMode="preferred", vllm={"maxLorasPerReplica": 2,
                                                                         "maxCpuLorasPerReplica": 6})
    assert autoscaler_warnings(obj, TargetScale("found", replicas=2)) == []  # 12 slots, 6 free
    strict = autoscaler(adapters=adapters, placementMode="strict",
                        vllm={"maxLorasPerReplica": 2, "maxCpuLorasPerReplica": 6})
    assert "add up to 6 but Deployment vllm has 2 replicas x maxLorasPerReplica 2 = 4 slots" in \
        autoscaler_warnings(strict, TargetScale("found", replicas=2))[0]


def test_an_adapter_wanting_more_replicas_than_exist_is_warned() -> None:
    obj = autoscaler(adapters=[{"name": "a", "source": "/m", "minReplicas": 3}], vllm={"maxLorasPerReplica": 8})
    assert autoscaler_warnings(obj, TargetScale("found", replicas=2)) == [
        "spec.adapters[0].minReplicas: 3 is more than the 2 replicas of Deployment vllm (one copy per replica at most)"
    ]


def test_target_states_become_warnings() -> None:
    obj = autoscaler()
    assert autoscaler_warnings(obj, TargetScale("missing")) == [
        "spec.scaleTargetRef: Deployment vllm does not exist yet; adapters are placed once it has replicas"
    ]
    unknown = autoscaler_warnings(obj, TargetScale("unknown", detail="timed out"))
    assert unknown == ["spec.scaleTargetRef: could not read the replicas of Deployment vllm, so the adapters' "
                       "capacity was not checked: timed out"]
    assert "has 0 replicas" in autoscaler_warnings(obj, TargetScale("found", replicas=0))[0]
    assert autoscaler_warnings(obj, None) == []


@pytest.mark.parametrize(("period", "warned"), [(5000, False), (5001, True), (100, False)])
def test_sync_period_above_five_seconds_is_warned(period: int, warned: bool) -> None:
    warns = autoscaler_warnings(autoscaler(scaling={"syncPeriodMilliseconds": period}))
    assert bool(warns) is warned


@pytest.mark.parametrize(("adapters", "mode", "cpu", "warned"), [
    (8, "preferred", None, True),  # 8 minimums in 2 x 4 slots: nothing free
    (7, "preferred", None, True),  # one free slot for two replicas
    (6, "preferred", None, False),  # one free slot per replica
    (8, "preferred", 8, False),  # a CPU cache of 8: 16 slots
    (8, "strict", 8, True),  # strict mode counts --max-loras only
])
def test_too_little_room_to_scale_is_warned_with_advice_for_the_mode(adapters: int, mode: str, cpu: int | None,
                                                                      warned: bool) -> None:
    vllm: dict[str, Any] = {"maxLorasPerReplica": 4}
    if cpu is not None:
        vllm["maxCpuLorasPerReplica"] = cpu
    obj = autoscaler(adapters=[{"name": f"a{i}", "source": "/m"} for i in range(adapters)], placementMode=mode,
                     vllm=vllm)
    warns = autoscaler_warnings(obj, TargetScale("found", replicas=2))
    assert bool(warns) is warned, warns
    if warned:
        assert warns[0].startswith(f"spec.adapters: their minReplicas take {adapters} of the 8 slots of Deployment "
                                   "vllm (2 replicas x maxLorasPerReplica 4), less than one free slot per replica")
        assert ("--max-cpu-loras" in warns[0]) and (("placementMode preferred" in warns[0]) is (mode == "strict"))
    assert autoscaler_warnings(obj, None) == []  # without the target's replicas nothing is said


def test_scale_target_ref_only_when_usable() -> None:
    assert scale_target_ref(autoscaler()) == ("apps/v1", "Deployment", "vllm")
    assert scale_target_ref(autoscaler(scaleTargetRef={"kind": "Deployment"})) is None
    assert scale_target_ref(autoscaler(scaleTargetRef={"kind": "Deployment", "name": "../x"})) is None
    assert scale_target_ref({"spec": "x"}) is None


# --- defaults ----------------------------------------------------------------------------------------


def apply_patch(obj: Any, ops: Sequence[Mapping[str, Any]]) -> Any:
    """RFC 6902 ``add`` (the only operation defaulting emits), written independently of api.defaulting."""
    out = copy.deepcopy(obj)
    for op in ops:
        assert op["op"] == "add"
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
        parent = out
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        last = tokens[-1]
        if isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
        else:
            parent[last] = copy.deepcopy(op["value"])
    return out


def structural_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Kubernetes structural-schema defaulting, from the CRD's OpenAPI schema (the API server's algorithm)."""
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties", {})
        out = dict(value)
        for name, sub in props.items():
            if out.get(name) is None and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = structural_defaults(sub, out[name])
        return out
    if isinstance(value, list) and schema.get("type") == "array":
        return [structural_defaults(schema["items"], v) for v in value]
    return value


def test_defaults_come_from_the_dataclasses() -> None:
    out = apply_defaults(AS, autoscaler())
    assert out["spec"]["vllm"]["maxLorasPerReplica"] == v1.VLLMEndpoint().max_loras_per_replica
    assert out["spec"]["scaling"]["scaleUp"]["threshold"] == v1.ScaleUpPolicy().threshold
    assert out["spec"]["adapters"][0]["minReplicas"] == 1
    assert out["spec"]["scaleTargetRef"]["apiVersion"] == "apps/v1"
    assert "maxCpuLorasPerReplica" not in out["spec"]["vllm"]  # no default: the controller reads absent as maxLoras
    assert "status" not in out


def test_the_patch_is_deterministic_idempotent_and_gives_the_defaulted_object() -> None:
    obj = autoscaler(scaling={"scaleUp": {"threshold": 9}}, vllm={"port": 8080})
    ops = defaulting_patch(AS, obj)
    assert ops == defaulting_patch(AS, copy.deepcopy(obj))
    patched = apply_patch(obj, list(ops))
    assert patched == apply_defaults(AS, obj)
    assert defaulting_patch(AS, patched) == []
    assert patched["spec"]["scaling"]["scaleUp"] == {"threshold": 9, "windowSeconds": 3}
    assert patched["spec"]["vllm"]["port"] == 8080


def test_defaults_replace_nulls_and_leave_wrong_types_alone() -> None:
    obj = autoscaler(vllm=None, scaling="fast")
    out = apply_defaults(AS, obj)
    assert out["spec"]["vllm"]["port"] == 8000
    assert out["spec"]["scaling"] == "fast"
    ops = defaulting_patch(AS, obj)
    assert apply_patch(obj, list(ops)) == out


def test_pointer_escaping_and_objects_without_spec() -> None:
    assert defaulting_patch(AS, {"metadata": {}}) == []
    assert defaulting_patch(AS, {"spec": 3}) == []
    assert defaulting_patch("Pod", {"spec": {}}) == []
    assert defaulting_patch(v1.PLACEMENT_KIND, placement()) == [
        {"op": "add", "path": "/spec/preferred", "value": True},
        {"op": "add", "path": "/spec/retire", "value": False},
    ]


_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 100), st.floats(-1, 100, allow_nan=False), st.text(max_size=5)
)


def _partial(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Objects shaped like the schema, with any field possibly absent, null or of the wrong type."""
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        fields = {k: _partial(v) for k, v in schema["properties"].items()}
        return st.one_of(st.fixed_dictionaries({}, optional=fields), _leaf)
    if kind == "array":
        return st.one_of(st.lists(_partial(schema["items"]), max_size=3), _leaf)
    return _leaf


_SPEC_SCHEMA = openapi_schema(AS)["properties"]["spec"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_partial(_SPEC_SCHEMA))
def test_defaulting_agrees_with_the_crd_structural_defaults(spec: Any) -> None:
    obj = {"spec": spec}
    expected = {"spec": structural_defaults(_SPEC_SCHEMA, spec)} if isinstance(spec, dict) else obj
    assert apply_defaults(AS, obj) == expected
    assert apply_patch(obj, list(defaulting_patch(AS, obj))) == expected


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_partial(_SPEC_SCHEMA))
def test_fast_and_full_schema_validators_agree(spec: Any) -> None:
    obj = {"apiVersion": v1.API_VERSION, "kind": AS, "metadata": {"name": "x"}, "spec": spec}
    full_ok = not list(jsonschema.Draft7Validator(admission_schema(AS)).iter_errors(obj))
    try:
        _fast_validator(AS)(obj)
        fast_ok = True
    except Exception:
        fast_ok = False
    assert fast_ok == full_ok
    assert (schema_problems(AS, obj) == []) == full_ok
    validate_autoscaler(obj)  # never raises
    autoscaler_warnings(obj, TargetScale("found", replicas=1))


def test_review_gives_problems_or_warnings_and_a_patch_for_the_object_as_given() -> None:
    from api.validation import review

    obj = autoscaler(vllm=None, placementMode="preferred", scaling={"syncPeriodMilliseconds": 10000})
    obj["spec"]["adapters"] = [{"name": "a", "source": "/m", "maxReplicas": None}, {"name": "b", "source": "/n"}]
    result = review(AS, obj)
    assert result.problems == []
    assert result.warnings and result.warnings[0].startswith("spec.scaling.syncPeriodMilliseconds is 10000")
    patched = apply_patch(obj, list(result.patch))
    assert patched["spec"]["vllm"]["maxLorasPerReplica"] == 4
    assert [a["minReplicas"] for a in patched["spec"]["adapters"]] == [1, 1]
    assert defaulting_patch(AS, patched) == []
    bad = review(AS, autoscaler(adapters=[{"name": "a", "source": "/m", "minReplicas": 0}]))
    assert paths(bad.problems) == ["spec.adapters[0].minReplicas"] and bad.patch == [] and bad.warnings == []


def test_adapter_name_base_is_reserved_for_the_route_table() -> None:
    problems = validate_autoscaler(autoscaler(adapters=[{"name": "base", "source": "/m"}]))
    assert paths(problems) == ["spec.adapters[0].name"]
    assert "reserved" in messages(problems)
