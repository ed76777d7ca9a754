"""The DNS proxy (ztunnel/dns.py): mesh names answered from state, the rest
forwarded unchanged. Pure tests of the name table, the answerer (and its
cache), the rate limiter and the resolv.conf reader; a bounded, seeded fuzz of
the answerer with hostile bytes; and the asyncio proxy on loopback against a
fake upstream resolver built with dnspython, queried with dnspython's own
clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.update
import pytest
import uvloop

from meshnode.ztunnel.dns import (
    DnsAnswerer,
    DnsMetrics,
    DnsProxy,
    Drop,
    Forward,
    MeshNames,
    RateLimiter,
    Reply,
    fit_udp,
    read_upstreams,
)
from meshnode.ztunnel.metrics import Registry

LOOPBACK = "127.0.0.1"
SERVICES = [
    ("web", "shop", "10.96.0.10"),
    ("api", "default", "10.96.0.11"),
    ("db", "data", "10.96.0.12"),
]
NAMES = MeshNames.build("mesh", SERVICES)


def query(
    name: str, rdtype: str = "A", qid: int = 0x1234, **kw: Any
) -> tuple[dns.message.Message, bytes]:
    q = dns.message.make_query(name, rdtype, **kw)
    q.id = qid
    return q, q.to_wire()


def parse(reply: Reply | Forward | Drop) -> dns.message.Message:
    assert isinstance(reply, Reply), reply
    return dns.message.from_wire(reply.wire)


def a_values(msg: dns.message.Message) -> list[str]:
    return [rd.to_text() for rrset in msg.answer for rd in rrset if rrset.rdtype == 1]


# ---------------------------------------------------------------------------
# MeshNames


def test_lookup_full_and_short_forms() -> None:
    assert NAMES.lookup("web.shop.mesh") == "10.96.0.10"
    assert NAMES.lookup("api.default.mesh") == "10.96.0.11"
    assert NAMES.lookup("api.mesh") == "10.96.0.11"  # short form: namespace default
    assert NAMES.lookup("web.mesh") is None  # web is in shop, not default
    assert NAMES.domain == "mesh"


def test_lookup_case_and_trailing_dot() -> None:
    assert NAMES.lookup("WEB.Shop.MESH.") == "10.96.0.10"
    assert NAMES.lookup("Api.Mesh") == "10.96.0.11"
    assert NAMES.lookup("web.shop.mesh.") == "10.96.0.10"


def test_lookup_nxdomain_under_the_domain_and_false_outside() -> None:
    assert NAMES.lookup("nope.shop.mesh") is None
    assert NAMES.lookup("mesh") is None  # the domain itself
    assert NAMES.lookup("x.web.shop.mesh") is None  # deeper than a service
    assert NAMES.lookup("example.com") is False
    assert NAMES.lookup("web.shop.mesh.example.com") is False
    assert NAMES.lookup("notmesh") is False  # a suffix that is not a label boundary
    assert NAMES.lookup("a..b") is False  # not a DNS name at all


def test_configurable_domain() -> None:
    names = MeshNames.build("Mesh.Internal.", SERVICES)
    assert names.domain == "mesh.internal"
    assert names.lookup("web.shop.mesh.internal") == "10.96.0.10"
    assert names.lookup("api.mesh.internal") == "10.96.0.11"
    assert names.lookup("web.shop.mesh") is False
    assert names.lookup("nope.mesh.internal") is None


def test_bad_domain_and_bad_services() -> None:
    for bad in (".", "", "a..b"):
        with pytest.raises(ValueError, match="mesh DNS domain"):
            MeshNames.build(bad, SERVICES)
    names = MeshNames.build(
        "mesh",
        [("ok", "ns", "10.0.0.1"), ("no-vip", "ns", ""), ("a.b", "ns", "10.0.0.2"),
         ("v6", "ns", "fd00::1"), ("x" * 64, "ns", "10.0.0.3")],
    )  # fmt: skip
    assert names.lookup("ok.ns.mesh") == "10.0.0.1"
    assert names.lookup("no-vip.ns.mesh") is None
    assert set(names.skipped) == {"no-vip.ns", "a.b.ns", "v6.ns", "x" * 64 + ".ns"}
    with pytest.raises(AttributeError):
        names.domain = "other"


# ---------------------------------------------------------------------------
# DnsAnswerer


def test_a_answer_has_the_vip_and_aa() -> None:
    q, wire = query("web.shop.mesh")
    result = DnsAnswerer(NAMES).handle(wire)
    assert isinstance(result, Reply)
    assert (result.rcode, result.qtype) == ("NOERROR", "A")
    r = parse(result)
    assert r.id == 0x1234 and r.flags & dns.flags.QR and r.flags & dns.flags.AA
    assert r.flags & dns.flags.RD  # copied from the query
    assert r.question == q.question
    assert a_values(r) == ["10.96.0.10"]
    assert r.answer[0].ttl == 5
    assert r.answer[0].name == dns.name.from_text("web.shop.mesh")


def test_ttl_is_configurable_and_case_is_echoed() -> None:
    _, wire = query("WEB.Shop.mesh")
    r = parse(DnsAnswerer(NAMES, ttl=30).handle(wire))
    assert r.answer[0].ttl == 30
    assert r.answer[0].name.to_text() == "WEB.Shop.mesh."  # as the client asked (0x20)


def test_aaaa_and_other_types_are_nodata() -> None:
    answerer = DnsAnswerer(NAMES)
    for rdtype in ("AAAA", "TXT", "MX"):
        result = answerer.handle(query("web.shop.mesh", rdtype)[1])
        assert isinstance(result, Reply) and result.rcode == "NOERROR"
        r = parse(result)
        assert r.rcode() == dns.rcode.NOERROR and r.answer == [] and r.authority == []
        assert r.flags & dns.flags.AA
    aaaa = answerer.handle(query("web.shop.mesh", "AAAA")[1])
    naptr = answerer.handle(query("web.shop.mesh", "NAPTR")[1])
    assert isinstance(aaaa, Reply) and aaaa.qtype == "AAAA"
    assert isinstance(naptr, Reply) and naptr.qtype == "other"


def test_nxdomain_under_the_domain() -> None:
    answerer = DnsAnswerer(NAMES)
    for name, rdtype in (("nope.shop.mesh", "A"), ("mesh", "A"), ("nope.mesh", "AAAA")):
        result = answerer.handle(query(name, rdtype)[1])
        assert isinstance(result, Reply) and result.rcode == "NXDOMAIN", name
        r = parse(result)
        assert r.rcode() == dns.rcode.NXDOMAIN and r.answer == []
        assert r.flags & dns.flags.AA


def test_names_outside_the_domain_are_forwarded() -> None:
    answerer = DnsAnswerer(NAMES)
    assert answerer.handle(query("example.com")[1]) == Forward("A")
    assert answerer.handle(query("example.com", "AAAA")[1]) == Forward("AAAA")
    assert answerer.handle(query("mesh.example.com", "TXT")[1]) == Forward("TXT")
    # another class than IN is not the mesh's
    assert answerer.handle(query("web.shop.mesh", "TXT", rdclass="CH")[1]) == Forward("TXT")
    assert answerer.cached == 0  # forwards are never cached


def test_edns_is_echoed_with_the_payload_capped() -> None:
    answerer = DnsAnswerer(NAMES)
    r = parse(answerer.handle(query("web.shop.mesh", use_edns=0, payload=4096)[1]))
    assert r.edns == 0 and r.payload == 1232
    r = parse(answerer.handle(query("web.shop.mesh", use_edns=0, payload=800)[1]))
    assert r.edns == 0 and r.payload == 800
    r = parse(answerer.handle(query("web.shop.mesh")[1]))
    assert r.edns == -1  # no EDNS in, none out


def test_badvers_for_edns_version_1() -> None:
    result = DnsAnswerer(NAMES).handle(query("web.shop.mesh", use_edns=1)[1])
    assert isinstance(result, Reply) and result.rcode == "BADVERS"
    r = parse(result)
    assert r.rcode() == dns.rcode.BADVERS and r.edns == 0 and r.answer == []


def test_fit_udp_truncates_over_the_limit_and_tcp_never_does() -> None:
    q, _ = query("big.example.")
    r = dns.message.make_response(q)
    addresses = [f"192.0.2.{i}" for i in range(1, 60)]
    r.answer.append(dns.rrset.from_text("big.example.", 60, "IN", "A", *addresses))
    whole = fit_udp(r, 65535)
    assert len(whole) > 512
    full = dns.message.from_wire(whole)
    assert not full.flags & dns.flags.TC and len(full.answer[0]) == len(addresses)
    cut = fit_udp(r, 512)
    assert len(cut) <= 512
    t = dns.message.from_wire(cut)
    assert t.flags & dns.flags.TC and t.answer == [] and t.question == q.question


def test_mesh_answers_always_fit_512_bytes() -> None:
    """Why the answerer never truncates: the longest possible mesh name (255
    bytes) with EDNS still answers in far under 512 bytes, over UDP and TCP."""
    domain = "d" * 62 + "." + "e" * 62
    svc, ns = "s" * 63, "n" * 63
    names = MeshNames.build(domain, [(svc, ns, "10.0.0.1")])
    name = f"{svc}.{ns}.{domain}."
    name_wire = dns.name.from_text(name).to_wire()
    assert name_wire is not None and len(name_wire) == 255
    answerer = DnsAnswerer(names)
    for tcp in (False, True):
        result = answerer.handle(query(name, use_edns=0, payload=512)[1], tcp=tcp)
        assert isinstance(result, Reply) and len(result.wire) <= 512
        r = parse(result)
        assert not r.flags & dns.flags.TC and a_values(r) == ["10.0.0.1"]


def test_replies_are_not_padded_or_amplified() -> None:
    pad = dns.edns.GenericOption(dns.edns.OptionType.PADDING, b"")
    for name in ("web.shop.mesh", "nope.mesh"):
        _, wire = query(name, use_edns=0, options=[pad])
        result = DnsAnswerer(NAMES).handle(wire)
        assert isinstance(result, Reply)
        assert len(result.wire) <= len(wire) + 16  # one A record at most, no padding


def test_formerr_on_garbage_with_a_header() -> None:
    header = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0)  # claims a question
    for wire in (header, header + b"\x07garbage", header + b"\xff" * 40):
        result = DnsAnswerer(NAMES).handle(wire)
        assert isinstance(result, Reply) and result.rcode == "FORMERR"
        r = parse(result)
        assert r.id == 0xBEEF and r.flags & dns.flags.QR and r.question == []
        assert r.rcode() == dns.rcode.FORMERR
        assert len(result.wire) <= len(wire)


def test_formerr_unless_exactly_one_question() -> None:
    answerer = DnsAnswerer(NAMES)
    none = dns.message.Message(id=7)
    q, _ = query("web.shop.mesh")
    q.question.append(dns.message.make_query("api.mesh", "A").question[0])
    for msg in (none, q):
        result = answerer.handle(msg.to_wire())
        assert isinstance(result, Reply) and result.rcode == "FORMERR"
        assert parse(result).id == msg.id
    assert answerer.cached == 0  # errors are never cached


def test_drop_short_packets_and_responses() -> None:
    answerer = DnsAnswerer(NAMES)
    for n in range(12):
        assert isinstance(answerer.handle(b"\x12" * n), Drop)
    q, _ = query("web.shop.mesh")
    assert isinstance(answerer.handle(dns.message.make_response(q).to_wire()), Drop)
    broken_response = struct.pack("!HHHHHH", 1, 0x8000, 1, 0, 0, 0)
    assert isinstance(answerer.handle(broken_response), Drop)  # never answer a response


def test_notimp_for_other_opcodes() -> None:
    answerer = DnsAnswerer(NAMES)
    update = dns.update.UpdateMessage("mesh", id=9)
    update.add("web.shop", 60, "A", "10.0.0.9")
    notify = dns.message.make_query("mesh", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    for msg in (update, notify):
        result = answerer.handle(msg.to_wire())
        assert isinstance(result, Reply) and result.rcode == "NOTIMP"
        r = parse(result)
        assert r.rcode() == dns.rcode.NOTIMP and r.id == msg.id
        assert r.opcode() == msg.opcode()


@pytest.fixture
def parse_count(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    calls = [0]
    real = dns.message.from_wire

    def counting(*args: Any, **kw: Any) -> dns.message.Message:
        calls[0] += 1
        return real(*args, **kw)

    monkeypatch.setattr(dns.message, "from_wire", counting)
    yield calls


def test_cache_hit_answers_a_new_id_without_parsing(parse_count: list[int]) -> None:
    answerer = DnsAnswerer(NAMES)
    first = answerer.handle(query("web.shop.mesh", qid=1)[1])
    assert parse_count[0] == 1 and answerer.cached == 1
    second = answerer.handle(query("web.shop.mesh", qid=0xABCD)[1])
    assert parse_count[0] == 1  # served from the cache
    assert isinstance(first, Reply) and isinstance(second, Reply)
    assert second.wire == b"\xab\xcd" + first.wire[2:]
    assert (second.rcode, second.qtype) == (first.rcode, first.qtype)
    # The same bytes over TCP are another key (no size limit there).
    answerer.handle(query("web.shop.mesh", qid=2)[1], tcp=True)
    assert parse_count[0] == 2 and answerer.cached == 2
    # NXDOMAIN answers are mesh answers too, and cached.
    answerer.handle(query("nope.mesh")[1])
    answerer.handle(query("nope.mesh", qid=3)[1])
    assert parse_count[0] == 3
    assert parse(second).id == 0xABCD  # (this parse is the test's own)


def test_cache_never_outlives_the_names(parse_count: list[int]) -> None:
    _, wire = query("web.shop.mesh")
    moved = MeshNames.build("mesh", [("web", "shop", "10.96.9.9")])
    old = DnsAnswerer(NAMES)
    assert a_values(parse(old.handle(wire))) == ["10.96.0.10"]
    # The owner swaps in a new answerer: the new VIP at once.
    assert a_values(parse(DnsAnswerer(moved).handle(wire))) == ["10.96.9.9"]
    # Assigning names on the same answerer clears its cache too.
    old.names = moved
    assert old.cached == 0
    assert a_values(parse(old.handle(wire))) == ["10.96.9.9"]
    old.names = MeshNames.build("mesh", [])
    assert parse(old.handle(wire)).rcode() == dns.rcode.NXDOMAIN


def test_cache_is_bounded() -> None:
    answerer = DnsAnswerer(NAMES, max_cache=4)
    for i in range(50):
        answerer.handle(query(f"n{i}.mesh")[1])
        assert answerer.cached <= 4
    big = DnsAnswerer(NAMES, max_cache=0)
    big.handle(query("web.shop.mesh")[1])
    assert big.cached == 0


def test_servfail_reply_for_a_forwarded_query() -> None:
    q, wire = query("example.com", use_edns=0)
    r = dns.message.from_wire(DnsAnswerer(NAMES).servfail(wire))
    assert r.rcode() == dns.rcode.SERVFAIL and r.id == q.id and r.question == q.question
    assert r.edns == 0


# ---------------------------------------------------------------------------
# Fuzz: bounded and seeded


def _check(answerer: DnsAnswerer, data: bytes) -> Reply | Forward | Drop:
    """handle() never raises; drops only what is too short or a response;
    forwards only what parses as one question; every reply parses as a
    response with the query's ID."""
    result = answerer.handle(data)
    if len(data) < 12 or data[2] & 0x80:
        assert isinstance(result, Drop), (data, result)
    elif isinstance(result, Forward):
        assert len(dns.message.from_wire(data, keyring=False).question) == 1
    else:
        assert isinstance(result, Reply), (data, result)
        r = dns.message.from_wire(result.wire)
        assert r.flags & dns.flags.QR and r.id == int.from_bytes(data[:2], "big")
    return result


