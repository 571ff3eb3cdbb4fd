"""What users install: `config/default` and its overlays, rendered by the real kubectl and checked by the API server.

Two kinds of checks. Static ones read the rendered objects and hold them to what the components really do:
each container's arguments are parsed by the entry point's own argument parser, every probe, Service and
webhook configuration points at a port that exists, every pod is locked down. Server-side dry runs then
send each kustomization to the real kube-apiserver, which validates every object (CRDs included, with their
CEL rules) exactly as `kubectl apply -k` would, without creating anything.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from localkube.controlplane import ControlPlane

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config"
NAMESPACE = "lora-system"
IMAGE = "ghcr.io/lora-autoscaler/lora-autoscaler:v0.1.0"
KUSTOMIZATIONS = {
    "default": CONFIG / "default",
    "cert-manager": CONFIG / "overlays" / "cert-manager",
    "prometheus": CONFIG / "overlays" / "prometheus",
    "without-router": CONFIG / "overlays" / "without-router",
}
COMPONENTS = ("controller", "webhook", "router")
Obj = dict[str, Any]


# --- rendering ---------------------------------------------------------------------------------------------

_rendered: dict[str, list[Obj]] = {}


def render(cp: ControlPlane, name: str) -> list[Obj]:
    """`kubectl kustomize` of one kustomization (cached per session: the files do not change under a run)."""
    if name not in _rendered:
        result = cp.kubectl("kustomize", str(KUSTOMIZATIONS[name]), check=False)
        assert result.returncode == 0, f"kubectl kustomize {KUSTOMIZATIONS[name]} failed: {result.stderr.strip()}"
        _rendered[name] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return _rendered[name]


def of_kind(objs: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def component(objs: list[Obj], comp: str) -> Obj:
    """The Deployment of a component, found by its component label."""
    found = [d for d in of_kind(objs, "Deployment")
             if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == comp]
    assert len(found) == 1, f"expected one Deployment for the {comp}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_port(container: Obj, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert name in ports, f"container {container['name']} has no port named {name!r} (has {sorted(ports)})"
    return int(ports[name])


# --- static checks of config/default -----------------------------------------------------------------------


def test_default_installs_everything_into_one_namespace(control_plane: ControlPlane) -> None:
    objs = render(control_plane, "default")
    ns = named(objs, "Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {c["metadata"]["name"] for c in of_kind(objs, "CustomResourceDefinition")} == {
        "loraautoscalers.loraautoscaler.io", "loraplacements.loraautoscaler.io"}
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                      "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}
    for o in objs:
        if o["kind"] in cluster_scoped:
            assert "namespace" not in o["metadata"], f"{o['kind']} {o['metadata']['name']} is cluster-scoped"
        else:
            assert o["metadata"].get("namespace") == NAMESPACE, f"{o['kind']} {o['metadata']['name']}"
    for comp in COMPONENTS:
        component(objs, comp)
    mutating = named(objs, "MutatingWebhookConfiguration", "lora-autoscaler-webhook")
    validating = named(objs, "ValidatingWebhookConfiguration", "lora-autoscaler-webhook")
    assert mutating["webhooks"] and validating["webhooks"]


def test_one_image_set_once(control_plane: ControlPlane) -> None:
    for name in KUSTOMIZATIONS:
        for d in of_kind(render(control_plane, name), "Deployment"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                assert c["image"] == IMAGE, f"{name}: {d['metadata']['name']}/{c['name']} runs {c['image']}"
    # The tag lives only in config/default's `images:`; the component manifests name the image untagged.
    for path in [*(CONFIG / "manager").glob("*.yaml"), *(CONFIG / "router").glob("*.yaml")]:
        for line in path.read_text().splitlines():
            if re.match(r"\s*image:", line):
                assert line.split("image:", 1)[1].strip() == "ghcr.io/lora-autoscaler/lora-autoscaler", \
                    f"{path.relative_to(ROOT)}: set the tag in config/default/kustomization.yaml, not here: {line}"


def _parse(command: str, args: list[str]) -> Any:
    """Parse `args` with the entry point's own parser: a flag the program does not know fails here."""
    if command == "lora-controller":
        from controller.__main__ import _parser

        return _parser().parse_args(args)
    if command == "lora-webhook":
        from webhook.__main__ import parse_args

        return parse_args(args)
    if command == "lora-router":
        from router.__main__ import build_parser

        return build_parser().parse_args(args)
    raise AssertionError(f"unknown entry point {command}")


