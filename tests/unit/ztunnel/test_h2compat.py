"""meshnode overrides private parts of h2 and hyperframe (ztunnel/h2compat.py).
These tests fail loudly when a new version moves or changes what we rely on --
update h2compat (and the bounds in pyproject.toml) then, instead of losing a
defence silently."""

from __future__ import annotations

import inspect
import tomllib
from importlib import metadata

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
import hpack
import hyperframe.frame
import pytest

from meshnode.ztunnel import h2compat
from tests.support import REPO

ROOT = REPO


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


@pytest.mark.parametrize("package", ["h2", "hyperframe", "hpack"])
def test_installed_versions_are_within_the_bounds_we_checked(package: str) -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if d.split(">")[0].split("<")[0] == package]
    lower = spec.split(">=")[1].split(",")[0]
    upper = spec.split("<")[1]
    installed = _version(metadata.version(package))
    assert _version(lower) <= installed < _version(upper), (
        f"{package} {metadata.version(package)} is outside {spec}: re-check ztunnel/h2compat.py"
    )


# --- hyperframe: the DATA repr patch ------------------------------------------------


def test_data_frame_repr_is_summarized() -> None:
    assert hasattr(hyperframe.frame.DataFrame, "_body_repr")
    frame = hyperframe.frame.DataFrame(1, data=b"\xab" * 5000)
    text = repr(frame)
    assert "<5000 bytes>" in text
    assert "abab" not in text
    # The patch lives in the repr hook only: serialization is untouched.
    assert frame.serialize().endswith(b"\xab" * 5000)


# --- h2: the graceful GOAWAY override ----------------------------------------------------


def test_overridden_methods_exist_with_the_signatures_we_override() -> None:
    base = h2.connection.H2Connection
    assert list(inspect.signature(base._receive_goaway_frame).parameters) == ["self", "frame"]
    assert list(inspect.signature(base.close_connection).parameters) == [
        "self",
        "error_code",
        "additional_data",
        "last_stream_id",
    ]
    conn = base()
    # h2 dispatches GOAWAY through a table built from bound methods in __init__:
    # an override only works if the table looks the method up on the instance.
    assert conn._frame_dispatch_table[hyperframe.frame.GoAwayFrame].__func__ is (
        base._receive_goaway_frame
    )
    graceful = h2compat.GracefulH2Connection()
    assert graceful._frame_dispatch_table[hyperframe.frame.GoAwayFrame].__func__ is (
        h2compat.GracefulH2Connection._receive_goaway_frame
    )


def _pair() -> tuple[h2compat.GracefulH2Connection, h2.connection.H2Connection]:
    client = h2compat.GracefulH2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


def test_graceful_goaway_keeps_open_streams_usable() -> None:
    client, server = _pair()
    client.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    server.receive_data(client.data_to_send())
    server.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=1)
    (event,) = client.receive_data(server.data_to_send())
    assert isinstance(event, h2.events.ConnectionTerminated)
    assert event.error_code == h2.errors.ErrorCodes.NO_ERROR and event.last_stream_id == 1
    client.send_data(1, b"still open")  # plain h2 raises ProtocolError here
    assert client.data_to_send()


def test_goaway_with_an_error_still_ends_the_connection() -> None:
    client, server = _pair()
    server.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
    client.receive_data(server.data_to_send())
    assert client.state_machine.state == h2.connection.ConnectionState.CLOSED


def test_local_graceful_goaway_keeps_the_connection_open() -> None:
    client, _ = _pair()
    client.close_connection(h2.errors.ErrorCodes.NO_ERROR)
    assert client.state_machine.state != h2.connection.ConnectionState.CLOSED


# --- h2: the bounded frame buffer --------------------------------------------------------


def test_frame_buffer_internals_we_rely_on() -> None:
    fb = h2.frame_buffer.FrameBuffer(server=False)
    assert isinstance(getattr(fb, h2compat._BUFFER_ATTR), (bytes, bytearray))
    assert hasattr(fb, "max_frame_size")
    assert hasattr(fb, "_headers_buffer")
    assert list(inspect.signature(fb._update_header_buffer).parameters) == ["f"]
    assert h2.frame_buffer.CONTINUATION_BACKLOG >= 1
    conn = h2compat.GracefulH2Connection()
    assert isinstance(conn.incoming_buffer, h2compat.BoundedFrameBuffer)
    assert issubclass(h2.exceptions.DenialOfServiceError, h2.exceptions.ProtocolError)
    assert h2.exceptions.DenialOfServiceError.error_code == (h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)


