"""HBONE, without I/O: HTTP/2 CONNECT tunnels over one (already secured) byte stream.

HBONE is Istio's tunnel protocol: each proxied TCP connection is one HTTP/2
stream opened with ``CONNECT`` and ``:authority = "<ip>:<port>"`` of the
destination workload; the stream's DATA frames carry the connection's bytes,
END_STREAM is a TCP half-close and RST_STREAM an abort. The TLS layer around it
lives in the asyncio shell (``ztunnel/session.py``); this module only turns bytes
into events and calls into bytes, so it is tested by feeding it bytes. Time is
passed in (``now``), never read here, except as a default for callers that do
not care.

Flow control is manual and is our back-pressure: received data is acknowledged
(``ack``) only once the shell has handed it to the downstream socket, and data to
send is queued per stream while the peer's window is closed (``pending``).
Every byte delivered and not yet acknowledged is counted per stream; whenever a
stream ends for any reason (reset either way, refusal, both sides done) the
rest is given back to the connection window here, so no path can leak it.

The peer is not trusted (the peer proxy may be compromised, or any process
holding a workload certificate): every h2 call is contained -- a failure ends
the stream it concerns (RST_STREAM) or, if the connection itself is broken, the
connection (GOAWAY) -- and nothing raises out of this module's public methods
except :class:`LocalProtocolError` for our own misuse. Limits, as Istio's
ztunnel and the HTTP/2 servers after CVE-2023-44487 / CVE-2024-27316 set them:
streams reset or refused per time window (Rapid Reset), header-list size and
header blocks (CONTINUATION flood, bounded in :mod:`h2compat`), frame size,
keepalive PINGs and an idle timeout.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from meshnode.core.identity import ZoneSni
from meshnode.ztunnel import h2compat

log = logging.getLogger("meshnode.ztunnel.hbone")

# Bigger frames and windows than HTTP/2's defaults: both ends are meshnode
# proxies moving bulk TCP, where per-frame overhead in Python dominates. The
# frame size is also what one connection may make us buffer before a frame can
# be parsed: 256 KiB moves bulk within a few percent of 1 MiB frames (sans-IO,
# 256 MiB through a pair: 16 KiB 300 MB/s, 64 KiB 410, 256 KiB 470-520, 1 MiB
# 480-520) for a quarter of the memory per connection.
MAX_FRAME_SIZE = 256 << 10
STREAM_WINDOW = 4 << 20  # per stream: what one slow reader may have in flight
CONNECTION_WINDOW = 64 << 20  # all streams of one connection together
DEFAULT_MAX_STREAMS = 100  # per connection, as Istio's ztunnel caps it
MAX_HEADER_LIST_SIZE = 64 << 10  # SETTINGS_MAX_HEADER_LIST_SIZE, and the header block cap

# Error codes, as RFC 9113 names them.
NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR
INTERNAL_ERROR = h2.errors.ErrorCodes.INTERNAL_ERROR
REFUSED_STREAM = h2.errors.ErrorCodes.REFUSED_STREAM
CANCEL = h2.errors.ErrorCodes.CANCEL
CONNECT_ERROR = h2.errors.ErrorCodes.CONNECT_ERROR
ENHANCE_YOUR_CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
STREAM_CLOSED = h2.errors.ErrorCodes.STREAM_CLOSED

_PING_OPAQUE = b"mnkeepal"


@dataclass(frozen=True, slots=True)
class HboneLimits:
    """What one connection may cost us. Times in seconds, on the caller's clock."""

    max_concurrent_streams: int = DEFAULT_MAX_STREAMS
    # Rapid Reset (CVE-2023-44487): streams the peer opened and then reset
    # before we answered, plus streams we refused, within ``reset_window``.
    # One more and the connection gets GOAWAY(ENHANCE_YOUR_CALM). A stream costs
    # us an authorization and a TCP connect; the stream cap alone does not stop
    # a peer that resets as fast as it opens.
    reset_limit: int = 200
    reset_window: float = 10.0
    # Keepalive: after this long without a byte from the peer we send a PING;
    # no ACK within keepalive_timeout and the connection is dead.
    keepalive_interval: float = 20.0
    keepalive_timeout: float = 10.0
    # No stream for this long: GOAWAY(NO_ERROR) and the shell closes. None: never.
    idle_timeout: float | None = 300.0


