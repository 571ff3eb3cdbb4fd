"""The controller against a real API server, the test kubelet and one vLLM simulator per pod.

Covers the issue's acceptance: the proposal's layouts (2 and 7 replicas), visible in `kubectl get
loraplacements` and in EndpointSlices; repair after scale-up, pod deletion and simulator restarts; failed
loads placed elsewhere; removal drains before unloading; leader hand-over between two processes.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api import labels as L
from common.kube import KubeClient
from controller.manager import Controller, Options
from localkube.controlplane import ControlPlane
from localkube.kubelet import TestKubelet
from localkube.podspec import SIM_ARGS_ANNOTATION
from localkube.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]
BASE_MODEL = "tiny"
ADAPTERS = ("lora-1", "lora-2", "lora-3")

pytestmark = pytest.mark.integration


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture
def controller(control_plane: ControlPlane, namespace: str, crds: None) -> Iterator[Controller]:
    """The controller in-process (in threads), watching the test's namespace."""
    api = control_plane.api_client()
    kube = KubeClient(api)
    from common.events import EventRecorder

    c = Controller(kube, Options(namespace=namespace, leader_election=False, audit_period=1.0, workers=4),
                   recorder=EventRecorder(kube, "lora-autoscaler-controller"))
    c.start()
    try:
        yield c
    finally:
        c.stop()
        api.close()


# --- helpers ------------------------------------------------------------------------------------------


def vllm_deployment(name: str, namespace: str, replicas: int, *, sim_args: str = "") -> dict[str, Any]:
    template_meta: dict[str, Any] = {"labels": {"app": name}}
    if sim_args:
        template_meta["annotations"] = {SIM_ARGS_ANNOTATION: sim_args}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": template_meta, "spec": {"containers": [{
                "name": "vllm", "image": "vllm/vllm-openai:v0.32.0",
                "command": ["vllm", "serve", BASE_MODEL, "--enable-lora", "--max-loras", "4", "--max-lora-rank", "16"],
                "ports": [{"name": "http", "containerPort": 8000}],
                "env": [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "true"}],
            }]}},
        },
    }


def autoscaler(name: str, namespace: str, target: str, adapters: tuple[str, ...] = ADAPTERS,
               **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
        "vllm": {"port": 8000, "maxLorasPerReplica": 4, "maxLoadAttempts": 2},
        "placementMode": "strict",  # the even dispatch these tests check, without preferred mode's fallback copies
        "adapters": [{"name": a, "source": f"/adapters/{a}"} for a in adapters],
        "scaling": {"scaleDown": {"drainTimeoutSeconds": 5}},
    }
    body.update(spec)
    return {"apiVersion": "loraautoscaler.io/v1alpha1", "kind": "LoRAAutoscaler",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}


def apply(cp: ControlPlane, obj: dict[str, Any]) -> None:
    cp.kubectl("apply", "-f", "-", input=json.dumps(obj))


def get_json(cp: ControlPlane, *args: str) -> Any:
    return json.loads(cp.kubectl("get", *args, "-o", "json").stdout)


