"""HBONE sans-IO tests: two HboneConnection ends shuttle bytes in memory, or one
end is fed hand-made frames (raw h2 / hyperframe). No sockets."""

from __future__ import annotations

import os
import struct

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from meshnode.ztunnel import hbone
from meshnode.ztunnel.hbone import (
    ConnectionEnded,
    DataReceived,
    HboneConnection,
    LocalProtocolError,
    SendWindowOpened,
    TunnelEstablished,
    TunnelHalfClosed,
    TunnelRefused,
    TunnelRequested,
    TunnelReset,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MIB = 1 << 20


# --- helpers -------------------------------------------------------------------


def pump(
    client: HboneConnection,
    server: HboneConnection,
    *,
    auto_ack: bool = False,
    max_rounds: int = 1000,
) -> tuple[list[hbone.Event], list[hbone.Event]]:
    """Shuttle bytes both ways until both ends are quiet. Returns the events of
    (client, server). With ``auto_ack`` every DataReceived is acknowledged at once
    (a downstream that keeps up)."""
    client_events: list[hbone.Event] = []
    server_events: list[hbone.Event] = []
    for _ in range(max_rounds):
        to_server = client.data_to_send()
        to_client = server.data_to_send()
        if not to_server and not to_client:
            return client_events, server_events
        if to_server:
            evs = server.receive_data(to_server)
            server_events += evs
            if auto_ack:
                for ev in evs:
                    if isinstance(ev, DataReceived):
                        server.ack(ev.stream_id, ev.flow_length)
        if to_client:
            evs = client.receive_data(to_client)
            client_events += evs
            if auto_ack:
                for ev in evs:
                    if isinstance(ev, DataReceived):
                        client.ack(ev.stream_id, ev.flow_length)
    raise AssertionError("pump did not settle")


def connected_pair(
    max_concurrent_streams: int = hbone.DEFAULT_MAX_STREAMS,
) -> tuple[HboneConnection, HboneConnection]:
    client = HboneConnection(client_side=True)
    server = HboneConnection(client_side=False, max_concurrent_streams=max_concurrent_streams)
    client_events, server_events = pump(client, server)
    assert client_events == []
    assert server_events == []
    return client, server


def open_established(
    client: HboneConnection, server: HboneConnection, authority: str = "10.0.0.1:80"
) -> int:
    sid = client.open_tunnel(authority)
    _, server_events = pump(client, server)
    assert server_events == [TunnelRequested(sid, authority, ())]
    server.accept_tunnel(sid)
    client_events, _ = pump(client, server)
    assert client_events == [TunnelEstablished(sid)]
    return sid


def of_type(events: list[hbone.Event], kind: type) -> list:
    return [ev for ev in events if isinstance(ev, kind)]


def data_of(events: list[hbone.Event], stream_id: int) -> bytes:
    return b"".join(
        ev.data for ev in events if isinstance(ev, DataReceived) and ev.stream_id == stream_id
    )


def parse_frames(data: bytes) -> list[Frame]:
    frames: list[Frame] = []
    view = memoryview(data)
    while len(view) >= 9:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        frames.append(frame)
        view = view[9 + length :]
    assert len(view) == 0, "trailing partial frame"
    return frames


def raw_frame(frame_type: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """A frame header + payload, with no validation (for malformed input)."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([frame_type, flags])
        + struct.pack(">I", stream_id)
        + payload
    )


def raw_h2_client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    return conn


def raw_exchange(
    raw: h2.connection.H2Connection, server: HboneConnection
) -> tuple[list[h2.events.Event], list[hbone.Event]]:
    """Shuttle bytes between a raw h2 client and an HBONE server."""
    raw_events: list[h2.events.Event] = []
    server_events: list[hbone.Event] = []
    for _ in range(100):
        to_server = raw.data_to_send()
        to_client = server.data_to_send()
        if not to_server and not to_client:
            return raw_events, server_events
        if to_server:
            server_events += server.receive_data(to_server)
        if to_client:
            raw_events += raw.receive_data(to_client)
    raise AssertionError("exchange did not settle")


# --- CONNECT round trip ------------------------------------------------------------


def test_connect_round_trip_with_headers_and_multi_mib_payloads() -> None:
    client, server = connected_pair()
    extra = [("x-src", "spiffe://td/ns/a/sa/b"), ("baggage", "k=v")]
    sid = client.open_tunnel("10.0.0.1:80", extra)
    assert sid == 1
    assert client.open_streams == 1
    _, server_events = pump(client, server)
    assert server_events == [
        TunnelRequested(1, "10.0.0.1:80", (("x-src", "spiffe://td/ns/a/sa/b"), ("baggage", "k=v")))
    ]
    assert server.open_streams == 1

    server.accept_tunnel(sid)
    client_events, _ = pump(client, server)
    assert client_events == [TunnelEstablished(sid)]

    upstream = os.urandom(5 * MIB + 123)
    downstream = os.urandom(3 * MIB + 7)
    client.send(sid, upstream)
    server.send(sid, downstream)
    client_events, server_events = pump(client, server, auto_ack=True)
    assert data_of(server_events, sid) == upstream
    assert data_of(client_events, sid) == downstream
    assert client.pending(sid) == 0
    assert server.pending(sid) == 0

    client.end(sid)
    client_events, server_events = pump(client, server)
    assert server_events == [TunnelHalfClosed(sid)]
    assert client_events == []
    # Half-closed only: both still know the stream.
    assert client.open_streams == 1
    assert server.open_streams == 1

    server.end(sid)
    client_events, server_events = pump(client, server)
    assert client_events == [TunnelHalfClosed(sid)]
    assert server_events == []
    assert client.open_streams == 0
    assert server.open_streams == 0
    assert client.pending(sid) == 0
    assert server.pending(sid) == 0


def test_small_payloads_arrive_in_order_and_identical() -> None:
    client, server = connected_pair()
    sid = open_established(client, server)
    chunks = [b"GET / HTTP/1.1\r\n", b"", b"\x00\xff" * 10, b"x"]
    for chunk in chunks:
        client.send(sid, chunk)
    _, server_events = pump(client, server)
    assert data_of(server_events, sid) == b"".join(chunks)
    received = of_type(server_events, DataReceived)
    assert sum(ev.flow_length for ev in received) == len(b"".join(chunks))


def test_stream_ids_are_odd_and_increasing() -> None:
    client, server = connected_pair()
    ids = [client.open_tunnel(f"10.0.0.{i}:80") for i in range(1, 4)]
    assert ids == [1, 3, 5]
    _, server_events = pump(client, server)
    assert [ev.stream_id for ev in of_type(server_events, TunnelRequested)] == [1, 3, 5]
    assert [ev.authority for ev in of_type(server_events, TunnelRequested)] == [
        "10.0.0.1:80",
        "10.0.0.2:80",
        "10.0.0.3:80",
    ]


def test_server_cannot_open_tunnels() -> None:
    _, server = connected_pair()
    with pytest.raises(LocalProtocolError):
        server.open_tunnel("10.0.0.1:80")


def test_send_on_unknown_stream_raises_local_protocol_error() -> None:
    client, server = connected_pair()
    with pytest.raises(LocalProtocolError):
        client.send(1, b"x")
    sid = open_established(client, server)
    client.end(sid)
    with pytest.raises(LocalProtocolError):
        client.send(sid, b"after end")


# --- flow control / back-pressure ---------------------------------------------------


def test_sender_stops_at_stream_window_until_receiver_acks() -> None:
    client, server = connected_pair()
    sid = open_established(client, server)
    extra = 2 * MIB + 5
    payload = os.urandom(hbone.STREAM_WINDOW + extra)

    client.send(sid, payload)
    assert client.pending(sid) == extra

    _, server_events = pump(client, server)
    received = of_type(server_events, DataReceived)
    unacked = sum(ev.flow_length for ev in received)
    assert unacked == hbone.STREAM_WINDOW
    assert client.pending(sid) == extra
    # Pumping again without an ack moves nothing.
    assert pump(client, server) == ([], [])
    assert client.pending(sid) == extra

    for ev in received:
        server.ack(sid, ev.flow_length)
    client_events, server_events = pump(client, server)
    assert SendWindowOpened(sid) in client_events
    assert client.pending(sid) == 0
    assert sum(ev.flow_length for ev in of_type(server_events, DataReceived)) == extra
    assert data_of(received, sid) + data_of(server_events, sid) == payload


def test_receiver_never_holds_more_than_the_window_unacked() -> None:
    client, server = connected_pair()
    sid = open_established(client, server)
    payload = os.urandom(3 * hbone.STREAM_WINDOW + 17)
    client.send(sid, payload)

    received = bytearray()
    unacked = 0
    window_opened = 0
    for _ in range(200):
        to_server = client.data_to_send()
        to_client = server.data_to_send()
        if not to_server and not to_client:
            if unacked == 0:
                break
            # The downstream writer catches up in two halves.
            half = unacked // 2
            server.ack(sid, half)
            server.ack(sid, unacked - half)
            unacked = 0
            continue
        # Deliver in small pieces, as a socket would.
        for i in range(0, len(to_server), 64 * 1024):
            for ev in server.receive_data(to_server[i : i + 64 * 1024]):
                if isinstance(ev, DataReceived):
                    received += ev.data
                    unacked += ev.flow_length
                    assert unacked <= hbone.STREAM_WINDOW
        if to_client:
            window_opened += len(of_type(client.receive_data(to_client), SendWindowOpened))
    assert bytes(received) == payload
    assert client.pending(sid) == 0
    assert window_opened >= 1


def test_end_while_data_pending_sends_end_stream_after_the_data() -> None:
    client, server = connected_pair()
    sid = open_established(client, server)
    payload = os.urandom(hbone.STREAM_WINDOW + MIB)
    client.send(sid, payload)
    client.end(sid)
    assert client.pending(sid) == MIB

    _, server_events = pump(client, server)
    assert of_type(server_events, TunnelHalfClosed) == []
    first = of_type(server_events, DataReceived)
    for ev in first:
        server.ack(sid, ev.flow_length)

    _, server_events = pump(client, server)
    assert isinstance(server_events[-1], TunnelHalfClosed)
    assert server_events[-1] == TunnelHalfClosed(sid)
    assert of_type(server_events, TunnelHalfClosed) == [TunnelHalfClosed(sid)]
    assert data_of(first, sid) + data_of(server_events, sid) == payload
    assert client.pending(sid) == 0


def test_end_with_nothing_pending_is_immediate_and_idempotent() -> None:
    client, server = connected_pair()
    sid = open_established(client, server)
    client.send(sid, b"bye")
    client.end(sid)
    client.end(sid)
    _, server_events = pump(client, server)
    assert server_events == [DataReceived(sid, b"bye", 3), TunnelHalfClosed(sid)]


# --- reset ------------------------------------------------------------------------------


def test_client_reset_reaches_server_and_other_streams_keep_working() -> None:
    client, server = connected_pair()
    a = open_established(client, server, "10.0.0.1:80")
    b = open_established(client, server, "10.0.0.2:80")

    client.reset(a)
    assert client.open_streams == 1
    _, server_events = pump(client, server)
    assert server_events == [TunnelReset(a, hbone.CANCEL, True)]
    assert server.open_streams == 1

    client.send(b, b"still here")
    server.send(b, b"me too")
    client_events, server_events = pump(client, server)
    assert server_events == [DataReceived(b, b"still here", 10)]
    assert client_events == [DataReceived(b, b"me too", 6)]


def test_server_reset_reaches_client_with_its_error_code() -> None:
    client, server = connected_pair()
    a = open_established(client, server, "10.0.0.1:80")
    b = open_established(client, server, "10.0.0.2:80")
    server.reset(a, hbone.CONNECT_ERROR)
    client_events, _ = pump(client, server)
    assert client_events == [TunnelReset(a, hbone.CONNECT_ERROR, True)]
    assert client.open_streams == 1
    # The shell may still hold bytes for the stream it has not heard is gone:
    # they are dropped, not an error (only a stream never opened is one).
    client.send(a, b"x")
    client.send(b, b"ok")
    _, server_events = pump(client, server)
    assert server_events == [DataReceived(b, b"ok", 2)]


def test_data_in_flight_for_a_reset_stream_is_not_delivered() -> None:
    client, server = connected_pair()
    a = open_established(client, server, "10.0.0.1:80")
    b = open_established(client, server, "10.0.0.2:80")
    client.send(a, b"lost" * 1000)
    client.send(b, b"kept")
    in_flight = client.data_to_send()

    server.reset(a)
    server_events = server.receive_data(in_flight)
    assert server_events == [DataReceived(b, b"kept", 4)]
    client_events, server_events = pump(client, server)
    assert client_events == [TunnelReset(a, hbone.CANCEL, True)]
    assert server_events == []


def test_reset_unknown_stream_is_a_no_op() -> None:
    client, server = connected_pair()
    client.reset(99)
    assert client.data_to_send() == b""


# --- refusal, validation -------------------------------------------------------------


def test_refuse_tunnel_reports_status_and_reason() -> None:
    client, server = connected_pair()
    sid = client.open_tunnel("10.0.0.1:80")
    pump(client, server)
    server.refuse_tunnel(sid, 403, "why")
    assert server.open_streams == 0
    client_events, _ = pump(client, server)
    assert client_events == [TunnelRefused(sid, 403, "why")]
    assert client.open_streams == 0
    assert client.has_capacity()


def test_refuse_without_reason_gives_empty_reason() -> None:
    client, server = connected_pair()
    sid = client.open_tunnel("10.0.0.1:80")
    pump(client, server)
    server.refuse_tunnel(sid, 503)
    client_events, _ = pump(client, server)
    assert client_events == [TunnelRefused(sid, 503, "")]


def test_non_connect_request_is_answered_405() -> None:
    server = HboneConnection(client_side=False)
    raw = raw_h2_client()
    raw.send_headers(
        1,
        [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "10.0.0.1:80")],
        end_stream=True,
    )
    raw_events, server_events = raw_exchange(raw, server)
    assert of_type(server_events, TunnelRequested) == []
    assert server_events == []
    responses = [ev for ev in raw_events if isinstance(ev, h2.events.ResponseReceived)]
    assert len(responses) == 1
    headers = {str(k): str(v) for k, v in responses[0].headers or ()}
    assert headers[":status"] == "405"
    assert headers["x-meshnode-reason"] == "HBONE accepts only CONNECT"
    assert server.open_streams == 0


@pytest.mark.parametrize(
    "authority",
    [
        "example.com:80",
        "10.0.0.1",
        "10.0.0.1:0",
        "10.0.0.1:70000",
        "1.2.3:80",
        "1.2.3.4.5:80",
        "256.0.0.1:80",
        "10.0.0.1:",
        ":80",
        "10.0.0.1:8o",
    ],
)
def test_bad_authority_is_answered_400(authority: str) -> None:
    client, server = connected_pair()
    sid = client.open_tunnel(authority)
    client_events, server_events = pump(client, server)
    assert server_events == []
    assert client_events == [TunnelRefused(sid, 400, f"bad :authority {authority!r}")]
    assert server.open_streams == 0


def test_bad_authority_from_raw_client_is_answered_400() -> None:
    server = HboneConnection(client_side=False)
    raw = raw_h2_client()
    raw.send_headers(1, [(":method", "CONNECT"), (":authority", "db.internal:5432")])
    raw_events, server_events = raw_exchange(raw, server)
    assert server_events == []
    responses = [ev for ev in raw_events if isinstance(ev, h2.events.ResponseReceived)]
    statuses = [{str(k): str(v) for k, v in r.headers or ()}[":status"] for r in responses]
    assert statuses == ["400"]


@pytest.mark.parametrize("authority", ["10.1.2.3:8080", "[::1]:80", "0.0.0.0:1", "1.1.1.1:65535"])
def test_valid_authority_is_accepted(authority: str) -> None:
    client, server = connected_pair()
    sid = client.open_tunnel(authority)
    _, server_events = pump(client, server)
    assert server_events == [TunnelRequested(sid, authority, ())]


# --- malformed input -------------------------------------------------------------------


def _settings_frame() -> bytes:
    return SettingsFrame(0).serialize()


MALFORMED = {
    "garbage instead of preface": b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
    "settings with length 5": PREFACE + raw_frame(0x4, 0, 0, b"\x00" * 5),
    "window update increment 0 on stream 0": PREFACE
    + _settings_frame()
    + raw_frame(0x8, 0, 0, b"\x00\x00\x00\x00"),
    "data on stream 0": PREFACE + _settings_frame() + raw_frame(0x0, 0, 0, b"abc"),
    "settings on a stream": PREFACE + raw_frame(0x4, 0, 1, b""),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_input_ends_connection_without_raising(name: str) -> None:
    server = HboneConnection(client_side=False)
    server.data_to_send()
    events = server.receive_data(MALFORMED[name])
    assert len(events) == 1
    ended = events[0]
    assert isinstance(ended, ConnectionEnded)
    assert ended.remote is True
    assert ended.error_code != 0
    assert ended.error_code in (hbone.PROTOCOL_ERROR, h2.errors.ErrorCodes.FRAME_SIZE_ERROR)
    assert ended.reason.startswith("protocol error from peer: ")
    goaways = [f for f in parse_frames(server.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert goaways, "no GOAWAY sent"
    assert all(g.error_code != 0 for g in goaways)
    assert server.ended
    assert not server.has_capacity()
    # Anything after that is ignored, never raised.
    assert server.receive_data(b"\x00" * 50) == []
    assert server.receive_data(PREFACE + _settings_frame()) == []


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_input_answered_with_exactly_one_goaway_matching_the_event(name: str) -> None:
    """The peer must learn the same error code the shell is told, once."""
    server = HboneConnection(client_side=False)
    server.data_to_send()
    (ended,) = server.receive_data(MALFORMED[name])
    assert isinstance(ended, ConnectionEnded)
    goaways = [f for f in parse_frames(server.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert [g.error_code for g in goaways] == [int(ended.error_code)]


def test_malformed_input_on_a_busy_connection_resets_open_streams() -> None:
    client, server = connected_pair()
    a = open_established(client, server, "10.0.0.1:80")
    b = open_established(client, server, "10.0.0.2:80")
    events = server.receive_data(raw_frame(0x0, 0, 0, b"abc"))
    assert events[:2] == [
        TunnelReset(a, hbone.PROTOCOL_ERROR, True),
        TunnelReset(b, hbone.PROTOCOL_ERROR, True),
    ]
    assert isinstance(events[2], ConnectionEnded)
    assert server.open_streams == 0
    frames = parse_frames(server.data_to_send())
    assert any(isinstance(f, GoAwayFrame) and f.error_code != 0 for f in frames)


def test_client_side_rejects_garbage_from_server() -> None:
    client = HboneConnection(client_side=True)
    client.data_to_send()
    events = client.receive_data(raw_frame(0x4, 0, 0, b"\x00" * 5))
    assert len(events) == 1 and isinstance(events[0], ConnectionEnded)
    assert events[0].error_code != 0
    assert any(isinstance(f, GoAwayFrame) for f in parse_frames(client.data_to_send()))
    assert client.receive_data(b"junk") == []


# --- GOAWAY from the peer -----------------------------------------------------------------


def test_peer_graceful_goaway_refuses_unprocessed_streams_and_stops_new_ones() -> None:
    client, server = connected_pair()
    a = open_established(client, server, "10.0.0.1:80")
    b = open_established(client, server, "10.0.0.2:80")
    c = client.open_tunnel("10.0.0.3:80")  # never reaches the server
    client.data_to_send()

    server.close(hbone.NO_ERROR, "draining")
    client_events = client.receive_data(server.data_to_send())
    assert client_events == [
        TunnelReset(c, hbone.REFUSED_STREAM, True),
        ConnectionEnded(hbone.NO_ERROR, "peer sent GOAWAY NO_ERROR draining", True, b),
    ]
    assert client.draining and not client.ended  # a and b may still finish
    assert not client.has_capacity()
    assert client.open_streams == 2
    assert a < b < c


def test_peer_goaway_from_raw_frame_with_error_code() -> None:
    client, server = connected_pair()
    a = open_established(client, server, "10.0.0.1:80")
    b = client.open_tunnel("10.0.0.2:80")
    client.data_to_send()
    goaway = GoAwayFrame(0, last_stream_id=a, error_code=hbone.INTERNAL_ERROR)
    client_events = client.receive_data(goaway.serialize())
    assert client_events == [
        TunnelReset(b, hbone.REFUSED_STREAM, True),
        ConnectionEnded(hbone.INTERNAL_ERROR, "peer sent GOAWAY INTERNAL_ERROR", True, a),
    ]
    assert not client.has_capacity()
    with pytest.raises(LocalProtocolError):
        client.open_tunnel("10.0.0.3:80")


def test_streams_below_graceful_goaway_may_finish() -> None:
    """ConnectionTerminated handling says "the others may finish" (and the
    session shell keeps the transport open while handlers remain): data and
    END_STREAM for a stream the peer did process must still be delivered."""
    client, server = connected_pair()
    a = open_established(client, server, "10.0.0.1:80")
    client.data_to_send()
    goaway = GoAwayFrame(0, last_stream_id=a, error_code=0)
    assert client.receive_data(goaway.serialize()) == [
        ConnectionEnded(hbone.NO_ERROR, "peer sent GOAWAY NO_ERROR", True, a),
    ]
    assert client.open_streams == 1
    tail = DataFrame(a, data=b"last words", flags=["END_STREAM"])
    assert client.receive_data(tail.serialize()) == [
        DataReceived(a, b"last words", 10),
        TunnelHalfClosed(a),
    ]


def test_data_after_graceful_goaway_in_same_read_is_not_a_protocol_error() -> None:
    client, server = connected_pair()
    a = open_established(client, server, "10.0.0.1:80")
    client.data_to_send()
    goaway = GoAwayFrame(0, last_stream_id=a, error_code=0)
    tail = DataFrame(a, data=b"last words")
    events = client.receive_data(goaway.serialize() + tail.serialize())
    assert [type(ev) for ev in events if isinstance(ev, ConnectionEnded | TunnelReset)] == [
        ConnectionEnded
    ]
    assert events[0] == ConnectionEnded(hbone.NO_ERROR, "peer sent GOAWAY NO_ERROR", True, a)
    sent = [f for f in parse_frames(client.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert all(f.error_code == 0 for f in sent)


def test_local_graceful_close_sends_goaway_once_then_may_escalate() -> None:
    client, server = connected_pair()
    open_established(client, server)
    client.close(hbone.NO_ERROR, "bye")
    client.close(hbone.NO_ERROR, "bye again")  # a second graceful close adds nothing
    goaways = [f for f in parse_frames(client.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert len(goaways) == 1
    assert goaways[0].error_code == 0
    assert goaways[0].additional_data == b"bye"
    assert goaways[0].last_stream_id == 0  # the client processed no server-initiated stream
    assert client.draining and not client.ended and not client.has_capacity()
    # RFC 9113 6.8: a later GOAWAY may escalate to an error; then it is over.
    client.close(hbone.INTERNAL_ERROR, "again")
    goaways = [f for f in parse_frames(client.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert [g.error_code for g in goaways] == [hbone.INTERNAL_ERROR]
    assert client.ended


def test_client_goaway_does_not_reset_the_servers_inbound_streams() -> None:
    """GOAWAY's last_stream_id counts streams initiated by the *receiver*. A client
    GOAWAY (last_stream_id 0: servers open no streams in HBONE) says nothing about
    the client's own tunnels, so the server must not report them refused."""
    client, server = connected_pair()
    a = open_established(client, server)
    client.close(hbone.NO_ERROR, "bye")
    assert server.receive_data(client.data_to_send()) == [
        ConnectionEnded(hbone.NO_ERROR, "peer sent GOAWAY NO_ERROR bye", True, 0)
    ]
    assert server.draining and not server.ended
    assert server.open_streams == 1
    assert a == 1


# --- concurrency cap -------------------------------------------------------------------


def test_max_concurrent_streams_from_peer_settings() -> None:
    client, server = connected_pair(max_concurrent_streams=2)
    assert client.has_capacity()
    a = open_established(client, server, "10.0.0.1:80")
    assert client.has_capacity()
    b = open_established(client, server, "10.0.0.2:80")
    assert not client.has_capacity()
    with pytest.raises(LocalProtocolError):
        client.open_tunnel("10.0.0.3:80")

    client.end(a)
    server.end(a)
    pump(client, server)
    assert client.open_streams == 1
    assert client.has_capacity()
    c = client.open_tunnel("10.0.0.3:80")
    assert c > b
    _, server_events = pump(client, server)
    assert server_events == [TunnelRequested(c, "10.0.0.3:80", ())]
    assert not client.has_capacity()


def test_local_max_concurrent_streams_caps_the_client_too() -> None:
    client = HboneConnection(client_side=True, max_concurrent_streams=1)
    server = HboneConnection(client_side=False)
    pump(client, server)
    client.open_tunnel("10.0.0.1:80")
    assert not client.has_capacity()
    with pytest.raises(LocalProtocolError):
        client.open_tunnel("10.0.0.2:80")


def test_reset_stream_frees_capacity() -> None:
    client, server = connected_pair(max_concurrent_streams=1)
    a = open_established(client, server)
    assert not client.has_capacity()
    client.reset(a)
    assert client.has_capacity()


# --- misc ---------------------------------------------------------------------------------


def test_settings_announce_big_windows_and_frames() -> None:
    client = HboneConnection(client_side=True)
    data = client.data_to_send()
    assert data.startswith(PREFACE)
    frames = parse_frames(data[len(PREFACE) :])
    settings = frames[0]
    assert isinstance(settings, SettingsFrame)
    assert settings.settings[SettingsFrame.INITIAL_WINDOW_SIZE] == hbone.STREAM_WINDOW
    assert settings.settings[SettingsFrame.MAX_FRAME_SIZE] == hbone.MAX_FRAME_SIZE
    assert settings.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == hbone.DEFAULT_MAX_STREAMS
    assert settings.settings[SettingsFrame.ENABLE_PUSH] == 0
    window_updates = [f for f in frames if isinstance(f, WindowUpdateFrame)]
    assert [(f.stream_id, f.window_increment) for f in window_updates] == [
        (0, hbone.CONNECTION_WINDOW - 65535)
    ]


def test_raw_rst_stream_from_peer_is_reported() -> None:
    client, server = connected_pair()
    a = open_established(client, server)
    events = client.receive_data(RstStreamFrame(a, error_code=hbone.CONNECT_ERROR).serialize())
    assert events == [TunnelReset(a, hbone.CONNECT_ERROR, True)]
    assert client.open_streams == 0


def test_non_2xx_response_from_raw_headers_is_refused() -> None:
    client, server = connected_pair()
    sid = client.open_tunnel("10.0.0.1:80")
    client.data_to_send()
    server_encoder = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    ).encoder
    block = server_encoder.encode([(":status", "502"), ("x-meshnode-reason", "upstream down")])
    frame = HeadersFrame(sid, data=block, flags=["END_HEADERS", "END_STREAM"])
    events = client.receive_data(frame.serialize())
    assert events == [TunnelRefused(sid, 502, "upstream down")]
    rst = [f for f in parse_frames(client.data_to_send()) if isinstance(f, RstStreamFrame)]
    assert [(f.stream_id, f.error_code) for f in rst] == [(sid, hbone.CANCEL)]


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("10.0.0.1:80", ("10.0.0.1", 80)),
        ("192.168.1.254:65535", ("192.168.1.254", 65535)),
        ("[::1]:80", ("::1", 80)),
        ("[fd00::1:2]:15008", ("fd00::1:2", 15008)),
    ],
)
def test_split_authority(authority: str, expected: tuple[str, int]) -> None:
    assert hbone.split_authority(authority) == expected


