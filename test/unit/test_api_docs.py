"""docs/api.md is generated from api/ and must match it, like the CRDs (test_api.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import typing
from pathlib import Path
from types import ModuleType

import pytest

from api import v1alpha1 as v1
from api.schema import json_name

ROOT = Path(__file__).resolve().parents[2]


def _gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "hack" / "gen_api_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_api_docs"] = module
    spec.loader.exec_module(module)
    return module


def test_committed_reference_matches_api() -> None:
    gen = _gen()
    assert (ROOT / "docs" / "api.md").read_text() == gen.render(), \
        "docs/api.md drifted from api/: run `python hack/gen_api_docs.py` and commit"


def test_check_mode_exits_zero_when_current() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "hack" / "gen_api_docs.py"), "--check"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_drift_is_noticed(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _gen()
    before = gen.render()
    field = next(f for f in dataclasses.fields(v1.ScaleUpPolicy) if f.name == "window_seconds")
    monkeypatch.setattr(field, "metadata", {**field.metadata, "description": "A changed description."})
    after = gen.render()
    assert after != before and "A changed description." in after


def test_check_mode_fails_on_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    gen = _gen()
    stale = tmp_path / "api.md"
    stale.write_text(gen.render().replace("Load per replica", "Load per pod"))
    monkeypatch.setattr(gen, "OUTPUT", stale)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.main(["--check"]) == 1
    assert "+| `threshold` | number |" in capsys.readouterr().out, "--check prints the difference"
    assert "Load per pod" in stale.read_text(), "--check must not rewrite the file"
    assert gen.main([]) == 0 and "Load per replica" in stale.read_text()


def _types_in(tp: object) -> list[type]:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return [tp]
    return [t for arg in typing.get_args(tp) for t in _types_in(arg)]


def _reachable(root: type) -> list[type]:
    found: list[type] = []
    todo = [root]
    while todo:
        cls = todo.pop()
        if cls not in found:
            found.append(cls)
            todo += [t for hint in typing.get_type_hints(cls).values() for t in _types_in(hint)]
    return found


def test_every_field_rule_and_bound_is_documented() -> None:
    text = _gen().render()
    roots = (v1.LoRAAutoscalerSpec, v1.LoRAAutoscalerStatus, v1.LoRAPlacementSpec, v1.LoRAPlacementStatus)
    classes = {c for r in roots for c in _reachable(r)}
    assert v1.AdapterSpec in classes and v1.Condition in classes
    for cls in classes:
        assert f"### {cls.__name__}\n" in text, f"{cls.__name__} has no section"
        section = text.split(f"### {cls.__name__}\n", 1)[1].split("\n### ", 1)[0]
        for f in dataclasses.fields(cls):
            assert f"| `{json_name(f)}` |" in section, f"{cls.__name__}.{json_name(f)} is not documented"
        for rule, message in getattr(cls, "__cel_rules__", []):
            assert f"`{rule}`: {message}" in section
    assert "≤ 256" in text.split("### VLLMEndpoint", 1)[1].split("###", 1)[0]  # maxLorasPerReplica's bound
    assert f"`{v1.ADAPTER_NAME_PATTERN}`" in text
