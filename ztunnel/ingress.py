"""The zone ingress: other zones' mesh traffic into this zone, routed on the TLS
SNI and never decrypted (docs/multizone.md).

A node proxy of another zone opens mutual TLS to this listener with a zone SNI,
``<service>.<namespace>.<port>.<zone>.mz.<trust-domain>`` (core/identity.py
``ZoneSni``). The ingress holds no key: it reads the SNI from the ClientHello
(:class:`SniPeek`, OpenSSL parses it), picks the nodes of this zone that run an
endpoint of that service on that port (:func:`route_zone_sni`), connects to the
HBONE port of one of them (the next one on a failed connect: nothing was
forwarded yet) and relays the raw bytes both ways, ClientHello first. That node
proxy terminates the mutual TLS and authorizes as for any tunnel.

Pure parts: :class:`SniPeek`, :func:`route_zone_sni` / :func:`route_server_name`,
:class:`RoundRobin`, :class:`LogBudget`, :func:`connection_labels`. The shell:
:class:`ZoneIngress` (asyncio protocols, back-pressure, half-close, RST on errors).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from meshnode.core.constants import HBONE_PORT
from meshnode.core.identity import IdentityError, ZoneSni
from meshnode.core.logbudget import LogBudget
from meshnode.ztunnel.metrics import Counter, Gauge, Registry
from meshnode.ztunnel.session import reset_connection
from meshnode.ztunnel.state import ProxyState

__all__ = [
    "HELLO_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_HELLO",
    "REASONS",
    "IngressMetrics",
    "IngressRoute",
    "LogBudget",
    "PeekError",
    "Refusal",
    "RoundRobin",
    "SniPeek",
    "ZoneIngress",
    "connection_labels",
    "route_server_name",
    "route_zone_sni",
]

log = logging.getLogger("meshnode.ztunnel.ingress")

HELLO_TIMEOUT = 5.0  # seconds from accept until the ClientHello names the SNI
MAX_HELLO = 16 << 10  # bytes read, at most, before the SNI must be known
MAX_CONNECTIONS = 4096  # open connections (relaying or still peeking) per process
CONNECT_ATTEMPTS = 3  # nodes tried per connection

# Results that are not "forwarded": the metric labels, with what each means.
REASONS = {
    "not_tls": "not a TLS ClientHello (or a malformed one)",
    "no_sni": "a ClientHello without a server name",
    "too_large": "no complete ClientHello within the size cap",
    "timeout": "no complete ClientHello within the time limit",
    "client_closed": "the client closed before its connection was forwarded",
    "bad_sni": "the server name is not a zone SNI of this trust domain",
    "wrong_zone": "a zone SNI for another zone",
    "unknown_service": "no such service",
    "no_endpoint": "no endpoint of the service on that port in this zone",
    "unreachable": "no node running an endpoint could be connected to",
    "overload": "over the connection cap",
    "error": "an internal error (a bug: see the log)",
}
# Refusals a mesh caller can cause by its configuration: WARNING. The others
# (scanners, clients that give up): INFO. Both rate limited.
_WARN = frozenset({"wrong_zone", "unknown_service", "no_endpoint", "unreachable", "overload"})


# --- the SNI, from the ClientHello -------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeekError:
    """Why no server name came out of the bytes: ``reason`` is a metric label
    (``not_tls``, ``no_sni``, ``too_large``), ``detail`` for the log."""

    reason: str
    detail: str


class _PeekObject(ssl.SSLObject):
    """An SSLObject the SNI callback leaves what it saw on."""

    peeked = False
    server_name: str | None = None


def _on_server_name(obj: Any, server_name: str | None, ctx: ssl.SSLContext) -> int:
    if isinstance(obj, _PeekObject):
        obj.peeked = True
        obj.server_name = server_name
    # Stop here: the name is all we wanted (the handshake fails, CALLBACK_FAILED).
    return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE


@functools.cache
def _peek_context() -> ssl.SSLContext:
    """A server context without a certificate: it never gets past the ClientHello.
    OpenSSL calls the SNI callback after it has parsed the whole ClientHello and
    agreed on a protocol version (TLS 1.2 or 1.3), with or without a name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.sslobject_class = _PeekObject
    ctx.sni_callback = _on_server_name
    return ctx


