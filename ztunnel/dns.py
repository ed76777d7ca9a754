"""The node proxy's DNS proxy: mesh names answered locally, everything else
forwarded unchanged to the node's own resolvers.

The BPF programs redirect mesh workloads' DNS queries (UDP and TCP port 53) to
a local address where :class:`DnsProxy` listens (e.g. ``127.0.0.1:15053``).
A name under the mesh domain (``mesh`` unless configured) is answered from the
node's current state with no network round trip:

- ``<service>.<namespace>.<domain>`` and, for namespace ``default``, the short
  form ``<service>.<domain>``: ``A`` -> the service's VIP (TTL 5 s); any other
  type -> NOERROR with no answer (NODATA). Matching is case-insensitive.
- any other name under the domain, and the domain itself: NXDOMAIN.
- mesh answers carry the AA flag.

Every other query is sent upstream byte for byte and the upstream's reply is
relayed byte for byte, so the proxy changes nothing for names it does not own
(DNSSEC, EDNS options and cookies pass through).

Why dnspython: a DNS proxy's input is hostile by construction (any workload can
send anything), and hand-written wire parsing is where the classic bugs live
(compression-pointer loops, names over 255 bytes, counts that lie). Every DNS
message here is parsed and built by dnspython; the only bytes read by hand are
the 2-byte ID (to answer FORMERR to a message dnspython cannot parse), the
header flags of such a message (never to answer a response), and the 2-byte
length prefix of DNS over TCP, which is framing (RFC 1035 4.2.2).

The answer cache (:class:`DnsAnswerer`): the key is the query's bytes after its
ID, the value the reply's bytes after its ID. Because the key is the whole
query -- flags, EDNS, and the case of the name included -- a hit is always the
same question asked the same way, so the cached reply is exactly what parsing
it again would produce; only the ID is spliced in. The cache belongs to one
answerer, which answers for one :class:`MeshNames`: the owner replaces the
answerer when the state changes (and assigning ``names`` clears the cache), so
no answer outlives the state it came from. Only local mesh answers are cached.

Security choices:

- The proxy listens only on the address it is given: a node-local address that
  the redirect targets, not a public resolver.
- A token bucket per source address (:class:`RateLimiter`) drops excess UDP
  queries silently, so that a spoofed source cannot use the proxy as a traffic
  amplifier. Local answers are never larger than the client's limit (512
  bytes, or its EDNS size up to 1232), are not padded, and carry at most one
  A record: barely larger than the query.
- Bounded memory everywhere: the answer cache (entries and key size), the
  rate limiter's table of sources, the forwards in flight (beyond the limit a
  query gets SERVFAIL at once) and the TCP connections.
- Messages that are responses are never answered (no reflection loops).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset

from meshnode.ztunnel.metrics import Counter, Histogram, Registry

log = logging.getLogger("meshnode.ztunnel.dns")

HEADER_SIZE = 12
UDP_MIN = 512  # the limit without EDNS (RFC 1035), and the floor of EDNS sizes
UDP_MAX_PAYLOAD = 1232  # DNS flag day 2020: no IP fragmentation on any path
TCP_MAX = 65535
MAX_CACHED_QUERY = 512  # longer queries are answered but not cached
DEFAULT_DOMAIN = "mesh"
DEFAULT_NAMESPACE = "default"
SYSTEMD_STUBS = frozenset({"127.0.0.53", "127.0.0.54"})
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
)
# A fixed set of qtype labels keeps the metric's cardinality bounded whatever
# the clients send; every other type is "other".
_QTYPE_LABELS = frozenset(
    {"A", "AAAA", "CNAME", "PTR", "SRV", "TXT", "MX", "NS", "SOA", "HTTPS", "SVCB", "ANY"}
)
OTHER = "other"


def qtype_label(rdtype: dns.rdatatype.RdataType) -> str:
    """The metrics label of a query type: its name for common types, else "other"."""
    text = dns.rdatatype.to_text(rdtype)
    return text if text in _QTYPE_LABELS else OTHER


# ---------------------------------------------------------------------------
# Mesh names


class MeshNames:
    """The mesh's DNS names at one moment: pure and immutable.

    Build it with :meth:`build`. Services whose name or namespace cannot be a
    DNS label (empty, over 63 bytes, non-ASCII, containing a dot) or whose VIP
    is not an IPv4 address have no name; they are listed in ``skipped``
    (``"name.namespace"``) so that the caller can report them. If a
    (name, namespace) pair repeats, the last VIP wins."""

    __slots__ = ("domain", "origin", "skipped", "_depth", "_vips")

    domain: str
    origin: dns.name.Name
    skipped: tuple[str, ...]
    _depth: int
    _vips: Mapping[tuple[bytes, ...], str]

    def __init__(
        self,
        origin: dns.name.Name,
        vips: Mapping[tuple[bytes, ...], str],
        skipped: tuple[str, ...] = (),
    ) -> None:
        origin = origin.canonicalize()
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "domain", origin.to_text(omit_final_dot=True))
        object.__setattr__(self, "_depth", len(origin.labels))
        object.__setattr__(self, "_vips", MappingProxyType(dict(vips)))
        object.__setattr__(self, "skipped", tuple(skipped))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("MeshNames is immutable; build a new one")

    @classmethod
    def build(cls, domain: str, services: Iterable[tuple[str, str, str]]) -> MeshNames:
        """``services``: (name, namespace, vip) triples. Raises ValueError if
        ``domain`` is not a DNS name, or is the root (which would capture every
        name)."""
        origin = parse_domain(domain)
        vips: dict[tuple[bytes, ...], str] = {}
        skipped: list[str] = []
        for name, namespace, vip in services:
            svc, ns = _label(name), _label(namespace)
            if svc is None or ns is None or not _is_ipv4(vip):
                skipped.append(f"{name}.{namespace}")
                continue
            vips[(svc, ns)] = vip
            if ns == DEFAULT_NAMESPACE.encode():
                vips[(svc,)] = vip
        return cls(origin, vips, tuple(skipped))

    def __len__(self) -> int:
        return len(self._vips)

    def lookup_name(self, name: dns.name.Name) -> str | None | bool:
        """:meth:`lookup` for a parsed name (what the answerer uses)."""
        if not name.is_subdomain(self.origin):
            return False
        relative = name.canonicalize().labels[: -self._depth]
        return self._vips.get(relative)

    def lookup(self, qname: str) -> str | None | bool:
        """The VIP of a mesh service name; None for a name under the mesh domain
        that is no service (NXDOMAIN); False for a name outside it (forward).
        ``qname`` may end with "."; case does not matter."""
        try:
            name = dns.name.from_text(qname)
        except (dns.exception.DNSException, ValueError):
            return False
        return self.lookup_name(name)


def parse_domain(domain: str) -> dns.name.Name:
    """The mesh domain as an absolute DNS name, or ValueError saying why not."""
    try:
        origin = dns.name.from_text(domain.strip())
    except (dns.exception.DNSException, ValueError) as exc:
        raise ValueError(f"mesh DNS domain {domain!r} is not a valid DNS name: {exc}") from exc
    if origin == dns.name.root:
        raise ValueError(
            f"mesh DNS domain {domain!r} is the root: it would capture every name; "
            f"use a name such as {DEFAULT_DOMAIN!r}"
        )
    return origin


def _label(text: str) -> bytes | None:
    try:
        raw = text.lower().encode("ascii")
    except UnicodeEncodeError:
        return None
    if not 0 < len(raw) <= 63 or b"." in raw or any(c <= 0x20 or c == 0x7F for c in raw):
        return None
    return raw


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------
# The answerer: pure


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``wire`` back to the client. ``rcode`` and ``qtype`` are metrics labels."""

    wire: bytes
    rcode: str
    qtype: str


