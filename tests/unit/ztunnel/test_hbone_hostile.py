"""HBONE against a hostile peer, sans-IO: the peer is a raw h2 connection or
hand-made frames, fed as bytes; time is passed in. Each test is one way the
peer (an authenticated one: it holds a workload certificate) could hurt a
node proxy: leak our flow-control window, exhaust us with resets, pings or
header blocks, or kill every stream of a connection through one bad stream."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import hpack
from hyperframe.frame import (
    GoAwayFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from meshnode.ztunnel import hbone
from meshnode.ztunnel.hbone import (
    ConnectionEnded,
    DataReceived,
    HboneConnection,
    TunnelEstablished,
    TunnelHalfClosed,
    TunnelRefused,
    TunnelRequested,
    TunnelReset,
)
from tests.unit.ztunnel.test_hbone import (
    MIB,
    connected_pair,
    data_of,
    of_type,
    open_established,
    parse_frames,
    pump,
    raw_exchange,
    raw_frame,
    raw_h2_client,
)

W = hbone.STREAM_WINDOW
ENOUGH_TO_EXHAUST = hbone.CONNECTION_WINDOW // hbone.STREAM_WINDOW + 4  # 20 streams


def raw_server() -> tuple[h2.connection.H2Connection, HboneConnection]:
    """A raw h2 client (the hostile peer) and our server, SETTINGS exchanged."""
    raw = raw_h2_client()
    server = HboneConnection(client_side=False)
    raw_exchange(raw, server)
    return raw, server


def connect_headers(authority: str = "10.0.0.1:80") -> list[tuple[str, str]]:
    return [(":method", "CONNECT"), (":authority", authority)]


def goaways(data: bytes) -> list[GoAwayFrame]:
    return [f for f in parse_frames(data) if isinstance(f, GoAwayFrame)]


def download(client: HboneConnection, server: HboneConnection, sid: int, size: int) -> int:
    """The server sends ``size`` bytes; the client's shell takes them but
    acknowledges nothing (its plain socket is write-paused). Returns what the
    client received."""
    server.send(sid, b"d" * size)
    client_events, _ = pump(client, server)
    return sum(len(ev.data) for ev in of_type(client_events, DataReceived))


def assert_new_stream_flows(client: HboneConnection, server: HboneConnection) -> None:
    sid = open_established(client, server, "10.0.0.9:80")
    server.send(sid, b"n" * MIB)
    client_events, _ = pump(client, server, auto_ack=True)
    assert len(data_of(client_events, sid)) == MIB, "the connection's window leaked away"


# --- 1. flow-control window: every termination path gives it back ---------------------


def test_aborted_slow_downloads_give_their_window_back() -> None:
    """A download whose reader is stuck holds a stream window of unacknowledged
    bytes; the client then aborts it. 16 of those used to eat the 64 MiB
    connection window, and every later stream on the pooled connection stalled."""
    client, server = connected_pair()
    for _ in range(ENOUGH_TO_EXHAUST):
        sid = open_established(client, server)
        assert download(client, server, sid, W + MIB) == W  # stuck at the stream window
        client.reset(sid)  # the downstream client went away
        pump(client, server)
    assert_new_stream_flows(client, server)


def test_streams_reset_by_the_peer_give_their_window_back() -> None:
    client, server = connected_pair()
    for _ in range(ENOUGH_TO_EXHAUST):
        sid = open_established(client, server)
        assert download(client, server, sid, W) == W
        server.reset(sid)
        client_events, _ = pump(client, server)
        assert client_events == [TunnelReset(sid, hbone.CANCEL, True)]
    assert_new_stream_flows(client, server)


def test_early_data_on_refused_streams_gives_its_window_back() -> None:
    """The client sends right after CONNECT (its bytes were held until now);
    the server's shell takes them, waiting for the workload connect, which fails."""
    client, server = connected_pair()
    for _ in range(ENOUGH_TO_EXHAUST):
        sid = client.open_tunnel("10.0.0.1:80")
        client.send(sid, b"e" * W)
        _, server_events = pump(client, server)
        assert len(data_of(server_events, sid)) == W  # held by the shell, not acked
        server.refuse_tunnel(sid, 503, "workload down")
        client_events, _ = pump(client, server)
        assert of_type(client_events, TunnelRefused)
    sid = client.open_tunnel("10.0.0.9:80")
    client.send(sid, b"u" * MIB)
    _, server_events = pump(client, server, auto_ack=True)
    assert len(data_of(server_events, sid)) == MIB