class SniPeek:
    """The server name of a TLS ClientHello, from its bytes as they arrive.

    ``feed(data)`` returns None while more bytes are needed, the server name once
    the ClientHello is complete, or a :class:`PeekError`; after a result it
    returns that result again. Nothing is parsed by hand: the bytes go into an
    OpenSSL server-side handshake over memory BIOs (one object, fed
    incrementally, so a hello split across TCP reads or TLS records is fine),
    whose SNI callback records the name and ends the handshake. At most
    ``max_bytes`` are read: a ClientHello that does not fit is ``too_large``.
    Pure (no sockets, no clock)."""

    def __init__(self, max_bytes: int = MAX_HELLO) -> None:
        self.max_bytes = max_bytes
        self.size = 0  # bytes given to OpenSSL
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = cast(
            _PeekObject, _peek_context().wrap_bio(self._in, self._out, server_side=True)
        )
        self._result: str | PeekError | None = None

    @property
    def result(self) -> str | PeekError | None:
        return self._result

    def feed(self, data: bytes) -> str | PeekError | None:
        if self._result is not None:
            return self._result
        room = self.max_bytes - self.size
        chunk = data[:room]
        self.size += len(chunk)
        self._in.write(chunk)
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            if self.size < self.max_bytes:
                return None
            self._result = PeekError(
                "too_large", f"no complete ClientHello in the first {self.max_bytes} bytes"
            )
            return self._result
        except ssl.SSLError as exc:
            if not self._obj.peeked:
                self._result = PeekError(
                    "not_tls", f"not a TLS ClientHello ({exc.reason or exc.library or exc})"
                )
                return self._result
        else:  # cannot happen without a certificate; never forward on it
            self._result = PeekError("not_tls", "the handshake went past the ClientHello")
            return self._result
        name = self._obj.server_name
        if not name:
            self._result = PeekError("no_sni", "a ClientHello without a server name (SNI)")
        else:
            self._result = name
        return self._result


# --- where a zone SNI goes ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a connection is not forwarded: ``reason`` is a metric label."""

    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class IngressRoute:
    """The HBONE addresses ``(node_ip, port)`` of the nodes that may take the
    connection, each once, in the state's order."""

    sni: ZoneSni
    targets: tuple[tuple[str, int], ...]


def route_zone_sni(
    state: ProxyState, sni: ZoneSni, hbone_port: int = HBONE_PORT
) -> IngressRoute | Refusal:
    """The nodes of this zone that run an endpoint of ``sni``'s service on its
    port, as HBONE addresses; else why not. Other zones' endpoints (``remote``)
    and endpoints labelled with another zone are never candidates: the
    destination node proxy serves a zone SNI of its own zone only. When the
    serving endpoints run under several identities, only those with the first
    by URI are candidates: the caller expects one identity per zone, and a node
    presents the first of those it has (ztunnel/tls.py ``zone_identities``).
    Pure."""
    zone = state.node.zone
    if sni.zone != zone:
        return Refusal(
            "wrong_zone",
            f"{sni.name} is for zone {sni.zone!r}; this ingress serves zone {zone!r}"
            if zone
            else f"{sni.name} is for zone {sni.zone!r}; node {state.node.name} has no zone",
        )
    service = state.services_by_name.get((sni.namespace, sni.service))
    if service is None:
        return Refusal("unknown_service", f"no service {sni.namespace}/{sni.service}")
    port = sni.port
    target = service.target_port(port)
    serving = [
        e
        for e in service.endpoints
        if not e.remote
        and e.zone == zone
        and (e.service_port == port if e.service_port else e.port == target)
    ]
    if not serving:
        return Refusal(
            "no_endpoint",
            f"no endpoint of {sni.namespace}/{sni.service} port {port} in zone {zone!r}",
        )
    identity = min(e.identity.uri for e in serving)
    targets: dict[tuple[str, int], None] = {}
    for e in serving:
        if e.identity.uri == identity:
            targets[(e.node_ip, hbone_port)] = None
    return IngressRoute(sni, tuple(targets))