@dataclass(frozen=True, slots=True)
class Forward:
    """Not a mesh name: send the query upstream unchanged."""

    qtype: str


@dataclass(frozen=True, slots=True)
class Drop:
    """Say nothing (too short to answer, or a response)."""

    reason: str


def fit_udp(response: dns.message.Message, limit: int) -> bytes:
    """The response's wire format within ``limit`` bytes: as it is if it fits,
    else with TC set and the answer, authority and additional sections emptied
    (the client retries over TCP; EDNS is kept). Empties ``response``'s
    sections when it truncates.

    Mesh answers never need it over UDP (a question is at most 259 bytes, one A
    record 16 and the OPT record 11: far below 512), but the rule is kept so
    that no answer can ever exceed what the client accepts."""
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        response.answer = []
        response.authority = []
        response.additional = []
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=limit)


def _header_flags(wire: bytes) -> int:
    return int.from_bytes(wire[2:4], "big")


def _header_only(wire: bytes, rcode: dns.rcode.Rcode) -> bytes:
    """A bare reply (no question) to a message too broken to parse: the ID of
    its first two bytes, QR and ``rcode``. Never longer than the query."""
    reply = dns.message.Message(id=int.from_bytes(wire[:2], "big"))
    reply.flags = dns.flags.QR
    reply.set_rcode(rcode)
    return reply.to_wire()