def test_fuzz_random_bytes_and_truncated_queries() -> None:
    rng = random.Random(1)
    answerer = DnsAnswerer(NAMES, max_cache=64)
    seen: dict[str, int] = {}
    for _ in range(2000):
        data = rng.randbytes(rng.randrange(0, 300))
        result = _check(answerer, data)
        assert not isinstance(result, Forward)
        seen[type(result).__name__] = seen.get(type(result).__name__, 0) + 1
    assert seen.get("Reply", 0) > 500 and seen.get("Drop", 0) > 500  # both paths ran
    valid = [
        query("web.shop.mesh")[1],
        query("example.com", "AAAA", use_edns=0, payload=4096)[1],
        query("nope.mesh", "TXT", use_edns=0, want_dnssec=True)[1],
    ]
    for wire in valid:
        for cut in range(len(wire)):
            result = _check(answerer, wire[:cut])
            if cut >= 12:
                assert isinstance(result, Reply) and result.rcode == "FORMERR", cut
    for _ in range(1000):  # flipped bytes in valid queries: may also forward
        mutated = bytearray(rng.choice(valid))
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        _check(answerer, bytes(mutated))
    assert answerer.cached <= 64


def test_fuzz_pointer_loops_and_oversized_names() -> None:
    answerer = DnsAnswerer(NAMES)
    header = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    tail = struct.pack("!HH", 1, 1)  # type A, class IN
    hostile = [
        header + b"\xc0\x0c" + tail,  # a pointer to itself
        header + b"\x03web\xc0\x0c" + tail,  # a pointer back to its own start
        header + b"\xc0\x20" + tail,  # a pointer forward
        header + b"\x03web\x40" + tail,  # a reserved label type
        header + b"\x03web\x80\x01" + tail,  # another
        header + (b"\x3f" + b"a" * 63) * 5 + b"\x04mesh\x00" + tail,  # name > 255 bytes
        header + b"\x3f" + b"a" * 10,  # a label running past the end
    ]
    for data in hostile:
        result = _check(answerer, data)
        assert isinstance(result, Reply) and result.rcode == "FORMERR", data
        assert parse(result).id == 0x4242


