"""The pod network: addresses reachable from the host, refused by nothing, gone after teardown."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from localkube import podnet

# CI runs as root, where the pod network must work: there a missing capability is a failure, not a skip.
pytestmark = pytest.mark.skipif(
    podnet.available() is not None and not os.environ.get("CI"), reason=str(podnet.available())
)


def test_pod_address_is_reachable_from_the_host_and_removed_after():
    net = podnet.PodNetwork().setup()
    proc = None
    try:
        ip = net.acquire()
        assert not ip.startswith("127.")
        assert net.acquire() != ip
        proc = subprocess.Popen(
            net.wrap([sys.executable, "-m", "http.server", "18123", "--bind", ip]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        status = _get_status(f"http://{ip}:18123/")
        assert status == 200
    finally:
        if proc:
            proc.kill()
            proc.wait()
        net.teardown()
    listing = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    assert net.namespace not in listing


def _listing() -> str:
    return subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout


def test_two_networks_get_their_own_subnets_and_addresses_are_reused_lowest_first():
    with podnet.PodNetwork() as first, podnet.PodNetwork() as second:
        assert first.subnet is not None and second.subnet is not None
        assert not first.subnet.overlaps(second.subnet)
        assert set(podnet.namespaces(os.getpid())) >= {first.namespace, second.namespace}
        a, b = first.acquire(), first.acquire()
        assert a == str(first.subnet.network_address + 2) and b == str(first.subnet.network_address + 3)
        first.release(a)
        assert first.acquire() == a
        # No way out of the namespace: only the pod subnet is routed there, nothing by default.
        routes = subprocess.run(
            ["ip", "-n", first.namespace, "-4", "route", "show"], check=True, capture_output=True, text=True
        ).stdout
        assert "default" not in routes and str(first.subnet) in routes
    assert first.namespace not in _listing() and second.namespace not in _listing()
    first.teardown()  # idempotent
    with pytest.raises(podnet.PodNetworkError, match="not set up"):
        first.acquire()


def test_a_subnet_is_claimed_across_processes():
    with podnet.PodNetwork() as mine:
        assert mine.subnet is not None
        code = "from localkube import podnet\nwith podnet.PodNetwork() as n:\n    print(n.subnet, flush=True)\n"
        other = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
        assert other.stdout.strip() and other.stdout.strip() != str(mine.subnet)


def test_a_network_left_by_a_dead_process_is_removed_on_the_next_setup():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{podnet.NAME_PREFIX}{dead.pid}-1"
    subprocess.run(["ip", "netns", "add", stale], check=True, capture_output=True)
    try:
        with podnet.PodNetwork():
            assert stale not in _listing()
    finally:
        podnet.delete(stale)


def test_releasing_one_address_leaves_the_others_reachable():
    # Removing the first address of a prefix removes every later one with it, unless each is its own /32.
    with podnet.PodNetwork() as net:
        first, second = net.acquire(), net.acquire()
        proc = subprocess.Popen(
            net.wrap([sys.executable, "-m", "http.server", "18124", "--bind", second]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert _get_status(f"http://{second}:18124/") == 200
            net.release(first)
            assert _get_status(f"http://{second}:18124/") == 200
            assert net.acquire() == first
        finally:
            proc.kill()
            proc.wait()


def test_a_pod_address_whose_network_is_gone_is_refused_on_the_host():
    # The whole pod range is routed `unreachable`; a live network's /24 on its veth is more specific.
    with podnet.PodNetwork() as net:
        ip = net.acquire()
        whole = subprocess.run(["ip", "-4", "route", "show", "exact", str(podnet.BASE)], check=True,
                               capture_output=True, text=True).stdout
        assert whole.split()[:2] == ["unreachable", str(podnet.BASE)], whole
        assert podnet.BASE not in podnet._subnets_in_use()  # our own route never blocks a claim
        via = subprocess.run(["ip", "-4", "route", "get", ip], check=True, capture_output=True, text=True).stdout
        assert "unreachable" not in via and "lkh" in via, via
        # A duplicate of the claim's descriptor keeps the /24 locked after teardown: no concurrent run can set
        # it up again while this test looks at it.
        assert net._claim_fd is not None
        claim = os.dup(net._claim_fd)
    try:
        assert net.namespace not in _listing()
        route = subprocess.run(["ip", "-4", "route", "get", ip], check=False, capture_output=True, text=True)
        assert route.returncode != 0 and "No route to host" in route.stderr, route
        # Refused locally at once, never sent off the machine by the default route (which would time out).
        started = time.monotonic()
        with pytest.raises(OSError) as refused, socket.create_connection((ip, 18125), timeout=10):
            pass
        assert refused.value.errno == errno.EHOSTUNREACH, refused.value
        assert time.monotonic() - started < 5
    finally:
        os.close(claim)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # pod addresses are local, never proxied


def _get_status(url: str, timeout: float = 15.0) -> int | None:
    """The status of GET ``url`` once it answers, or None if it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with _NO_PROXY.open(url, timeout=1) as response:
                return int(response.status)
        except OSError:
            time.sleep(0.1)
    return None
