"""A TCP proxy that makes loopback storage look like a consumer node's connection to Azure.

One listening port per upstream (Azurite's blob and queue ports each get a ``LatencyProxy``). Every
connection is relayed through two delay lines, one per direction: a reader task stamps each chunk with
the time it may be delivered and a writer task sleeps until then, so a 450 KB upload pays the latency
once plus its transfer time, not the latency per chunk.

* client -> server (the node's uplink): delivery = max(now, link free) + transfer time + latency/2.
  The transfer time comes from ONE ``Link`` shared by every connection of every proxy that holds it:
  a home uplink carries the blob uploads and the queue calls together. Each connection keeps at
  most about one chunk reserved on the link ahead of time (its reader waits until its chunk has
  left), so concurrent connections share the link roughly fairly, like TCP flows through a short
  router queue, and a queue call is not stuck behind megabytes of uploads.
* server -> client: latency/2 only (downloads are small and the downlink is not the bottleneck).

``latency`` is therefore the round trip added to every request. A new connection also waits one
round trip before its first byte moves (the TCP handshake). EOF is passed on as a half-close after the
data in flight; a reset on either side aborts both.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType

CHUNK = 32 * 1024
# how far ahead of "now" one connection may keep link time reserved: covers timer overshoot, so a
# lone connection still uses the whole link
AHEAD = 0.004
LINE_CHUNKS = 256  # chunks buffered in one direction's delay line at most (backpressure beyond)
CLOSE_TIMEOUT = 5.0


@dataclass
class Link:
    """A shared bottleneck link: one "free at" time for every connection that uses it.

    ``bits_per_second`` 0 (or less) means unlimited. ``busy_seconds`` adds up transfer times, for
    the link's utilisation.
    """

    bits_per_second: float = 0.0
    free_at: float = 0.0
    busy_seconds: float = 0.0
    bytes_sent: int = 0

    def reserve(self, size: int, now: float) -> float:
        """Put ``size`` bytes on the link; the time (loop clock) when its last bit has left."""
        self.bytes_sent += size
        if self.bits_per_second <= 0:
            return now
        seconds = size * 8 / self.bits_per_second
        self.free_at = max(now, self.free_at) + seconds
        self.busy_seconds += seconds
        return self.free_at


@dataclass
class ProxyStats:
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class LatencyProxy:
    """Listens on ``listen_host:listen_port`` (0: a free port), relays to ``upstream_host:upstream_port``."""

    upstream_host: str
    upstream_port: int
    latency: float = 0.0
    link: Link = field(default_factory=Link)
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    connect_delay: float | None = None  # default: one round trip (``latency``)
    stats: ProxyStats = field(default_factory=ProxyStats)
    _server: asyncio.Server | None = field(default=None, init=False, repr=False)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the proxy is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.listen_port)

    async def close(self) -> None:
        """Stop listening and cut every relayed connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> LatencyProxy:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    # -- one connection ---------------------------------------------------------------------------

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.stats.connections += 1
        try:
            await self._connection(client_reader, client_writer)
        finally:
            self._handlers.discard(task)

    async def _connection(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        upstream_writer: asyncio.StreamWriter | None = None
        clean = False
        try:
            delay = self.latency if self.connect_delay is None else self.connect_delay
            if delay > 0:
                await asyncio.sleep(delay)  # the TCP handshake's round trip
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                return
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._relay(client_reader, upstream_writer, self.link, up=True))
                    group.create_task(self._relay(upstream_reader, client_writer, None, up=False))
                clean = True
            except* (OSError, RuntimeError):
                pass  # a reset, or a write after the peer went away: both sides are cut below
        finally:
            writers = [w for w in (client_writer, upstream_writer) if w is not None]
            for writer in writers:
                if clean:
                    writer.close()  # both directions ended with EOF and were drained
                else:
                    writer.transport.abort()  # nothing left worth flushing to a peer that may not read
            for writer in writers:
                with contextlib.suppress(OSError, RuntimeError, TimeoutError):
                    await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)

    async def _relay(
        self, source: asyncio.StreamReader, target: asyncio.StreamWriter, link: Link | None, *, up: bool
    ) -> None:
        """One direction: a reader stamps chunks with their delivery time, a writer delivers them then."""
        loop = asyncio.get_running_loop()
        one_way = self.latency / 2
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(LINE_CHUNKS)

        async def read() -> None:
            last = 0.0
            while True:
                data = await source.read(CHUNK)
                now = loop.time()
                departs = link.reserve(len(data), now) if link is not None else now
                last = max(last, departs + one_way)
                await line.put((last, data))
                if not data:
                    return
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                # backpressure and fair sharing: the next chunk is read once this one is (almost) sent
                if departs - now > AHEAD:
                    await asyncio.sleep(departs - now - AHEAD)

        async def deliver() -> None:
            while True:
                when, data = await line.get()
                wait = when - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if target.can_write_eof() and not target.is_closing():
                        target.write_eof()
                    return
                target.write(data)
                await target.drain()

        async with asyncio.TaskGroup() as group:
            group.create_task(read())
            group.create_task(deliver())


@dataclass
class StorageProxies:
    """The blob and the queue proxy in front of one Azurite, sharing one uplink."""

    blob: LatencyProxy
    queue: LatencyProxy
    link: Link


@contextlib.asynccontextmanager
async def storage_proxies(
    blob_port: int, queue_port: int, latency: float, bits_per_second: float, host: str = "127.0.0.1"
) -> AsyncIterator[StorageProxies]:
    """Proxies for Azurite's blob and queue ports with ``latency`` (round trip) and a shared uplink."""
    link = Link(bits_per_second)
    blob = LatencyProxy(host, blob_port, latency, link)
    queue = LatencyProxy(host, queue_port, latency, link)
    async with blob, queue:
        yield StorageProxies(blob, queue, link)
