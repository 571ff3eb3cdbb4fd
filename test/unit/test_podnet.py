"""The pod network: addresses reachable from the host, refused by nothing, gone after teardown."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest

from localkube import podnet

# CI runs as root, where the pod network must work: there a missing capability is a failure, not a skip.
pytestmark = pytest.mark.skipif(podnet.available() is not None and not os.environ.get("CI"),
                                reason=str(podnet.available()))


def test_pod_address_is_reachable_from_the_host_and_removed_after():
    net = podnet.PodNetwork().setup()
    proc = None
    try:
        ip = net.acquire()
        assert not ip.startswith("127.")
        assert net.acquire() != ip
        proc = subprocess.Popen(net.wrap([sys.executable, "-m", "http.server", "18123", "--bind", ip]),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        status = None
        while time.monotonic() < deadline and status is None:
            try:
                with urllib.request.urlopen(f"http://{ip}:18123/", timeout=1) as response:
                    status = response.status
            except OSError:
                time.sleep(0.1)
        assert status == 200
    finally:
        if proc:
            proc.kill()
            proc.wait()
        net.teardown()
    listing = subprocess.run(["ip", "netns", "list"], check=False, capture_output=True, text=True).stdout
    assert net.namespace not in listing
