"""Everything the demo runs: the local control plane, a test kubelet, the webhook, controller and router.

Built from the same parts as the integration tests (`localkube`), started the way a user would start
them: the components are subprocesses (their logs in the output folder), manifests go through the real
kubectl and the admission webhook. :meth:`DemoCluster.stop` undoes everything, in reverse order, and is
safe to call at any point of the start-up (also after Ctrl-C).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from common.kube import LORA_AUTOSCALERS, PODS, KubeClient
from localkube.controlplane import ControlPlane, free_port
from localkube.kubelet import TestKubelet
from localkube.process import ManagedProcess
from localkube.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
NAMESPACE = "lora-demo"
SYSTEM_NAMESPACE = "lora-system"
AUTOSCALER = "demo"
POD_SELECTOR = "app.kubernetes.io/name=vllm"
LOOPBACK = "127.0.0.1"


def _load_yaml(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{path} does not hold one object")
    return doc


def autoscaler_manifest(router_metrics_url: str) -> dict[str, Any]:
    """hack/demo/manifests/loraautoscaler.yaml with the router this run started as its load source."""
    obj = _load_yaml(HERE / "manifests" / "loraautoscaler.yaml")
    obj["metadata"]["namespace"] = NAMESPACE
    obj["spec"]["scaling"]["metric"]["routerUrl"] = router_metrics_url
    return obj


def adapter_names() -> list[str]:
    return [a["name"] for a in _load_yaml(HERE / "manifests" / "loraautoscaler.yaml")["spec"]["adapters"]]


def deployment_manifest() -> dict[str, Any]:
    obj = _load_yaml(HERE / "manifests" / "vllm-deployment.yaml")
    obj["metadata"]["namespace"] = NAMESPACE
    return obj


def webhook_configurations(port: int) -> list[dict[str, Any]]:
    """config/webhook/manifests.yaml, each webhook pointed at a URL on loopback instead of a Service."""
    docs = [d for d in yaml.safe_load_all((ROOT / "config" / "webhook" / "manifests.yaml").read_text()) if d]
    for doc in docs:
        for hook in doc.get("webhooks") or []:
            path = hook["clientConfig"]["service"].get("path", "/")
            hook["clientConfig"] = {"url": f"https://{LOOPBACK}:{port}{path}"}
    return docs


def _child_env(kubeconfig: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(KUBECONFIG=str(kubeconfig), PYTHONUNBUFFERED="1")
    return env


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(url, timeout=2) as resp:
            return 200 <= resp.status < 300
    except (OSError, ValueError):
        return False


class DemoCluster:
    """The running system of one demo; `start()` brings it up step by step, `stop()` takes it down."""

    def __init__(self, out: Path, say: Callable[[str], None]) -> None:
        self.out = out
        self.logs = out / "logs"
        self.say = say
        self.cp: ControlPlane | None = None
        self.kubelet: TestKubelet | None = None
        self.kube: KubeClient | None = None
        self.procs: list[ManagedProcess] = []
        self._undo: list[Callable[[], None]] = []
        self.router_port = 0
        self.router_metrics_port = 0
        self.controller_metrics_port = 0

    # --- start-up -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Control plane, kubelet, CRDs, webhook, controller, router, in that order."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.say("starting the local control plane (etcd, kube-apiserver, kube-controller-manager)")
        self.cp = cp = ControlPlane(start_timeout=120.0)
        self._undo.append(self._stop_control_plane)
        cp.start()
        self.say(f"control plane ready in {cp.startup_seconds:.1f}s at {cp.server}")
        self.kube = KubeClient(cp.api_client())
        cp.kubectl("create", "namespace", NAMESPACE)
        cp.kubectl("create", "namespace", SYSTEM_NAMESPACE)  # where the webhook keeps its CA, as when installed

        self.kubelet = TestKubelet(cp.api_client(), node_name="demo-node", namespace=NAMESPACE,
                                   work_dir=self.logs / "kubelet")
        self._undo.append(self.kubelet.stop)
        self.kubelet.start()
        self.say("test kubelet on node demo-node: one vLLM simulator per pod, in a pod network of its own")

        self._install_crds()
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                   "crd/loraautoscalers.loraautoscaler.io", "crd/loraplacements.loraautoscaler.io")
        self._start_webhook()
        self._start_controller()
        self._start_router()

    def _install_crds(self) -> None:
        assert self.cp is not None
        self.say("kubectl apply -k config/crd")
        self.cp.kubectl("apply", "-k", str(ROOT / "config" / "crd"))

    def _spawn(self, name: str, *args: str) -> ManagedProcess:
        assert self.cp is not None
        proc = ManagedProcess(name, [sys.executable, "-m", *args], self.logs / f"{name}.log",
                              env=_child_env(self.cp.kubeconfig), cwd=ROOT)
        self.procs.append(proc)
        proc.start()
        return proc

    def _wait_up(self, proc: ManagedProcess, what: str, probe: Callable[[], bool], timeout: float = 60.0) -> None:
        def check() -> bool:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.returncode}; its log ends:\n{proc.log_tail(15)}")
            return probe()

        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} within {timeout:.0f}s; see {proc.log_path}")
            time.sleep(0.2)

    def _start_webhook(self) -> None:
        assert self.cp is not None
        port = free_port()
        cert_dir = self.out / "webhook-certs"
        configurations = webhook_configurations(port)
        self.say(f"registering the admission webhook at https://{LOOPBACK}:{port} (url clientConfig)")
        self.cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                               "items": configurations}))
        proc = self._spawn("webhook", "webhook", "--host", LOOPBACK, "--port", str(port), "--metrics-port", "0",
                           "--cert-dir", str(cert_dir), "--extra-san", LOOPBACK,
                           "--service-namespace", SYSTEM_NAMESPACE)
        def ready() -> bool:  # the CA file is read each time: a stale one may be there until the webhook replaces it
            try:
                context = ssl.create_default_context(cafile=str(cert_dir / "ca.crt"))
            except (OSError, ssl.SSLError):
                return False
            return _http_ok(f"https://{LOOPBACK}:{port}/readyz", context)

        self._wait_up(proc, "the webhook did not become ready (serving TLS and its CA bundle published)", ready)
        self.say("webhook ready: self-signed CA made and written into both webhook configurations")

    def _start_controller(self) -> None:
        port = self.controller_metrics_port = free_port()
        proc = self._spawn("controller", "controller", "--namespace", NAMESPACE, "--lease-namespace", NAMESPACE,
                           "--metrics-host", LOOPBACK, "--metrics-port", str(port), "--audit-period", "2")

        def leading() -> bool:
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                        f"http://{LOOPBACK}:{port}/metrics", timeout=2) as resp:
                    text = resp.read().decode()
            except OSError:
                return False
            return any(line.startswith("lora_controller_is_leader 1") for line in text.splitlines())

        self._wait_up(proc, "the controller did not win the leader election", leading)
        self.say(f"controller running, leader of Lease {NAMESPACE}/lora-autoscaler-controller")

    def _start_router(self) -> None:
        self.router_port, self.router_metrics_port = free_port(), free_port()
        while self.router_metrics_port == self.router_port:
            self.router_metrics_port = free_port()
        proc = self._spawn("router", "router", "--host", LOOPBACK, "--port", str(self.router_port),
                           "--metrics-port", str(self.router_metrics_port), "--namespace", NAMESPACE,
                           "--autoscaler", AUTOSCALER, "--strategy", "lora-aware")
        self._wait_up(proc, "the router did not load its route table",
                      lambda: _http_ok(f"http://{LOOPBACK}:{self.router_port}/health"))
        self.say(f"router (--strategy lora-aware) on http://{LOOPBACK}:{self.router_port}, "
                 f"load and metrics on :{self.router_metrics_port}")

    # --- the workload ---------------------------------------------------------------------------------

    @property
    def router_url(self) -> str:
        return f"http://{LOOPBACK}:{self.router_port}"

    @property
    def router_metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.router_metrics_port}"

    def kubectl_apply(self, obj: dict[str, Any]) -> None:
        """`kubectl apply` through the API server and its webhooks; shows kubectl's output and warnings."""
        assert self.cp is not None
        done = self.cp.kubectl("apply", "-f", "-", input=json.dumps(obj))
        for line in (done.stdout + done.stderr).splitlines():
            if line.strip():
                self.say(f"  kubectl: {line.strip()}")

    def deploy(self, replicas: int, timeout: float = 120.0) -> None:
        """The vLLM Deployment, then the LoRAAutoscaler; returns once every adapter is routable."""
        assert self.cp is not None and self.kube is not None
        kube = self.kube
        deployment = deployment_manifest()
        deployment["spec"]["replicas"] = replicas
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        self.say(f"kubectl apply: Deployment vllm ({replicas} replicas: "
                 f"{' '.join(container['command'] + container['args'])})")
        self.kubectl_apply(deployment)

        def ready_pods() -> list[str] | None:
            items = kube.list(PODS, NAMESPACE, label_selector=POD_SELECTOR)["items"]
            names = [p["metadata"]["name"] for p in items if any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (p.get("status") or {}).get("conditions") or [])]
            return sorted(names) if len(names) == replicas else None

        wait_until(ready_pods, timeout=timeout, what=f"{replicas} ready vLLM pods", interval=0.3)
        ips = {p["metadata"]["name"]: (p.get("status") or {}).get("podIP", "")
               for p in kube.list(PODS, NAMESPACE, label_selector=POD_SELECTOR)["items"]}
        self.say(f"{replicas} vLLM pods ready: " + ", ".join(f"{name} ({ip})" for name, ip in sorted(ips.items())))
        if any(ip.startswith("127.") for ip in ips.values()):
            raise RuntimeError("the pods got loopback addresses, which the API server refuses in EndpointSlices, so "
                               "no route table can list them; the test kubelet's pod network needs root and "
                               "iproute2 (see its log line above)")
        autoscaler = autoscaler_manifest(self.router_metrics_url)
        self.say(f"kubectl apply: LoRAAutoscaler {AUTOSCALER} ({len(autoscaler['spec']['adapters'])} adapters, "
                 f"load from the router at {self.router_metrics_url})")
        self.kubectl_apply(autoscaler)
        applied = kube.get(LORA_AUTOSCALERS, AUTOSCALER, NAMESPACE)
        vllm = applied["spec"].get("vllm") or {}
        self.say(f"  defaults filled in by the webhook: vllm.loadTimeoutSeconds={vllm.get('loadTimeoutSeconds')}, "
                 f"vllm.maxLoadAttempts={vllm.get('maxLoadAttempts')}, placementMode="
                 f"{applied['spec'].get('placementMode')}, podAutoscaling.mode="
                 f"{(applied['spec'].get('podAutoscaling') or {}).get('mode')}")

        def all_routable() -> bool:
            obj = kube.get(LORA_AUTOSCALERS, AUTOSCALER, NAMESPACE)
            ready = any(c["type"] == "Ready" and c["status"] == "True"
                        for c in (obj.get("status") or {}).get("conditions") or [])
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    f"{self.router_metrics_url}/router/load", timeout=2) as resp:
                models = json.loads(resp.read()).get("models") or {}
            names = [a["name"] for a in autoscaler["spec"]["adapters"]]
            return ready and all((models.get(n) or {}).get("routable") for n in names)

        wait_until(all_routable, timeout=timeout, what="every adapter Ready in the status and routable in the router",
                   interval=0.5)
        self.say("every adapter is loaded, in the route table, and known to the router")

    def pod_addresses(self) -> dict[str, str]:
        """pod name -> ip:port of each running simulator."""
        if self.kubelet is None:
            return {}
        out = {}
        for namespace, name in self.kubelet.running_pods():
            with contextlib.suppress(KeyError):
                ip, port = self.kubelet.pod_address(namespace, name)
                out[name] = f"{ip}:{port}"
        return out

    # --- teardown -------------------------------------------------------------------------------------

    def _stop_control_plane(self) -> None:
        if self.cp is None:
            return
        with contextlib.suppress(Exception):
            shutil.copytree(self.cp.work_dir / "logs", self.logs / "control-plane", dirs_exist_ok=True)
        self.cp.stop()

    def stop(self) -> None:
        """Stop every process this demo started (router, controller, webhook, simulators, control plane)."""
        for proc in reversed(self.procs):
            proc.stop(grace=5.0)
        self.procs.clear()
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:
                self.say(f"cleanup step failed: {exc}")
        if self.kube is not None:
            with contextlib.suppress(Exception):
                self.kube.api_client.close()
