"""An informer's store seen through the controller's own recent writes.

An informer learns of a write only when the watch event arrives, a few milliseconds to seconds later.
Read in between, the cache would make the controller create a placement twice, load an adapter twice
or rewrite a slice it just wrote (a 409 and a retry at best, a duplicate copy at worst). Like
client-go's "expectations", every successful write is remembered here until the informer shows the
same object or a newer one (or a short time passes), and reads prefer it.
"""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

JSON = dict[str, Any]


class Cache(Protocol):
    """The part of ``common.informer.Informer`` the controller reads."""

    def get(self, key: str) -> JSON | None: ...

    def list(self, namespace: str | None = None) -> builtins.list[JSON]: ...

    def by_index(self, name: str, value: str) -> builtins.list[JSON]: ...


def key_of(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


def _rv(obj: Mapping[str, Any] | None) -> int | None:
    if not obj:
        return None
    text = str((obj.get("metadata") or {}).get("resourceVersion") or "")
    return int(text) if text.isdigit() else None


def _uid(obj: Mapping[str, Any] | None) -> str | None:
    return str((obj.get("metadata") or {}).get("uid") or "") if obj else None


class Store:
    """Reads from ``cache`` with the controller's recent writes laid over it."""

    def __init__(self, cache: Cache, *, ttl: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 indexes: Mapping[str, Callable[[JSON], Iterable[str]]] | None = None) -> None:
        self.cache = cache
        self._ttl = ttl
        self._clock = clock
        self._indexes = dict(indexes or {})
        self._lock = threading.Lock()
        # key -> (object written, or None for a deletion; the uid and resourceVersion it replaced; expiry)
        self._recent: dict[str, tuple[JSON | None, str | None, int | None, float]] = {}

    def wrote(self, obj: Mapping[str, Any]) -> None:
        """Remember an object the API server returned from a create, update or patch."""
        with self._lock:
            self._recent[key_of(obj)] = (dict(obj), None, None, self._clock() + self._ttl)

    def deleted(self, key: str, old: Mapping[str, Any] | None) -> None:
        """Remember a deletion: the object is gone even if the cache still shows it."""
        with self._lock:
            self._recent[key] = (None, _uid(old), _rv(old), self._clock() + self._ttl)

    def _resolve(self, key: str, cached: JSON | None) -> JSON | None:
        with self._lock:
            entry = self._recent.get(key)
            if entry is None:
                return cached
            obj, old_uid, old_rv, expiry = entry
            if self._clock() > expiry:
                del self._recent[key]
                return cached
            if obj is None:  # a deletion
                if cached is None or (_uid(cached) != old_uid and old_uid) or (
                        old_rv is not None and (_rv(cached) or 0) > old_rv):
                    del self._recent[key]
                    return cached  # gone from the cache too, or a new object
                return None
            mine, theirs = _rv(obj), _rv(cached)
            if cached is None and mine is not None:
                seen = self._cache_rv()
                if seen is not None and seen >= mine:  # the cache saw our write and then lost it: deleted
                    del self._recent[key]
                    return None
            if cached is not None and _uid(cached) == _uid(obj) and (
                    mine is None or theirs is None or theirs >= mine):
                del self._recent[key]
                return cached  # the cache caught up (or moved past us)
            if cached is not None and _uid(cached) != _uid(obj) and theirs is not None and mine is not None \
                    and theirs > mine:
                del self._recent[key]
                return cached
            return obj

    def _cache_rv(self) -> int | None:
        """The newest resourceVersion the informer has seen (events and bookmarks), if it says."""
        text = str(getattr(self.cache, "resource_version", "") or "")
        return int(text) if text.isdigit() else None

    def get(self, key: str) -> JSON | None:
        return self._resolve(key, self.cache.get(key))

    def _pending(self) -> builtins.list[str]:
        with self._lock:
            return list(self._recent)

    def list(self, namespace: str | None = None) -> list[JSON]:
        out: dict[str, JSON | None] = {key_of(o): o for o in self.cache.list(namespace)}
        for key in self._pending():
            if namespace is None or key.startswith(namespace + "/"):
                out.setdefault(key, None)
        resolved = (self._resolve(k, v) for k, v in out.items())
        return [o for o in resolved if o is not None]

    def by_index(self, name: str, value: str) -> builtins.list[JSON]:
        cached: dict[str, JSON | None] = {key_of(o): o for o in self.cache.by_index(name, value)}
        fn = self._indexes.get(name)
        if fn is not None:  # without the index function, pending writes cannot be placed in the index
            for key in self._pending():
                cached.setdefault(key, self.cache.get(key))
        result = []
        for key, obj in cached.items():
            got = self._resolve(key, obj)
            # our own write may have moved an object into or out of the index
            if got is not None and (fn is None or value in [str(v) for v in fn(got)]):
                result.append(got)
        return result
