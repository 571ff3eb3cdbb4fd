"""A thin JSON layer over the official `kubernetes` client's connection pool.

Why not the generated API classes: they turn every object into model instances (several times the memory
and CPU of plain dicts), know nothing of our CRDs, and hide the watch protocol. This module keeps the
official client for what it does well (kubeconfig / in-cluster loading, TLS, auth tokens, proxies, the
urllib3 pool) and speaks plain JSON for ANY resource path: objects are dicts, errors are `ApiError` with
the Status body parsed, and every call has a connect and a read timeout.
"""

from __future__ import annotations

import builtins
import logging
import os
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlencode

import orjson
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

log = logging.getLogger(__name__)

JSON = dict[str, Any]

#: (connect, read) seconds for ordinary calls.
DEFAULT_TIMEOUT: tuple[float, float] = (5.0, 30.0)
#: Enough pooled connections for a handful of long-lived watches plus workers, without discards.
DEFAULT_POOL_SIZE = 32

PatchType = Literal["merge", "strategic", "json", "apply"]
_PATCH_CONTENT_TYPES: dict[str, str] = {
    "merge": "application/merge-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "json": "application/json-patch+json",
    "apply": "application/apply-patch+yaml",  # JSON is YAML, so the body is sent as JSON
}
DEFAULT_FIELD_MANAGER = "lora-autoscaler"

_SA_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


# --- configuration -----------------------------------------------------------------------------------


def load_api_client(kubeconfig: str | None = None, *, context: str | None = None) -> k8s_client.ApiClient:
    """An authenticated `ApiClient`: the given kubeconfig, else in-cluster when in a pod, else KUBECONFIG/~.

    In-cluster wins over ~/.kube/config when no file is named, because a pod's own service account is what
    RBAC was written for; `KUBECONFIG` set explicitly wins over in-cluster, because someone asked for it.
    """
    configuration = k8s_client.Configuration()
    if kubeconfig:
        if not os.path.isfile(kubeconfig):
            raise FileNotFoundError(f"kubeconfig {kubeconfig!r} does not exist")
        k8s_config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    elif os.environ.get("KUBECONFIG"):
        # Read now, not the default the client captured at import (it may be a colon-separated list).
        k8s_config.load_kube_config(
            config_file=os.environ["KUBECONFIG"], context=context, client_configuration=configuration
        )
    elif os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(_SA_TOKEN):
        k8s_config.load_incluster_config(client_configuration=configuration)
    else:
        k8s_config.load_kube_config(context=context, client_configuration=configuration)
    configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize or 0, DEFAULT_POOL_SIZE)
    return k8s_client.ApiClient(configuration)


# --- resources ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """A REST resource: where it lives (group/version/plural) and whether names are per namespace."""

    group: str
    version: str
    plural: str
    namespaced: bool
    kind: str = ""

    @property
    def api_version(self) -> str:
        """`v1` for the core group, `group/version` otherwise (what objects carry in `apiVersion`)."""
        return self.version if not self.group else f"{self.group}/{self.version}"

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        """The URL path; a namespaced resource without a namespace means all namespaces (lists and watches)."""
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        elif namespace and not self.namespaced:
            raise ValueError(f"{self.plural} is cluster-scoped; got namespace {namespace!r}")
        base += f"/{self.plural}"
        if name is not None:
            if not name:
                raise ValueError(f"an empty name for {self.plural}")
            base += f"/{quote(name, safe='')}"
        if subresource:
            if name is None:
                raise ValueError(f"subresource {subresource!r} of {self.plural} needs a name")
            base += f"/{subresource}"
        return base

    def __str__(self) -> str:
        return f"{self.plural}.{self.group or 'core'}/{self.version}"


