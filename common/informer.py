"""A list-then-watch cache of one resource type, with client-go's reflector discipline.

The official client's `watch.Watch` only streams; everything that makes a cache trustworthy is here:
paginated list, watch from the list's resourceVersion with bookmarks, a jittered server-side timeout,
a client-side read timeout as the inactivity watchdog (a silent stream is a dead stream), a fresh list
on 410 Gone, jittered exponential backoff on errors, and replace semantics on relist (objects missing
from the new list are deleted, with handlers told). Objects are plain dicts, stored after `transform`
(by default without `metadata.managedFields`, often half of an object's bytes).

Handlers run on the informer's own thread, in registration order, in event order; keep them short
(enqueue a key). Stored objects are shared: treat them as read-only (copy before changing).
"""

from __future__ import annotations

import builtins
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from common import metrics
from common.kube import JSON, ApiConnectionError, ApiError, KubeClient, Resource, WatchStream, object_key

log = logging.getLogger(__name__)

Transform = Callable[[JSON], JSON]
IndexFunc = Callable[[JSON], Iterable[str]]
AddHandler = Callable[[JSON], None]
UpdateHandler = Callable[[JSON, JSON], None]
DeleteHandler = Callable[[JSON], None]


def strip_managed_fields(obj: JSON) -> JSON:
    """The default transform: drop `metadata.managedFields` (server-side apply bookkeeping nobody reads)."""
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
    return obj


#: Always kept by `keep_fields`: what keys, resourceVersions, owners and deletion handling need.
_ESSENTIAL_METADATA = ("name", "namespace", "uid", "resourceVersion", "generation", "deletionTimestamp")

FieldSpec = Mapping[str, "bool | FieldSpec"]


def keep_fields(spec: FieldSpec) -> Transform:
    """A transform that keeps only the fields named in `spec` (nested dicts; `True` keeps a whole subtree).

    For a cache of objects of which a component reads a handful of fields (a router needs a pod's labels,
    IP and readiness, not its containers): `kind`, `apiVersion` and the essential metadata are always kept.
    """

    def pick(obj: Any, want: FieldSpec) -> Any:
        if not isinstance(obj, dict):
            return obj
        out: JSON = {}
        for key, sub in want.items():
            if key in obj and sub:
                out[key] = obj[key] if sub is True else pick(obj[key], sub)
        return out

    def transform(obj: JSON) -> JSON:
        out: JSON = pick(obj, spec)
        meta = obj.get("metadata") or {}
        kept_meta = out.setdefault("metadata", {})
        for key in _ESSENTIAL_METADATA:
            if key in meta:
                kept_meta[key] = meta[key]
        for key in ("apiVersion", "kind"):
            if key in obj:
                out[key] = obj[key]
        return out

    return transform