def test_streams_done_both_ways_with_data_held_give_their_window_back() -> None:
    """Both sides ended while the shell still held received bytes (its plain
    socket closes with them): the window goes back when the stream is forgotten."""
    client, server = connected_pair()
    for _ in range(ENOUGH_TO_EXHAUST):
        sid = open_established(client, server)
        assert download(client, server, sid, W) == W
        server.end(sid)
        client.end(sid)
        client_events, _ = pump(client, server)
        assert TunnelHalfClosed(sid) in client_events
        assert client.open_streams == 0
    assert_new_stream_flows(client, server)


def test_late_ack_for_a_stream_gone_gives_no_extra_credit() -> None:
    """The window came back when the stream went; the shell's late ack for the
    same bytes must not grant the peer more than the window we announced."""
    client, server = connected_pair()
    sid = open_established(client, server)
    download(client, server, sid, W)
    client.reset(sid)
    client.ack(sid, W)
    pump(client, server)
    assert server._h2.outbound_flow_control_window <= hbone.CONNECTION_WINDOW
    assert client.unacked_bytes == 0


# --- 2. Rapid Reset (CVE-2023-44487) ---------------------------------------------------


def test_connect_then_rst_flood_gets_goaway_enhance_your_calm() -> None:
    raw, server = raw_server()
    requested = 0
    ended: list[ConnectionEnded] = []
    out = b""
    for i in range(2000):  # the 20,000-in-1.7-s flood, shortened
        sid = 2 * i + 1
        raw.send_headers(sid, connect_headers())
        raw.reset_stream(sid)
        events = server.receive_data(raw.data_to_send())
        requested += len(of_type(events, TunnelRequested))
        ended += of_type(events, ConnectionEnded)
        out += server.data_to_send()
        if ended:
            break
    assert ended and ended[0].error_code == hbone.ENHANCE_YOUR_CALM
    assert "rapid reset" in ended[0].reason
    limit = server.limits.reset_limit
    assert requested == limit + 1  # not one stream more was handed to the shell
    assert [g.error_code for g in goaways(out)] == [hbone.ENHANCE_YOUR_CALM]
    assert server.ended


def test_refusal_flood_counts_as_resets() -> None:
    """Requests we refuse (not CONNECT, denied, workload down) cost us work too."""
    raw, server = raw_server()
    ended: list[ConnectionEnded] = []
    for i in range(2000):
        raw.send_headers(
            2 * i + 1,
            [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "x")],
            end_stream=True,
        )
        ended += of_type(server.receive_data(raw.data_to_send()), ConnectionEnded)
        raw.receive_data(server.data_to_send())  # the 405s
        if ended:
            break
    assert ended and ended[0].error_code == hbone.ENHANCE_YOUR_CALM


def test_resets_below_the_rate_never_trip_the_limit() -> None:
    limits = hbone.HboneLimits(reset_limit=12, reset_window=1.0)
    raw = raw_h2_client()
    server = HboneConnection(client_side=False, limits=limits, now=0.0)
    server.receive_data(raw.data_to_send(), now=0.0)
    raw.receive_data(server.data_to_send())
    for i in range(200):  # 10 per second, for 20 seconds
        sid = 2 * i + 1
        raw.send_headers(sid, connect_headers())
        raw.reset_stream(sid)
        events = server.receive_data(raw.data_to_send(), now=i * 0.1 + 0.001)
        assert not of_type(events, ConnectionEnded), i
    for sid in (401, 403, 405):  # 13 within one second
        raw.send_headers(sid, connect_headers())
        raw.reset_stream(sid)
    events = server.receive_data(raw.data_to_send(), now=19.95)
    assert of_type(events, ConnectionEnded)[0].error_code == hbone.ENHANCE_YOUR_CALM


