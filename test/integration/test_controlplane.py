"""The local control plane: it comes up, answers, survives an API server restart, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from localkube import components
from localkube.certs import CertificateAuthority
from localkube.controlplane import ControlPlane, ControlPlaneError, KubectlError
from localkube.process import ManagedProcess, pid_alive, started_pids
from localkube.wait import wait_until

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_readyz_through_real_kubectl(control_plane: ControlPlane) -> None:
    result = control_plane.kubectl("get", "--raw", "/readyz")
    assert result.stdout.strip() == "ok"
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.34.4"


@pytest.mark.integration
def test_admin_is_cluster_admin_and_controllers_run(control_plane: ControlPlane, namespace: str) -> None:
    assert control_plane.kubectl("auth", "can-i", "*", "*").stdout.strip() == "yes"
    # the serviceaccount controller of kube-controller-manager gives every namespace its `default` account
    wait_until(
        lambda: control_plane.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode == 0,
        timeout=15,
        what=f"service account default in {namespace}",
    )


@pytest.mark.integration
def test_kubectl_error_carries_stderr(control_plane: ControlPlane) -> None:
    with pytest.raises(KubectlError, match=r"NotFound|not found"):
        control_plane.kubectl("get", "namespace", "no-such-namespace-here")
    assert control_plane.kubectl("get", "namespace", "no-such-namespace-here", check=False).returncode != 0


@pytest.mark.integration
def test_rbac_is_enforced_for_other_users(control_plane: ControlPlane) -> None:
    cert, key = control_plane.issue_client_certificate("jane", groups=("developers",))
    result = control_plane.kubectl(
        "get", "pods", "-A", f"--client-certificate={cert}", f"--client-key={key}", check=False
    )
    assert result.returncode != 0
    assert "forbidden" in result.stderr.lower()
    assert "jane" in result.stderr


@pytest.mark.integration
def test_deployment_controller_makes_pods(control_plane: ControlPlane, namespace: str) -> None:
    manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "example/web:1"}]},
            },
        },
    }
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def pods() -> int:
        out = control_plane.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout
        return len(json.loads(out)["items"]) == 2

    wait_until(pods, timeout=20, what="2 pods made by the Deployment and ReplicaSet controllers")


@pytest.mark.integration
def test_apiserver_restart_keeps_data(control_plane: ControlPlane, namespace: str) -> None:
    control_plane.kubectl("create", "configmap", "keep", "-n", namespace, "--from-literal=a=b")
    before = control_plane.pids
    port = control_plane.layout.apiserver_port
    control_plane.restart_apiserver()
    assert control_plane.layout.apiserver_port == port
    after = control_plane.pids
    assert len(after) == len(before) + 2 and not set(after[-2:]) & set(before)
    assert control_plane.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    out = control_plane.kubectl("get", "configmap", "keep", "-n", namespace, "-o", "jsonpath={.data.a}")
    assert out.stdout == "b"


def test_component_flags_match_the_layout(tmp_path: Path) -> None:
    layout = components.Layout(tmp_path / "bin", tmp_path, 2379, 2380, 6443, 10257)
    api = components.apiserver_argv(layout)
    assert "--secure-port=6443" in api and "--bind-address=127.0.0.1" in api
    assert "--disable-admission-plugins=ServiceAccount" in api
    assert f"--etcd-servers={layout.etcd_url}" in api
    kcm = components.controller_manager_argv(layout)
    controllers = next(a for a in kcm if a.startswith("--controllers=")).split("=", 1)[1].split(",")
    for needed in ("deployment", "replicaset", "garbagecollector", "horizontalpodautoscaling", "namespace"):
        assert needed in controllers
    assert "--leader-elect=false" in kcm and "--use-service-account-credentials=false" in kcm
    assert "--unsafe-no-fsync=true" in components.etcd_argv(layout)


def test_certificate_authority_refuses_nameless_serving_cert() -> None:
    ca = CertificateAuthority()
    with pytest.raises(ValueError, match="needs at least one DNS name"):
        ca.issue("x", server=True)
    with pytest.raises(ValueError, match="server, a client"):
        ca.issue("x")


@pytest.mark.integration
def test_failing_component_is_named_with_its_log(tmp_path: Path) -> None:
    # A fake kube-apiserver that exits at once: the error must name it and show its log.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real = Path(os.environ.get("LORA_AUTOSCALER_KUBE_BIN") or _binaries())
    for name in ("etcd", "kubectl", "kube-controller-manager"):
        (bin_dir / name).symlink_to(real / name)
    fake = bin_dir / "kube-apiserver"
    fake.write_text("#!/bin/sh\necho 'E0101 fake apiserver: cannot listen' >&2\nexit 3\n")
    fake.chmod(0o755)
    cp = ControlPlane(bin_dir=bin_dir, start_timeout=20)
    with pytest.raises(ControlPlaneError) as info:
        cp.start()
    message = str(info.value)
    assert "kube-apiserver exited with code 3" in message
    assert "fake apiserver: cannot listen" in message
    assert all(not pid_alive(pid) for pid in cp.pids), "the etcd started before the failure must be stopped"


def _binaries() -> str:
    from localkube.binaries import find_binaries

    return str(find_binaries())


def _read_until(proc: subprocess.Popen[str], prefix: str, timeout: float) -> list[str]:
    """Lines of the child's stdout up to one starting with `prefix`, read by a helper thread."""
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if line.startswith(prefix):
            return seen
    raise AssertionError(f"no line starting with {prefix!r} within {timeout}s; got {seen!r}")


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line mentions `text` (the work dir appears in every component's flags)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


@pytest.mark.integration
def test_cli_up_runs_until_sigterm_and_leaves_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "localkube", "up"],
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "stderr").open("w"),
        text=True,
        cwd=REPO,
        env=env,
    )
    try:
        lines = _read_until(proc, "export KUBECONFIG=", timeout=90)
        kubeconfig = lines[-1].split("=", 1)[1]
        assert lines[-2] == kubeconfig
        work_dir = str(Path(kubeconfig).parent)
        kubectl = Path(_binaries()) / "kubectl"
        ready = subprocess.run(
            [str(kubectl), "--kubeconfig", kubeconfig, "get", "--raw", "/readyz"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert ready.stdout.strip() == "ok"
        children = _processes_mentioning(work_dir)
        assert len(children) >= 3, f"etcd, kube-apiserver and kube-controller-manager expected: {children}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        wait_until(lambda: not _processes_mentioning(work_dir), timeout=10, what="no component left")
        assert not Path(work_dir).exists(), "the temp work dir is removed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_harness_killed_with_sigkill_leaves_nothing(tmp_path: Path) -> None:
    # The harness process dies without any chance to clean up; its reaper must stop the components.
    script = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from localkube.controlplane import ControlPlane\n"
        "cp = ControlPlane(work_dir=Path(sys.argv[1])).start()\n"
        "print(json.dumps(cp.pids), flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "work")],
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "stderr").open("w"),
        text=True,
        cwd=REPO,
    )
    try:
        lines = _read_until(proc, "[", timeout=90)
        pids = json.loads(lines[-1])
        assert len(pids) == 3 and all(pid_alive(p) for p in pids)
        proc.kill()
        proc.wait(timeout=10)
        wait_until(lambda: not [p for p in pids if pid_alive(p)], timeout=15, what="components stopped by the reaper")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_sigterm_to_a_harness_process_stops_components_and_cleans_up(tmp_path: Path) -> None:
    # A script that never handles SIGTERM itself: the harness's handler stops the components, then
    # unwinds the `with` block (which removes the work dir, something only the in-process path does).
    script = (
        "import json, time\n"
        "from localkube.controlplane import ControlPlane\n"
        "with ControlPlane() as cp:\n"
        "    print(json.dumps({'pids': cp.pids, 'work': str(cp.work_dir)}), flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "stderr").open("w"),
        text=True,
        cwd=REPO,
    )
    try:
        info = json.loads(_read_until(proc, "{", timeout=90)[-1])
        assert all(pid_alive(p) for p in info["pids"])
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        assert code != -signal.SIGTERM, "the harness handled SIGTERM instead of dying at once"
        assert not [p for p in info["pids"] if pid_alive(p)]
        assert not Path(info["work"]).exists()
        assert "KeyboardInterrupt" in (tmp_path / "stderr").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- process supervision (no cluster needed) ------------------------------------------------------


