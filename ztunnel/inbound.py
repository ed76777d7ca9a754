"""Inbound HBONE (15008): terminate mutual TLS, check the peer's identity and
the requested destination, connect to the local workload, relay.

Connections are capped in total and per peer (by verified identity and by
address), so one peer -- even an authenticated one -- cannot take all of them.
Per-connection limits (streams, resets, header sizes, keepalive, idleness) are
``hbone.HboneLimits``."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING

from meshnode.core.identity import ZONE_SNI_MARKER, IdentityError, SpiffeId, ZoneSni
from meshnode.ztunnel import hbone
from meshnode.ztunnel.accesslog import log_connection
from meshnode.ztunnel.authz import AuthzRequest
from meshnode.ztunnel.peer import ConnKey
from meshnode.ztunnel.recheck import revoked_by
from meshnode.ztunnel.session import Carrier, HboneSession, PlainSide, reset_connection
from meshnode.ztunnel.state import Workload
from meshnode.ztunnel.tls import TlsError, peer_identity

if TYPE_CHECKING:
    from meshnode.ztunnel.proxy import ProxyInputs

log = logging.getLogger("meshnode.ztunnel.inbound")

# Established inbound HBONE connections (TLS handshakes in progress are bounded
# by the handshake timeout). A pooled peer needs one per (its workload identity,
# our workload identity) pair, more past max_streams streams each. Read from the
# config when it has these fields, else these defaults.
MAX_INBOUND_CONNECTIONS = 4096
MAX_CONNECTIONS_PER_IDENTITY = 256
MAX_CONNECTIONS_PER_ADDRESS = 1024


def new_session(pi: ProxyInputs) -> HboneSession:
    limits = hbone.HboneLimits(
        max_concurrent_streams=pi.config.max_streams, idle_timeout=pi.config.idle_timeout
    )
    conn = hbone.HboneConnection(client_side=False, limits=limits)
    return HboneSession(
        conn,
        on_made=lambda s: _verify_peer(pi, s),
        on_request=lambda s, ev: _on_request(pi, s, ev),
        on_lost=pi.inbound_sessions.discard,
        on_ended=lambda s, ev: _on_ended(pi, s, ev),
    )


def _on_ended(pi: ProxyInputs, session: HboneSession, ev: hbone.ConnectionEnded) -> None:
    if ev.error_code == hbone.ENHANCE_YOUR_CALM:
        pi.metrics.failed.inc(("inbound", "enhance_your_calm"))


def connection_limit(pi: ProxyInputs, peer: SpiffeId, address: str | None) -> str | None:
    """None if one more inbound connection from this peer is allowed, else why
    not. Counts only when a limit could be near, so the common case is O(1)."""
    cfg = pi.config
    total_max = int(getattr(cfg, "max_inbound_connections", MAX_INBOUND_CONNECTIONS))
    id_max = int(getattr(cfg, "max_connections_per_identity", MAX_CONNECTIONS_PER_IDENTITY))
    addr_max = int(getattr(cfg, "max_connections_per_address", MAX_CONNECTIONS_PER_ADDRESS))
    sessions = pi.inbound_sessions
    if len(sessions) >= total_max:
        return f"{len(sessions)} inbound connections are open (limit {total_max})"
    if len(sessions) < min(id_max, addr_max):
        return None
    same_id = sum(1 for s in sessions if s.peer == peer)
    if same_id >= id_max:
        return f"{same_id} connections from {peer} are open (limit {id_max} per identity)"
    if address is not None:
        same_addr = sum(1 for s in sessions if s.peer_address == address)
        if same_addr >= addr_max:
            return f"{same_addr} connections from {address} are open (limit {addr_max} per address)"
    return None


_ZONE_SNI_INFIX = f".{ZONE_SNI_MARKER}."
_zone_rr = itertools.count()  # spreads zone tunnels over a node's endpoints of a service


def zone_endpoint(pi: ProxyInputs, host: str, port: int, served: SpiffeId | None) -> Workload | str:
    """The local workload a tunnel from another zone is for: its :authority is
    ``<zone SNI>:<service port>`` (it came through our zone's ingress and does
    not know our addresses). One of this node's endpoints of that service on
    that port, with the identity this TLS connection presented; else why not."""
    state = pi.state
    try:
        sni = ZoneSni.parse(host, state.trust_domain)
    except IdentityError as exc:
        return str(exc)
    if sni.port != port:
        return f"authority port {port} is not the port {sni.port} its zone SNI names"
    if sni.zone != state.node.zone:
        return f"{host} is for zone {sni.zone!r}; node {state.node.name} is in {state.node.zone!r}"
    service = state.services_by_name.get((sni.namespace, sni.service))
    if service is None:
        return f"no service {sni.namespace}/{sni.service} here"
    target = service.target_port(port)
    workloads = [
        w
        for e in service.endpoints
        if not e.remote
        and e.node == state.node.name
        and (e.service_port == port if e.service_port else e.port == target)
        and (w := state.find_local_by_addr(e.address, e.port)) is not None
        and w.identity == served
    ]
    if not workloads:
        return (
            f"no endpoint of {sni.namespace}/{sni.service} port {port} with identity "
            f"{served} on node {state.node.name}"
        )
    return workloads[next(_zone_rr) % len(workloads)]


def _verify_peer(pi: ProxyInputs, session: HboneSession) -> bool:
    assert session.transport is not None
    ssl_object = session.transport.get_extra_info("ssl_object")
    peername = session.transport.get_extra_info("peername")
    try:
        peer = peer_identity(ssl_object)
    except TlsError as exc:
        log.warning("inbound connection from %s refused: %s", peername, exc)
        return False
    if peer.trust_domain != pi.state.trust_domain:
        log.warning(
            "inbound connection from %s refused: identity %s is not of trust domain %s",
            peername,
            peer,
            pi.state.trust_domain,
        )
        return False
    address = peername[0] if isinstance(peername, tuple) and peername else None
    over = connection_limit(pi, peer, address)
    if over is not None:
        log.warning("inbound connection from %s (%s) refused: %s", peername, peer, over)
        pi.metrics.failed.inc(("inbound", "connection_limit"))
        return False
    peer_cert = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    revoked = revoked_by(peer_cert, pi.state.revoked)
    if revoked is not None:
        log.warning("inbound connection from %s (%s) refused: %s", peername, peer, revoked)
        pi.metrics.failed.inc(("inbound", "revoked"))
        return False
    session.peer = peer
    session.peer_address = address
    session.peer_cert = peer_cert
    session.local_identity = pi.tls.served_identity(ssl_object)
    pi.inbound_sessions.add(session)
    return True


def _on_request(pi: ProxyInputs, session: HboneSession, ev: hbone.TunnelRequested) -> None:
    ip, port = hbone.split_authority(ev.authority)
    workload: Workload | None
    if ip.endswith(_ZONE_SNI_INFIX + pi.state.trust_domain):
        found = zone_endpoint(pi, ip, port, session.local_identity)
        if isinstance(found, str):
            _refuse(pi, session, ev, 404, found)
            return
        workload = found
        ip, port = workload.address, workload.port
    else:
        workload = pi.state.find_local_by_addr(ip, port)
    if workload is None:
        _refuse(pi, session, ev, 404, f"no workload of node {pi.state.node.name} at {ev.authority}")
        return
    if workload.identity != session.local_identity:
        _refuse(
            pi,
            session,
            ev,
            403,
            f"{ev.authority} is {workload.identity}, but this connection was opened for "
            f"{session.local_identity}",
        )
        return
    denied = authorize(pi, session.peer, workload, port)
    if denied is not None:
        policy, reason = denied
        _refuse(pi, session, ev, 403, reason, policy=policy, src_workload=workload)
        return
    handler = InboundConnection(pi, session.peer, workload, hbone.format_authority(ip, port))
    handler.bind(session, ev.stream_id)
    asyncio.get_running_loop().create_task(handler.connect(session, ip, port))


def authorize(
    pi: ProxyInputs, peer: SpiffeId, workload: Workload, port: int
) -> tuple[str, str] | None:
    """L4 authorization for a connection to a local workload: None if allowed,
    else (deciding policy, reason). Counted in the metrics when denied."""
    denied = policy_denies(pi, peer, workload, port)
    if denied is not None:
        pi.metrics.denied.inc((denied[0], workload.service))
    return denied


def policy_denies(
    pi: ProxyInputs, peer: SpiffeId, workload: Workload, port: int
) -> tuple[str, str] | None:
    """The decision alone, under the current policies (also for re-checks)."""
    decision = pi.authorizer.check(
        AuthzRequest(
            source=peer,
            source_services=pi.services_of(peer),
            dest_service=workload.service,
            dest_namespace=workload.identity.namespace,
            dest_port=port,
        )
    )
    if decision.allowed:
        return None
    policy = decision.policy or "default"
    return policy, f"denied by policy {policy}: {decision.reason}"


def _refuse(
    pi: ProxyInputs,
    session: HboneSession,
    ev: hbone.TunnelRequested,
    status: int,
    reason: str,
    policy: str | None = None,
    src_workload: Workload | None = None,
) -> None:
    log.warning(
        "inbound tunnel from %s to %s refused (%d): %s", session.peer, ev.authority, status, reason
    )
    session.refuse(ev.stream_id, status, reason)
    pi.metrics.failed.inc(("inbound", "denied" if policy else f"refused_{status}"))
    log_connection(
        direction="inbound",
        node=pi.state.node.name,
        src_identity=str(session.peer),
        dst_address=ev.authority,
        dst_workload=src_workload.name if src_workload else None,
        dst_identity=src_workload.identity.uri if src_workload else None,
        result="denied" if policy else "refused",
        status=status,
        policy=policy,
        reason=reason,
    )


class InboundConnection(PlainSide):
    def __init__(self, pi: ProxyInputs, peer: SpiffeId, workload: Workload, authority: str) -> None:
        super().__init__()
        self.pi = pi
        self.peer = peer
        self.workload = workload
        self.authority = authority
        self.upstream_local: tuple[str, int] | None = None
        self.conn_key: ConnKey | None = None  # as the workload sees the connection
        self.port = hbone.split_authority(authority)[1]
        self.revoked: str | None = None
        self._labels: tuple[str, ...] | None = None
        pi.active.add(self)

    async def connect(self, session: Carrier, ip: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        # From the inbound source address (127.0.0.6): in STRICT mode the kernel
        # lets nothing else reach the workload's mesh ports.
        local = (self.pi.config.inbound_source, 0) if ":" not in ip else None
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: self, ip, port, local_addr=local),
                self.pi.config.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            reason = (
                f"workload {self.workload.name} at {self.authority} is not accepting "
                f"connections: {getattr(exc, 'strerror', None) or 'timed out'}"
            )
            self.error = reason
            if not self.finished:
                session.refuse(self.stream_id, 503, reason)
                self._finish()
            return
        if self.finished or self.session is None:
            if self.transport is not None:
                reset_connection(self.transport)
            return
        session.accept(self.stream_id)
        self._labels = self.pi.tcp_labels_inbound(self.peer, self.workload)
        self.pi.metrics.opened.inc(self._labels)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        local = transport.get_extra_info("sockname")
        remote = transport.get_extra_info("peername")
        self.upstream_local = (local[0], local[1])
        if remote:
            self.conn_key = ConnKey(remote[0], remote[1], local[0], local[1])
            self.pi.peers.add(self.conn_key, str(self.peer), self.workload.id)
        super().connection_made(transport)

    def revoke(self, reason: str) -> None:
        """The rules changed and no longer allow this connection: reset both
        sides (the tunnel's stream and the workload's socket)."""
        if self.finished:
            return
        self.revoked = reason
        if self.session is not None:
            self.session.reset(self.stream_id)
        self.session = None
        if self.transport is not None:
            reset_connection(self.transport)
        self._finish()

    def on_finished(self) -> None:
        self.pi.active.discard(self)
        if self._labels is not None:
            m = self.pi.metrics
            m.closed.inc(self._labels)
            m.sent.inc(self._labels, self.bytes_out)  # client -> workload
            m.received.inc(self._labels, self.bytes_in)
        if self.conn_key is not None:
            self.pi.peers.discard(self.conn_key)
        if self.revoked:
            log.warning("inbound %s -> %s closed: %s", self.peer, self.authority, self.revoked)
        elif self.error:
            self.pi.metrics.failed.inc(("inbound", "workload"))
            log.warning("inbound %s -> %s failed: %s", self.peer, self.authority, self.error)
        log_connection(
            direction="inbound",
            node=self.pi.state.node.name,
            src_identity=str(self.peer),
            dst_workload=self.workload.name,
            dst_identity=self.workload.identity.uri,
            dst_address=self.authority,
            bytes_sent=self.bytes_out,
            bytes_received=self.bytes_in,
            duration_ms=round((time.monotonic() - self.started) * 1000, 2),
            result="revoked" if self.revoked else "error" if self.error else "ok",
            reason=self.revoked or self.error,
        )
