"""Kubernetes Events (`events.k8s.io/v1`) that never slow down or break the code that records them.

Why a recorder of our own: the controller records from reconcile loops that must not block on the API
server or fail because an Event could not be written. So `event()` only puts a key on a bounded queue
(dropping, with a log line and a counter, when full) and a daemon thread writes. Repeats of the same
(object, type, reason, action, message) become a series on the existing Event (count and last-seen time
patched in place) instead of new objects, as client-go's event library does; repeats that arrive while
an update is still queued coalesce into one write.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from common.kube import EVENTS, ApiError, KubeClient
from common.leader import micro_time

log = logging.getLogger(__name__)

EventType = Literal["Normal", "Warning"]
NOTE_MAX_BYTES = 1024
FIELD_MAX = 128


@dataclass(frozen=True)
class ObjectRef:
    """What an Event is about (the `regarding` reference)."""

    kind: str
    name: str
    namespace: str = ""
    uid: str = ""
    api_version: str = ""

    @classmethod
    def of(cls, obj: Mapping[str, Any] | ObjectRef) -> ObjectRef:
        """From a Kubernetes object dict, a reference dict (`kind`, `name`, `namespace`, `uid`, `apiVersion`)
        or an ObjectRef."""
        if isinstance(obj, ObjectRef):
            return obj
        meta = obj.get("metadata")
        src: Mapping[str, Any] = meta if isinstance(meta, Mapping) else obj
        ref = cls(
            kind=str(obj.get("kind") or ""),
            name=str(src.get("name") or ""),
            namespace=str(src.get("namespace") or ""),
            uid=str(src.get("uid") or ""),
            api_version=str(obj.get("apiVersion") or ""),
        )
        if not ref.kind or not ref.name:
            raise ValueError(f"an event needs the object's kind and name, got kind={ref.kind!r} name={ref.name!r}")
        return ref

    def to_api(self) -> dict[str, str]:
        """The ObjectReference body."""
        out = {"kind": self.kind, "name": self.name}
        if self.namespace:
            out["namespace"] = self.namespace
        if self.uid:
            out["uid"] = self.uid
        if self.api_version:
            out["apiVersion"] = self.api_version
        return out


@dataclass
class _Series:
    ref: ObjectRef
    type: EventType
    reason: str
    action: str
    note: str
    count: int = 1
    written_count: int = 0  # what the API server has
    name: str = ""  # the Event object, once created
    namespace: str = ""
    first_seen: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    queued: bool = False


_Key = tuple[str, str, str, str, str, str]


def _truncate_utf8(text: str, limit: int) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "..."


class EventRecorder:
    """Records Events for objects from any thread, without blocking and without raising."""

    def __init__(
        self,
        client: KubeClient,
        component: str,
        *,
        instance: str | None = None,
        queue_size: int = 256,
        series_window: float = 6 * 60.0,
        cache_size: int = 4096,
    ) -> None:
        """`series_window`: repeats within this many seconds of the last one join its series."""
        if not component:
            raise ValueError("an event recorder needs a component name (reportingController)")
        self.client = client
        self.component = component[:FIELD_MAX]
        self.instance = (instance or os.environ.get("POD_NAME") or socket.gethostname())[:FIELD_MAX]
        self.series_window = series_window
        self.cache_size = cache_size
        self._queue: queue.Queue[_Key] = queue.Queue(maxsize=queue_size)
        self._series: OrderedDict[_Key, _Series] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"events-{component}", daemon=True)
        self._thread.start()
        self.written = 0
        self.dropped = 0
        self.failed = 0

    # --- recording ------------------------------------------------------------------------------

    def event(
        self,
        obj: Mapping[str, Any] | ObjectRef,
        type: EventType,
        reason: str,
        message: str,
        action: str | None = None,
    ) -> None:
        """Record that `reason` happened to `obj`; returns at once and never raises."""
        try:
            self._record(ObjectRef.of(obj), type, reason, message, action)
        except Exception:
            log.exception("could not record event %s for %r", reason, obj)

    def normal(self, obj: Mapping[str, Any] | ObjectRef, reason: str, message: str, action: str | None = None) -> None:
        """`event(obj, "Normal", ...)`."""
        self.event(obj, "Normal", reason, message, action)

    def warning(self, obj: Mapping[str, Any] | ObjectRef, reason: str, message: str, action: str | None = None) -> None:
        """`event(obj, "Warning", ...)`."""
        self.event(obj, "Warning", reason, message, action)

    def _record(self, ref: ObjectRef, type: EventType, reason: str, message: str, action: str | None) -> None:
        if type not in ("Normal", "Warning"):
            raise ValueError(f"event type must be Normal or Warning, got {type!r}")
        if not reason:
            raise ValueError("an event needs a reason")
        reason = reason[:FIELD_MAX]
        action = (action or reason)[:FIELD_MAX]
        note = _truncate_utf8(message, NOTE_MAX_BYTES)
        key: _Key = (ref.uid or f"{ref.namespace}/{ref.kind}/{ref.name}", ref.name, type, reason, action, note)
        now = time.monotonic()
        with self._lock:
            series = self._series.get(key)
            if series is not None and now - series.last_seen <= self.series_window:
                series.count += 1
                series.last_seen = now
                self._series.move_to_end(key)
                if series.queued:
                    return  # the queued write will carry the new count
            else:
                series = _Series(ref, type, reason, action, note)
                self._series[key] = series
                while len(self._series) > self.cache_size:
                    self._series.popitem(last=False)
            series.queued = True
        try:
            self._queue.put_nowait(key)
        except queue.Full:
            with self._lock:
                series.queued = False
            self.dropped += 1
            log.warning("event queue full; dropped %s %s for %s/%s", type, reason, ref.kind, ref.name)

    # --- writing --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set() or not self._queue.empty():
            try:
                key = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._write(key)
            except Exception:
                self.failed += 1
                log.exception("event write failed")
            finally:
                self._queue.task_done()

    def _write(self, key: _Key) -> None:
        with self._lock:
            series = self._series.get(key)
            if series is None:
                return
            series.queued = False
            count, name, namespace = series.count, series.name, series.namespace
        if name and count > 1:
            body = {"series": {"count": count, "lastObservedTime": micro_time()}}
            try:
                self.client.patch(EVENTS, name, body, namespace, patch_type="merge")
                with self._lock:
                    series.written_count = count
                self.written += 1
                return
            except ApiError as exc:
                if not exc.not_found:
                    self.failed += 1
                    log.warning("could not update event %s/%s: %s", namespace, name, exc)
                    return
                # The Event expired (its TTL passed): start a new one below.
        try:
            created = self.client.create(EVENTS, self._new_event(series), timeout=(5.0, 10.0))
        except ApiError as exc:
            self.failed += 1
            log.warning("could not create event %s for %s/%s: %s", series.reason, series.ref.kind, series.ref.name, exc)
            return
        meta = created.get("metadata") or {}
        with self._lock:
            series.name = str(meta.get("name") or "")
            series.namespace = str(meta.get("namespace") or "")
            series.written_count = count
            again = series.count > count and not series.queued  # repeats arrived while we were creating
            if again:
                series.queued = True
        self.written += 1
        if again:
            try:
                self._queue.put_nowait(key)
            except queue.Full:
                with self._lock:
                    series.queued = False

    def _new_event(self, series: _Series) -> dict[str, Any]:
        ref = series.ref
        namespace = ref.namespace or "default"
        body: dict[str, Any] = {
            "metadata": {"name": f"{ref.name}.{time.time_ns():x}"[:253], "namespace": namespace},
            "eventTime": micro_time(),
            "reportingController": self.component,
            "reportingInstance": self.instance,
            "action": series.action,
            "reason": series.reason,
            "note": series.note,
            "type": series.type,
            "regarding": ref.to_api(),
        }
        if series.count > 1:
            body["series"] = {"count": series.count, "lastObservedTime": micro_time()}
        return body

    # --- lifecycle ------------------------------------------------------------------------------

    def flush(self, timeout: float) -> bool:
        """Wait until every queued event has been written (or failed); False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to `timeout`), then stop the writer thread."""
        self.flush(timeout)
        self._stop.set()
        self._thread.join(timeout)
