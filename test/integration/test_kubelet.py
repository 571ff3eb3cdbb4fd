"""The test kubelet: real Deployment/ReplicaSet controllers make pods, the kubelet runs a vLLM simulator each.

The acceptance: a Deployment of 3 vLLM-style pods becomes 3 Ready pods whose simulators answer on their
pod IPs within 10 s; scaling to 5 gives 5; a deleted pod is replaced by the ReplicaSet controller and the
new simulator answers; a restart bumps restartCount and forgets runtime-loaded adapters. Pod IPs are
addresses of the kubelet's pod network, which the API server accepts in EndpointSlices; without one the
kubelet falls back to loopback addresses, loudly, and under CI refuses to start.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from localkube import podnet
from localkube.controlplane import ControlPlane
from localkube.kubelet import HOST_IP, AddressAllocator, TestKubelet
from localkube.podspec import (
    SIM_ARGS_ANNOTATION,
    PodSpecError,
    container_env,
    simulator_command,
    split_host_port,
    vllm_flags,
)
from localkube.process import pid_alive
from localkube.wait import wait_until

BASE_MODEL = "tiny-base"

# The pod network needs root and iproute2; CI has both, so there its absence fails the tests instead.
needs_pod_network = pytest.mark.skipif(
    podnet.available() is not None and not os.environ.get("CI"), reason=str(podnet.available())
)


# --- helpers --------------------------------------------------------------------------------------


def vllm_deployment(
    name: str, namespace: str, replicas: int, *, style: str = "serve", extra_env: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A Deployment written for real vLLM, as a user would write it."""
    flags = ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8"]
    if style == "serve":
        container: dict[str, Any] = {"command": ["vllm", "serve", BASE_MODEL, *flags]}
    else:
        container = {
            "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
            "args": ["--model", BASE_MODEL, *flags],
        }
    container.update(
        name="vllm",
        image="vllm/vllm-openai:v0.11.0",
        ports=[{"name": "http", "containerPort": 8000}],
        env=[{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "true"}, *(extra_env or [])],
        resources={"limits": {"nvidia.com/gpu": "1"}},
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [container]}},
        },
    }


def pods(cp: ControlPlane, namespace: str, selector: str) -> list[dict[str, Any]]:
    out = cp.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
    return list(json.loads(out)["items"])


