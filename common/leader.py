"""Leader election on a `coordination.k8s.io/v1` Lease, following client-go's leaderelection package.

Why client-go's rules and not something simpler: clocks on different nodes disagree, so a lease is judged
expired by *local* observation (the time we last saw its record change, plus its duration), never by
comparing the remote `renewTime` with our clock. Writes carry the resourceVersion read, so two candidates
racing for a free lease cannot both win (one gets 409). A leader that cannot renew within the renew
deadline steps down before the lease can expire for others; a leader that shuts down cleanly releases the
lease (empty holder, 1 s duration) so a standby takes over at once instead of waiting out the lease.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from common import metrics
from common.kube import LEASES, ApiError, KubeClient

log = logging.getLogger(__name__)

MonotonicClock = Callable[[], float]


def default_identity() -> str:
    """`<pod or host name>_<random>`: unique even when a pod restarts with the same name."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def micro_time(now: datetime | None = None) -> str:
    """A Kubernetes MicroTime string (RFC 3339 with microseconds, UTC)."""
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Campaigns for a Lease, runs `on_started_leading(stop_event)` while it holds it, and steps down."""

    def __init__(
        self,
        client: KubeClient,
        name: str,
        namespace: str,
        identity: str | None = None,
        *,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        on_started_leading: Callable[[threading.Event], None] | None = None,
        on_stopped_leading: Callable[[], None] | None = None,
        on_new_leader: Callable[[str], None] | None = None,
        release_on_cancel: bool = True,
        rejoin: bool = True,
        jitter: float = 1.2,
        clock: MonotonicClock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        """`rejoin`: after losing the lease, campaign again (else the elector's thread ends)."""
        if not name or not namespace:
            raise ValueError("a lease needs a name and a namespace")
        if lease_duration <= renew_deadline:
            raise ValueError(f"lease_duration ({lease_duration}s) must exceed renew_deadline ({renew_deadline}s)")
        if renew_deadline <= jitter * retry_period:
            raise ValueError(
                f"renew_deadline ({renew_deadline}s) must exceed jitter*retry_period ({jitter * retry_period}s)"
            )
        if retry_period <= 0 or jitter < 1.0:
            raise ValueError("retry_period must be positive and jitter at least 1.0")
        self.client = client
        self.name = name
        self.namespace = namespace
        self.identity = identity or default_identity()
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.on_started_leading = on_started_leading
        self.on_stopped_leading = on_stopped_leading
        self.on_new_leader = on_new_leader
        self.release_on_cancel = release_on_cancel
        self.rejoin = rejoin
        self.jitter = jitter
        self._clock = clock
        self._rng = rng or random.Random()
        # Each call must finish well inside the renew deadline, or one slow call could outlast it.
        half = renew_deadline / 2
        self._timeout = (min(5.0, half), half)

        self._stop = threading.Event()
        self._leading = threading.Event()
        self._release = True
        self._thread: threading.Thread | None = None
        self._observed_record: dict[str, Any] | None = None
        self._observed_time = 0.0
        self._observed_leader = ""
        self.transitions_seen = 0

    # --- public surface -------------------------------------------------------------------------

    def is_leader(self) -> bool:
        """True while this elector holds the lease (between started and stopped leading)."""
        return self._leading.is_set()

    @property
    def leader(self) -> str:
        """The holder identity last observed on the lease ("" when free or unknown)."""
        return self._observed_leader

    def start(self) -> None:
        """Campaign on a daemon thread (again after each loss when `rejoin`), until `stop()`."""
        if self._thread is not None:
            raise RuntimeError("leader elector already started")
        self._thread = threading.Thread(target=self._loop, name=f"leader-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True, timeout: float | None = None) -> None:
        """Stop campaigning; when leading, stop the work and (if `release`) free the lease for a standby.

        `release=False` behaves like a crash: the lease is left to expire.
        """
        self._release = release
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout if timeout is not None else self.lease_duration + self.renew_deadline)

    def wait_for_leadership(self, timeout: float) -> bool:
        """Block until leading or `timeout` seconds."""
        return self._leading.wait(timeout)

    def run(self) -> bool:
        """One term, blocking: acquire, lead until the lease is lost or `stop()`, step down.

        Returns False if stopped before ever acquiring.
        """
        if not self._acquire():
            return False
        lead_stop = threading.Event()
        self._leading.set()
        metrics.LEADER.labels(self.name).set(1)
        log.info("%s became leader of lease %s/%s", self.identity, self.namespace, self.name)
        worker: threading.Thread | None = None
        if self.on_started_leading is not None:
            worker = threading.Thread(
                target=self._guard, args=(self.on_started_leading, lead_stop), name=f"leading-{self.name}", daemon=True
            )
            worker.start()
        lost = False
        try:
            lost = self._renew_loop()
        finally:
            lead_stop.set()
            # Let the work wind down before anyone may lead: after a lost renewal another candidate can
            # take the lease once it expires (lease_duration - renew_deadline from now at the earliest);
            # after a release, at once.
            if worker is not None:
                grace = self.lease_duration - self.renew_deadline if lost else self.lease_duration
                worker.join(grace)
                if worker.is_alive():
                    log.warning("work of %s still running after %.0fs of stepping down", self.name, grace)
            self._leading.clear()
            metrics.LEADER.labels(self.name).set(0)
        if lost:
            log.warning("%s lost lease %s/%s: could not renew", self.identity, self.namespace, self.name)
        elif self._release and self.release_on_cancel:
            self._release_lease()
        if self.on_stopped_leading is not None:
            self._guard(self.on_stopped_leading)
        return True

    # --- the protocol ---------------------------------------------------------------------------

    def _sleep_jittered(self) -> None:
        self._stop.wait(self.retry_period * (1.0 + (self.jitter - 1.0) * self._rng.random()))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.run()
            if not self.rejoin:
                return
            self._sleep_jittered()

    def _acquire(self) -> bool:
        while not self._stop.is_set():
            if self.try_acquire_or_renew():
                return True
            self._sleep_jittered()
        return False

    def _renew_loop(self) -> bool:
        """Renew every retry period; True when renewals failed for longer than the renew deadline."""
        while not self._stop.is_set():
            deadline = self._clock() + self.renew_deadline
            while not self.try_acquire_or_renew():
                if self._stop.is_set():
                    return False
                if self._clock() + self.retry_period > deadline:
                    return True
                self._stop.wait(self.retry_period)
            self._stop.wait(self.retry_period)
        return False

    def try_acquire_or_renew(self) -> bool:
        """One attempt, as client-go's tryAcquireOrRenew: True when we hold the lease afterwards."""
        now = datetime.now(UTC)
        duration_s = max(1, math.ceil(self.lease_duration))
        try:
            lease = self.client.get(LEASES, self.name, self.namespace, timeout=self._timeout)
        except ApiError as exc:
            if not exc.not_found:
                log.info("lease %s/%s: get failed: %s", self.namespace, self.name, exc)
                return False
            spec = {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": duration_s,
                "acquireTime": micro_time(now),
                "renewTime": micro_time(now),
                "leaseTransitions": 0,
            }
            body = {"metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec}
            try:
                self.client.create(LEASES, body, self.namespace, timeout=self._timeout)
            except ApiError as exc2:
                log.info("lease %s/%s: create failed: %s", self.namespace, self.name, exc2)
                return False
            self._observe(spec)
            return True

        record = dict(lease.get("spec") or {})
        self._observe(record)
        holder = str(record.get("holderIdentity") or "")
        record_duration = float(record.get("leaseDurationSeconds") or duration_s)
        if holder and holder != self.identity and self._observed_time + record_duration > self._clock():
            return False  # held by someone else and not expired by our own observation

        ours = holder == self.identity
        transitions = int(record.get("leaseTransitions") or 0)
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": duration_s,
            "acquireTime": record.get("acquireTime") if ours and record.get("acquireTime") else micro_time(now),
            "renewTime": micro_time(now),
            "leaseTransitions": transitions if ours else transitions + 1,
        }
        lease["spec"] = {**record, **spec}
        try:
            updated = self.client.replace(LEASES, lease, self.namespace, timeout=self._timeout)
        except ApiError as exc:
            log.log(
                logging.DEBUG if exc.conflict else logging.INFO,
                "lease %s/%s: update failed: %s", self.namespace, self.name, exc,
            )  # fmt: skip
            return False
        if not ours:
            self.transitions_seen += 1
        self._observe(dict(updated.get("spec") or lease["spec"]))
        return True

    def _observe(self, record: dict[str, Any]) -> None:
        if record != self._observed_record:
            self._observed_record = record
            self._observed_time = self._clock()
            holder = str(record.get("holderIdentity") or "")
            if holder != self._observed_leader:
                self._observed_leader = holder
                if holder and self.on_new_leader is not None:
                    self._guard(self.on_new_leader, holder)

    def _release_lease(self) -> None:
        """Hand the lease back: empty holder and a 1 s duration, written only if we still hold it."""
        try:
            lease = self.client.get(LEASES, self.name, self.namespace, timeout=self._timeout)
            record = dict(lease.get("spec") or {})
            if record.get("holderIdentity") != self.identity:
                return
            now = micro_time()
            lease["spec"] = {
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": int(record.get("leaseTransitions") or 0),
            }
            self.client.replace(LEASES, lease, self.namespace, timeout=self._timeout)
            log.info("%s released lease %s/%s", self.identity, self.namespace, self.name)
        except ApiError as exc:
            log.warning("lease %s/%s: release failed (it will expire): %s", self.namespace, self.name, exc)

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("leader election callback %r failed", fn)