def route_server_name(
    state: ProxyState, server_name: str, hbone_port: int = HBONE_PORT
) -> IngressRoute | Refusal:
    """:func:`route_zone_sni` of a server name as the ClientHello carried it."""
    try:
        sni = ZoneSni.parse(server_name, state.trust_domain)
    except IdentityError as exc:
        return Refusal("bad_sni", str(exc))
    return route_zone_sni(state, sni, hbone_port)


def connection_labels(state: ProxyState, sni: ZoneSni | None) -> tuple[str, str, str]:
    """(service, namespace, zone) labels of a connection. The SNI is the
    client's to choose: a service and namespace are named only when the state
    has that service, a zone only when it is this one ("other" else), so that a
    client cannot make series without bound."""
    if sni is None:
        return ("unknown", "unknown", "unknown")
    known = (sni.namespace, sni.service) in state.services_by_name
    return (
        sni.service if known else "unknown",
        sni.namespace if known else "unknown",
        sni.zone if sni.zone == state.node.zone else "other",
    )


class RoundRobin:
    """The order in which a connection tries the candidate nodes: a rotation per
    (namespace, service, port), so that each service's connections spread over
    its nodes; at most ``attempts`` of them. Pure."""

    MAX_KEYS = 10_000

    def __init__(self) -> None:
        self._next: dict[tuple[str, str, int], int] = {}

    def order(
        self, sni: ZoneSni, targets: Sequence[tuple[str, int]], attempts: int
    ) -> list[tuple[str, int]]:
        if not targets:
            return []
        key = (sni.namespace, sni.service, sni.port)
        if key not in self._next and len(self._next) >= self.MAX_KEYS:
            self._next.clear()  # services come and go with snapshots: forget
        start = self._next.get(key, 0) % len(targets)
        self._next[key] = start + 1
        n = min(attempts, len(targets))
        return [targets[(start + i) % len(targets)] for i in range(n)]


# --- metrics -----------------------------------------------------------------------


class IngressMetrics:
    """The zone ingress's metrics, registered in the proxy's registry."""

    def __init__(self, registry: Registry) -> None:
        self.connections = registry.add(
            Counter(
                "meshnode_ingress_connections_total",
                "Connections to the zone ingress by the service, namespace and zone their "
                "SNI names (unknown / other when not served here) and result: forwarded, "
                "or the reason it was not (as meshnode_ingress_refused_total)",
                ("service", "namespace", "zone", "result"),
            )
        )
        self.refused = registry.add(
            Counter(
                "meshnode_ingress_refused_total",
                "Connections to the zone ingress not forwarded, by reason: not_tls, no_sni, "
                "too_large, timeout, client_closed, bad_sni, wrong_zone, unknown_service, "
                "no_endpoint, unreachable, overload, error",
                ("reason",),
            )
        )
        self.bytes = registry.add(
            Counter(
                "meshnode_ingress_bytes_total",
                "Bytes relayed by the zone ingress, by service and direction: "
                "client_to_node (from the other zone) or node_to_client",
                ("service", "namespace", "direction"),
            )
        )
        self.connect_failures = registry.add(
            Counter(
                "meshnode_ingress_connect_failures_total",
                "Failed connects from the zone ingress to a node's HBONE port (the next "
                "candidate is tried), by reason: refused, timeout, error",
                ("reason",),
            )
        )
        self.active = registry.add(
            Gauge(
                "meshnode_ingress_connections_active",
                "Connections open at the zone ingress (relaying or reading the ClientHello)",
            )
        )


# --- the shell ---------------------------------------------------------------------

_PEEK, _CONNECT, _RELAY, _DONE = range(4)


def _address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return "an unknown address"


