"""The asyncio shell's limits, driven by bytes through a stand-in transport
(asyncio's flow-control semantics: pause_writing above the high-water mark,
resume_writing below the low one) -- plus the inbound connection caps and the
pool's choice of connections. No sockets."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h2.connection
import h2.settings
import pytest
from hyperframe.frame import PingFrame

from meshnode.core.identity import SpiffeId
from meshnode.ztunnel import hbone, inbound, session
from meshnode.ztunnel.metrics import ProxyMetrics
from meshnode.ztunnel.pool import HbonePool, PoolKey
from meshnode.ztunnel.session import HboneSession, PlainSide
from tests.unit.ztunnel.test_hbone import raw_h2_client


class FakeTransport:
    """Records what is written; drains only when told to."""

    def __init__(self, protocol: asyncio.Protocol, high: int = 64 << 10, low: int = 16 << 10):
        self.protocol = protocol
        self.buffer = 0
        self.high, self.low = high, low
        self.writing_paused = False
        self.reading_paused = False
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.buffer += len(data)
        if self.buffer > self.high and not self.writing_paused:
            self.writing_paused = True
            self.protocol.pause_writing()

    def drain(self) -> None:
        self.buffer = 0
        if self.writing_paused:
            self.writing_paused = False
            self.protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self.buffer

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.low, self.high

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def run(fn: Any) -> Any:
    async def main() -> Any:
        return fn()

    return asyncio.run(main())


def served_session() -> tuple[HboneSession, FakeTransport, h2.connection.H2Connection]:
    """Our server side over a stand-in transport, a raw h2 peer, SETTINGS done."""
    s = HboneSession(
        hbone.HboneConnection(client_side=False), on_request=lambda s, ev: None
    )  # the test answers
    t = FakeTransport(s)
    s.connection_made(t)  # type: ignore[arg-type]
    raw = raw_h2_client()
    s.data_received(raw.data_to_send())
    raw.receive_data(t_take(s))
    s.data_received(raw.data_to_send())
    t.drain()
    return s, t, raw


def t_take(s: HboneSession) -> bytes:
    """What the session wrote: the fake transport only counts, so re-frame
    from the connection (tests that need bytes call this before flushing)."""
    return s.conn.data_to_send()


def test_ping_flood_from_a_peer_that_does_not_read_is_bounded() -> None:
    """PINGs in, the peer never reads our ACKs: past READ_PAUSE_AT of unsent
    answers the TLS socket is no longer read, so we hold that much, not all of
    what the peer cares to send (before: 1.7 MB in, 1.7 MB of ACKs queued)."""

    def body() -> None:
        s, t, _ = served_session()
        chunk = b"".join(
            PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize() for i in range(4096)
        )  # 68 KiB of PINGs per read
        fed = 0
        while not t.reading_paused and fed < (32 << 20):
            s.data_received(chunk)  # a real transport calls this only while reading
            fed += len(chunk)
        assert t.reading_paused, f"still reading after {fed} bytes of PINGs"
        assert t.buffer <= session.READ_PAUSE_AT + len(chunk), t.buffer
        assert not t.aborted
        t.drain()  # the peer reads at last
        assert not t.reading_paused

    run(body)


class Sink(PlainSide):
    """A plain side that takes whatever the session gives it."""

    def __init__(self) -> None:
        super().__init__()
        self.reset_reason: str | None = None

    def on_reset(self, reason: str) -> None:
        self.reset_reason = reason
        self.finished = True


def test_our_data_stops_at_the_high_water_mark_so_two_ends_never_deadlock() -> None:
    """Bulk data while the TLS socket is full is queued in the streams, not
    framed into the transport: only the peer's own frames can push the write
    buffer to READ_PAUSE_AT, so two meshnode ends sending bulk both ways never
    both stop reading. Many streams reading in one loop turn included."""

    async def body() -> None:
        s, t, raw = served_session()
        # A peer with windows as big as ours (the raw client's are 64 KiB).
        raw.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: hbone.STREAM_WINDOW})
        raw.increment_flow_control_window(hbone.CONNECTION_WINDOW - 65535)
        s.data_received(raw.data_to_send())
        streams = list(range(1, 64, 2))  # 32 plain sockets, all readable at once
        for sid in streams:
            raw.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
        s.data_received(raw.data_to_send())
        for sid in streams:
            Sink().bind(s, sid)
            s.accept(sid)
        t.drain()
        told_to_stop = 0
        for sid in streams:  # one 256 KiB read each, in the same loop turn
            told_to_stop += not s.send(sid, b"b" * (256 << 10))
        await asyncio.sleep(0)  # the coalesced flush
        await asyncio.sleep(0)
        assert t.buffer < 1 << 20, t.buffer  # far below session.READ_PAUSE_AT
        assert told_to_stop >= len(streams) - 4
        assert not t.reading_paused
        t.drain()  # the peer reads: the queued data goes out
        await asyncio.sleep(0)
        assert t.buffer > 0

    asyncio.run(body())


class Counting(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.woken = 0

    def on_writable(self) -> None:
        self.woken += 1


def test_streams_stopped_by_the_connection_queue_cap_are_woken_when_it_drains(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stream B sent everything it had, but was told to stop because stream
    A's queue filled the connection's: B must be woken when that drains, not
    only A (which gets SendWindowOpened)."""
    monkeypatch.setattr(session, "CONNECTION_PENDING_HIGH", 1 << 20)

    def body() -> None:
        s, t, raw = served_session()
        raw.increment_flow_control_window(hbone.CONNECTION_WINDOW - 65535)
        s.data_received(raw.data_to_send())
        for sid in (1, 3):
            raw.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
        s.data_received(raw.data_to_send())
        a, b = Counting(), Counting()
        a.bind(s, 1)
        b.bind(s, 3)
        s.accept(1)
        s.accept(3)
        assert not s.send(1, b"a" * (2 << 20))  # 64 KiB out, the rest queued
        assert not s.send(3, b"b")  # went out, but the connection queue is full
        assert s.conn.pending(3) == 0
        t.drain()
        woken_before = b.woken
        raw.receive_data(s.conn.data_to_send())
        raw.increment_flow_control_window(4 << 20, stream_id=1)
        s.data_received(raw.data_to_send())
        assert s.conn.queued_bytes == 0
        assert b.woken > woken_before

    run(body)


