"""Autoscaling end to end: a real API server and kube-controller-manager (its HPA controller syncs every
second), the test kubelet running one vLLM simulator per pod on its pod network, the router as a
subprocess in front of them, and the controller in-process with its default wiring (the load signal from
the spec, the hand-over, the router drain probe).

1. A skewed load: the hot adapter gains replicas within 3 s of crossing the threshold and returns to its
   minimum after the scale-down window; no adapter ever has zero routable replicas (EndpointSlices watched
   throughout) and no request fails.
2. Every replica full and the hot adapter waiting: Saturated, the HPA's minReplicas raised, the real HPA
   controller scales the Deployment, the new pod gets the hot adapter, minReplicas restored after the load.
3. The waitingLoraAdapters source alone: an adapter listed in waiting_lora_adapters gains replicas; one
   starved by the LoRA budget is invisible to it.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from api import labels as L
from common.events import EventRecorder
from common.kube import ENDPOINT_SLICES, HPAS, LORA_AUTOSCALERS, LORA_PLACEMENTS, KubeClient
from controller.handover import ORIGINAL_MIN_ANNOTATION
from controller.manager import Controller, Options
from controller.signals import PodTarget, estimate_from_vllm, estimate_from_waiting_lists, parse_vllm_metrics
from localkube.controlplane import ControlPlane, free_port
from localkube.kubelet import TestKubelet
from localkube.podspec import SIM_ARGS_ANNOTATION
from localkube.process import ManagedProcess
from localkube.wait import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BASE_MODEL = "tiny"
AUTOSCALER = "a"
STEP = 0.05  # simulated seconds per engine step: a 10-token request takes about half a second


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture
def kube(control_plane: ControlPlane) -> Iterator[KubeClient]:
    api = control_plane.api_client()
    try:
        yield KubeClient(api)
    finally:
        api.close()


@pytest.fixture
def controller(control_plane: ControlPlane, namespace: str, crds: None) -> Iterator[Controller]:
    """The controller in threads, with its default autoscaling wiring."""
    api = control_plane.api_client()
    kube = KubeClient(api, field_manager="lora-autoscaler-controller")
    c = Controller(kube, Options(namespace=namespace, leader_election=False, audit_period=1.0, workers=4),
                   recorder=EventRecorder(kube, "lora-autoscaler-controller"))
    c.start()
    try:
        yield c
    finally:
        c.stop()
        api.close()


@dataclass
class Router:
    port: int
    metrics_port: int
    proc: ManagedProcess

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def load(self) -> dict[str, Any]:
        return _get_json("127.0.0.1", self.metrics_port, "/router/load")


@pytest.fixture
def router(control_plane: ControlPlane, namespace: str, tmp_path: Path) -> Iterator[Router]:
    """lora-router as a subprocess following the autoscaler's route table (lora-aware strategy)."""
    port, metrics_port = free_port(), free_port()
    while metrics_port == port:
        metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(KUBECONFIG=str(control_plane.kubeconfig), PYTHONUNBUFFERED="1")
    proc = ManagedProcess("router", [sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", str(port),
                                     "--metrics-port", str(metrics_port), "--namespace", namespace,
                                     "--autoscaler", AUTOSCALER, "--scrape-interval", "0.2", "--queue-timeout", "20",
                                     "--log-level", "warning"],
                          tmp_path / "router.log", env=env, cwd=ROOT)
    proc.start()
    try:
        def up() -> bool:
            if not proc.alive():
                raise AssertionError(f"the router exited: {proc.log_tail(20)}")
            return _get_json("127.0.0.1", metrics_port, "/router/load") is not None

        wait_until(up, timeout=30, what="the router's /router/load")
        yield Router(port, metrics_port, proc)
    finally:
        proc.stop()


@dataclass
class Stack:
    """Everything a routed test uses: the control plane, its namespace, a client, the router."""

    cp: ControlPlane
    namespace: str
    kube: KubeClient
    router: Router