def test_h2_sets_the_frame_limit_on_its_buffer_each_read() -> None:
    conn = h2compat.GracefulH2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.max_inbound_frame_size = 12345
    conn.receive_data(b"")
    assert conn.incoming_buffer.max_frame_size == 12345


def _server() -> h2compat.GracefulH2Connection:
    conn = h2compat.GracefulH2Connection(
        h2.config.H2Configuration(client_side=False), max_header_block=1000
    )
    conn.initiate_connection()
    conn.receive_data(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + hyperframe.frame.SettingsFrame(0).serialize()
    )
    return conn


def test_header_block_over_the_limit_raises_denial_of_service_at_the_frame_header() -> None:
    conn = _server()
    first = hyperframe.frame.HeadersFrame(1, data=b"\x00" * 600)  # no END_HEADERS
    conn.receive_data(first.serialize())
    more = hyperframe.frame.ContinuationFrame(1, data=b"\x00" * 600).serialize()
    with pytest.raises(h2.exceptions.DenialOfServiceError):
        conn.receive_data(more[:9])  # just the frame header of the second piece


def test_frame_longer_than_allowed_raises_at_the_frame_header() -> None:
    conn = _server()
    header = (conn.max_inbound_frame_size + 1).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01"
    with pytest.raises(h2.exceptions.FrameTooLargeError):
        conn.receive_data(header)


def test_decoder_header_list_limit_is_enforced_by_hpack() -> None:
    decoder = hpack.Decoder()
    decoder.max_header_list_size = 100
    block = hpack.Encoder().encode([("x-big", "v" * 200)])
    with pytest.raises(hpack.OversizedHeaderListError):
        decoder.decode(block)
    assert h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE == 0x6