@pytest.mark.parametrize("kustomization", list(KUSTOMIZATIONS))
def test_entry_points_accept_their_arguments_and_ports_agree(control_plane: ControlPlane, kustomization: str) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    objs = render(control_plane, kustomization)
    for d in of_kind(objs, "Deployment"):
        (c,) = d["spec"]["template"]["spec"]["containers"]
        command, args = c["command"], c.get("args", [])
        assert len(command) == 1 and command[0] in scripts, \
            f"{d['metadata']['name']}: {command} is not a console script"
        try:
            parsed = _parse(command[0], args)
        except SystemExit as exc:
            raise AssertionError(f"{d['metadata']['name']}: {command[0]} refuses its arguments {args}") from exc
        comp = d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        assert parsed.metrics_port == container_port(c, "metrics"), f"{comp}: --metrics-port and the metrics port"
        if comp == "webhook":
            assert parsed.port == container_port(c, "webhook")
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert str(parsed.cert_dir) in mounts, f"the webhook's --cert-dir {parsed.cert_dir} is not a volume"
            volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
            volume = volumes[mounts[str(parsed.cert_dir)]]
            expected = "secret" if kustomization == "cert-manager" else "emptyDir"
            assert expected in volume and len(volume) == 2, f"{kustomization}: certificate volume {volume}"
            assert parsed.cert_source == ("files" if kustomization == "cert-manager" else "self-signed")
            service = named(objs, "Service", parsed.service_name)
            for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
                for hook in named(objs, kind, "lora-autoscaler-webhook")["webhooks"]:
                    assert hook["clientConfig"]["service"]["name"] == service["metadata"]["name"]
            if parsed.cert_source == "self-signed":
                assert parsed.mutating_configuration == parsed.validating_configuration == "lora-autoscaler-webhook"
            env = {e["name"] for e in c.get("env", [])}
            assert "POD_NAMESPACE" in env, "the certificate's DNS names need the pod's namespace"
        elif comp == "router":
            assert parsed.port == container_port(c, "http")
            assert parsed.namespace, "in a pod the router follows one namespace's route table: --namespace"
        elif comp == "controller":
            assert parsed.leader_elect and d["spec"]["replicas"] == 2
            env = {e["name"] for e in c.get("env", [])}
            assert {"POD_NAME", "POD_NAMESPACE"} <= env, "Lease identity and namespace come from the downward API"


@pytest.mark.parametrize("kustomization", list(KUSTOMIZATIONS))
def test_every_pod_is_locked_down_probed_and_bounded(control_plane: ControlPlane, kustomization: str) -> None:
    for d in of_kind(render(control_plane, kustomization), "Deployment"):
        name = d["metadata"]["name"]
        pod = d["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 65532, name
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert pod.get("serviceAccountName"), f"{name} runs as the namespace's default ServiceAccount"
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            assert sc.get("readOnlyRootFilesystem") is True, name
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
            assert not sc.get("capabilities", {}).get("add"), name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(bound, {})), f"{name}: {bound}"
            for probe in ("livenessProbe", "readinessProbe"):
                get = c.get(probe, {}).get("httpGet")
                assert get, f"{name} has no {probe}"
                container_port(c, get["port"])
                assert get["path"] in ("/healthz", "/readyz"), f"{name}: {probe} on {get['path']}"
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
            if c["name"] == "webhook":  # its probes are served on the TLS port only
                assert c["readinessProbe"]["httpGet"].get("scheme") == "HTTPS"