@pytest.fixture
def stack(request: pytest.FixtureRequest, control_plane: ControlPlane, namespace: str, kube: KubeClient) -> Stack:
    """The kubelet runs the pods, the controller and the router are up."""
    request.getfixturevalue("kubelet")
    request.getfixturevalue("controller")
    return Stack(control_plane, namespace, kube, request.getfixturevalue("router"))


# --- helpers ------------------------------------------------------------------------------------------


def _get_json(host: str, port: int, path: str) -> Any:
    conn = http.client.HTTPConnection(host, port, timeout=3)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise AssertionError(f"GET {path}: {resp.status} {body[:200]!r}")
        return json.loads(body)
    finally:
        conn.close()


def _get_text(host: str, port: int, path: str) -> str:
    conn = http.client.HTTPConnection(host, port, timeout=3)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def deployment(name: str, namespace: str, replicas: int, *, max_loras: int, max_cpu_loras: int | None = None,
               sim_args: str = f"--sim-step-time {STEP} --sim-per-seq-step-time 0 --sim-load-time 0") -> dict[str, Any]:
    flags = ["--enable-lora", "--max-loras", str(max_loras), "--max-num-seqs", "32"]
    if max_cpu_loras:
        flags += ["--max-cpu-loras", str(max_cpu_loras)]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}, "annotations": {SIM_ARGS_ANNOTATION: sim_args}},
                         "spec": {"containers": [{
                             "name": "vllm", "image": "vllm/vllm-openai:v0.32.0",
                             "command": ["vllm", "serve", BASE_MODEL, *flags],
                             "ports": [{"name": "http", "containerPort": 8000}],
                             "env": [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "true"}],
                             "resources": {"requests": {"cpu": "100m"}},
                         }]}},
        },
    }


def autoscaler(namespace: str, adapters: list[str], *, max_loras: int, metric: dict[str, Any],
               **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm"},
        "vllm": {"port": 8000, "maxLorasPerReplica": max_loras},
        "placementMode": "strict",  # copies counted as strict mode makes them; preferred mode is set where tested
        "adapters": [{"name": a, "source": f"/adapters/{a}"} for a in adapters],
        "scaling": {"syncPeriodMilliseconds": 1000, "metric": metric,
                    "scaleUp": {"threshold": 4, "windowSeconds": 1},
                    "scaleDown": {"threshold": 1, "windowSeconds": 5, "drainTimeoutSeconds": 10}},
    }
    body.update(spec)
    return {"apiVersion": "loraautoscaler.io/v1alpha1", "kind": "LoRAAutoscaler",
            "metadata": {"name": AUTOSCALER, "namespace": namespace}, "spec": body}


def apply(cp: ControlPlane, obj: dict[str, Any]) -> None:
    cp.kubectl("apply", "-f", "-", input=json.dumps(obj))


def status(kube: KubeClient, namespace: str) -> dict[str, Any]:
    return dict(kube.get(LORA_AUTOSCALERS, AUTOSCALER, namespace).get("status") or {})


def adapter_status(kube: KubeClient, namespace: str, adapter: str) -> dict[str, Any]:
    return next((a for a in status(kube, namespace).get("adapters") or [] if a["name"] == adapter), {})


def condition(kube: KubeClient, namespace: str, ctype: str) -> dict[str, Any]:
    return next((c for c in status(kube, namespace).get("conditions") or [] if c["type"] == ctype), {})