class HboneError(Exception):
    """Base of the HBONE layer's errors."""


class LocalProtocolError(HboneError):
    """We asked for something the protocol does not allow (a bug on our side)."""


class RemoteProtocolError(HboneError):
    """The peer sent something the protocol does not allow."""


# --- events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TunnelRequested:
    """Server side: the peer asks for a tunnel to ``authority``."""

    stream_id: int
    authority: str
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class TunnelEstablished:
    """Client side: the peer answered 2xx; bytes may flow."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class TunnelRefused:
    """Client side: the peer answered with a non-2xx status."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes of the tunnelled connection. Acknowledge ``flow_length`` with
    :meth:`HboneConnection.ack` once they have been written downstream."""

    stream_id: int
    data: bytes
    flow_length: int


@dataclass(frozen=True, slots=True)
class TunnelHalfClosed:
    """The peer will send no more bytes on this stream (TCP FIN)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class TunnelReset:
    """The stream was aborted, by the peer (``remote``) or by a local failure."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(frozen=True, slots=True)
class SendWindowOpened:
    """Queued data of this stream went out, or the window grew: the shell may
    read more from the stream's plain side."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ConnectionEnded:
    """The connection is over, or (``NO_ERROR``) takes no new streams: GOAWAY
    sent or received, a protocol error, a limit, a dead peer or idleness.
    ``last_stream_id`` streams above it were not processed by the peer."""

    error_code: int
    reason: str
    remote: bool
    last_stream_id: int | None = None


Event = (
    TunnelRequested
    | TunnelEstablished
    | TunnelRefused
    | DataReceived
    | TunnelHalfClosed
    | TunnelReset
    | SendWindowOpened
    | ConnectionEnded
)


@dataclass(slots=True)
class _Stream:
    send_buffer: bytearray
    end_after_flush: bool = False
    local_ended: bool = False
    remote_ended: bool = False
    answered: bool = False  # server: we said 200; client: the peer did
    unacked: int = 0  # delivered in DataReceived, not yet acknowledged


