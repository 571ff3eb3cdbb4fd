"""Least privilege, checked by the API server's own authorizer.

The RBAC objects of `config/default` (ServiceAccounts, Roles, bindings) are applied for real, then
`kubectl auth can-i --as=system:serviceaccount:lora-system:<account>` asks the real RBAC authorizer what
each component may do: everything its code calls, and nothing else that matters (Secrets, other webhook
configurations, writes by the read-only router, Leases outside its own namespace).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from localkube.controlplane import ControlPlane
from localkube.wait import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "config" / "default"
SYSTEM = "lora-system"
CONTROLLER = "lora-autoscaler-controller"
WEBHOOK = "lora-autoscaler-webhook"
ROUTER = "lora-autoscaler-router"
RBAC_KINDS = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
# What every authenticated user may do (system:basic-user, system:discovery, system:public-info-viewer).
EVERYONE = {"selfsubjectaccessreviews.authorization.k8s.io", "selfsubjectrulesreviews.authorization.k8s.io",
            "selfsubjectreviews.authentication.k8s.io"}


@pytest.fixture(scope="module")
def rbac(control_plane: ControlPlane, crds: None) -> Iterator[None]:
    """Apply the ServiceAccounts and RBAC of config/default for real; remove them afterwards (the Namespace
    stays, other tests may use it)."""
    result = control_plane.kubectl("kustomize", str(DEFAULT), check=False)
    assert result.returncode == 0, f"kubectl kustomize config/default failed: {result.stderr.strip()}"
    objs = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] in ("Namespace", *RBAC_KINDS)]
    body = json.dumps({"apiVersion": "v1", "kind": "List", "items": objs})
    control_plane.kubectl("apply", "-f", "-", input=body)
    # The authorizer learns of new bindings through its informers: wait until the last one is visible.
    for account, verb, resource, ns in ((CONTROLLER, "get", "secrets", "default"),
                                        (CONTROLLER, "update", "leases.coordination.k8s.io", SYSTEM),
                                        (ROUTER, "watch", "endpointslices.discovery.k8s.io", "default")):
        wait_until(lambda: can(control_plane, account, verb, resource, ns), timeout=15,  # noqa: B023
                   what=f"{account} may {verb} {resource}")
    try:
        yield
    finally:
        rbac_only = [o for o in objs if o["kind"] != "Namespace"]
        control_plane.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-",
                              input=json.dumps({"apiVersion": "v1", "kind": "List", "items": rbac_only}), check=False)


@pytest.fixture(scope="module")
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    """One workload namespace for the module (can-i needs it to exist, not to be fresh)."""
    name = f"rbac-workloads-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


def can(cp: ControlPlane, account: str, verb: str, resource: str, namespace: str | None = None, *,
        subresource: str | None = None) -> bool:
    """`kubectl auth can-i` as a component's ServiceAccount (resource may be `kind.group/name`)."""
    args = ["auth", "can-i", verb, resource, f"--as=system:serviceaccount:{SYSTEM}:{account}"]
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    if subresource:
        args.append(f"--subresource={subresource}")
    result = cp.kubectl(*args, check=False)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl {' '.join(args)}: {result.stderr.strip()}"
    return answer == "yes"


def rules(cp: ControlPlane, account: str, namespace: str) -> dict[str, set[str]]:
    """`kubectl auth can-i --list`: resource (with names, if restricted) -> verbs, minus what everyone has."""
    out = cp.kubectl("auth", "can-i", "--list", f"--as=system:serviceaccount:{SYSTEM}:{account}",
                     "-n", namespace).stdout
    table: dict[str, set[str]] = {}
    for line in out.splitlines()[1:]:
        # Columns: Resources, Non-Resource URLs, Resource Names, Verbs ("[get list]").
        head, _, verbs = line.rpartition("[")
        parts = head.split()
        if not parts or parts[0].startswith("[") or parts[0] in EVERYONE:
            continue  # a non-resource URL row, or what every authenticated user may do
        names = next((p for p in parts[1:] if p.startswith("[") and p != "[]"), "")
        key = parts[0] + (f" {names}" if names else "")
        table.setdefault(key, set()).update(verbs.rstrip("]").split())
    return table