def namespace_index(obj: JSON) -> builtins.list[str]:
    """Index function: the object's namespace (client-go's `cache.NamespaceIndex`)."""
    ns = (obj.get("metadata") or {}).get("namespace")
    return [ns] if ns else []


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential backoff: `initial * factor**n`, capped, each wait scaled by 1 +/- `jitter`."""

    initial: float = 0.8
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.25

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        base = min(self.cap, self.initial * (self.factor ** min(attempt, 64)))
        return base * (1.0 + self.jitter * (2.0 * rng.random() - 1.0))


@dataclass
class _Handler:
    on_add: AddHandler | None
    on_update: UpdateHandler | None
    on_delete: DeleteHandler | None


class Informer:
    """Keeps a local, indexed copy of the objects of one resource (optionally filtered) and reports changes."""

    def __init__(
        self,
        client: KubeClient,
        resource: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        *,
        transform: Transform | None = strip_managed_fields,
        page_size: int = 500,
        watch_timeout: tuple[int, int] = (300, 600),
        idle_timeout: float = 120.0,
        backoff: Backoff = Backoff(),
        relist_after_failures: int = 5,
        name: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """`transform=None` stores objects exactly as received; `watch_timeout` is the server-side
        `timeoutSeconds` range to draw from; `idle_timeout` bounds each socket read of a watch."""
        if watch_timeout[0] <= 0 or watch_timeout[1] < watch_timeout[0]:
            raise ValueError(f"watch_timeout must be a (low, high) range of positive seconds, got {watch_timeout}")
        if idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive, got {idle_timeout}")
        self.client = client
        self.resource = resource
        self.namespace = namespace
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.transform = transform
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.idle_timeout = idle_timeout
        self.backoff = backoff
        self.relist_after_failures = relist_after_failures
        self.name = name or f"{resource.plural}{'/' + namespace if namespace else ''}"
        self._rng = rng or random.Random()
        self._objects_gauge = metrics.INFORMER_OBJECTS.labels(self.name)

        self._lock = threading.RLock()
        self._items: dict[str, JSON] = {}
        self._indexers: dict[str, IndexFunc] = {}
        self._indices: dict[str, dict[str, set[str]]] = {}
        self._handlers: builtins.list[_Handler] = []
        # Held across each store write and its dispatch, so a handler added meanwhile sees each change once.
        self._handlers_lock = threading.RLock()

        self._synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream: WatchStream | None = None
        self._stream_lock = threading.Lock()
        self._rv = ""

        # Counters for tests, logs and metrics.
        self.list_count = 0
        self.watch_count = 0
        self.relist_reasons: builtins.list[str] = []
        self.last_error: BaseException | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the list/watch loop on a daemon thread (once)."""
        if self._thread is not None:
            raise RuntimeError(f"informer {self.name} already started")
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop promptly: the open watch is closed so the thread wakes at once; waits up to `timeout`."""
        self._stop.set()
        with self._stream_lock:
            stream = self._stream
        if stream is not None:
            stream.close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def stopped(self) -> bool:
        """True once `stop()` was called."""
        return self._stop.is_set()

    def has_synced(self) -> bool:
        """True once the first full list is in the store and handlers have seen it."""
        return self._synced.is_set()

    def wait_for_sync(self, timeout: float | None = None) -> bool:
        """Block until synced or `timeout` seconds; returns `has_synced()`."""
        return self._synced.wait(timeout)

    @property
    def resource_version(self) -> str:
        """The last resourceVersion seen (from a list, an event or a bookmark)."""
        return self._rv

    # --- handlers and indexes -------------------------------------------------------------------

    def add_handler(
        self,
        on_add: AddHandler | None = None,
        on_update: UpdateHandler | None = None,
        on_delete: DeleteHandler | None = None,
    ) -> None:
        """Register callbacks; a handler added after sync is first told about every stored object (adds)."""
        handler = _Handler(on_add, on_update, on_delete)
        with self._handlers_lock:
            # Holding the handlers lock while replaying keeps the replay and live events in order.
            self._handlers.append(handler)
            if on_add is not None:
                for obj in self.list():
                    self._call(on_add, obj)

    def add_index(self, name: str, fn: IndexFunc) -> None:
        """Add an index: `fn(obj)` gives the values under which `by_index(name, value)` finds the object."""
        with self._lock:
            if name in self._indexers:
                raise ValueError(f"index {name!r} already exists on informer {self.name}")
            self._indexers[name] = fn
            index: dict[str, set[str]] = {}
            self._indices[name] = index
            for key, obj in self._items.items():
                for value in self._index_values(fn, obj):
                    index.setdefault(value, set()).add(key)

    # --- store reads ----------------------------------------------------------------------------

    def get(self, key: str) -> JSON | None:
        """The object stored under `namespace/name` (or `name` when cluster-scoped)."""
        with self._lock:
            return self._items.get(key)

    def get_by_name(self, namespace: str | None, name: str) -> JSON | None:
        """`get()` by parts."""
        return self.get(f"{namespace}/{name}" if namespace else name)

    def list(self, namespace: str | None = None) -> builtins.list[JSON]:
        """Every stored object (optionally only one namespace's)."""
        with self._lock:
            if namespace is None:
                return list(self._items.values())
            prefix = namespace + "/"
            return [obj for key, obj in self._items.items() if key.startswith(prefix)]

    def keys(self) -> builtins.list[str]:
        """Every stored key."""
        with self._lock:
            return list(self._items)

    def by_index(self, name: str, value: str) -> builtins.list[JSON]:
        """The objects whose index function `name` gave `value`."""
        with self._lock:
            if name not in self._indices:
                raise KeyError(f"no index {name!r} on informer {self.name}")
            return [self._items[k] for k in self._indices[name].get(value, ()) if k in self._items]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    # --- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list:
                    self._list_and_replace()
                    need_list = False
                    failures = 0
                if self._watch_once():
                    failures = 0  # a watch that ended cleanly (server timeout) is healthy
                else:
                    failures += 1  # ended at once with nothing: do not spin on a server that closes watches
                    self._sleep(self.backoff.delay(failures - 1, self._rng))
            except ApiError as exc:
                if self._stop.is_set():
                    break
                self.last_error = exc
                metrics.INFORMER_ERRORS.labels(self.name).inc()
                if exc.gone:
                    log.info("informer %s: resourceVersion %s expired (410); relisting", self.name, self._rv)
                    self._relisting("gone")
                    need_list = True
                    failures = 0
                    self._sleep(self._rng.uniform(0.0, 0.2))  # a little jitter so many informers do not stampede
                    continue
                failures += 1
                if failures >= self.relist_after_failures and not need_list:
                    self._relisting("failures")
                    need_list = True
                delay = exc.retry_after if exc.retry_after is not None else self.backoff.delay(failures - 1, self._rng)
                level = logging.INFO if isinstance(exc, ApiConnectionError) else logging.WARNING
                log.log(level, "informer %s: %s; retrying in %.1fs", self.name, exc, delay)
                self._sleep(delay)
            except Exception as exc:  # a bug in a transform or an index function must not kill the cache
                if self._stop.is_set():
                    break
                self.last_error = exc
                metrics.INFORMER_ERRORS.labels(self.name).inc()
                failures += 1
                need_list = True
                self._relisting("exception")
                delay = self.backoff.delay(failures - 1, self._rng)
                log.exception("informer %s: unexpected error; relisting in %.1fs", self.name, delay)
                self._sleep(delay)
        log.debug("informer %s stopped", self.name)

    def _relisting(self, reason: str) -> None:
        self.relist_reasons.append(reason)
        metrics.INFORMER_RELISTS.labels(self.name, reason).inc()

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(max(0.0, seconds))

    def _list_and_replace(self) -> None:
        items, rv = self.client.list_all(
            self.resource,
            self.namespace,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            page_size=self.page_size,
        )
        self.list_count += 1
        metrics.INFORMER_LISTS.labels(self.name).inc()
        if self._stop.is_set():
            return
        self._replace(items)
        self._rv = rv
        self._synced.set()

    def _watch_once(self) -> bool:
        """One watch until it ends; False when it ended within a second having delivered nothing."""
        started = time.monotonic()
        timeout_seconds = self._rng.randint(self.watch_timeout[0], self.watch_timeout[1])
        stream = self.client.watch(
            self.resource,
            self.namespace,
            resource_version=self._rv,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            timeout_seconds=timeout_seconds,
            allow_bookmarks=True,
            read_timeout=self.idle_timeout,
        )
        with self._stream_lock:
            if self._stop.is_set():
                stream.close()
                return True
            self._stream = stream
        self.watch_count += 1
        metrics.INFORMER_WATCHES.labels(self.name).inc()
        events = 0
        try:
            for event in stream:
                if self._stop.is_set():
                    return True
                events += 1
                self._handle_event(event)
            return events > 0 or time.monotonic() - started >= 1.0 or self._stop.is_set()
        finally:
            with self._stream_lock:
                self._stream = None
            stream.close()

    def _handle_event(self, event: Mapping[str, Any]) -> None:
        etype = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise ApiConnectionError(0, "BadWatchEvent", f"watch event without an object: {str(event)[:200]}")
        if etype == "ERROR":
            code = int(obj.get("code") or 0)
            raise ApiError(
                code, str(obj.get("reason") or "WatchError"), str(obj.get("message") or ""),
                method="WATCH", path=self.resource.path(self.namespace),
            )  # fmt: skip
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if etype == "BOOKMARK":
            if rv:
                self._rv = rv
            return
        if etype not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("informer %s: ignoring watch event of type %r", self.name, etype)
            return
        obj.setdefault("apiVersion", self.resource.api_version)
        if self.resource.kind:
            obj.setdefault("kind", self.resource.kind)
        if self.transform is not None:
            obj = self.transform(obj)
        key = object_key(obj)
        with self._handlers_lock:
            if etype == "DELETED":
                self._delete(key)
                self._dispatch_delete(obj)  # the final state, as the server sent it
            else:
                old = self._put(key, obj)
                if old is None:
                    self._dispatch_add(obj)
                else:
                    self._dispatch_update(old, obj)
        if rv:
            self._rv = rv

    # --- store writes (lock held briefly, handlers called outside it) ---------------------------

    def _replace(self, items: builtins.list[JSON]) -> None:
        new: dict[str, JSON] = {}
        for raw in items:
            obj = self.transform(raw) if self.transform is not None else raw
            new[object_key(obj)] = obj
        with self._handlers_lock:
            with self._lock:
                old_items = self._items
                self._items = new
                self._objects_gauge.set(len(new))
                self._rebuild_indices()
            for key, obj in old_items.items():
                if key not in new:
                    self._dispatch_delete(obj)
            for key, obj in new.items():
                prev = old_items.get(key)
                if prev is None:
                    self._dispatch_add(obj)
                elif _uid_of(prev) != _uid_of(obj):  # deleted and re-created while we were not watching
                    self._dispatch_delete(prev)
                    self._dispatch_add(obj)
                elif _rv_of(prev) != _rv_of(obj):
                    self._dispatch_update(prev, obj)

    def _rebuild_indices(self) -> None:
        for name, fn in self._indexers.items():
            index: dict[str, set[str]] = {}
            for key, obj in self._items.items():
                for value in self._index_values(fn, obj):
                    index.setdefault(value, set()).add(key)
            self._indices[name] = index

    def _put(self, key: str, obj: JSON) -> JSON | None:
        with self._lock:
            old = self._items.get(key)
            if old is not None:
                self._unindex(key, old)
            self._items[key] = obj
            self._objects_gauge.set(len(self._items))
            for name, fn in self._indexers.items():
                index = self._indices[name]
                for value in self._index_values(fn, obj):
                    index.setdefault(value, set()).add(key)
            return old

    def _delete(self, key: str) -> JSON | None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._unindex(key, old)
                self._objects_gauge.set(len(self._items))
            return old

    def _unindex(self, key: str, obj: JSON) -> None:
        for name, fn in self._indexers.items():
            index = self._indices[name]
            for value in self._index_values(fn, obj):
                keys = index.get(value)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del index[value]

    def _index_values(self, fn: IndexFunc, obj: JSON) -> builtins.list[str]:
        try:
            return [str(v) for v in fn(obj)]
        except Exception:
            log.exception("informer %s: index function failed on %s", self.name, object_key(obj))
            return []

    # --- dispatch -------------------------------------------------------------------------------

    def _dispatch_add(self, obj: JSON) -> None:
        with self._handlers_lock:
            for h in self._handlers:
                if h.on_add is not None:
                    self._call(h.on_add, obj)

    def _dispatch_update(self, old: JSON, new: JSON) -> None:
        with self._handlers_lock:
            for h in self._handlers:
                if h.on_update is not None:
                    self._call(h.on_update, old, new)

    def _dispatch_delete(self, obj: JSON) -> None:
        with self._handlers_lock:
            for h in self._handlers:
                if h.on_delete is not None:
                    self._call(h.on_delete, obj)

    def _call(self, fn: Callable[..., None], *args: JSON) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("informer %s: handler %r failed", self.name, fn)


def _rv_of(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def _uid_of(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


def wait_for_cache_sync(informers: Iterable[Informer], timeout: float) -> bool:
    """client-go's WaitForCacheSync: True when every informer synced within `timeout` seconds overall."""
    deadline = time.monotonic() + timeout
    return all(inf.wait_for_sync(max(0.0, deadline - time.monotonic())) for inf in informers)