# ---------------------------------------------------------------------------
# RateLimiter


def test_rate_limiter_token_bucket() -> None:
    rl = RateLimiter(rate=1.0, burst=3)
    assert [rl.allow("10.0.0.1", 100.0) for _ in range(4)] == [True, True, True, False]
    assert rl.allow("10.0.0.2", 100.0)  # sources are independent
    assert not rl.allow("10.0.0.1", 100.5)  # half a token
    assert rl.allow("10.0.0.1", 101.0)
    assert not rl.allow("10.0.0.1", 101.0)
    # A long idle refills to the burst, never beyond it.
    assert [rl.allow("10.0.0.1", 1000.0) for _ in range(4)] == [True, True, True, False]
    # The clock going backwards adds nothing.
    assert not rl.allow("10.0.0.1", 900.0)


def test_rate_limiter_bounded_sources() -> None:
    rl = RateLimiter(rate=0.0, burst=1, max_sources=3)
    for i in range(100):
        rl.allow(f"10.0.0.{i}", 0.0)
        assert len(rl) <= 3
    rl.allow("a", 0.0)
    rl.allow("b", 0.0)
    rl.allow("c", 0.0)
    assert not rl.allow("a", 0.0)  # touched: most recent now
    rl.allow("d", 0.0)  # evicts b, the least recently seen
    assert not rl.allow("a", 0.0) and not rl.allow("c", 0.0)
    assert rl.allow("b", 0.0)  # b was forgotten: a fresh bucket
    with pytest.raises(ValueError, match="burst"):
        RateLimiter(burst=0)