def test_failed_h2_call_resets_the_stream_through_the_shell() -> None:
    """accept() on a stream h2 closed meanwhile: the handler is told, nothing raises."""

    def body() -> None:
        s, t, raw = served_session()
        raw.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
        raw.send_headers(3, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
        s.data_received(raw.data_to_send())
        sink = Sink()
        sink.bind(s, 1)
        # Make h2 refuse the answer: the stream is gone on its side only.
        del s.conn._h2.streams[1]
        s.accept(1)
        assert sink.reset_reason is not None and "us" in sink.reset_reason
        s.accept(3)
        assert not s.conn.ended and not t.closing

    run(body)


def test_rapid_reset_flood_closes_the_connection_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """CONNECT + RST_STREAM as fast as the peer can: GOAWAY ENHANCE_YOUR_CALM,
    the TLS connection closed, the shell told (metrics hook) and a warning
    naming the peer -- before, 20,000 tunnels in 1.7 s, each authorized and
    connected."""
    requested: list[int] = []
    ended: list[hbone.ConnectionEnded] = []

    def body() -> None:
        s = HboneSession(
            hbone.HboneConnection(client_side=False),
            on_request=lambda s, ev: requested.append(ev.stream_id),
            on_ended=lambda s, ev: ended.append(ev),
        )
        s.peer = A
        t = FakeTransport(s)
        s.connection_made(t)  # type: ignore[arg-type]
        raw = raw_h2_client()
        s.data_received(raw.data_to_send())
        for i in range(2000):
            if t.closing:
                break
            raw.send_headers(2 * i + 1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
            raw.reset_stream(2 * i + 1)
            s.data_received(raw.data_to_send())
        assert t.closing
        assert [ev.error_code for ev in ended] == [hbone.ENHANCE_YOUR_CALM]
        assert len(requested) <= 201

    with caplog.at_level(logging.WARNING, "meshnode.ztunnel.session"):
        run(body)
    assert "rapid reset" in caplog.text and str(A) in caplog.text


# --- inbound connection caps -----------------------------------------------------------


class _Session:
    def __init__(self, peer: SpiffeId, address: str) -> None:
        self.peer = peer
        self.peer_address = address


class _Config:
    max_inbound_connections = 6
    max_connections_per_identity = 3
    max_connections_per_address = 4
    max_streams = 100
    idle_timeout = 300.0


class _Pi:
    def __init__(self) -> None:
        self.config = _Config()
        self.inbound_sessions: set[Any] = set()
        self.metrics = ProxyMetrics()


A = SpiffeId("cluster.local", "default", "a")
B = SpiffeId("cluster.local", "default", "b")


def test_connections_are_capped_per_identity_per_address_and_in_total() -> None:
    pi = _Pi()
    for _ in range(3):
        assert inbound.connection_limit(pi, A, "10.0.0.1") is None  # type: ignore[arg-type]
        pi.inbound_sessions.add(_Session(A, "10.0.0.1"))
    reason = inbound.connection_limit(pi, A, "10.0.0.2")  # type: ignore[arg-type]
    assert reason is not None and "per identity" in reason
    pi.inbound_sessions.add(_Session(B, "10.0.0.1"))
    reason = inbound.connection_limit(pi, B, "10.0.0.1")  # type: ignore[arg-type]
    assert reason is not None and "per address" in reason
    assert inbound.connection_limit(pi, B, "10.0.0.3") is None  # type: ignore[arg-type]
    pi.inbound_sessions.add(_Session(B, "10.0.0.3"))
    pi.inbound_sessions.add(_Session(B, "10.0.0.4"))
    reason = inbound.connection_limit(
        pi,
        SpiffeId("cluster.local", "x", "c"),  # type: ignore[arg-type]
        "10.0.0.9",
    )
    assert reason is not None and "inbound connections are open" in reason


def test_connection_over_the_cap_is_refused_with_a_log_line_and_a_metric(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pi = _Pi()
    pi.state = type("S", (), {"trust_domain": "cluster.local"})()  # type: ignore[attr-defined]
    pi.tls = type("T", (), {"served_identity": staticmethod(lambda o: B)})()  # type: ignore[attr-defined]
    for i in range(3):
        pi.inbound_sessions.add(_Session(A, f"10.0.0.{i}"))
    monkeypatch.setattr(inbound, "peer_identity", lambda ssl_object: A)

    def body() -> bool:
        s = inbound.new_session(pi)  # type: ignore[arg-type]
        s.transport = FakeTransport(s)  # type: ignore[assignment]
        s.transport.get_extra_info = lambda name, default=None: (  # type: ignore[union-attr,method-assign]
            ("10.0.0.7", 40000) if name == "peername" else default
        )
        return inbound._verify_peer(pi, s)  # type: ignore[arg-type]

    with caplog.at_level(logging.WARNING, "meshnode.ztunnel.inbound"):
        assert run(body) is False
    assert "refused" in caplog.text and "per identity" in caplog.text
    assert pi.metrics.failed.get(("inbound", "connection_limit")) == 1


# --- the pool hands out no dead or draining connection ------------------------------------


def test_pool_skips_connections_found_dead_by_keepalive() -> None:
    def body() -> None:
        pool = HbonePool(tls=None)  # type: ignore[arg-type]
        key = PoolKey(A, ("10.0.0.2", 15008), B)
        limits = hbone.HboneLimits(keepalive_interval=20.0, keepalive_timeout=10.0)
        conn = hbone.HboneConnection(client_side=True, limits=limits, now=0.0)
        peer = hbone.HboneConnection(client_side=False, now=0.0)
        peer.receive_data(conn.data_to_send(), now=0.0)
        conn.receive_data(peer.data_to_send(), now=0.0)
        s = HboneSession(conn)
        s.connection_made(FakeTransport(s))  # type: ignore[arg-type]
        pool._sessions[key] = [s]
        assert pool._find(key) is s
        conn.handle_timer(20.0)  # PING sent; the peer is gone and never answers
        assert pool._find(key) is s
        for ev in conn.handle_timer(30.0):
            s._dispatch(ev)
        assert pool._find(key) is None
        assert s.transport is not None and s.transport.is_closing()

    run(body)


def test_pool_skips_draining_connections() -> None:
    def body() -> None:
        pool = HbonePool(tls=None)  # type: ignore[arg-type]
        key = PoolKey(A, ("10.0.0.2", 15008), B)
        conn = hbone.HboneConnection(client_side=True)
        peer = hbone.HboneConnection(client_side=False)
        s = HboneSession(conn)
        s.connection_made(FakeTransport(s))  # type: ignore[arg-type]
        pool._sessions[key] = [s]
        peer.receive_data(conn.data_to_send())
        conn.receive_data(peer.data_to_send())
        peer.close(hbone.NO_ERROR, "going away")
        for ev in conn.receive_data(peer.data_to_send()):
            s._dispatch(ev)
        assert pool._find(key) is None

    run(body)


def test_the_session_runs_the_keepalive_timer() -> None:
    """The shell arms the connection's timer: a silent peer is found dead and
    the TLS connection closed (short times here; 20 s + 10 s by default)."""

    async def body() -> None:
        limits = hbone.HboneLimits(
            keepalive_interval=0.05, keepalive_timeout=0.05, idle_timeout=None
        )
        s = HboneSession(hbone.HboneConnection(client_side=True, limits=limits))
        t = FakeTransport(s)
        s.connection_made(t)  # type: ignore[arg-type]
        for _ in range(100):
            if t.closing:
                break
            await asyncio.sleep(0.02)
        assert t.closing and s.conn.ended

    asyncio.run(body())


class CountingTransport(FakeTransport):
    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__(protocol)
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


def test_one_tls_write_per_read_whatever_the_read_makes_us_send() -> None:
    """A read holding a PING, DATA for a stream (acknowledged while its events
    are dispatched) and a new CONNECT (answered at once) costs one TLS write,
    not one per answer."""

    async def body() -> None:
        s, t, raw = served_session()
        raw.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
        s.data_received(raw.data_to_send())
        plain = Sink()
        plain.connection_made(FakeTransport(plain))  # type: ignore[arg-type]
        plain.bind(s, 1)
        s.accept(1)
        raw.receive_data(t_take(s))
        s._on_request = lambda sess, ev: sess.accept(ev.stream_id)
        counting = CountingTransport(s)
        s.transport = counting  # type: ignore[assignment]
        raw.ping(b"12345678")
        raw.send_data(1, b"x" * 1000)
        raw.send_headers(3, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
        s.data_received(raw.data_to_send())
        assert plain.bytes_out == 1000
        assert counting.writes == 1

    asyncio.run(body())
