"""The router's upstream HTTP/1.1 client against a raw socket server that sends scripted bytes, split at
awkward places, so framing, reuse, flow control and timeouts are checked byte for byte."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from router.upstream import UpstreamError, UpstreamPool, serialise_head

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 30))


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


@asynccontextmanager
async def server(script: Script) -> AsyncIterator[tuple[str, list[int]]]:
    """A server running ``script`` per connection; yields its address and a list of connection numbers."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}", connections
    finally:
        srv.close()
        await srv.wait_closed()


def head(address: str, body: bytes = b"", method: str = "POST") -> bytes:
    return serialise_head(method, "/v1/completions", address, [(b"Content-Type", b"application/json")], len(body))


async def send_pieces(writer: asyncio.StreamWriter, data: bytes, sizes: list[int]) -> None:
    """Write ``data`` in pieces of the given sizes (the rest at the end), draining between them."""
    pos = 0
    for size in sizes:
        writer.write(data[pos : pos + size])
        await writer.drain()
        await asyncio.sleep(0.005)
        pos += size
    writer.write(data[pos:])
    await writer.drain()


def test_content_length_answers_reuse_one_connection_and_the_request_arrives_intact() -> None:
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            h, body = await read_request(reader)
            seen.append(h + body)
            answer = b'{"ok": true}'
            await send_pieces(
                writer,
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nX-A: b\r\n\r\n%s"
                % (len(answer), answer),
                [3, 20, 1],  # the head itself arrives in pieces
            )

    async def body() -> None:
        async with server(script) as (address, conns):
            pool = UpstreamPool()
            for i in range(3):
                payload = b'{"model": "m%d"}' % i
                resp = await pool.request(address, head(address, payload), payload, read_timeout=5, total_timeout=5)
                assert (resp.status, resp.content_length, resp.content_type) == (200, 12, "application/json")
                assert ("X-A", "b") in resp.headers
                assert await resp.read() == b'{"ok": true}'
                resp.release()
            assert len(conns) == 1  # keep-alive: one connection for three exchanges
            pool.close()
        assert seen[2] == (
            b"POST /v1/completions HTTP/1.1\r\nHost: " + address.encode() + b"\r\n"
            b'Content-Type: application/json\r\nContent-Length: 15\r\n\r\n{"model": "m2"}'
        )

    run(body)