class DnsAnswerer:
    """Decides what to do with one query: answer it (mesh names), forward it
    (everything else) or drop it. Pure: no I/O, no clock.

    The cache maps a query's bytes after the ID to the reply's bytes after the
    ID. The key is the exact query (flags, EDNS, the name's case), so a hit is
    always an identical question and its reply is what parsing would give;
    ``names`` is fixed for the cache's life (assigning it clears the cache).
    At most ``max_cache`` entries (cleared when full), and only queries of at
    most 512 bytes are cached."""

    def __init__(self, names: MeshNames, ttl: int = 5, max_cache: int = 4096) -> None:
        if ttl < 0:
            raise ValueError(f"DNS answer TTL must be >= 0, got {ttl}")
        if max_cache < 0:
            raise ValueError(f"DNS answer cache size must be >= 0, got {max_cache}")
        self._names = names
        self.ttl = ttl
        self.max_cache = max_cache
        self._udp_cache: dict[bytes, tuple[bytes, str, str]] = {}
        self._tcp_cache: dict[bytes, tuple[bytes, str, str]] = {}
        self._rdata: dict[str, dns.rdata.Rdata] = {}

    @property
    def names(self) -> MeshNames:
        return self._names

    @names.setter
    def names(self, names: MeshNames) -> None:
        self._names = names
        self._udp_cache.clear()
        self._tcp_cache.clear()
        self._rdata.clear()

    @property
    def cached(self) -> int:
        """How many replies are cached."""
        return len(self._udp_cache) + len(self._tcp_cache)

    def handle(self, wire: bytes, tcp: bool = False) -> Reply | Forward | Drop:
        """The decision for one query (``tcp``: it came over TCP, so no size
        limit). Never raises on any input bytes."""
        cache = self._tcp_cache if tcp else self._udp_cache
        hit = cache.get(wire[2:])
        if hit is not None:
            return Reply(wire[:2] + hit[0], hit[1], hit[2])
        if len(wire) < HEADER_SIZE:
            return Drop("shorter than a DNS header")
        try:
            # keyring=False: a TSIG-signed query parses (not validated); its
            # forwarded copy is validated by the upstream.
            query = dns.message.from_wire(wire, keyring=False)
        except Exception:  # hostile bytes: DNSException, ValueError, IndexError, ...
            if _header_flags(wire) & dns.flags.QR:
                return Drop("malformed response")
            return Reply(_header_only(wire, dns.rcode.FORMERR), "FORMERR", OTHER)
        if query.flags & dns.flags.QR:
            return Drop("response")
        qtype = qtype_label(query.question[0].rdtype) if len(query.question) == 1 else OTHER
        if query.opcode() != dns.opcode.QUERY:
            return self._error(query, dns.rcode.NOTIMP, qtype, tcp)
        if query.edns > 0:
            return self._error(query, dns.rcode.BADVERS, qtype, tcp)
        if len(query.question) != 1:
            return self._error(query, dns.rcode.FORMERR, qtype, tcp)
        question = query.question[0]
        if question.rdclass != dns.rdataclass.IN:
            return Forward(qtype)
        vip = self._names.lookup_name(question.name)
        if vip is False:
            return Forward(qtype)
        response = self._response(query)
        response.flags |= dns.flags.AA
        if not isinstance(vip, str):
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_rdata(question.name, self.ttl, self._a(vip)))
        out = fit_udp(response, TCP_MAX if tcp else _udp_limit(query))
        rcode = dns.rcode.to_text(response.rcode())
        if len(wire) <= MAX_CACHED_QUERY and self.max_cache > 0:
            if len(self._udp_cache) + len(self._tcp_cache) >= self.max_cache:
                self._udp_cache.clear()
                self._tcp_cache.clear()
            cache[wire[2:]] = (out[2:], rcode, qtype)
        return Reply(out, rcode, qtype)

    def servfail(self, wire: bytes, tcp: bool = False) -> bytes:
        """A SERVFAIL reply to ``wire`` (a query :meth:`handle` forwarded), for
        when no upstream answered."""
        try:
            query = dns.message.from_wire(wire, keyring=False)
            response = self._response(query)
        except Exception:  # not a query handle() would forward; answer anyway
            return _header_only(wire, dns.rcode.SERVFAIL)
        response.set_rcode(dns.rcode.SERVFAIL)
        return fit_udp(response, TCP_MAX if tcp else _udp_limit(query))

    def _response(self, query: dns.message.Message) -> dns.message.Message:
        # make_response echoes EDNS when the query has it (as version 0), copies
        # RD and leaves RA as dnspython does. No padding (RFC 8467 is for
        # encrypted transports; over UDP it would only amplify).
        return dns.message.make_response(query, our_payload=_udp_limit(query), pad=0)

    def _error(
        self, query: dns.message.Message, rcode: dns.rcode.Rcode, qtype: str, tcp: bool
    ) -> Reply:
        response = self._response(query)
        response.set_rcode(rcode)
        out = fit_udp(response, TCP_MAX if tcp else _udp_limit(query))
        return Reply(out, dns.rcode.to_text(rcode), qtype)

    def _a(self, vip: str) -> dns.rdata.Rdata:
        rdata = self._rdata.get(vip)  # bounded by the VIPs in names
        if rdata is None:
            rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.A, vip)
            self._rdata[vip] = rdata
        return rdata