def test_header_encoding_none_gives_bytes() -> None:
    """hbone decodes header bytes itself, so a bad one fails its stream only."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    client.initiate_connection()
    client.send_headers(
        1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80"), (b"x-bin", b"\xff")]
    )
    (_settings, request) = server.receive_data(client.data_to_send())[:2]
    assert isinstance(request, h2.events.RequestReceived)
    assert all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in request.headers)


# --- h2: the outbound buffer size ------------------------------------------------------------


def test_outbound_buffer_size_matches_data_to_send() -> None:
    conn = h2.connection.H2Connection()
    conn.initiate_connection()
    size = h2compat.outbound_buffer_size(conn)
    assert size > 0
    assert size == len(conn.data_to_send())
    assert h2compat.outbound_buffer_size(conn) == 0


# --- h2: DATA frames framed and split off here ----------------------------------------------


def test_data_fast_path_internals_we_rely_on() -> None:
    client, server = _open_stream()
    assert isinstance(client._data_to_send, bytearray)
    assert {
        h2.connection.ConnectionState.CLIENT_OPEN,
        h2.connection.ConnectionState.SERVER_OPEN,
    } <= set(h2.connection.ConnectionState)
    stream = server.streams[1]
    assert isinstance(stream.outbound_flow_control_window, int)
    assert stream.state_machine.headers_received is True
    assert stream._expected_content_length is None
    for manager in (server._inbound_flow_control_window_manager, stream._inbound_window_manager):
        assert isinstance(manager.current_window_size, int)
        assert inspect.signature(manager.window_consumed).parameters.keys() == {"size"}
    assert server.incoming_buffer._headers_buffer == []
    # DATA changes no state in the states the fast path accepts.
    t = h2.stream._transitions
    s, i = h2.stream.StreamState, h2.stream.StreamInputs
    assert t[(s.OPEN, i.SEND_DATA)] == (None, s.OPEN)
    assert t[(s.HALF_CLOSED_REMOTE, i.SEND_DATA)] == (None, s.HALF_CLOSED_REMOTE)
    assert t[(s.OPEN, i.RECV_DATA)][1] == s.OPEN
    assert t[(s.HALF_CLOSED_LOCAL, i.RECV_DATA)][1] == s.HALF_CLOSED_LOCAL


def _open_stream() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "200")])
    client.receive_data(server.data_to_send())
    return client, server


def _h2_send(conn: h2.connection.H2Connection, sid: int, data: bytes) -> int:
    sent = 0
    while sent < len(data):
        n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(data) - sent)
        if n <= 0:
            break
        conn.send_data(sid, data[sent : sent + n])
        sent += n
    return sent


def test_fast_send_writes_the_bytes_and_windows_h2_would() -> None:
    data = bytes(range(256)) * 400  # 102400: several frames, more than the 65535 window
    ours, _ = _open_stream()
    theirs, _ = _open_stream()
    sent = h2compat.send_data_frames(ours, 1, memoryview(data))
    assert sent == _h2_send(theirs, 1, data) == 65535
    assert ours.data_to_send() == theirs.data_to_send()
    assert ours.local_flow_control_window(1) == theirs.local_flow_control_window(1) == 0
    assert ours.outbound_flow_control_window == theirs.outbound_flow_control_window


def test_fast_send_leaves_closed_streams_to_h2() -> None:
    client, _ = _open_stream()
    client.end_stream(1)
    client.data_to_send()
    # Our side ended: the fast path declines, and h2 refuses as it always did.
    assert h2compat.send_data_frames(client, 1, memoryview(b"x")) is None
    with pytest.raises(h2.exceptions.ProtocolError):
        client.send_data(1, b"x")
    client.close_connection()
    assert h2compat.send_data_frames(client, 1, memoryview(b"x")) is None


def _split_all(
    splitter: h2compat.DataSplitter, conn: h2.connection.H2Connection, wire: bytes, step: int
) -> tuple[bytes, int, list[h2.events.Event]]:
    got, taken, events = bytearray(), 0, []
    for i in range(0, len(wire), step):
        for sid, chunk in splitter.split(wire[i : i + step], {1}):
            if sid:
                got += chunk
                taken += 1
            else:
                for ev in conn.receive_data(bytes(chunk)):
                    events.append(ev)
                    if isinstance(ev, h2.events.DataReceived):
                        got += ev.data
    return bytes(got), taken, events


@pytest.mark.parametrize("step", [1, 7, 9, 1000, 1 << 20])
def test_splitter_delivers_and_accounts_like_h2(step: int) -> None:
    client, ours = _open_stream()
    data = bytes(range(256)) * 200  # 51200 bytes, 4 frames
    _h2_send(client, 1, data)
    client.ping(b"12345678")  # a frame h2 handles, between DATA frames
    _h2_send(client, 1, b"tail")
    wire = client.data_to_send()
    _, theirs = _open_stream()
    their_events = theirs.receive_data(wire)
    splitter = h2compat.DataSplitter(ours)
    got, taken, events = _split_all(splitter, ours, wire, step)
    assert got == data + b"tail"
    assert taken == 5  # every DATA frame went around h2's event machinery
    assert [type(e) for e in events] == [h2.events.PingReceived]
    assert [type(e) for e in their_events].count(h2.events.DataReceived) == 5
    assert splitter.held == 0
    for conn in (ours, theirs):
        assert conn.remote_flow_control_window(1) == 65535 - len(data) - 4
    assert (
        ours._inbound_flow_control_window_manager.current_window_size
        == theirs._inbound_flow_control_window_manager.current_window_size
    )
    # Acknowledging gives the window back through h2 as before.
    ours.acknowledge_received_data(len(data) + 4, 1)
    theirs.acknowledge_received_data(len(data) + 4, 1)
    assert ours.data_to_send() == theirs.data_to_send() != b""


def test_splitter_leaves_end_stream_padding_and_overflow_to_h2() -> None:
    client, server = _open_stream()
    splitter = h2compat.DataSplitter(server)
    padded = hyperframe.frame.DataFrame(1, data=b"pad", flags=["PADDED"])
    padded.pad_length = 3
    ended = hyperframe.frame.DataFrame(1, data=b"end", flags=["END_STREAM"])
    wire = padded.serialize() + ended.serialize()
    _, taken, events = _split_all(splitter, server, wire, 1 << 20)
    assert taken == 0
    assert [type(e) for e in events] == [
        h2.events.DataReceived,
        h2.events.DataReceived,
        h2.events.StreamEnded,
    ]
    # More than the window: h2 sees the frame and raises its own error.
    client2, server2 = _open_stream()
    big = b"".join(hyperframe.frame.DataFrame(1, data=b"x" * 16384).serialize() for _ in range(4))
    splitter2 = h2compat.DataSplitter(server2)
    with pytest.raises(h2.exceptions.FlowControlError):
        _split_all(splitter2, server2, big, 1 << 20)
