"""The webhook registered with a real kube-apiserver, and the real kubectl applying the manifests kept in
test/manifests: each invalid one prints the webhook's message, valid ones come back with the defaults,
warnings show, and ``--dry-run=server`` runs the same rules and writes nothing.

The webhook runs as its own process (``python -m webhook``) on 127.0.0.1 with its self-made CA, which it
writes into the configurations itself, exactly as in a cluster. The configurations are those of
config/webhook/manifests.yaml with the Service swapped for a URL and the namespace selector narrowed to
the namespaces this module labels, so that other tests sharing the control plane are never intercepted.
"""

from __future__ import annotations

import base64
import copy
import http.client
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from api import v1alpha1 as v1
from api.defaulting import apply_defaults

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "test" / "manifests"
INVALID = sorted((MANIFESTS / "invalid").glob("*.yaml"))
VALID = sorted((MANIFESTS / "valid").glob("*.yaml"))
TEST_LABEL = "loraautoscaler.io/webhook-test"
START_SECONDS = 60.0
INTERCEPT_SECONDS = 60.0
_POLL = 0.2


def _comments(path: Path, tag: str) -> list[str]:
    return [line.split(f"# {tag}: ", 1)[1] for line in path.read_text().splitlines() if line.startswith(f"# {tag}: ")]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningWebhook:
    """The webhook process and how to reach it."""

    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    cert_dir: Path
    configuration: str
    token: str
    log: Path

    def ca_pem(self) -> bytes:
        return (self.cert_dir / "ca.crt").read_bytes()

    def get(self, path: str, *, metrics: bool = False) -> tuple[int, str]:
        if metrics:
            conn: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=5)
        else:
            context = ssl.create_default_context(cadata=self.ca_pem().decode())
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=5, context=context)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


def _configurations(name: str, port: int, token: str) -> list[dict[str, Any]]:
    """config/webhook/manifests.yaml, pointed at https://127.0.0.1:<port> and at this module's namespaces."""
    docs = [d for d in yaml.safe_load_all((ROOT / "config" / "webhook" / "manifests.yaml").read_text()) if d]
    out = []
    for original in docs:
        doc = copy.deepcopy(original)
        doc["metadata"]["name"] = name
        for hook in doc["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}"}
            hook["namespaceSelector"]["matchLabels"] = {TEST_LABEL: token}
        out.append(doc)
    return out


def _wait(what: str, check: Any, deadline_seconds: float, describe: Any = lambda: "") -> Any:
    deadline = time.monotonic() + deadline_seconds
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(_POLL)
    raise AssertionError(f"timed out after {deadline_seconds:.0f}s waiting for {what}; {describe()}")


def start_webhook(  # noqa: PLR0917
    control_plane: Any, cert_dir: Path, name: str, token: str, secret_namespace: str, port: int
) -> RunningWebhook:
    """``python -m webhook`` on 127.0.0.1, self-signed with the CA shared through a Secret; ready on return."""
    metrics_port = _free_port()
    log = cert_dir.parent / f"{cert_dir.name}.log"
    argv = [
        sys.executable, "-m", "webhook", "--host", "127.0.0.1", "--port", str(port), "--metrics-host", "127.0.0.1",
        "--metrics-port", str(metrics_port), "--cert-dir", str(cert_dir), "--extra-san", "127.0.0.1",
        "--service-namespace", secret_namespace, "--ca-secret", "lora-autoscaler-webhook-ca",
        "--mutating-configuration", name, "--validating-configuration", name,
        "--kubeconfig", str(control_plane.kubeconfig), "--scale-timeout", "2", "--log-level", "INFO",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                   start_new_session=True)
    running = RunningWebhook(process, port, metrics_port, cert_dir, name, token, log)
    try:
        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the webhook exited with {process.returncode}: {running.logs()}")
            if not (cert_dir / "ca.crt").exists():
                return False
            try:
                return running.get("/readyz")[0] == 200
            except (OSError, ssl.SSLError):
                return False

        _wait("the webhook's /readyz (CA bundle published)", ready, START_SECONDS, running.logs)
    except BaseException:
        stop_webhook(running)
        raise
    return running


