"""Leader election between two electors on a real Lease: one leads, the other takes over on release or crash."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from common.kube import LEASES, KubeClient
from common.leader import LeaderElector
from localkube.controlplane import ControlPlane
from localkube.wait import wait_until

pytestmark = pytest.mark.integration

# Short but in client-go's proportions (lease > renew deadline > 1.2 * retry period).
LEASE, RENEW, RETRY = 4.0, 3.0, 0.5


@pytest.fixture
def kube(control_plane: ControlPlane) -> Iterator[KubeClient]:
    api = control_plane.api_client()
    try:
        yield KubeClient(api)
    finally:
        api.close()


class Terms:
    """Leadership intervals per identity, to check that no two overlap."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[float, str, str]] = []
        self.work_stopped: dict[str, threading.Event] = {}

    def elector(self, kube: KubeClient, namespace: str, identity: str) -> LeaderElector:
        self.work_stopped[identity] = threading.Event()

        def started(stop: threading.Event) -> None:
            with self.lock:
                self.log.append((time.monotonic(), identity, "start"))
            stop.wait(60)
            self.work_stopped[identity].set()

        def stopped() -> None:
            with self.lock:
                self.log.append((time.monotonic(), identity, "stop"))

        return LeaderElector(
            kube, "lora-autoscaler", namespace, identity, lease_duration=LEASE, renew_deadline=RENEW,
            retry_period=RETRY, on_started_leading=started, on_stopped_leading=stopped,
        )  # fmt: skip

    def starts(self) -> list[str]:
        with self.lock:
            return [who for _, who, what in self.log if what == "start"]

    def assert_no_overlap(self) -> None:
        with self.lock:
            leading: set[str] = set()
            for _, who, what in sorted(self.log):
                if what == "start":
                    assert not leading, f"{who} started leading while {leading} still led"
                    leading.add(who)
                else:
                    leading.discard(who)


def lease_spec(kube: KubeClient, namespace: str) -> dict:
    return kube.get(LEASES, "lora-autoscaler", namespace)["spec"]


def test_one_leader_then_a_prompt_takeover_after_release(kube: KubeClient, namespace: str) -> None:
    terms = Terms()
    a = terms.elector(kube, namespace, "a")
    b = terms.elector(kube, namespace, "b")
    a.start()
    b.start()
    try:
        wait_until(lambda: a.is_leader() or b.is_leader(), timeout=10, what="a leader")
        leader, standby = (a, b) if a.is_leader() else (b, a)
        # Several renewals pass and the standby never leads meanwhile.
        renewed = lease_spec(kube, namespace)["renewTime"]
        wait_until(lambda: lease_spec(kube, namespace)["renewTime"] != renewed, timeout=5, what="a renewal")
        assert leader.is_leader() and not standby.is_leader()
        wait_until(lambda: standby.leader == leader.identity, timeout=5, what="the standby to know who leads")
        spec = lease_spec(kube, namespace)
        assert spec["holderIdentity"] == leader.identity and spec["leaseDurationSeconds"] == int(LEASE)

        released_at = time.monotonic()
        leader.stop(release=True)
        assert terms.work_stopped[leader.identity].is_set(), "the work stops before the lease is handed on"
        assert not leader.is_leader()
        wait_until(standby.is_leader, timeout=LEASE + 5, what="the standby to take over")
        took = time.monotonic() - released_at
        assert took < LEASE, f"after a release the standby must not wait out the lease ({took:.1f}s)"
        spec = lease_spec(kube, namespace)
        assert spec["holderIdentity"] == standby.identity
        assert spec["leaseTransitions"] >= 1
        assert terms.starts() == [leader.identity, standby.identity]
        terms.assert_no_overlap()
    finally:
        a.stop()
        b.stop()
    # The last one out releases too: the lease is free.
    assert lease_spec(kube, namespace)["holderIdentity"] in ("", None)


def test_takeover_within_the_lease_time_after_the_leader_dies(kube: KubeClient, namespace: str) -> None:
    terms = Terms()
    a = terms.elector(kube, namespace, "a")
    a.start()
    try:
        assert a.wait_for_leadership(10)
        b = terms.elector(kube, namespace, "b")
        b.start()
        try:
            wait_until(lambda: b.leader == "a", timeout=5, what="the standby to observe the leader")
            killed_at = time.monotonic()
            a.stop(release=False)  # a crash: no release, the lease is left to expire
            assert lease_spec(kube, namespace)["holderIdentity"] == "a"
            wait_until(b.is_leader, timeout=LEASE + 3 * RETRY + 5, what="the standby to take over")
            took = time.monotonic() - killed_at
            # It must wait for expiry (judged by its own clock from the last renewal it saw) but no longer
            # than the lease plus a couple of retry periods.
            assert LEASE - RETRY * 1.2 - 0.5 <= took <= LEASE + 3 * RETRY + 1.0, f"took {took:.1f}s"
            assert lease_spec(kube, namespace)["holderIdentity"] == "b"
            terms.assert_no_overlap()
        finally:
            b.stop()
    finally:
        a.stop()


def test_leader_steps_down_when_it_cannot_renew(control_plane: ControlPlane, kube: KubeClient, namespace: str) -> None:
    terms = Terms()
    a = terms.elector(kube, namespace, "a")
    a.start()
    down = threading.Thread(target=control_plane.restart_apiserver, kwargs={"downtime": RENEW + 2.0})
    try:
        assert a.wait_for_leadership(10)
        # The API server is away for longer than the renew deadline: the leader must stop its work,
        # and it is no longer leader only once that work has stopped.
        down.start()
        wait_until(lambda: not a.is_leader(), timeout=RENEW + 10, what="the leader to step down")
        assert terms.work_stopped["a"].is_set()
        down.join(60)
        # With the API server back, it campaigns again and wins the lease it left (nobody else wants it).
        assert a.wait_for_leadership(LEASE + 10)
        assert terms.starts() == ["a", "a"]
    finally:
        a.stop()
        if down.is_alive():
            down.join(60)  # later tests need the API server back


def test_bad_timings_are_rejected(kube: KubeClient) -> None:
    with pytest.raises(ValueError, match="lease_duration"):
        LeaderElector(kube, "x", "default", lease_duration=5, renew_deadline=5)
    with pytest.raises(ValueError, match="renew_deadline"):
        LeaderElector(kube, "x", "default", lease_duration=15, renew_deadline=2, retry_period=2)
    with pytest.raises(ValueError, match="name and a namespace"):
        LeaderElector(kube, "", "default")