def pod_ips(kube: KubeClient, namespace: str) -> dict[str, str]:
    from common.kube import PODS

    items, _ = kube.list_all(PODS, namespace, label_selector="app=llm")
    return {p["metadata"]["name"]: p["status"]["podIP"] for p in items
            if (p.get("status") or {}).get("podIP") and not p["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])}


class SliceWatcher:
    """Watches the route table's adapter slices from a thread; remembers every routable count per adapter."""

    def __init__(self, kube: KubeClient, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.lock = threading.Lock()
        self.slices: dict[str, tuple[str, str, list[str]]] = {}  # slice -> (adapter, tier, ready pods)
        # (time, adapter, tier or None for both tiers, routable pods), on every change
        self.history: list[tuple[float, str, str | None, tuple[str, ...]]] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="slice-watcher", daemon=True)

    def __enter__(self) -> SliceWatcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def _apply(self, obj: dict[str, Any], deleted: bool = False) -> None:
        labels = obj["metadata"].get("labels") or {}
        adapter = labels.get(L.ADAPTER_LABEL)
        if not adapter:
            return
        name = obj["metadata"]["name"]
        tier = labels.get(L.TIER_LABEL, L.TIER_PREFERRED)
        ready = [ep["targetRef"]["name"] for ep in obj.get("endpoints") or []
                 if (ep.get("conditions") or {}).get("ready", True) and ep.get("targetRef")]
        with self.lock:
            keys: tuple[str | None, ...] = (None, tier)
            before = [self.pods(adapter, k) for k in keys]
            if deleted:
                self.slices.pop(name, None)
            else:
                self.slices[name] = (adapter, tier, ready)
            now = time.monotonic()
            for key, was in zip(keys, before, strict=True):
                after = self.pods(adapter, key)
                if after != was:
                    self.history.append((now, adapter, key, tuple(sorted(after))))

    def pods(self, adapter: str, tier: str | None = None) -> set[str]:
        """The pods routable for ``adapter``: in both tiers, or in ``tier`` only."""
        return {p for a, t, pods in self.slices.values() if a == adapter and tier in (None, t) for p in pods}

    def _run(self) -> None:
        selector = f"{L.AUTOSCALER_LABEL}={AUTOSCALER},{L.ROLE_LABEL}=adapter"
        try:
            items, rv = self.kube.list_all(ENDPOINT_SLICES, self.namespace, label_selector=selector)
            for obj in items:
                self._apply(obj)
            while not self.stop.is_set():
                stream = self.kube.watch(ENDPOINT_SLICES, self.namespace, resource_version=rv,
                                         label_selector=selector, timeout_seconds=2)
                try:
                    for event in stream:
                        obj = event.get("object") or {}
                        rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                        if event.get("type") in ("ADDED", "MODIFIED"):
                            self._apply(obj)
                        elif event.get("type") == "DELETED":
                            self._apply(obj, deleted=True)
                finally:
                    stream.close()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def routable(self, adapter: str, tier: str | None = None) -> int:
        with self.lock:
            return len(self.pods(adapter, tier))

    def first(self, adapter: str, since: float, predicate: Any, tier: str | None = None) -> float | None:
        with self.lock:
            return next((t for t, a, k, pods in self.history
                         if a == adapter and k == tier and t >= since and predicate(len(pods))), None)

    def lowest(self, since: float) -> dict[str, int]:
        """Per adapter, the fewest routable pods seen at or after ``since`` (and at ``since``)."""
        with self.lock:
            out: dict[str, int] = {}
            state: dict[str, int] = {}
            for t, a, k, pods in self.history:
                if k is not None:
                    continue
                if t < since:
                    state[a] = len(pods)
                else:
                    out[a] = min(out.get(a, state.get(a, len(pods))), len(pods))
            for a, n in state.items():
                out[a] = min(out.get(a, n), n)
            return out


@dataclass
class Load:
    """Closed-loop clients: per adapter, ``workers`` threads each sending a request and waiting for it."""

    host: str
    port: int
    workers: dict[str, int]
    pause: dict[str, float] = field(default_factory=dict)
    max_tokens: int = 10
    stagger: float = 0.0
    """Seconds between the first requests of one adapter's workers, so their requests do not all end at once."""
    results: list[tuple[str, int, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for adapter, n in self.workers.items():
            for i in range(n):
                t = threading.Thread(target=self._loop, args=(adapter, i), name=f"load-{adapter}-{i}", daemon=True)
                self.threads.append(t)
                t.start()
        return self

    def _loop(self, adapter: str, index: int) -> None:
        body = json.dumps({"model": adapter, "prompt": "hello there", "max_tokens": self.max_tokens}).encode()
        conn: http.client.HTTPConnection | None = None
        self.stop.wait(index * self.stagger)
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
                conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                with self.lock:
                    self.results.append((adapter, resp.status, "" if resp.status == 200 else data[:300].decode()))
            except (OSError, http.client.HTTPException) as exc:
                with self.lock:
                    self.results.append((adapter, 0, repr(exc)))
                if conn is not None:
                    conn.close()
                conn = None
            if self.pause.get(adapter):
                self.stop.wait(self.pause[adapter])
        if conn is not None:
            conn.close()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(70)

    def failures(self) -> list[tuple[str, int, str]]:
        with self.lock:
            return [r for r in self.results if r[1] != 200]

    def count(self, adapter: str) -> int:
        with self.lock:
            return sum(1 for r in self.results if r[0] == adapter and r[1] == 200)


def events(kube: KubeClient, namespace: str) -> list[dict[str, Any]]:
    from common.kube import EVENTS

    items, _ = kube.list_all(EVENTS, namespace)
    return items


# --- 1. scale up and down on a skewed load ------------------------------------------------------------------


def skewed_load(router: Router) -> Load:
    """10 clients keep lora-1 busy (10 outstanding on one replica, threshold 4 per replica); the two others
    get a trickle."""
    return Load("127.0.0.1", router.port, {"lora-1": 10, "lora-2": 1, "lora-3": 1},
                pause={"lora-2": 0.5, "lora-3": 0.5}).start()


def crossing_time(router: Router) -> float:
    """When the router first counts lora-1 above the scale-up threshold (4 outstanding on one replica)."""
    def crossed() -> float | None:
        entry = router.load()["models"].get("lora-1") or {}
        return time.monotonic() if entry.get("in_flight", 0) > 4 else None

    result: float = wait_until(crossed, timeout=20, what="lora-1's load crossing the threshold", interval=0.02)
    return result


def test_a_hot_adapter_gains_replicas_within_3s_and_returns_to_its_minimum(stack: Stack) -> None:
    cp, namespace, kube, router = stack.cp, stack.namespace, stack.kube, stack.router
    adapters = ["lora-1", "lora-2", "lora-3"]
    apply(cp, deployment("llm", namespace, 3, max_loras=2))
    wait_until(lambda: len(pod_ips(kube, namespace)) == 3, timeout=60, what="3 ready simulator pods")
    apply(cp, autoscaler(namespace, adapters, max_loras=2,
                         metric={"source": "combined", "routerUrl": router.metrics_url}))
    with SliceWatcher(kube, namespace) as slices:
        wait_until(lambda: all(slices.routable(a) == 1 for a in adapters), timeout=60,
                   what=f"every adapter routable once (slices: {slices.slices})")
        wait_until(lambda: all(router.load()["models"].get(a, {}).get("routable") for a in adapters), timeout=20,
                   what="the router routing every adapter")
        armed = time.monotonic()

        load = skewed_load(router)
        try:
            t_cross = crossing_time(router)
            t_gain = wait_until(lambda: slices.first("lora-1", armed, lambda n: n >= 2), timeout=15,
                                what="lora-1 routable on a second replica")
            gained_after = t_gain - t_cross
            print(f"lora-1 routable on a second replica {gained_after:.2f}s after its load crossed the threshold")
            assert gained_after <= 3.0, f"lora-1 gained its second replica {gained_after:.2f}s after the crossing"
            wait_until(lambda: adapter_status(kube, namespace, "lora-1").get("desiredReplicas") == 3
                       and slices.routable("lora-1") == 3, timeout=20,
                       what=lambda: f"lora-1 on all 3 replicas (status {adapter_status(kube, namespace, 'lora-1')})")
            lora1 = adapter_status(kube, namespace, "lora-1")
            assert lora1["load"] is not None and lora1["load"] > 1 and lora1["lastScaleTime"]
            time.sleep(2.0)  # the load holds: nothing changes (load 10/3 is between the thresholds)
            assert slices.routable("lora-1") == 3
        finally:
            load.finish()
        t_stop = time.monotonic()
        assert load.count("lora-1") > 20 and load.count("lora-2") > 0 and load.count("lora-3") > 0

        wait_until(lambda: slices.routable("lora-1") == 1
                   and adapter_status(kube, namespace, "lora-1").get("desiredReplicas") == 1, timeout=45,
                   what=lambda: f"lora-1 back at its minimum (status {adapter_status(kube, namespace, 'lora-1')})")
        first_drop = slices.first("lora-1", t_stop, lambda n: n < 3)
        assert first_drop is not None and first_drop - t_stop >= 4.0, \
            f"lora-1 lost a replica {first_drop and first_drop - t_stop:.1f}s after the load stopped (window 5 s)"
        lowest = slices.lowest(armed)
        assert slices.error is None, slices.error
    assert all(lowest.get(a, 0) >= 1 for a in adapters), f"an adapter had no routable replica: {lowest}"
    assert load.failures() == [], load.failures()[:5]
    reasons = {e.get("reason") for e in events(kube, namespace)}
    assert {"ScaledUp", "ScaledDown"} <= reasons, reasons


def test_in_preferred_mode_a_hot_adapter_is_promoted_on_its_warm_copies_without_a_load(stack: Stack) -> None:
    """The default mode: spare cache slots hold warm fallback copies, so scaling up is a promotion."""
    cp, namespace, kube, router = stack.cp, stack.namespace, stack.kube, stack.router
    adapters = ["lora-1", "lora-2", "lora-3"]
    apply(cp, deployment("llm", namespace, 3, max_loras=2, max_cpu_loras=3))
    wait_until(lambda: len(pod_ips(kube, namespace)) == 3, timeout=60, what="3 ready simulator pods")
    apply(cp, autoscaler(namespace, adapters, max_loras=2, placementMode="preferred",
                         vllm={"port": 8000, "maxLorasPerReplica": 2, "maxCpuLorasPerReplica": 3},
                         metric={"source": "combined", "routerUrl": router.metrics_url}))
    preferred = L.TIER_PREFERRED

    def placements() -> int:
        return len(kube.list_all(LORA_PLACEMENTS, namespace)[0])

    with SliceWatcher(kube, namespace) as slices:
        # 9 cache slots, 3 minimums: the fill makes every adapter resident on every pod, preferred on one.
        wait_until(lambda: all(slices.routable(a) == 3 and slices.routable(a, preferred) == 1 for a in adapters),
                   timeout=60, what=f"every adapter warm on every pod and preferred on one ({slices.slices})")
        wait_until(lambda: all(router.load()["models"].get(a, {}).get("routable") for a in adapters), timeout=20,
                   what="the router routing every adapter")
        copies = placements()
        assert copies == 9
        armed = time.monotonic()
        load = skewed_load(router)
        try:
            t_cross = crossing_time(router)
            t_gain = wait_until(lambda: slices.first("lora-1", armed, lambda n: n >= 2, tier=preferred),
                                timeout=15, what="lora-1 preferred on a second replica")
            print(f"lora-1 preferred on a second replica {t_gain - t_cross:.2f}s after its load crossed the threshold")
            assert t_gain - t_cross <= 3.0
            wait_until(lambda: adapter_status(kube, namespace, "lora-1").get("desiredReplicas") == 3
                       and slices.routable("lora-1", preferred) == 3, timeout=20,
                       what=lambda: "lora-1 preferred on all 3 replicas (status "
                                    f"{adapter_status(kube, namespace, 'lora-1')})")
            assert placements() == copies  # promoted where it was warm: nothing loaded, nothing unloaded
        finally:
            load.finish()
        assert load.count("lora-1") > 20 and load.count("lora-2") > 0 and load.count("lora-3") > 0
        wait_until(lambda: slices.routable("lora-1", preferred) == 1
                   and adapter_status(kube, namespace, "lora-1").get("desiredReplicas") == 1, timeout=45,
                   what=lambda: f"lora-1 back at its minimum (status {adapter_status(kube, namespace, 'lora-1')}, "
                                f"preferred on {slices.routable('lora-1', preferred)}, router "
                                f"{router.load()['models']['lora-1']})")
        assert slices.routable("lora-1") == 3  # demoted, still warm for the next time it is hot
        assert placements() == copies
        lowest = slices.lowest(armed)
        assert slices.error is None, slices.error
    assert all(lowest.get(a, 0) >= 1 for a in adapters), f"an adapter had no routable replica: {lowest}"
    assert load.failures() == [], load.failures()[:5]


# --- 2. saturation and the hand-over to the HPA -------------------------------------------------------------


def test_saturation_raises_the_hpas_minimum_and_the_new_pod_gets_the_hot_adapter(stack: Stack) -> None:
    cp, namespace, kube, router = stack.cp, stack.namespace, stack.kube, stack.router
    adapters = ["lora-1", "lora-2"]
    apply(cp, deployment("llm", namespace, 2, max_loras=1))
    # An HPA on CPU: no metrics server here, so it can never compute a recommendation; it still enforces
    # minReplicas, which is all the hand-over needs.
    apply(cp, {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
               "metadata": {"name": "llm", "namespace": namespace},
               "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm"},
                        "minReplicas": 2, "maxReplicas": 3,
                        "metrics": [{"type": "Resource", "resource": {
                            "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}}}]}})
    wait_until(lambda: len(pod_ips(kube, namespace)) == 2, timeout=60, what="2 ready simulator pods")
    apply(cp, autoscaler(namespace, adapters, max_loras=1,
                         metric={"source": "combined", "routerUrl": router.metrics_url},
                         podAutoscaling={"mode": "HPA", "hpaName": "llm"}))
    with SliceWatcher(kube, namespace) as slices:
        wait_until(lambda: all(slices.routable(a) == 1 for a in adapters), timeout=60,
                   what="both adapters routable, one per pod: every replica full")
        wait_until(lambda: all(router.load()["models"].get(a, {}).get("routable") for a in adapters), timeout=20,
                   what="the router routing both adapters")
        armed = time.monotonic()
        before = set(pod_ips(kube, namespace))
        load = Load("127.0.0.1", router.port, {"lora-1": 7, "lora-2": 1}, pause={"lora-2": 0.5}).start()
        try:
            sat = wait_until(lambda: (c := condition(kube, namespace, "Saturated")).get("status") == "True" and c,
                             timeout=20, what="Saturated")
            assert sat["reason"] == "NoFreeSlots" and "lora-1" in sat["message"], sat
            assert status(kube, namespace).get("neededReplicas", 0) >= 1 or \
                status(kube, namespace).get("saturated") is False  # may already be resolved
            hpa = wait_until(lambda: (h := kube.get(HPAS, "llm", namespace))["spec"]["minReplicas"] == 3 and h,
                             timeout=15, what="the HPA's minReplicas raised to 3")
            assert hpa["metadata"]["annotations"][ORIGINAL_MIN_ANNOTATION] == "2"
            new = wait_until(lambda: set(pod_ips(kube, namespace)) - before or None, timeout=60,
                             what="a third pod, made by the HPA controller through the Deployment")
            (new_pod,) = new
            wait_until(lambda: new_pod in slices.pods("lora-1"), timeout=30,
                       what=f"lora-1 routable on the new pod {new_pod}")
            wait_until(lambda: condition(kube, namespace, "Saturated").get("status") == "False", timeout=20,
                       what="Saturated cleared once the hot adapter has room")
        finally:
            load.finish()
        # The controller never wrote the Deployment's replicas (that field is the HPA's).
        from common.kube import DEPLOYMENTS

        dep = kube.get(DEPLOYMENTS, "llm", namespace)
        assert dep["spec"]["replicas"] == 3
        writers = {m.get("manager") for m in dep["metadata"].get("managedFields") or []
                   if m.get("subresource") == "scale"}
        assert writers and not any(str(w).startswith("lora-autoscaler") for w in writers), writers
        # Load over: after the adapter's window and then the hand-over's, minReplicas is 2 again, exactly.
        hpa = wait_until(lambda: (h := kube.get(HPAS, "llm", namespace))["spec"]["minReplicas"] == 2 and h,
                         timeout=45, what="the HPA's minReplicas restored to 2")
        assert not (hpa["metadata"].get("annotations") or {}).get(ORIGINAL_MIN_ANNOTATION)
        assert slices.error is None, slices.error
        assert all(n >= 1 for n in slices.lowest(armed).values()), slices.lowest(armed)
    assert load.failures() == [], load.failures()[:5]
    reasons = {e.get("reason") for e in events(kube, namespace)}
    assert {"Saturated", "HandOver", "HandBack"} <= reasons, reasons


# --- 3. the proposal's signal alone -----------------------------------------------------------------------


def test_the_waiting_lora_adapters_source_sees_busy_adapters_and_not_starved_ones(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet, controller: Controller, kube: KubeClient,
) -> None:
    """vLLM batches one adapter (--max-loras 1) but the autoscaler places up to 3 per pod, so the first pod
    holds lora-1 and lora-3: lora-1's clients keep its slot, lora-3's requests are deferred. The pod's
    waiting_lora_adapters names lora-1 only: lora-1 gains a replica, lora-3 reads 0 and never does."""
    cp = control_plane
    adapters = ["lora-1", "lora-2", "lora-3"]
    apply(cp, deployment("llm", namespace, 2, max_loras=1, max_cpu_loras=3))
    wait_until(lambda: len(pod_ips(kube, namespace)) == 2, timeout=60, what="2 ready simulator pods")
    apply(cp, autoscaler(namespace, adapters, max_loras=3, metric={"source": "waitingLoraAdapters"}))

    def layout() -> dict[str, str] | None:
        found = {a: adapter_status(kube, namespace, a).get("pods") or [] for a in adapters}
        return {a: p[0] for a, p in found.items()} if all(len(p) == 1 for p in found.values()) else None

    where = wait_until(layout, timeout=60, what="every adapter routable once")
    assert where["lora-1"] == where["lora-3"] != where["lora-2"], where  # the even dispatch
    ips = pod_ips(kube, namespace)
    first = ips[where["lora-1"]]
    # Straight to the pod (no router here). lora-1's clients are staggered so that one of its requests is
    # always running: vLLM then keeps admitting lora-1 and defers lora-3, which arrives once lora-1 runs.
    load = Load(first, 8000, {"lora-1": 8}, stagger=0.06).start()
    starved = Load(first, 8000, {"lora-3": 2})
    try:
        time.sleep(1.0)
        starved.start()
        def scraped() -> tuple[Any, str] | None:
            text = _get_text(first, 8000, "/metrics")
            sample = parse_vllm_metrics(text, time.time())
            return (sample, text) if sample.deferred >= 1 and "lora-1" in sample.waiting_adapters else None

        sample, _ = wait_until(scraped, timeout=20, what="lora-3 deferred behind lora-1 on the first pod")
        assert "lora-3" not in sample.waiting_adapters and "lora-3" not in sample.running_adapters
        target = PodTarget(where["lora-1"], f"{first}:8000", frozenset({"lora-1", "lora-3"}))
        assert estimate_from_waiting_lists(target, sample)["lora-3"] == 0.0  # invisible to this source
        assert estimate_from_vllm(target, sample)["lora-3"] > 0.0  # the combined estimate sees it

        wait_until(lambda: adapter_status(kube, namespace, "lora-1").get("desiredReplicas", 0) >= 2
                   and len(adapter_status(kube, namespace, "lora-1").get("pods") or []) >= 2, timeout=20,
                   what=lambda: f"lora-1 gaining a replica (status {adapter_status(kube, namespace, 'lora-1')})")
        time.sleep(3.0)  # several syncs with lora-3 still starved on the first pod
        lora3 = adapter_status(kube, namespace, "lora-3")
        assert lora3["desiredReplicas"] == 1 and lora3["load"] == 0.0, lora3
        assert parse_vllm_metrics(_get_text(first, 8000, "/metrics"), time.time()).deferred >= 1
        assert starved.count("lora-3") == 0  # not one lora-3 request has finished meanwhile
    finally:
        load.finish()
        starved.finish()
    assert load.failures() == [] and starved.failures() == [], (load.failures() + starved.failures())[:5]
    assert starved.count("lora-3") > 0  # once lora-1's clients stopped, lora-3 was served
