"""The OpenAI-compatible reverse proxy: read ``model``, choose a holder, relay the answer.

The request path is kept short because it is the router's whole cost: the body is read once, parsed once
with orjson only to find ``model``, and forwarded as the same bytes; the choice is an in-memory lookup and
a few arithmetic operations; counts are dict updates. Streams are relayed chunk by chunk as they arrive,
draining the client connection after each chunk, so a slow client slows its upstream instead of filling
the router's memory.

Failure rules: a connection failure before anything reached the client is retried once on another holder
(so is a pod that answers "model does not exist" because its route went stale); every other failure is a
clear OpenAI-style error (502 unreachable, 503 no holder, 504 timeout), and a stream that breaks after it
started ends with an error event. Nothing is dropped silently: each outcome is counted by status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from router.accounting import Accounting
from router.errors import error_body, sse_error_event
from router.metrics import RouterMetrics
from router.routes import Holder, Route, RouteTable
from router.strategies import Strategy, move_target, saturated
from router.upstream import UpstreamError, UpstreamPool, UpstreamResponse, serialise_head

T = TypeVar("T")

log = logging.getLogger("router.proxy")

# Paths whose JSON body names the model; the first two are the ones the product is built around.
MODEL_PATHS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/tokenize",
    "/detokenize",
)
# Read-only paths that any ready pod answers the same way.
ANY_POD_PATHS = ("/version",)

# Not forwarded either way: connection-level headers, and those the router sets itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)
_HOP_BY_HOP_BYTES = frozenset(h.encode() for h in _HOP_BY_HOP)
_RESPONSE_SKIP = _HOP_BY_HOP | {"server", "date"}
_AUTHORIZATION = b"authorization"
_FORWARDED_FOR = b"x-forwarded-for"
_JSON_HEADERS = {"Content-Type": "application/json"}
_STALE_ROUTE_MARK = b"does not exist"


class BadRequest(ValueError):
    """The client's request cannot be routed as sent (400, with the field at fault in ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def extract_model(body: bytes) -> str:
    """The ``model`` named by a JSON request body; BadRequest says precisely what is wrong otherwise."""
    if not body:
        raise BadRequest("the request body is empty; expected a JSON object with a 'model' field")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(doc).__name__}")
    model = doc.get("model")
    if model is None:
        raise BadRequest("the request body has no 'model' field", param="model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string", param="model")
    return model


def json_error(status: int, message: str, param: str | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(status, message, param), headers=_JSON_HEADERS)


@dataclass
class RouterConfig:
    """Timeouts, limits and the optional upstream key (never logged)."""

    connect_timeout: float = 5.0
    first_byte_timeout: float = 300.0
    """Also bounds the gap between two chunks of a stream (the socket read timeout)."""
    total_timeout: float = 1800.0
    queue_timeout: float = 10.0
    """How long a request for a known model waits in the router for a holder to appear."""
    max_body_bytes: int = 16 * 1024 * 1024
    api_key: str | None = None
    owned_by: str = "lora-router"
    move_deferred_after: float = 0.0
    """Seconds a request may wait without its first byte on a pod where its adapter has no LoRA slot before
    it is sent to a holder where the adapter would start at once (0: never moved)."""
    move_check_interval: float = 0.25
    """How often a request past ``move_deferred_after`` checks again whether it can be moved."""
    max_loras: int | None = None
    """vLLM's ``--max-loras`` of pods not scraped yet (for the move check)."""
    queue_bound: float = 8.0
    """Requests waiting for capacity above which a pod is no place to move a request to."""
    hold_for_slot: float = 0.0
    """Seconds a request for an adapter may wait in the router when every holder is saturated for it (its
    LoRA budget taken by other adapters, or its queue above ``queue_bound``), to go to the first holder that
    is not (oldest request first), before it is sent to the best of them anyway (0: sent at once, to wait
    on that pod)."""


class _Attempt:
    """How one upstream attempt ended when it did not produce an answer to relay."""

    __slots__ = ("kind", "message", "retry", "status", "target")

    def __init__(self, kind: str, status: int, message: str, retry: bool, target: Holder | None = None) -> None:
        self.kind = kind
        self.status = status
        self.message = message
        self.retry = retry
        self.target = target
        """Where to send the request next (a request moved off a pod where its adapter waits for a slot)."""


class _SlotWait:
    """A request held in the router until one of its adapter's holders is not saturated for it."""

    __slots__ = ("future", "model", "seq")

    def __init__(self, model: str, seq: int, future: asyncio.Future[Holder]) -> None:
        self.model = model
        self.seq = seq
        self.future = future
        """Set to the holder granted (already counted as started there)."""


