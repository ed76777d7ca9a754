"""The asyncio shell around :mod:`meshnode.ztunnel.hbone`: one ``HboneSession``
per TLS connection (either end), one ``PlainSide`` per tunnelled TCP connection.

The shell only moves bytes and events:

* TLS bytes in -> ``HboneConnection.receive_data`` -> events -> the stream's
  ``PlainSide`` (write to the socket, half-close, abort).
* Plain bytes in -> ``HboneConnection.send``. When the peer's window is closed,
  or the TLS socket's buffer is full, the plain socket stops being read
  (back-pressure) until ``SendWindowOpened`` / ``resume_writing``.
* Received data is acknowledged to the peer only once the plain socket's
  buffer has room, so a slow reader slows its sender and nothing else.
* The TLS side is back-pressured too: while its write buffer is full, data is
  queued in the streams instead of being framed, and past ``READ_PAUSE_AT``
  the TLS socket stops being read -- a peer that sends PINGs (or anything that
  we must answer) without reading what we send gets no more than that from us.
  Only our answers can push the buffer that far: our own data stops at the
  high-water mark, so two meshnode ends never wait for each other to read.
* Keepalive and idleness are ``HboneConnection``'s: the shell only runs its
  timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from meshnode.ztunnel import hbone

log = logging.getLogger("meshnode.ztunnel.session")

# Stop reading a plain socket once this much is queued for its stream.
PENDING_HIGH = 1 << 20
# ... or once this much is queued in all streams of its HBONE connection.
CONNECTION_PENDING_HIGH = 16 << 20
# Frame DATA into the TLS transport at once (not at the end of the loop turn)
# when this much is waiting: bounds what many streams add in one turn.
FLUSH_AT = 256 << 10
# Stop reading the TLS socket while its write buffer holds more than this (or
# 4x the transport's high-water mark, 512 KiB for TLS, if that is more). Our own
# DATA stops near the high-water mark (+ FLUSH_AT + one read), well below.
READ_PAUSE_AT = 4 << 20
# A TLS write buffer beyond this is a peer that does not read: drop it.
MAX_WRITE_BUFFER = 16 << 20
# After a GOAWAY for a failed connection, wait this long for it to go out.
CLOSE_GRACE = 2.0


_LINGER_RESET = struct.pack("ii", 1, 0)


def reset_connection(transport: asyncio.Transport) -> None:
    """Close with a TCP RST, so the peer knows the connection failed rather
    than ended. (uvloop's abort() alone sends a FIN: a client would take a
    failed upstream for a complete answer.)"""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class HboneSession(asyncio.Protocol):
    """One HBONE connection over TLS. ``on_request`` (server side) is called for
    each CONNECT; ``on_lost`` when the connection ends."""

    def __init__(
        self,
        conn: hbone.HboneConnection,
        *,
        on_request: Callable[[HboneSession, hbone.TunnelRequested], None] | None = None,
        on_made: Callable[[HboneSession], bool] | None = None,
        on_lost: Callable[[HboneSession], None] | None = None,
        on_ended: Callable[[HboneSession, hbone.ConnectionEnded], None] | None = None,
    ) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.handlers: dict[int, PlainSide] = {}
        self.write_paused = False
        self.closed = False
        self.last_active = time.monotonic()
        self.peer: Any = None  # verified peer identity, set by the owner
        self.peer_address: str | None = None  # the peer's IP, set by the owner
        self.local_identity: Any = None
        # Set by the owner after the handshake: when either end's certificate
        # expires (Unix time; never used for new streams after), and the peer's.
        self.valid_until = float("inf")
        self.peer_cert: bytes | None = None
        self._on_request = on_request
        self._on_made = on_made
        self._on_lost = on_lost
        self._on_ended = on_ended
        self._flush_scheduled = False
        self._receiving = False  # in data_received: it writes once at the end
        self._reading_paused = False  # the TLS socket, by us (READ_PAUSE_AT)
        self._read_pause_at = READ_PAUSE_AT
        self._queue_full = False  # a send was refused for CONNECTION_PENDING_HIGH
        self._timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._loop = asyncio.get_event_loop()

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        with contextlib.suppress(AttributeError, NotImplementedError):
            high = self.transport.get_write_buffer_limits()[1]
            self._read_pause_at = max(READ_PAUSE_AT, 4 * high)
        if self._on_made is not None and not self._on_made(self):
            self.closed = True
            self.transport.abort()
            return
        self.flush()
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        now = self.last_active = time.monotonic()
        # What the events make us send (acks, answers) goes out in the one
        # write below, not one each.
        self._receiving = True
        try:
            for ev in self.conn.receive_data(data, now):
                self._dispatch(ev)
        finally:
            self._receiving = False
        self._flush_now()
        if self._queue_full:
            self._wake_if_drained()
        transport = self.transport
        if (
            self.write_paused
            and not self._reading_paused
            and transport is not None
            and transport.get_write_buffer_size() > self._read_pause_at
        ):
            # What we owe the peer is piling up because it does not read: stop
            # reading until resume_writing. (Only answers to the peer's own
            # frames can get here; our data stops at the high-water mark.)
            self._reading_paused = True
            transport.pause_reading()

    def eof_received(self) -> bool:
        return False  # a TLS peer that stops sending is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reason = f"HBONE connection lost: {exc}" if exc else "HBONE connection closed"
        handlers, self.handlers = self.handlers, {}
        for handler in handlers.values():
            handler.on_reset(reason)
        if self._on_lost is not None:
            self._on_lost(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.conn.pause_output()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()
        for ev in self.conn.resume_output():
            self._dispatch(ev)
        self.flush()
        for handler in list(self.handlers.values()):
            handler.on_writable()

    # -- keepalive, idleness (the decisions are HboneConnection's) -------------

    def _arm_timer(self) -> None:
        when = self.conn.next_timer()
        if when is None or self.closed:
            return
        delay = max(0.0, when - time.monotonic()) + 0.001
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        for ev in self.conn.handle_timer(time.monotonic()):
            self._dispatch(ev)
        self.flush()
        self._arm_timer()

    # -- used by PlainSide and the proxy --------------------------------------

    @property
    def usable(self) -> bool:
        return not self.closed and not self.conn.ended and self.transport is not None

    def flush(self) -> None:
        """Write what HTTP/2 has queued -- once per event-loop iteration: many
        streams sending, or a read producing data plus acks, then cost one TLS
        write (one encryption call, one syscall), not one each."""
        if self._flush_scheduled or self._receiving:
            return
        if len(self.handlers) <= 1:
            # One stream: nothing to coalesce with; don't add a loop turn of latency.
            self._flush_now()
            return
        self._flush_scheduled = True
        self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        data = self.conn.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)
            if self.write_paused and transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
                log.warning(
                    "HBONE connection to %s dropped: %d bytes wait to be sent to a "
                    "peer that does not read",
                    self.peer,
                    transport.get_write_buffer_size(),
                )
                self.closed = True
                transport.abort()

    def _after_call(self) -> None:
        """Report what a call into the connection could not do (events it
        deferred), and wake the streams once a full connection queue drains."""
        if self.conn.has_events:
            for ev in self.conn.take_events():
                self._dispatch(ev)
        if self._queue_full:
            self._wake_if_drained()

    def _wake_if_drained(self) -> None:
        """Streams told to stop because the whole connection's queue was full
        may have nothing queued themselves: wake them all once it drained."""
        if self.conn.queued_bytes < CONNECTION_PENDING_HIGH // 2:
            self._queue_full = False
            for handler in list(self.handlers.values()):
                handler.on_writable()

    def open(self, authority: str, headers: list[tuple[str, str]], handler: PlainSide) -> int:
        stream_id = self.conn.open_tunnel(authority, headers)
        self.handlers[stream_id] = handler
        self.last_active = time.monotonic()
        self.flush()
        return stream_id

    def attach(self, stream_id: int, handler: PlainSide) -> None:
        self.handlers[stream_id] = handler

    def accept(self, stream_id: int) -> None:
        self.conn.accept_tunnel(stream_id)
        self.flush()
        self._after_call()

    def refuse(self, stream_id: int, status: int, reason: str) -> None:
        self.handlers.pop(stream_id, None)
        self.conn.refuse_tunnel(stream_id, status, reason, time.monotonic())
        self.flush()
        self._after_call()

    def send(self, stream_id: int, data: bytes) -> bool:
        """Queue data; returns False when the caller should stop reading."""
        conn = self.conn
        conn.send(stream_id, data)
        if conn.outbound_size > FLUSH_AT:
            self._flush_now()
        else:
            self.flush()
        if conn.has_events:
            self._after_call()
        if conn.queued_bytes >= CONNECTION_PENDING_HIGH:
            self._queue_full = True
            return False
        return not self.write_paused and conn.pending(stream_id) < PENDING_HIGH

    def end(self, stream_id: int) -> None:
        self.conn.end(stream_id)
        self.flush()
        self._after_call()

    def reset(self, stream_id: int, code: int = hbone.CANCEL) -> None:
        self.handlers.pop(stream_id, None)
        self.conn.reset(stream_id, code)  # gives back what the stream held unacknowledged
        self.flush()
        self._after_call()

    def ack(self, stream_id: int, flow_length: int) -> None:
        self.conn.ack(stream_id, flow_length)
        self.flush()
        if self.conn.has_events:
            self._after_call()

    def forget(self, stream_id: int) -> None:
        self.handlers.pop(stream_id, None)

    def close(self, reason: str = "") -> None:
        if self.closed:
            return
        self.conn.close(hbone.NO_ERROR, reason)
        self._close_transport()

    def _close_transport(self) -> None:
        """GOAWAY out, then close; abort if the peer does not take it in time."""
        self._flush_now()
        self.closed = True
        transport = self.transport
        if transport is None:
            return
        transport.close()
        if transport.get_write_buffer_size():
            self._loop.call_later(CLOSE_GRACE, self._abort_if_open, transport)

    def _abort_if_open(self, transport: asyncio.Transport) -> None:
        if self.transport is transport and not self._lost:
            log.info(
                "HBONE connection with %s aborted: GOAWAY not taken within %.0fs",
                self.peer,
                CLOSE_GRACE,
            )
            transport.abort()

    # -- events ----------------------------------------------------------------

    def _dispatch(self, ev: hbone.Event) -> None:
        if isinstance(ev, hbone.DataReceived):
            handler = self.handlers.get(ev.stream_id)
            if handler is not None:
                handler.on_data(ev.data, ev.flow_length)
            else:
                self.conn.ack(ev.stream_id, ev.flow_length)
        elif isinstance(ev, hbone.TunnelRequested):
            if self._on_request is None:
                self.conn.refuse_tunnel(
                    ev.stream_id, 405, "this end accepts no tunnels", time.monotonic()
                )
            else:
                self._on_request(self, ev)
        elif isinstance(ev, hbone.TunnelEstablished):
            handler = self.handlers.get(ev.stream_id)
            if handler is not None:
                handler.on_established()
        elif isinstance(ev, hbone.TunnelRefused):
            handler = self.handlers.pop(ev.stream_id, None)
            if handler is not None:
                handler.on_refused(ev.status, ev.reason)
        elif isinstance(ev, hbone.TunnelHalfClosed):
            handler = self.handlers.get(ev.stream_id)
            if handler is not None:
                handler.on_half_closed()
        elif isinstance(ev, hbone.TunnelReset):
            handler = self.handlers.pop(ev.stream_id, None)
            if handler is not None:
                who = "peer" if ev.remote else "us"
                handler.on_reset(f"stream reset by {who} ({hbone.error_name(ev.error_code)})")
        elif isinstance(ev, hbone.SendWindowOpened):
            handler = self.handlers.get(ev.stream_id)
            if handler is not None:
                handler.on_writable()
        elif isinstance(ev, hbone.ConnectionEnded):
            # A limit the peer ran into is worth a warning: a broken or hostile peer.
            level = logging.WARNING if ev.error_code == hbone.ENHANCE_YOUR_CALM else logging.INFO
            log.log(
                level,
                "HBONE connection with %s (%s) ended: %s",
                self.peer,
                self.peer_address or "?",
                ev.reason,
            )
            if self._on_ended is not None:
                self._on_ended(self, ev)
            if (self.conn.ended or not self.handlers) and not self.closed:
                self._close_transport()


class Carrier(Protocol):
    """What carries a PlainSide's bytes: an HBONE stream or a LocalPipe."""

    def attach(self, stream_id: int, handler: PlainSide) -> None: ...
    def send(self, stream_id: int, data: bytes) -> bool: ...
    def end(self, stream_id: int) -> None: ...
    def reset(self, stream_id: int, code: int = ...) -> None: ...
    def ack(self, stream_id: int, flow_length: int) -> None: ...
    def forget(self, stream_id: int) -> None: ...
    def accept(self, stream_id: int) -> None: ...
    def refuse(self, stream_id: int, status: int, reason: str) -> None: ...