class _Node(asyncio.Protocol):
    """The connection to a node's HBONE port. It reads nothing until the
    client's side attaches it (the ClientHello is written first)."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.attached = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.client.from_node(data)

    def eof_received(self) -> bool:
        return self.client.node_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.attached:
            self.client.node_lost(exc)

    def pause_writing(self) -> None:
        self.client.node_write_paused(True)

    def resume_writing(self) -> None:
        self.client.node_write_paused(False)


class _Client(asyncio.Protocol):
    """One connection from another zone: peek, route, connect, relay."""

    def __init__(self, ingress: ZoneIngress) -> None:
        self.ingress = ingress
        self.transport: asyncio.Transport | None = None
        self.peer = "an unknown address"
        self.phase = _PEEK
        self.peek = SniPeek(ingress.max_hello)
        self.buffer = bytearray()
        self.node: _Node | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.counted = False
        self.client_eof = False  # the client half-closed
        self.node_eof_seen = False  # the node half-closed
        self.node_full = False  # the node's write buffer is full: stop reading the client
        self.up: tuple[str, ...] = ()
        self.down: tuple[str, ...] = ()

    # -- asyncio.Protocol: the client's side ----------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        ing = self.ingress
        try:
            self.peer = _address(transport)
            ing.conns.add(self)
            ing.metrics.active.inc()
            if len(ing.conns) > ing.max_connections:
                self.refuse("overload", f"over {ing.max_connections} open connections")
                return
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(ing.hello_timeout, self._hello_timeout)
        except Exception as exc:
            self.internal_error(exc)

    def data_received(self, data: bytes) -> None:
        try:
            if self.phase == _RELAY:
                assert self.node is not None and self.node.transport is not None
                self.node.transport.write(data)
                self.ingress.metrics.bytes.inc(self.up, len(data))
            elif self.phase == _PEEK:
                self._peek(data)
            elif self.phase == _CONNECT:  # read before the pause took effect
                self.buffer += data
        except Exception as exc:
            self.internal_error(exc)

    def eof_received(self) -> bool:
        try:
            if self.phase == _PEEK:
                self.refuse("client_closed", "the client closed before its ClientHello was read")
                return False
            self.client_eof = True
            if self.phase == _RELAY:
                self._pass_eof_to_node()
            return True  # keep the other way open (half-close)
        except Exception as exc:
            self.internal_error(exc)
            return False

    def connection_lost(self, exc: Exception | None) -> None:
        ing = self.ingress
        ing.conns.discard(self)
        ing.metrics.active.dec()
        self._cancel_timer()
        if self.task is not None:
            self.task.cancel()
        if self.phase in (_PEEK, _CONNECT):
            why = f" ({exc})" if exc else ""
            self.refuse("client_closed", f"the client went away before it was forwarded{why}")
        elif self.phase == _RELAY:
            self.phase = _DONE
            node = self.node
            if node is not None and node.transport is not None:
                log.debug(
                    "zone ingress: %s went away (%s); resetting the node side", self.peer, exc
                )
                reset_connection(node.transport)

    def pause_writing(self) -> None:  # the client reads slower than the node sends
        node = self.node
        if node is not None and node.transport is not None and not node.transport.is_closing():
            node.transport.pause_reading()

    def resume_writing(self) -> None:
        node = self.node
        if node is not None and node.transport is not None and not node.transport.is_closing():
            node.transport.resume_reading()

    # -- peek and route ----------------------------------------------------------

    def _peek(self, data: bytes) -> None:
        self.buffer += data
        result = self.peek.feed(data)
        if result is None:
            return
        self._cancel_timer()
        if isinstance(result, PeekError):
            self.refuse(result.reason, result.detail)
            return
        ing = self.ingress
        state = ing.state()
        decision = route_server_name(state, result, ing.hbone_port)
        sni = decision.sni if isinstance(decision, IngressRoute) else _parsed(result, state)
        labels = connection_labels(state, sni)
        if isinstance(decision, Refusal):
            self.refuse(decision.reason, decision.detail, labels)
            return
        self.up = (labels[0], labels[1], "client_to_node")
        self.down = (labels[0], labels[1], "node_to_client")
        self.phase = _CONNECT
        assert self.transport is not None
        self.transport.pause_reading()
        order = ing.balancer.order(decision.sni, decision.targets, ing.connect_attempts)
        self.task = asyncio.get_running_loop().create_task(
            self._connect(decision.sni, order, labels)
        )

    async def _connect(
        self, sni: ZoneSni, order: list[tuple[str, int]], labels: tuple[str, str, str]
    ) -> None:
        ing = self.ingress
        loop = asyncio.get_running_loop()
        failures: list[str] = []
        try:
            for host, port in order:
                try:
                    async with asyncio.timeout(ing.connect_timeout):
                        _, node = await loop.create_connection(lambda: _Node(self), host, port)
                except TimeoutError:
                    reason, what = "timeout", f"no answer in {ing.connect_timeout:g} s"
                except ConnectionRefusedError:
                    reason, what = "refused", "connection refused"
                except OSError as exc:
                    reason, what = "error", exc.strerror or str(exc)
                else:
                    if node.transport is not None and not node.transport.is_closing():
                        self._attach(node, sni, labels, host, port)
                        return
                    reason, what = "error", "closed at once"
                ing.metrics.connect_failures.inc((reason,))
                failures.append(f"{host}:{port}: {what}")
                log.debug(
                    "zone ingress: %s for %s: %s:%d %s", self.peer, sni.name, host, port, what
                )
            self.refuse(
                "unreachable",
                f"{sni.name}: no node answered ({'; '.join(failures) or 'no candidate'})",
                labels,
            )
        except Exception as exc:
            self.internal_error(exc)
        finally:
            self.task = None

    def _attach(
        self, node: _Node, sni: ZoneSni, labels: tuple[str, str, str], host: str, port: int
    ) -> None:
        assert self.transport is not None and node.transport is not None
        self.node = node
        node.attached = True
        self.phase = _RELAY
        self.counted = True
        self.ingress.metrics.connections.inc((*labels, "forwarded"))
        log.debug("zone ingress: %s -> %s via %s:%d", self.peer, sni.name, host, port)
        data = bytes(self.buffer)
        self.buffer = bytearray()
        node.transport.write(data)
        self.ingress.metrics.bytes.inc(self.up, len(data))
        node.transport.resume_reading()
        if self.client_eof:
            self._pass_eof_to_node()
        elif not self.node_full:
            self.transport.resume_reading()

    # -- the node's side -----------------------------------------------------------

    def from_node(self, data: bytes) -> None:
        try:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(data)
                self.ingress.metrics.bytes.inc(self.down, len(data))
        except Exception as exc:
            self.internal_error(exc)

    def node_eof(self) -> bool:
        try:
            self.node_eof_seen = True
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write_eof()
            self._finish_if_done()
            return True
        except Exception as exc:
            self.internal_error(exc)
            return False

    def node_lost(self, exc: Exception | None) -> None:
        if self.phase != _RELAY:
            return
        self.phase = _DONE
        if self.transport is not None:
            log.debug(
                "zone ingress: node side of %s lost (%s); resetting the client", self.peer, exc
            )
            reset_connection(self.transport)

    def node_write_paused(self, paused: bool) -> None:
        self.node_full = paused
        t = self.transport
        if self.phase != _RELAY or t is None or t.is_closing():
            return
        if paused:
            t.pause_reading()
        elif not self.client_eof:
            t.resume_reading()

    # -- ends ---------------------------------------------------------------------

    def _pass_eof_to_node(self) -> None:
        node = self.node
        if node is not None and node.transport is not None and not node.transport.is_closing():
            node.transport.write_eof()
        self._finish_if_done()

    def _finish_if_done(self) -> None:
        """Both ways half-closed: close both (what is buffered still goes out)."""
        if not (self.client_eof and self.node_eof_seen) or self.phase != _RELAY:
            return
        self.phase = _DONE
        if self.transport is not None:
            self.transport.close()
        if self.node is not None and self.node.transport is not None:
            self.node.transport.close()

    def _hello_timeout(self) -> None:
        self.timer = None
        if self.phase == _PEEK:
            self.refuse(
                "timeout",
                f"no complete ClientHello within {self.ingress.hello_timeout:g} s "
                f"({self.peek.size} bytes)",
            )

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def refuse(
        self, reason: str, detail: str, labels: tuple[str, str, str] = ("unknown",) * 3
    ) -> None:
        """Count once, log (rate limited), close cleanly."""
        self.phase = _DONE
        self._cancel_timer()
        if not self.counted:
            self.counted = True
            ing = self.ingress
            ing.metrics.connections.inc((*labels, reason))
            ing.metrics.refused.inc((reason,))
            ing.log_refusal(reason, self.peer, detail)
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()

    def abort(self, why: str) -> None:
        """RST both sides (shutting down)."""
        self.phase = _DONE
        self._cancel_timer()
        if self.task is not None:
            self.task.cancel()
        node = self.node
        if node is not None and node.transport is not None:
            reset_connection(node.transport)
        if self.transport is not None:
            log.debug("zone ingress: %s reset: %s", self.peer, why)
            reset_connection(self.transport)

    def internal_error(self, exc: BaseException) -> None:
        log.error(
            "zone ingress: internal error on the connection from %s: %s: %s",
            self.peer,
            type(exc).__name__,
            exc,
            exc_info=log.isEnabledFor(logging.DEBUG),
        )
        if not self.counted:
            self.counted = True
            self.ingress.metrics.connections.inc(("unknown", "unknown", "unknown", "error"))
            self.ingress.metrics.refused.inc(("error",))
        self.abort("internal error")


def _parsed(server_name: str, state: ProxyState) -> ZoneSni | None:
    try:
        return ZoneSni.parse(server_name, state.trust_domain)
    except IdentityError:
        return None


class ZoneIngress:
    """The zone ingress's listener and its connections.

    ``state`` returns the proxy's current state (called per connection, so a new
    snapshot applies to the next connection). Per connection: read until the
    ClientHello names the SNI (``hello_timeout`` seconds, ``max_hello`` bytes),
    route it (:func:`route_server_name`), connect to a candidate node's
    ``hbone_port`` (``connect_timeout`` each, up to ``connect_attempts``
    candidates, round robin), write what was read, relay both ways with
    back-pressure and half-close; an error on one side resets the other. What
    is not forwarded is closed cleanly, counted and logged (rate limited). At
    most ``max_connections`` at once; beyond, refused (``overload``)."""

    def __init__(
        self,
        state: Callable[[], ProxyState],
        metrics: IngressMetrics,
        *,
        hbone_port: int = HBONE_PORT,
        hello_timeout: float = HELLO_TIMEOUT,
        max_hello: int = MAX_HELLO,
        connect_timeout: float = 5.0,
        connect_attempts: int = CONNECT_ATTEMPTS,
        max_connections: int = MAX_CONNECTIONS,
        log_budget: LogBudget | None = None,
    ) -> None:
        self.state = state
        self.metrics = metrics
        self.hbone_port = hbone_port
        self.hello_timeout = hello_timeout
        self.max_hello = max_hello
        self.connect_timeout = connect_timeout
        self.connect_attempts = connect_attempts
        self.max_connections = max_connections
        self.log_budget = log_budget or LogBudget()
        self.balancer = RoundRobin()
        self.conns: set[_Client] = set()
        self._server: asyncio.AbstractServer | None = None
        self._address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port), e.g. the port the system chose for port 0."""
        if self._address is None:
            raise RuntimeError("ZoneIngress.address: not started (call start())")
        return self._address

    @property
    def active(self) -> int:
        return len(self.conns)

    async def start(self, host: str, port: int, *, reuse_port: bool = True) -> None:
        """Listen on ``host:port`` (SO_REUSEPORT: workers share it). Raises
        OSError naming the address when it cannot bind."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _Client(self),
                host,
                port,
                reuse_address=True,
                reuse_port=reuse_port,
                backlog=1024,
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"zone ingress cannot listen on {host}:{port}: {exc.strerror or exc}",
            ) from exc
        sock = self._server.sockets[0].getsockname()
        self._address = (str(sock[0]), int(sock[1]))
        log.info(
            "zone ingress on %s:%d: forwards other zones' mesh TLS by SNI to HBONE port %d",
            *self._address,
            self.hbone_port,
        )

    def close(self) -> None:
        """Stop accepting; open connections go on."""
        if self._server is not None:
            self._server.close()

    async def drain(self, timeout: float) -> None:
        """Stop accepting, give open connections ``timeout`` seconds to end,
        then reset what is left."""
        self.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.conns and loop.time() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        for conn in list(self.conns):
            conn.abort("zone ingress shutting down")
        await asyncio.sleep(0)  # let the resets' connection_lost run

    def log_refusal(self, reason: str, peer: str, detail: str) -> None:
        skipped = self.log_budget.take(reason, time.monotonic())
        if skipped is None:
            return
        more = f" ({skipped} more like it not logged)" if skipped else ""
        log.log(
            logging.WARNING if reason in _WARN else logging.INFO,
            "zone ingress: connection from %s not forwarded (%s): %s%s",
            peer,
            reason,
            detail,
            more,
        )