class _Moved(Exception):
    """The request waited for a LoRA slot too long and leaves for ``target``."""

    def __init__(self, target: Holder) -> None:
        super().__init__(target.pod)
        self.target = target


class Router:
    """The proxy: an aiohttp application over a RouteTable, a Strategy and an Accounting."""

    def __init__(
        self,
        table: RouteTable,
        strategy: Strategy,
        config: RouterConfig | None = None,
        accounting: Accounting | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.table = table
        self.strategy = strategy
        self.config = config or RouterConfig()
        self.accounting = accounting or Accounting()
        self.metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self.pool = UpstreamPool(connect_timeout=self.config.connect_timeout)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seq = 0
        self._changed = asyncio.Event()
        self._slot_waiters: deque[_SlotWait] = deque()
        self._models_cache: tuple[int, bytes] = (-1, b"")
        self._auth = f"Bearer {self.config.api_key}".encode("latin-1") if self.config.api_key else None
        table.add_listener(self._on_table_change)

    # --- lifecycle ----------------------------------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        """A general client for background work (scraping); requests go through ``pool``."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30.0, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
            )
        return self._session

    async def close(self) -> None:
        self.pool.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def make_app(self) -> web.Application:
        """The client-facing application (OpenAI paths and the router's own health)."""
        app = web.Application(client_max_size=self.config.max_body_bytes)
        for path in MODEL_PATHS:
            app.router.add_post(path, self.handle_model_request)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/v1/models/{model:.+}", self.handle_model_info)
        app.router.add_get("/health", self.handle_health)
        for path in ANY_POD_PATHS:
            app.router.add_get(path, self.handle_any_pod)
        app.router.add_route("*", "/{tail:.*}", self.handle_unknown_path)

        async def _close(_: web.Application) -> None:
            await self.close()

        app.on_cleanup.append(_close)
        return app

    def _on_table_change(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        self.grant_slots()

    # --- small handlers -----------------------------------------------------------------------------------

    async def handle_health(self, request: web.Request) -> web.Response:
        """200 once the route table has been loaded, so a readiness probe holds traffic until then."""
        if self.table.synced:
            return web.Response(text="ok\n")
        return json_error(503, "the route table has not been loaded yet")

    async def handle_unknown_path(self, request: web.Request) -> web.Response:
        served = ", ".join((*MODEL_PATHS, "/v1/models", *ANY_POD_PATHS, "/health"))
        return json_error(404, f"the router does not serve {request.method} {request.path}; it serves {served}")

    def _model_list(self) -> list[dict[str, Any]]:
        routes = self.table.routes()
        bases = [r.model for r in routes if r.is_base]
        parent = bases[0] if len(bases) == 1 else None
        return [
            {
                "id": r.model,
                "object": "model",
                "created": 0,
                "owned_by": self.config.owned_by,
                "root": r.model,
                "parent": None if r.is_base else parent,
            }
            for r in routes
            if r.holders
        ]

    async def handle_models(self, request: web.Request) -> web.Response:
        """The union of what is routable now: every model with at least one ready holder."""
        version, body = self._models_cache
        if version != self.table.version:
            body = orjson.dumps({"object": "list", "data": self._model_list()})
            self._models_cache = (self.table.version, body)
        return web.Response(body=body, headers=_JSON_HEADERS)

    async def handle_model_info(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        for entry in self._model_list():
            if entry["id"] == name:
                return web.Response(body=orjson.dumps(entry), headers=_JSON_HEADERS)
        return self._unknown_model(name)

    def _unknown_model(self, model: str) -> web.Response:
        served = [r.model for r in self.table.routes() if r.holders]
        listing = ", ".join(served) if served else "none"
        return json_error(404, f"The model `{model}` does not exist. Models served: {listing}.", "model")

    async def handle_any_pod(self, request: web.Request) -> web.StreamResponse:
        """Read-only paths every pod answers alike: go to any pod of a base model."""
        for route in self.table.routes():
            if route.is_base and route.holders:
                return await self._forward(request, route, b"", self._loop_time())
        return json_error(503, "no ready pod")

    # --- the request path ---------------------------------------------------------------------------------

    def _loop_time(self) -> float:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop.time()

    async def handle_model_request(self, request: web.Request) -> web.StreamResponse:
        """Route one OpenAI request by the ``model`` in its body."""
        t0 = self._loop_time()
        if request.content_type != "application/json":
            return json_error(400, f"Content-Type must be application/json, got {request.content_type or 'none'!r}")
        length = request.content_length
        limit = self.config.max_body_bytes
        if length is not None and length > limit:
            return json_error(413, f"the request body is {length} bytes; the limit is {limit}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, f"the request body exceeds the limit of {limit} bytes")
        try:
            model = extract_model(body)
        except BadRequest as exc:
            return json_error(400, str(exc), exc.param)
        route = self.table.lookup(model)
        if route is None or not route.holders:
            route = await self._wait_for_holder(model, route)
            if route is None:
                return self._unknown_model(model)
            if not route.holders:
                self.accounting.count_code(model, "", 503)
                return json_error(
                    503, f"no ready replica holds `{model}` (waited {self.config.queue_timeout:g}s)", "model"
                )
        return await self._forward(request, route, body, t0)

    async def _wait_for_holder(self, model: str, route: Route | None) -> Route | None:
        """Hold a request while its model is known but has no holder, or the table is still loading.

        An unknown model in a loaded table is answered at once (404); a known one waits in the router (and
        is counted as queued) until a holder appears or the queue timeout passes.
        """
        if route is None and self.table.synced:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.queue_timeout
        stats = self.accounting.model(model) if route is not None else None
        if stats is not None:
            stats.queued += 1
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return route
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
                route = self.table.lookup(model)
                if route is None and self.table.synced:
                    return None
                if route is not None and stats is None:
                    stats = self.accounting.model(model)
                    stats.queued += 1
                if route is not None and route.holders:
                    return route
        finally:
            if stats is not None:
                stats.queued -= 1

    def _upstream_headers(self, request: web.Request) -> list[tuple[bytes, bytes]]:
        """The client's headers as sent, less hop-by-hop ones; the pod key replaces the client's if set."""
        auth = self._auth
        prior = b""
        headers: list[tuple[bytes, bytes]] = []
        for name, value in request.raw_headers:
            lower = name.lower()
            if lower in _HOP_BY_HOP_BYTES:
                continue
            if lower == _FORWARDED_FOR:
                prior = value
                continue
            if auth is not None and lower == _AUTHORIZATION:
                continue
            headers.append((name, value))
        if auth is not None:
            headers.append((b"Authorization", auth))
        peer = request.remote
        if peer:
            headers.append((b"X-Forwarded-For", prior + b", " + peer.encode() if prior else peer.encode()))
        return headers

    async def _forward(self, request: web.Request, route: Route, body: bytes, t0: float) -> web.StreamResponse:
        """Send to a holder; on a failure before anything reached the client, retry once elsewhere."""
        model = route.model
        is_base = route.is_base
        acc = self.accounting
        headers = self._upstream_headers(request)
        method = request.method
        path_qs = request.path_qs
        self._seq += 1
        seq = self._seq
        tried: list[str] = []
        last: _Attempt | None = None
        retried = False  # one retry after a failure, one move off a pod that defers the request
        for attempt in range(3):
            if attempt:
                route = self.table.lookup(model) or route
            holders = route.holders
            if last is not None and last.target is not None:
                holder: Holder | None = last.target
            elif len(holders) == 1 and not tried:
                holder = holders[0]  # nothing to choose
            else:
                holder = self.strategy.choose(route, acc.pods, tried, seq)
            if holder is None and tried:
                holder = self.strategy.choose(route, acc.pods, (), seq)  # the only holder: try it again
            if holder is None:
                break
            started = False
            if (attempt == 0 and not is_base and self.config.hold_for_slot > 0 and self._saturated(model, holder)
                    and len(self._saturated_holders(route)) == len(holders)):
                granted = await self._hold_for_slot(model, seq)
                if granted is not None:
                    holder, started = granted, True
                else:  # held long enough: the best holder now, to wait there
                    route = self.table.lookup(model) or route
                    holder = self.strategy.choose(route, acc.pods, (), seq) or holder
            tried.append(holder.address)
            if not started:
                acc.start(model, holder.address, holder.pod, is_base)
            code = 0  # stays 0 for an attempt that is retried: only the answer the client gets is counted
            try:
                head = serialise_head(method, path_qs, holder.address, headers, len(body))
                outcome = await self._exchange(
                    request, holder, head, body, model=model, t0=t0, check_stale=not retried and not is_base,
                    route=route if attempt == 0 else None,
                )
                if isinstance(outcome, _Attempt):
                    last = outcome
                    if outcome.target is not None:
                        acc.count_move(model, holder.pod)
                        log.debug("moving a %s request waiting for a LoRA slot on %s to %s", model, holder.pod,
                                  outcome.target.pod)
                        continue
                    acc.count_error(model, holder.pod, outcome.kind)
                    if outcome.retry and not retried:
                        retried = True
                        log.info("retrying a %s request after %s on %s", model, outcome.kind, holder.pod)
                        continue
                    code = outcome.status
                    return json_error(outcome.status, outcome.message)
                response, code = outcome
                return response
            except asyncio.CancelledError:
                code = 499
                acc.count_error(model, holder.pod, "client_closed")
                raise
            finally:
                acc.finish(model, holder.address, is_base)
                if self._slot_waiters:
                    self.grant_slots()  # a LoRA slot or a place in the queue may be free now
                if code:
                    acc.count_code(model, holder.pod, code)
                    if self.metrics is not None and code != 499:
                        self.metrics.observe_total(model, holder.pod, self._loop_time() - t0)
        acc.count_code(model, "", 503 if last is None else last.status)
        if last is None:
            return json_error(503, f"no ready replica holds `{model}`", "model")
        return json_error(last.status, last.message)

    async def _hold_for_slot(self, model: str, seq: int) -> Holder | None:
        """Wait in the router, at most ``hold_for_slot`` seconds, until :meth:`grant_slots` gives this request
        a holder that is not saturated for ``model``; that holder is returned already counted as started.
        None: the time ran out first. Held requests count as queued for the model (the autoscaler's load)."""
        future: asyncio.Future[Holder] = asyncio.get_running_loop().create_future()
        waiter = _SlotWait(model, seq, future)
        self._slot_waiters.append(waiter)
        stats = self.accounting.model(model)
        stats.queued += 1
        try:
            await asyncio.wait((future,), timeout=self.config.hold_for_slot)
        except asyncio.CancelledError:
            if future.done():  # granted just as the client left: give the slot on
                self.accounting.finish(model, future.result().address)
                self.grant_slots()
            raise
        finally:
            stats.queued -= 1
            if not future.done():
                future.cancel()
                with contextlib.suppress(ValueError):
                    self._slot_waiters.remove(waiter)
        return future.result() if future.done() and not future.cancelled() else None

    def _saturated(self, model: str, holder: Holder) -> bool:
        c = self.config
        return saturated(model, self.accounting.pods.get(holder.address), default_max_loras=c.max_loras,
                         queue_bound=c.queue_bound)

    def _saturated_holders(self, route: Route) -> set[str]:
        """Addresses of ``route``'s holders that are saturated for its model (whatever the strategy)."""
        return {h.address for h in route.holders if self._saturated(route.model, h)}

    def grant_slots(self) -> None:
        """Send held requests, oldest first, to the holders the strategy chooses for them where those are not
        saturated for their adapter (each is counted as started there at once, so the next one sees the slot
        or the queue place taken). Called when a request ends, when the route table changes and after
        scrapes (queues, other senders' load)."""
        if not self._slot_waiters:
            return
        acc = self.accounting
        blocked: set[str] = set()  # sending only adds load, so a model with no place stays without one
        for waiter in list(self._slot_waiters):
            if waiter.model in blocked:
                continue
            route = self.table.lookup(waiter.model)
            full = self._saturated_holders(route) if route is not None else set()
            holder = None
            if route is not None and len(full) < len(route.holders):
                holder = self.strategy.choose(route, acc.pods, full, waiter.seq)  # among the others only
            if holder is None:
                blocked.add(waiter.model)
                continue
            self._slot_waiters.remove(waiter)
            acc.start(waiter.model, holder.address, holder.pod)
            waiter.future.set_result(holder)

    async def _exchange(
        self,
        request: web.Request,
        holder: Holder,
        head: bytes,
        body: bytes,
        *,
        model: str,
        t0: float,
        check_stale: bool,
        route: Route | None = None,
    ) -> tuple[web.StreamResponse, int] | _Attempt:
        """One upstream attempt: the relayed answer and the status to count for it, or how it failed while
        nothing reached the client (a 499 is a client that left, a 502 a stream that broke midway).

        With a ``route`` and ``move_deferred_after`` set, the attempt may instead end before anything reached
        the client because the request waited too long for a LoRA slot (an ``_Attempt`` with a target)."""
        pod = holder.pod
        c = self.config
        watch = route if route is not None and not route.is_base and c.move_deferred_after > 0 else None
        try:
            sent = self.pool.request(
                holder.address, head, body, is_head=request.method == "HEAD", read_timeout=c.first_byte_timeout,
                total_timeout=c.total_timeout,
            )  # fmt: skip
            resp = await (sent if watch is None else self._unless_starved(sent, watch, holder))
        except UpstreamError as exc:
            return self._failed_attempt(exc, pod)
        except _Moved as moved:
            return _Attempt("moved", 0, "", True, moved.target)
        try:
            status = resp.status
            is_sse = resp.content_type.startswith("text/event-stream")
            if resp.content_length is None or is_sse:
                first: bytes | None = None
                if watch is not None and status == 200:
                    # Nothing goes to the client before the first piece: until then the request may move.
                    try:
                        first = await self._unless_starved(resp.next_chunk(), watch, holder)
                    except _Moved as moved:
                        resp.close()
                        return _Attempt("moved", 0, "", True, moved.target)
                    if first is None:
                        first = b""
                outcome = await self._relay_stream(request, resp, model=model, pod=pod, t0=t0, is_sse=is_sse,
                                                   first=first)
                resp.release()
                return outcome
            data = await resp.read()
            resp.release()
        except UpstreamError as exc:
            resp.close()
            return self._failed_attempt(exc, pod)
        except BaseException:
            resp.close()
            raise
        if status == 404 and check_stale and _STALE_ROUTE_MARK in data:
            # The pod no longer holds the adapter though the table still lists it.
            return _Attempt("stale_route", 404, data.decode(errors="replace"), True)
        out = web.Response(status=status, body=data, headers=self._response_headers(resp))
        if self.metrics is not None:
            self.metrics.observe_first_byte(model, pod, self._loop_time() - t0)
        if status >= 500:
            self.accounting.count_error(model, pod, "upstream_5xx")
        return out, status

    async def _unless_starved(self, pending: Awaitable[T], route: Route, holder: Holder) -> T:
        """``pending``'s result, unless the request waits for a LoRA slot on ``holder`` past the configured
        time and another holder would start it at once: then ``pending`` is cancelled (the pod sees the
        request aborted) and ``_Moved`` names that holder."""
        task = asyncio.ensure_future(pending)
        c = self.config
        delay = c.move_deferred_after
        try:
            while True:
                done, _ = await asyncio.wait((task,), timeout=delay)
                if done:
                    return task.result()
                delay = c.move_check_interval
                current = self.table.lookup(route.model) or route
                target = move_target(current, self.accounting.pods, holder.address, default_max_loras=c.max_loras,
                                     queue_bound=c.queue_bound, seq=self._seq)
                if target is not None:
                    raise _Moved(target)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, UpstreamError):
                    await task

    def _failed_attempt(self, exc: UpstreamError, pod: str) -> _Attempt:
        kind = exc.kind
        if kind in ("timeout", "total_timeout"):
            return _Attempt(kind, 504, f"{pod}: {exc}", False)
        # Nothing reached the client yet: a connection failure may be retried elsewhere.
        return _Attempt(kind, 502, f"upstream {pod} failed: {exc}", kind != "protocol")

    @staticmethod
    def _response_headers(resp: UpstreamResponse) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in resp.headers:
            if name.lower() not in _RESPONSE_SKIP:
                headers.add(name, value)
        return headers

    async def _relay_stream(
        self, request: web.Request, resp: UpstreamResponse, *, model: str, pod: str, t0: float, is_sse: bool,
        first: bytes | None = None,
    ) -> tuple[web.StreamResponse, int]:
        """Pass a streamed answer through as it arrives; nothing is buffered beyond what one read brought.
        ``first``: the first piece, already read (``b""``: the stream ended before any)."""
        status = resp.status
        out = web.StreamResponse(status=status, headers=self._response_headers(resp))
        try:
            await out.prepare(request)
            writer = out._payload_writer  # its drain() waits only while the client's socket is full
            drain: Callable[[], Awaitable[None]] | None = getattr(writer, "drain", None)
            next_chunk = resp.next_chunk
            # b"" read ahead: the stream ended before its first piece.
            chunk = (first or None) if first is not None else await next_chunk()
            seen = False
            while chunk is not None:
                await out.write(chunk)
                if drain is not None:
                    await drain()
                if not seen:
                    seen = True
                    if self.metrics is not None:
                        self.metrics.observe_first_byte(model, pod, self._loop_time() - t0)
                chunk = await next_chunk()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            # The client went away: closing the upstream connection aborts the request on the pod.
            self.accounting.count_error(model, pod, "client_closed")
            resp.close()
            return out, 499
        except UpstreamError as exc:
            self.accounting.count_error(model, pod, "stream_broken")
            log.warning("stream of %s from %s broke after it started: %s", model, pod, exc)
            resp.close()
            if is_sse:
                with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
                    await out.write(sse_error_event(502, f"the stream from {pod} broke: {exc.kind}"))
            with contextlib.suppress(ConnectionError):
                await out.write_eof()
            return out, 502
        with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
            await out.write_eof()
        return out, status
