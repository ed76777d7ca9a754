"""What both fuzz targets share: a real HBONE handshake to start from, the
operations a fuzz input is decoded into, and the invariants checked after
each one. Kept free of atheris so tests and the targets can both import it.

An input is a program: each step either feeds the connection under test bytes
"from the peer" (raw, or a frame with a fuzzed header and payload, so mutations
explore frame-level logic instead of dying in the frame parser), or makes one of
the calls the shell makes (accept, refuse, send, ack, end, reset, timers,
pausing output). After every step:

* no exception escaped (LocalProtocolError only where the call was our misuse);
* events are consistent: no DataReceived/TunnelHalfClosed for a stream after
  its TunnelReset/TunnelRefused, nothing after ConnectionEnded with an error;
* memory is bounded: queued send data, unacknowledged bytes, h2's partial-frame
  and header-block buffers, and what we answer relative to what came in.
"""

from __future__ import annotations

import struct

from meshnode.ztunnel import h2compat, hbone

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_OPS = 64
MAX_FEED = 1 << 16  # bytes per feed step
MAX_SEND = 1 << 18  # bytes per send call


class Invariant(AssertionError):
    """A fuzz finding: the connection broke one of its promises."""


class Source:
    """Decodes the fuzz input: small integers and byte strings, front to back
    (libFuzzer mutates the bytes; replaying a crash needs no atheris)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def int(self, lo: int, hi: int) -> int:
        if self.remaining() <= 0:
            return lo
        b = self.data[self.pos]
        self.pos += 1
        if hi - lo >= 256 and self.remaining() > 0:
            b = b << 8 | self.data[self.pos]
            self.pos += 1
        return lo + b % (hi - lo + 1)

    def bytes(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out


def handshake(client_side: bool) -> tuple[hbone.HboneConnection, hbone.HboneConnection]:
    """The connection under test and a well-behaved peer, SETTINGS exchanged
    both ways; on the client side one tunnel is open and established."""
    ours = hbone.HboneConnection(client_side=client_side, now=0.0)
    peer = hbone.HboneConnection(client_side=not client_side, now=0.0)
    for _ in range(4):
        a, b = ours.data_to_send(), peer.data_to_send()
        if a:
            peer.receive_data(a, 0.0)
        if b:
            ours.receive_data(b, 0.0)
    if client_side:
        sid = ours.open_tunnel("10.0.0.1:80")
        peer.receive_data(ours.data_to_send(), 0.0)
        peer.accept_tunnel(sid)
        ours.receive_data(peer.data_to_send(), 0.0)
    return ours, peer


def frame(src: Source) -> bytes:
    """A frame with a fuzzed header: type (known types mostly), flags, a small
    stream id, a length that usually matches the payload."""
    kind = src.int(0, 11)
    flags = src.int(0, 255)
    sid = src.int(0, 15)
    payload = src.bytes(src.int(0, 300))
    length = len(payload) if src.int(0, 7) else src.int(0, 1 << 24 - 1)
    return struct.pack(">I", length)[1:] + bytes([kind, flags]) + struct.pack(">I", sid) + payload


class Run:
    """One fuzz input against one connection."""

    def __init__(self, client_side: bool) -> None:
        self.conn, _ = handshake(client_side)
        self.client_side = client_side
        self.now = 0.0
        self.live: set[int] = set()  # streams the events said are open
        self.gone: set[int] = set()  # streams the events said are over
        self.unacked: dict[int, int] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.sent = 0
        self.ops = 0
        self.ended = False
        self._ends: set[int] = set()  # streams we half-closed
        if client_side:
            self.live.add(1)
            self.unacked[1] = 0

    # -- steps ----------------------------------------------------------------------

    def step(self, src: Source) -> None:
        op = src.int(0, 15)
        conn = self.conn
        sid = self._pick(src)
        if op <= 5:
            data = src.bytes(src.int(0, MAX_FEED)) if op == 0 else frame(src)
            self.bytes_in += len(data)
            self._events(conn.receive_data(data, self.now))
        elif op == 6:
            if not self.client_side:
                conn.accept_tunnel(sid)
        elif op == 7:
            if not self.client_side:
                conn.refuse_tunnel(sid, src.int(100, 599), "fuzz", self.now)
                if sid in self.live:  # else: a stream not (yet) requested
                    self._gone(sid)
        elif op == 8:
            n = src.int(0, MAX_SEND)
            try:
                conn.send(sid, b"s" * n)
                self.sent += n
            except hbone.LocalProtocolError:
                # Documented misuse: never opened, or our side already ended.
                if sid in self.live and not self._ended_locally(sid):
                    raise Invariant(f"send on live stream {sid} raised") from None
        elif op == 9:
            n = min(self.unacked.get(sid, 0), src.int(0, 1 << 20))
            conn.ack(sid, n)
            if sid in self.unacked:
                self.unacked[sid] -= n
        elif op == 10:
            conn.end(sid)
            self._ends.add(sid)
        elif op == 11:
            conn.reset(sid, src.int(0, 13))
            if sid in self.live:
                self._gone(sid)
        elif op == 12:
            self.now += src.int(0, 40)
            self._events(conn.handle_timer(self.now))
        elif op == 13:
            conn.pause_output()
        elif op == 14:
            self._events(conn.resume_output())
        elif op == 15 and self.client_side:
            try:
                new = conn.open_tunnel(f"10.0.0.{src.int(1, 254)}:{src.int(1, 65535)}")
            except hbone.LocalProtocolError:
                pass
            else:
                self.live.add(new)
                self.unacked[new] = 0
        self._events(conn.take_events())
        self.bytes_out += len(conn.data_to_send())
        self.ops += 1
        self._check()

    def _ended_locally(self, sid: int) -> bool:
        return sid in self._ends

    def _pick(self, src: Source) -> int:
        choices = sorted(self.live) or [1]
        i = src.int(0, len(choices) + 1)
        return choices[i] if i < len(choices) else src.int(1, 31)

    def _gone(self, sid: int) -> None:
        self.live.discard(sid)
        self.unacked.pop(sid, None)
        self.gone.add(sid)

    # -- events ---------------------------------------------------------------------

    def _events(self, events: list[hbone.Event]) -> None:
        if events and self.ended:
            raise Invariant(f"events after the connection ended: {events}")
        for ev in events:
            if isinstance(ev, hbone.TunnelRequested):
                if ev.stream_id in self.live or ev.stream_id in self.gone:
                    raise Invariant(f"stream {ev.stream_id} requested twice")
                self.live.add(ev.stream_id)
                self.unacked[ev.stream_id] = 0
            elif isinstance(ev, hbone.DataReceived):
                if ev.stream_id not in self.live:
                    raise Invariant(f"data for stream {ev.stream_id}, not open")
                if ev.flow_length < len(ev.data):
                    raise Invariant("flow length below the data length")
                self.unacked[ev.stream_id] += ev.flow_length
            elif isinstance(
                ev, hbone.TunnelHalfClosed | hbone.TunnelEstablished | hbone.SendWindowOpened
            ):
                if ev.stream_id not in self.live:
                    raise Invariant(f"{type(ev).__name__} for stream {ev.stream_id}, not open")
            elif isinstance(ev, hbone.TunnelReset | hbone.TunnelRefused):
                self._gone(ev.stream_id)
        if self.conn.ended and any(isinstance(ev, hbone.ConnectionEnded) for ev in events):
            self.ended = True

    # -- bounds -----------------------------------------------------------------------

    def _check(self) -> None:
        conn = self.conn
        if conn.queued_bytes < 0 or conn.queued_bytes > self.sent:
            raise Invariant(f"queued {conn.queued_bytes} of {self.sent} sent")
        if conn.unacked_bytes > hbone.CONNECTION_WINDOW:
            raise Invariant(f"{conn.unacked_bytes} unacknowledged, over the window")
        buf = conn._h2.incoming_buffer
        held = len(getattr(buf, h2compat._BUFFER_ATTR))
        if held > hbone.MAX_FRAME_SIZE + 9 + MAX_FEED:
            raise Invariant(f"{held} bytes of partial frames held")
        block = sum(len(f.data) for f in buf._headers_buffer)
        if block > hbone.MAX_HEADER_LIST_SIZE + hbone.MAX_FRAME_SIZE:
            raise Invariant(f"{block} bytes of header block held")
        # What we answer: frames for frames (ACKs, RSTs, WINDOW_UPDATEs), ours.
        allowed = 4 * self.bytes_in + self.sent + self.sent // 1000 + 1024 * self.ops + 65536
        if self.bytes_out > allowed:
            raise Invariant(f"{self.bytes_out} bytes out for {self.bytes_in} in")


def one_input(data: bytes, client_side: bool) -> None:
    """Run one fuzz input; raises on a finding."""
    run = Run(client_side)
    src = Source(data)
    for _ in range(MAX_OPS):
        if src.remaining() <= 0:
            break
        run.step(src)
