"""Everything meshnode changes inside h2 and hyperframe, in one place.

h2 is a sound HTTP/2 state machine, but a few of its behaviours do not fit a
proxy facing hostile peers, and one of its debug paths is slow. Each change here
overrides a *private* attribute or method, so it is pinned to the versions in
pyproject.toml and ``tests/unit/ztunnel/test_h2compat.py`` checks that every name we touch
still exists with the signature and the behaviour we rely on: a new h2 that
moves them fails that test loudly instead of silently dropping a defence.

What is changed, and why:

* ``hyperframe.frame.DataFrame._body_repr``: h2 logs each received frame at
  "trace" level and builds the message eagerly: ``repr(frame)`` hex-encodes a
  DATA payload -- about half of a receiving proxy's CPU in the bulk benchmark,
  for a string nobody reads. DATA frames are summarized instead.
* ``GracefulH2Connection._receive_goaway_frame`` / ``close_connection``: h2
  treats any GOAWAY as the end of the connection. In RFC 9113 a GOAWAY with
  NO_ERROR only stops *new* streams; open ones may finish.
* ``BoundedFrameBuffer`` (h2's ``FrameBuffer``): h2 reads a whole frame before
  checking its length against SETTINGS_MAX_FRAME_SIZE, and collects up to 64
  CONTINUATION frames of any size before decoding a header block (64 x 1 MiB
  frames = 64 MiB held for one header block). Here a frame announcing too big
  a length, or a header block growing past the header-list limit, is refused
  as soon as its 9-byte frame header arrives.
* ``outbound_buffer_size``: how many bytes h2 has serialized and not yet handed
  out with ``data_to_send()``, without copying them.
* ``send_data_frames`` / ``DataSplitter``: the DATA hot path. DATA frames of
  open streams are framed into h2's output buffer and split off the input here,
  with h2's flow-control windows updated exactly as h2 would; everything else
  still goes through h2 (see the section below).
"""

from __future__ import annotations

import struct
from typing import Any

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.stream
import hyperframe.frame

NO_ERROR = h2.errors.ErrorCodes.NO_ERROR

# The frame types that carry a header block (RFC 9113 section 4.3).
_HEADERS, _PUSH_PROMISE, _CONTINUATION = 0x1, 0x5, 0x9
# A header frame's payload may add padding (<= 256 bytes) and priority (5)
# around the block itself.
_HEADER_FRAME_OVERHEAD = 256 + 5


# --- hyperframe: cheap DATA repr ---------------------------------------------------


