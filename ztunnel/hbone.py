"""HBONE, without I/O: HTTP/2 CONNECT tunnels over one (already secured) byte stream.

HBONE is Istio's tunnel protocol: each proxied TCP connection is one HTTP/2
stream opened with ``CONNECT`` and ``:authority = "<ip>:<port>"`` of the
destination workload; the stream's DATA frames carry the connection's bytes,
END_STREAM is a TCP half-close and RST_STREAM an abort. The TLS layer around it
lives in the asyncio shell (``ztunnel/session.py``); this module only turns bytes
into events and calls into bytes, so it is tested by feeding it bytes.

Flow control is manual and is our back-pressure: received data is acknowledged
(``ack``) only once the shell has handed it to the downstream socket, and data to
send is queued per stream while the peer's window is closed (``pending``).
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame


def _data_frame_summary(self: hyperframe.frame.DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


# h2 logs every received frame at "trace" level, and builds the message
# eagerly: repr(frame), which for DATA hex-encodes the whole payload -- about
# half of a receiving proxy's CPU in our bulk benchmark, for a string nobody
# reads. Summarize DATA frames instead (affects only that debug repr).
hyperframe.frame.DataFrame._body_repr = _data_frame_summary  # type: ignore[method-assign,assignment]

# Bigger frames and windows than HTTP/2's defaults: both ends are meshnode
# proxies moving bulk TCP, where per-frame overhead in Python dominates.
MAX_FRAME_SIZE = 1 << 20  # 1 MiB, below the protocol's 16 MiB ceiling
STREAM_WINDOW = 4 << 20  # per stream: what one slow reader may have in flight
CONNECTION_WINDOW = 64 << 20  # all streams of one connection together
DEFAULT_MAX_STREAMS = 100  # per connection, as Istio's ztunnel caps it

# Error codes, as RFC 9113 names them.
NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR
INTERNAL_ERROR = h2.errors.ErrorCodes.INTERNAL_ERROR
REFUSED_STREAM = h2.errors.ErrorCodes.REFUSED_STREAM
CANCEL = h2.errors.ErrorCodes.CANCEL
CONNECT_ERROR = h2.errors.ErrorCodes.CONNECT_ERROR


class _GracefulH2(h2.connection.H2Connection):
    """h2 treats any GOAWAY, sent or received, as the end of the connection. In
    RFC 9113 a GOAWAY with NO_ERROR only stops *new* streams: the ones already
    open may finish. Keep the connection open in that case; HboneConnection
    tracks "no new streams" itself."""

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        if frame.error_code != NO_ERROR:
            return super()._receive_goaway_frame(frame)
        prior = self.state_machine.state
        event = h2.events.ConnectionTerminated()
        event.error_code = NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        self.state_machine.state = prior
        return [], [event]

    def close_connection(self, error_code: int = 0, additional_data: bytes | None = None,
                         last_stream_id: int | None = None) -> None:
        prior = self.state_machine.state
        super().close_connection(error_code, additional_data, last_stream_id)
        if error_code == NO_ERROR:
            self.state_machine.state = prior


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
    """The connection is over (GOAWAY sent or received, or a protocol error).
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


