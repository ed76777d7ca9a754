"""Writes seed inputs for the fuzz targets into fuzz/corpus/{server,client,dns,ingress}:
programs (see harness.Source) of ordinary HBONE traffic from a real peer --
CONNECT, data, half-close, resets, PING, SETTINGS, GOAWAY, header blocks in
CONTINUATION frames -- interleaved with the shell's calls. The fuzzer mutates
from there.

    python fuzz/make_corpus.py
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from pathlib import Path

import hpack
from hyperframe.frame import ContinuationFrame, HeadersFrame

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

from meshnode.ztunnel import hbone  # noqa: E402

HERE = Path(__file__).resolve().parent


def feed(data: bytes) -> bytes:
    """Step 0 (raw bytes from the peer), stream pick 0, 2-byte length."""
    assert len(data) <= harness.MAX_FEED
    return bytes([0, 0]) + len(data).to_bytes(2, "big") + data


def call(op: int, *args: int) -> bytes:
    """A shell call (op 6..15) on the first live stream, one byte per argument."""
    return bytes([op, 0, *args])


def server_seeds() -> list[bytes]:
    seeds = []
    _, peer = harness.handshake(client_side=False)
    sid = peer.open_tunnel("10.0.0.1:80", [("baggage", "k=v")])
    connect = peer.data_to_send()
    peer.send(sid, b"hello" * 100)
    data = peer.data_to_send()
    peer.end(sid)
    fin = peer.data_to_send()
    peer.reset(sid)
    seeds.append(feed(connect) + call(6) + feed(data) + call(9, 255) + feed(fin) + call(10))
    seeds.append(feed(connect) + feed(data) + call(7, 3) + feed(data))
    seeds.append(feed(connect) + call(6) + call(8, 255, 255) + call(12, 25) + call(12, 15))
    _, peer = harness.handshake(client_side=False)
    flood = b""
    for _ in range(30):
        s = peer.open_tunnel("10.0.0.1:80")
        peer.reset(s)
        flood += peer.data_to_send()
    seeds.append(feed(flood[: harness.MAX_FEED]))
    peer._h2.ping(b"12345678")
    peer._h2.update_settings({4: 1 << 20, 5: 16384})
    peer._h2.increment_flow_control_window(1000)
    peer.close(hbone.NO_ERROR, "bye")
    seeds.append(feed(peer.data_to_send()))
    block = hpack.Encoder().encode(
        [(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("x-a", "b" * 3000)]
    )
    h = HeadersFrame(1, data=block[:1000]).serialize()
    c1 = ContinuationFrame(1, data=block[1000:2000]).serialize()
    c2 = ContinuationFrame(1, data=block[2000:], flags=["END_HEADERS"]).serialize()
    seeds.append(feed(h) + feed(c1) + feed(c2) + call(6) + call(13) + call(8, 4, 0) + call(14))
    seeds.append(feed(b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"p" * 8) * 3)
    return seeds


def client_seeds() -> list[bytes]:
    seeds = []
    ours, peer = harness.handshake(client_side=True)
    peer.send(1, b"world" * 200)
    data = peer.data_to_send()
    peer.end(1)
    fin = peer.data_to_send()
    seeds.append(feed(data) + call(9, 255) + call(8, 64, 0) + feed(fin) + call(10))
    peer.reset(1, hbone.CONNECT_ERROR)
    seeds.append(feed(data) + feed(peer.data_to_send()))
    seeds.append(call(15, 9, 0, 80) + call(12, 20) + call(12, 10))
    ours2, peer2 = harness.handshake(client_side=True)
    ours2.open_tunnel("10.0.0.2:80")
    peer2.receive_data(ours2.data_to_send())
    peer2.refuse_tunnel(3, 503, "down")
    peer2._h2.ping(b"abcdefgh")
    peer2.close(hbone.NO_ERROR, "drain")
    seeds.append(call(15, 2, 0, 80) + feed(peer2.data_to_send()))
    seeds.append(
        feed(b"\x00\x00\x04\x08\x00\x00\x00\x00\x01\x00\x01\x00\x00")
        + call(13)
        + call(8, 255, 255)
        + call(14)
    )
    return seeds


def dns_seeds() -> list[bytes]:
    """Queries dnspython makes (mesh names, others, EDNS, types), and a few broken
    ones: truncated, a compression-pointer loop, a name over 255 bytes."""
    import dns.edns
    import dns.message

    seeds = []
    for name, rdtype in (
        ("api.default.mesh", "A"),
        ("API.mesh.", "AAAA"),
        ("nothing.default.mesh", "A"),
        ("mesh", "SOA"),
        ("example.com", "A"),
    ):
        seeds.append(dns.message.make_query(name, rdtype).to_wire())
        seeds.append(dns.message.make_query(name, rdtype, use_edns=0, payload=1232).to_wire())
    seeds.append(dns.message.make_query("api.mesh", "A", use_edns=1).to_wire())
    q = seeds[0]
    seeds.append(q[:15])  # truncated in the question
    seeds.append(q[:12] + b"\xc0\x0c\x00\x01\x00\x01")  # a pointer to itself
    seeds.append(q[:12] + b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63 * 4 + b"\x00\x00\x01\x00\x01")
    return seeds


def ingress_seeds() -> list[bytes]:
    """Real ClientHellos (the first byte is the harness's read size): zone SNIs
    the state serves and does not, a workload SNI, no SNI; and plain HTTP."""
    import ssl

    def hello(name: str | None) -> bytes:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=name)
        with contextlib.suppress(ssl.SSLWantReadError):
            obj.do_handshake()
        return out.read()

    seeds = []
    for name in (
        "api.default.80.zone-b.mz.cluster.local",
        "api.default.80.zone-a.mz.cluster.local",
        "nope.default.80.zone-b.mz.cluster.local",
        "api.default.81.zone-b.mz.cluster.local",
        "api.default.cluster.local",
        None,
    ):
        for first in (0, 5, 200):
            seeds.append(bytes([first]) + hello(name))
    seeds.append(b"\xc8GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return seeds


def main() -> None:
    for name, seeds in (
        ("server", server_seeds()),
        ("client", client_seeds()),
        ("dns", dns_seeds()),
        ("ingress", ingress_seeds()),
    ):
        out = HERE / "corpus" / name
        out.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            (out / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
        print(f"{len(seeds)} seeds in {out}")


if __name__ == "__main__":
    main()
