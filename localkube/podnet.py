"""A pod network for the local control plane: a network namespace joined to the host by a veth pair.

Real clusters give pods routable addresses, and the API server refuses loopback addresses in
EndpointSlices, so simulators on 127.0.0.x cannot appear in a route table. Here every "pod" gets its own
address on the namespace's side of a veth pair (``10.244.N.2`` upward), the host side holds ``.1``, and
the host reaches every pod address directly: the controller and router see what they would see in a
cluster. Traffic never leaves the machine: the namespace has no other link and no default route.

The whole pod range (10.244.0.0/16) is routed ``unreachable`` on the host, once: the per-network /24s on
the veths are more specific and win, so a pod address is reachable while its network lives, and a connection
to one whose network is gone is refused at once (EHOSTUNREACH) instead of following the default route off
the machine. The route is left in place: it only ever refuses, and concurrent runs share it.

Each network claims its /24 with an advisory lock file (lowest free first), held until teardown or the
process's death, so networks of concurrent processes never overlap; a /24 that already carries an address
or a route on the host is skipped. Namespaces left behind by a killed run are removed on the next set-up.

Needs root (CAP_NET_ADMIN) and iproute2; :func:`available` tells whether it can be set up, and the error
says what is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

NAME_PREFIX = "lkpods-"
BASE = ipaddress.IPv4Network("10.244.0.0/16")
_IP_TIMEOUT = 20.0


class PodNetworkError(RuntimeError):
    """The pod network could not be set up; the message says why and what to do."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=_IP_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PodNetworkError(f"`ip {' '.join(args)}` could not run: {exc}") from exc
    if check and result.returncode != 0:
        raise PodNetworkError(f"`ip {' '.join(args)}` failed: {result.stderr.strip() or result.stdout.strip()}")
    return result


def available() -> str | None:
    """None when a pod network can be made here, else the reason it cannot."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "creating a network namespace needs root (CAP_NET_ADMIN)"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces(pid: int | None = None) -> list[str]:
    """Names of the pod networks that exist now; only those created by process ``pid`` when given."""
    if shutil.which("ip") is None:
        return []
    found = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{NAME_PREFIX}(\d+)-(\d+)", name)
        if match and (pid is None or int(match.group(1)) == pid):
            found.append(name)
    return found


def delete(name: str) -> None:
    """Delete one pod network's namespace (its veth pair goes with it); nothing if it does not exist."""
    _ip("netns", "delete", name, check=False)


def remove_stale() -> list[str]:
    """Delete pod networks whose creating process is gone (a run killed before it could clean up)."""
    removed = []
    for name in namespaces():
        if not _pid_alive(int(name[len(NAME_PREFIX) :].split("-")[0])):
            delete(name)
            removed.append(name)
    return removed


def ensure_unreachable_route() -> None:
    """Route the whole pod range ``unreachable`` on the host (idempotent: `ip route replace`)."""
    _ip("route", "replace", "unreachable", str(BASE))


