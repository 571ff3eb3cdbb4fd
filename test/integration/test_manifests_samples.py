"""Every sample in config/samples/ is accepted by the API server with the admission webhook registered.

The webhook runs as its own process (`python -m webhook`, self-signed mode, publishing its CA the way it
does in a cluster) and is registered with the real kube-apiserver through the webhook configurations of
config/webhook/, with two changes only: a URL on loopback instead of the in-cluster Service (there is no
Service network here), and a namespaceSelector confined to this module's namespace, so that no other test
of the session passes through it. Rules, failure policies and paths are the shipped ones.
"""

from __future__ import annotations

import json
import re
import ssl
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from localkube.controlplane import ControlPlane, free_port
from localkube.process import ManagedProcess
from localkube.wait import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "config" / "samples").glob("*.yaml"))
AUTOSCALER = "LoRAAutoscaler"


@dataclass
class Webhook:
    namespace: str
    metrics_url: str
    process: ManagedProcess

    def admissions(self, endpoint: str, kind: str, result: str) -> float:
        """lora_webhook_admissions_total for one endpoint, kind and result, summed over operations."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("lora_webhook_admissions_total{") and f'webhook="{endpoint}"' in line \
                    and f'kind="{kind}"' in line and f'result="{result}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total


def _configurations(name: str, namespace: str, port: int) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((ROOT / "config" / "webhook" / "manifests.yaml").read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert kinds == {"MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}, kinds
    for doc in docs:
        doc["metadata"] = {"name": name}
        for hook in doc["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}"}
            hook["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    return docs


@pytest.fixture(scope="module")
def webhook(control_plane: ControlPlane, crds: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    cp = control_plane
    suffix = uuid.uuid4().hex[:6]
    namespace, name = f"samples-{suffix}", f"lora-samples-{suffix}"
    port, metrics_port = free_port(), free_port()
    work = tmp_path_factory.mktemp("webhook")
    cp.kubectl("create", "namespace", namespace)
    configurations = _configurations(name, namespace, port)
    cp.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": configurations}))
    process = ManagedProcess("lora-webhook", [
        sys.executable, "-m", "webhook", "--cert-source=self-signed", f"--cert-dir={work / 'certs'}",
        "--host=127.0.0.1", f"--port={port}", "--metrics-host=127.0.0.1", f"--metrics-port={metrics_port}",
        "--extra-san=127.0.0.1", f"--kubeconfig={cp.kubeconfig}", f"--service-namespace={namespace}",
        f"--mutating-configuration={name}", f"--validating-configuration={name}",
    ], work / "webhook.log", cwd=ROOT)
    process.start()
    try:
        def published() -> bool:
            if not process.alive():
                raise AssertionError(f"lora-webhook exited:\n{process.log_tail()}")
            for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
                hooks = json.loads(cp.kubectl("get", kind, name, "-o", "json").stdout)["webhooks"]
                if not all(h["clientConfig"].get("caBundle") for h in hooks):
                    return False
            context = ssl.create_default_context(cafile=str(work / "certs" / "ca.crt"))
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=context, timeout=2) as r:
                return bool(r.status == 200)

        wait_until(published, timeout=30, interval=0.2, what="the webhook's CA in both configurations, /readyz 200")
        yield Webhook(namespace, f"http://127.0.0.1:{metrics_port}/metrics", process)
    finally:
        process.stop()
        for doc in configurations:
            cp.kubectl("delete", doc["kind"].lower(), name, "--ignore-not-found", check=False)
        cp.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _documents() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p.name}:{d['kind']}/{d['metadata']['name']}", d)
            for p in SAMPLES for d in yaml.safe_load_all(p.read_text()) if d]


def test_there_are_samples() -> None:
    kinds = [d["kind"] for _, d in _documents()]
    assert kinds.count(AUTOSCALER) >= 2 and "Deployment" in kinds, kinds


@pytest.mark.parametrize(("label", "doc"), _documents(), ids=[label for label, _ in _documents()])
def test_sample_passes_the_webhook_and_the_api_server(
    control_plane: ControlPlane, webhook: Webhook, label: str, doc: dict[str, Any]
) -> None:
    before = webhook.admissions("validate", AUTOSCALER, "allowed")
    result = control_plane.kubectl("apply", "--dry-run=server", "-n", webhook.namespace, "-o", "json",
                                   "-f", "-", input=json.dumps(doc), check=False)
    assert result.returncode == 0, f"{label} was refused:\n{result.stderr}"
    applied = json.loads(result.stdout)
    if doc["kind"] == AUTOSCALER:
        # The webhook saw it and allowed it (not only the CRD schema) ...
        assert webhook.admissions("validate", AUTOSCALER, "allowed") == before + 1, webhook.process.log_tail()
        # ... and what would be stored is the effective spec, every default filled in.
        spec = applied["spec"]
        assert spec["scaling"]["scaleDown"]["threshold"] < spec["scaling"]["scaleUp"]["threshold"]
        assert all(a["minReplicas"] >= 1 for a in spec["adapters"])
        assert "maxLorasPerReplica" in spec["vllm"] and "mode" in spec["podAutoscaling"]


def test_the_registered_webhook_really_judges(control_plane: ControlPlane, webhook: Webhook) -> None:
    """The positive control: with the same registration, a wrong autoscaler is denied by the webhook."""
    bad = yaml.safe_load((ROOT / "test" / "manifests" / "invalid" / "02-max-below-min.yaml").read_text())
    result = control_plane.kubectl("apply", "--dry-run=server", "-n", webhook.namespace, "-f", "-",
                                   input=json.dumps(bad), check=False)
    assert result.returncode != 0
    assert re.search(r'admission webhook "[a-z.-]+loraautoscaler\.io" denied the request', result.stderr), result.stderr
    assert "maxReplicas" in result.stderr


def test_autoscaler_samples_agree_with_the_vllm_sample() -> None:
    """The Deployment sample is what the autoscaler sample targets: same name, port, --max-loras and
    --max-cpu-loras, and runtime LoRA updating switched on (without it every load answers 404)."""
    docs = dict(_documents())
    (deployment,) = [d for d in docs.values() if d["kind"] == "Deployment"]
    autoscalers = [d for d in docs.values() if d["kind"] == AUTOSCALER
                   and d["spec"]["scaleTargetRef"]["kind"] == "Deployment"]
    assert autoscalers, "no autoscaler sample targets the Deployment sample"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    argv = [*container.get("command", []), *container.get("args", [])]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") in ("true", "True", "1")
    assert "--enable-lora" in argv
    max_loras = next(int(a.split("=", 1)[1]) for a in argv if a.startswith("--max-loras="))
    cpu_loras = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--max-cpu-loras=")), max_loras)
    ports = {p["containerPort"] for p in container["ports"]}
    for auto in autoscalers:
        assert auto["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert auto["spec"]["vllm"]["maxLorasPerReplica"] == max_loras
        assert auto["spec"]["vllm"].get("maxCpuLorasPerReplica", max_loras) == cpu_loras
        assert auto["spec"]["vllm"]["port"] in ports