def test_busy_normal_peer_never_trips_the_reset_limit() -> None:
    """Thousands of short tunnels, ended cleanly or aborted after they were
    answered, as a busy node's clients do."""
    client, server = connected_pair()
    for i in range(5 * server.limits.reset_limit):
        sid = open_established(client, server)
        client.send(sid, b"q")
        server.send(sid, b"a")
        if i % 2:
            client.reset(sid)
        else:
            client.end(sid)
            server.end(sid)
        client_events, server_events = pump(client, server, auto_ack=True)
        assert not of_type(client_events + server_events, ConnectionEnded), i
    assert not server.ended and not client.ended


# --- 3. header list size, CONTINUATION flood, frame size -----------------------------------


def test_settings_announce_the_header_list_limit() -> None:
    data = HboneConnection(client_side=False).data_to_send()
    settings = parse_frames(data)[0]
    assert isinstance(settings, SettingsFrame)
    assert settings.settings[SettingsFrame.MAX_HEADER_LIST_SIZE] == hbone.MAX_HEADER_LIST_SIZE


def _header_block_start(stream_id: int) -> bytes:
    block = hpack.Encoder().encode(connect_headers())
    return raw_frame(0x1, 0, stream_id, block)  # HEADERS without END_HEADERS


def test_continuation_flood_is_refused_before_it_is_buffered() -> None:
    """CONTINUATION frames (each below the frame size limit) that never end
    the header block: refused once the block passes the header-list limit, not
    after 64 frames of up to a frame size each."""
    raw, server = raw_server()
    server.receive_data(_header_block_start(1))
    chunk = 200 << 10  # below MAX_FRAME_SIZE before and after
    fed = 0
    ended: list[ConnectionEnded] = []
    for _ in range(60):
        frame = raw_frame(0x9, 0, 1, b"\x00" * chunk)
        # Feed it in pieces as a socket would: refusal must not wait for the end.
        for i in range(0, len(frame), 16 << 10):
            ended += of_type(server.receive_data(frame[i : i + (16 << 10)]), ConnectionEnded)
            fed += min(16 << 10, len(frame) - i)
            if ended:
                break
        if ended:
            break
    assert ended and ended[0].error_code == hbone.ENHANCE_YOUR_CALM
    assert fed <= hbone.MAX_HEADER_LIST_SIZE + (32 << 10), fed
    assert [g.error_code for g in goaways(server.data_to_send())] == [hbone.ENHANCE_YOUR_CALM]


def test_oversized_frame_is_refused_when_its_header_arrives() -> None:
    """h2 alone buffers a whole frame before checking its length (16 MiB)."""
    raw, server = raw_server()
    header = (16 * MIB - 1).to_bytes(3, "big") + bytes([0x0, 0]) + (1).to_bytes(4, "big")
    events = server.receive_data(header + b"\x00" * 1000)
    ended = of_type(events, ConnectionEnded)
    assert ended and ended[0].error_code == h2.errors.ErrorCodes.FRAME_SIZE_ERROR


def test_header_block_in_continuations_below_the_limit_is_served() -> None:
    raw, server = raw_server()
    extra = [(f"x-pad-{i}", "v" * 1000) for i in range(40)]  # ~41 KB, 3 frames
    block = hpack.Encoder().encode([*connect_headers(), *extra])
    parts = [block[i : i + 16384] for i in range(0, len(block), 16384)]
    data = raw_frame(0x1, 0, 1, parts[0])
    for j, part in enumerate(parts[1:], 1):
        data += raw_frame(0x9, 0x4 if j == len(parts) - 1 else 0, 1, part)
    events = server.receive_data(data)
    (req,) = of_type(events, TunnelRequested)
    assert req.authority == "10.0.0.1:80" and len(req.headers) == 40


def test_inbound_frame_size_is_bounded() -> None:
    """What one connection may make us hold for a partial frame."""
    assert hbone.MAX_FRAME_SIZE <= 256 << 10


# --- 4. containment: one bad stream, never the connection ----------------------------------


