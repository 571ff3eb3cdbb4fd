"""The alert rules, the Grafana dashboard, the kube-state-metrics configuration and docs/operations.md name only
metrics that exist.

The set of real names is taken from the components themselves (their Prometheus registries, as they would be
scraped), from the kube-state-metrics configuration shipped beside the rules (whose paths must be real status
fields of the API), and from the vLLM simulator, which reproduces vLLM's metric names. A renamed metric in
the code then fails here instead of silently emptying a panel or muting an alert. No cluster is needed.
"""

from __future__ import annotations

import json
import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from api import v1alpha1 as v1
from api.schema import json_name

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "config" / "prometheus" / "alerts.yaml"
KSM = ROOT / "config" / "prometheus" / "kube-state-metrics.yaml"
DASHBOARD = ROOT / "config" / "grafana" / "lora-autoscaler.json"
OPERATIONS = ROOT / "docs" / "operations.md"
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def _component_metric_names() -> set[str]:
    """Family and sample names of everything the controller, router and webhook export."""
    from prometheus_client import REGISTRY

    import common.metrics  # noqa: F401  (registers the work-queue families)
    import controller.metrics  # noqa: F401  (registers the controller's families)
    from router.accounting import Accounting
    from router.metrics import RouterMetrics
    from webhook.server import WebhookMetrics

    names: set[str] = set()
    for registry in (REGISTRY, RouterMetrics(Accounting()).registry, WebhookMetrics().registry):
        for family in registry.collect():
            if family.name.startswith("lora_"):
                names.add(family.name)
                names.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
    return names


def _ksm_config() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(KSM.read_text())
    return doc


def _ksm_metric_names() -> set[str]:
    return {f"{r['metricNamePrefix']}_{m['name']}" for r in _ksm_config()["spec"]["resources"] for m in r["metrics"]}


def _vllm_metric_names() -> set[str]:
    text = "".join(p.read_text() for p in (ROOT / "vllmsim").glob("*.py"))
    return set(re.findall(r"vllm:[a-z_]+[a-z]", text))


@pytest.fixture(scope="module")
def known() -> set[str]:
    names = _component_metric_names() | _ksm_metric_names() | _vllm_metric_names() | {"up"}
    # The families the rules and panels lean on most; if these are gone the collection itself is broken.
    assert {"lora_controller_is_leader", "lora_router_requests_total", "lora_webhook_admissions_total",
            "lora_controller_load_duration_seconds_bucket", "vllm:num_requests_waiting_by_reason"} <= names
    return names


def _metrics_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression (quoted label values and label lists removed first)."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    return {t for t in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if t.startswith(("lora_", "vllm:")) or t == "up"}


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert doc["kind"] == "PrometheusRule"
    return [r for g in doc["spec"]["groups"] for r in g["rules"]]


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    out += [(f"variable {v['name']}", v["definition"]) for v in dash["templating"]["list"] if v.get("definition")]
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


# --- alert rules ---------------------------------------------------------------------------------------------


def test_every_alert_reads_real_metrics(known: set[str]) -> None:
    rules = _alert_rules()
    assert len(rules) >= 10
    for rule in rules:
        used = _metrics_in(rule["expr"])
        assert used, f"{rule['alert']}: no metric found in {rule['expr']!r}"
        assert used <= known, f"{rule['alert']} reads metrics nobody exports: {sorted(used - known)}"


def test_alert_metric_check_notices_a_typo(known: set[str]) -> None:
    assert not _metrics_in("sum(rate(lora_controller_reconcile_eror_total[5m]))") <= known
    assert _metrics_in('sum by (code) (rate(lora_router_requests_total{code="503"}[5m]))') == {
        "lora_router_requests_total"}


def test_alerts_cover_the_promised_situations() -> None:
    exprs = {r["alert"]: r["expr"] for r in _alert_rules()}
    assert len(exprs) == len(_alert_rules()), "alert names must be unique"
    promised = {
        "adapter without a routable replica": "lora_autoscaler_adapter_routable_replicas",
        "saturated for long": "lora_autoscaler_saturated",
        "load failures": "lora_controller_load_failures_total",
        "webhook errors": "lora_webhook_admissions_total",
        "reconcile errors": "lora_controller_reconcile_errors_total",
    }
    for situation, metric in promised.items():
        assert any(metric in e for e in exprs.values()), f"no alert for {situation} ({metric})"


def test_every_alert_says_how_bad_and_where_to_look() -> None:
    headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", OPERATIONS.read_text(), flags=re.M)}
    for rule in _alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"LoRA[A-Za-z]+", name), name
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in headings, f"{name}: docs/operations.md has no heading for #{anchor}"
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), name