@pytest.mark.parametrize("kustomization", list(KUSTOMIZATIONS))
def test_services_and_budgets_reach_their_pods(control_plane: ControlPlane, kustomization: str) -> None:
    objs = render(control_plane, kustomization)
    deployments = of_kind(objs, "Deployment")
    for svc in of_kind(objs, "Service"):
        chosen = [d for d in deployments
                  if selects(svc["spec"].get("selector", {}), d["spec"]["template"]["metadata"]["labels"])]
        assert len(chosen) == 1, f"Service {svc['metadata']['name']} selects {len(chosen)} Deployments"
        (c,) = chosen[0]["spec"]["template"]["spec"]["containers"]
        for port in svc["spec"]["ports"]:
            assert isinstance(port["targetPort"], str), "target ports by name, so they follow the containers"
            container_port(c, port["targetPort"])
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        chosen = [d for d in deployments
                  if selects(pdb["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])]
        assert len(chosen) == 1, f"PodDisruptionBudget {pdb['metadata']['name']} covers {len(chosen)} Deployments"
        replicas = chosen[0]["spec"]["replicas"]
        if "minAvailable" in pdb["spec"]:
            assert pdb["spec"]["minAvailable"] < replicas, f"{pdb['metadata']['name']} would block every eviction"
    covered = {d["metadata"]["name"] for d in deployments
               if any(selects(p["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])
                      for p in of_kind(objs, "PodDisruptionBudget"))}
    assert {"lora-autoscaler-controller", "lora-autoscaler-webhook"} <= covered
    controller_pdb = named(objs, "PodDisruptionBudget", "lora-autoscaler-controller")
    assert controller_pdb["spec"].get("minAvailable") == 1


def test_webhook_service_maps_443_to_the_tls_port(control_plane: ControlPlane) -> None:
    objs = render(control_plane, "default")
    svc = named(objs, "Service", "lora-autoscaler-webhook")
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == 443]
    (c,) = component(objs, "webhook")["spec"]["template"]["spec"]["containers"]
    assert container_port(c, port["targetPort"]) == 9443
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        for hook in named(objs, kind, "lora-autoscaler-webhook")["webhooks"]:
            ref = hook["clientConfig"]["service"]
            assert (ref["namespace"], ref.get("port", 443)) == (NAMESPACE, 443)
            assert ref["path"] in ("/mutate", "/validate")


def test_each_component_has_its_own_service_account(control_plane: ControlPlane) -> None:
    objs = render(control_plane, "default")
    accounts = {component(objs, comp)["spec"]["template"]["spec"]["serviceAccountName"] for comp in COMPONENTS}
    assert len(accounts) == 3
    existing = {sa["metadata"]["name"] for sa in of_kind(objs, "ServiceAccount")}
    assert accounts <= existing
    bound = {s["name"] for b in [*of_kind(objs, "ClusterRoleBinding"), *of_kind(objs, "RoleBinding")]
             for s in b["subjects"] if s["kind"] == "ServiceAccount" and s.get("namespace") == NAMESPACE}
    assert accounts <= bound, f"unbound: {accounts - bound}"


# --- overlays ----------------------------------------------------------------------------------------------


def test_cert_manager_overlay_serves_cert_manager_files(control_plane: ControlPlane) -> None:
    objs = render(control_plane, "cert-manager")
    certificates = {c["metadata"]["name"]: c for c in of_kind(objs, "Certificate")}
    issuers = {i["metadata"]["name"] for i in of_kind(objs, "Issuer")}
    for cert in certificates.values():
        assert cert["spec"]["issuerRef"]["name"] in issuers
    webhook = component(objs, "webhook")
    assert webhook["spec"]["replicas"] == 2 and webhook["spec"]["strategy"]["type"] == "RollingUpdate"
    volumes = webhook["spec"]["template"]["spec"]["volumes"]
    secret_volumes = [v["secret"]["secretName"] for v in volumes if "secret" in v]
    serving = [c for c in certificates.values() if c["spec"]["secretName"] in secret_volumes]
    assert len(serving) == 1, "the webhook mounts the Secret of exactly one Certificate"
    assert "lora-autoscaler-webhook.lora-system.svc" in serving[0]["spec"]["dnsNames"]
    want = f"{NAMESPACE}/{serving[0]['metadata']['name']}"
    for kind in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
        annotations = named(objs, kind, "lora-autoscaler-webhook")["metadata"].get("annotations", {})
        assert annotations.get("cert-manager.io/inject-ca-from") == want, kind


def test_prometheus_overlay_scrapes_all_three_components(control_plane: ControlPlane) -> None:
    objs = render(control_plane, "prometheus")
    services = of_kind(objs, "Service")
    scraped: set[str] = set()
    for sm in of_kind(objs, "ServiceMonitor"):
        assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
        chosen = [s for s in services if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert len(chosen) == 1, f"ServiceMonitor {sm['metadata']['name']} selects {len(chosen)} Services"
        ports = {p["name"] for p in chosen[0]["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            assert ep["port"] in ports
        scraped.add(chosen[0]["metadata"]["labels"]["app.kubernetes.io/component"])
    assert scraped == set(COMPONENTS)
    (rule,) = of_kind(objs, "PrometheusRule")
    assert rule["spec"]["groups"]


def test_without_router_overlay_is_default_minus_the_router(control_plane: ControlPlane) -> None:
    def ids(objs: list[Obj]) -> set[tuple[str, str]]:
        return {(o["kind"], o["metadata"]["name"]) for o in objs}

    default, without = render(control_plane, "default"), render(control_plane, "without-router")
    removed = ids(default) - ids(without)
    assert removed == {("Deployment", "lora-router"), ("Service", "lora-router"),
                       ("PodDisruptionBudget", "lora-router"), ("ServiceAccount", "lora-autoscaler-router"),
                       ("ClusterRole", "lora-autoscaler-router"), ("ClusterRoleBinding", "lora-autoscaler-router")}
    assert ids(without) <= ids(default)
    assert "lora-router" not in json.dumps(without).replace("lora-router.lora-system:9090", "")


# --- the API server's verdict --------------------------------------------------------------------------------

# The local control plane has neither cert-manager nor the Prometheus Operator. These stand-ins register
# their kinds (schema-less: every field is accepted) so that the server-side dry run can check everything
# else in those overlays; they prove nothing about the cert-manager or monitoring objects' own fields,
# which the static tests above check instead.
STAND_IN_KINDS = {
    ("cert-manager.io", "Certificate", "certificates"),
    ("cert-manager.io", "Issuer", "issuers"),
    ("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
    ("monitoring.coreos.com", "PrometheusRule", "prometheusrules"),
}


def _stand_in_crd(group: str, kind: str, plural: str) -> Obj:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}", "labels": {"lora-autoscaler.test/stand-in": "true"}},
        "spec": {
            "group": group,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
            "scope": "Namespaced",
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
        },
    }


@pytest.fixture(scope="module")
def install_prerequisites(control_plane: ControlPlane) -> Iterator[None]:
    """The lora-system Namespace (for real: a dry run cannot place objects in a namespace it only pretends to
    create) and the stand-in CRDs that are not installed yet (removed afterwards)."""
    control_plane.kubectl("apply", "-f", str(CONFIG / "default" / "namespace.yaml"))
    created = []
    for group, kind, plural in sorted(STAND_IN_KINDS):
        name = f"{plural}.{group}"
        if control_plane.kubectl("get", "crd", name, check=False).returncode != 0:
            control_plane.kubectl("create", "-f", "-", input=json.dumps(_stand_in_crd(group, kind, plural)))
            created.append(name)
    if created:
        control_plane.kubectl("wait", "--for=condition=Established", "--timeout=30s",
                              *[f"crd/{n}" for n in created])
    try:
        yield
    finally:
        for name in created:
            control_plane.kubectl("delete", "crd", name, "--wait=false", check=False)


@pytest.mark.parametrize("kustomization", list(KUSTOMIZATIONS))
def test_server_side_dry_run_accepts_the_kustomization(
    control_plane: ControlPlane, install_prerequisites: None, kustomization: str
) -> None:
    path = KUSTOMIZATIONS[kustomization]
    result = control_plane.kubectl("apply", "-k", str(path), "--dry-run=server", check=False, timeout=120)
    assert result.returncode == 0, f"kubectl apply -k {os.path.relpath(path, ROOT)} --dry-run=server:\n{result.stderr}"
    # The restricted Pod Security level is enforced on lora-system: the API server warns about any pod
    # template that would not be admitted.
    assert "PodSecurity" not in result.stderr, result.stderr
    applied = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
    assert len(applied) == len(render(control_plane, kustomization)), result.stdout


def test_dry_run_still_notices_a_broken_object(control_plane: ControlPlane, install_prerequisites: None) -> None:
    """The dry run above is a real check: the same objects with one bad field are refused."""
    objs = [o for o in render(control_plane, "default") if o["kind"] == "Deployment"]
    broken = json.loads(json.dumps(objs[0]))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = 70000
    result = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(broken), check=False)
    assert result.returncode != 0 and "containerPort" in result.stderr



def test_the_image_holds_every_package_and_user_the_manifests_assume() -> None:
    """The Dockerfile copies every package pyproject.toml installs (a missing one breaks an entry point
    only inside the image) and runs as the uid the manifests require."""
    text = (ROOT / "Dockerfile").read_text()
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in includes if (ROOT / p.rstrip("*")).is_dir()}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, flags=re.M))
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"
    assert re.findall(r"^USER (\S+)$", text, flags=re.M)[-1].split(":")[0] == "65532"