def _udp_limit(query: dns.message.Message) -> int:
    """The largest UDP reply the client takes: 512 without EDNS, else its EDNS
    payload size, within [512, 1232]."""
    if query.edns < 0:
        return UDP_MIN
    return max(UDP_MIN, min(int(query.payload), UDP_MAX_PAYLOAD))


# ---------------------------------------------------------------------------
# Rate limiting


# The default bucket. Captured queries all reach the proxy from 127.0.0.1 (the
# redirect is on loopback), so on a node the bucket is in practice per node: it is
# sized above what one proxy process answers (about 40,000/s), to cut a flood off,
# not to shape a node's normal load. Other sources (e.g. a bench's dnsperf, or a
# container reaching it over another address) each get their own.
NODE_RATE = 50_000.0
NODE_BURST = 100_000.0


class RateLimiter:
    """A token bucket per source address: ``rate`` queries per second on
    average, bursts of up to ``burst``. Pure: the caller passes the clock.

    At most ``max_sources`` sources are tracked; a new one beyond that evicts
    the least recently seen (O(1)). An evicted source starts again with a full
    bucket, so a flood of spoofed sources can refill a real one; the bound on
    memory is worth it."""

    def __init__(
        self, rate: float = NODE_RATE, burst: float = NODE_BURST, max_sources: int = 4096
    ) -> None:
        if rate < 0:
            raise ValueError(f"DNS rate limit must be >= 0 queries/s, got {rate}")
        if burst < 1:
            raise ValueError(f"DNS rate limit burst must be >= 1, got {burst}")
        if max_sources < 1:
            raise ValueError(f"DNS rate limiter must track >= 1 source, got {max_sources}")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: str, now: float) -> bool:
        """Take a token for ``source`` at time ``now`` (seconds, monotonic)."""
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
            tokens = self.burst
        else:
            tokens, last = bucket
            tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
            self._buckets.move_to_end(source)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[source] = (tokens, now)
        return allowed


# ---------------------------------------------------------------------------
# Metrics


class DnsMetrics:
    """The DNS proxy's metrics, registered in the proxy's registry."""

    def __init__(self, registry: Registry) -> None:
        self.queries = registry.add(
            Counter(
                "meshnode_dns_queries_total",
                "DNS queries by type and outcome: the rcode of a local answer, forwarded, "
                "dropped, ratelimited, or error (a bug: see the debug log)",
                ("qtype", "result"),
            )
        )
        self.upstream_errors = registry.add(
            Counter(
                "meshnode_dns_upstream_errors_total",
                "Forwarded DNS queries an upstream resolver did not answer: timeout, "
                "refused, error; overload (too many in flight) and no_upstream (none "
                "configured) answer SERVFAIL without asking",
                ("reason",),
            )
        )
        self.latency = registry.add(
            Histogram(
                "meshnode_dns_request_seconds",
                "Time from a DNS query's arrival to its answer, answered locally (mesh) "
                "or by an upstream (forwarded)",
                LATENCY_BUCKETS,
                ("kind",),
            )
        )