# --- the controller ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("check", ids=lambda c: "-".join(x for x in c if x), argvalues=[
    ("get", "loraautoscalers.loraautoscaler.io", None),
    ("list", "loraautoscalers.loraautoscaler.io", None),
    ("watch", "loraautoscalers.loraautoscaler.io", None),
    ("patch", "loraautoscalers.loraautoscaler.io", "status"),
    ("create", "loraplacements.loraautoscaler.io", None),
    ("patch", "loraplacements.loraautoscaler.io", None),
    ("delete", "loraplacements.loraautoscaler.io", None),
    ("watch", "loraplacements.loraautoscaler.io", None),
    ("patch", "loraplacements.loraautoscaler.io", "status"),
    ("list", "pods", None),
    ("watch", "pods", None),
    ("create", "services", None),
    ("patch", "services", None),
    ("delete", "services", None),
    ("watch", "services", None),
    ("create", "endpointslices.discovery.k8s.io", None),
    ("patch", "endpointslices.discovery.k8s.io", None),
    ("delete", "endpointslices.discovery.k8s.io", None),
    ("watch", "endpointslices.discovery.k8s.io", None),
    ("create", "events.events.k8s.io", None),
    ("patch", "events.events.k8s.io", None),
    ("get", "deployments.apps", "scale"),
    ("get", "statefulsets.apps", "scale"),
    ("get", "playgrounds.inference.llmaz.io", "scale"),
    ("get", "secrets", None),
])
def test_controller_may_do_what_its_reconcilers_do(control_plane: ControlPlane, rbac: None, namespace: str,
                                                   check: tuple[str, str, str | None]) -> None:
    verb, resource, subresource = check
    assert can(control_plane, CONTROLLER, verb, resource, namespace, subresource=subresource), \
        f"the controller cannot {verb} {resource}{'/' + subresource if subresource else ''} in a workload namespace"


def test_controller_may_hand_over_to_pod_autoscaling(control_plane: ControlPlane, rbac: None, namespace: str) -> None:
    """spec.podAutoscaling: mode ScaleTarget sets replicas through the scale subresource of any kind, mode HPA
    raises the named HPA's minReplicas. Neither may go further: no create or delete of HPAs or workloads."""
    missing = []
    for verb, resource, subresource in [("patch", "deployments.apps", "scale"),
                                        ("patch", "statefulsets.apps", "scale"),
                                        ("patch", "playgrounds.inference.llmaz.io", "scale"),
                                        ("get", "horizontalpodautoscalers.autoscaling", None),
                                        ("patch", "horizontalpodautoscalers.autoscaling", None)]:
        if not can(control_plane, CONTROLLER, verb, resource, namespace, subresource=subresource):
            missing.append(f"{verb} {resource}{'/' + subresource if subresource else ''}")
    assert not missing, f"the hand-over to pod autoscaling needs: {', '.join(missing)} (config/rbac/)"


@pytest.mark.parametrize("check", ids=lambda c: "-".join(x for x in c if x), argvalues=[
    ("list", "secrets", None),
    ("watch", "secrets", None),
    ("create", "secrets", None),
    ("create", "pods", None),
    ("delete", "pods", None),
    ("patch", "pods", None),
    ("create", "pods", "exec"),
    ("get", "pods", "log"),
    ("create", "pods", "eviction"),
    ("patch", "deployments.apps", None),
    ("delete", "deployments.apps", None),
    ("create", "horizontalpodautoscalers.autoscaling", None),
    ("delete", "horizontalpodautoscalers.autoscaling", None),
    ("update", "leases.coordination.k8s.io", None),
    ("create", "configmaps", None),
    ("delete", "namespaces", None),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None),
    ("patch", "mutatingwebhookconfigurations.admissionregistration.k8s.io", None),
])
def test_controller_may_not_go_beyond_its_scope(control_plane: ControlPlane, rbac: None, namespace: str,
                                                check: tuple[str, str, str | None]) -> None:
    verb, resource, subresource = check
    assert not can(control_plane, CONTROLLER, verb, resource, namespace, subresource=subresource), \
        f"the controller may {verb} {resource}{'/' + subresource if subresource else ''}: more than it needs"


def test_controller_leases_only_in_its_own_namespace(control_plane: ControlPlane, rbac: None, namespace: str) -> None:
    for verb in ("get", "create", "update"):
        assert can(control_plane, CONTROLLER, verb, "leases.coordination.k8s.io", SYSTEM), verb
        assert not can(control_plane, CONTROLLER, verb, "leases.coordination.k8s.io", namespace), verb
    assert not can(control_plane, CONTROLLER, "delete", "leases.coordination.k8s.io", SYSTEM)