def _data_frame_summary(self: hyperframe.frame.DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


def install() -> None:
    """Apply the process-wide patch (idempotent; done on import)."""
    hyperframe.frame.DataFrame._body_repr = _data_frame_summary  # type: ignore[method-assign,assignment]


install()


# --- h2: bounded frame buffer --------------------------------------------------------

# Where FrameBuffer keeps the bytes not yet parsed: ``data`` up to h2 4.2,
# ``_data`` (a bytearray) from 4.3.
_BUFFER_ATTR = "_data" if "_data" in vars(h2.frame_buffer.FrameBuffer()) else "data"
# Up to 4.2 that buffer is bytes, which cannot be extended with a memoryview.
_to_h2: Any = (lambda b: b) if _BUFFER_ATTR == "_data" else bytes


class BoundedFrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, refusing oversized frames and header blocks when
    their frame header arrives rather than after their payload is buffered.

    ``max_frame_size`` is h2's own attribute (h2 sets it from the settings on
    every ``receive_data``); ``max_header_block`` is ours."""

    def __init__(self, server: bool = False, *, max_header_block: int = 1 << 16) -> None:
        super().__init__(server=server)
        self.max_header_block = max_header_block
        self._header_block_bytes = 0  # of the header block being assembled

    def add_data(self, data: Any) -> None:
        super().add_data(data)
        buf = getattr(self, _BUFFER_ATTR)
        # Only the first frame can be incomplete after the last iteration, so
        # this look at one frame header per read is enough to bound what is held.
        if len(buf) >= 9:
            length = int.from_bytes(buf[0:3], "big")
            if length > self.max_frame_size > 0:
                raise h2.exceptions.FrameTooLargeError(
                    f"frame of {length} bytes announced, more than the "
                    f"{self.max_frame_size} bytes allowed"
                )
            kind = buf[3]
            if kind == _CONTINUATION:
                self._check_header_block(self._header_block_bytes + length)
            elif kind in (_HEADERS, _PUSH_PROMISE):
                self._check_header_block(length - _HEADER_FRAME_OVERHEAD)

    def _check_header_block(self, size: int) -> None:
        if size > self.max_header_block:
            raise h2.exceptions.DenialOfServiceError(
                f"header block of more than {self.max_header_block} bytes "
                f"(at least {size}): refused before buffering it"
            )

    def _update_header_buffer(self, f: Any) -> Any:
        if f is not None and isinstance(
            f,
            (
                hyperframe.frame.HeadersFrame,
                hyperframe.frame.PushPromiseFrame,
                hyperframe.frame.ContinuationFrame,
            ),
        ):
            if isinstance(f, hyperframe.frame.ContinuationFrame) or "END_HEADERS" not in f.flags:
                self._header_block_bytes += len(f.data)
                self._check_header_block(self._header_block_bytes)
            if "END_HEADERS" in f.flags:
                self._header_block_bytes = 0
        return super()._update_header_buffer(f)


# --- h2: graceful GOAWAY -------------------------------------------------------------


class GracefulH2Connection(h2.connection.H2Connection):
    """h2 treats any GOAWAY, sent or received, as the end of the connection. In
    RFC 9113 a GOAWAY with NO_ERROR only stops *new* streams: the ones already
    open may finish. Keep the connection open in that case; HboneConnection
    tracks "no new streams" itself. Reads frames through a BoundedFrameBuffer."""

    def __init__(self, config: Any = None, *, max_header_block: int = 1 << 16) -> None:
        super().__init__(config=config)
        self.incoming_buffer = BoundedFrameBuffer(
            server=not self.config.client_side, max_header_block=max_header_block
        )

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

    def close_connection(
        self,
        error_code: int = 0,
        additional_data: bytes | None = None,
        last_stream_id: int | None = None,
    ) -> None:
        prior = self.state_machine.state
        super().close_connection(error_code, additional_data, last_stream_id)
        if error_code == NO_ERROR:
            self.state_machine.state = prior


def outbound_buffer_size(conn: h2.connection.H2Connection) -> int:
    """Bytes h2 has serialized but not yet returned from ``data_to_send()``."""
    return len(conn._data_to_send)


# --- h2: DATA frames framed and parsed here (the hot path) ---------------------------
#
# h2 sends a DATA frame by running two state machines, building a hyperframe
# object, serializing it and joining a list; it receives one by parsing a frame
# object, running both state machines and building a DataReceived event. For a
# tunnel that is just bytes, that is most of a keep-alive request's proxy CPU.
# Below, DATA frames on streams h2 has in a state where DATA changes nothing but
# the windows are framed (``send_data_frames``) and split off the input
# (``DataSplitter``) here, with the windows accounted exactly as h2 would; any
# other frame, any other state, padding, END_STREAM, a frame too large or over a
# window goes through h2 unchanged, so its checks and errors are the same.

_DATA = 0x0
_HEADER_KINDS = frozenset({_HEADERS, _PUSH_PROMISE, _CONTINUATION})
_DATA_HEADER = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, stream
_STREAM_ID_MASK = 0x7FFFFFFF
_CONN_OPEN = frozenset(
    {h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionState.SERVER_OPEN}
)
_SEND_DATA_STATES = frozenset(
    {h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_REMOTE}
)
_RECV_DATA_STATES = frozenset({h2.stream.StreamState.OPEN, h2.stream.StreamState.HALF_CLOSED_LOCAL})


def send_data_frames(
    conn: h2.connection.H2Connection, stream_id: int, data: memoryview
) -> int | None:
    """Frame as much of ``data`` as the windows and the peer's frame size allow
    as DATA frames (no END_STREAM, no padding) into h2's output, taking it off
    both send windows as ``H2Connection.send_data`` does. Returns the bytes
    sent, or None when h2 must do it (not an open connection and stream): the
    caller then uses ``send_data``, which raises what it raises."""
    if conn.state_machine.state not in _CONN_OPEN:
        return None
    stream = conn.streams.get(stream_id)
    if stream is None or stream.state_machine.state not in _SEND_DATA_STATES:
        return None
    out = conn._data_to_send
    max_frame = conn.max_outbound_frame_size
    total = len(data)
    sent = 0
    pack = _DATA_HEADER.pack
    while sent < total:
        window = min(conn.outbound_flow_control_window, stream.outbound_flow_control_window)
        if window <= 0:
            break
        n = min(window, max_frame, total - sent)
        out += pack(n >> 16, n & 0xFFFF, _DATA, 0, stream_id)
        out += data[sent : sent + n]
        conn.outbound_flow_control_window -= n
        stream.outbound_flow_control_window -= n
        sent += n
    return sent


class DataSplitter:
    """Splits the bytes read from the peer into DATA payloads of open streams,
    accounted here, and everything else, for ``H2Connection.receive_data``.

    ``split`` yields ``(stream_id, payload)`` for a DATA frame taken here and
    ``(0, chunk)`` for bytes h2 must read. It is a generator so that each
    decision is made after the caller has fed h2 everything before it (a
    HEADERS frame opening the stream, an RST_STREAM closing it). A DATA frame
    is taken only when, at the time it is complete: h2 holds no partial frame
    or header block, the connection is open, the stream is one of ``wanted``
    and in a state where h2 would only count it, the stream expects no
    content-length, the frame has no flags and fits both receive windows.
    Incomplete frames are held here until complete (at most h2's own frame
    limit), except header-block frames and frames over the limit, which go to
    h2 at once so that it refuses them at their frame header as before."""

    def __init__(self, conn: h2.connection.H2Connection) -> None:
        self.conn = conn
        self._held = bytearray()  # the start of a DATA frame we will take

    @property
    def held(self) -> int:
        return len(self._held)

    def _h2_busy(self) -> bool:
        fb = self.conn.incoming_buffer
        return bool(getattr(fb, _BUFFER_ATTR)) or bool(fb._headers_buffer)

    def split(self, data: bytes, wanted: Any) -> Any:
        if self._held:
            self._held += data
            buf: Any = self._held
            self._held = bytearray()
        else:
            buf = data
        n = len(buf)
        if not wanted or self._h2_busy():
            if n:
                yield 0, buf
            return
        view = memoryview(buf)
        conn = self.conn
        pos = 0
        start = 0  # of bytes not yet handed to h2
        while n - pos >= 9:
            length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            end = pos + 9 + length
            kind = buf[pos + 3]
            if end > n:
                if length > conn.max_inbound_frame_size or kind in _HEADER_KINDS:
                    break  # h2 takes it from here, and refuses it early if too large
                # Hold an incomplete frame (at most h2's own frame limit), so that
                # h2 sees whole frames and the next DATA frame can be taken here.
                if start < pos:
                    yield 0, _to_h2(view[start:pos])
                    start = pos
                if self._h2_busy():
                    break
                self._held = bytearray(view[pos:])
                return
            if kind != _DATA or buf[pos + 4] != 0 or length > conn.max_inbound_frame_size:
                pos = end
                continue
            if start < pos:
                yield 0, _to_h2(view[start:pos])
                start = pos
                if self._h2_busy():
                    break
            sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & _STREAM_ID_MASK
            if sid in wanted and self._take(sid, length):
                yield sid, bytes(view[pos + 9 : end])
                start = end
            pos = end
        else:
            # Less than a frame header left: hold it, unless h2 is mid-frame.
            if start < pos:
                yield 0, _to_h2(view[start:pos])
                start = pos
            if pos < n and not self._h2_busy():
                self._held = bytearray(view[pos:])
                return
        if start < n:
            yield 0, _to_h2(view[start:])

    def _take(self, stream_id: int, length: int) -> bool:
        """Account a DATA frame of ``length`` on the stream as h2 would, if it
        would do nothing else with it."""
        conn = self.conn
        if conn.state_machine.state not in _CONN_OPEN:
            return False
        stream = conn.streams.get(stream_id)
        if stream is None:
            return False
        machine = stream.state_machine
        if (
            machine.state not in _RECV_DATA_STATES
            or not machine.headers_received
            or stream._expected_content_length is not None
        ):
            return False
        conn_window = conn._inbound_flow_control_window_manager
        stream_window = stream._inbound_window_manager
        if length > conn_window.current_window_size or length > stream_window.current_window_size:
            return False  # h2 raises the flow-control error
        conn_window.window_consumed(length)
        stream_window.window_consumed(length)
        return True