PODS = Resource("", "v1", "pods", True, "Pod")
SERVICES = Resource("", "v1", "services", True, "Service")
SECRETS = Resource("", "v1", "secrets", True, "Secret")
CONFIGMAPS = Resource("", "v1", "configmaps", True, "ConfigMap")
NAMESPACES = Resource("", "v1", "namespaces", False, "Namespace")
CORE_EVENTS = Resource("", "v1", "events", True, "Event")
ENDPOINT_SLICES = Resource("discovery.k8s.io", "v1", "endpointslices", True, "EndpointSlice")
LEASES = Resource("coordination.k8s.io", "v1", "leases", True, "Lease")
EVENTS = Resource("events.k8s.io", "v1", "events", True, "Event")
HPAS = Resource("autoscaling", "v2", "horizontalpodautoscalers", True, "HorizontalPodAutoscaler")
DEPLOYMENTS = Resource("apps", "v1", "deployments", True, "Deployment")
STATEFULSETS = Resource("apps", "v1", "statefulsets", True, "StatefulSet")
LORA_AUTOSCALERS = Resource("loraautoscaler.io", "v1alpha1", "loraautoscalers", True, "LoRAAutoscaler")
LORA_PLACEMENTS = Resource("loraautoscaler.io", "v1alpha1", "loraplacements", True, "LoRAPlacement")

_KNOWN: tuple[Resource, ...] = (
    PODS, SERVICES, SECRETS, CONFIGMAPS, NAMESPACES, ENDPOINT_SLICES, LEASES, EVENTS, HPAS, DEPLOYMENTS,
    STATEFULSETS, LORA_AUTOSCALERS, LORA_PLACEMENTS,
)  # fmt: skip


# --- errors ------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A failed call: HTTP status (0 when no response came), reason and message from the Status body."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        method: str = "",
        path: str = "",
        details: Mapping[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        self.method = method
        self.path = path
        self.details: Mapping[str, Any] = details or {}
        self.retry_after = retry_after
        super().__init__(f"{method} {path}: {status} {reason}: {message}".strip())

    @property
    def not_found(self) -> bool:
        """404: the object (or its namespace, or the resource type) is not there."""
        return self.status == 404

    @property
    def conflict(self) -> bool:
        """409 with reason Conflict: a stale resourceVersion (optimistic concurrency lost)."""
        return self.status == 409 and self.reason != "AlreadyExists"

    @property
    def already_exists(self) -> bool:
        """409 AlreadyExists on create."""
        return self.status == 409 and self.reason == "AlreadyExists"

    @property
    def gone(self) -> bool:
        """410: a resourceVersion too old for a watch or a list continue token."""
        return self.status == 410

    @property
    def retriable(self) -> bool:
        """Worth retrying unchanged: no response, throttled, a timeout or a server-side failure."""
        return self.status in {0, 429} or self.status >= 500


class ApiConnectionError(ApiError):
    """No HTTP response at all: refused, reset, DNS, TLS, or a connect/read timeout (status 0)."""


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def error_from_response(method: str, path: str, status: int, body: bytes, headers: Mapping[str, str]) -> ApiError:
    """An `ApiError` from a non-2xx reply, reading a `Status` body when there is one."""
    reason, message, details = "", "", None
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and doc.get("kind") == "Status":
        reason = str(doc.get("reason") or "")
        message = str(doc.get("message") or "")
        details = doc.get("details") if isinstance(doc.get("details"), dict) else None
    else:
        message = body[:500].decode(errors="replace").strip()
    if not reason:
        reason = _DEFAULT_REASONS.get(status, "Unknown")
    return ApiError(
        status, reason, message, method=method, path=path, details=details,
        retry_after=_parse_retry_after(headers.get("Retry-After")),
    )  # fmt: skip


_DEFAULT_REASONS = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
    409: "Conflict", 410: "Gone", 415: "UnsupportedMediaType", 422: "Invalid", 429: "TooManyRequests",
    500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout",
}  # fmt: skip


# --- the client --------------------------------------------------------------------------------------


Timeout = float | tuple[float, float]


def _timeout(value: Timeout | None) -> urllib3.Timeout:
    if value is None:
        value = DEFAULT_TIMEOUT
    if isinstance(value, tuple):
        return urllib3.Timeout(connect=value[0], read=value[1])
    return urllib3.Timeout(connect=min(value, DEFAULT_TIMEOUT[0]), read=value)