def test_job_labels_are_scraped_services() -> None:
    services = {d["metadata"]["name"] for path in ("config/webhook/service.yaml", "config/manager/controller.yaml",
                                                   "config/router/router.yaml")
                for d in yaml.safe_load_all((ROOT / path).read_text()) if d and d["kind"] == "Service"}
    jobs = {j for r in _alert_rules() for j in re.findall(r'job="([^"]+)"', r["expr"])}
    assert jobs and jobs <= services, f"jobs {jobs - services} are no Service the ServiceMonitors scrape"


# --- kube-state-metrics ----------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {json_name(f): hints[f.name] for f in fields(cls)}


def _resolve(cls: type, path: list[str]) -> Any:
    """The type at a JSON path inside a dataclass; lists resolve to their item type."""
    tp: Any = cls
    for part in path:
        assert isinstance(tp, type) and is_dataclass(tp), f"{'.'.join(path)}: {part} is below a non-object"
        types_ = _field_types(tp)
        assert part in types_, f"{'.'.join(path)}: {tp.__name__} has no field {part!r}"
        tp = types_[part]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) is list or (len(args) == 1 and typing.get_origin(args[0]) is list):
            tp = typing.get_args(tp if typing.get_origin(tp) is list else args[0])[0]
        elif len(args) == 1:
            tp = args[0]
    return tp


def test_kube_state_metrics_paths_are_real_status_fields() -> None:
    (resource,) = _ksm_config()["spec"]["resources"]
    gvk = resource["groupVersionKind"]
    assert (gvk["group"], gvk["version"], gvk["kind"]) == (v1.GROUP, v1.VERSION, v1.AUTOSCALER_KIND)
    root = {"status": v1.LoRAAutoscalerStatus, "spec": v1.LoRAAutoscalerSpec}
    for metric in resource["metrics"]:
        each = metric["each"]
        body = each[each["type"][0].lower() + each["type"][1:]]
        path = body["path"]
        tp = _resolve(root[path[0]], path[1:])
        for rel in [*body.get("labelsFromPath", {}).values(), *([body["valueFrom"]] if "valueFrom" in body else [])]:
            _resolve(tp, rel)


# --- the dashboard ---------------------------------------------------------------------------------------------


def test_dashboard_panels_read_real_metrics(known: set[str]) -> None:
    exprs = _dashboard_exprs()
    assert len(exprs) >= 20
    for title, expr in exprs:
        used = _metrics_in(expr)
        assert used, f"panel {title!r}: no metric in {expr!r}"
        assert used <= known, f"panel {title!r} reads metrics nobody exports: {sorted(used - known)}"


def test_dashboard_shows_every_component_metric(known: set[str]) -> None:
    """Each family the components export appears on the dashboard (a new metric gets a panel)."""
    shown = {m for _, e in _dashboard_exprs() for m in _metrics_in(e)}
    families = {n for n in _component_metric_names()
                if not n.endswith(("_total", "_created", "_bucket", "_sum", "_count"))}
    missing = {f for f in families if not any(s == f or s.startswith(f + "_") for s in shown)}
    assert not missing, f"exported but on no panel: {sorted(missing)}"


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "lora-autoscaler" and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"panel {p['title']!r} overlaps another"
        taken |= cells
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "autoscaler"} <= variables


# --- the operations guide ----------------------------------------------------------------------------------------


def test_operations_guide_names_only_real_metrics(known: set[str]) -> None:
    text = OPERATIONS.read_text()
    # `lora_autoscaler_adapter_{desired,loaded,routable}_replicas` is three names; `name{a,b}` lists labels.
    text = re.sub(r"\b(lora_[a-z_]*_)\{([a-z,]+)\}(_[a-z_]+)",
                  lambda m: " ".join(f"{m[1]}{o}{m[3]}" for o in m[2].split(",")), text)
    text = re.sub(r"\{[^}]*\}", "", text)
    expanded = set(re.findall(r"\b(?:lora|vllm)[_:][a-z_:]*[a-z]", text))
    families_and_samples = known | {n.removesuffix("_total") for n in known}
    labels_and_keys = {"lora_name", "lora_path", "lora_requests_info", "lora_modules"}
    unknown = {n for n in expanded if n.startswith(("lora_", "vllm:")) and n not in families_and_samples
               and n not in labels_and_keys}
    assert not unknown, f"docs/operations.md names metrics nobody exports: {sorted(unknown)}"
