"""The control plane's front door: connection caps before any TLS work.

A connection is counted the moment it is accepted, by the address it comes from,
and refused (closed at once, nothing read) past the cap per peer or in total;
only an admitted one gets a TLS handshake (run by the event loop on the accepted
socket), which must finish within a deadline.
After it, aiohttp's handler takes over; its keep-alive timer (started when the
connection is handed over) bounds the time to a complete request head, and a
route reads its body only after its auth (app.py).

:class:`ConnectionLimits` is the decision (pure); :class:`Gate` the listener
that applies it (its own accept loop, then ``connect_accepted_socket``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable

__all__ = ["ConnectionLimits", "Gate"]

log = logging.getLogger("meshnode.controlplane")


class ConnectionLimits:
    """Open connections per peer address and in total, with their caps."""

    def __init__(self, per_peer: int, total: int) -> None:
        if per_peer < 1 or total < 1:
            raise ValueError("connection caps must be at least 1")
        self.per_peer = per_peer
        self.total = total
        self.open: Counter[str] = Counter()
        self.count = 0
        self.refused = 0

    def admit(self, peer: str) -> str:
        """ "" = admitted (counted); otherwise why not, for the log."""
        if self.count >= self.total:
            self.refused += 1
            return f"{self.count} connections open, the total cap"
        if self.open[peer] >= self.per_peer:
            self.refused += 1
            return f"{self.open[peer]} connections open from {peer}, the cap per peer"
        self.open[peer] += 1
        self.count += 1
        return ""

    def release(self, peer: str) -> None:
        if self.open[peer] <= 0:
            return
        self.open[peer] -= 1
        self.count -= 1
        if not self.open[peer]:
            del self.open[peer]


class _Counted(asyncio.Protocol):
    """Hands the TLS transport's events to aiohttp's handler, and gives the slot
    back when the connection ends."""

    def __init__(self, inner: asyncio.Protocol, done: Callable[[], None]) -> None:
        self.inner = inner
        self.done = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.inner.connection_lost(exc)
        finally:
            self.done()


class Gate:
    """The listener: accepts, counts each connection by its source address before
    any TLS work, closes it unread past a cap, else lets the loop run the TLS
    handshake (within a deadline) and hands it to aiohttp (`handler_factory`)."""

    _last_warning = 0.0

    def __init__(
        self,
        limits: ConnectionLimits,
        handler_factory: Callable[[], asyncio.Protocol],
        ssl_context: ssl.SSLContext,
        handshake_timeout: float,
    ) -> None:
        self.limits = limits
        self.handler_factory = handler_factory
        self.ssl_context = ssl_context
        self.handshake_timeout = handshake_timeout
        self.sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    def listen(self, host: str, port: int) -> int:
        """Bind and start accepting; returns the port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server(
            (host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port),
            family=family,
            backlog=4096,  # a fleet reconnecting at once (capped by somaxconn)
            reuse_port=False,
        )
        sock.setblocking(False)
        self.sock = sock
        self._accepting = asyncio.ensure_future(self._accept_loop(sock))
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self.sock is not None:
            self.sock.close()
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except OSError as exc:  # out of file descriptors, say: back off a little
                self._warn(f"accept failed: {exc.strerror or exc}")
                await asyncio.sleep(0.1)
                continue
            peer = str(addr[0])
            why = self.limits.admit(peer)
            if why:
                self._warn(f"connection from {peer} refused: {why}")
                conn.close()
                continue
            task = asyncio.ensure_future(self._handshake(conn, peer))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket, peer: str) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.limits.release(peer)

        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: _Counted(self.handler_factory(), release),
                conn,
                ssl=self.ssl_context,
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, EOFError) as exc:
            log.debug("TLS handshake with %s failed: %s", peer, exc)
            conn.close()
            release()
        except asyncio.CancelledError:
            conn.close()
            release()
            raise

    @classmethod
    def _warn(cls, message: str) -> None:
        now = time.monotonic()
        if now - cls._last_warning >= 5.0:  # a flood logs once every 5 s, not per try
            cls._last_warning = now
            log.warning("%s (raise with controlplane run --max-connections[-per-peer])", message)