class HboneConnection:
    """One HBONE connection, either end. Feed it the bytes read from the (TLS)
    transport with :meth:`receive_data`; write whatever :meth:`data_to_send`
    returns after every call. Call :meth:`handle_timer` at :meth:`next_timer`.

    Calls made by the shell (accept, refuse, send, ack, ...) never raise for
    the peer's doing; what they could not do is reported as events, collected
    with :meth:`take_events` (``receive_data`` and ``handle_timer`` return them
    too)."""

    def __init__(
        self,
        *,
        client_side: bool,
        max_concurrent_streams: int | None = None,
        limits: HboneLimits | None = None,
        now: float | None = None,
    ) -> None:
        limits = limits or HboneLimits()
        if max_concurrent_streams is not None:
            limits = dataclasses.replace(limits, max_concurrent_streams=max_concurrent_streams)
        self.limits = limits
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,  # bytes: we decode, so bad UTF-8 fails one stream only
            validate_inbound_headers=True,
            validate_outbound_headers=True,
        )
        self.client_side = client_side
        self._h2 = h2compat.GracefulH2Connection(
            config=config, max_header_block=MAX_HEADER_LIST_SIZE
        )
        self._h2.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # Announced in our first SETTINGS frame, so valid from the start; h2 only
        # picks up *changed* settings on ACK, so tell its frame reader directly.
        self._h2.max_inbound_frame_size = MAX_FRAME_SIZE
        self._h2.incoming_buffer.max_frame_size = MAX_FRAME_SIZE
        self._h2.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        self._splitter = h2compat.DataSplitter(self._h2)
        self._streams: dict[int, _Stream] = {}
        self._ended = False  # unusable: an error, or everything finished after GOAWAY
        self._draining = False  # a GOAWAY(NO_ERROR) went either way: no new streams
        self._goaway_last: int | None = None  # the last peer stream we promised to serve
        self.max_concurrent_streams = limits.max_concurrent_streams
        self._deferred: list[Event] = []  # from calls that return nothing
        self._queued = 0  # bytes in all streams' send buffers
        self._output_paused = False  # the shell's transport is full: queue, don't frame
        now = time.monotonic() if now is None else now
        self._clock = now  # the latest time we were told
        self._last_recv = now
        self._idle_since = now  # a stream was last seen open at this time
        self._ping_sent: float | None = None
        self._resets: collections.deque[float] = collections.deque()
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)

    # -- state ---------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in send buffers (peer's window closed, or output paused)."""
        return self._queued

    @property
    def unacked_bytes(self) -> int:
        """Bytes delivered to the shell and not acknowledged yet, all streams."""
        return sum(s.unacked for s in self._streams.values())

    @property
    def outbound_size(self) -> int:
        """Bytes framed and not yet taken with :meth:`data_to_send`."""
        return h2compat.outbound_buffer_size(self._h2)

    @property
    def has_events(self) -> bool:
        return bool(self._deferred)

    def take_events(self) -> list[Event]:
        """Events produced by calls that return nothing (a contained failure of
        accept/send/ack..., a limit tripped by a refusal)."""
        out, self._deferred = self._deferred, []
        return out

    def has_capacity(self) -> bool:
        """Client side: may one more tunnel be opened on this connection?"""
        if self._ended or self._draining:
            return False
        limit = min(self.max_concurrent_streams, self._h2.remote_settings.max_concurrent_streams)
        return self._h2.open_outbound_streams < limit

    def pending(self, stream_id: int) -> int:
        """Bytes queued for the stream, waiting for the peer's window."""
        stream = self._streams.get(stream_id)
        return len(stream.send_buffer) if stream else 0

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    # -- calls ---------------------------------------------------------------

    def open_tunnel(self, authority: str, headers: Iterable[tuple[str, str]] = ()) -> int:
        """Client side: send CONNECT for ``authority`` ("ip:port"); returns the
        stream id. Answered later by TunnelEstablished or TunnelRefused."""
        if not self.client_side:
            raise LocalProtocolError("only the client side opens tunnels")
        if not self.has_capacity():
            raise LocalProtocolError("connection has no capacity for another stream")
        request = [(":method", "CONNECT"), (":authority", authority), *headers]
        try:
            stream_id = self._h2.get_next_available_stream_id()
            self._h2.send_headers(stream_id, request)
        except (h2.exceptions.H2Error, ValueError, TypeError) as exc:
            raise LocalProtocolError(f"cannot open tunnel to {authority}: {exc}") from exc
        self._streams[stream_id] = _Stream(bytearray())
        self._idle_since = self._clock
        return stream_id

    def accept_tunnel(self, stream_id: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Server side: answer 200; bytes may flow. A stream that is gone
        meanwhile (the peer reset it) is left alone: its TunnelReset was or
        will be reported."""
        stream = self._streams.get(stream_id)
        if stream is None or self._ended:
            return
        try:
            self._h2.send_headers(stream_id, [(":status", "200"), *headers])
        except Exception as exc:
            self._fail_stream(stream_id, "answering 200", exc, self._deferred)
            return
        stream.answered = True

    def refuse_tunnel(
        self, stream_id: int, status: int, reason: str = "", now: float | None = None
    ) -> None:
        """Server side: answer a non-2xx status and end the stream. Refusals
        count toward the reset limit."""
        self._refuse(stream_id, status, reason, self._now(now), self._deferred)

    def send(self, stream_id: int, data: bytes) -> None:
        """Queue ``data`` on the stream and send as much as the peer's window
        allows now; check :meth:`pending` for what is left. Data for a stream
        that is already gone (reset, reported by an event) is dropped."""
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._opened(stream_id):
                return
            raise LocalProtocolError(f"stream {stream_id} was never opened")
        if stream.local_ended or stream.end_after_flush:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        if self._ended:
            return  # the connection is over: the shell aborts its streams
        if stream.send_buffer or self._output_paused:
            stream.send_buffer += data
            self._queued += len(data)
            if not self._output_paused:
                self._flush_stream(stream_id, stream, self._deferred)
            return
        # Fast path: nothing queued, send straight from the caller's buffer.
        try:
            sent = self._send_window(stream_id, memoryview(data))
        except Exception as exc:
            self._fail_stream(stream_id, "sending data", exc, self._deferred)
            return
        if sent < len(data):
            stream.send_buffer += data[sent:]
            self._queued += len(data) - sent

    def end(self, stream_id: int) -> None:
        """Half-close our side of the stream once queued data has gone out."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_ended or self._ended:
            return
        if stream.send_buffer:
            stream.end_after_flush = True
            return
        self._end_now(stream_id, stream, self._deferred)

    def reset(self, stream_id: int, error_code: int = CANCEL) -> None:
        """Abort the stream (the tunnelled connection failed on our side). What
        it had received and not acknowledged is given back to the connection."""
        if stream_id not in self._streams:
            return
        self._try_reset(stream_id, error_code)
        self._drop(stream_id)

    def ack(self, stream_id: int, flow_length: int) -> None:
        """Data of that length was written downstream: give the window back.
        Never more than was delivered; nothing for a stream already gone (its
        window was given back when it went)."""
        stream = self._streams.get(stream_id)
        if stream is None or flow_length <= 0 or self._ended:
            return
        n = min(flow_length, stream.unacked)
        if n <= 0:
            return
        stream.unacked -= n
        try:
            self._h2.acknowledge_received_data(n, stream_id)
        except Exception as exc:
            self._fail_stream(stream_id, "acknowledging data", exc, self._deferred)

    def close(self, error_code: int = NO_ERROR, reason: str = "") -> None:
        """Send GOAWAY. With NO_ERROR the open streams may still finish (no new
        ones are accepted); with an error code the connection is over and open
        streams are the shell's to abort."""
        if self._ended or (
            self._draining and error_code == NO_ERROR and self._goaway_last is not None
        ):
            return
        self._goaway_last = self._h2.highest_inbound_stream_id
        try:
            self._h2.close_connection(error_code, additional_data=reason.encode()[:200] or None)
        except Exception as exc:
            log.debug("HBONE GOAWAY not sent (%s: %s)", type(exc).__name__, exc)
        if error_code == NO_ERROR:
            self._draining = True
        else:
            self._ended = True

    def ping(self, opaque: bytes = _PING_OPAQUE) -> None:
        if self._ended:
            return
        try:
            self._h2.ping(opaque)
        except Exception as exc:
            log.debug("HBONE PING not sent (%s: %s)", type(exc).__name__, exc)

    def pause_output(self) -> None:
        """The transport is full: queue data in the streams instead of framing
        it (the queues are bounded by the shell pausing its plain sockets)."""
        self._output_paused = True

    def resume_output(self) -> list[Event]:
        """The transport drained: frame what was queued, as windows allow."""
        self._output_paused = False
        out = self.take_events()
        if self._queued and not self._ended:
            self._on_window(0, out)
        return out

    # -- time ------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` should be called next (None: never)."""
        if self._ended:
            return None
        lim = self.limits
        if self._ping_sent is not None:
            when = self._ping_sent + lim.keepalive_timeout
        else:
            when = self._last_recv + lim.keepalive_interval
        if lim.idle_timeout is not None and not self._draining:
            when = min(when, self._idle_since + lim.idle_timeout)
        return when

    def handle_timer(self, now: float) -> list[Event]:
        """Keepalive and idleness: send a PING after keepalive_interval of
        silence; no ACK within keepalive_timeout ends the connection (the peer
        is gone, or does not read); no stream for idle_timeout closes it
        gracefully (GOAWAY NO_ERROR)."""
        out = self.take_events()
        if self._ended:
            return out
        self._clock = max(self._clock, now)
        lim = self.limits
        if self._streams:
            self._idle_since = now
        if self._ping_sent is not None:
            if now - self._ping_sent >= lim.keepalive_timeout:
                reason = (
                    f"no answer to a keepalive PING within {lim.keepalive_timeout:g}s: "
                    "the peer is gone or does not read"
                )
                self._fail_connection(NO_ERROR, reason, False, out, stream_code=CANCEL)
                return out
        elif now - self._last_recv >= lim.keepalive_interval:
            self.ping()
            self._ping_sent = now
        if (
            lim.idle_timeout is not None
            and not self._streams
            and not self._draining
            and now - self._idle_since >= lim.idle_timeout
        ):
            self.close(NO_ERROR, "idle")
            out.append(
                ConnectionEnded(
                    NO_ERROR,
                    f"no stream for {lim.idle_timeout:g}s: closing the idle connection",
                    False,
                )
            )
        return out

    # -- input ---------------------------------------------------------------

    def receive_data(self, data: bytes, now: float | None = None) -> list[Event]:
        """Process bytes from the peer. Nothing the peer sends makes this
        raise: a stream-level problem resets that stream, a connection-level
        one answers GOAWAY and returns a ConnectionEnded event."""
        out = self.take_events()
        if self._ended:
            return out
        now = self._now(now)
        self._last_recv = now
        streams = self._streams
        try:
            for sid, chunk in self._splitter.split(data, streams):
                if sid:
                    # A DATA frame of an open stream, accounted by the splitter.
                    if chunk:
                        streams[sid].unacked += len(chunk)
                        out.append(DataReceived(sid, chunk, len(chunk)))
                    continue
                if not self._receive_h2(chunk, now, out):
                    break
        except Exception as exc:  # the splitter's accounting: contain it like h2's
            log.warning(
                "HBONE connection: reading DATA failed (%s: %s); closing the connection",
                type(exc).__name__,
                exc,
            )
            self._fail_connection(INTERNAL_ERROR, f"internal error on input: {exc}", False, out)
        return out

    def _receive_h2(self, data: bytes, now: float, out: list[Event]) -> bool:
        """Bytes for h2's general path; False once the connection has ended."""
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            code = int(getattr(exc, "error_code", PROTOCOL_ERROR) or PROTOCOL_ERROR)
            self._fail_connection(
                code, f"protocol error from peer: {str(exc) or type(exc).__name__}", True, out
            )
            return False
        except Exception as exc:  # h2 met a state it does not handle: contain it
            log.warning(
                "HBONE connection: h2 failed on input (%s: %s); closing the connection",
                type(exc).__name__,
                exc,
            )
            self._fail_connection(INTERNAL_ERROR, f"internal error on input: {exc}", False, out)
            return False
        for ev in h2_events:
            if self._ended:
                break
            try:
                self._translate(ev, out, now)
            except Exception as exc:
                sid = getattr(ev, "stream_id", None)
                if sid:
                    self._fail_stream(sid, f"handling {type(ev).__name__}", exc, out)
                else:
                    log.warning(
                        "HBONE connection: handling %s failed (%s: %s); closing the connection",
                        type(ev).__name__,
                        type(exc).__name__,
                        exc,
                    )
                    self._fail_connection(INTERNAL_ERROR, f"internal error: {exc}", False, out)
        return not self._ended

    def _translate(self, ev: h2.events.Event, out: list[Event], now: float) -> None:
        if isinstance(ev, h2.events.DataReceived):
            sid = ev.stream_id
            assert sid is not None
            flow = ev.flow_controlled_length or 0
            stream = self._streams.get(sid)
            if stream is not None:
                if ev.data or flow:
                    stream.unacked += flow
                    out.append(DataReceived(sid, ev.data or b"", flow))
            elif flow:
                # Data for a stream we already dropped: return its window at once.
                self._h2.acknowledge_received_data(flow, sid)
            # h2 lists END_STREAM as its own StreamEnded event after this one.
        elif isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev, out, now)
        elif isinstance(ev, h2.events.ResponseReceived):
            self._on_response(ev, out)
        elif isinstance(ev, h2.events.StreamEnded):
            assert ev.stream_id is not None
            stream = self._streams.get(ev.stream_id)
            if stream is not None:
                stream.remote_ended = True
                out.append(TunnelHalfClosed(ev.stream_id))
                self._maybe_forget(ev.stream_id, stream)
        elif isinstance(ev, h2.events.StreamReset):
            assert ev.stream_id is not None
            stream = self._drop(ev.stream_id)
            if stream is not None:
                out.append(TunnelReset(ev.stream_id, int(ev.error_code or 0), True))
                if not self.client_side and not stream.answered:
                    self._count_reset(now, out)
        elif isinstance(ev, h2.events.WindowUpdated):
            self._on_window(ev.stream_id or 0, out)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                self._on_window(0, out)
        elif isinstance(ev, h2.events.PingAckReceived):
            if ev.ping_data == _PING_OPAQUE:
                self._ping_sent = None
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._on_goaway(ev, out)
        # Pings (h2 answers them), settings acks, priority and unknown frames
        # need nothing from the shell.

    def _on_goaway(self, ev: h2.events.ConnectionTerminated, out: list[Event]) -> None:
        code = int(ev.error_code or 0)
        if code == NO_ERROR:
            self._draining = True
        else:
            self._ended = True
        last = ev.last_stream_id
        detail = (ev.additional_data or b"").decode("utf-8", "replace")
        # Streams we opened that the peer never processed are gone; the others
        # may finish. (last_stream_id speaks only of streams *we* initiated.)
        if last is not None:
            ours = [s for s in self._streams if (s % 2 == 1) == self.client_side]
            for sid in [s for s in ours if s > last]:
                self._drop(sid)
                out.append(TunnelReset(sid, REFUSED_STREAM, True))
        name = _error_name(code)
        out.append(ConnectionEnded(code, f"peer sent GOAWAY {name} {detail}".strip(), True, last))

    def _on_request(self, ev: h2.events.RequestReceived, out: list[Event], now: float) -> None:
        sid = ev.stream_id
        assert sid is not None
        self._idle_since = now
        if self._goaway_last is not None and sid > self._goaway_last:
            self._try_reset(sid, REFUSED_STREAM)
            self._count_reset(now, out)
            return
        try:
            headers = tuple((_text(k), _text(v)) for k, v in ev.headers or ())
        except UnicodeDecodeError:
            self._refuse(sid, 400, "a header is not valid UTF-8", now, out)
            return
        fields = dict(headers)
        if fields.get(":method") != "CONNECT":
            self._refuse(sid, 405, "HBONE accepts only CONNECT", now, out)
            return
        authority = fields.get(":authority", "")
        if not _valid_authority(authority):
            self._refuse(sid, 400, f"bad :authority {authority!r}", now, out)
            return
        self._streams[sid] = _Stream(bytearray())
        extra = tuple((k, v) for k, v in headers if not k.startswith(":"))
        out.append(TunnelRequested(sid, authority, extra))

    def _on_response(self, ev: h2.events.ResponseReceived, out: list[Event]) -> None:
        sid = ev.stream_id
        assert sid is not None
        fields = {_text(k, "replace"): _text(v, "replace") for k, v in ev.headers or ()}
        try:
            status = int(fields.get(":status", "0"))
        except ValueError:
            status = 0
        stream = self._streams.get(sid)
        if stream is None:
            return
        if 200 <= status < 300:
            stream.answered = True
            out.append(TunnelEstablished(sid))
            return
        self._try_reset(sid, CANCEL)
        self._drop(sid)
        out.append(TunnelRefused(sid, status, fields.get("x-meshnode-reason", "")))

    def _on_window(self, stream_id: int, out: list[Event]) -> None:
        if self._output_paused:
            return  # resume_output flushes
        targets = list(self._streams) if stream_id == 0 else [stream_id]
        for sid in targets:
            stream = self._streams.get(sid)
            if stream is None or not (stream.send_buffer or stream.end_after_flush):
                continue
            if not self._flush_stream(sid, stream, out):
                out.append(TunnelReset(sid, STREAM_CLOSED, True))
                continue
            if not stream.send_buffer:
                out.append(SendWindowOpened(sid))

    # -- limits ----------------------------------------------------------------

    def _count_reset(self, now: float, out: list[Event]) -> None:
        """A peer stream ended before it was served (reset by the peer, or
        refused by us). Over the limit: GOAWAY(ENHANCE_YOUR_CALM)."""
        resets = self._resets
        resets.append(now)
        cutoff = now - self.limits.reset_window
        while resets and resets[0] <= cutoff:
            resets.popleft()
        if len(resets) > self.limits.reset_limit and not self._ended:
            reason = (
                f"peer had more than {self.limits.reset_limit} streams reset or refused "
                f"within {self.limits.reset_window:g}s (rapid reset)"
            )
            log.debug("HBONE connection: %s; sending GOAWAY ENHANCE_YOUR_CALM", reason)
            self._fail_connection(ENHANCE_YOUR_CALM, reason, True, out)

    # -- containment -------------------------------------------------------------

    def _fail_stream(self, stream_id: int, what: str, exc: BaseException, out: list[Event]) -> None:
        """An h2 call for one stream failed: end that stream only."""
        log.info(
            "HBONE stream %d: %s failed (%s: %s); resetting this stream only",
            stream_id,
            what,
            type(exc).__name__,
            exc,
        )
        self._try_reset(stream_id, INTERNAL_ERROR)
        if self._drop(stream_id) is not None:
            out.append(TunnelReset(stream_id, INTERNAL_ERROR, False))

    def _fail_connection(
        self, code: int, reason: str, remote: bool, out: list[Event], stream_code: int | None = None
    ) -> None:
        """End the connection: GOAWAY (unless h2 sent one already), every
        stream reset, then ConnectionEnded."""
        self._ended = True
        if self._h2.state_machine.state != h2.connection.ConnectionState.CLOSED:
            try:
                self._h2.close_connection(code, additional_data=reason.encode()[:200])
            except Exception as exc:
                log.debug("HBONE GOAWAY not sent (%s: %s)", type(exc).__name__, exc)
        streams = list(self._streams)
        self._streams.clear()
        self._queued = 0
        stream_code = code if stream_code is None else stream_code
        out.extend(TunnelReset(sid, stream_code, remote) for sid in streams)
        out.append(ConnectionEnded(code, reason, remote))

    def _try_reset(self, stream_id: int, error_code: int) -> None:
        """RST_STREAM, best effort: h2 may know the stream as closed already."""
        if self._ended:
            return
        try:
            self._h2.reset_stream(stream_id, error_code)
        except Exception as exc:
            log.debug(
                "HBONE stream %d: RST_STREAM not sent (%s: %s)", stream_id, type(exc).__name__, exc
            )

    def _refuse(
        self, stream_id: int, status: int, reason: str, now: float, out: list[Event]
    ) -> None:
        if not self._ended:
            headers = [(":status", str(status))]
            if reason:
                headers.append(("x-meshnode-reason", _header_safe(reason)))
            try:
                self._h2.send_headers(stream_id, headers, end_stream=True)
            except h2.exceptions.StreamClosedError:
                pass  # the peer reset it meanwhile: nothing to answer
            except Exception as exc:
                # E.g. StreamIDTooLowError: the peer opened a higher stream and
                # h2 closed this one implicitly. Only this stream is concerned.
                log.info(
                    "HBONE stream %d: refusal %d not sent (%s: %s); resetting it",
                    stream_id,
                    status,
                    type(exc).__name__,
                    exc,
                )
                self._try_reset(stream_id, REFUSED_STREAM)
        self._drop(stream_id)
        if not self.client_side:
            self._count_reset(now, out)

    def _drop(self, stream_id: int) -> _Stream | None:
        """Forget the stream; give back the window of what it received and the
        shell did not acknowledge, and discard what it had queued."""
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return None
        if stream.send_buffer:
            self._queued -= len(stream.send_buffer)
            # Replace, don't resize: views of it may be alive in exception frames.
            stream.send_buffer = bytearray()
        if stream.unacked and not self._ended:
            n, stream.unacked = stream.unacked, 0
            try:
                self._h2.acknowledge_received_data(n, stream_id)
            except Exception as exc:
                log.debug(
                    "HBONE stream %d: window not returned (%s: %s)",
                    stream_id,
                    type(exc).__name__,
                    exc,
                )
        return stream

    def _opened(self, stream_id: int) -> bool:
        """Was this stream id ever in use on this connection?"""
        ours = (stream_id % 2 == 1) == self.client_side
        h2c = self._h2
        return stream_id <= (
            h2c.highest_outbound_stream_id if ours else h2c.highest_inbound_stream_id
        )

    def _now(self, now: float | None) -> float:
        if now is None:
            now = time.monotonic()
        if now > self._clock:
            self._clock = now
        return now

    # -- sending -------------------------------------------------------------

    def _send_window(self, stream_id: int, view: memoryview) -> int:
        """Send what the windows allow from ``view``; returns bytes sent."""
        h2conn = self._h2
        fast = h2compat.send_data_frames(h2conn, stream_id, view)
        if fast is not None:
            return fast
        sent = 0
        total = len(view)
        while sent < total:
            window = h2conn.local_flow_control_window(stream_id)
            if window <= 0:
                break
            chunk = min(window, h2conn.max_outbound_frame_size, total - sent)
            h2conn.send_data(stream_id, view[sent : sent + chunk])
            sent += chunk
        return sent

    def _flush_stream(self, stream_id: int, stream: _Stream, out: list[Event]) -> bool:
        """Send what the window allows; False if h2 has closed the stream."""
        if stream.send_buffer:
            try:
                sent = self._send_window(stream_id, memoryview(stream.send_buffer))
            except h2.exceptions.StreamClosedError:
                # The peer reset the stream in the same read as a window update
                # that came first: h2 has closed it, the queued data has nowhere
                # to go. Only this stream is affected, never the connection.
                self._drop(stream_id)
                return False
            except Exception as exc:
                self._fail_stream(stream_id, "sending queued data", exc, out)
                return True  # reported by _fail_stream
            if sent:
                del stream.send_buffer[:sent]
                self._queued -= sent
        if not stream.send_buffer and stream.end_after_flush:
            self._end_now(stream_id, stream, out)
        return True

    def _end_now(self, stream_id: int, stream: _Stream, out: list[Event]) -> None:
        stream.local_ended = True
        stream.end_after_flush = False
        try:
            self._h2.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            pass
        except Exception as exc:
            self._fail_stream(stream_id, "ending the stream", exc, out)
            return
        self._maybe_forget(stream_id, stream)

    def _maybe_forget(self, stream_id: int, stream: _Stream) -> None:
        if stream.local_ended and stream.remote_ended:
            # Both sides are done: what the shell still holds of this stream is
            # on its way out of a closing socket; its window goes back now.
            self._drop(stream_id)