def _subnets_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host already has an address in or a route to.

    The default route and our own ``unreachable`` route for the whole pod range are excluded.
    """
    used = []
    for line in _ip("-4", "-o", "addr", "show", check=False).stdout.splitlines():
        match = re.search(r"inet (\S+)", line)
        if match:
            used.append(ipaddress.IPv4Interface(match.group(1)).network)
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        words = line.split()
        if words[:2] == ["unreachable", str(BASE)]:
            continue
        if words and words[0] in ("local", "broadcast", "unreachable", "blackhole", "prohibit"):
            words = words[1:]
        if words and words[0] != "default":
            with contextlib.suppress(ValueError):
                used.append(ipaddress.IPv4Network(words[0], strict=False))
    return used


def _lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"localkube-podnet-{os.getuid()}"


class PodNetwork:
    """One namespace, one /24 of pod addresses, handed out lowest free first."""

    _counter = 0
    _counter_lock = threading.Lock()

    def __init__(self) -> None:
        with PodNetwork._counter_lock:
            PodNetwork._counter += 1
            serial = PodNetwork._counter
        self.namespace = f"{NAME_PREFIX}{os.getpid()}-{serial}"
        self._host_link = ""
        self._pod_link = ""
        self._ip_binary = "ip"
        self.subnet: ipaddress.IPv4Network | None = None
        self._lock = threading.Lock()
        self._used: set[str] = set()
        self._claim_fd: int | None = None
        self._up = False

    @property
    def host_address(self) -> str:
        """The host's address on the pod network (the host side of the veth pair)."""
        assert self.subnet is not None, "pod network is not set up"
        return str(self.subnet.network_address + 1)

    @property
    def is_up(self) -> bool:
        """True between a successful setup() and teardown()."""
        return self._up

    def _claim_subnet(self) -> ipaddress.IPv4Network:
        """Lock the lowest /24 of BASE that no other pod network holds and the host does not use."""
        in_use = _subnets_in_use()
        directory = _lock_dir()
        directory.mkdir(parents=True, exist_ok=True)
        for subnet in BASE.subnets(new_prefix=24):
            if any(subnet.overlaps(u) for u in in_use):
                continue
            fd = os.open(directory / f"{subnet.network_address}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._claim_fd = fd
            return subnet
        raise PodNetworkError(f"no free /24 left in {BASE} for a pod network")

    def _unclaim_subnet(self) -> None:
        fd, self._claim_fd = self._claim_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the lock

    def setup(self) -> PodNetwork:
        """Create the namespace and the veth pair; idempotent."""
        if self._up:
            return self
        reason = available()
        if reason:
            raise PodNetworkError(f"cannot make a pod network: {reason}")
        self._ip_binary = shutil.which("ip") or "ip"
        remove_stale()
        ensure_unreachable_route()
        chosen = self._claim_subnet()
        self.subnet = chosen
        # Link names follow the claimed /24, so they are unique among live networks (15 characters at most).
        index = int(chosen.network_address.packed[2])
        self._host_link, self._pod_link = f"lkh{index}", f"lkp{index}"
        prefix = chosen.prefixlen
        try:
            _ip("link", "delete", self._host_link, check=False)  # left by a run killed mid set-up
            _ip("netns", "add", self.namespace)
            _ip("link", "add", self._host_link, "type", "veth", "peer", "name", self._pod_link)
            _ip("link", "set", self._pod_link, "netns", self.namespace)
            _ip("addr", "add", f"{self.host_address}/{prefix}", "dev", self._host_link)
            _ip("link", "set", self._host_link, "up")
            _ip("-n", self.namespace, "link", "set", "lo", "up")
            _ip("-n", self.namespace, "link", "set", self._pod_link, "up")
            # Pod addresses are /32s, so removing one never takes others with it (as removing the primary
            # address of a prefix does); this route is the namespace's way back to the host.
            _ip("-n", self.namespace, "route", "add", str(chosen), "dev", self._pod_link)
        except PodNetworkError:
            self._up = True  # so that teardown removes what was made
            self.teardown()
            raise
        self._up = True
        return self

    def teardown(self) -> None:
        """Delete the namespace (which removes the veth pair); processes inside must be stopped first.

        Idempotent."""
        if not self._up:
            return
        _ip("netns", "delete", self.namespace, check=False)
        if self._host_link:
            _ip("link", "delete", self._host_link, check=False)
        self._up = False
        self._unclaim_subnet()
        with self._lock:
            self._used.clear()

    def acquire(self) -> str:
        """A free pod address, now configured inside the namespace."""
        if self.subnet is None or not self._up:
            raise PodNetworkError("pod network is not set up")
        with self._lock:
            for host in self.subnet.hosts():
                ip = str(host)
                if ip == self.host_address or ip in self._used:
                    continue
                self._used.add(ip)
                break
            else:
                raise PodNetworkError(f"no free address left in pod network {self.subnet}")
        try:
            _ip("-n", self.namespace, "addr", "add", f"{ip}/32", "dev", self._pod_link)
        except PodNetworkError:
            with self._lock:
                self._used.discard(ip)
            raise
        return ip

    def release(self, ip: str) -> None:
        """Remove an address from the namespace and make it available again."""
        if self.subnet is None:
            return
        if self._up:
            _ip("-n", self.namespace, "addr", "del", f"{ip}/32", "dev", self._pod_link, check=False)
        with self._lock:
            self._used.discard(ip)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` inside the namespace (same PID: ``ip netns exec`` execs)."""
        return [self._ip_binary, "netns", "exec", self.namespace, *argv]

    def __enter__(self) -> PodNetwork:
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.teardown()