# ---------------------------------------------------------------------------
# Upstream resolvers


def _nameservers(path: str) -> tuple[list[str], str]:
    """The nameservers of a resolv.conf-format file, and why there are none."""
    try:
        resolver = dns.resolver.Resolver(filename=path, configure=True)
    except (dns.exception.DNSException, ValueError, OSError) as exc:
        return [], f"{path}: {exc}"
    return [ns for ns in resolver.nameservers if isinstance(ns, str)], ""


def _same_ip(text: str) -> str:
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        return text


def read_upstreams(
    resolv_conf: str = "/etc/resolv.conf",
    resolved_conf: str = "/run/systemd/resolve/resolv.conf",
    exclude: Iterable[tuple[str, int]] = (),
) -> list[tuple[str, int]]:
    """The node's upstream resolvers, as (ip, 53), in resolv.conf's order,
    read with dnspython's resolver configuration reader.

    When resolv.conf names only systemd-resolved's stub (127.0.0.53 or
    127.0.0.54) and ``resolved_conf`` exists, its nameservers (the real
    upstreams resolved uses) are taken instead. Forwarding to the stub would
    also work, since the proxy's own traffic is not redirected, but going
    straight to the upstreams saves a hop. Addresses in ``exclude`` (the
    proxy's own) are left out; IPv6 servers are kept. The list may be empty:
    then every forwarded query is answered SERVFAIL (a warning says why)."""
    servers, why = _nameservers(resolv_conf)
    if servers and all(s in SYSTEMD_STUBS for s in servers) and os.path.exists(resolved_conf):
        real, _ = _nameservers(resolved_conf)
        real = [s for s in real if s not in SYSTEMD_STUBS]
        if real:
            servers = real
    excluded = {(_same_ip(ip), port) for ip, port in exclude}
    out: list[tuple[str, int]] = []
    for server in servers:
        entry = (server, 53)
        if (_same_ip(server), 53) in excluded or entry in out:
            continue
        out.append(entry)
    if not out:
        log.warning(
            "no upstream DNS resolvers (%s; excluded: %s): queries for names outside "
            "the mesh will get SERVFAIL; fix the node's resolv.conf",
            why or f"{resolv_conf} names only excluded servers",
            sorted(excluded) or "none",
        )
    return out


# ---------------------------------------------------------------------------
# The proxy: asyncio I/O around the answerer


class _UpstreamError(Exception):
    pass


class _UpstreamUdp(asyncio.DatagramProtocol):
    """One forwarded query's connected UDP socket: the first datagram that is
    a response with the query's ID completes ``answer``."""

    def __init__(self, query_id: bytes, answer: asyncio.Future[bytes]) -> None:
        self.query_id = query_id
        self.answer = answer

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if (
            not self.answer.done()
            and len(data) >= HEADER_SIZE
            and data[:2] == self.query_id
            and _header_flags(data) & dns.flags.QR
        ):
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc or _UpstreamError("socket closed"))


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, proxy: DnsProxy) -> None:
        self.proxy = proxy

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self.proxy._on_datagram(data, addr)
        except Exception as exc:
            self.proxy._internal_error("UDP query", addr, exc)

    def error_received(self, exc: Exception) -> None:
        log.debug("DNS UDP socket error (a client went away?): %s", exc)