def test_controller_reads_secrets_one_by_one_only(control_plane: ControlPlane, rbac: None, namespace: str) -> None:
    """The vLLM API key is read by name; listing or watching would hand it every Secret of the cluster."""
    secrets = [(key, verbs) for key, verbs in rules(control_plane, CONTROLLER, namespace).items()
               if key.split()[0] == "secrets"]
    assert secrets, "the controller cannot read the vLLM API key Secret"
    assert all(verbs == {"get"} for _, verbs in secrets), secrets


def test_controller_has_no_wildcard_verbs(control_plane: ControlPlane, rbac: None, namespace: str) -> None:
    for key, verbs in rules(control_plane, CONTROLLER, namespace).items():
        assert "*" not in verbs, f"{key}: {verbs}"
        assert key.split()[0] not in ("*", "*.*"), f"wildcard resource {key}: {verbs}"


# --- the webhook -------------------------------------------------------------------------------------------


def test_webhook_patches_only_its_own_configurations(control_plane: ControlPlane, rbac: None) -> None:
    for kind in ("mutatingwebhookconfigurations", "validatingwebhookconfigurations"):
        resource = f"{kind}.admissionregistration.k8s.io"
        assert can(control_plane, WEBHOOK, "patch", f"{resource}/lora-autoscaler-webhook")
        assert can(control_plane, WEBHOOK, "get", f"{resource}/lora-autoscaler-webhook")
        assert not can(control_plane, WEBHOOK, "patch", f"{resource}/some-other-webhook"), \
            f"the webhook could rewrite another product's {kind}"
        assert not can(control_plane, WEBHOOK, "list", resource)
        assert not can(control_plane, WEBHOOK, "create", resource)
        assert not can(control_plane, WEBHOOK, "delete", f"{resource}/lora-autoscaler-webhook")


def test_webhook_reads_scale_for_the_capacity_warning_and_nothing_else(
    control_plane: ControlPlane, rbac: None, namespace: str
) -> None:
    for resource in ("deployments.apps", "statefulsets.apps", "playgrounds.inference.llmaz.io"):
        assert can(control_plane, WEBHOOK, "get", resource, namespace, subresource="scale"), resource
        assert not can(control_plane, WEBHOOK, "update", resource, namespace, subresource="scale"), resource
        assert not can(control_plane, WEBHOOK, "patch", resource, namespace, subresource="scale"), resource
    for verb, resource in [("get", "secrets"), ("list", "secrets"), ("get", "deployments.apps"),
                           ("get", "pods"), ("create", "loraautoscalers.loraautoscaler.io"),
                           ("get", "loraautoscalers.loraautoscaler.io")]:
        assert not can(control_plane, WEBHOOK, verb, resource, namespace), f"the webhook may {verb} {resource}"


# --- the router ----------------------------------------------------------------------------------------------


def test_router_reads_the_route_table(control_plane: ControlPlane, rbac: None, namespace: str) -> None:
    for verb in ("list", "watch"):
        assert can(control_plane, ROUTER, verb, "endpointslices.discovery.k8s.io", namespace)
        assert can(control_plane, ROUTER, verb, "services", namespace)


def test_router_can_write_nothing_and_read_no_secret(control_plane: ControlPlane, rbac: None, namespace: str) -> None:
    table = rules(control_plane, ROUTER, namespace)
    assert table == {"endpointslices.discovery.k8s.io": {"list", "watch"}, "services": {"list", "watch"}}, table
    for verb in ("create", "update", "patch", "delete"):
        for resource in ("endpointslices.discovery.k8s.io", "services", "pods", "loraplacements.loraautoscaler.io"):
            assert not can(control_plane, ROUTER, verb, resource, namespace), f"the router may {verb} {resource}"
    assert not can(control_plane, ROUTER, "get", "secrets", namespace)


def test_accounts_are_distinct_principals(control_plane: ControlPlane, rbac: None, namespace: str) -> None:
    """Sanity of the method: what one account may do is not visible to another (impersonation is real)."""
    assert can(control_plane, CONTROLLER, "create", "loraplacements.loraautoscaler.io", namespace)
    assert not can(control_plane, ROUTER, "create", "loraplacements.loraautoscaler.io", namespace)
    assert not can(control_plane, WEBHOOK, "create", "loraplacements.loraautoscaler.io", namespace)
    assert not can(control_plane, "lora-autoscaler-nobody", "list", "pods", namespace)
