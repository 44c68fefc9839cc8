"""The latency/bandwidth proxy of the benchmark on real loopback sockets.

Only lower bounds (and very loose upper bounds) are asserted on timings: a slow machine makes the
proxy slower, never faster.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sidecar.dev.proxy import LatencyProxy, Link, storage_proxies

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
LOOSE = 5.0  # seconds of slack on any upper bound


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        await _close(writer)


async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads to EOF, then answers '<bytes> <sha256>' and closes."""
    digest, size = hashlib.sha256(), 0
    try:
        while data := await reader.read(65536):
            digest.update(data)
            size += len(data)
        writer.write(f"{size} {digest.hexdigest()}\n".encode())
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        await _close(writer)


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[int, asyncio.Queue[str]]]:
    """A server on a free loopback port; yields (port, a queue that gets "ended" per ended connection)."""
    tasks: set[asyncio.Task[None]] = set()
    events: asyncio.Queue[str] = asyncio.Queue()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        finally:
            events.put_nowait("ended")
            tasks.discard(task)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), events
    finally:
        server.close()
        await server.wait_closed()
        if tasks:
            await asyncio.wait(tasks, timeout=LOOSE)


async def send_all(port: int, payload: bytes) -> tuple[float, bytes]:
    """Send payload, half-close, read the whole answer: (seconds, answer)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        answer = await reader.read()
    finally:
        await _close(writer)
    return time.monotonic() - started, answer


async def test_bytes_pass_unchanged_both_ways() -> None:
    payload = os.urandom(300_000)
    async with serving(echo) as (port, _), LatencyProxy("127.0.0.1", port, latency=0.01) as proxy:
        _, answer = await send_all(proxy.port, payload)
    assert answer == payload
    assert proxy.stats.bytes_up == len(payload) and proxy.stats.bytes_down == len(payload)


async def test_small_request_waits_the_round_trip() -> None:
    latency = 0.1
    async with (
        serving(echo) as (port, _),
        LatencyProxy("127.0.0.1", port, latency=latency, connect_delay=0) as proxy,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            for _ in range(2):  # a kept-alive connection pays the latency on every request
                started = time.monotonic()
                writer.write(b"ping")
                await writer.drain()
                assert await reader.readexactly(4) == b"ping"
                elapsed = time.monotonic() - started
                assert latency * 0.95 <= elapsed < latency + LOOSE
        finally:
            await _close(writer)


async def test_a_new_connection_pays_the_handshake() -> None:
    latency = 0.1
    async with serving(echo) as (port, _), LatencyProxy("127.0.0.1", port, latency=latency) as proxy:
        elapsed, answer = await send_all(proxy.port, b"hello")
    assert answer == b"hello"
    assert 2 * latency * 0.95 <= elapsed < 2 * latency + LOOSE


async def test_upload_takes_its_transfer_time_and_latency_once() -> None:
    payload = os.urandom(1_000_000)
    link = Link(bits_per_second=8_000_000)  # 1 MB: 1.0 s on the wire
    async with (
        serving(sink) as (port, _),
        LatencyProxy("127.0.0.1", port, latency=0.05, link=link, connect_delay=0) as proxy,
    ):
        elapsed, answer = await send_all(proxy.port, payload)
    assert answer.decode().split() == [str(len(payload)), hashlib.sha256(payload).hexdigest()]
    assert 1.0 * 0.95 + 0.05 <= elapsed < 1.05 + LOOSE  # 32 KiB chunks, yet the latency counts once
    assert link.busy_seconds == pytest.approx(1.0)


async def test_connections_share_one_link() -> None:
    payloads = [os.urandom(500_000), os.urandom(500_000)]  # 0.5 s each alone
    async with (
        serving(sink) as (blob_port, _),
        serving(sink) as (queue_port, _),
        storage_proxies(blob_port, queue_port, latency=0.0, bits_per_second=8_000_000) as proxies,
    ):
        link = proxies.link
        results = await asyncio.gather(
            send_all(proxies.blob.port, payloads[0]), send_all(proxies.queue.port, payloads[1])
        )
    for (_, answer), payload in zip(results, payloads, strict=True):
        assert answer.decode().split() == [str(len(payload)), hashlib.sha256(payload).hexdigest()]
    times = sorted(elapsed for elapsed, _ in results)
    assert 0.95 <= times[1] < 1.0 + LOOSE  # together: at least the sum
    assert times[0] >= 0.6  # shared fairly, not one after the other (that would end the first at 0.5)
    assert link.bytes_sent == 1_000_000


async def test_client_close_reaches_the_server_and_close_cuts_the_rest() -> None:
    async with serving(echo) as (port, ended):
        proxy = LatencyProxy("127.0.0.1", port, latency=0.02)
        await proxy.start()
        listening = proxy.port
        try:
            # a client that goes away: the server sees its connection end
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            await _close(writer)
            assert await asyncio.wait_for(ended.get(), LOOSE) == "ended"

            # a connection still open when the proxy closes: cut on both sides
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"y")
            assert await reader.readexactly(1) == b"y"
        finally:
            await asyncio.wait_for(proxy.close(), LOOSE)
        try:
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), LOOSE) == b""
        finally:
            await _close(writer)
        assert await asyncio.wait_for(ended.get(), LOOSE) == "ended"
        with pytest.raises(OSError):  # no longer listening
            await asyncio.open_connection("127.0.0.1", listening)