class DnsProxy:
    """The DNS proxy's sockets: UDP and TCP on one local address.

    ``answerer`` returns the current :class:`DnsAnswerer` (called per query,
    so a swap takes effect at once); ``upstreams`` the current upstream
    resolvers. Queries the answerer forwards go to the upstreams in order
    (each gets ``upstream_timeout`` seconds), from a fresh socket each; the
    reply is relayed unchanged. No upstream answer -> SERVFAIL. At most
    ``max_pending`` forwards are in flight; beyond that, SERVFAIL at once.
    UDP queries are rate limited per source address by ``limiter``."""

    tcp_idle_timeout = 10.0  # seconds a TCP client may take to send its next query
    max_tcp_connections = 256

    def __init__(
        self,
        answerer: Callable[[], DnsAnswerer],
        upstreams: Callable[[], list[tuple[str, int]]],
        metrics: DnsMetrics,
        limiter: RateLimiter | None = None,
        upstream_timeout: float = 2.0,
        max_pending: int = 1024,
    ) -> None:
        self._answerer = answerer
        self._upstreams = upstreams
        self.metrics = metrics
        self.limiter = limiter
        self.upstream_timeout = upstream_timeout
        self.max_pending = max_pending
        self.pending = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._address: tuple[str, int] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tcp_writers: set[asyncio.StreamWriter] = set()
        self._closing = False

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port), e.g. the port the system chose for port 0."""
        if self._address is None:
            raise RuntimeError("DnsProxy.address: the proxy is not started (call start())")
        return self._address

    async def start(self, host: str, port: int, reuse_port: bool = True) -> None:
        """Listen on ``host:port`` over UDP and TCP. With port 0 one free port
        serves both. Raises OSError naming the address when it cannot bind."""
        loop = asyncio.get_running_loop()
        attempts = 5 if port == 0 else 1
        for attempt in range(attempts):
            try:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpServer(self), local_addr=(host, port), reuse_port=reuse_port
                )
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"DNS proxy cannot listen on {host}:{port}/udp: {exc.strerror or exc}; "
                    "is another DNS server (systemd-resolved, dnsmasq) bound there, "
                    "or is the address not on this host?",
                ) from exc
            bound = udp.get_extra_info("sockname")
            try:
                tcp = await asyncio.start_server(
                    self._serve_tcp, host, bound[1], reuse_port=reuse_port
                )
            except OSError as exc:
                udp.close()
                if attempt + 1 < attempts:
                    continue  # the chosen UDP port is taken over TCP: pick another
                raise OSError(
                    exc.errno,
                    f"DNS proxy cannot listen on {host}:{bound[1]}/tcp: "
                    f"{exc.strerror or exc}; is another DNS server bound there?",
                ) from exc
            self._udp, self._tcp = udp, tcp
            self._address = (str(bound[0]), int(bound[1]))
            log.info("DNS proxy listening on %s:%d (UDP and TCP)", *self._address)
            return

    def close(self) -> None:
        """Stop listening, end TCP connections and cancel forwards in flight."""
        self._closing = True
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for writer in list(self._tcp_writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()

    async def wait_closed(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()

    # -- bookkeeping

    def _internal_error(self, what: str, peer: Any, exc: BaseException) -> None:
        log.debug("DNS %s from %s failed: %s: %s", what, peer, type(exc).__name__, exc)
        self.metrics.queries.inc((OTHER, "error"))

    def _spawn_forward(self, coro: Any) -> None:
        # Counted as pending from now, not from when the task first runs: a
        # burst of datagrams arrives before any of their tasks start.
        self.pending += 1
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._forward_done)

    def _forward_done(self, task: asyncio.Task[Any]) -> None:
        self.pending -= 1
        self._tasks.discard(task)

    # -- UDP

    def _on_datagram(self, data: bytes, addr: Any) -> None:
        start = time.perf_counter()
        udp = self._udp
        if udp is None or udp.is_closing():
            return
        limiter = self.limiter
        if limiter is not None and not limiter.allow(str(addr[0]), time.monotonic()):
            self.metrics.queries.inc((OTHER, "ratelimited"))
            return
        answerer = self._answerer()
        result = answerer.handle(data)
        if isinstance(result, Reply):
            udp.sendto(result.wire, addr)
            self.metrics.queries.inc((result.qtype, result.rcode))
            self.metrics.latency.observe(time.perf_counter() - start, ("mesh",))
        elif isinstance(result, Forward):
            self.metrics.queries.inc((result.qtype, "forwarded"))
            if self.pending >= self.max_pending:
                self.metrics.upstream_errors.inc(("overload",))
                udp.sendto(answerer.servfail(data), addr)
                return
            self._spawn_forward(self._forward_udp(answerer, data, addr, start))
        else:
            self.metrics.queries.inc((OTHER, "dropped"))

    async def _forward_udp(
        self, answerer: DnsAnswerer, data: bytes, addr: Any, start: float
    ) -> None:
        try:
            reply = await self._forward(answerer, data, tcp=False)
            udp = self._udp
            if udp is not None and not udp.is_closing():
                udp.sendto(reply, addr)
            self.metrics.latency.observe(time.perf_counter() - start, ("forwarded",))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._internal_error("forwarded UDP query", addr, exc)

    # -- upstreams

    async def _forward(self, answerer: DnsAnswerer, query: bytes, tcp: bool) -> bytes:
        """The first upstream's reply to ``query``, else SERVFAIL."""
        servers = list(self._upstreams())
        if not servers:
            self.metrics.upstream_errors.inc(("no_upstream",))
        for ip, port in servers:
            try:
                async with asyncio.timeout(self.upstream_timeout):
                    if tcp:
                        return await self._exchange_tcp(ip, port, query)
                    return await self._exchange_udp(ip, port, query)
            except TimeoutError:
                reason, detail = "timeout", f"no answer in {self.upstream_timeout:g} s"
            except ConnectionRefusedError as exc:
                reason, detail = "refused", str(exc) or "connection refused"
            except (OSError, EOFError, ValueError, _UpstreamError) as exc:
                reason, detail = "error", f"{type(exc).__name__}: {exc}"
            self.metrics.upstream_errors.inc((reason,))
            log.debug("DNS upstream %s:%d over %s: %s", ip, port, "TCP" if tcp else "UDP", detail)
        return answerer.servfail(query, tcp=tcp)

    async def _exchange_udp(self, ip: str, port: int, query: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UpstreamUdp(query[:2], answer), remote_addr=(ip, port)
        )
        try:
            transport.sendto(query)
            return await answer
        finally:
            transport.close()

    async def _exchange_tcp(self, ip: str, port: int, query: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(ip, port)
        try:
            writer.write(len(query).to_bytes(2, "big") + query)
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(2), "big")
            reply = await reader.readexactly(size)
            if (
                len(reply) < HEADER_SIZE
                or reply[:2] != query[:2]
                or not _header_flags(reply) & dns.flags.QR
            ):
                raise _UpstreamError("the reply is not a response with the query's ID")
            return reply
        finally:
            writer.close()

    # -- TCP

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._closing or len(self._tcp_writers) >= self.max_tcp_connections:
            log.debug("DNS TCP connection from %s closed: over %d", peer, self.max_tcp_connections)
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._tcp_writers.add(writer)
        try:
            await self._tcp_session(reader, writer, peer)
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            self._internal_error("TCP query", peer, exc)
        finally:
            self._tcp_writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _tcp_session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Any
    ) -> None:
        """Queries on one connection, answered in order, until the client
        closes, idles, sends a zero length or something to drop."""
        while True:
            try:
                async with asyncio.timeout(self.tcp_idle_timeout):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    if size == 0:
                        return
                    query = await reader.readexactly(size)
            except (TimeoutError, EOFError, OSError):
                return
            start = time.perf_counter()
            answerer = self._answerer()
            result = answerer.handle(query, tcp=True)
            if isinstance(result, Reply):
                reply, kind = result.wire, "mesh"
                self.metrics.queries.inc((result.qtype, result.rcode))
            elif isinstance(result, Forward):
                self.metrics.queries.inc((result.qtype, "forwarded"))
                kind = "forwarded"
                if self.pending >= self.max_pending:
                    self.metrics.upstream_errors.inc(("overload",))
                    reply = answerer.servfail(query, tcp=True)
                else:
                    self.pending += 1
                    try:
                        reply = await self._forward(answerer, query, tcp=True)
                    finally:
                        self.pending -= 1
            else:
                self.metrics.queries.inc((OTHER, "dropped"))
                log.debug("DNS TCP connection from %s closed: %s", peer, result.reason)
                return
            writer.write(len(reply).to_bytes(2, "big") + reply)
            try:
                async with asyncio.timeout(self.tcp_idle_timeout):
                    await writer.drain()
            except (TimeoutError, OSError):
                return
            self.metrics.latency.observe(time.perf_counter() - start, (kind,))


__all__ = [
    "DnsAnswerer",
    "DnsMetrics",
    "DnsProxy",
    "Drop",
    "Forward",
    "MeshNames",
    "RateLimiter",
    "Reply",
    "fit_udp",
    "qtype_label",
    "read_upstreams",
]