class HboneConnection:
    """One HBONE connection, either end. Feed it the bytes read from the (TLS)
    transport with :meth:`receive_data`; write whatever :meth:`data_to_send`
    returns after every call."""

    def __init__(self, *, client_side: bool, max_concurrent_streams: int = DEFAULT_MAX_STREAMS):
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding="utf-8",
            validate_inbound_headers=True,
            validate_outbound_headers=True,
        )
        self.client_side = client_side
        self._h2 = _GracefulH2(config=config)
        self._h2.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # Announced in our first SETTINGS frame, so valid from the start; h2 only
        # picks up *changed* settings on ACK, so tell its frame reader directly.
        self._h2.max_inbound_frame_size = MAX_FRAME_SIZE
        self._streams: dict[int, _Stream] = {}
        self._ended = False  # unusable: an error, or everything finished after GOAWAY
        self._draining = False  # a GOAWAY(NO_ERROR) went either way: no new streams
        self._goaway_last: int | None = None  # the last peer stream we promised to serve
        self.max_concurrent_streams = max_concurrent_streams
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
        stream_id = self._h2.get_next_available_stream_id()
        request = [(":method", "CONNECT"), (":authority", authority), *headers]
        try:
            self._h2.send_headers(stream_id, request)
        except h2.exceptions.ProtocolError as exc:
            raise LocalProtocolError(f"cannot open tunnel to {authority}: {exc}") from exc
        self._streams[stream_id] = _Stream(bytearray())
        return stream_id

    def accept_tunnel(self, stream_id: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Server side: answer 200; bytes may flow."""
        self._h2.send_headers(stream_id, [(":status", "200"), *headers])

    def refuse_tunnel(self, stream_id: int, status: int, reason: str = "") -> None:
        """Server side: answer a non-2xx status and end the stream."""
        headers = [(":status", str(status))]
        if reason:
            headers.append(("x-meshnode-reason", reason[:200]))
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._h2.send_headers(stream_id, headers, end_stream=True)
        self._streams.pop(stream_id, None)

    def send(self, stream_id: int, data: bytes) -> None:
        """Queue ``data`` on the stream and send as much as the peer's window
        allows now; check :meth:`pending` for what is left."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_ended or stream.end_after_flush:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        if stream.send_buffer:
            stream.send_buffer += data
            self._flush_stream(stream_id, stream)
            return
        # Fast path: nothing queued, send straight from the caller's buffer.
        sent = self._send_window(stream_id, memoryview(data))
        if sent < len(data):
            stream.send_buffer += data[sent:]

    def end(self, stream_id: int) -> None:
        """Half-close our side of the stream once queued data has gone out."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_ended:
            return
        if stream.send_buffer:
            stream.end_after_flush = True
            return
        self._end_now(stream_id, stream)

    def reset(self, stream_id: int, error_code: int = CANCEL) -> None:
        """Abort the stream (the tunnelled connection failed on our side)."""
        if self._streams.pop(stream_id, None) is None:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._h2.reset_stream(stream_id, error_code)

    def ack(self, stream_id: int, flow_length: int) -> None:
        """Data of that length was written downstream: give the window back."""
        if flow_length <= 0 or self._ended:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._h2.acknowledge_received_data(flow_length, stream_id)

    def close(self, error_code: int = NO_ERROR, reason: str = "") -> None:
        """Send GOAWAY. With NO_ERROR the open streams may still finish (no new
        ones are accepted); with an error code the connection is over and open
        streams are the shell's to abort."""
        if self._ended or (self._draining and error_code == NO_ERROR and self._goaway_last
                           is not None):
            return
        self._goaway_last = self._h2.highest_inbound_stream_id
        self._h2.close_connection(error_code, additional_data=reason.encode()[:200] or None)
        if error_code == NO_ERROR:
            self._draining = True
        else:
            self._ended = True

    def ping(self, opaque: bytes = b"mnkeepal") -> None:
        self._h2.ping(opaque)

    # -- input ---------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Process bytes from the peer. A malformed input does not raise: the
        connection answers with GOAWAY(PROTOCOL_ERROR) and a ConnectionEnded
        event is returned."""
        if self._ended:
            return []
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            code = int(getattr(exc, "error_code", PROTOCOL_ERROR) or PROTOCOL_ERROR)
            return self._protocol_error(code, str(exc) or type(exc).__name__)
        out: list[Event] = []
        for ev in h2_events:
            self._translate(ev, out)
        return out

    def _protocol_error(self, code: int, reason: str) -> list[Event]:
        self._ended = True
        # h2 has usually answered with its own GOAWAY already; send one only if not.
        if self._h2.state_machine.state != h2.connection.ConnectionState.CLOSED:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection(code, additional_data=reason.encode()[:200])
        streams = list(self._streams)
        self._streams.clear()
        out: list[Event] = [TunnelReset(sid, code, True) for sid in streams]
        out.append(ConnectionEnded(code, f"protocol error from peer: {reason}", True))
        return out

    def _translate(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.DataReceived):
            assert ev.stream_id is not None
            if ev.stream_id in self._streams:
                if ev.data or ev.flow_controlled_length:
                        out.append(
                        DataReceived(ev.stream_id, ev.data or b"", ev.flow_controlled_length or 0)
                    )
            elif ev.flow_controlled_length:
                # Data for a stream we already dropped: return its window at once.
                self._h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            # h2 lists END_STREAM as its own StreamEnded event after this one.
        elif isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev, out)
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
            if self._streams.pop(ev.stream_id, None) is not None:
                out.append(TunnelReset(ev.stream_id, int(ev.error_code or 0), True))
        elif isinstance(ev, h2.events.WindowUpdated):
            self._on_window(ev.stream_id or 0, out)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                self._on_window(0, out)
        elif isinstance(ev, h2.events.ConnectionTerminated):
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
                    del self._streams[sid]
                    out.append(TunnelReset(sid, REFUSED_STREAM, True))
            name = _error_name(code)
            out.append(
                ConnectionEnded(code, f"peer sent GOAWAY {name} {detail}".strip(), True, last)
            )
        # Pings, settings acks and priority frames need nothing from the shell.

    def _on_request(self, ev: h2.events.RequestReceived, out: list[Event]) -> None:
        assert ev.stream_id is not None
        if self._goaway_last is not None and ev.stream_id > self._goaway_last:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self._h2.reset_stream(ev.stream_id, REFUSED_STREAM)
            return
        headers = tuple((str(k), str(v)) for k, v in ev.headers or ())
        fields = dict(headers)
        if fields.get(":method") != "CONNECT":
            self.refuse_tunnel(ev.stream_id, 405, "HBONE accepts only CONNECT")
            return
        authority = fields.get(":authority", "")
        if not _valid_authority(authority):
            self.refuse_tunnel(ev.stream_id, 400, f"bad :authority {authority!r}")
            return
        self._streams[ev.stream_id] = _Stream(bytearray())
        extra = tuple((k, v) for k, v in headers if not k.startswith(":"))
        out.append(TunnelRequested(ev.stream_id, authority, extra))

    def _on_response(self, ev: h2.events.ResponseReceived, out: list[Event]) -> None:
        assert ev.stream_id is not None
        fields = {str(k): str(v) for k, v in ev.headers or ()}
        try:
            status = int(fields.get(":status", "0"))
        except ValueError:
            status = 0
        if 200 <= status < 300:
            out.append(TunnelEstablished(ev.stream_id))
            return
        self._streams.pop(ev.stream_id, None)
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._h2.reset_stream(ev.stream_id, CANCEL)
        out.append(TunnelRefused(ev.stream_id, status, fields.get("x-meshnode-reason", "")))

    def _on_window(self, stream_id: int, out: list[Event]) -> None:
        targets = list(self._streams) if stream_id == 0 else [stream_id]
        for sid in targets:
            stream = self._streams.get(sid)
            if stream is None or not (stream.send_buffer or stream.end_after_flush):
                continue
            if not self._flush_stream(sid, stream):
                out.append(TunnelReset(sid, h2.errors.ErrorCodes.STREAM_CLOSED, True))
                continue
            if not stream.send_buffer:
                out.append(SendWindowOpened(sid))

    # -- sending -------------------------------------------------------------

    def _send_window(self, stream_id: int, view: memoryview) -> int:
        """Send what the windows allow from ``view``; returns bytes sent."""
        sent = 0
        total = len(view)
        h2conn = self._h2
        while sent < total:
            window = h2conn.local_flow_control_window(stream_id)
            if window <= 0:
                break
            chunk = min(window, h2conn.max_outbound_frame_size, total - sent)
            h2conn.send_data(stream_id, view[sent : sent + chunk])
            sent += chunk
        return sent

    def _flush_stream(self, stream_id: int, stream: _Stream) -> bool:
        """Send what the window allows; False if h2 has closed the stream."""
        if stream.send_buffer:
            try:
                sent = self._send_window(stream_id, memoryview(stream.send_buffer))
            except h2.exceptions.StreamClosedError:
                closed = True
            else:
                closed = False
            if closed:
                # The peer reset the stream in the same read as a window update
                # that came first: h2 has closed it, the queued data has nowhere
                # to go. Only this stream is affected, never the connection.
                # (Replace the buffer, don't resize it: views of it may still be
                # alive in the exception's frames.)
                stream.send_buffer = bytearray()
                stream.end_after_flush = False
                self._streams.pop(stream_id, None)
                return False
            if sent:
                del stream.send_buffer[:sent]
        if not stream.send_buffer and stream.end_after_flush:
            self._end_now(stream_id, stream)
        return True

    def _end_now(self, stream_id: int, stream: _Stream) -> None:
        stream.local_ended = True
        stream.end_after_flush = False
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._h2.end_stream(stream_id)
        self._maybe_forget(stream_id, stream)

    def _maybe_forget(self, stream_id: int, stream: _Stream) -> None:
        if stream.local_ended and stream.remote_ended:
            self._streams.pop(stream_id, None)


def _error_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"error {code}"


def _valid_authority(authority: str) -> bool:
    """``ip:port`` (IPv6 in brackets), the only form HBONE uses."""
    host, sep, port = authority.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        return False
    if not 0 < int(port) < 65536:
        return False
    if host.startswith("[") and host.endswith("]"):
        try:
            return ipaddress.ip_address(host[1:-1]).version == 6
        except ValueError:
            return False
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


def split_authority(authority: str) -> tuple[str, int]:
    """``"10.0.0.1:80"`` -> ``("10.0.0.1", 80)``; brackets stripped for IPv6."""
    host, _, port = authority.rpartition(":")
    return host.strip("[]"), int(port)