def test_refusal_after_stream_id_jump_resets_only_that_stream() -> None:
    """Stream 3 is refused (bad authority) while h2 has already seen stream 11
    in the same read and closed 3 implicitly: h2 raises StreamIDTooLowError."""
    raw, server = raw_server()
    raw.send_headers(1, connect_headers("10.0.0.1:80"))
    raw.send_headers(3, connect_headers("not-an-address"))
    raw.reset_stream(3)
    raw.send_headers(11, connect_headers("10.0.0.2:80"))
    events = server.receive_data(raw.data_to_send())
    assert [ev.stream_id for ev in of_type(events, TunnelRequested)] == [1, 11]
    assert not of_type(events, ConnectionEnded)
    for sid in (1, 11):
        server.accept_tunnel(sid)
        server.send(sid, b"still here")
    raw_events, _ = raw_exchange(raw, server)
    got = {ev.stream_id: ev.data for ev in raw_events if isinstance(ev, h2.events.DataReceived)}
    assert got == {1: b"still here", 11: b"still here"}
    assert not server.ended


def test_non_utf8_header_value_refuses_that_stream_only() -> None:
    raw, server = raw_server()
    raw.send_headers(1, connect_headers("10.0.0.1:80"))
    raw.send_headers(
        3,
        [
            (b":method", b"CONNECT"),
            (b":authority", b"10.0.0.2:80"),
            (b"baggage", b"\xff\xfe not utf-8"),
        ],
    )
    raw.send_headers(5, connect_headers("10.0.0.3:80"))
    events = server.receive_data(raw.data_to_send())
    assert [ev.stream_id for ev in of_type(events, TunnelRequested)] == [1, 5]
    assert not of_type(events, ConnectionEnded)
    server.accept_tunnel(1)
    server.accept_tunnel(5)
    raw_events, _ = raw_exchange(raw, server)
    statuses = {
        ev.stream_id: dict(ev.headers)[":status"]
        for ev in raw_events
        if isinstance(ev, h2.events.ResponseReceived)
    }
    assert statuses == {1: "200", 3: "400", 5: "200"}


def test_answers_for_streams_the_peer_already_reset_are_harmless() -> None:
    """The shell answers after an await; the peer may have reset meanwhile."""
    raw, server = raw_server()
    raw.send_headers(1, connect_headers())
    raw.send_headers(3, connect_headers("10.0.0.2:80"))
    server.receive_data(raw.data_to_send())
    raw.reset_stream(1)
    server.receive_data(raw.data_to_send())
    server.accept_tunnel(1)
    server.refuse_tunnel(1, 503, "late")
    server.send(1, b"late")
    server.ack(1, 10)
    server.end(1)
    server.reset(1)
    server.accept_tunnel(3)
    server.send(3, b"ok")
    raw_events, _ = raw_exchange(raw, server)
    assert [ev.data for ev in raw_events if isinstance(ev, h2.events.DataReceived)] == [b"ok"]
    assert not server.ended


def test_calls_after_the_connection_failed_never_raise() -> None:
    client, server = connected_pair()
    sid = open_established(client, server)
    events = server.receive_data(raw_frame(0x0, 0, 0, b"abc"))  # DATA on stream 0
    assert of_type(events, ConnectionEnded)
    server.accept_tunnel(sid)
    server.refuse_tunnel(sid, 503, "x")
    server.send(sid, b"x")
    server.ack(sid, 1)
    server.end(sid)
    server.reset(sid)
    server.ping()
    server.close(hbone.NO_ERROR)
    assert server.handle_timer(1e9) == []


# --- 5. PING: answered, but they keep us alive only if the peer reads -------------------------


def test_keepalive_ping_after_silence_and_dead_peer_detected() -> None:
    limits = hbone.HboneLimits(keepalive_interval=20.0, keepalive_timeout=10.0, idle_timeout=None)
    client = HboneConnection(client_side=True, limits=limits, now=0.0)
    server = HboneConnection(client_side=False, now=0.0)
    server.receive_data(client.data_to_send(), now=0.0)
    client.receive_data(server.data_to_send(), now=0.0)
    server.receive_data(client.data_to_send(), now=0.0)
    sid = client.open_tunnel("10.0.0.1:80")
    client.data_to_send()
    assert client.next_timer() == 20.0
    assert client.handle_timer(19.9) == [] and client.data_to_send() == b""
    assert client.handle_timer(20.0) == []
    pings = [f for f in parse_frames(client.data_to_send()) if isinstance(f, PingFrame)]
    assert len(pings) == 1 and "ACK" not in pings[0].flags
    assert client.next_timer() == 30.0
    assert client.handle_timer(29.9) == []
    events = client.handle_timer(30.0)  # the peer never answered
    assert events[0] == TunnelReset(sid, hbone.CANCEL, False)
    assert isinstance(events[1], ConnectionEnded) and "PING" in events[1].reason
    assert client.ended and not client.has_capacity()
    assert client.next_timer() is None


