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
        f"{package} {metadata.version(package)} is outside {spec}: re-check ztunnel/h2compat.py")


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
        "self", "error_code", "additional_data", "last_stream_id"]
    conn = base()
    # h2 dispatches GOAWAY through a table built from bound methods in __init__:
    # an override only works if the table looks the method up on the instance.
    assert conn._frame_dispatch_table[hyperframe.frame.GoAwayFrame].__func__ is (
        base._receive_goaway_frame)
    graceful = h2compat.GracefulH2Connection()
    assert graceful._frame_dispatch_table[hyperframe.frame.GoAwayFrame].__func__ is (
        h2compat.GracefulH2Connection._receive_goaway_frame)


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
    assert h2.exceptions.DenialOfServiceError.error_code == (
        h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)


def test_h2_sets_the_frame_limit_on_its_buffer_each_read() -> None:
    conn = h2compat.GracefulH2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.max_inbound_frame_size = 12345
    conn.receive_data(b"")
    assert conn.incoming_buffer.max_frame_size == 12345


def _server() -> h2compat.GracefulH2Connection:
    conn = h2compat.GracefulH2Connection(h2.config.H2Configuration(client_side=False),
                                         max_header_block=1000)
    conn.initiate_connection()
    conn.receive_data(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                      + hyperframe.frame.SettingsFrame(0).serialize())
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
        h2.config.H2Configuration(client_side=False, header_encoding=None))
    client.initiate_connection()
    client.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80"),
                            (b"x-bin", b"\xff")])
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