def test_reset_arriving_with_a_window_update_affects_only_that_stream() -> None:
    """A connection-level WINDOW_UPDATE followed by a RST_STREAM for a stream
    that still has data queued, in one read: that stream is reported reset;
    the connection and its other streams go on. (This once raised out of
    receive_data and took the whole pooled connection down.)"""
    client, server = connected_pair()
    a = open_established(client, server, "10.0.0.1:80")
    b = open_established(client, server, "10.0.0.2:80")
    client.send(a, b"x" * (hbone.STREAM_WINDOW + 100_000))  # more than one window
    assert client.pending(a) > 0
    _, server_events = pump(client, server)
    total = sum(e.flow_length for e in server_events if isinstance(e, DataReceived))
    assert total == hbone.STREAM_WINDOW
    server.ack(a, total)  # WINDOW_UPDATE first (the window opens for a) ...
    server.reset(a)  # ... then RST_STREAM, both in the same read by the client
    events = client.receive_data(server.data_to_send())
    assert [e for e in events if isinstance(e, TunnelReset)] == [
        TunnelReset(a, e.error_code, True) for e in events if isinstance(e, TunnelReset)
    ]
    assert any(isinstance(e, TunnelReset) and e.stream_id == a for e in events)
    assert not client.ended and not any(isinstance(e, ConnectionEnded) for e in events)
    assert client.pending(a) == 0
    client.send(b, b"still here")
    _, server_events = pump(client, server)
    got = [e for e in server_events if isinstance(e, DataReceived) and e.stream_id == b]
    assert b"".join(e.data for e in got) == b"still here"
