"""What the reliability scenarios run: workloads, controller and router processes, a load generator.

Everything here starts real parts (``python -m controller``, ``python -m router``, the test kubelet's
simulators) and always stops what it started, by process group, even when a scenario fails.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from common.kube import LEASES, ApiError, KubeClient
from localkube.controlplane import ControlPlane
from localkube.podspec import SIM_ARGS_ANNOTATION
from localkube.wait import wait_until

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
BASE_MODEL = "tiny"
APP_LABEL = "app"
VLLM_PORT = 8000
LEASE_NAME = "lora-autoscaler-controller"
CRD_NAMES = ("loraautoscalers.loraautoscaler.io", "loraplacements.loraautoscaler.io")
# Short lease timings so a standby takes over within seconds of a SIGKILL (client-go's are 15/10/2).
LEASE = ("3", "2", "0.5")


def install_crds(cp: ControlPlane) -> None:
    """The CRDs as users install them (the figures script has no pytest fixture to do it)."""
    cp.kubectl("apply", "-k", str(ROOT / "config" / "crd"))
    cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", *[f"crd/{n}" for n in CRD_NAMES], timeout=90)


def apply(cp: ControlPlane, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return cp.kubectl("apply", "-f", "-", input=json.dumps(obj))


def get_json(cp: ControlPlane, *args: str) -> Any:
    return json.loads(cp.kubectl("get", *args, "-o", "json").stdout)


def vllm_deployment(name: str, namespace: str, replicas: int, *, max_loras: int = 4, sim_args: str = "",
                    api_key_secret: str | None = None) -> dict[str, Any]:
    """A Deployment written for vLLM; the test kubelet runs a simulator for each of its pods."""
    meta: dict[str, Any] = {"labels": {"app": name}}
    if sim_args:
        meta["annotations"] = {SIM_ARGS_ANNOTATION: sim_args}
    env: list[dict[str, Any]] = [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "true"}]
    if api_key_secret:
        env.append({"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": api_key_secret, "key": "key"}}})
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": meta, "spec": {"containers": [{
                "name": "vllm", "image": "vllm/vllm-openai:v0.32.0",
                "command": ["vllm", "serve", BASE_MODEL, "--enable-lora", "--max-loras", str(max_loras),
                            "--max-cpu-loras", str(max(max_loras, 8))],
                "ports": [{"name": "http", "containerPort": VLLM_PORT}],
                "env": env,
            }]}},
        },
    }


def autoscaler(name: str, namespace: str, target: str, adapters: Sequence[tuple[str, int]], *, max_loras: int = 4,
               drain_timeout: int = 5, max_load_attempts: int = 3, api_key_secret: str | None = None,
               **spec: Any) -> dict[str, Any]:
    """A LoRAAutoscaler for ``target``; ``adapters`` are (name, minReplicas)."""
    vllm: dict[str, Any] = {"port": VLLM_PORT, "maxLorasPerReplica": max_loras, "maxLoadAttempts": max_load_attempts,
                            "loadTimeoutSeconds": 10}
    if api_key_secret:
        vllm["apiKeySecretRef"] = {"name": api_key_secret, "key": "key"}
    body: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
        "vllm": vllm,
        "placementMode": "strict",  # the invariants count strict mode's copies
        "adapters": [{"name": a, "source": f"/adapters/{a}", "minReplicas": m} for a, m in adapters],
        "scaling": {"scaleDown": {"drainTimeoutSeconds": drain_timeout}},
    }
    body.update(spec)
    return {"apiVersion": "loraautoscaler.io/v1alpha1", "kind": "LoRAAutoscaler",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}


def ready_pods(cp: ControlPlane, namespace: str, app: str) -> list[dict[str, Any]]:
    items = get_json(cp, "pods", "-n", namespace, "-l", f"app={app}")["items"]
    ready = [p for p in items if not p["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in (p.get("status") or {}).get("conditions") or [])]
    return sorted(ready, key=lambda p: (p["metadata"]["creationTimestamp"], p["metadata"]["name"]))


def wait_ready(cp: ControlPlane, namespace: str, app: str, count: int, timeout: float = 60) -> list[dict[str, Any]]:
    def probe() -> list[dict[str, Any]] | None:
        found = ready_pods(cp, namespace, app)
        return found if len(found) == count else None

    return wait_until(probe, timeout=timeout, what=f"{count} ready pods of {app}")


def placements(cp: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    return list(get_json(cp, "loraplacements", "-n", namespace)["items"])


def sim_call(ip: str, method: str, path: str, body: Any = None, *, timeout: float = 5.0) -> tuple[int, Any]:
    """One call to a simulator (its /sim/ control API or its OpenAI API): (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection(ip, VLLM_PORT, timeout=timeout)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


# ---- processes --------------------------------------------------------------------------------------


class Proc:
    """A child process in its own session, its output in a log file; stopped by process group."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        with log_path.open("ab") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                          env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 15.0) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            return self.popen.wait(10)


def start_controller(cp: ControlPlane, namespace: str, identity: str, log_dir: Path, *,
                     log_level: str = "INFO", leader_elect: bool = True) -> Proc:
    """``python -m controller`` for one namespace, with short lease timings."""
    argv = [sys.executable, "-m", "controller", "--kubeconfig", str(cp.kubeconfig), "--namespace", namespace,
            "--lease-namespace", namespace, "--identity", identity, "--metrics-port", "0", "--metrics-host",
            "127.0.0.1", "--audit-period", "1", "--workers", "4", "--lease-duration", LEASE[0],
            "--renew-deadline", LEASE[1], "--retry-period", LEASE[2], "--log-level", log_level]
    if not leader_elect:
        argv.append("--no-leader-elect")
    return Proc(argv, log_dir / f"controller-{identity}.log")


def lease_holder(kube: KubeClient, namespace: str) -> str | None:
    try:
        lease = kube.get(LEASES, LEASE_NAME, namespace, timeout=(2.0, 5.0))
    except ApiError:
        return None
    return (lease.get("spec") or {}).get("holderIdentity") or None


class ControllerPair:
    """Two leader-elected controller processes; the leader can be killed and replaced by a new standby."""

    def __init__(self, cp: ControlPlane, kube: KubeClient, namespace: str, log_dir: Path) -> None:
        self.cp, self.kube, self.namespace, self.log_dir = cp, kube, namespace, log_dir
        self.procs: dict[str, Proc] = {}
        self._ids = itertools.count()
        self.killed = 0

    def _spawn(self) -> str:
        identity = f"c{next(self._ids)}"
        self.procs[identity] = start_controller(self.cp, self.namespace, identity, self.log_dir)
        return identity

    def start(self) -> ControllerPair:
        self._spawn()
        self._spawn()
        self.wait_leader(40)
        return self

    def wait_leader(self, timeout: float = 30) -> str:
        """The identity holding the Lease, once it is one of our live processes."""
        def probe() -> str | None:
            holder = lease_holder(self.kube, self.namespace)
            proc = self.procs.get(holder or "")
            return holder if proc is not None and proc.alive() else None

        return wait_until(probe, timeout=timeout, what="a live controller holding the Lease", interval=0.1)

    def kill_leader(self) -> str:
        """SIGKILL the leader (no lease release, as a crash) and start a new standby in its place."""
        leader = self.wait_leader(30)
        self.procs.pop(leader).kill(signal.SIGKILL)
        self.killed += 1
        self._spawn()
        return leader

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log()[-3000:]}" for p in self.procs.values())

    def all_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("controller-*.log")))

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill(signal.SIGTERM)
        self.procs.clear()


class Router:
    """``python -m router`` following one autoscaler's route table; ``url`` once it serves."""

    def __init__(self, cp: ControlPlane | None, namespace: str | None, autoscaler: str | None, log_dir: Path, *,
                 routes_file: Path | None = None, api_key_file: Path | None = None, max_body_bytes: int | None = None,
                 log_level: str = "info", queue_timeout: float = 5.0) -> None:
        argv = [sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                "--queue-timeout", str(queue_timeout), "--first-byte-timeout", "20", "--total-timeout", "60",
                "--log-level", log_level]
        if routes_file is not None:
            argv += ["--routes-file", str(routes_file)]
        else:
            assert cp is not None and namespace and autoscaler
            argv += ["--kubeconfig", str(cp.kubeconfig), "--namespace", namespace, "--autoscaler", autoscaler]
        if api_key_file is not None:
            argv += ["--api-key-file", str(api_key_file)]
        if max_body_bytes is not None:
            argv += ["--max-body-bytes", str(max_body_bytes)]
        self.proc = Proc(argv, log_dir / "router.log")
        self.port = 0
        self.metrics_port = 0

    def start(self, timeout: float = 60) -> Router:
        def bound() -> tuple[int, int] | None:
            if not self.proc.alive():
                raise AssertionError(f"the router exited: {self.proc.log()[-3000:]}")
            m = re.search(r"router on [^\s]+:(\d+) \(metrics on (\d+)\)", self.proc.log())
            return (int(m.group(1)), int(m.group(2))) if m else None

        self.port, self.metrics_port = wait_until(bound, timeout=timeout, what="the router serving")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a router metric's samples whose labels include ``labels``."""
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=5)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name) or line.startswith("#") or line[len(name)] not in " {":
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self.proc.kill(signal.SIGTERM)


