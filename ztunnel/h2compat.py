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
"""

from __future__ import annotations

from typing import Any

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
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
                    f"{self.max_frame_size} bytes allowed")
            kind = buf[3]
            if kind == _CONTINUATION:
                self._check_header_block(self._header_block_bytes + length)
            elif kind in (_HEADERS, _PUSH_PROMISE):
                self._check_header_block(length - _HEADER_FRAME_OVERHEAD)

    def _check_header_block(self, size: int) -> None:
        if size > self.max_header_block:
            raise h2.exceptions.DenialOfServiceError(
                f"header block of more than {self.max_header_block} bytes "
                f"(at least {size}): refused before buffering it")

    def _update_header_buffer(self, f: Any) -> Any:
        if f is not None and isinstance(
            f, (hyperframe.frame.HeadersFrame, hyperframe.frame.PushPromiseFrame,
                hyperframe.frame.ContinuationFrame)
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
            server=not self.config.client_side, max_header_block=max_header_block)

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


def outbound_buffer_size(conn: h2.connection.H2Connection) -> int:
    """Bytes h2 has serialized but not yet returned from ``data_to_send()``."""
    return len(conn._data_to_send)