class WatchStream:
    """One open watch: iterate decoded events; `close()` from any thread ends the iteration promptly."""

    def __init__(self, response: urllib3.BaseHTTPResponse, method: str, path: str) -> None:
        self._resp = response
        self._method = method
        self._path = path
        self._closed = threading.Event()
        self.bytes_read = 0

    def __iter__(self) -> Iterator[JSON]:
        """Decoded watch events (`{"type": ..., "object": {...}}`) until the server ends the stream.

        Raises `ApiConnectionError` when the connection fails or a socket read outlasts the read timeout
        (that is the inactivity watchdog: a silent stream is a dead stream).
        """
        buf = b""
        try:
            for chunk in self._resp.stream(amt=None, decode_content=True):
                if self._closed.is_set():
                    return
                self.bytes_read += len(chunk)
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    line, buf = buf[:nl], buf[nl + 1 :]
                    if line.strip():
                        yield self._decode(line)
            if buf.strip() and not self._closed.is_set():
                yield self._decode(buf)
        except (urllib3.exceptions.HTTPError, OSError, ValueError, AttributeError) as exc:
            # AttributeError: urllib3 drops its file object when `close()` races a read in another thread.
            if self._closed.is_set():
                return
            raise ApiConnectionError(0, type(exc).__name__, str(exc), method=self._method, path=self._path) from exc
        finally:
            self.close()

    def _decode(self, line: bytes) -> JSON:
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ApiConnectionError(
                0, "BadWatchEvent", f"undecodable watch line: {line[:200]!r}", method=self._method, path=self._path
            ) from exc
        if not isinstance(event, dict) or "type" not in event:
            raise ApiConnectionError(
                0, "BadWatchEvent", f"not a watch event: {line[:200]!r}", method=self._method, path=self._path
            )
        return event

    def close(self) -> None:
        """Stop reading now: shut the socket down so a blocked read in another thread returns."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self._resp.shutdown()
        except (ValueError, OSError, AttributeError):
            pass
        try:
            self._resp.close()
        except (OSError, AttributeError):
            pass

    @property
    def closed(self) -> bool:
        """Whether `close()` ran (by us or by the end of the iteration)."""
        return self._closed.is_set()


class KubeClient:
    """JSON over the official client's urllib3 pool: any resource, plain dicts, timeouts on every call."""

    def __init__(
        self,
        api_client: k8s_client.ApiClient,
        *,
        timeout: Timeout = DEFAULT_TIMEOUT,
        field_manager: str = DEFAULT_FIELD_MANAGER,
        user_agent: str | None = None,
    ) -> None:
        self.api_client = api_client
        self.configuration = api_client.configuration
        self.timeout = timeout
        self.field_manager = field_manager
        self._pool: urllib3.PoolManager = api_client.rest_client.pool_manager
        self._host = str(self.configuration.host).rstrip("/")
        self._user_agent = user_agent or f"lora-autoscaler/{socket.gethostname()}"
        self._kinds: dict[tuple[str, str], Resource] = {(r.api_version, r.kind): r for r in _KNOWN}
        self._kinds_lock = threading.Lock()

    @classmethod
    def from_kubeconfig(cls, kubeconfig: str | None = None, **kwargs: Any) -> KubeClient:
        """`KubeClient(load_api_client(kubeconfig))`."""
        return cls(load_api_client(kubeconfig), **kwargs)

    # --- raw requests ---------------------------------------------------------------------------

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers: dict[str, str] = {"Accept": "application/json", "User-Agent": self._user_agent}
        headers.update(self.api_client.default_headers)
        for auth in self.configuration.auth_settings().values():  # refreshes expiring tokens via its hook
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _url(self, path: str, query: Mapping[str, Any] | None) -> str:
        url = self._host + path
        if query:
            params = {k: _query_value(v) for k, v in query.items() if v is not None}
            if params:
                url += "?" + urlencode(params)
        return url

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str | None = None,
        timeout: Timeout | None = None,
    ) -> Any:
        """One call; returns the decoded JSON body (None when empty) or raises `ApiError`."""
        data = None if body is None else orjson.dumps(body)
        if data is not None and content_type is None:
            content_type = "application/json"
        try:
            resp = self._pool.request(
                method,
                self._url(path, query),
                body=data,
                headers=self._headers(content_type),
                timeout=_timeout(timeout if timeout is not None else self.timeout),
                retries=False,
                preload_content=True,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiConnectionError(0, type(exc).__name__, str(exc), method=method, path=path) from exc
        raw = resp.data or b""
        if not 200 <= resp.status <= 299:
            raise error_from_response(method, path, resp.status, raw, resp.headers)
        if not raw:
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(
                resp.status, "BadResponse", f"undecodable JSON body: {raw[:200]!r}", method=method, path=path
            ) from exc

    # --- reads ----------------------------------------------------------------------------------

    def get(
        self, resource: Resource, name: str, namespace: str | None = None, *, subresource: str | None = None,
        timeout: Timeout | None = None,
    ) -> JSON:  # fmt: skip
        """GET one object (or its subresource, e.g. `status`, `scale`)."""
        _need_namespace(resource, namespace)
        return self.request("GET", resource.path(namespace, name, subresource), timeout=timeout)

    def get_or_none(self, resource: Resource, name: str, namespace: str | None = None) -> JSON | None:
        """GET, but None for 404 (the common "does it exist yet" question)."""
        try:
            return self.get(resource, name, namespace)
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
        resource_version: str | None = None,
        timeout: Timeout | None = None,
    ) -> JSON:
        """One page of a list: the List object as returned (`items`, `metadata.resourceVersion`/`continue`)."""
        query = {
            "labelSelector": label_selector or None,
            "fieldSelector": field_selector or None,
            "limit": limit,
            "continue": continue_token or None,
            "resourceVersion": resource_version,
        }
        return self.request("GET", resource.path(namespace), query=query, timeout=timeout)

    def list_all(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        page_size: int = 500,
        timeout: Timeout | None = None,
    ) -> tuple[builtins.list[JSON], str]:
        """Every item, page by page (`limit`/`continue`), and the list's resourceVersion to watch from.

        Items get `apiVersion` and `kind` filled in (list items lack them), so listed and watched objects
        look the same.
        """
        items: builtins.list[JSON] = []
        token: str | None = None
        rv = ""
        while True:
            page = self.list(
                resource, namespace, label_selector=label_selector, field_selector=field_selector,
                limit=page_size, continue_token=token, timeout=timeout,
            )  # fmt: skip
            meta = page.get("metadata") or {}
            rv = str(meta.get("resourceVersion") or rv)
            for item in page.get("items") or ():
                item.setdefault("apiVersion", resource.api_version)
                if resource.kind:
                    item.setdefault("kind", resource.kind)
                items.append(item)
            token = meta.get("continue") or None
            if not token:
                return items, rv

    def watch(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        resource_version: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: int | None = None,
        allow_bookmarks: bool = True,
        read_timeout: float = 120.0,
        connect_timeout: float = DEFAULT_TIMEOUT[0],
    ) -> WatchStream:
        """Open a watch. An HTTP error (e.g. 410 for a too-old resourceVersion) raises `ApiError` here.

        `read_timeout` bounds every socket read: the API server sends bookmarks about once a minute, so a
        stream that is silent for longer is presumed dead.
        """
        query = {
            "watch": "true",
            "resourceVersion": resource_version or None,
            "allowWatchBookmarks": "true" if allow_bookmarks else None,
            "timeoutSeconds": timeout_seconds,
            "labelSelector": label_selector or None,
            "fieldSelector": field_selector or None,
        }
        path = resource.path(namespace)
        try:
            resp = self._pool.request(
                "GET",
                self._url(path, query),
                headers=self._headers(None),
                timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
                retries=False,
                preload_content=False,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiConnectionError(0, type(exc).__name__, str(exc), method="WATCH", path=path) from exc
        if not 200 <= resp.status <= 299:
            try:
                raw = resp.read()
            except (urllib3.exceptions.HTTPError, OSError):
                raw = b""
            finally:
                resp.release_conn()
            raise error_from_response("WATCH", path, resp.status, raw, resp.headers)
        return WatchStream(resp, "WATCH", path)

    # --- writes ---------------------------------------------------------------------------------

    def create(
        self, resource: Resource, body: Mapping[str, Any], namespace: str | None = None, *,
        field_manager: str | None = None, dry_run: bool = False, timeout: Timeout | None = None,
    ) -> JSON:  # fmt: skip
        """POST a new object; the namespace defaults to the body's `metadata.namespace`."""
        namespace = namespace or (body.get("metadata") or {}).get("namespace")
        _need_namespace(resource, namespace)
        query = {"fieldManager": field_manager or self.field_manager, "dryRun": "All" if dry_run else None}
        return self.request(
            "POST", resource.path(namespace), query=query, body=_with_type(resource, body), timeout=timeout
        )

    def replace(
        self, resource: Resource, body: Mapping[str, Any], namespace: str | None = None, *,
        subresource: str | None = None, field_manager: str | None = None, timeout: Timeout | None = None,
    ) -> JSON:  # fmt: skip
        """PUT the whole object; with `metadata.resourceVersion` set this is optimistic concurrency (409)."""
        meta = body.get("metadata") or {}
        namespace = namespace or meta.get("namespace")
        _need_namespace(resource, namespace)
        name = meta.get("name")
        if not name:
            raise ValueError(f"replace of {resource.plural} needs metadata.name")
        query = {"fieldManager": field_manager or self.field_manager}
        return self.request(
            "PUT", resource.path(namespace, name, subresource), query=query,
            body=_with_type(resource, body) if subresource is None else dict(body), timeout=timeout,
        )  # fmt: skip

    def patch(
        self,
        resource: Resource,
        name: str,
        patch: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        namespace: str | None = None,
        *,
        patch_type: PatchType = "merge",
        subresource: str | None = None,
        field_manager: str | None = None,
        force: bool = False,
        timeout: Timeout | None = None,
    ) -> JSON:
        """PATCH: `merge` (RFC 7386), `strategic`, `json` (RFC 6902, a list of ops) or `apply` (server-side)."""
        _need_namespace(resource, namespace)
        if patch_type not in _PATCH_CONTENT_TYPES:
            raise ValueError(f"unknown patch type {patch_type!r}; use one of {sorted(_PATCH_CONTENT_TYPES)}")
        if patch_type == "json" and not isinstance(patch, Sequence):
            raise ValueError("a JSON patch is a list of operations")
        if patch_type != "json" and not isinstance(patch, Mapping):
            raise ValueError(f"a {patch_type} patch is an object")
        query: dict[str, Any] = {"fieldManager": field_manager or self.field_manager}
        if patch_type == "apply":
            query["force"] = "true" if force else None
        elif force:
            raise ValueError("force only applies to server-side apply")
        body = list(patch) if isinstance(patch, Sequence) else dict(patch)
        return self.request(
            "PATCH", resource.path(namespace, name, subresource), query=query, body=body,
            content_type=_PATCH_CONTENT_TYPES[patch_type], timeout=timeout,
        )  # fmt: skip

    def apply(
        self, resource: Resource, body: Mapping[str, Any], namespace: str | None = None, *,
        subresource: str | None = None, field_manager: str | None = None, force: bool = True,
        timeout: Timeout | None = None,
    ) -> JSON:  # fmt: skip
        """Server-side apply of a (partial) object that names itself in `metadata.name`."""
        meta = body.get("metadata") or {}
        namespace = namespace or meta.get("namespace")
        name = meta.get("name")
        if not name:
            raise ValueError(f"apply of {resource.plural} needs metadata.name")
        return self.patch(
            resource, name, _with_type(resource, body), namespace, patch_type="apply", subresource=subresource,
            field_manager=field_manager, force=force, timeout=timeout,
        )  # fmt: skip

    def delete(
        self,
        resource: Resource,
        name: str,
        namespace: str | None = None,
        *,
        propagation_policy: Literal["Foreground", "Background", "Orphan"] | None = None,
        grace_period_seconds: int | None = None,
        uid: str | None = None,
        resource_version: str | None = None,
        ignore_not_found: bool = False,
        timeout: Timeout | None = None,
    ) -> JSON | None:
        """DELETE, optionally only if the uid/resourceVersion still match (preconditions)."""
        _need_namespace(resource, namespace)
        options: JSON = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if propagation_policy:
            options["propagationPolicy"] = propagation_policy
        if grace_period_seconds is not None:
            options["gracePeriodSeconds"] = grace_period_seconds
        if uid or resource_version:
            options["preconditions"] = {k: v for k, v in (("uid", uid), ("resourceVersion", resource_version)) if v}
        try:
            return self.request("DELETE", resource.path(namespace, name), body=options, timeout=timeout)
        except ApiError as exc:
            if ignore_not_found and exc.not_found:
                return None
            raise

    # --- subresources ---------------------------------------------------------------------------

    def patch_status(
        self, resource: Resource, name: str, status: Mapping[str, Any], namespace: str | None = None, *,
        patch_type: PatchType = "merge", timeout: Timeout | None = None,
    ) -> JSON:  # fmt: skip
        """Merge `status` into the status subresource (`{"status": status}`)."""
        body: Any = {"status": dict(status)}
        if patch_type == "apply":
            body = {"apiVersion": resource.api_version, "kind": resource.kind, "metadata": {"name": name}, **body}
        return self.patch(
            resource, name, body, namespace, patch_type=patch_type, subresource="status",
            force=patch_type == "apply", timeout=timeout,
        )  # fmt: skip

    def replace_status(self, resource: Resource, body: Mapping[str, Any], namespace: str | None = None) -> JSON:
        """PUT the status subresource (the whole object; only `status` is taken; 409 on a stale version)."""
        return self.replace(resource, body, namespace, subresource="status")

    def get_scale(self, resource: Resource, name: str, namespace: str | None = None) -> JSON:
        """The `autoscaling/v1` Scale: `spec.replicas`, `status.replicas`, `status.selector` (a string)."""
        return self.get(resource, name, namespace, subresource="scale")

    def set_scale(self, resource: Resource, name: str, replicas: int, namespace: str | None = None) -> JSON:
        """Set `spec.replicas` through the scale subresource (works for any scalable kind)."""
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        return self.patch(resource, name, {"spec": {"replicas": replicas}}, namespace, subresource="scale")

    # --- discovery ------------------------------------------------------------------------------

    def resource_for(self, api_version: str, kind: str) -> Resource:
        """The Resource for an (apiVersion, kind), e.g. a scaleTargetRef, by API discovery (cached)."""
        key = (api_version, kind)
        with self._kinds_lock:
            known = self._kinds.get(key)
        if known is not None:
            return known
        if not api_version or not kind:
            raise ValueError(f"need both apiVersion and kind, got {api_version!r} {kind!r}")
        group, _, version = api_version.rpartition("/")
        path = f"/apis/{api_version}" if group else f"/api/{version}"
        doc = self.request("GET", path)
        found: Resource | None = None
        for entry in (doc or {}).get("resources") or ():
            if entry.get("kind") == kind and "/" not in str(entry.get("name", "")):
                found = Resource(group, version, str(entry["name"]), bool(entry.get("namespaced")), kind)
                break
        if found is None:
            raise ApiError(404, "NotFound", f"no resource of kind {kind!r} in {api_version}", method="GET", path=path)
        with self._kinds_lock:
            self._kinds[key] = found
        return found


def _query_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _need_namespace(resource: Resource, namespace: str | None) -> None:
    if resource.namespaced and not namespace:
        raise ValueError(f"{resource.plural} is namespaced: a namespace is required")


def _with_type(resource: Resource, body: Mapping[str, Any]) -> JSON:
    out = dict(body)
    out.setdefault("apiVersion", resource.api_version)
    if resource.kind:
        out.setdefault("kind", resource.kind)
    return out


def object_key(obj: Mapping[str, Any]) -> str:
    """`namespace/name`, or `name` for cluster-scoped objects (client-go's MetaNamespaceKeyFunc)."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    name = meta.get("name") or ""
    return f"{ns}/{name}" if ns else str(name)


def split_key(key: str) -> tuple[str | None, str]:
    """The inverse of `object_key`: (namespace or None, name)."""
    ns, sep, name = key.partition("/")
    return (ns, name) if sep else (None, ns)