def stop_webhook(running: RunningWebhook) -> None:
    """SIGTERM (a graceful stop), then SIGKILL if it lingers; always reaped."""
    process = running.process
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def webhook(control_plane: Any, crds: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningWebhook]:
    """CRDs applied, configurations registered, the webhook process serving and its CA published."""
    token = f"t{uuid.uuid4().hex[:10]}"  # a letter first: YAML never reads it as a number
    name = f"lora-autoscaler-webhook-test-{token}"
    system = f"webhook-system-{token}"
    control_plane.kubectl("create", "namespace", system)
    running: RunningWebhook | None = None
    try:
        port = _free_port()
        control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(_configurations(name, port, token)))
        running = start_webhook(control_plane, tmp_path_factory.mktemp("webhook-certs"), name, token, system, port)
        yield running
    finally:
        control_plane.kubectl("delete", "mutatingwebhookconfiguration", name, "--ignore-not-found", check=False)
        control_plane.kubectl("delete", "validatingwebhookconfiguration", name, "--ignore-not-found", check=False)
        if running is not None:
            stop_webhook(running)
        control_plane.kubectl("delete", "namespace", system, "--wait=false", check=False)


def _bundles(control_plane: Any, name: str) -> set[str]:
    out: set[str] = set()
    for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
        doc = orjson.loads(control_plane.kubectl("get", kind, name, "-o", "json").stdout)
        out |= {h["clientConfig"].get("caBundle", "") for h in doc["webhooks"]}
    return out


def _versions(control_plane: Any, name: str) -> list[str]:
    return [orjson.loads(control_plane.kubectl("get", kind, name, "-o", "json").stdout)["metadata"]["resourceVersion"]
            for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration")]


@pytest.fixture
def ns(control_plane: Any, namespace: str, webhook: RunningWebhook) -> str:
    """A fresh namespace the webhook intercepts, once a server-side dry run shows it really does."""
    control_plane.kubectl("label", "namespace", namespace, f"{TEST_LABEL}={webhook.token}")
    probe = INVALID[0]

    def intercepted() -> bool:
        result = control_plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(probe), check=False)
        return "denied the request" in result.stderr

    _wait(f"the API server to call the webhook for namespace {namespace}", intercepted, INTERCEPT_SECONDS,
          webhook.logs)
    return namespace