def test_chunked_answers_arrive_piece_by_piece_with_extensions_and_trailers() -> None:
    gate = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"6;ext=1\r\ndata: \r\n")
        await writer.drain()
        await asyncio.wait_for(gate.wait(), 5)
        await send_pieces(writer, b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n", [1, 2, 4, 3, 1])

    async def body() -> None:
        async with server(script) as (address, _):
            pool = UpstreamPool()
            resp = await pool.request(address, head(address), b"", read_timeout=5, total_timeout=5)
            assert resp.content_length is None and resp.chunked
            pieces = resp.iter_chunks()
            assert await anext(pieces) == b"data: "  # before the server sends the rest
            gate.set()
            rest = [p async for p in pieces]
            assert b"".join(rest) == b"abc"
            resp.release()
            assert len(pool._idle[address]) == 1  # fully read: back in the pool
            pool.close()

    run(body)


def test_answers_without_length_end_at_close_and_are_not_reused() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await send_pieces(writer, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it", [30])

    async def body() -> None:
        async with server(script) as (address, conns):
            pool = UpstreamPool()
            for _ in range(2):
                resp = await pool.request(address, head(address), b"", read_timeout=5, total_timeout=5)
                assert await resp.read() == b"all of it"
                resp.release()
            assert len(conns) == 2
            pool.close()

    run(body)


def test_a_slow_reader_pauses_the_upstream() -> None:
    big = b"x" * (1024 * 1024)
    sent = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (8 * len(big)))
        for _ in range(8):
            writer.write(big)
            await writer.drain()
        sent.set()

    async def body() -> None:
        async with server(script) as (address, _):
            pool = UpstreamPool()
            resp = await pool.request(address, head(address), b"", read_timeout=5, total_timeout=10)
            await asyncio.sleep(0.3)
            assert not sent.is_set()  # 8 MiB cannot all be in flight: the reader is paused
            conn = resp._conn
            assert conn.paused and conn.queued <= 512 * 1024
            total = 0
            async for piece in resp.iter_chunks():
                total += len(piece)
            assert total == 8 * len(big) and sent.is_set()
            resp.release()
            pool.close()

    run(body)


def test_failures_are_classified() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async def hangup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def midway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly some")
        await writer.drain()

    async def body() -> None:
        pool = UpstreamPool(connect_timeout=1)
        with pytest.raises(UpstreamError) as info:
            await pool.request("127.0.0.1:1", b"GET / HTTP/1.1\r\n\r\n", b"", read_timeout=1, total_timeout=1)
        assert info.value.kind == "connect" and info.value.before_response
        async with server(silent) as (address, _):
            with pytest.raises(UpstreamError) as info:
                await pool.request(address, head(address), b"", read_timeout=0.2, total_timeout=5)
            assert info.value.kind == "timeout"
            with pytest.raises(UpstreamError) as info:
                await pool.request(address, head(address), b"", read_timeout=5, total_timeout=0.2)
            assert info.value.kind == "total_timeout"
        async with server(hangup) as (address, _):
            with pytest.raises(UpstreamError) as info:
                await pool.request(address, head(address), b"", read_timeout=5, total_timeout=5)
            assert info.value.kind == "disconnected" and info.value.before_response
        async with server(garbage) as (address, _):
            with pytest.raises(UpstreamError) as info:
                await pool.request(address, head(address), b"", read_timeout=5, total_timeout=5)
            assert info.value.kind == "protocol"
        async with server(midway) as (address, _):
            resp = await pool.request(address, head(address), b"", read_timeout=5, total_timeout=5)
            with pytest.raises(UpstreamError) as info:
                await resp.read()
            assert info.value.kind == "disconnected" and not info.value.before_response
            resp.close()
        pool.close()

    run(body)


def test_head_and_no_content_answers_have_no_body() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            h, _ = await read_request(reader)
            if h.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()

    async def body() -> None:
        async with server(script) as (address, conns):
            pool = UpstreamPool()
            resp = await pool.request(
                address, head(address, method="HEAD"), b"", is_head=True, read_timeout=5, total_timeout=5
            )
            assert resp.status == 200 and await resp.read() == b""
            resp.release()
            resp = await pool.request(address, head(address), b"", read_timeout=5, total_timeout=5)
            assert resp.status == 204 and await resp.read() == b""
            resp.release()
            assert len(conns) == 1
            pool.close()

    run(body)


@pytest.mark.parametrize("seed", range(6))
def test_a_chunked_body_split_anywhere_arrives_whole_and_the_connection_is_reused(seed: int) -> None:
    """The parser keeps its place across reads, wherever a read ends (inside a size line, data or CRLF)."""
    rng = random.Random(seed)
    chunks = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(25)]
    framed = b"".join(b"%x%s\r\n%s\r\n" % (len(c), b";x=y" if i % 7 == 0 else b"", c) for i, c in enumerate(chunks))
    framed += b"0\r\nX-Trailer: t\r\n\r\n"
    cuts = sorted(rng.sample(range(1, len(framed)), 40))
    sizes = [b - a for a, b in zip([0, *cuts], cuts, strict=False)]
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)
            await send_pieces(writer, answer, [s for s in sizes if s] if _ == 0 else [])

    async def body() -> None:
        async with server(script) as (address, connections):
            pool = UpstreamPool()
            for _ in range(2):
                resp = await pool.request(address, head(address), b"", read_timeout=5, total_timeout=5)
                assert await resp.read() == b"".join(chunks)
                resp.release()
            assert connections == [0]  # the second answer came on the same connection
            pool.close()

    run(body)


@pytest.mark.parametrize("size_line", [b"-5", b"zz", b"1 2"])
def test_a_bad_chunk_size_is_a_protocol_error(size_line: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size_line + b"\r\nabcde\r\n0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def body() -> None:
        async with server(script) as (address, _):
            pool = UpstreamPool()
            resp = await pool.request(address, head(address), b"", read_timeout=5, total_timeout=5)
            with pytest.raises(UpstreamError) as caught:
                await resp.read()
            assert caught.value.kind == "protocol" and "bad chunk size" in str(caught.value)
            pool.close()

    run(body)


def test_the_read_timeout_counts_from_the_last_bytes_not_from_the_request() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(8):  # 0.8 s in all, never 0.3 s without a byte
            await asyncio.sleep(0.1)
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
        await asyncio.sleep(2)  # now silent for longer than the read timeout

    async def body() -> None:
        async with server(script) as (address, _):
            pool = UpstreamPool()
            resp = await pool.request(address, head(address), b"", read_timeout=0.3, total_timeout=10)
            got = b""
            with pytest.raises(UpstreamError) as caught:
                while (piece := await resp.next_chunk()) is not None:
                    got += piece
            assert got == b"x" * 8
            assert caught.value.kind == "timeout" and "sent nothing for 0.3s" in str(caught.value)
            pool.close()

    run(body)