def test_keepalive_answered_keeps_the_connection() -> None:
    limits = hbone.HboneLimits(keepalive_interval=20.0, keepalive_timeout=10.0, idle_timeout=None)
    client = HboneConnection(client_side=True, limits=limits, now=0.0)
    server = HboneConnection(client_side=False, now=0.0)
    server.receive_data(client.data_to_send(), now=0.0)
    client.receive_data(server.data_to_send(), now=0.0)
    for t in range(20, 200, 20):
        client.handle_timer(float(t))
        server.receive_data(client.data_to_send(), now=float(t))
        assert client.receive_data(server.data_to_send(), now=t + 0.5) == []
        assert client.handle_timer(t + 10.0) == []
    assert not client.ended and client.has_capacity()


def test_idle_connection_is_closed_gracefully() -> None:
    limits = hbone.HboneLimits(idle_timeout=60.0, keepalive_interval=1e6)
    server = HboneConnection(client_side=False, limits=limits, now=0.0)
    client = HboneConnection(client_side=True, now=0.0)
    server.receive_data(client.data_to_send(), now=0.0)
    client.receive_data(server.data_to_send(), now=0.0)
    server.receive_data(client.data_to_send(), now=0.0)
    sid = client.open_tunnel("10.0.0.1:80")
    server.receive_data(client.data_to_send(), now=10.0)
    assert server.handle_timer(65.0) == []  # a stream is open: not idle
    server.reset(sid)
    client.receive_data(server.data_to_send(), now=66.0)
    assert server.handle_timer(100.0) == []
    events = server.handle_timer(125.0)
    assert len(events) == 1 and isinstance(events[0], ConnectionEnded)
    assert events[0].error_code == hbone.NO_ERROR and "idle" in events[0].reason
    assert [g.error_code for g in goaways(server.data_to_send())] == [hbone.NO_ERROR]


def test_ping_flood_answers_never_exceed_the_input() -> None:
    """The sans-IO part: one ACK per PING, nothing amplified (the shell caps
    what piles up when the peer does not read: tests/unit/ztunnel/test_session_limits.py)."""
    raw, server = raw_server()
    pings = b"".join(
        PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize() for i in range(1000)
    )
    assert server.receive_data(pings) == []
    assert len(server.data_to_send()) == len(pings)


# --- sanity: the ordinary path is untouched --------------------------------------------------


def test_ordinary_tunnel_still_round_trips() -> None:
    client, server = connected_pair()
    sid = open_established(client, server)
    client.send(sid, b"ping")
    server.send(sid, b"pong")
    client_events, server_events = pump(client, server, auto_ack=True)
    assert data_of(server_events, sid) == b"ping" and data_of(client_events, sid) == b"pong"
    assert TunnelEstablished not in map(type, client_events)


def test_raw_rst_frame_for_unknown_stream_is_ignored() -> None:
    raw, server = raw_server()
    frames = RstStreamFrame(99, error_code=8).serialize()
    events = server.receive_data(frames)
    assert not of_type(events, TunnelReset)


def test_calls_after_the_peer_ended_the_connection_report_nothing() -> None:
    """Found by fuzz/fuzz_hbone_client.py: after a GOAWAY with an error the
    shell still sends on a stream it has not aborted yet; that must neither
    raise nor report a stream failure of ours."""
    client, server = connected_pair()
    a = open_established(client, server)
    client.receive_data(
        GoAwayFrame(0, last_stream_id=a, error_code=hbone.INTERNAL_ERROR).serialize()
    )
    assert client.ended
    client.send(a, b"late")
    client.end(a)
    client.ack(a, 1)
    client.reset(a)
    assert client.take_events() == []