def apply(control_plane: Any, ns: str, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = control_plane.kubectl("apply", "-n", ns, "-f", str(path), *extra,
                                                                     check=False)
    return result


def get(control_plane: Any, ns: str, kind: str, name: str) -> dict[str, Any] | None:
    result = control_plane.kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
    if result.returncode != 0:
        assert "NotFound" in result.stderr, result.stderr
        return None
    doc: dict[str, Any] = orjson.loads(result.stdout)
    return doc


def test_the_webhook_published_its_ca_into_both_configurations(control_plane: Any, webhook: RunningWebhook) -> None:
    assert _bundles(control_plane, webhook.configuration) == {base64.b64encode(webhook.ca_pem()).decode()}


def test_a_second_replica_shares_the_ca_and_leaves_the_configurations_alone(
    control_plane: Any, webhook: RunningWebhook, tmp_path: Path
) -> None:
    before = _versions(control_plane, webhook.configuration)
    system = f"webhook-system-{webhook.token}"
    second = start_webhook(control_plane, tmp_path / "replica-2", webhook.configuration, webhook.token, system,
                           _free_port())
    try:
        assert second.ca_pem() == webhook.ca_pem()
        assert (second.cert_dir / "tls.crt").read_bytes() != (webhook.cert_dir / "tls.crt").read_bytes()
        assert _versions(control_plane, webhook.configuration) == before  # ready, and nothing was patched
    finally:
        stop_webhook(second)


def test_every_invalid_manifest_is_refused_with_the_webhooks_message(control_plane: Any, ns: str) -> None:
    assert len(INVALID) >= 15
    failures = []
    for path in INVALID:
        result = apply(control_plane, ns, path)
        expects = _comments(path, "expect")
        missing = [e for e in expects if e not in result.stderr]
        if result.returncode == 0 or "denied the request" not in result.stderr or missing:
            failures.append(f"{path.name}: exit {result.returncode}, missing {missing}, stderr: {result.stderr}")
        doc = yaml.safe_load(path.read_text())
        assert get(control_plane, ns, doc["kind"].lower(), doc["metadata"]["name"]) is None
    assert not failures, "\n".join(failures)


def test_valid_manifests_come_back_with_the_defaults_and_their_warnings(control_plane: Any, ns: str) -> None:
    for path in VALID:
        result = apply(control_plane, ns, path)
        assert result.returncode == 0, f"{path.name}: {result.stderr}"
        for warning in _comments(path, "warn"):
            assert f"Warning: {warning}" in result.stderr, f"{path.name}: {result.stderr}"
        manifest = yaml.safe_load(path.read_text())
        stored = get(control_plane, ns, manifest["kind"].lower(), manifest["metadata"]["name"])
        assert stored is not None
        # The API server's defaults (from the CRD) and the webhook's agree field for field.
        assert stored["spec"] == apply_defaults(manifest["kind"], manifest)["spec"], path.name
    minimal = get(control_plane, ns, "loraautoscaler", "minimal")
    assert minimal is not None
    assert minimal["spec"]["vllm"]["maxLorasPerReplica"] == 4
    assert minimal["spec"]["scaling"]["scaleDown"]["windowSeconds"] == 60
    assert minimal["spec"]["adapters"][0]["minReplicas"] == 1


def test_server_dry_run_applies_the_same_rules_and_writes_nothing(control_plane: Any, ns: str) -> None:
    bad = MANIFESTS / "invalid" / "06-thresholds-inverted.yaml"
    result = apply(control_plane, ns, bad, "--dry-run=server")
    assert result.returncode != 0
    for expected in _comments(bad, "expect"):
        assert expected in result.stderr
    good = MANIFESTS / "valid" / "slow-sync.yaml"
    result = apply(control_plane, ns, good, "--dry-run=server")
    assert result.returncode == 0 and "(server dry run)" in result.stdout
    assert "Warning: spec.scaling.syncPeriodMilliseconds is 10000" in result.stderr
    assert get(control_plane, ns, "loraautoscaler", yaml.safe_load(good.read_text())["metadata"]["name"]) is None


def test_the_scale_target_cannot_change_after_creation(control_plane: Any, ns: str, tmp_path: Path) -> None:
    path = MANIFESTS / "valid" / "minimal.yaml"
    assert apply(control_plane, ns, path).returncode == 0
    moved = yaml.safe_load(path.read_text())
    moved["spec"]["scaleTargetRef"] = {"kind": "StatefulSet", "name": "other"}
    changed = tmp_path / "moved.yaml"
    changed.write_text(yaml.safe_dump(moved))
    result = apply(control_plane, ns, changed)
    assert result.returncode != 0
    assert ("spec.scaleTargetRef: is immutable (was Deployment vllm (apps/v1), now StatefulSet other (apps/v1)): "
            "create a new LoRAAutoscaler") in result.stderr
    # Other changes are fine.
    moved["spec"]["scaleTargetRef"] = {"kind": "Deployment", "name": "vllm"}
    moved["spec"]["vllm"] = {"maxLorasPerReplica": 8}
    changed.write_text(yaml.safe_dump(moved))
    assert apply(control_plane, ns, changed).returncode == 0


def test_capacity_is_checked_against_the_targets_scale_subresource(control_plane: Any, ns: str,
                                                                   tmp_path: Path) -> None:
    spec = {
        "scaleTargetRef": {"kind": "Deployment", "name": "vllm"},
        "adapters": [{"name": f"lora-{i}", "source": f"/models/{i}"} for i in range(5)],
        "vllm": {"maxLorasPerReplica": 4},
    }
    manifest = tmp_path / "five.yaml"
    manifest.write_text(yaml.safe_dump({"apiVersion": v1.API_VERSION, "kind": v1.AUTOSCALER_KIND,
                                        "metadata": {"name": "five"}, "spec": spec}))
    result = apply(control_plane, ns, manifest, "--dry-run=server")
    assert result.returncode == 0
    assert "Warning: spec.scaleTargetRef: Deployment vllm does not exist yet" in result.stderr
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "vllm"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "vllm"}},
                 "template": {"metadata": {"labels": {"app": "vllm"}},
                              "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]}}},
    }  # fmt: skip
    control_plane.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(deployment))
    warning = ("Warning: spec.adapters: their minReplicas add up to 5 but Deployment vllm has 1 replicas x "
               "maxLorasPerReplica 4 = 4 slots")

    def warned() -> bool:  # the webhook caches a target's replicas for two seconds
        return warning in apply(control_plane, ns, manifest, "--dry-run=server").stderr

    _wait("the capacity warning", warned, 15)
    control_plane.kubectl("scale", "-n", ns, "deployment/vllm", "--replicas=2")

    def quiet() -> bool:
        out = apply(control_plane, ns, manifest)
        return out.returncode == 0 and "Warning" not in out.stderr

    _wait("the warning to go once the target has room", quiet, 15)


def test_metrics_count_the_admissions_on_the_plain_port(webhook: RunningWebhook, ns: str) -> None:
    status, text = webhook.get("/metrics", metrics=True)
    assert status == 200
    denied = [line for line in text.splitlines() if line.startswith("lora_webhook_admissions_total{")
              and 'result="denied"' in line and 'webhook="mutate"' in line]
    assert denied and float(denied[0].rsplit(" ", 1)[1]) >= 1
    assert "lora_webhook_admission_duration_seconds_bucket" in text
