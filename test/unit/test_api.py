"""The typed API is the one source of the CRDs, the schema and the defaults."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import jsonschema
import pytest

from api import v1alpha1 as v1
from api.crd import crd, json_schema
from api.schema import defaults_of, from_dict, to_dict

ROOT = Path(__file__).resolve().parents[2]


def _gen_crds():
    spec = importlib.util.spec_from_file_location("gen_crds", ROOT / "hack" / "gen_crds.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_crds"] = module
    spec.loader.exec_module(module)
    return module


def test_committed_crds_match_api():
    gen = _gen_crds()
    for path, text in gen.rendered().items():
        assert path.exists(), f"{path} is missing: run `make generate`"
        assert path.read_text() == text, f"{path} drifted from api/: run `make generate` and commit"


def test_drift_check_notices_a_schema_change(monkeypatch):
    gen = _gen_crds()
    before = gen.rendered()
    field = next(f for f in dataclasses.fields(v1.AdapterSpec) if f.name == "min_replicas")
    changed = dict(field.metadata)
    changed["schema"] = {**field.metadata["schema"], "maximum": 7}
    monkeypatch.setattr(field, "metadata", changed)
    import api.crd

    api.crd._schemas.cache_clear()
    try:
        after = gen.rendered()
    finally:
        api.crd._schemas.cache_clear()
    assert after != before


def test_crd_is_structural_with_status_and_columns():
    doc = crd(v1.AUTOSCALER_KIND)
    version = doc["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert {"Target", "Adapters", "Replicas", "Saturated"} <= set(names)
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["adapters"]["items"]["properties"]["minReplicas"]["minimum"] == 1
    rules = [r["rule"] for r in spec["properties"]["scaling"]["x-kubernetes-validations"]]
    assert any("scaleDown.threshold < self.scaleUp.threshold" in r for r in rules)
    placement_cols = [c["name"] for c in crd(v1.PLACEMENT_KIND)["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert placement_cols[:3] == ["Adapter", "Pod", "Phase"]


def test_defaults_round_trip():
    spec = {"scaleTargetRef": {"kind": "Deployment", "name": "vllm"}, "adapters": [{"name": "a", "source": "/x"}]}
    typed = from_dict(v1.LoRAAutoscalerSpec, spec)
    assert typed.vllm.max_loras_per_replica == 4
    assert typed.adapters[0].min_replicas == 1
    out = to_dict(typed)
    assert out["scaling"]["scaleUp"]["threshold"] == 4.0
    assert from_dict(v1.LoRAAutoscalerSpec, out) == typed
    assert defaults_of(v1.ScaleDownPolicy) == {"threshold": 1.0, "windowSeconds": 60, "drainTimeoutSeconds": 30}


@pytest.mark.parametrize(
    ("adapter", "ok"),
    [
        ({"name": "lora-1", "source": "/adapters/lora-1"}, True),
        ({"name": "lora-1", "source": "hf://org/repo"}, True),
        ({"name": "Lora_1", "source": "/x"}, False),
        ({"name": "lora-1", "source": "ftp://x"}, False),
        ({"name": "lora-1", "source": "/x", "minReplicas": 0}, False),
    ],
)
def test_json_schema_checks_adapters(adapter, ok):
    obj = {
        "apiVersion": v1.API_VERSION,
        "kind": v1.AUTOSCALER_KIND,
        "metadata": {"name": "x"},
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "vllm"}, "adapters": [adapter]},
    }
    validator = jsonschema.Draft202012Validator(json_schema(v1.AUTOSCALER_KIND))
    errors = list(validator.iter_errors(obj))
    assert (not errors) == ok, errors
