"""A real Kubernetes control plane on loopback: etcd, kube-apiserver and kube-controller-manager.

Used by the integration tests (a session fixture), by people (`python -m localkube up`), and by any
script as a context manager::

    with ControlPlane() as cp:
        cp.kubectl("get", "--raw", "/readyz")
        core = kubernetes.client.CoreV1Api(cp.api_client())

There is no scheduler and no kubelet; `localkube.kubelet.TestKubelet` plays both for pods.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import yaml

from localkube import components
from localkube.binaries import find_binaries
from localkube.certs import CertificateAuthority, signing_key_pair
from localkube.process import DEFAULT_GRACE_SECONDS, ENV_KEEP_WORK_DIR, ManagedProcess

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

log = logging.getLogger(__name__)

# kube-apiserver's graceful termination waits for open watches (up to a minute) before it exits; nothing
# here needs that drain, and a long outage would push every client's relist back-off up.
APISERVER_STOP_GRACE_SECONDS = 1.0
_POLL_SECONDS = 0.1


class ControlPlaneError(RuntimeError):
    """A component did not start or did not become healthy; the message names it and shows its log."""


class KubectlError(subprocess.CalledProcessError):
    """kubectl exited non-zero; the message carries its stderr."""

    def __str__(self) -> str:
        return f"kubectl {' '.join(self.cmd[3:])} exited {self.returncode}: {(self.stderr or '').strip()}"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((components.LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _http_get(
    host: str, port: int, path: str, *, context: ssl.SSLContext | None, timeout: float = 2.0
) -> tuple[int, str]:
    """GET without any proxy from the environment (all of this is loopback)."""
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager with an admin kubeconfig, in a temp work dir."""

    def __init__(
        self,
        *,
        bin_dir: Path | None = None,
        work_dir: Path | None = None,
        keep_work_dir: bool | None = None,
        start_timeout: float = 60.0,
        hpa_sync_period: str = "1s",
        wait_for_default_service_account: bool = True,
    ) -> None:
        self._bin_dir = bin_dir
        self._own_work_dir = work_dir is None
        self._work_dir = work_dir
        self._keep = bool(os.environ.get(ENV_KEEP_WORK_DIR)) if keep_work_dir is None else keep_work_dir
        self.start_timeout = start_timeout
        self._hpa_sync_period = hpa_sync_period
        self._wait_for_sa = wait_for_default_service_account
        self._layout: components.Layout | None = None
        self._procs: dict[str, ManagedProcess] = {}
        self._pids: list[int] = []
        self._lock = threading.RLock()
        self._cluster_ca: CertificateAuthority | None = None
        self.startup_seconds: float | None = None
        self.build_seconds: float | None = None
        """Seconds spent finding (or building) the binaries, outside `startup_seconds`."""
        self.phase_seconds: dict[str, float] = {}
        """Seconds each start-up phase took, in order (what to look at when start-up is slow)."""
        self._phase_start = 0.0

    # --- public surface -----------------------------------------------------------------------

    @property
    def layout(self) -> components.Layout:
        """Ports and paths; only valid once started."""
        if self._layout is None:
            raise ControlPlaneError("the control plane is not started")
        return self._layout

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (client certificate in group system:masters)."""
        return self.layout.kubeconfig

    @property
    def server(self) -> str:
        """The API server URL, https://127.0.0.1:<port>."""
        return self.layout.server

    @property
    def ca_cert(self) -> Path:
        """The cluster CA certificate (it signs the API server's serving and the admin client certs)."""
        return self.layout.pki / "ca.crt"

    @property
    def work_dir(self) -> Path:
        """Where certificates, the etcd data, the kubeconfig and component logs live."""
        return self.layout.work_dir

    @property
    def pids(self) -> list[int]:
        """Every PID this control plane started, restarts included."""
        with self._lock:
            return list(self._pids)

    def component_log(self, name: str) -> Path:
        """Log file of `etcd`, `kube-apiserver` or `kube-controller-manager`."""
        return self.layout.log(name)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        """Generate certificates, start the components in order and wait until the cluster is usable."""
        with self._lock:
            if self._layout is not None:
                raise ControlPlaneError("the control plane is already started")
            self.phase_seconds.clear()
            t_build = time.monotonic()
            bin_dir = self._bin_dir or find_binaries()  # minutes on a clean machine, not part of start-up
            self.build_seconds = time.monotonic() - t_build
            t0 = self._phase_start = time.monotonic()
            work_dir = self._work_dir or Path(tempfile.mkdtemp(prefix="localkube-"))
            work_dir.mkdir(parents=True, exist_ok=True)
            self._work_dir = work_dir
            ports = [free_port() for _ in range(4)]
            while len(set(ports)) < 4:
                ports = [free_port() for _ in range(4)]
            self._layout = components.Layout(bin_dir, work_dir, *ports)
            try:
                self._write_pki()
                self._write_kubeconfig()
                deadline = t0 + self.start_timeout
                self._mark("certificates")
                self._start("etcd", components.etcd_argv(self.layout))
                self._wait("etcd", deadline, self._etcd_healthy)
                self._mark("etcd healthy")
                self._start("kube-apiserver", components.apiserver_argv(self.layout))
                self._wait("kube-apiserver", deadline, self._apiserver_ready)
                self._mark("kube-apiserver ready")
                self._start(
                    "kube-controller-manager",
                    components.controller_manager_argv(self.layout, self._hpa_sync_period),
                )
                self._wait("kube-controller-manager", deadline, self._controller_manager_healthy)
                self._mark("kube-controller-manager healthy")
                self._wait("kube-controller-manager", deadline, self._default_namespace_ready)
                self._mark("default namespace and service account")
            except BaseException:
                self.stop(keep_work_dir=True)
                raise
            self.startup_seconds = time.monotonic() - t0
            phases = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.phase_seconds.items())
            log.info(
                "control plane ready in %.1fs at %s (%s; work dir %s)",
                self.startup_seconds,
                self.server,
                phases,
                work_dir,
            )
            return self

    def stop(self, *, keep_work_dir: bool | None = None, grace: float = DEFAULT_GRACE_SECONDS) -> None:
        """Stop the components in reverse order (process groups, SIGTERM then SIGKILL); idempotent."""
        with self._lock:
            for name in reversed(list(self._procs)):
                self._procs[name].stop(min(grace, APISERVER_STOP_GRACE_SECONDS) if name == "kube-apiserver" else grace)
            self._procs.clear()
            keep = self._keep if keep_work_dir is None else keep_work_dir
            if self._layout is not None and self._own_work_dir and not keep:
                shutil.rmtree(self._layout.work_dir, ignore_errors=True)
            elif self._layout is not None:
                log.info("control plane work dir kept: %s", self._layout.work_dir)
            self._layout = None

    def restart_apiserver(self, downtime: float = 0.0, *, restart_controller_manager: bool = True) -> None:
        """Stop kube-apiserver and start it again on the same port and certificates, then wait for /readyz.

        `downtime` keeps it down that long, so that clients see their connections fail. By default
        kube-controller-manager is restarted too once the API server is back: its informers back off
        exponentially while the API server is away (up to 30 s), and tests that restart the API server
        to check their own clients should not then wait on the controller manager's back-off.
        """
        with self._lock:
            proc = self._procs.get("kube-apiserver")
            if proc is None:
                raise ControlPlaneError("the control plane is not started")
            t0 = time.monotonic()
            proc.stop(APISERVER_STOP_GRACE_SECONDS)
            if downtime > 0:
                time.sleep(downtime)
            proc.start()
            self._pids.append(proc.pid or 0)
            deadline = time.monotonic() + self.start_timeout
            self._wait("kube-apiserver", deadline, self._apiserver_ready)
            kcm = self._procs.get("kube-controller-manager")
            if restart_controller_manager and kcm is not None:
                kcm.stop()
                kcm.start()
                self._pids.append(kcm.pid or 0)
                self._wait("kube-controller-manager", deadline, self._controller_manager_healthy)
            log.info("kube-apiserver restarted in %.1fs", time.monotonic() - t0)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl (same release) against this cluster; output is text."""
        argv = [str(self.layout.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def api_client(self) -> ApiClient:
        """A new client for the official `kubernetes` package, authenticated as the admin."""
        from kubernetes import client

        pki = self.layout.pki
        configuration = client.Configuration()
        configuration.host = self.server
        configuration.ssl_ca_cert = str(pki / "ca.crt")
        configuration.cert_file = str(pki / "admin.crt")
        configuration.key_file = str(pki / "admin.key")
        configuration.verify_ssl = True
        return client.ApiClient(configuration)

    def issue_client_certificate(self, user: str, groups: Sequence[str] = ()) -> tuple[Path, Path]:
        """A client certificate for `user` in `groups`, signed by the cluster CA (for RBAC tests)."""
        ca = self._ca()
        pair = ca.issue(user, organizations=tuple(groups), client=True)
        return pair.write(self.layout.pki / "users", user.replace(":", "_"))

    # --- start-up steps -----------------------------------------------------------------------

    def _ca(self) -> CertificateAuthority:
        if self._cluster_ca is None:
            raise ControlPlaneError("the control plane is not started")
        return self._cluster_ca

    def _mark(self, phase: str) -> None:
        now = time.monotonic()
        self.phase_seconds[phase] = now - self._phase_start
        self._phase_start = now

    def _write_pki(self) -> None:
        pki = self.layout.pki
        ca = CertificateAuthority("localkube-ca")
        self._cluster_ca = ca
        pki.mkdir(parents=True, exist_ok=True)
        (pki / "ca.crt").write_bytes(ca.cert_pem)
        ca.issue(
            "kube-apiserver",
            dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
            ip_addresses=(components.LOOPBACK, "10.0.0.1"),
            server=True,
        ).write(pki, "apiserver")
        ca.issue("kubernetes-admin", organizations=("system:masters",), client=True).write(pki, "admin")
        sa = signing_key_pair()
        (pki / "sa.pub").write_bytes(sa.cert_pem)
        sa_key = pki / "sa.key"
        sa_key.touch(mode=0o600)
        sa_key.write_bytes(sa.key_pem)
        front_proxy = CertificateAuthority("localkube-front-proxy-ca")
        (pki / "front-proxy-ca.crt").write_bytes(front_proxy.cert_pem)
        front_proxy.issue("front-proxy-client", client=True).write(pki, "front-proxy-client")

    def _write_kubeconfig(self) -> None:
        pki = self.layout.pki
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "localkube", "cluster": {"server": self.server, "certificate-authority": str(pki / "ca.crt")}}
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate": str(pki / "admin.crt"),
                        "client-key": str(pki / "admin.key"),
                    },
                }
            ],
            "contexts": [{"name": "localkube", "context": {"cluster": "localkube", "user": "admin"}}],
            "current-context": "localkube",
            "preferences": {},
        }
        path = self.layout.kubeconfig
        path.touch(mode=0o600)
        path.write_text(yaml.safe_dump(config, sort_keys=False))

    def _start(self, name: str, argv: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        proc = ManagedProcess(name, argv, self.layout.log(name), env=env)
        proc.start()
        self._procs[name] = proc
        self._pids.append(proc.pid or 0)

    def _wait(self, name: str, deadline: float, probe: Callable[[], str | None]) -> None:
        """Poll `probe` (None means healthy, a string says what is missing) until the deadline."""
        proc = self._procs[name]
        problem: str | None = "not probed yet"
        while True:
            if not proc.alive():
                raise ControlPlaneError(
                    f"{name} exited with code {proc.returncode} during start-up; last lines of "
                    f"{proc.log_path}:\n{proc.log_tail()}"
                )
            try:
                problem = probe()
            except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if problem is None:
                return
            if time.monotonic() >= deadline:
                raise ControlPlaneError(
                    f"{name} did not become ready within {self.start_timeout:.0f}s ({problem}); last lines of "
                    f"{proc.log_path}:\n{proc.log_tail()}"
                )
            time.sleep(_POLL_SECONDS)

    def _admin_tls(self) -> ssl.SSLContext:
        pki = self.layout.pki
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return context

    def _etcd_healthy(self) -> str | None:
        status, body = _http_get(components.LOOPBACK, self.layout.etcd_client_port, "/health", context=None)
        if status == 200 and json.loads(body).get("health") == "true":
            return None
        return f"/health answered {status}: {body[:200]}"

    def _apiserver_ready(self) -> str | None:
        status, body = _http_get(components.LOOPBACK, self.layout.apiserver_port, "/readyz", context=self._admin_tls())
        return None if status == 200 else f"/readyz answered {status}: {body[-300:]}"

    def _controller_manager_healthy(self) -> str | None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # its serving cert is self-signed; this only reads health
        status, body = _http_get(components.LOOPBACK, self.layout.controller_manager_port, "/healthz", context=context)
        return None if status == 200 else f"/healthz answered {status}: {body[-300:]}"

    def _default_namespace_ready(self) -> str | None:
        context = self._admin_tls()
        port = self.layout.apiserver_port
        status, _ = _http_get(components.LOOPBACK, port, "/api/v1/namespaces/default", context=context)
        if status != 200:
            return f"namespace default not there yet ({status})"
        if not self._wait_for_sa:
            return None
        status, _ = _http_get(
            components.LOOPBACK, port, "/api/v1/namespaces/default/serviceaccounts/default", context=context
        )
        return None if status == 200 else f"service account default/default not created yet ({status})"
