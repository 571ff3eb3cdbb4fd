"""A lean HTTP/1.1 client for the router's upstream requests: keep-alive connections per pod.

Why not aiohttp's client: on one core its per-request cost (about 240 us measured here) was most of the
router's budget. The router needs far less than a general client: one request at a time per connection,
bodies it already holds as bytes, answers framed by Content-Length, chunked encoding or connection close,
and the body either whole or piece by piece as it arrives. This module does exactly that on an
asyncio.Protocol, with flow control (reading pauses while a slow consumer has 256 KiB unread) and three
timeouts: connect, first byte (also the longest gap between two body pieces) and total.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import cast

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
_MAX_HEAD = 64 * 1024

# Parser phases.
_HEAD = 0
_LENGTH = 1
_CHUNK_SIZE = 2
_CHUNK_DATA = 3
_CHUNK_CRLF = 4
_TRAILERS = 5
_UNTIL_EOF = 6
_DONE = 7


class UpstreamError(Exception):
    """An upstream exchange that failed. ``kind``: connect, connect_timeout, disconnected, timeout,
    total_timeout or protocol; ``before_response``: nothing of the answer had arrived yet."""

    def __init__(self, kind: str, message: str, *, before_response: bool) -> None:
        super().__init__(message)
        self.kind = kind
        self.before_response = before_response


class UpstreamResponse:
    """The head of an answer, and its body to read whole (``read``) or piece by piece (``iter_chunks``)."""

    __slots__ = ("_conn", "chunked", "content_length", "content_type", "headers", "reason", "status")

    def __init__(self, conn: _Connection, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        self._conn = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length: int | None = None
        self.chunked = conn.chunked
        self.content_type = conn.content_type

    async def read(self) -> bytes:
        """The whole body."""
        conn = self._conn
        if conn.phase == _DONE and conn.error is None:  # usually all there with the head
            pieces = conn.pieces
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces.clear()
            conn.queued = 0
            return data
        parts: list[bytes] = []
        async for piece in self.iter_chunks():
            parts.append(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def next_chunk(self) -> Awaitable[bytes | None]:
        """The next body piece as it arrives (chunked framing removed), or None at the end."""
        return self._conn.next_piece()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body pieces as they arrive (chunked framing removed)."""
        conn = self._conn
        while True:
            piece = await conn.next_piece()
            if piece is None:
                return
            yield piece

    def release(self) -> None:
        """Give the connection back for reuse when the answer was read to its end, else close it."""
        self._conn.finish()

    def close(self) -> None:
        """Drop the connection now (the pod sees the request aborted)."""
        self._conn.abort()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time."""

    def __init__(self, pool: UpstreamPool, address: str) -> None:
        self.pool = pool
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.phase = _DONE
        self.length = 0
        self.chunked = False
        self.keep_alive = True
        self.content_type = ""
        self.no_body = False
        self.head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self.pieces: deque[bytes] = deque()
        self.queued = 0
        self.piece_waiter: asyncio.Future[None] | None = None
        self.error: UpstreamError | None = None
        self.closed = False
        self.paused = False
        self.got_bytes = False
        self.read_timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._active_at = 0.0  # loop time of the last bytes from the pod (or of arming the read timer)
        self._total_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.phase == _UNTIL_EOF:
            self.phase = _DONE
            self._wake()
            return
        if self.phase != _DONE or self.head_waiter is not None:
            self._fail(
                UpstreamError(
                    "disconnected",
                    f"{self.address} closed the connection" + (f": {exc}" if exc else ""),
                    before_response=not self.got_bytes,
                )
            )

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self._active_at = self.pool.loop.time()
        self.buf += data
        try:
            self._parse()
        except UpstreamError as exc:
            self._fail(exc)
            self.abort()

    def pause_writing(self) -> None:  # request bodies are small; nothing to pause
        pass

    # --- the exchange -------------------------------------------------------------------------------------

    def send(self, data: bytes, is_head: bool, read_timeout: float) -> asyncio.Future[UpstreamResponse]:
        loop = self.pool.loop
        self.buf.clear()
        self.phase = _HEAD
        self.no_body = is_head
        self.pieces.clear()
        self.queued = 0
        self.error = None
        self.got_bytes = False
        self.read_timeout = read_timeout
        waiter: asyncio.Future[UpstreamResponse] = loop.create_future()
        self.head_waiter = waiter
        self._arm()
        assert self.transport is not None
        self.transport.write(data)
        return waiter

    def set_total_timeout(self, seconds: float) -> None:
        self._total_timer = self.pool.loop.call_later(seconds, self._total_expired, seconds)

    def _total_expired(self, seconds: float) -> None:
        self._total_timer = None
        if self.phase != _DONE or self.head_waiter is not None:
            self._fail(
                UpstreamError(
                    "total_timeout", f"{self.address} did not finish within {seconds:g}s", before_response=False
                )
            )
            self.abort()

    def _arm(self) -> None:
        """Start the read timer: it fires when the pod has sent nothing for ``read_timeout``.

        Bytes arriving only note the time; the timer, when it fires, re-arms itself for what is left.
        Re-arming on every chunk would cost a timer per chunk of every stream.
        """
        if self._timer is not None:
            self._timer.cancel()
        loop = self.pool.loop
        self._active_at = loop.time()
        self._timer = loop.call_later(self.read_timeout, self._expired)

    def _expired(self) -> None:
        loop = self.pool.loop
        left = self._active_at + self.read_timeout - loop.time()
        if left > 0:
            self._timer = loop.call_later(left, self._expired)
            return
        self._timer = None
        if self.head_waiter is not None:
            message = f"no answer from {self.address} within {self.read_timeout:g}s"
        else:
            message = f"{self.address} sent nothing for {self.read_timeout:g}s"
        self._fail(UpstreamError("timeout", message, before_response=False))
        self.abort()

    async def next_piece(self) -> bytes | None:
        while True:
            if self.pieces:
                piece = self.pieces.popleft()
                self.queued -= len(piece)
                if self.paused and self.queued <= _LOW_WATER and self.transport is not None:
                    self.paused = False
                    self.transport.resume_reading()
                return piece
            if self.error is not None:
                raise self.error
            if self.phase == _DONE:
                self._cancel_timers()
                return None
            waiter = self.pool.loop.create_future()
            self.piece_waiter = waiter
            if self._timer is None:
                self._arm()
            try:
                await waiter
            finally:
                self.piece_waiter = None

    def finish(self) -> None:
        self._cancel_timers()
        if self.phase == _DONE and self.error is None and self.keep_alive and not self.closed and not self.pieces:
            self.pool.put_back(self)
        else:
            self.abort()

    def abort(self) -> None:
        self._cancel_timers()
        self.closed = True
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()

    def _cancel_timers(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._total_timer is not None:
            self._total_timer.cancel()
            self._total_timer = None

    def _fail(self, exc: UpstreamError) -> None:
        if self.error is None:
            self.error = exc
        waiter = self.head_waiter
        if waiter is not None:
            self.head_waiter = None
            if not waiter.done():
                waiter.set_exception(exc)
        self._wake()

    def _wake(self) -> None:
        waiter = self.piece_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _emit(self, piece: bytes) -> None:
        self.pieces.append(piece)
        self.queued += len(piece)
        if self.queued > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    # --- parsing ------------------------------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self.buf
        if self.phase == _HEAD:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise UpstreamError("protocol", f"{self.address} sent a head over 64 KiB", before_response=False)
                return
            head = bytes(buf[:end])
            del buf[: end + 4]
            self._head(head)
        # One pass with an index and one deletion at the end: a streamed chunk usually arrives whole
        # (size line, data and CRLF in one read), and slicing the buffer at every step cost more than the
        # rest of relaying it.
        emitted: list[bytes] = []
        pos, n = 0, len(buf)
        while pos < n:
            phase = self.phase
            if phase == _CHUNK_SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > 4096:
                        raise UpstreamError("protocol", f"{self.address}: bad chunk size line", before_response=False)
                    break
                line = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
                pos = eol + 2
                try:
                    size = int(line, 16)
                except ValueError:
                    raise UpstreamError(
                        "protocol", f"{self.address}: bad chunk size {line[:20]!r}", before_response=False
                    ) from None
                if size < 0:
                    raise UpstreamError("protocol", f"{self.address}: bad chunk size {line[:20]!r}",
                                        before_response=False)
                if size == 0:
                    self.phase = _TRAILERS
                else:
                    self.length = size
                    self.phase = _CHUNK_DATA
            elif phase in (_CHUNK_DATA, _LENGTH):
                take = min(self.length, n - pos)
                emitted.append(bytes(buf[pos : pos + take]))
                pos += take
                self.length -= take
                if self.length == 0:
                    self.phase = _CHUNK_CRLF if phase == _CHUNK_DATA else _DONE
            elif phase == _CHUNK_CRLF:
                if n - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise UpstreamError(
                        "protocol", f"{self.address}: chunk not followed by CRLF", before_response=False
                    )
                pos += 2
                self.phase = _CHUNK_SIZE
            elif phase == _UNTIL_EOF:
                emitted.append(bytes(buf[pos:]))
                pos = n
            elif phase == _TRAILERS:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                if eol == pos:
                    self.phase = _DONE
                pos = eol + 2
            else:  # _DONE: bytes after the end of an answer
                self.keep_alive = False
                pos = n
        del buf[:pos]
        if emitted:
            self._emit(emitted[0] if len(emitted) == 1 else b"".join(emitted))
        if emitted or self.phase == _DONE:
            self._wake()

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status_line = lines[0]
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise UpstreamError(
                "protocol", f"{self.address} did not answer HTTP/1.x: {status_line[:40]!r}", before_response=False
            )
        status = int(parts[1])
        reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        keep_alive = parts[0] == b"HTTP/1.1"
        length = -1
        chunked = False
        content_type = ""
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name_b, colon, value_b = line.partition(b":")
            if not colon or not name_b:
                raise UpstreamError("protocol", f"{self.address} sent a bad header line", before_response=False)
            name = name_b.decode("latin-1")
            value = value_b.strip().decode("latin-1")
            headers.append((name, value))
            first = name_b[0] | 0x20  # lower-case the first letter: most headers need no closer look
            if first == 0x63:  # "c"
                lower = name_b.lower()
                if lower == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        raise UpstreamError(
                            "protocol", f"{self.address}: bad Content-Length {value!r}", before_response=False
                        ) from None
                elif lower == b"connection":
                    v = value.lower()
                    if "close" in v:
                        keep_alive = False
                    elif "keep-alive" in v:
                        keep_alive = True
                elif lower == b"content-type":
                    content_type = value
            elif first == 0x74 and name_b.lower() == b"transfer-encoding":  # "t"
                chunked = "chunked" in value.lower()
        self.keep_alive = keep_alive
        self.chunked = chunked
        self.content_type = content_type
        if self.no_body or status in (204, 304) or 100 <= status < 200:
            self.phase = _DONE
            self.length = 0
        elif chunked:
            self.phase = _CHUNK_SIZE
        elif length >= 0:
            self.length = length
            self.phase = _LENGTH if length else _DONE
        else:
            self.phase = _UNTIL_EOF
            self.keep_alive = False
        response = UpstreamResponse(self, status, reason, headers)
        if self.phase == _LENGTH or length == 0:
            response.content_length = length
        self._cancel_read_timer()
        waiter = self.head_waiter
        self.head_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def _cancel_read_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class UpstreamPool:
    """Idle keep-alive connections per pod address, reused most-recent first."""

    def __init__(self, *, connect_timeout: float = 5.0, max_idle_per_address: int = 512) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle_per_address
        self._idle: dict[str, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def request(
        self,
        address: str,
        head: bytes,
        body: bytes,
        *,
        is_head: bool = False,
        read_timeout: float,
        total_timeout: float,
    ) -> UpstreamResponse:
        """Send one request (``head`` already serialised, ending with the blank line) and wait for the head
        of its answer; the caller must ``release()`` or ``close()`` the response."""
        conn = await self._acquire(address)
        conn.set_total_timeout(total_timeout)
        try:
            return await conn.send(head + body if body else head, is_head, read_timeout)
        except BaseException:
            conn.abort()
            raise

    async def _acquire(self, address: str) -> _Connection:
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        loop = self.loop
        factory: Callable[[], _Connection] = functools.partial(_Connection, self, address)
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(factory, host, int(port))
        except TimeoutError:
            raise UpstreamError(
                "connect_timeout", f"could not connect to {address} within {self.connect_timeout:g}s",
                before_response=True,
            ) from None  # fmt: skip
        except OSError as exc:
            raise UpstreamError("connect", f"could not connect to {address}: {exc}", before_response=True) from None
        self._all.add(proto)
        return proto

    def put_back(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.address, [])
        if len(idle) < self.max_idle:
            idle.append(conn)
        else:
            conn.abort()

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.address)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        """Close every connection (in-flight exchanges fail with ``disconnected``)."""
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
        self._all.clear()


def serialise_head(
    method: str, path_qs: str, address: str, headers: Sequence[tuple[bytes, bytes]], length: int
) -> bytes:
    """The request line and headers; ``headers`` must already exclude hop-by-hop ones and Content-Length."""
    parts = [f"{method} {path_qs} HTTP/1.1\r\nHost: {address}\r\n".encode("latin-1")]
    for name, value in headers:
        parts.append(name + b": " + value + b"\r\n")
    if length or method in ("POST", "PUT", "PATCH"):
        parts.append(b"Content-Length: %d\r\n" % length)
    parts.append(b"\r\n")
    return b"".join(parts)
