"""A test "kubelet" (and scheduler) for the local control plane: one vLLM simulator per pod.

The local control plane has no scheduler and no kubelet, so pods made by the real Deployment and
ReplicaSet controllers would stay Pending for ever. `TestKubelet`:

- registers a Node (Ready, with capacity);
- watches pods (all, or one namespace, optionally a label selector) that are unbound or bound to it, and
  binds the unbound ones to its node (`pods/binding`, as the scheduler does);
- for each bound pod starts `python -m vllmsim <the pod's vLLM flags> --host <pod IP> --port P` with the
  container's env, inside the kubelet's pod network (`localkube.podnet`): a network namespace of its own,
  joined to the host by a veth pair, where each pod gets its own address (10.244.N.2 upward, reused once
  the pod is gone) that the host reaches directly and the API server accepts in EndpointSlices;
- reports the pod `Running` with `podIP` (that address), `hostIP` (the host's side of the pod network),
  container statuses, and `Ready` once the simulator answers `GET /health` (probed every second
  afterwards, like a readiness probe);
- restarts a simulator that exits (restartCount + 1, `lastState.terminated`, not Ready until healthy,
  with a crash-loop back-off), and `restart_pod()` kills one on demand;
- on deletion (deletionTimestamp set) stops the simulator and confirms the deletion with grace period 0
  as a kubelet does;
- lists and then watches from the list's resourceVersion, relisting after any error, so it survives an
  API server restart; failed API writes are retried.

Where a pod network cannot be made (not root, no iproute2), pods get loopback addresses (127.0.0.2
upward, see `AddressAllocator`) with a warning: they run and answer, but the API server refuses them in
EndpointSlices, so they cannot be in a route table. Under CI (`$CI` set) that is an error instead.

Two threads: one turns the watch into events on a queue; one owns all pod state and processes, handling
events and a 0.1 s tick. Other threads talk to it through the same queue.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import http.client
import ipaddress
import json
import logging
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from localkube.podnet import PodNetwork, PodNetworkError
from localkube.podspec import PodSpecError, SimulatorCommand, decode_secret_data, simulator_command
from localkube.process import ENV_KEEP_WORK_DIR, ManagedProcess

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

log = logging.getLogger(__name__)

HOST_IP = "127.0.0.1"
"""The host address of a kubelet on the loopback fallback."""
ENV_CI = "CI"
"""Set under CI, where a kubelet without a pod network is an error rather than a warning."""
NODE_LABEL = "localkube.lora-autoscaler.io/test-kubelet"
DEFAULT_CAPACITY: Mapping[str, str] = {
    "cpu": "64",
    "memory": "256Gi",
    "pods": "250",
    "ephemeral-storage": "1Ti",
    "nvidia.com/gpu": "16",
}
KUBELET_VERSION = "v1.34.4"

_TICK_SECONDS = 0.1
_READY_PROBE_PERIOD = 1.0
_READY_FAILURE_THRESHOLD = 2
_PROBE_TIMEOUT = 0.5
_RETRY_SECONDS = 0.5
_CONFIG_RETRY_SECONDS = 2.0
_STOP_GRACE_SECONDS = 3.0
_API_TIMEOUT = (2.0, 10.0)
_WATCH_SECONDS = 240
_QUICK_EXIT_SECONDS = 5.0
_MAX_BACKOFF_SECONDS = 10.0

Obj = dict[str, Any]
PodKey = tuple[str, str]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class AddressAllocator:
    """Hands out pod addresses of one local network, lowest free first: 127.0.0.2, 127.0.0.3, ... by default.

    Shared by every kubelet in the process that uses the same network. Across processes (several test
    runs at once) an address is claimed with an advisory lock file, held until it is released or the
    process dies; and an address is skipped when something else already listens on the wanted port
    there. So two pods never share an (address, port). Addresses ending in .0 or .255 are never used.

    The fallback of a kubelet that cannot make a pod network: 127.0.0.0/8 needs no set-up, but the API
    server refuses loopback addresses in Endpoints and EndpointSlices.
    """

    def __init__(self, network: str = "127.0.0.0/8", lock_dir: Path | None = None) -> None:
        self.network = ipaddress.ip_network(network)
        if self.network.version != 4 or self.network.num_addresses < 4:
            raise ValueError(f"pod network {network} must be an IPv4 network of at least 4 addresses")
        self._lock = threading.Lock()
        self._used: set[int] = set()
        self._claims: dict[int, int] = {}  # n -> fd of the lock file held for that address
        self._lock_dir = lock_dir or Path(tempfile.gettempdir()) / f"localkube-addresses-{os.getuid()}"

    def _address(self, n: int) -> str:
        return str(self.network.network_address + n)

    @staticmethod
    def _bindable(ip: str, port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((ip, port))
            except OSError:
                return False
        return True

    def _claim(self, n: int, ip: str) -> bool:
        """Take the cross-process lock of an address (kept if this process already holds it)."""
        if n in self._claims:
            return True
        self._lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_dir / f"{ip}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._claims[n] = fd
        return True

    def _unclaim(self, n: int) -> None:
        fd = self._claims.pop(n, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the lock

    def acquire(self, port: int) -> str:
        """The lowest free address where `port` can be bound."""
        with self._lock:
            for n in range(2, self.network.num_addresses - 1):
                if n & 255 in (0, 255) or n in self._used:
                    continue
                ip = self._address(n)
                if not self._claim(n, ip):
                    continue
                if self._bindable(ip, port):
                    self._used.add(n)
                    return ip
                self._unclaim(n)
        raise RuntimeError(f"no free address left in pod network {self.network} for port {port}")

    def release(self, ip: str) -> None:
        """Make an address available again."""
        n = int(ipaddress.ip_address(ip)) - int(self.network.network_address)
        with self._lock:
            self._used.discard(n)
            self._unclaim(n)


_allocators: dict[str, AddressAllocator] = {}
_allocators_lock = threading.Lock()


def shared_allocator(network: str) -> AddressAllocator:
    """The process-wide allocator of `network` (kubelets on one network must share it)."""
    key = str(ipaddress.ip_network(network))
    with _allocators_lock:
        if key not in _allocators:
            _allocators[key] = AddressAllocator(key)
        return _allocators[key]


ADDRESSES = shared_allocator("127.0.0.0/8")
"""The loopback fallback: 127.0.0.2 upward."""


@dataclass
class _PodRuntime:
    """What the kubelet knows about one pod it runs."""

    namespace: str
    name: str
    uid: str
    pod: Obj
    ip: str | None = None
    command: SimulatorCommand | None = None
    proc: ManagedProcess | None = None
    start_time: str = field(default_factory=_now)
    container_started_at: str | None = None
    started_monotonic: float = 0.0
    restart_count: int = 0
    quick_exits: int = 0
    next_start_at: float = 0.0
    ready: bool = False
    ready_since: str = field(default_factory=_now)
    probe_failures: int = 0
    next_probe_at: float = 0.0
    last_terminated: Obj | None = None
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    status_dirty: bool = True
    next_status_at: float = 0.0

    @property
    def key(self) -> PodKey:
        return (self.namespace, self.name)


class TestKubelet:
    """Binds pods to a node of its own and runs a vLLM simulator for each; see the module docstring.

    Each kubelet makes its own pod network on start and tears it down on stop, after its simulators are
    stopped, as a node has its own pod CIDR: two kubelets (tests running side by side, or two nodes in one
    test) never hand out the same address, and a stopped kubelet leaves no namespace behind. Setting one up
    costs about 0.1 s. `pod_network` may instead be a `PodNetwork` the caller has set up and will tear
    down (shared by several kubelets), or False for the loopback fallback from `addresses`.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        api_client: ApiClient,
        *,
        node_name: str = "localkube-node",
        namespace: str | None = None,
        label_selector: str | None = None,
        python: str = sys.executable,
        work_dir: Path | None = None,
        capacity: Mapping[str, str] = DEFAULT_CAPACITY,
        delete_node_on_stop: bool = True,
        addresses: AddressAllocator | None = None,
        pod_network: PodNetwork | bool = True,
    ) -> None:
        from kubernetes import client

        self._api = api_client
        self._core = client.CoreV1Api(api_client)
        self.node_name = node_name
        self.namespace = namespace
        self.label_selector = label_selector
        self._python = python
        self._own_work_dir = work_dir is None
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="localkube-kubelet-"))
        self._capacity = dict(capacity)
        self._delete_node = delete_node_on_stop
        self.addresses = addresses or ADDRESSES
        self._network_choice = pod_network
        self.network: PodNetwork | None = None
        """The pod network in use while started; None on the loopback fallback."""
        self._own_network = False
        self.host_ip = HOST_IP
        """The host's address as pods see it: the host side of the pod network, or 127.0.0.1."""
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._runtimes: dict[PodKey, _PodRuntime] = {}
        self._to_bind: dict[PodKey, tuple[str, float]] = {}
        self._to_confirm: dict[PodKey, tuple[str, float]] = {}
        self._pids: list[int] = []
        self._threads: list[threading.Thread] = []
        self._watch_resp: Any = None
        self._synced = threading.Event()

    # --- public surface -----------------------------------------------------------------------

    def __enter__(self) -> TestKubelet:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        """Every simulator PID this kubelet started, restarts included."""
        with self._lock:
            return list(self._pids)

    def pod_address(self, namespace: str, name: str) -> tuple[str, int]:
        """(ip, port) where the pod's simulator listens; KeyError if this kubelet does not run the pod."""
        with self._lock:
            runtime = self._runtimes.get((namespace, name))
            if runtime is None or runtime.ip is None or runtime.command is None:
                raise KeyError(f"pod {namespace}/{name} is not running on node {self.node_name}")
            return runtime.ip, runtime.command.port

    def pod_log(self, namespace: str, name: str) -> Path:
        """The simulator's log file for a pod (kept across restarts; removed on stop unless
        $LOCALKUBE_KEEP_WORK_DIR is set or a work dir was given)."""
        return self.work_dir / "pods" / f"{namespace}_{name}.log"

    def running_pods(self) -> list[PodKey]:
        """Pods whose simulator process is alive right now."""
        with self._lock:
            return [k for k, r in self._runtimes.items() if r.proc is not None and r.proc.alive()]

    def start(self, timeout: float = 30.0) -> TestKubelet:
        """Make the pod network, register the node, start the threads, and return once the first pod list
        was processed. Raises RuntimeError under CI when no pod network can be made."""
        if self._threads:
            raise RuntimeError("the kubelet is already started")
        deadline = time.monotonic() + timeout
        self._setup_network()
        try:
            self._register_node(deadline)
        except BaseException:
            self._teardown_network()
            raise
        self._stopping.clear()
        for target, name in ((self._watch_loop, "watch"), (self._work_loop, "work")):
            thread = threading.Thread(target=target, name=f"kubelet-{self.node_name}-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if not self._synced.wait(max(0.0, deadline - time.monotonic())):
            self.stop()
            raise TimeoutError(f"kubelet {self.node_name} could not list pods within {timeout:.0f}s")
        log.info("kubelet %s started (namespace %s, selector %s)", self.node_name, self.namespace, self.label_selector)
        return self

    def stop(self) -> None:
        """Stop the threads and every simulator; delete the node if asked to. Idempotent."""
        self._stopping.set()
        resp = self._watch_resp
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.shutdown()
        for thread in self._threads:
            thread.join(timeout=15)
            if thread.is_alive():
                log.warning("kubelet thread %s did not stop in time", thread.name)
        self._threads.clear()
        with self._lock:
            runtimes = list(self._runtimes.values())
            self._runtimes.clear()
        for runtime in runtimes:  # signal all first, so that they shut down in parallel
            if runtime.proc is not None:
                runtime.proc.signal_group(signal.SIGTERM)
        for runtime in runtimes:
            self._stop_runtime(runtime)
        self._teardown_network()  # after the simulators: nothing runs inside it any more
        if self._delete_node:
            with contextlib.suppress(Exception):
                self._core.delete_node(self.node_name, _request_timeout=_API_TIMEOUT)
        if self._own_work_dir and not os.environ.get(ENV_KEEP_WORK_DIR):
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def _setup_network(self) -> None:
        """Choose where pod addresses come from: our own pod network, the caller's, or loopback."""
        choice = self._network_choice
        self.network, self._own_network, self.host_ip = None, False, HOST_IP
        if choice is False:
            return
        if isinstance(choice, PodNetwork):
            if not choice.is_up:
                raise RuntimeError(f"kubelet {self.node_name}: the pod network given is not set up")
            self.network = choice
        else:
            network = PodNetwork()
            try:
                network.setup()
            except PodNetworkError as exc:
                if os.environ.get(ENV_CI):
                    raise RuntimeError(f"kubelet {self.node_name}: no pod network under CI: {exc}") from exc
                log.warning(
                    "kubelet %s: %s; falling back to loopback pod addresses (127.0.0.x), which the API server "
                    "refuses in EndpointSlices, so these pods cannot be in a route table",
                    self.node_name,
                    exc,
                )
                return
            self.network, self._own_network = network, True
        self.host_ip = self.network.host_address
        log.info(
            "kubelet %s: pod network %s in namespace %s", self.node_name, self.network.subnet, self.network.namespace
        )

    def _teardown_network(self) -> None:
        network, own = self.network, self._own_network
        self._own_network = False
        if network is not None and own:
            network.teardown()

    def restart_pod(self, namespace: str, name: str, timeout: float = 10.0) -> int:
        """Kill the pod's simulator as a crash would; the kubelet restarts it. Returns the new restartCount."""
        done: queue.Queue[int | Exception] = queue.Queue()
        self._events.put(("restart", ((namespace, name), done)))
        try:
            result = done.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"kubelet did not restart {namespace}/{name} within {timeout:.0f}s") from None
        if isinstance(result, Exception):
            raise result
        return result

    # --- node ---------------------------------------------------------------------------------

    def _register_node(self, deadline: float) -> None:
        from kubernetes.client.exceptions import ApiException

        body: Obj = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    NODE_LABEL: "true",
                },
            },
        }
        while True:
            try:
                try:
                    self._core.create_node(body, _request_timeout=_API_TIMEOUT)
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                self._patch(f"/api/v1/nodes/{self.node_name}/status", {"status": self._node_status()})
                return
            except Exception as exc:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"cannot register node {self.node_name}: {exc}") from exc
                time.sleep(_RETRY_SECONDS)

    def _node_status(self) -> Obj:
        now = _now()
        conditions = [
            {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test kubelet is ready"},
            {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
            {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure"},
            {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID"},
        ]
        for condition in conditions:
            condition.update(lastHeartbeatTime=now, lastTransitionTime=now)
        return {
            "capacity": self._capacity,
            "allocatable": self._capacity,
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": self.host_ip},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "localkube",
                "systemUUID": "localkube",
                "bootID": "localkube",
                "kernelVersion": os.uname().release,
                "osImage": "localkube test kubelet",
                "containerRuntimeVersion": "vllmsim://0",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    # --- API helpers --------------------------------------------------------------------------

    def _patch(self, path: str, body: Obj) -> None:
        """JSON merge patch: lists (conditions, containerStatuses) are replaced whole, never merged."""
        self._api.call_api(
            path,
            "PATCH",
            header_params={"Content-Type": "application/merge-patch+json", "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=_API_TIMEOUT,
        )

    def _lookup(self, kind: str) -> Callable[[str, str], Mapping[str, str] | None]:
        from kubernetes.client.exceptions import ApiException

        def lookup(namespace: str, name: str) -> Mapping[str, str] | None:
            read = self._core.read_namespaced_secret if kind == "secret" else self._core.read_namespaced_config_map
            try:
                resp = read(name, namespace, _preload_content=False, _request_timeout=_API_TIMEOUT)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            obj = json.loads(resp.data)
            if kind == "secret":
                return decode_secret_data(obj)
            return {str(k): str(v) for k, v in (obj.get("data") or {}).items()}

        return lookup

    def _list_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"_preload_content": False}
        if self.label_selector:
            kwargs["label_selector"] = self.label_selector
        return kwargs

    def _list_call(self) -> Callable[..., Any]:
        if self.namespace is None:
            return self._core.list_pod_for_all_namespaces
        namespace = self.namespace

        def call(**kwargs: Any) -> Any:
            return self._core.list_namespaced_pod(namespace, **kwargs)

        return call

    # --- watch thread -------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        backoff = 0.1
        list_call = self._list_call()
        while not self._stopping.is_set():
            try:
                resp = list_call(**self._list_kwargs(), _request_timeout=(3.0, 30.0))
                listing = json.loads(resp.data)
                version = listing["metadata"]["resourceVersion"]
                self._events.put(("sync", listing.get("items") or []))
                while not self._stopping.is_set():
                    self._watch_resp = resp = list_call(
                        **self._list_kwargs(),
                        watch=True,
                        resource_version=version,
                        allow_watch_bookmarks=True,
                        timeout_seconds=_WATCH_SECONDS,
                        _request_timeout=(3.0, _WATCH_SECONDS + 30),
                    )
                    try:
                        if self._stopping.is_set():  # stop() may have looked before the watch existed
                            return
                        for line in iter_resp_lines(resp):
                            if not line:
                                continue
                            event = json.loads(line)
                            kind, obj = event.get("type"), event.get("object") or {}
                            if kind == "ERROR":
                                raise RuntimeError(f"watch error: {obj.get('message', obj)}")
                            version = obj.get("metadata", {}).get("resourceVersion", version)
                            if kind in ("ADDED", "MODIFIED", "DELETED"):
                                self._events.put((kind, obj))
                            backoff = 0.1
                    finally:
                        self._watch_resp = None
                        with contextlib.suppress(Exception):
                            resp.release_conn()
            except Exception as exc:
                if self._stopping.is_set():
                    return
                log.debug("kubelet %s: watch interrupted (%s); relisting in %.1fs", self.node_name, exc, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    # --- work thread --------------------------------------------------------------------------

    def _work_loop(self) -> None:
        next_tick = 0.0
        while not self._stopping.is_set():
            timeout = max(0.0, next_tick - time.monotonic())
            try:
                kind, payload = self._events.get(timeout=timeout)
            except queue.Empty:
                pass
            else:
                try:
                    self._handle(kind, payload)
                except Exception:
                    log.exception("kubelet %s: handling %s failed", self.node_name, kind)
            if time.monotonic() >= next_tick:
                try:
                    self._tick()
                except Exception:
                    log.exception("kubelet %s: tick failed", self.node_name)
                next_tick = time.monotonic() + _TICK_SECONDS

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "sync":
            self._sync(payload)
            self._synced.set()
        elif kind == "DELETED":
            meta = payload.get("metadata", {})
            key = (meta.get("namespace", ""), meta.get("name", ""))
            self._to_bind.pop(key, None)
            self._to_confirm.pop(key, None)
            runtime = self._runtimes.get(key)
            if runtime is not None and runtime.uid == meta.get("uid"):
                self._forget(runtime)
        elif kind in ("ADDED", "MODIFIED"):
            self._observe(payload)
        elif kind == "restart":
            key, done = payload
            try:
                done.put(self._restart(key))
            except Exception as exc:
                done.put(exc)

    def _sync(self, pods: list[Obj]) -> None:
        """After a (re)list: forget pods that vanished meanwhile, then observe every listed pod."""
        listed = {(p["metadata"]["namespace"], p["metadata"]["name"]): p["metadata"].get("uid") for p in pods}
        for key, runtime in list(self._runtimes.items()):
            if listed.get(key) != runtime.uid:
                self._forget(runtime)
        for pending in (self._to_bind, self._to_confirm):
            for key in [k for k, (uid, _) in pending.items() if listed.get(k) != uid]:
                pending.pop(key)
        for pod in pods:
            self._observe(pod)

    def _observe(self, pod: Obj) -> None:
        meta, spec = pod.get("metadata", {}), pod.get("spec", {})
        key = (meta.get("namespace", ""), meta.get("name", ""))
        uid = meta.get("uid", "")
        node = spec.get("nodeName") or ""
        if node and node != self.node_name:
            return
        runtime = self._runtimes.get(key)
        if runtime is not None and runtime.uid != uid:
            self._forget(runtime)  # same name, new pod (e.g. a StatefulSet replacement)
            runtime = None
        if meta.get("deletionTimestamp"):
            self._to_bind.pop(key, None)
            if runtime is not None:
                self._forget(runtime)
            self._to_confirm[key] = (uid, 0.0)
            self._confirm_deletions()
            return
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return
        if not node:
            if spec.get("schedulerName", "default-scheduler") == "default-scheduler":
                self._to_bind[key] = (uid, 0.0)
                self._bind_pending()
            return
        self._to_bind.pop(key, None)
        if runtime is None:
            runtime = _PodRuntime(namespace=key[0], name=key[1], uid=uid, pod=pod)
            started = (pod.get("status") or {}).get("startTime")
            if started:
                runtime.start_time = started
            with self._lock:
                self._runtimes[key] = runtime
            self._start(runtime)
        else:
            runtime.pod = pod

    def _bind_pending(self) -> None:
        from kubernetes.client.exceptions import ApiException

        now = time.monotonic()
        for key, (uid, due) in list(self._to_bind.items()):
            if due > now:
                continue
            body = {
                "apiVersion": "v1",
                "kind": "Binding",
                "metadata": {"name": key[1], "uid": uid},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
            }
            try:
                self._core.create_namespaced_pod_binding(
                    key[1], key[0], body, _preload_content=False, _request_timeout=_API_TIMEOUT
                )
                self._to_bind.pop(key, None)
            except ApiException as exc:
                if exc.status in (404, 409):
                    self._to_bind.pop(key, None)  # gone, or bound by someone else meanwhile
                else:
                    self._to_bind[key] = (uid, now + _RETRY_SECONDS)
            except Exception:
                self._to_bind[key] = (uid, now + _RETRY_SECONDS)

    def _confirm_deletions(self) -> None:
        from kubernetes.client.exceptions import ApiException

        now = time.monotonic()
        for key, (uid, due) in list(self._to_confirm.items()):
            if due > now:
                continue
            body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
            try:
                self._core.delete_namespaced_pod(
                    key[1], key[0], body=body, _preload_content=False, _request_timeout=_API_TIMEOUT
                )
                self._to_confirm.pop(key, None)
            except ApiException as exc:
                if exc.status in (404, 409):
                    self._to_confirm.pop(key, None)
                else:
                    self._to_confirm[key] = (uid, now + _RETRY_SECONDS)
            except Exception:
                self._to_confirm[key] = (uid, now + _RETRY_SECONDS)

    # --- simulator processes ------------------------------------------------------------------

    def _start(self, runtime: _PodRuntime) -> None:
        """Translate the pod and start its simulator; a bad spec leaves the container waiting with a reason."""
        now = time.monotonic()
        try:
            if runtime.command is None:
                lookups = {"secrets": self._lookup("secret"), "config_maps": self._lookup("configmap")}
                probe = simulator_command(runtime.pod, pod_ip="", host_ip=self.host_ip, **lookups)
                if runtime.ip is None:
                    network = self.network
                    runtime.ip = network.acquire() if network is not None else self.addresses.acquire(probe.port)
                runtime.command = simulator_command(runtime.pod, pod_ip=runtime.ip, host_ip=self.host_ip, **lookups)
            assert runtime.ip is not None
            env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
            env["PYTHONUNBUFFERED"] = "1"
            env.update(runtime.command.env)
            argv = runtime.command.argv(self._python, runtime.ip)
            proc = runtime.proc or ManagedProcess(
                f"vllmsim {runtime.namespace}/{runtime.name}",
                self.network.wrap(argv) if self.network is not None else argv,
                self.pod_log(runtime.namespace, runtime.name),
                env=env,
            )
            proc.start()
        except PodSpecError as exc:
            runtime.waiting = (exc.reason, exc.message)
            runtime.next_start_at = now + _CONFIG_RETRY_SECONDS
            runtime.status_dirty = True
            log.warning("kubelet %s: pod %s/%s: %s", self.node_name, runtime.namespace, runtime.name, exc.message)
            return
        except Exception as exc:
            runtime.waiting = ("RunContainerError", str(exc))
            runtime.next_start_at = now + _CONFIG_RETRY_SECONDS
            runtime.status_dirty = True
            log.warning("kubelet %s: pod %s/%s: %s", self.node_name, runtime.namespace, runtime.name, exc)
            return
        runtime.proc = proc
        with self._lock:
            self._pids.append(proc.pid or 0)
        runtime.waiting = None
        runtime.container_started_at = _now()
        runtime.started_monotonic = now
        runtime.next_probe_at = now
        runtime.probe_failures = 0
        self._set_ready(runtime, False)
        runtime.status_dirty = True

    def _stop_runtime(self, runtime: _PodRuntime) -> None:
        if runtime.proc is not None:
            runtime.proc.stop(_STOP_GRACE_SECONDS)
        if runtime.ip is not None:
            if self.network is not None:
                self.network.release(runtime.ip)
            else:
                self.addresses.release(runtime.ip)
            runtime.ip = None

    def _forget(self, runtime: _PodRuntime) -> None:
        with self._lock:
            if self._runtimes.get(runtime.key) is runtime:
                del self._runtimes[runtime.key]
        self._stop_runtime(runtime)

    def _restart(self, key: PodKey) -> int:
        runtime = self._runtimes.get(key)
        if runtime is None or runtime.proc is None:
            raise KeyError(f"pod {key[0]}/{key[1]} is not running on node {self.node_name}")
        runtime.proc.signal_group(signal.SIGKILL)
        with contextlib.suppress(Exception):
            runtime.proc.stop(_STOP_GRACE_SECONDS)
        self._record_exit(runtime, time.monotonic(), force_now=True)
        return runtime.restart_count

    def _record_exit(self, runtime: _PodRuntime, now: float, force_now: bool = False) -> None:
        """The simulator exited: remember how, count the restart, and schedule the next start."""
        assert runtime.proc is not None
        code = runtime.proc.reap()
        if code is None:
            code = runtime.proc.returncode
        exit_code = 128 - code if code is not None and code < 0 else (code or 0)
        runtime.last_terminated = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": runtime.container_started_at or _now(),
            "finishedAt": _now(),
            "containerID": f"localkube://{runtime.proc.pid}",
        }
        runtime.restart_count += 1
        runtime.quick_exits = runtime.quick_exits + 1 if now - runtime.started_monotonic < _QUICK_EXIT_SECONDS else 0
        backoff = (
            0.0
            if force_now or runtime.quick_exits <= 1
            else min(0.5 * 2 ** (runtime.quick_exits - 2), _MAX_BACKOFF_SECONDS)
        )
        runtime.next_start_at = now + backoff
        runtime.waiting = None
        if backoff:
            runtime.waiting = ("CrashLoopBackOff", f"back-off {backoff:.1f}s restarting failed container")
        self._set_ready(runtime, False)
        runtime.status_dirty = True
        log.info(
            "kubelet %s: simulator of %s/%s exited with %s; restart %d",
            self.node_name,
            runtime.namespace,
            runtime.name,
            exit_code,
            runtime.restart_count,
        )
        if not backoff:
            self._start(runtime)

    def _set_ready(self, runtime: _PodRuntime, ready: bool) -> None:
        if runtime.ready != ready:
            runtime.ready = ready
            runtime.ready_since = _now()
            runtime.status_dirty = True

    def _probe(self, runtime: _PodRuntime) -> bool:
        assert runtime.ip is not None and runtime.command is not None
        conn = http.client.HTTPConnection(runtime.ip, runtime.command.port, timeout=_PROBE_TIMEOUT)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def _tick(self) -> None:
        now = time.monotonic()
        for runtime in list(self._runtimes.values()):
            proc = runtime.proc
            if proc is None or (not proc.alive() and runtime.waiting is not None):
                if now >= runtime.next_start_at:
                    self._start(runtime)
            elif not proc.alive():
                self._record_exit(runtime, now)
            elif now >= runtime.next_probe_at:
                healthy = self._probe(runtime)
                if healthy:
                    runtime.probe_failures = 0
                    self._set_ready(runtime, True)
                else:
                    runtime.probe_failures += 1
                    if runtime.probe_failures >= _READY_FAILURE_THRESHOLD:
                        self._set_ready(runtime, False)
                runtime.next_probe_at = now + (_READY_PROBE_PERIOD if runtime.ready else _TICK_SECONDS)
            if runtime.status_dirty and now >= runtime.next_status_at:
                try:
                    self._push_status(runtime)
                    runtime.status_dirty = False
                except Exception as exc:
                    log.debug("kubelet %s: status of %s/%s not written: %s", self.node_name, *runtime.key, exc)
                    runtime.next_status_at = now + _RETRY_SECONDS
        if self._to_bind:
            self._bind_pending()
        if self._to_confirm:
            self._confirm_deletions()

    # --- status -------------------------------------------------------------------------------

    def _push_status(self, runtime: _PodRuntime) -> None:
        from kubernetes.client.exceptions import ApiException

        body = {"metadata": {"uid": runtime.uid}, "status": self._pod_status(runtime)}
        try:
            self._patch(f"/api/v1/namespaces/{runtime.namespace}/pods/{runtime.name}/status", body)
        except ApiException as exc:
            if exc.status in (404, 409, 422):
                return  # the pod is gone or replaced; the watch will tell
            raise

    def _pod_status(self, runtime: _PodRuntime) -> Obj:
        running = runtime.proc is not None and runtime.proc.alive() and runtime.waiting is None
        ready = running and runtime.ready
        started_at = runtime.container_started_at or runtime.start_time

        def condition(kind: str, status: bool, since: str) -> Obj:
            value = "True" if status else "False"
            return {"type": kind, "status": value, "lastProbeTime": None, "lastTransitionTime": since}

        containers = (runtime.pod.get("spec") or {}).get("containers") or []
        statuses = []
        for index, container in enumerate(containers):
            state: Obj
            if index > 0:
                # Only the first container runs something; the others are reported as running sidecars.
                state = {"running": {"startedAt": runtime.start_time}}
                statuses.append(self._container_status(container, state, last=None, ready=True, restarts=0, pid=None))
                continue
            if running:
                state = {"running": {"startedAt": started_at}}
            else:
                reason, message = runtime.waiting or ("ContainerCreating", "")
                state = {"waiting": {"reason": reason, "message": message} if message else {"reason": reason}}
            last = {"terminated": runtime.last_terminated} if runtime.last_terminated else {}
            pid = runtime.proc.pid if runtime.proc is not None and running else None
            statuses.append(
                self._container_status(
                    container, state, last=last, ready=ready, restarts=runtime.restart_count, pid=pid
                )
            )
        status: Obj = {
            "phase": "Running" if running or runtime.restart_count > 0 else "Pending",
            "hostIP": self.host_ip,
            "hostIPs": [{"ip": self.host_ip}],
            "startTime": runtime.start_time,
            "conditions": [
                condition("PodReadyToStartContainers", True, runtime.start_time),
                condition("Initialized", True, runtime.start_time),
                condition("Ready", ready, runtime.ready_since),
                condition("ContainersReady", ready, runtime.ready_since),
                condition("PodScheduled", True, runtime.start_time),
            ],
            "containerStatuses": statuses,
        }
        if runtime.ip is not None:
            status["podIP"] = runtime.ip
            status["podIPs"] = [{"ip": runtime.ip}]
        return status

    @staticmethod
    def _container_status(
        container: Obj, state: Obj, *, last: Obj | None, ready: bool, restarts: int, pid: int | None
    ) -> Obj:
        status: Obj = {
            "name": container.get("name", ""),
            "image": container.get("image", ""),
            "imageID": f"localkube://{container.get('image', '')}",
            "state": state,
            "lastState": last or {},
            "ready": ready,
            "started": "running" in state,
            "restartCount": restarts,
        }
        if pid is not None:
            status["containerID"] = f"localkube://{pid}"
        return status