def test_stop_kills_the_whole_process_group_even_when_sigterm_is_ignored(tmp_path: Path) -> None:
    # A parent that ignores SIGTERM and a grandchild that would outlive it: both must be gone.
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print(f'child={child.pid}', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = ManagedProcess("stubborn", [sys.executable, "-c", script], tmp_path / "stubborn.log")
    proc.start()
    assert proc.pid is not None and proc.pid in started_pids()
    found = wait_until(
        lambda: re.findall(r"child=(\d+)", proc.log_path.read_text()), timeout=10, what="the child's pid"
    )
    grandchild = int(found[0])
    assert pid_alive(grandchild)
    t0 = time.monotonic()
    code = proc.stop(grace=0.5)
    assert code == -signal.SIGKILL
    assert time.monotonic() - t0 < 5
    assert not proc.alive()
    wait_until(lambda: not pid_alive(grandchild), timeout=5, what="grandchild killed with its group")
    assert proc.stop() == code, "stop is idempotent"


def test_start_errors_and_log_tail(tmp_path: Path) -> None:
    missing = ManagedProcess("ghost", [str(tmp_path / "no-such-binary")], tmp_path / "ghost.log")
    with pytest.raises(RuntimeError, match="cannot start ghost"):
        missing.start()
    echo = ManagedProcess("echo", ["sh", "-c", "for i in 1 2 3 4 5; do echo line$i; done"], tmp_path / "echo.log")
    echo.start()
    wait_until(lambda: echo.returncode == 0, timeout=10, what="echo exits")
    assert echo.log_tail(2) == "line4\nline5"
    assert echo.reap() == 0
