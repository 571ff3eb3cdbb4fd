"""Command lines of the three control-plane components, as pure functions of a layout.

Keeping the flags here, apart from starting and waiting, lets a test read exactly what runs and lets
the flags be changed in one place when the pinned release moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"

# Old controller names are accepted as aliases by kube-controller-manager 1.28 and newer.
CONTROLLERS = (
    "deployment",
    "replicaset",
    "statefulset",
    "garbagecollector",
    "horizontalpodautoscaling",
    "namespace",
    "serviceaccount",
    "serviceaccount-token",
    "endpointslice",
    "root-ca-cert-publisher",
)


@dataclass(frozen=True)
class Layout:
    """Ports and file paths shared by the components of one control plane."""

    bin_dir: Path
    work_dir: Path
    etcd_client_port: int
    etcd_peer_port: int
    apiserver_port: int
    controller_manager_port: int

    @property
    def pki(self) -> Path:
        """Folder of certificates and keys."""
        return self.work_dir / "pki"

    @property
    def etcd_url(self) -> str:
        """Where the API server reaches etcd."""
        return f"http://{LOOPBACK}:{self.etcd_client_port}"

    @property
    def server(self) -> str:
        """The API server's URL."""
        return f"https://{LOOPBACK}:{self.apiserver_port}"

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (group system:masters)."""
        return self.work_dir / "admin.kubeconfig"

    def log(self, component: str) -> Path:
        """Log file of one component."""
        return self.work_dir / "logs" / f"{component}.log"


def etcd_argv(layout: Layout) -> list[str]:
    """etcd on loopback with fsync off: tests need speed, not durability."""
    peer = f"http://{LOOPBACK}:{layout.etcd_peer_port}"
    return [
        str(layout.bin_dir / "etcd"),
        "--name=localkube",
        f"--data-dir={layout.work_dir / 'etcd'}",
        f"--listen-client-urls={layout.etcd_url}",
        f"--advertise-client-urls={layout.etcd_url}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=localkube={peer}",
        "--unsafe-no-fsync=true",
        "--log-level=warn",
        "--quota-backend-bytes=2147483648",
    ]


def apiserver_argv(layout: Layout) -> list[str]:
    """kube-apiserver with RBAC and Node authorization, ServiceAccount admission off (no token mounts).

    The endpoint reconciler is off: it would write the loopback advertise address into the `kubernetes`
    Endpoints, which validation refuses, and nothing inside this cluster needs that Service.
    """
    pki = layout.pki
    return [
        str(layout.bin_dir / "kube-apiserver"),
        f"--etcd-servers={layout.etcd_url}",
        f"--bind-address={LOOPBACK}",
        f"--advertise-address={LOOPBACK}",
        f"--secure-port={layout.apiserver_port}",
        f"--cert-dir={pki}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--authorization-mode=Node,RBAC",
        "--disable-admission-plugins=ServiceAccount",
        "--allow-privileged=true",
        f"--service-account-issuer={layout.server}/",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        "--endpoint-reconciler-type=none",
        f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
        f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
        "--profiling=false",
        "--v=1",
    ]


def controller_manager_argv(layout: Layout, hpa_sync_period: str = "1s") -> list[str]:
    """kube-controller-manager with the controllers the tests rely on, leader election off."""
    pki = layout.pki
    kubeconfig = layout.kubeconfig
    return [
        str(layout.bin_dir / "kube-controller-manager"),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--bind-address={LOOPBACK}",
        f"--secure-port={layout.controller_manager_port}",
        f"--cert-dir={layout.work_dir / 'kcm-certs'}",
        f"--controllers={','.join(CONTROLLERS)}",
        "--use-service-account-credentials=false",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        "--leader-elect=false",
        f"--horizontal-pod-autoscaler-sync-period={hpa_sync_period}",
        "--kube-api-qps=200",
        "--kube-api-burst=400",
        "--concurrent-deployment-syncs=10",
        "--concurrent-replicaset-syncs=10",
        "--concurrent-gc-syncs=10",
        "--profiling=false",
        "--v=1",
    ]