def ready_pods(cp: ControlPlane, namespace: str, app: str) -> list[dict[str, Any]]:
    """Ready pods in creation order (then name): the order the proposal numbers replicas in."""
    items = get_json(cp, "pods", "-n", namespace, "-l", f"app={app}")["items"]
    ready = [p for p in items if not p["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in (p.get("status") or {}).get("conditions") or [])]
    return sorted(ready, key=lambda p: (p["metadata"]["creationTimestamp"], p["metadata"]["name"]))


def placements(cp: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    return list(get_json(cp, "loraplacements", "-n", namespace)["items"])


def loaded_layout(cp: ControlPlane, namespace: str) -> dict[str, set[str]]:
    """pod -> adapters Loaded there (and not retiring), from `kubectl get loraplacements`."""
    out: dict[str, set[str]] = {}
    for p in placements(cp, namespace):
        if (p.get("status") or {}).get("phase") == "Loaded" and not p["spec"].get("retire"):
            out.setdefault(p["spec"]["podName"], set()).add(p["spec"]["adapter"])
    return out


def slice_layout(cp: ControlPlane, namespace: str, autoscaler_name: str) -> dict[str, set[str]]:
    """pod -> adapters whose preferred EndpointSlice lists it."""
    out: dict[str, set[str]] = {}
    items = get_json(cp, "endpointslices", "-n", namespace, "-l",
                     f"{L.AUTOSCALER_LABEL}={autoscaler_name},{L.ROLE_LABEL}=adapter")["items"]
    for s in items:
        adapter = s["metadata"]["labels"][L.ADAPTER_LABEL]
        for ep in s.get("endpoints") or []:
            out.setdefault(ep["targetRef"]["name"], set()).add(adapter)
    return out


def sim_models(ip: str) -> set[str]:
    conn = http.client.HTTPConnection(ip, 8000, timeout=3)
    try:
        conn.request("GET", "/v1/models")
        data = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return {m["id"] for m in data["data"] if m.get("parent")}


def sim_call(ip: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    conn = http.client.HTTPConnection(ip, 8000, timeout=3)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        assert resp.status == 200, raw
        return json.loads(raw)
    finally:
        conn.close()


def proposal_layout(pods: list[str], adapters: tuple[str, ...]) -> dict[str, set[str]]:
    """The proposal's even dispatch: adapters cycle over the pods, and over the adapters when pods are more."""
    out: dict[str, set[str]] = {p: set() for p in pods}
    for i in range(max(len(pods), len(adapters))):
        out[pods[i % len(pods)]].add(adapters[i % len(adapters)])
    return out


def condition(cp: ControlPlane, namespace: str, name: str, ctype: str) -> dict[str, Any] | None:
    obj = get_json(cp, "loraautoscaler", name, "-n", namespace)
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == ctype), None)


def wait_layout(cp: ControlPlane, namespace: str, name: str, expected: dict[str, set[str]], timeout: float) -> None:
    def both() -> bool:
        return loaded_layout(cp, namespace) == expected and slice_layout(cp, namespace, name) == expected

    wait_until(both, timeout=timeout,
               what=f"layout {expected} in placements and slices (placements "
                    f"{loaded_layout(cp, namespace)}, slices {slice_layout(cp, namespace, name)})")


def wait_ready(cp: ControlPlane, namespace: str, app: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    def probe() -> list[dict[str, Any]] | None:
        found = ready_pods(cp, namespace, app)
        return found if len(found) == count else None

    return wait_until(probe, timeout=timeout, what=f"{count} ready pods of {app}")


def wait_condition(cp: ControlPlane, namespace: str, name: str, ctype: str, status: str, *, timeout: float,
                   reason: str | None = None) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        c = condition(cp, namespace, name, ctype)
        return c if c and c["status"] == status and (reason is None or c["reason"] == reason) else None

    return wait_until(probe, timeout=timeout, what=f"{ctype}={status} ({reason or 'any reason'}) on {name}")


def holders(layout: dict[str, set[str]]) -> dict[str, int]:
    count: dict[str, int] = {}
    for adapters in layout.values():
        for a in adapters:
            count[a] = count.get(a, 0) + 1
    return count


# --- acceptance ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("replicas", [2, 7])
def test_initial_layout_is_the_proposals_even_dispatch(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet, controller: Controller, replicas: int
) -> None:
    cp = control_plane
    apply(cp, vllm_deployment("llm", namespace, replicas))
    pods = wait_ready(cp, namespace, "llm", replicas)
    apply(cp, autoscaler("a", namespace, "llm"))
    names = [p["metadata"]["name"] for p in pods]
    expected = proposal_layout(names, ADAPTERS)
    if replicas == 2:
        assert expected == {names[0]: {"lora-1", "lora-3"}, names[1]: {"lora-2"}}
    wait_layout(cp, namespace, "a", expected, timeout=30)
    # the simulators really hold exactly that
    for p in pods:
        assert sim_models(p["status"]["podIP"]) == expected[p["metadata"]["name"]]
    # kubectl shows it
    table = cp.kubectl("get", "loraplacements", "-n", namespace).stdout
    assert "ADAPTER" in table and "PHASE" in table and table.count("Loaded") == sum(map(len, expected.values()))
    ready = wait_condition(cp, namespace, "a", "Ready", "True", timeout=15)
    assert ready["reason"] == "AllAdaptersRoutable"
    status = get_json(cp, "loraautoscaler", "a", "-n", namespace)["status"]
    assert status["replicas"] == replicas and status["readyAdapters"] == 3 and status["adapterCount"] == 3
    # the base slice lists every pod and names the base model learned from /v1/models
    def base_slice() -> dict[str, Any] | None:
        got = get_json(cp, "endpointslice", L.slice_name(L.base_service_name("a"), L.TIER_BASE), "-n", namespace)
        return got if got["metadata"].get("annotations") else None

    base = wait_until(base_slice, timeout=15, what="base slice with its model")
    assert base["metadata"]["annotations"][L.BASE_MODEL_ANNOTATION] == BASE_MODEL
    assert {ep["targetRef"]["name"] for ep in base["endpoints"]} == set(names)
    # the placement is stable: nothing moves while nothing changes
    before = {p["metadata"]["name"]: p["metadata"]["resourceVersion"] for p in placements(cp, namespace)}
    slices_rv = {s["metadata"]["name"]: s["metadata"]["resourceVersion"]
                 for s in get_json(cp, "endpointslices", "-n", namespace)["items"]}
    time.sleep(3.0)  # three sync periods, on purpose: nothing may be rewritten meanwhile
    after = {p["metadata"]["name"]: p["metadata"]["resourceVersion"] for p in placements(cp, namespace)}
    slices_after = {s["metadata"]["name"]: s["metadata"]["resourceVersion"]
                    for s in get_json(cp, "endpointslices", "-n", namespace)["items"]}
    assert after == before and slices_after == slices_rv


def test_scale_up_pod_loss_and_restart_are_repaired(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet, controller: Controller
) -> None:
    cp = control_plane
    apply(cp, vllm_deployment("llm", namespace, 2))
    wait_ready(cp, namespace, "llm", 2)
    apply(cp, autoscaler("a", namespace, "llm"))
    wait_until(lambda: holders(loaded_layout(cp, namespace)) == dict.fromkeys(ADAPTERS, 1), timeout=30,
               what="every adapter loaded once")

    # scale up: the new pods get adapters (idle pods are filled), nothing already placed moves
    before = loaded_layout(cp, namespace)
    cp.kubectl("scale", "deployment/llm", "-n", namespace, "--replicas=4")
    pods = wait_ready(cp, namespace, "llm", 4)
    names = [p["metadata"]["name"] for p in pods]

    def filled() -> dict[str, set[str]] | None:
        layout = loaded_layout(cp, namespace)
        return layout if all(layout.get(n) for n in names) else None

    layout = wait_until(filled, timeout=30, what="every pod holding an adapter")
    for pod, adapters in before.items():
        assert adapters <= layout[pod], f"sticky placement moved {adapters} away from {pod}: {layout}"
    wait_until(lambda: slice_layout(cp, namespace, "a") == loaded_layout(cp, namespace), timeout=15,
               what="slices matching the placements")

    # a pod goes away: its adapters are placed again so that every adapter stays at its minimum
    victim = next(p for p in names if len(layout[p]) == max(len(v) for v in layout.values()))
    lost = layout[victim]
    cp.kubectl("delete", "pod", victim, "-n", namespace, "--grace-period=0", "--force")

    def repaired() -> dict[str, set[str]] | None:
        now = loaded_layout(cp, namespace)
        alive = {p["metadata"]["name"] for p in ready_pods(cp, namespace, "llm")}
        ok = victim not in now and set(now) <= alive and all(holders(now).get(a, 0) >= 1 for a in ADAPTERS)
        return now if ok else None

    wait_until(repaired, timeout=30, what=f"{sorted(lost)} placed again after {victim} was deleted")
    wait_until(lambda: not any(p["spec"]["podName"] == victim for p in placements(cp, namespace)), timeout=15,
               what="placements of the deleted pod removed")

    # a restart: vLLM forgets runtime-loaded adapters; the controller loads them again within 10 s
    wait_condition(cp, namespace, "a", "Progressing", "False", timeout=30)  # settled after the replacement pod
    layout = loaded_layout(cp, namespace)
    restarted = next(p for p in ready_pods(cp, namespace, "llm") if layout.get(p["metadata"]["name"]))
    name = restarted["metadata"]["name"]
    restarts = kubelet.restart_pod(namespace, name)

    def back() -> dict[str, Any] | None:  # the simulator starts again (a Python process: seconds on a busy box)
        return next((p for p in ready_pods(cp, namespace, "llm") if p["metadata"]["name"] == name
                     and p["status"]["containerStatuses"][0]["restartCount"] >= restarts), None)

    ip = wait_until(back, timeout=60, what=f"{name} ready again after its restart")["status"]["podIP"]
    t0 = time.monotonic()  # from here on vLLM serves without the adapters: the controller's time to repair
    wait_until(lambda: sim_models(ip) == layout[name], timeout=10,
               what=f"{sorted(layout[name])} loaded again on restarted {name}")
    assert time.monotonic() - t0 <= 10


def test_failed_loads_go_failed_and_the_adapter_is_placed_elsewhere(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet, controller: Controller
) -> None:
    cp = control_plane
    apply(cp, vllm_deployment("llm", namespace, 2))
    pods = wait_ready(cp, namespace, "llm", 2)
    broken, healthy = pods[0], pods[1]
    sim_call(broken["status"]["podIP"], "POST", "/sim/faults", {"load_failures": 1000})
    apply(cp, autoscaler("a", namespace, "llm"))

    def failed() -> list[dict[str, Any]] | None:
        got = [p for p in placements(cp, namespace) if (p.get("status") or {}).get("phase") == "Failed"]
        return got if len(got) == 2 else None  # lora-1 and lora-3 were placed on the first pod

    for p in wait_until(failed, timeout=30, what="two Failed placements on the broken pod"):
        assert p["spec"]["podName"] == broken["metadata"]["name"]
        assert p["status"]["attempts"] == 2 and not p["status"]["permanent"]
        assert "simulated load failure" in p["status"]["lastError"]
    healthy_name = healthy["metadata"]["name"]
    wait_until(lambda: loaded_layout(cp, namespace).get(healthy_name) == set(ADAPTERS), timeout=30,
               what="every adapter loaded on the healthy pod")
    assert sim_models(healthy["status"]["podIP"]) == set(ADAPTERS)
    wait_until(lambda: slice_layout(cp, namespace, "a") == {healthy_name: set(ADAPTERS)}, timeout=15,
               what="only the healthy pod in the route table")
    degraded = wait_condition(cp, namespace, "a", "Degraded", "True", timeout=15)
    assert degraded["reason"] == "LoadFailed" and "simulated load failure" in degraded["message"]

    def warnings() -> list[dict[str, Any]]:
        items = get_json(cp, "events.events.k8s.io", "-n", namespace)["items"]
        return [e for e in items if e.get("type") == "Warning" and e.get("reason") == "LoadFailed"
                and e["regarding"]["kind"] == "LoRAAutoscaler"]

    event = wait_until(warnings, timeout=10, what="a LoadFailed Warning Event on the autoscaler")[0]
    assert "simulated load failure" in event["note"]


def test_runtime_updating_off_fails_permanently_with_a_plain_message(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet, controller: Controller
) -> None:
    cp = control_plane
    deployment = vllm_deployment("llm", namespace, 1)
    deployment["spec"]["template"]["spec"]["containers"][0]["env"] = []
    apply(cp, deployment)
    wait_ready(cp, namespace, "llm", 1)
    apply(cp, autoscaler("a", namespace, "llm", adapters=("lora-1",)))

    def failed() -> dict[str, Any] | None:
        got = [p for p in placements(cp, namespace) if (p.get("status") or {}).get("phase") == "Failed"]
        return got[0] if got else None

    p = wait_until(failed, timeout=20, what="a Failed placement")
    assert p["status"]["permanent"] is True and p["status"]["attempts"] == 1
    assert "runtime LoRA updating is off" in p["status"]["lastError"]
    degraded = wait_condition(cp, namespace, "a", "Degraded", "True", timeout=15, reason="LoadFailedPermanently")
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in degraded["message"]
    time.sleep(3)  # on purpose: a permanent failure is never retried
    again = next(q for q in placements(cp, namespace) if q["metadata"]["name"] == p["metadata"]["name"])
    assert again["status"]["attempts"] == 1


def test_missing_target_is_degraded_not_a_crash(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet, controller: Controller
) -> None:
    cp = control_plane
    apply(cp, autoscaler("a", namespace, "nowhere"))
    c = wait_condition(cp, namespace, "a", "Degraded", "True", timeout=15, reason="TargetNotFound")
    assert "nowhere" in c["message"]
    ready = condition(cp, namespace, "a", "Ready")
    assert ready is not None and ready["status"] == "False"
    # the target appears: the same autoscaler goes on to place
    apply(cp, vllm_deployment("nowhere", namespace, 1))
    wait_ready(cp, namespace, "nowhere", 1)
    wait_condition(cp, namespace, "a", "Ready", "True", timeout=30)


def test_removed_adapter_leaves_the_route_table_before_the_unload_and_after_in_flight_requests(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet, controller: Controller
) -> None:
    cp = control_plane
    apply(cp, vllm_deployment("llm", namespace, 2))
    pods = wait_ready(cp, namespace, "llm", 2)
    apply(cp, autoscaler("a", namespace, "llm"))
    first = pods[0]["metadata"]["name"]
    ip = pods[0]["status"]["podIP"]
    wait_layout(cp, namespace, "a", {first: {"lora-1", "lora-3"}, pods[1]["metadata"]["name"]: {"lora-2"}}, 30)

    # watch lora-3's slice and note when the pod leaves it
    slice_name = L.slice_name(L.route_service_name("a", "lora-3"), L.TIER_PREFERRED)
    kube = KubeClient(cp.api_client())
    dropped_at: list[float] = []
    from common.kube import ENDPOINT_SLICES

    stream = kube.watch(ENDPOINT_SLICES, namespace, field_selector=f"metadata.name={slice_name}", read_timeout=60)

    def watch() -> None:
        for event in stream:
            eps = event["object"].get("endpoints") or []
            if not any(ep["targetRef"]["name"] == first for ep in eps) and not dropped_at:
                dropped_at.append(time.time())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    # a long request in flight for lora-3 on that pod (400 tokens at 5 ms a step: about 2 s)
    answer: list[tuple[int, float]] = []

    def long_request() -> None:
        conn = http.client.HTTPConnection(ip, 8000, timeout=30)
        try:
            conn.request("POST", "/v1/completions", body=json.dumps(
                {"model": "lora-3", "prompt": "hello", "max_tokens": 400, "ignore_eos": True}),
                headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            answer.append((resp.status, time.time()))
        finally:
            conn.close()

    requester = threading.Thread(target=long_request, daemon=True)
    requester.start()
    wait_until(lambda: sim_call(ip, "GET", "/sim/events")["counters"]["in_flight_by_adapter"].get("lora-3"),
               timeout=5, what="the request running")
    seq = max((e["seq"] for e in sim_call(ip, "GET", "/sim/events")["events"]), default=0)
    apply(cp, autoscaler("a", namespace, "llm", adapters=("lora-1", "lora-2")))

    def unloaded() -> dict[str, Any] | None:
        events = sim_call(ip, "GET", f"/sim/events?since={seq}")["events"]
        return next((e for e in events if e["kind"] == "unload" and e["adapter"] == "lora-3"), None)

    unload = wait_until(unloaded, timeout=20, what="the unload of lora-3")
    requester.join(10)
    stream.close()
    watcher.join(5)
    assert dropped_at, "the watch never saw the pod leave lora-3's slice"
    assert answer and answer[0][0] == 200, f"the in-flight request failed: {answer}"
    assert dropped_at[0] < unload["time"], "the unload reached the pod before it left the route table"
    assert answer[0][1] <= unload["time"], "the unload came before the in-flight request finished"
    assert unload["in_flight"] == 0 and unload["status"] == 200
    wait_until(lambda: not any(p["spec"]["adapter"] == "lora-3" for p in placements(cp, namespace)), timeout=15,
               what="lora-3's placement deleted")
    wait_until(lambda: not get_json(cp, "endpointslices", "-n", namespace, "-l",
                                    f"{L.ADAPTER_LABEL}=lora-3")["items"], timeout=15,
               what="lora-3's route table removed")
    kube.api_client.close()


def _start_controller(cp: ControlPlane, namespace: str, identity: str, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "controller", "--kubeconfig", str(cp.kubeconfig), "--namespace", namespace,
            "--lease-namespace", namespace, "--identity", identity, "--metrics-port", "0", "--metrics-host",
            "127.0.0.1", "--audit-period", "1"]
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def _metric(log: Path, name: str) -> float | None:
    """The sum of a metric's samples on the process whose log is ``log`` (it logs its metrics port)."""
    import re

    port = int(re.search(r"metrics on port (\d+)", log.read_text()).group(1))  # type: ignore[union-attr]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name) and not line.startswith("#") and line[len(name)] in " {"]
    return sum(values) if values else None


def test_two_processes_only_the_leader_acts_and_a_killed_leader_hands_over(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet, crds: None, tmp_path: Path,
) -> None:
    cp = control_plane
    apply(cp, vllm_deployment("llm", namespace, 2))
    pods = wait_ready(cp, namespace, "llm", 2)
    procs = {name: _start_controller(cp, namespace, name, tmp_path / f"{name}.log") for name in ("c1", "c2")}
    try:
        def holder() -> str | None:
            lease = get_json(cp, "lease", "lora-autoscaler-controller", "-n", namespace)
            return lease["spec"].get("holderIdentity") or None

        leader = wait_until(holder, timeout=30, what="a leader")
        standby = "c2" if leader == "c1" else "c1"
        apply(cp, autoscaler("a", namespace, "llm"))
        names = [p["metadata"]["name"] for p in pods]
        wait_layout(cp, namespace, "a", proposal_layout(names, ADAPTERS), timeout=30)
        standby_log = (tmp_path / f"{standby}.log").read_text()
        assert "leading:" not in standby_log and "load lora" not in standby_log, standby_log[-2000:]
        assert "load lora" in (tmp_path / f"{leader}.log").read_text()
        assert _metric(tmp_path / f"{leader}.log", "lora_controller_is_leader") == 1.0
        assert _metric(tmp_path / f"{standby}.log", "lora_controller_is_leader") == 0.0
        assert _metric(tmp_path / f"{standby}.log", "lora_controller_api_writes_total") is None  # never wrote

        os.killpg(procs[leader].pid, signal.SIGKILL)
        procs[leader].wait(10)
        killed = time.monotonic()
        wait_until(lambda: holder() == standby, timeout=30, what=f"{standby} taking the lease")
        assert time.monotonic() - killed <= 15 + 2 * 2 + 1  # lease duration plus a retry period or two
        # the new leader acts: an added adapter is placed and loaded
        apply(cp, autoscaler("a", namespace, "llm", adapters=(*ADAPTERS, "lora-4")))
        wait_until(lambda: holders(loaded_layout(cp, namespace)).get("lora-4") == 1, timeout=30,
                   what="lora-4 loaded by the new leader")
        assert "load lora-4" in (tmp_path / f"{standby}.log").read_text()

        # SIGTERM: the leader releases the lease and exits 0
        procs[standby].send_signal(signal.SIGTERM)
        assert procs[standby].wait(30) == 0
        wait_until(lambda: holder() is None, timeout=5, what="the lease released")
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


def test_the_shipped_rbac_is_enough(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet, crds: None
) -> None:
    """The controller, holding only config/rbac's rules bound in one namespace, does its whole job."""
    import yaml
    from kubernetes import client as k8s

    from common.events import EventRecorder

    cp = control_plane
    user = f"lora-controller-{namespace[-6:]}"  # a certificate's CN is at most 64 characters
    docs = [d for f in ("controller_role.yaml", "leader_election_role.yaml")
            for d in yaml.safe_load_all((ROOT / "config" / "rbac" / f).read_text())]
    for doc in docs:
        if doc["kind"] == "ClusterRoleBinding":  # confined: bound in the test's namespace only, as documented
            doc["kind"] = "RoleBinding"
        if doc["kind"] in ("Role", "RoleBinding"):
            doc["metadata"]["namespace"] = namespace
        if "subjects" in doc:  # the rules are under test, not the subject: a user with a client certificate
            doc["subjects"] = [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": user}]
        apply(cp, doc)
    cert, key = cp.issue_client_certificate(user)
    conf = k8s.Configuration()
    conf.host = cp.server
    conf.ssl_ca_cert = str(cp.ca_cert)
    conf.cert_file, conf.key_file = str(cert), str(key)
    kube = KubeClient(k8s.ApiClient(conf))
    apply(cp, vllm_deployment("llm", namespace, 2))
    pods = wait_ready(cp, namespace, "llm", 2)
    c = Controller(kube, Options(namespace=namespace, lease_namespace=namespace, audit_period=1.0, workers=2),
                   recorder=EventRecorder(kube, "lora-autoscaler-controller"))
    c.start()
    try:
        assert c.wait_for_leadership(20)
        apply(cp, autoscaler("a", namespace, "llm"))
        names = [p["metadata"]["name"] for p in pods]
        wait_layout(cp, namespace, "a", proposal_layout(names, ADAPTERS), timeout=30)
        wait_condition(cp, namespace, "a", "Ready", "True", timeout=15)
        degraded = condition(cp, namespace, "a", "Degraded")
        assert degraded is not None and degraded["status"] == "False", degraded
        wait_until(lambda: get_json(cp, "events.events.k8s.io", "-n", namespace)["items"], timeout=10,
                   what="Events written as the ServiceAccount")
    finally:
        c.stop()
        kube.api_client.close()


def test_deleting_the_autoscaler_unloads_every_adapter_first(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet, controller: Controller
) -> None:
    cp = control_plane
    apply(cp, vllm_deployment("llm", namespace, 2))
    pods = wait_ready(cp, namespace, "llm", 2)
    apply(cp, autoscaler("a", namespace, "llm"))
    names = [p["metadata"]["name"] for p in pods]
    wait_layout(cp, namespace, "a", proposal_layout(names, ADAPTERS), timeout=30)
    assert L.FINALIZER in get_json(cp, "loraautoscaler", "a", "-n", namespace)["metadata"]["finalizers"]
    cp.kubectl("delete", "loraautoscaler", "a", "-n", namespace, "--wait=false")
    wait_until(lambda: cp.kubectl("get", "loraautoscaler", "a", "-n", namespace, check=False).returncode != 0,
               timeout=30, what="the autoscaler gone")
    for p in pods:
        assert sim_models(p["status"]["podIP"]) == set(), "an adapter was left loaded on a pod"
    assert placements(cp, namespace) == []
    wait_until(lambda: not get_json(cp, "endpointslices", "-n", namespace, "-l", L.AUTOSCALER_LABEL)["items"],
               timeout=30, what="the route table removed by garbage collection")


def test_an_adapter_loaded_behind_the_controllers_back_is_unloaded(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet, controller: Controller
) -> None:
    cp = control_plane
    apply(cp, vllm_deployment("llm", namespace, 2))
    pods = wait_ready(cp, namespace, "llm", 2)
    apply(cp, autoscaler("a", namespace, "llm"))
    names = [p["metadata"]["name"] for p in pods]
    wait_layout(cp, namespace, "a", proposal_layout(names, ADAPTERS), timeout=30)
    ip = pods[0]["status"]["podIP"]
    conn = http.client.HTTPConnection(ip, 8000, timeout=3)
    conn.request("POST", "/v1/load_lora_adapter", body=json.dumps({"lora_name": "lora-2", "lora_path": "/x"}),
                 headers={"Content-Type": "application/json"})
    assert conn.getresponse().status == 200
    conn.close()
    other = json.dumps({"lora_name": "not-ours", "lora_path": "/y"})
    conn = http.client.HTTPConnection(ip, 8000, timeout=3)
    conn.request("POST", "/v1/load_lora_adapter", body=other, headers={"Content-Type": "application/json"})
    assert conn.getresponse().status == 200
    conn.close()
    wait_until(lambda: sim_models(ip) == {"lora-1", "lora-3", "not-ours"}, timeout=15,
               what="the stray lora-2 unloaded, the adapter the autoscaler does not manage kept")
    assert loaded_layout(cp, namespace) == proposal_layout(names, ADAPTERS)


def test_any_kind_with_a_scale_subresource_and_the_pod_selector_narrowing(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet, controller: Controller
) -> None:
    """A custom resource (like llmaz's Playground) found through discovery and its scale subresource."""
    cp = control_plane
    group = "serving.example.com"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"playgrounds.{group}"},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"plural": "playgrounds", "singular": "playground", "kind": "Playground"},
                 "versions": [{"name": "v1", "served": True, "storage": True,
                               "schema": {"openAPIV3Schema": {"type": "object",
                                                              "x-kubernetes-preserve-unknown-fields": True}},
                               "subresources": {"status": {}, "scale": {
                                   "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                                   "labelSelectorPath": ".status.selector"}}}]},
    }
    apply(cp, crd)
    cp.kubectl("wait", "--for=condition=Established", "--timeout=30s", f"crd/playgrounds.{group}")
    apply(cp, {"apiVersion": f"{group}/v1", "kind": "Playground", "metadata": {"name": "pg", "namespace": namespace},
               "spec": {"replicas": 3}})
    cp.kubectl("patch", "playground", "pg", "-n", namespace, "--subresource=status", "--type=merge",
               "-p", json.dumps({"status": {"replicas": 3, "selector": "app=pg"}}))
    template = vllm_deployment("pg", namespace, 1)["spec"]["template"]
    for i, role in enumerate(("leader", "worker", "leader")):
        apply(cp, {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": f"pg-{i}", "namespace": namespace, "labels": {"app": "pg", "role": role}},
                   "spec": template["spec"]})
    wait_ready(cp, namespace, "pg", 3)
    apply(cp, autoscaler("a", namespace, "pg", adapters=("lora-1", "lora-2"),
                         scaleTargetRef={"apiVersion": f"{group}/v1", "kind": "Playground", "name": "pg"},
                         podSelector={"matchLabels": {"role": "leader"}}))
    wait_layout(cp, namespace, "a", {"pg-0": {"lora-1"}, "pg-2": {"lora-2"}}, timeout=30)
    status = get_json(cp, "loraautoscaler", "a", "-n", namespace)["status"]
    assert status["replicas"] == 2
