"""One input for the mesh DNS answerer (ztunnel/dns.py), checked: what a
workload (or anything that reaches the proxy's port) can send it.

`one_input(data)` hands the bytes to a DnsAnswerer over UDP and over TCP and
raises on any finding: an exception escaping handle(), a reply that does not
parse or carries another ID, a UDP reply larger than the client may take, or a
cache that grows past its bound."""

from __future__ import annotations

import dns.message

from meshnode.ztunnel.dns import DnsAnswerer, Drop, Forward, MeshNames, Reply

NAMES = MeshNames.build("mesh", [("api", "default", "240.0.0.1"), ("db", "shop", "240.0.0.2")])
ANSWERER = DnsAnswerer(NAMES, max_cache=64)


def one_input(data: bytes) -> None:
    for tcp in (False, True):
        decision = ANSWERER.handle(data, tcp=tcp)
        if isinstance(decision, Drop | Forward):
            continue
        assert isinstance(decision, Reply), decision
        reply = dns.message.from_wire(decision.wire, ignore_trailing=True)
        assert decision.wire[:2] == data[:2], "a reply with another ID"
        assert reply.flags & 0x8000, "a reply without QR"
        if not tcp:
            assert len(decision.wire) <= 1232, f"a {len(decision.wire)}-byte UDP reply"
    assert ANSWERER.cached <= 64, "the answer cache grew past its bound"