class PlainSide(asyncio.Protocol):
    """A plain TCP connection tied to one HBONE stream: the client's connection
    on the outbound side, the connection to the workload on the inbound side.

    Before the stream is bound (outbound: until the peer answers 200; inbound:
    until the workload connection is up) nothing is read or written."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.session: Carrier | None = None
        self.stream_id = 0
        self.reading_paused = False
        self.write_paused = False
        self.unacked = 0
        self.local_eof = False  # the plain peer half-closed
        self.remote_eof = False  # the tunnel peer half-closed
        self.finished = False
        self.bytes_in = 0  # read from the plain socket
        self.bytes_out = 0  # written to the plain socket
        self.started = time.monotonic()
        self.error: str | None = None
        self._early: list[tuple[bytes, int]] = []  # tunnel data before the socket is up
        self._held: list[bytes] = []  # socket data before the tunnel is up
        self.ready = True  # False while the plain side must wait for the tunnel

    # -- binding ---------------------------------------------------------------

    def bind(self, session: Carrier, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        session.attach(stream_id, self)

    # -- asyncio.Protocol (plain socket) ----------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        for data, flow in self._early:
            self.on_data(data, flow)
        self._early.clear()

    def data_received(self, data: bytes) -> None:
        if self.finished:
            return
        self.bytes_in += len(data)
        session = self.session
        if session is None or not self.ready:
            # Not bound yet (the tunnel is being set up). Pausing in
            # connection_made is not reliable across event loops, so hold what
            # arrives and stop reading until the tunnel is ready.
            self._held.append(data)
            if self.transport is not None:
                self.reading_paused = True
                self.transport.pause_reading()
            return
        if not session.send(self.stream_id, data) and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.local_eof = True
        if self.session is not None and self.ready and not self.finished:
            self.session.end(self.stream_id)
        self._maybe_done()
        return True  # keep our write side open: this is a half-close

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            if not (self.local_eof and self.remote_eof):
                if self.error is None:
                    self.error = (
                        f"connection lost: {exc}" if exc else "closed before both sides ended"
                    )
                if self.session is not None:
                    self.session.reset(self.stream_id)
            self._finish()
        self.transport = None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.unacked and self.session is not None:
            self.session.ack(self.stream_id, self.unacked)
            self.unacked = 0

    # -- from the HBONE session -----------------------------------------------------

    def on_established(self) -> None:
        """Outbound: the peer accepted the tunnel."""

    def on_refused(self, status: int, reason: str) -> None:
        """Outbound: the peer answered CONNECT with a non-2xx status."""
        self.on_reset(f"peer refused the tunnel: {status} {reason}".strip())

    def release_held(self) -> None:
        """The tunnel is ready: send what the socket delivered meanwhile and
        read on."""
        self.ready = True
        held, self._held = self._held, []
        if self.session is not None and not self.finished:
            for data in held:
                self.session.send(self.stream_id, data)
            if self.local_eof:
                self.session.end(self.stream_id)
        self.on_writable()

    def on_data(self, data: bytes, flow_length: int) -> None:
        transport = self.transport
        if transport is None:
            self._early.append((data, flow_length))
            return
        self.bytes_out += len(data)
        transport.write(data)
        if self.write_paused:
            self.unacked += flow_length
        elif self.session is not None:
            self.session.ack(self.stream_id, flow_length)

    def on_half_closed(self) -> None:
        self.remote_eof = True
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()
        self._maybe_done()

    def on_writable(self) -> None:
        if self.ready and self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def on_reset(self, reason: str) -> None:
        if self.finished:
            return
        self.error = reason
        self.session = None  # the stream is gone: nothing to reset
        if self.transport is not None:
            reset_connection(self.transport)  # RST to the plain peer: fail fast, don't hang
        self._finish()

    # -- end ------------------------------------------------------------------------

    def _maybe_done(self) -> None:
        if self.local_eof and self.remote_eof and not self.finished:
            if self.session is not None:
                self.session.forget(self.stream_id)
            if self.transport is not None:
                self.transport.close()
            self._finish()

    def _finish(self) -> None:
        self.finished = True
        self.on_finished()

    def on_finished(self) -> None:
        """Override: the connection is over (access log, metrics)."""


class LocalPipe:
    """Joins two PlainSides directly, for same-node traffic: the client's
    connection (side 1) and the connection to the local workload (side 2).
    It offers the part of HboneSession's interface PlainSide uses, so the
    relay logic (back-pressure, half-close, abort) is the same code; it only
    skips HTTP/2 and TLS. Policy and metrics stay with the handlers."""

    CLIENT, WORKLOAD = 1, 2

    def __init__(self) -> None:
        self.handlers: dict[int, PlainSide] = {}
        self.closed = False

    def _other(self, stream_id: int) -> PlainSide | None:
        return self.handlers.get(3 - stream_id)

    def attach(self, stream_id: int, handler: PlainSide) -> None:
        self.handlers[stream_id] = handler

    def send(self, stream_id: int, data: bytes) -> bool:
        other = self._other(stream_id)
        if other is None:
            return True
        other.on_data(data, len(data))
        return not other.write_paused

    def ack(self, stream_id: int, flow_length: int) -> None:
        # The side that wrote the data has room again: let its peer read on.
        other = self._other(stream_id)
        if other is not None:
            other.on_writable()

    def end(self, stream_id: int) -> None:
        other = self._other(stream_id)
        if other is not None:
            other.on_half_closed()

    def reset(self, stream_id: int, code: int = 0) -> None:
        self.handlers.pop(stream_id, None)
        other = self.handlers.pop(3 - stream_id, None)
        if other is not None:
            other.on_reset("the other side of a same-node connection failed")

    def forget(self, stream_id: int) -> None:
        self.handlers.pop(stream_id, None)

    # The workload side answers like an HBONE peer would.
    def accept(self, stream_id: int) -> None:
        client = self.handlers.get(self.CLIENT)
        if client is not None:
            client.on_established()

    def refuse(self, stream_id: int, status: int, reason: str) -> None:
        self.handlers.pop(stream_id, None)
        client = self.handlers.pop(self.CLIENT, None)
        if client is not None:
            client.on_refused(status, reason)