def _text(value: bytes | str, errors: str = "strict") -> str:
    return value.decode("utf-8", errors) if isinstance(value, bytes) else str(value)


def _header_safe(reason: str) -> str:
    """A reason fit for a header value: printable ASCII, no surrounding blanks."""
    text = "".join(c if " " <= c <= "~" else "?" for c in reason[:200])
    return text.strip() or "-"


def _error_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"error {code}"


def error_name(code: int) -> str:
    """``ErrorCodes`` name of an HTTP/2 error code (``"error N"`` if unknown)."""
    return _error_name(code)


def _valid_authority(authority: str) -> bool:
    """``ip:port`` (IPv6 in brackets), or ``<dns name>:port`` for a tunnel that
    came from another zone through an ingress (a zone SNI, core/identity.py;
    the inbound side parses it further)."""
    host, sep, port = authority.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        return False
    if len(port) > 5 or not 0 < int(port) < 65536:
        return False
    if host.startswith("[") and host.endswith("]"):
        try:
            return ipaddress.ip_address(host[1:-1]).version == 6
        except ValueError:
            return False
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return ZoneSni.shaped(host)


def format_authority(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def split_authority(authority: str) -> tuple[str, int]:
    """``"10.0.0.1:80"`` -> ``("10.0.0.1", 80)``; brackets stripped for IPv6."""
    host, _, port = authority.rpartition(":")
    return host.strip("[]"), int(port)