# ---- load -------------------------------------------------------------------------------------------


Record = Callable[..., None]  # checker.request(ok, reason, expected=...)


def post(url: str, path: str, body: bytes, *, headers: dict[str, str] | None = None,
         timeout: float = 30.0) -> tuple[int, bytes]:
    """One POST; (status, body). Status 0 with the error text when no answer came."""
    m = re.match(r"http://([^:/]+):(\d+)", url)
    assert m, url
    conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    except OSError as exc:
        return 0, f"{type(exc).__name__}: {exc}".encode()
    finally:
        conn.close()


class Load:
    """Steady completions through the router for a fixed set of adapters, each recorded by the checker.

    ``expected(status, body)`` says when a failure is the injected fault itself (a 5xx the pod was told to
    answer), so the figures can tell the product's failures from the fault's.
    """

    def __init__(self, url: str, adapters: Sequence[str], record: Record, *, rate: float = 8.0, workers: int = 4,
                 max_tokens: int = 4, expected: Callable[[int, bytes], bool] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.url, self.adapters, self.record = url, list(adapters), record
        self.rate, self.workers, self.max_tokens = rate, workers, max_tokens
        self.expected = expected or (lambda _s, _b: False)
        self.headers = headers or {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._seq = itertools.count()
        self.failures: list[tuple[float, str, int, str]] = []

    def _worker(self) -> None:
        period = self.workers / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            adapter = self.adapters[next(self._seq) % len(self.adapters)]
            body = json.dumps({"model": adapter, "prompt": "hello there", "max_tokens": self.max_tokens}).encode()
            status, answer = post(self.url, "/v1/completions", body, headers=self.headers)
            if status == 200:
                self.record(True)
            else:
                text = answer.decode(errors="replace")
                with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                    text = json.loads(answer)["error"]["message"]
                reason = f"{status or 'no answer'}: {text[:90]}"
                self.failures.append((time.time(), adapter, status, text[:300]))
                self.record(False, reason, expected=self.expected(status, answer))
            next_at += period
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def start(self) -> Load:
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, name=f"load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(40)


@contextlib.contextmanager
def running(*things: Any) -> Iterator[None]:
    """Stop each of ``things`` (anything with ``stop()``) on the way out, last started first."""
    try:
        yield
    finally:
        for thing in reversed(things):
            try:
                thing.stop()
            except Exception:
                log.exception("stopping %r failed", thing)


# ---- the webhook ------------------------------------------------------------------------------------


WEBHOOK_TEST_LABEL = "loraautoscaler.io/reliability-test"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def webhook_configurations(name: str, token: str, *, mutate_port: int, validate_port: int) -> list[dict[str, Any]]:
    """config/webhook/manifests.yaml pointed at 127.0.0.1 ports and narrowed to namespaces labelled ``token``.

    The failure policies, rules and scopes are the shipped ones: only where the API server sends the review
    and which namespaces are intercepted change (other tests share the control plane).
    """
    import copy

    import yaml

    docs = [d for d in yaml.safe_load_all((ROOT / "config" / "webhook" / "manifests.yaml").read_text()) if d]
    out = []
    for original in docs:
        doc = copy.deepcopy(original)
        doc["metadata"]["name"] = name
        for hook in doc["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            port = mutate_port if path == "/mutate" else validate_port
            hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{path}"}
            hook["namespaceSelector"]["matchLabels"] = {WEBHOOK_TEST_LABEL: token}
        out.append(doc)
    return out


class Webhook:
    """``python -m webhook`` on 127.0.0.1 with its self-made CA; publishes the CA into ``configuration``."""

    def __init__(self, cp: ControlPlane | None, log_dir: Path, *, port: int, configuration: str = "",
                 ca_namespace: str = "", max_body_bytes: int | None = None) -> None:
        self.port = port
        self.metrics_port = free_port()
        self.cert_dir = log_dir / f"webhook-certs-{port}"
        argv = [sys.executable, "-m", "webhook", "--host", "127.0.0.1", "--port", str(port), "--metrics-host",
                "127.0.0.1", "--metrics-port", str(self.metrics_port), "--cert-dir", str(self.cert_dir),
                "--extra-san", "127.0.0.1", "--mutating-configuration", configuration,
                "--validating-configuration", configuration, "--log-level", "INFO", "--scale-timeout", "2"]
        if cp is not None:
            argv += ["--kubeconfig", str(cp.kubeconfig), "--service-namespace", ca_namespace]
        else:
            argv += ["--ca-secret", "", "--capacity-check", "off"]
        if max_body_bytes is not None:
            argv += ["--max-body-bytes", str(max_body_bytes)]
        self.proc = Proc(argv, log_dir / f"webhook-{port}.log")

    def ca_pem(self) -> bytes:
        return (self.cert_dir / "ca.crt").read_bytes()

    def https(self, method: str, path: str, body: bytes | None = None, *, content_type: str = "application/json",
              timeout: float = 10.0) -> tuple[int, bytes]:
        import ssl

        context = ssl.create_default_context(cadata=self.ca_pem().decode())
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=context)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": content_type} if body is not None else {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def admissions(self, endpoint: str = "validate") -> float:
        """How many reviews the API server sent to ``endpoint`` (from the plain-HTTP metrics port)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=5)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("lora_webhook_admissions_total{") and f'webhook="{endpoint}"' in line)

    def start(self, timeout: float = 60) -> Webhook:
        def ready() -> bool:
            if not self.proc.alive():
                raise AssertionError(f"the webhook exited: {self.proc.log()[-3000:]}")
            if not (self.cert_dir / "ca.crt").exists():
                return False
            try:
                return self.https("GET", "/readyz")[0] == 200
            except OSError:
                return False

        wait_until(ready, timeout=timeout, what="the webhook ready (CA published)", interval=0.2)
        return self

    def stop(self) -> None:
        self.proc.kill(signal.SIGTERM)
