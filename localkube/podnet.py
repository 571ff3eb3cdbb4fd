"""A pod network for the local control plane: a network namespace joined to the host by a veth pair.

Real clusters give pods routable addresses, and the API server refuses loopback addresses in
EndpointSlices, so simulators on 127.0.0.x cannot appear in a route table. Here every "pod" gets its own
address on the namespace's side of a veth pair (``10.244.N.2`` upward), the host side holds ``.1``, and
the host reaches every pod address directly: the controller and router see what they would see in a
cluster. Traffic never leaves the machine.

Needs root (CAP_NET_ADMIN) and iproute2; :func:`available` tells whether it can be set up, and the error
says what is missing. Namespaces left behind by a killed run are removed on the next set-up.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Sequence

NAME_PREFIX = "lkpods-"
BASE = ipaddress.IPv4Network("10.244.0.0/16")


class PodNetworkError(RuntimeError):
    """The pod network could not be set up; the message says why and what to do."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
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


def remove_stale() -> list[str]:
    """Delete pod networks whose creating process is gone (a run killed before it could clean up)."""
    removed = []
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{NAME_PREFIX}(\d+)-(\d+)", name)
        if match and not _pid_alive(int(match.group(1))):
            _ip("netns", "delete", name, check=False)
            removed.append(name)
    return removed


def _subnets_in_use() -> set[ipaddress.IPv4Network]:
    used = set()
    for line in _ip("-4", "-o", "addr", "show", check=False).stdout.splitlines():
        match = re.search(r"inet (\S+)", line)
        if match:
            net = ipaddress.ip_interface(match.group(1)).network
            if isinstance(net, ipaddress.IPv4Network):
                used.add(net)
    return used


class PodNetwork:
    """One namespace, one /24 of pod addresses, handed out lowest free first."""

    _counter = 0
    _counter_lock = threading.Lock()

    def __init__(self) -> None:
        with PodNetwork._counter_lock:
            PodNetwork._counter += 1
            serial = PodNetwork._counter
        self.namespace = f"{NAME_PREFIX}{os.getpid()}-{serial}"
        tag = f"{os.getpid() % 100000}{serial % 10}"
        self._host_link = f"lkh{tag}"[:15]
        self._pod_link = f"lkp{tag}"[:15]
        self.subnet: ipaddress.IPv4Network | None = None
        self._lock = threading.Lock()
        self._used: set[str] = set()
        self._up = False

    @property
    def host_address(self) -> str:
        assert self.subnet is not None, "pod network is not set up"
        return str(self.subnet.network_address + 1)

    def setup(self) -> PodNetwork:
        """Create the namespace and the veth pair; idempotent."""
        if self._up:
            return self
        reason = available()
        if reason:
            raise PodNetworkError(f"cannot make a pod network: {reason}")
        remove_stale()
        in_use = _subnets_in_use()
        candidates: list[ipaddress.IPv4Network] = list(BASE.subnets(new_prefix=24))
        start = os.getpid() % len(candidates)
        chosen = None
        for offset in range(len(candidates)):
            subnet = candidates[(start + offset) % len(candidates)]
            if not any(subnet.overlaps(u) for u in in_use):
                chosen = subnet
                break
        if chosen is None:
            raise PodNetworkError(f"no free /24 left in {BASE} for a pod network")
        self.subnet = chosen
        prefix = chosen.prefixlen
        try:
            _ip("netns", "add", self.namespace)
            _ip("link", "add", self._host_link, "type", "veth", "peer", "name", self._pod_link)
            _ip("link", "set", self._pod_link, "netns", self.namespace)
            _ip("addr", "add", f"{self.host_address}/{prefix}", "dev", self._host_link)
            _ip("link", "set", self._host_link, "up")
            _ip("-n", self.namespace, "link", "set", "lo", "up")
            _ip("-n", self.namespace, "link", "set", self._pod_link, "up")
        except PodNetworkError:
            self.teardown()
            raise
        self._up = True
        return self

    def teardown(self) -> None:
        """Delete the namespace (which removes the veth pair); processes inside must be stopped first."""
        _ip("netns", "delete", self.namespace, check=False)
        _ip("link", "delete", self._host_link, check=False)
        self._up = False
        with self._lock:
            self._used.clear()

    def acquire(self) -> str:
        """A free pod address, now configured inside the namespace."""
        assert self.subnet is not None and self._up, "pod network is not set up"
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
            _ip("-n", self.namespace, "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", self._pod_link)
        except PodNetworkError:
            self.release(ip)
            raise
        return ip

    def release(self, ip: str) -> None:
        """Remove an address from the namespace and make it available again."""
        if self.subnet is None:
            return
        _ip("-n", self.namespace, "addr", "del", f"{ip}/{self.subnet.prefixlen}", "dev", self._pod_link, check=False)
        with self._lock:
            self._used.discard(ip)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` inside the namespace (same PID: ``ip netns exec`` execs)."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def __enter__(self) -> PodNetwork:
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.teardown()
