"""Session fixtures for every test: the local control plane, the CRDs, a fresh namespace, a test kubelet.

Integration tests (marked `@pytest.mark.integration`) run against a real etcd, kube-apiserver and
kube-controller-manager. The binaries are built by `hack/build-control-plane.sh` when they are not in
the cache yet (never skipped: a clean clone builds them). Pods of the test kubelet live on a pod network
of their own (`localkube.podnet`), so tests talk only to loopback and to pod addresses inside network
namespaces the session made. After the session, no process the harness started may be alive and no
network namespace the session made may be left; the session fails if one is.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from kubernetes.client import ApiClient

from localkube import podnet, process
from localkube.binaries import BinariesError, find_binaries
from localkube.controlplane import ControlPlane
from localkube.kubelet import TestKubelet

# Property tests judge results, not speed: Hypothesis' default 200 ms deadline per example would fail them at
# random on a loaded machine. A test that sets its own settings keeps them.
settings.register_profile("suite", deadline=None, print_blob=True)
settings.load_profile("suite")

_startup_times: list[float] = []


_binaries: list[Path | BinariesError] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the control-plane binaries before any test runs, when integration tests are selected.

    A first build takes many minutes; done here it is outside every test's timeout, and its progress
    is shown (output capture is suspended meanwhile). A failure is reported by the fixture.
    """
    if not any(item.get_closest_marker("integration") for item in session.items):
        return
    capture = session.config.pluginmanager.getplugin("capturemanager")
    context = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
    with context:
        try:
            _binaries.append(find_binaries())
        except BinariesError as exc:
            _binaries.append(exc)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """One control plane for the whole session (ready in seconds with cached binaries)."""
    found = _binaries[0] if _binaries else find_binaries()
    if isinstance(found, BinariesError):
        raise found
    cp = ControlPlane(bin_dir=found, start_timeout=float(os.environ.get("LOCALKUBE_START_TIMEOUT", "60")))
    cp.start()
    _startup_times.append(cp.startup_seconds or 0.0)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def api_client(control_plane: ControlPlane) -> Iterator[ApiClient]:
    """An admin client of the official `kubernetes` package, shared by the session."""
    client = control_plane.api_client()
    try:
        yield client
    finally:
        client.close()


def _namespace_name(request: pytest.FixtureRequest) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    return f"{base or 't'}-{uuid.uuid4().hex[:6]}"


ROOT = Path(__file__).resolve().parents[1]
CRD_NAMES = ("loraautoscalers.loraautoscaler.io", "loraplacements.loraautoscaler.io")


@pytest.fixture(scope="session")
def crds(control_plane: ControlPlane) -> None:
    """The project's CRDs installed as users install them (`kubectl apply -k config/crd`), and served.

    Established means the API server serves the resources, so kubectl and the informers can resolve them.
    Installed once and never removed: every test that needs them shares the same definitions.
    """
    control_plane.kubectl("apply", "-k", str(ROOT / "config" / "crd"))
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", *[f"crd/{n}" for n in CRD_NAMES],
                          timeout=90)


@pytest.fixture
def namespace(control_plane: ControlPlane, api_client: ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test; deleted afterwards (its pods first, with no grace)."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    name = _namespace_name(request)
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    try:
        yield name
    finally:
        # Without a kubelet to confirm them, graceful pod deletions would keep the namespace Terminating.
        with contextlib.suppress(Exception):
            core.delete_collection_namespaced_pod(name, grace_period_seconds=0)
        with contextlib.suppress(Exception):
            core.delete_namespace(name, grace_period_seconds=0)


@pytest.fixture
def kubelet(control_plane: ControlPlane, namespace: str) -> Iterator[TestKubelet]:
    """A test kubelet on a node of its own that runs a vLLM simulator for each pod of `namespace`.

    Its pods get addresses on the kubelet's own pod network (10.244.N.x), which the API server accepts in
    EndpointSlices; `kubelet.pod_address(namespace, name)` says where a pod's simulator listens.
    """
    client = control_plane.api_client()
    k = TestKubelet(client, node_name=f"node-{namespace}", namespace=namespace)
    k.start()
    try:
        yield k
    finally:
        k.stop()
        client.close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session if a process started by the harness, or a pod network it made, outlived it
    (and remove what is left)."""
    problems = []
    left = [pid for pid in process.started_pids() if process.pid_alive(pid)]
    for pid in left:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if left:
        problems.append(f"processes started by the test harness were still alive after the session: {left}")
    networks = podnet.namespaces(os.getpid())
    for name in networks:
        podnet.delete(name)
    if networks:
        problems.append(f"network namespaces made by the session were left after it: {networks}")
    if not problems:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for message in problems:
        if reporter is not None:
            reporter.write_line(f"ERROR: {message}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Show how long the control plane took to become ready (the acceptance bound is 30 s)."""
    for seconds in _startup_times:
        terminalreporter.write_line(f"local control plane ready in {seconds:.1f}s")