# ---------------------------------------------------------------------------
# read_upstreams


def test_read_upstreams_plain(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# generated\nsearch corp.example\nnameserver 10.0.0.2\n"
        "nameserver 2001:db8::53\nnameserver 10.0.0.2\noptions edns0 ndots:2\n"
    )
    got = read_upstreams(str(conf), str(tmp_path / "absent"))
    assert got == [("10.0.0.2", 53), ("2001:db8::53", 53)]


def test_read_upstreams_systemd_stub(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n")
    resolved = tmp_path / "resolved.conf"
    resolved.write_text("nameserver 192.0.2.53\nnameserver 192.0.2.54\n")
    assert read_upstreams(str(conf), str(resolved)) == [("192.0.2.53", 53), ("192.0.2.54", 53)]
    # Without resolved's file, the stub itself (it works, one hop more).
    assert read_upstreams(str(conf), str(tmp_path / "absent")) == [("127.0.0.53", 53)]
    # A stub next to a real server: resolv.conf as it is.
    conf.write_text("nameserver 127.0.0.53\nnameserver 10.0.0.2\n")
    assert read_upstreams(str(conf), str(resolved)) == [("127.0.0.53", 53), ("10.0.0.2", 53)]


def test_read_upstreams_exclude_and_missing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\nnameserver ::1\nnameserver 10.0.0.2\n")
    got = read_upstreams(str(conf), str(tmp_path / "absent"), exclude=[("127.0.0.1", 53)])
    assert got == [("::1", 53), ("10.0.0.2", 53)]
    got = read_upstreams(str(conf), "/nonexistent", exclude=[("0:0::1", 53), ("10.0.0.2", 53)])
    assert got == [("127.0.0.1", 53)]  # the IPv6 spelling does not matter
    with caplog.at_level(logging.WARNING, logger="meshnode.ztunnel.dns"):
        assert read_upstreams(str(tmp_path / "absent"), "/nonexistent") == []
        conf.write_text("search corp.example\n")
        assert read_upstreams(str(conf), "/nonexistent") == []
    assert "SERVFAIL" in caplog.text and "absent" in caplog.text


# ---------------------------------------------------------------------------
# DnsProxy on loopback


EXT = dns.name.from_text("ext.example.")


class FakeUpstream:
    """A resolver on loopback (UDP and TCP, one port) that answers with
    dnspython: ext.example. A 192.0.2.7 (TTL 4242, RA), else NXDOMAIN. It
    records what it received and sent. ``silent``: it never answers."""

    def __init__(self, silent: bool = False) -> None:
        self.silent = silent
        self.received: list[bytes] = []
        self.received_over_tcp = 0
        self.sent: list[bytes] = []
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.Server | None = None
        self.address = (LOOPBACK, 0)

    def answer(self, wire: bytes) -> bytes | None:
        self.received.append(wire)
        if self.silent:
            return None
        q = dns.message.from_wire(wire)
        r = dns.message.make_response(q, recursion_available=True)
        if q.question[0].name == EXT:
            r.answer.append(dns.rrset.from_text(EXT, 4242, "IN", "A", "192.0.2.7"))
        else:
            r.set_rcode(dns.rcode.NXDOMAIN)
        out = r.to_wire()
        self.sent.append(out)
        return out

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        upstream = self

        class Proto(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: Any) -> None:
                out = upstream.answer(data)
                if out is not None:
                    self.transport.sendto(out, addr)

        # UDP picks a free port; the same port over TCP may be taken (another
        # process's outgoing connection), so try a few.
        for attempt in range(10):
            self.udp, _ = await loop.create_datagram_endpoint(Proto, local_addr=(LOOPBACK, 0))
            port = self.udp.get_extra_info("sockname")[1]
            try:
                self.tcp = await asyncio.start_server(self._serve_tcp, LOOPBACK, port)
            except OSError:
                self.udp.close()
                if attempt == 9:
                    raise
                continue
            self.address = (LOOPBACK, port)
            return

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                self.received_over_tcp += 1
                out = self.answer(await reader.readexactly(size))
                if out is not None:
                    writer.write(len(out).to_bytes(2, "big") + out)
        writer.close()

    def close(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            self.tcp.close()


class Env:
    def __init__(self, proxy: DnsProxy, upstream: FakeUpstream, metrics: DnsMetrics) -> None:
        self.proxy = proxy
        self.upstream = upstream
        self.metrics = metrics
        self.upstreams = [upstream.address]
        self.answerer = DnsAnswerer(NAMES)


@contextlib.asynccontextmanager
async def running(
    silent: bool = False, limiter: RateLimiter | None = None, max_pending: int = 1024
) -> AsyncIterator[Env]:
    upstream = FakeUpstream(silent)
    await upstream.start()
    metrics = DnsMetrics(Registry())
    env: Env
    proxy = DnsProxy(
        lambda: env.answerer,
        lambda: env.upstreams,
        metrics,
        limiter,
        upstream_timeout=0.3,
        max_pending=max_pending,
    )
    env = Env(proxy, upstream, metrics)
    await proxy.start(LOOPBACK, 0)
    try:
        yield env
    finally:
        proxy.close()
        await proxy.wait_closed()
        upstream.close()


def run(main: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(main(), 10))


async def udp_raw(wire: bytes, addr: tuple[str, int], timeout: float = 1.5) -> bytes | None:
    def exchange() -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(wire, addr)
            try:
                return s.recv(65535)
            except TimeoutError:
                return None

    return await asyncio.to_thread(exchange)


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


async def tcp_raw(wires: list[bytes], addr: tuple[str, int]) -> list[bytes]:
    """Several framed queries on one connection; the framed replies, in order."""

    def exchange() -> list[bytes]:
        with socket.create_connection(addr, timeout=1.5) as s:
            s.sendall(b"".join(len(w).to_bytes(2, "big") + w for w in wires))
            out = []
            for _ in wires:
                size = int.from_bytes(_recv_exactly(s, 2), "big")
                out.append(_recv_exactly(s, size))
            return out

    return await asyncio.to_thread(exchange)


async def ask(name: str, addr: tuple[str, int], tcp: bool = False, **kw: Any) -> Any:
    q = dns.message.make_query(name, "A", **kw)
    fn = dns.query.tcp if tcp else dns.query.udp
    return await asyncio.to_thread(fn, q, addr[0], timeout=1.5, port=addr[1])


def test_mesh_names_over_udp_and_tcp() -> None:
    async def main() -> None:
        async with running() as env:
            for tcp in (False, True):
                r = await ask("web.shop.mesh", env.proxy.address, tcp=tcp)
                assert a_values(r) == ["10.96.0.10"] and r.flags & dns.flags.AA
                r = await ask("nope.mesh", env.proxy.address, tcp=tcp)
                assert r.rcode() == dns.rcode.NXDOMAIN
            assert env.upstream.received == []  # answered locally
            m = env.metrics
            assert m.queries.get(("A", "NOERROR")) == 2
            assert m.queries.get(("A", "NXDOMAIN")) == 2
            assert m.latency.series[("mesh",)][-1] == 4

    run(main)


def test_forwarded_names_are_relayed_verbatim() -> None:
    async def main() -> None:
        async with running() as env:
            up = env.upstream
            _, wire = query("ext.example.", qid=0x7777, use_edns=0, payload=1400)
            got = await udp_raw(wire, env.proxy.address)
            assert up.received == [wire]  # the query went upstream unchanged
            assert got == up.sent[-1]  # and the reply came back unchanged
            r = dns.message.from_wire(got)
            assert a_values(r) == ["192.0.2.7"] and r.answer[0].ttl == 4242
            assert r.flags & dns.flags.RA and not r.flags & dns.flags.AA

            replies = await tcp_raw([wire, query("nx.example.", qid=9)[1]], env.proxy.address)
            assert replies == up.sent[-2:]  # in order
            assert up.received[-2:] == [wire, query("nx.example.", qid=9)[1]]
            assert up.received_over_tcp == 2  # TCP in, TCP out
            assert dns.message.from_wire(replies[1]).rcode() == dns.rcode.NXDOMAIN

            r = await ask("ext.example.", env.proxy.address, tcp=True)
            assert a_values(r) == ["192.0.2.7"]
            m = env.metrics
            assert m.queries.get(("A", "forwarded")) == 4
            assert m.latency.series[("forwarded",)][-1] == 4
            assert m.upstream_errors.values == {}

    run(main)


def test_silent_upstream_gives_servfail_within_the_timeout() -> None:
    async def main() -> None:
        async with running(silent=True) as env:
            for tcp in (False, True):
                t0 = time.monotonic()
                r = await ask("ext.example.", env.proxy.address, tcp=tcp)
                elapsed = time.monotonic() - t0
                assert r.rcode() == dns.rcode.SERVFAIL
                assert 0.25 <= elapsed < 1.2, elapsed
            assert env.metrics.upstream_errors.get(("timeout",)) == 2

    run(main)


def test_next_upstream_after_a_timeout_and_refused() -> None:
    async def main() -> None:
        async with running() as env:
            silent = FakeUpstream(silent=True)
            await silent.start()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((LOOPBACK, 0))
                closed = s.getsockname()
            env.upstreams = [closed, silent.address, env.upstream.address]
            t0 = time.monotonic()
            r = await ask("ext.example.", env.proxy.address)
            assert a_values(r) == ["192.0.2.7"]
            assert 0.25 <= time.monotonic() - t0 < 1.2
            errors = env.metrics.upstream_errors
            assert errors.get(("refused",)) == 1 and errors.get(("timeout",)) == 1
            env.upstreams = []
            r = await ask("ext.example.", env.proxy.address)
            assert r.rcode() == dns.rcode.SERVFAIL
            assert errors.get(("no_upstream",)) == 1
            silent.close()

    run(main)


def test_back_pressure_answers_servfail_at_once() -> None:
    async def main() -> None:
        async with running(silent=True, max_pending=1) as env:
            first = asyncio.ensure_future(ask("ext.example.", env.proxy.address))
            await asyncio.sleep(0.05)
            assert env.proxy.pending == 1
            t0 = time.monotonic()
            r = await ask("ext.example.", env.proxy.address)
            assert r.rcode() == dns.rcode.SERVFAIL and time.monotonic() - t0 < 0.2
            assert env.metrics.upstream_errors.get(("overload",)) == 1
            assert (await first).rcode() == dns.rcode.SERVFAIL
            assert env.proxy.pending == 0

    run(main)


def test_garbage_does_not_stop_the_server() -> None:
    async def main() -> None:
        async with running() as env:
            rng = random.Random(1)
            addr = env.proxy.address
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for _ in range(300):
                    s.sendto(rng.randbytes(rng.randrange(0, 200)), addr)
                s.sendto(struct.pack("!HHHHHH", 1, 0x8000, 0, 0, 0, 0), addr)  # a response
            # A broken frame over TCP: FORMERR, and the connection goes on.
            header = struct.pack("!HHHHHH", 0x5151, 0, 1, 0, 0, 0)
            replies = await tcp_raw([header, query("web.shop.mesh")[1]], addr)
            assert dns.message.from_wire(replies[0]).rcode() == dns.rcode.FORMERR
            assert a_values(dns.message.from_wire(replies[1])) == ["10.96.0.10"]
            r = await ask("web.shop.mesh", addr)
            assert a_values(r) == ["10.96.0.10"]
            r = await ask("ext.example.", addr)
            assert a_values(r) == ["192.0.2.7"]
            q = env.metrics.queries
            assert q.get(("other", "FORMERR")) > 50 and q.get(("other", "dropped")) > 10
            assert q.get(("other", "error")) == 0  # no exception reached a callback

    run(main)


def test_tcp_zero_length_and_drop_close_the_connection() -> None:
    async def main() -> None:
        async with running() as env:
            for frame in (b"\x00\x00", b"\x00\x05hello"):  # zero length; under a header

                def closes(frame: bytes = frame) -> bytes:
                    with socket.create_connection(env.proxy.address, timeout=1.5) as s:
                        s.sendall(frame)
                        return s.recv(10)

                assert await asyncio.to_thread(closes) == b""

    run(main)


def test_rate_limit_drops_the_excess() -> None:
    async def main() -> None:
        async with running(limiter=RateLimiter(rate=0.001, burst=5)) as env:
            addr = env.proxy.address

            def burst() -> int:
                answers = 0
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    for i in range(20):
                        s.sendto(query("web.shop.mesh", qid=i)[1], addr)
                    s.settimeout(0.4)
                    with contextlib.suppress(TimeoutError):
                        while True:
                            s.recv(512)
                            answers += 1
                return answers

            assert await asyncio.to_thread(burst) == 5
            assert env.metrics.queries.get(("other", "ratelimited")) == 15
            assert env.metrics.queries.get(("A", "NOERROR")) == 5

    run(main)


def test_the_current_answerer_is_used_per_query() -> None:
    async def main() -> None:
        async with running() as env:
            r = await ask("web.shop.mesh", env.proxy.address)
            assert a_values(r) == ["10.96.0.10"]
            env.answerer = DnsAnswerer(MeshNames.build("mesh", [("web", "shop", "10.96.7.7")]))
            r = await ask("web.shop.mesh", env.proxy.address)
            assert a_values(r) == ["10.96.7.7"]

    run(main)


def test_address_needs_start_and_metrics_render() -> None:
    registry = Registry()
    metrics = DnsMetrics(registry)
    proxy = DnsProxy(lambda: DnsAnswerer(NAMES), lambda: [], metrics)
    with pytest.raises(RuntimeError, match="start"):
        _ = proxy.address
    metrics.queries.inc(("A", "NOERROR"))
    metrics.upstream_errors.inc(("timeout",))
    metrics.latency.observe(0.0002, ("mesh",))
    text = registry.render()
    assert 'meshnode_dns_queries_total{qtype="A",result="NOERROR"} 1' in text
    assert 'meshnode_dns_upstream_errors_total{reason="timeout"} 1' in text
    assert 'meshnode_dns_request_seconds_bucket{kind="mesh",le="0.00025"} 1' in text