def is_ready(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def ready_pods(cp: ControlPlane, namespace: str, selector: str, count: int) -> list[dict[str, Any]] | None:
    found = [p for p in pods(cp, namespace, selector) if is_ready(p)]
    return found if len(found) == count else None


def describe(items: list[dict[str, Any]]) -> list[str]:
    """One line per pod: what a failing wait needs to show."""
    out = []
    for pod in items:
        status = pod.get("status") or {}
        cs = (status.get("containerStatuses") or [{}])[0]
        out.append(
            f"{pod['metadata']['name']} node={pod['spec'].get('nodeName')} phase={status.get('phase')} "
            f"ready={is_ready(pod)} ip={status.get('podIP')} restarts={cs.get('restartCount')} "
            f"state={cs.get('state')} deleting={bool(pod['metadata'].get('deletionTimestamp'))}"
        )
    return out


def wait_ready(cp: ControlPlane, namespace: str, selector: str, count: int, timeout: float) -> list[dict[str, Any]]:
    """Exactly `count` Ready pods; on timeout the error lists every pod's state."""
    try:
        return wait_until(
            lambda: ready_pods(cp, namespace, selector, count), timeout=timeout, what=f"{count} Ready pods"
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; pods now: {describe(pods(cp, namespace, selector))}") from None


def get(ip: str, port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection(ip, port, timeout=3)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def post(ip: str, port: int, path: str, body: dict[str, Any]) -> tuple[int, str]:
    conn = http.client.HTTPConnection(ip, port, timeout=3)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def model_ids(ip: str, port: int) -> list[str]:
    status, body = get(ip, port, "/v1/models")
    assert status == 200, body
    return [m["id"] for m in json.loads(body)["data"]]


def apply(cp: ControlPlane, obj: dict[str, Any]) -> None:
    cp.kubectl("apply", "-f", "-", input=json.dumps(obj))


def container_status(pod: dict[str, Any]) -> dict[str, Any]:
    return dict(pod["status"]["containerStatuses"][0])


# --- acceptance -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_deployment_pods_become_ready_and_answer_then_scale(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet
) -> None:
    apply(control_plane, vllm_deployment("llm", namespace, 3))
    ready = wait_ready(control_plane, namespace, "app=llm", 3, timeout=10)
    ips = sorted(p["status"]["podIP"] for p in ready)
    assert len(set(ips)) == 3
    if kubelet.network is not None:
        subnet = kubelet.network.subnet
        assert subnet is not None and all(ipaddress.ip_address(ip) in subnet for ip in ips)
        assert kubelet.host_ip == kubelet.network.host_address and kubelet.host_ip not in ips
    else:  # the loopback fallback, outside CI only
        assert all(ip.startswith("127.0.0.") and ip != "127.0.0.1" for ip in ips)
    for pod in ready:
        ip = pod["status"]["podIP"]
        assert pod["status"]["phase"] == "Running"
        assert pod["status"]["hostIP"] == kubelet.host_ip
        assert pod["status"]["hostIPs"] == [{"ip": kubelet.host_ip}]
        assert pod["status"]["podIPs"] == [{"ip": ip}]
        assert pod["spec"]["nodeName"] == kubelet.node_name
        assert kubelet.pod_address(namespace, pod["metadata"]["name"]) == (ip, 8000)
        assert get(ip, 8000, "/health")[0] == 200
        assert model_ids(ip, 8000) == [BASE_MODEL]
        status = container_status(pod)
        assert status["ready"] is True and status["restartCount"] == 0 and "running" in status["state"]

    # the Deployment controller reads readiness from the status the kubelet writes
    wait_until(
        lambda: (
            json.loads(control_plane.kubectl("get", "deployment", "llm", "-n", namespace, "-o", "json").stdout)[
                "status"
            ].get("readyReplicas")
            == 3
        ),
        timeout=10,
        what="deployment status readyReplicas == 3",
    )

    control_plane.kubectl("scale", "deployment", "llm", "-n", namespace, "--replicas=5")
    ready = wait_ready(control_plane, namespace, "app=llm", 5, timeout=10)
    ips5 = {p["status"]["podIP"] for p in ready}
    assert len(ips5) == 5 and set(ips) <= ips5
    for ip in ips5:
        assert model_ids(ip, 8000) == [BASE_MODEL]


@pytest.mark.integration
def test_deleted_pod_is_replaced_and_its_simulator_stopped(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet
) -> None:
    apply(control_plane, vllm_deployment("llm", namespace, 2, style="api_server"))
    ready = wait_ready(control_plane, namespace, "app=llm", 2, timeout=10)
    victim = ready[0]["metadata"]["name"]
    victim_pid = int(container_status(ready[0])["containerID"].split("://", 1)[1])
    assert pid_alive(victim_pid)

    # kubectl waits for the deletion to finish: the kubelet must confirm it (grace 0) after stopping
    control_plane.kubectl("delete", "pod", victim, "-n", namespace, "--timeout=15s")
    assert not pid_alive(victim_pid)
    with pytest.raises(KeyError):
        kubelet.pod_address(namespace, victim)

    ready = wait_ready(control_plane, namespace, "app=llm", 2, timeout=10)
    names = {p["metadata"]["name"] for p in ready}
    assert victim not in names
    for pod in ready:
        assert model_ids(pod["status"]["podIP"], 8000) == [BASE_MODEL]


@pytest.mark.integration
def test_restart_bumps_restart_count_and_forgets_runtime_adapters(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet
) -> None:
    apply(control_plane, vllm_deployment("llm", namespace, 1))
    (pod,) = wait_ready(control_plane, namespace, "app=llm", 1, timeout=10)
    name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
    status, body = post(ip, 8000, "/v1/load_lora_adapter", {"lora_name": "lora-1", "lora_path": "/adapters/lora-1"})
    assert status == 200, body
    assert "lora-1" in model_ids(ip, 8000)

    assert kubelet.restart_pod(namespace, name) == 1

    def restarted() -> dict[str, Any] | None:
        (current,) = pods(control_plane, namespace, "app=llm")
        cs = container_status(current)
        return current if cs["restartCount"] == 1 and is_ready(current) else None

    current = wait_until(restarted, timeout=10, what="restartCount 1 and Ready again")
    cs = container_status(current)
    assert cs["lastState"]["terminated"]["exitCode"] == 137
    assert current["status"]["podIP"] == ip, "a restarted container keeps its pod IP"
    assert model_ids(ip, 8000) == [BASE_MODEL], "runtime-loaded adapters are gone after a restart"


@pytest.mark.integration
def test_unexpected_exit_is_restarted_and_not_ready_meanwhile(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet
) -> None:
    apply(control_plane, vllm_deployment("llm", namespace, 1))
    (pod,) = wait_ready(control_plane, namespace, "app=llm", 1, timeout=10)
    pid = int(container_status(pod)["containerID"].split("://", 1)[1])
    # Stop the process so that it cannot answer, then kill it: the kubelet must notice on its own.
    os.kill(pid, signal.SIGSTOP)
    not_ready = wait_until(
        lambda: next((p for p in pods(control_plane, namespace, "app=llm") if not is_ready(p)), None),
        timeout=10,
        what="pod reported not Ready while its simulator does not answer /health",
    )
    assert container_status(not_ready)["ready"] is False
    os.kill(pid, signal.SIGKILL)

    def back() -> dict[str, Any] | None:
        (current,) = pods(control_plane, namespace, "app=llm")
        return current if container_status(current)["restartCount"] == 1 and is_ready(current) else None

    current = wait_until(back, timeout=15, what="restarted after an unexpected exit")
    new_pid = int(container_status(current)["containerID"].split("://", 1)[1])
    assert new_pid != pid and pid_alive(new_pid)
    assert new_pid in kubelet.pids and pid in kubelet.pids


@pytest.mark.integration
def test_env_from_secret_reaches_the_simulator(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet
) -> None:
    control_plane.kubectl("create", "secret", "generic", "vllm-key", "-n", namespace, "--from-literal=key=s3cret")
    env = [{"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "vllm-key", "key": "key"}}}]
    apply(control_plane, vllm_deployment("llm", namespace, 1, extra_env=env))
    (pod,) = wait_ready(control_plane, namespace, "app=llm", 1, timeout=10)
    ip = pod["status"]["podIP"]
    assert get(ip, 8000, "/v1/models")[0] == 401
    assert get(ip, 8000, "/v1/models", {"Authorization": "Bearer s3cret"})[0] == 200


@pytest.mark.integration
def test_unrunnable_pod_says_why(control_plane: ControlPlane, namespace: str, kubelet: TestKubelet) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"containers": [{"name": "nginx", "image": "nginx", "command": ["nginx", "-g", "daemon off;"]}]},
    }
    apply(control_plane, pod)

    def waiting() -> dict[str, Any] | None:
        (current,) = pods(control_plane, namespace, "")
        state = ((current.get("status") or {}).get("containerStatuses") or [{}])[0].get("state", {})
        return state.get("waiting") if state.get("waiting", {}).get("reason") == "UnsupportedCommand" else None

    state = wait_until(waiting, timeout=10, what="container waiting with reason UnsupportedCommand")
    assert "does not run vLLM" in state["message"]


@pytest.mark.integration
def test_kubelet_survives_an_apiserver_restart(
    control_plane: ControlPlane, namespace: str, kubelet: TestKubelet
) -> None:
    apply(control_plane, vllm_deployment("llm", namespace, 1))
    wait_ready(control_plane, namespace, "app=llm", 1, timeout=10)
    control_plane.restart_apiserver(downtime=0.5)
    control_plane.kubectl("scale", "deployment", "llm", "-n", namespace, "--replicas=2")
    ready = wait_ready(control_plane, namespace, "app=llm", 2, timeout=20)
    victim = ready[0]["metadata"]["name"]
    control_plane.kubectl("delete", "pod", victim, "-n", namespace, "--timeout=15s")
    wait_until(
        lambda: (
            (r := ready_pods(control_plane, namespace, "app=llm", 2))
            and victim not in {p["metadata"]["name"] for p in r}
        ),
        timeout=15,
        what="replacement after restart",
    )


@pytest.mark.integration
def test_selector_limits_the_kubelet_and_stop_leaves_nothing(control_plane: ControlPlane, namespace: str) -> None:
    client = control_plane.api_client()
    kubelet = TestKubelet(client, node_name=f"sel-{namespace}", namespace=namespace, label_selector="app=llm")
    try:
        kubelet.start()
        apply(control_plane, vllm_deployment("other", namespace, 1))
        apply(control_plane, vllm_deployment("llm", namespace, 2))
        ready = wait_ready(control_plane, namespace, "app=llm", 2, timeout=10)
        assert {p["spec"]["nodeName"] for p in ready} == {kubelet.node_name}
        (other,) = pods(control_plane, namespace, "app=other")
        assert not other["spec"].get("nodeName"), "a pod outside the selector is left to others"
        assert len(kubelet.running_pods()) == 2
    finally:
        kubelet.stop()
        client.close()
    assert kubelet.pids and not [pid for pid in kubelet.pids if pid_alive(pid)]
    nodes = control_plane.kubectl("get", "nodes", "-o", "jsonpath={.items[*].metadata.name}").stdout.split()
    assert kubelet.node_name not in nodes


def slice_of(namespace: str, addresses: list[str], name: str) -> str:
    """An EndpointSlice listing `addresses`, as JSON for kubectl."""
    return json.dumps(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": namespace},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [a]} for a in addresses],
            "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
        }
    )


@pytest.mark.integration
@needs_pod_network
def test_pod_ips_are_endpointslice_valid_and_the_network_goes_with_the_kubelet(
    control_plane: ControlPlane, namespace: str
) -> None:
    client = control_plane.api_client()
    kubelet = TestKubelet(client, node_name=f"net-{namespace}", namespace=namespace)
    try:
        kubelet.start()
        network = kubelet.network
        assert network is not None and network.subnet is not None, "the kubelet made no pod network"
        assert network.namespace in podnet.namespaces(os.getpid())
        apply(control_plane, vllm_deployment("llm", namespace, 2))
        ready = wait_ready(control_plane, namespace, "app=llm", 2, timeout=10)
        ips = sorted(p["status"]["podIP"] for p in ready)
        first = network.subnet.network_address
        assert ips == [str(first + 2), str(first + 3)], "lowest free first, .1 is the host's"
        node = json.loads(control_plane.kubectl("get", "node", kubelet.node_name, "-o", "json").stdout)
        assert {"type": "InternalIP", "address": network.host_address} in node["status"]["addresses"]
        for ip in ips:
            assert model_ids(ip, 8000) == [BASE_MODEL]
        # the simulators run inside the pod network's namespace, not the host's
        host_netns = os.readlink("/proc/self/ns/net")
        for pod in ready:
            pid = int(container_status(pod)["containerID"].split("://", 1)[1])
            assert os.readlink(f"/proc/{pid}/ns/net") != host_netns

        control_plane.kubectl("create", "-f", "-", input=slice_of(namespace, ips, "ok"))
        refused = control_plane.kubectl(
            "create", "-f", "-", input=slice_of(namespace, ["127.0.0.2"], "loop"), check=False
        )
        assert refused.returncode != 0 and "loopback" in refused.stderr
        pids = list(kubelet.pids)
    finally:
        kubelet.stop()
        client.close()
    assert pids and not [pid for pid in pids if pid_alive(pid)]
    assert network.namespace not in podnet.namespaces()
    host_addresses = subprocess.run(["ip", "-4", "-o", "addr", "show"], check=True, capture_output=True, text=True)
    assert f"inet {network.host_address}/" not in host_addresses.stdout, "the host side of the veth pair is gone"


@pytest.mark.integration
def test_without_a_pod_network_pods_fall_back_to_loopback_with_a_warning(
    control_plane: ControlPlane, namespace: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # What a machine without root or iproute2 sees: the pod network cannot be set up.
    monkeypatch.setattr(podnet, "available", lambda: "creating a network namespace needs root (CAP_NET_ADMIN)")
    monkeypatch.delenv("CI", raising=False)
    client = control_plane.api_client()
    kubelet = TestKubelet(client, node_name=f"lo-{namespace}", namespace=namespace)
    try:
        with caplog.at_level(logging.WARNING, logger="localkube.kubelet"):
            kubelet.start()
        assert kubelet.network is None and kubelet.host_ip == HOST_IP
        warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert "needs root" in warning and "cannot be in a route table" in warning
        apply(control_plane, vllm_deployment("llm", namespace, 1))
        (pod,) = wait_ready(control_plane, namespace, "app=llm", 1, timeout=10)
        ip = pod["status"]["podIP"]
        assert ip.startswith("127.0.0.") and pod["status"]["hostIP"] == HOST_IP
        assert model_ids(ip, 8000) == [BASE_MODEL]
    finally:
        kubelet.stop()
        client.close()


@pytest.mark.integration
def test_under_ci_a_missing_pod_network_is_an_error(
    control_plane: ControlPlane, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(podnet, "available", lambda: "iproute2's `ip` is not installed (apt-get install iproute2)")
    monkeypatch.setenv("CI", "true")
    client = control_plane.api_client()
    kubelet = TestKubelet(client, node_name=f"ci-{namespace}", namespace=namespace)
    try:
        with pytest.raises(RuntimeError, match=r"no pod network under CI: .*iproute2"):
            kubelet.start()
        nodes = control_plane.kubectl("get", "nodes", "-o", "jsonpath={.items[*].metadata.name}").stdout.split()
        assert kubelet.node_name not in nodes, "nothing was registered"
    finally:
        kubelet.stop()
        client.close()


@pytest.mark.integration
@needs_pod_network
def test_kubelets_sharing_a_pod_network_never_share_an_address(control_plane: ControlPlane, namespace: str) -> None:
    client = control_plane.api_client()
    with podnet.PodNetwork() as network:
        kubelets = [
            TestKubelet(
                client, node_name=f"{side}-{namespace}", namespace=namespace, label_selector=f"app={side}",
                pod_network=network,
            )
            for side in ("left", "right")
        ]  # fmt: skip
        try:
            for kubelet in kubelets:
                kubelet.start()
            apply(control_plane, vllm_deployment("left", namespace, 2))
            apply(control_plane, vllm_deployment("right", namespace, 2))
            ready = wait_ready(control_plane, namespace, "app=left", 2, timeout=10)
            ready += wait_ready(control_plane, namespace, "app=right", 2, timeout=10)
            ips = {p["status"]["podIP"] for p in ready}
            assert len(ips) == 4 and {p["status"]["hostIP"] for p in ready} == {network.host_address}
            for ip in ips:
                assert model_ids(ip, 8000) == [BASE_MODEL]
        finally:
            for kubelet in kubelets:
                kubelet.stop()
            client.close()
        assert network.is_up, "a kubelet leaves a pod network it was given to its owner"
    assert network.namespace not in podnet.namespaces()


# --- pure translation (no cluster needed) ---------------------------------------------------------


def _pod(container: dict[str, Any], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns", "annotations": annotations or {}},
        "spec": {"containers": [{"name": "c", **container}]},
    }


def _translate(container: dict[str, Any], **kwargs: Any) -> Any:
    return simulator_command(
        _pod(container, kwargs.pop("annotations", None)),
        secrets=kwargs.pop("secrets", lambda ns, n: None),
        config_maps=lambda ns, n: None,
        pod_ip="127.0.0.5",
        host_ip="127.0.0.1",
    )


@pytest.mark.parametrize(
    ("container", "flags", "port"),
    [
        ({"command": ["vllm", "serve", "m", "--enable-lora", "--port", "9000"]}, ["m", "--enable-lora"], 9000),
        ({"command": ["vllm"], "args": ["serve", "m", "--host=0.0.0.0"]}, ["m"], 8000),
        (
            {"command": ["python3", "-m", "vllm.entrypoints.openai.api_server"], "args": ["--model", "m"]},
            ["--model", "m"],
            8000,
        ),
        ({"args": ["--model", "m"], "ports": [{"containerPort": 8080}]}, ["--model", "m"], 8080),
        ({"args": ["m", "--max-loras", "4"]}, ["m", "--max-loras", "4"], 8000),
        ({"command": ["sh", "-c", "echo hi && exec vllm serve m --port=7000 ; true"]}, ["m"], 7000),
        (
            {
                "command": ["vllm", "serve", "m"],
                "ports": [{"name": "metrics", "containerPort": 9090}, {"name": "http", "containerPort": 8001}],
            },
            ["m"],
            8001,
        ),
    ],
)
def test_vllm_command_lines_translate(container: dict[str, Any], flags: list[str], port: int) -> None:
    command = _translate(container)
    assert list(command.vllm_flags) == flags
    assert command.port == port
    argv = command.argv("python", "127.0.0.5")
    assert argv[:3] == ["python", "-m", "vllmsim"] and argv[-4:] == ["--host", "127.0.0.5", "--port", str(port)]


def test_env_values_refs_and_expansion() -> None:
    container = {
        "command": ["vllm", "serve", "$(MODEL)", "--x", "$$(MODEL)"],
        "env": [
            {"name": "MODEL", "value": "base"},
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "GONE", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k", "optional": True}}},
            {"name": "URL", "value": "http://$(IP):8000"},
        ],
    }
    command = _translate(container, secrets=lambda ns, n: {"k": "v"} if n == "s" else None)
    assert command.vllm_flags[:3] == ("base", "--x", "$(MODEL)")
    assert dict(command.env) == {"MODEL": "base", "KEY": "v", "IP": "127.0.0.5", "URL": "http://127.0.0.5:8000"}


def test_missing_secret_is_a_config_error() -> None:
    container = {"env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}]}
    with pytest.raises(PodSpecError) as info:
        container_env(
            _pod(container),
            container,
            secrets=lambda ns, n: None,
            config_maps=lambda ns, n: None,
            pod_ip="",
            host_ip="",
        )
    assert info.value.reason == "CreateContainerConfigError" and '"nope" not found' in info.value.message


def test_non_vllm_commands_and_bad_ports_are_refused() -> None:
    with pytest.raises(PodSpecError, match="does not run vLLM"):
        vllm_flags(["nginx"])
    with pytest.raises(PodSpecError, match="without `serve`"):
        vllm_flags(["vllm", "bench"])
    with pytest.raises(PodSpecError, match="invalid --port"):
        split_host_port(["--port", "http"])


def test_sim_args_annotation_appends_simulator_flags() -> None:
    command = _translate({"command": ["vllm", "serve", "m"]}, annotations={SIM_ARGS_ANNOTATION: "--sim-load-time 0.5"})
    assert list(command.vllm_flags) == ["m", "--sim-load-time", "0.5"]


def test_address_allocator_reuses_the_lowest_free_address(tmp_path: Path) -> None:
    alloc = AddressAllocator(lock_dir=tmp_path)
    a, b = alloc.acquire(18000), alloc.acquire(18000)
    assert (a, b) == ("127.0.0.2", "127.0.0.3")
    alloc.release(a)
    assert alloc.acquire(18000) == "127.0.0.2"
    assert alloc.acquire(18000) == "127.0.0.4"
    # another process holding 127.0.0.3 (its lock file) makes this one skip it
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(60)",
            str(tmp_path / "127.0.0.5.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert alloc.acquire(18000) == "127.0.0.6"
    finally:
        holder.kill()
        holder.wait()
    small = AddressAllocator("10.9.8.0/30", lock_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"no free address left in pod network 10\.9\.8\.0/30"):
        small.acquire(18000)  # .2 is the only candidate and it is not a local address here
    with pytest.raises(ValueError, match="at least 4 addresses"):
        AddressAllocator("10.0.0.1/32")
