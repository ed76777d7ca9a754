"""The node proxy process: binds the listeners, holds the shared state
(``ProxyInputs``), reloads it on SIGHUP, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from meshnode.core import sdnotify
from meshnode.core.contracts.report import (
    ZTUNNEL_REPORT_PATH,
    EndpointHealth,
    TrafficEdge,
    endpoint_address,
)
from meshnode.core.identity import SpiffeId
from meshnode.ztunnel import hbone, inbound
from meshnode.ztunnel.accesslog import FLUSH_EVERY, access_log
from meshnode.ztunnel.admin import AdminServer, Response, json_response
from meshnode.ztunnel.authz import Authorizer
from meshnode.ztunnel.balancer import EndpointPicker
from meshnode.ztunnel.config import ZtunnelConfig
from meshnode.ztunnel.control import ControlError, ControlServer, ControlState, write_snapshot
from meshnode.ztunnel.dns import (
    DnsAnswerer,
    DnsMetrics,
    DnsProxy,
    MeshNames,
    RateLimiter,
    read_upstreams,
)
from meshnode.ztunnel.ingress import IngressMetrics, ZoneIngress
from meshnode.ztunnel.metrics import ProxyMetrics
from meshnode.ztunnel.outbound import OutboundConnection
from meshnode.ztunnel.peer import PATH as PEER_PATH
from meshnode.ztunnel.peer import (
    ConnKey,
    PeerIndex,
    PeerQueryError,
    PeerServer,
    parse_query,
    workload_of_pid_in,
)
from meshnode.ztunnel.pool import HbonePool
from meshnode.ztunnel.recheck import denied_now, revoked_by
from meshnode.ztunnel.routing import Route
from meshnode.ztunnel.session import HboneSession, PlainSide
from meshnode.ztunnel.state import ProxyState, StateError, Workload, load_snapshot_file
from meshnode.ztunnel.tls import TlsContexts, quiet_undecodable_server_names

log = logging.getLogger("meshnode.ztunnel")

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"


@dataclass(frozen=True, slots=True)
class OriginalDst:
    ip: str
    port: int
    workload_id: int


class OrigDstSource:
    """Reads the BPF programs' record of where a redirected connection was
    going. Opened from the pinned map; reopened when the agent re-pins it."""

    def __init__(self) -> None:
        self._table: Any = None
        self._pin_dir: str | None = None
        self._problem = ""  # the last failure to open the map, said once

    def reopen(self, pin_dir: str | None) -> None:
        from meshnode.bpf.errors import BpfError
        from meshnode.bpf.pinned import OrigDstTable

        if self._table is not None:
            self._table.close()
            self._table = None
        self._pin_dir = pin_dir
        if pin_dir is None:
            log.warning("no BPF pin directory in the snapshot: outbound capture is off")
            return
        try:
            self._table = OrigDstTable.open(Path(pin_dir))
        except (OSError, BpfError) as exc:
            # At boot ztunnel may start before the agent has pinned its maps (bcc
            # compiles for a while): serve, and look again at the next connection.
            # Said once, not at every connection meanwhile.
            problem = f"{pin_dir}: {exc}"
            if problem != self._problem:
                self._problem = problem
                log.error(
                    "cannot open the BPF original-destination map in %s; outbound "
                    "connections are refused until the agent pins it",
                    problem,
                )
            return
        if self._problem:
            log.info("BPF original-destination map open again in %s", pin_dir)
            self._problem = ""

    def pop(self, src_ip: str, src_port: int, dst_ip: str, dst_port: int) -> OriginalDst | None:
        if self._table is None and self._pin_dir is not None:
            self.reopen(self._pin_dir)
        if self._table is None:
            return None
        key = (_v4(src_ip), src_port, _v4(dst_ip), dst_port)
        rec = self._table.pop(*key)
        if rec is None and self._pin_dir is not None:
            # A restarted agent pins a new map; the kernel writes there before the
            # agent's next snapshot makes us reopen. Look there too, and switch.
            from meshnode.bpf.pinned import OrigDstTable

            try:
                fresh = OrigDstTable.open(Path(self._pin_dir))
            except Exception:
                return None
            rec = fresh.pop(*key)
            if rec is None:
                fresh.close()
                return None
            self._table.close()
            self._table = fresh
        if rec is None:
            return None
        return OriginalDst(rec.ip, rec.port, rec.workload_id)


def _v4(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") else ip


@dataclass(slots=True)
class ProxyInputs:
    """Everything the listeners share."""

    config: ZtunnelConfig
    state: ProxyState
    tls: TlsContexts
    pool: HbonePool
    orig_dst: OrigDstSource
    picker: EndpointPicker = field(default_factory=EndpointPicker)
    metrics: ProxyMetrics = field(default_factory=ProxyMetrics)
    authorizer: Authorizer = field(default_factory=lambda: Authorizer([]))
    active: set[PlainSide] = field(default_factory=set)
    inbound_sessions: set[HboneSession] = field(default_factory=set)
    # delivered connections by full 4-tuple -> the verified peer identity, so a
    # workload can ask "who is this connection from" on the peer socket (peer.py)
    peers: PeerIndex = field(default_factory=PeerIndex)
    _services_by_identity: dict[SpiffeId, frozenset[str]] = field(default_factory=dict)
    # Mesh DNS (dns.py): the names of the current state, answered from memory.
    dns_answerer: DnsAnswerer = field(
        default_factory=lambda: DnsAnswerer(MeshNames.build("mesh", ()))
    )

    def original_destination(
        self, src_ip: str, src_port: int, dst_ip: str, dst_port: int
    ) -> OriginalDst | None:
        return self.orig_dst.pop(src_ip, src_port, dst_ip, dst_port)

    def tcp_labels_outbound(self, route: Route) -> tuple[str, ...]:
        src, ep = route.source, route.endpoint
        svc = route.service
        return (
            "source",
            src.name,
            src.identity.namespace,
            src.identity.uri,
            src.service or src.name,
            ep.workload,
            ep.identity.namespace,
            ep.identity.uri,
            svc.hostname if svc else "unknown",
            svc.name if svc else "unknown",
            svc.namespace if svc else "unknown",
            svc.name if svc else ep.workload,
            "tcp",
            "-",
            "mutual_tls",
        )

    def tcp_labels_inbound(self, peer: SpiffeId, workload: Workload) -> tuple[str, ...]:
        svc = self.state.services_by_name.get((workload.identity.namespace, workload.service))
        return (
            "destination",
            "unknown",
            peer.namespace,
            peer.uri,
            peer.service_account,
            workload.name,
            workload.identity.namespace,
            workload.identity.uri,
            svc.hostname if svc else "unknown",
            workload.service or "unknown",
            workload.identity.namespace,
            workload.service or workload.name,
            "tcp",
            "-",
            "mutual_tls",
        )

    def services_of(self, identity: SpiffeId) -> frozenset[str]:
        """The services, as "<namespace>/<service>", whose endpoints run as this
        identity in its own namespace: the source services of an inbound
        connection, derived from the proven identity alone."""
        return self._services_by_identity.get(identity, frozenset())

    def apply_state(self, state: ProxyState) -> None:
        """Everything derived from the state, rebuilt on each new snapshot."""
        self.state = state
        self.authorizer = Authorizer(state.policies, state.authz_default)
        by_identity: dict[SpiffeId, set[str]] = {}
        for svc in state.services_by_vip.values():
            for ep in svc.endpoints:
                if svc.namespace == ep.identity.namespace:
                    by_identity.setdefault(ep.identity, set()).add(f"{svc.namespace}/{svc.name}")
        self._services_by_identity = {k: frozenset(v) for k, v in by_identity.items()}
        if self.config.dns is not None:  # no mesh DNS here: no names to keep
            self.dns_answerer = DnsAnswerer(
                MeshNames.build(
                    state.dns_domain,
                    ((s.name, s.namespace, s.vip) for s in state.services_by_vip.values()),
                )
            )
        self.picker.forget_missing(state.services_by_vip.values())
        self.pool.refuse = self._refuse_revoked if state.revoked else None
        self.recheck_policy()
        self.recheck_revocations()

    def _refuse_revoked(self, cert_der: bytes | None) -> str | None:
        return revoked_by(cert_der, self.state.revoked)

    def recheck_revocations(self) -> int:
        """Close HBONE connections (pooled and inbound) whose peer's certificate
        was issued to a node deleted since. Returns how many."""
        revs = self.state.revoked
        if not revs:
            return 0
        why = "the peer's node was deleted"
        n = self.pool.close_where(lambda s: revoked_by(s.peer_cert, revs) is not None, why)
        for session in list(self.inbound_sessions):
            if revoked_by(session.peer_cert, revs) is not None:
                session.close(why)
                n += 1
        if n:
            self.metrics.revoked.inc(("node_revoked",), n)
            log.warning("closed %d HBONE connection(s) with deleted nodes", n)
        return n

    def recheck_policy(self) -> int:
        """Close the delivered connections the current policies deny (a policy,
        grant or node change since they were authorized). Returns how many."""

        def check(conn: inbound.InboundConnection) -> str | None:
            denied = inbound.policy_denies(self, conn.peer, conn.workload, conn.port)
            return None if denied is None else f"no longer allowed: {denied[1]}"

        live = [
            c for c in self.active if isinstance(c, inbound.InboundConnection) and not c.finished
        ]
        gone = denied_now(live, check)
        for conn, reason in gone:
            conn.revoke(reason)
            self.metrics.revoked.inc(("policy",))
        if gone:
            log.info("closed %d established connection(s) the new policies deny", len(gone))
        return len(gone)

    def recheck_trust(self) -> int:
        """The trust bundle dropped a root: close every HBONE connection verified
        under the old bundle (recheck.py says why all of them). Returns how many."""
        n = self.pool.close_where(lambda s: True, "trust bundle changed")
        for session in list(self.inbound_sessions):
            session.close("trust bundle changed")
            n += 1
        if n:
            self.metrics.revoked.inc(("trust_bundle",), n)
            log.warning(
                "trust bundle dropped a root: closed %d HBONE connection(s); peers "
                "reconnect with the new bundle",
                n,
            )
        return n

    def refresh_gauges(self, now: float) -> None:
        m = self.metrics
        m.pool_connections.set((), self.pool.size())
        healthy: dict[tuple[str, ...], float] = {}
        ewma: dict[tuple[str, ...], float] = {}
        inflight: dict[tuple[str, ...], float] = {}
        ejections: dict[tuple[str, ...], float] = {}
        by_addr = {
            (e.address, e.port): s.hostname
            for s in self.state.services_by_vip.values()
            for e in s.endpoints
        }
        for st in self.picker.endpoint_stats(now):
            key: tuple[str, ...] = (
                by_addr.get((st["address"], st["port"]), "unknown"),
                f"{st['address']}:{st['port']}",
            )
            healthy[key] = 1.0 if st["state"] == "healthy" else 0.0
            ewma[key] = float(st["ewma_ms"]) / 1000
            inflight[key] = float(st["inflight"])
            # The picker keeps monotonic totals; the counter mirrors them.
            ejections[(key[1],)] = float(st["total_ejections"])
        m.ejections.values = ejections
        m.endpoint_healthy.replace(healthy)
        m.endpoint_ewma.replace(ewma)
        m.endpoint_inflight.replace(inflight)


class Proxy:
    def __init__(self, config: ZtunnelConfig) -> None:
        self.config = config.validate()
        state = load_snapshot_file(config.snapshot)
        tls = TlsContexts()
        tls.update(state)
        orig = OrigDstSource()
        orig.reopen(state.bpf_pin_dir)
        pool = HbonePool(
            tls,
            connect_timeout=config.connect_timeout,
            idle_timeout=config.idle_timeout,
            max_streams=config.max_streams,
        )
        self.pi = ProxyInputs(config, state, tls, pool, orig)
        self.pi.apply_state(state)
        pool.metrics = self.pi.metrics
        self._servers: list[asyncio.AbstractServer] = []
        self._admin: AdminServer | None = None
        self._peer: PeerServer | None = None
        self._dns: DnsProxy | None = None
        self.ingress: ZoneIngress | None = None
        self._stopping: asyncio.Event | None = None
        self._retiring = False
        self.ready = False

    def reload(self) -> None:
        try:
            state = load_snapshot_file(self.config.snapshot)
        except StateError as exc:
            log.error("snapshot not reloaded, keeping version %d: %s", self.pi.state.version, exc)
            return
        roots_dropped = self.pi.tls.update(state)
        self.pi.apply_state(state)
        if roots_dropped:
            self.pi.recheck_trust()
        # The agent may have re-created and re-pinned the map: always reopen.
        self.pi.orig_dst.reopen(state.bpf_pin_dir)
        log.info(
            "state version %d loaded: %d local workloads, %d services",
            state.version,
            len(state.workloads_by_id),
            len(state.services_by_vip),
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        pi = self.pi
        cfg = self.config
        quiet_undecodable_server_names()  # our TLS ports face the network
        self._servers.append(
            await loop.create_server(
                lambda: OutboundConnection(pi),
                cfg.outbound[0],
                cfg.outbound[1],
                reuse_address=True,
                reuse_port=True,
                backlog=1024,
            )
        )
        self._servers.append(
            await loop.create_server(
                lambda: inbound.new_session(pi),
                cfg.inbound[0],
                cfg.inbound[1],
                ssl=pi.tls.listener_context(),
                ssl_handshake_timeout=cfg.connect_timeout,
                reuse_address=True,
                reuse_port=True,
                backlog=1024,
            )
        )
        if cfg.ingress is not None:
            # Reads self.pi.state per connection: each snapshot applies to the next one.
            self.ingress = ZoneIngress(
                lambda: self.pi.state,
                IngressMetrics(pi.metrics.registry),
                connect_timeout=cfg.connect_timeout,
                connect_attempts=cfg.connect_attempts,
            )
            await self.ingress.start(*cfg.ingress)
            if not pi.state.node.zone:
                log.warning(
                    "zone ingress on %s:%d refuses every connection: node %s has no zone",
                    *self.ingress.address,
                    pi.state.node.name,
                )
        if cfg.dns is not None:
            # The node's resolvers as it sees them now, the proxy's own address
            # left out (a query sent back to us would loop).
            upstreams = list(cfg.dns_upstreams) or read_upstreams(exclude=[cfg.dns])
            self._dns = DnsProxy(
                lambda: pi.dns_answerer,
                lambda: upstreams,
                DnsMetrics(pi.metrics.registry),
                RateLimiter(),
            )
            await self._dns.start(*cfg.dns)
            log.info(
                "mesh DNS on %s:%d (UDP, TCP); other names forwarded to %s",
                *cfg.dns,
                ", ".join(f"{h}:{p}" for h, p in upstreams) or "no resolver (SERVFAIL)",
            )
        self._admin = AdminServer(self._admin_route)
        if cfg.admin_socket:
            # A worker of several: the supervisor serves admin for all of them.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cfg.admin_socket)
            await self._admin.listen_unix(cfg.admin_socket)
            os.chmod(cfg.admin_socket, 0o600)
        else:
            await self._admin.listen_tcp({cfg.admin, cfg.readiness})
            await self._admin.listen_tcp({cfg.metrics}, only="/metrics")
            self._peer = PeerServer(
                lambda pid: workload_of_pid_in(self.pi.state.bpf_pin_dir, pid), self._peer_lookup
            )
            await self._peer.listen(cfg.peer_path)
        self.ready = True
        log.info(
            "ztunnel ready on node %s: outbound %s:%d, inbound HBONE %s:%d, admin %s:%d",
            pi.state.node.name,
            *cfg.outbound,
            *cfg.inbound,
            *cfg.admin,
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGTERM, self._terminate)
        loop.add_signal_handler(signal.SIGINT, self._terminate)
        if self.config.admin_socket:  # a worker: the supervisor retires it on an upgrade
            loop.add_signal_handler(signal.SIGUSR2, self._retire)
        await self.start()
        control = None
        if not self.config.admin_socket:  # a lone ztunnel: the agent talks to us directly
            control = ControlServer(
                self.config.control_path,
                ControlState(_read_doc(self.config.snapshot)),
                self._apply_doc,
            )
            await control.start()
            sdnotify.notify("READY=1", f"STATUS=serving config version {self.pi.state.version}")
        sweeper = loop.create_task(self.pi.pool.run_sweeper())
        flusher = loop.create_task(_flush_access_log())
        await self._stopping.wait()
        flusher.cancel()
        sdnotify.notify("STOPPING=1")
        if control is not None:
            control.close()
        sweeper.cancel()
        await self.drain()

    def _terminate(self) -> None:
        self._retiring = False
        if self._stopping is not None:
            self._stopping.set()

    def _retire(self) -> None:
        """An upgrade: newer workers listen beside us. Stop taking connections, let
        the open ones finish (up to retire_timeout), then exit."""
        self._retiring = True
        if self._stopping is not None:
            self._stopping.set()

    async def _apply_doc(self, version: int, doc: dict[str, Any]) -> None:
        write_snapshot(str(self.config.snapshot), doc)
        self.reload()
        if self.pi.state.version != version:
            raise ControlError(f"version {version} was written but not loaded; see the log")

    async def drain(self) -> None:
        """Stop accepting, give open connections drain_timeout to finish, then
        close what is left (RST to the clients, GOAWAY to peers). When retiring (an
        upgrade), peers get a graceful GOAWAY at once (their open streams go on, new
        ones go to a new connection, so to a new worker) and open connections get
        retire_timeout, cut to drain_timeout by a SIGTERM meanwhile."""
        self.ready = False
        retire = self._retiring
        for server in self._servers[:2]:
            server.close()
        if self.ingress is not None:
            self.ingress.close()
        timeout = self.config.retire_timeout if retire else self.config.drain_timeout
        if retire:
            for session in list(self.pi.inbound_sessions):
                session.conn.close(hbone.NO_ERROR, "ztunnel upgrading")
                session.flush()
        n = len(self.pi.active) + self._ingress_active()
        if n or retire:
            log.info(
                "%s: %d open connections finish here (up to %.0fs)",
                "retiring for an upgrade; new connections go to the new workers"
                if retire
                else "draining",
                n,
                timeout,
            )
        loop = asyncio.get_running_loop()
        start = loop.time()
        while (self.pi.active or self._ingress_active()) and loop.time() < start + timeout:
            await asyncio.sleep(0.1)
            if retire and not self._retiring:  # a SIGTERM while retiring: drain_timeout
                timeout = min(timeout, loop.time() - start + self.config.drain_timeout)
                retire = False
        for conn in list(self.pi.active):
            conn.on_reset("ztunnel shutting down")
        if self.ingress is not None:
            await self.ingress.drain(0)
        self.pi.pool.close_all()
        for session in list(self.pi.inbound_sessions):
            session.close("shutting down")
        for server in self._servers[2:]:
            server.close()
        if self._admin is not None:
            await self._admin.close()
        if self._peer is not None:
            await self._peer.close()
        if self._dns is not None:
            self._dns.close()
            await self._dns.wait_closed()
        access_log.flush()
        log.info("ztunnel stopped")

    def _ingress_active(self) -> int:
        return self.ingress.active if self.ingress is not None else 0

    # -- admin (localhost only) ---------------------------------------------------

    async def _admin_route(self, method: str, target: str) -> Response:
        url = urlsplit(target)
        if method != "GET":
            return json_response(405, {"error": "only GET"})
        if url.path == "/metrics":
            self.pi.refresh_gauges(time.monotonic())
            return 200, METRICS_CONTENT_TYPE, self.pi.metrics.render().encode()
        if url.path == "/healthz/ready":
            if self.ready:
                return json_response(200, {"ready": True})
            return json_response(503, {"ready": False})
        if url.path == "/config_dump":
            return json_response(
                200,
                {
                    "config": self.config.dump(),
                    "state": self.pi.state.dump(),
                    "endpoints": self.pi.picker.endpoint_stats(time.monotonic()),
                    "pool": {
                        "connections": self.pi.pool.size(),
                        "handshakes": self.pi.pool.handshakes,
                    },
                    "active_connections": len(self.pi.active),
                },
            )
        if url.path == ZTUNNEL_REPORT_PATH:
            return json_response(200, health_report(self.pi, time.monotonic()))
        if url.path == PEER_PATH and self.config.admin_socket:
            # A worker, asked by its supervisor over the root-only admin socket
            # after the supervisor checked who is asking (peer.py).
            return self._peer_for_supervisor(url.query)
        return json_response(
            404,
            {
                "error": f"unknown path {url.path}",
                "paths": ["/config_dump", "/healthz/ready", "/metrics", ZTUNNEL_REPORT_PATH],
            },
        )

    async def _peer_lookup(self, key: ConnKey, workload: int) -> tuple[int, dict[str, Any]]:
        return self.pi.peers.answer(key, workload)

    def _peer_for_supervisor(self, query: str) -> Response:
        try:
            key = parse_query(query)
            workload = int(parse_qs(query).get("workload", [""])[0])
        except (PeerQueryError, ValueError) as exc:
            return json_response(400, {"error": str(exc)})
        status, body = self.pi.peers.answer(key, workload)
        return json_response(status, body)


def health_report(pi: ProxyInputs, now: float) -> dict[str, Any]:
    """``{"endpoints": [EndpointHealth...], "edges": [TrafficEdge...]}``: each
    endpoint of each service as this node's balancer sees it (those it has stats
    of), and the connections this node's workloads made, by identity pair."""
    health = pi.picker.health(now)
    endpoints = []
    for svc in pi.state.services_by_vip.values():
        for ep in svc.endpoints:
            seen = health.get((ep.address, ep.port))
            if seen is None:
                continue
            endpoints.append(
                EndpointHealth(
                    service=f"{svc.namespace}/{svc.name}",
                    address=endpoint_address(ep.address, ep.port),
                    node=ep.node,
                    ejected=seen[0],
                    ewma_ms=round(seen[1], 3),
                ).to_dict()
            )
    edges = [
        TrafficEdge(src, dst, mtls, opened, sent, received).to_dict()
        for (src, dst, mtls), (opened, sent, received) in sorted(pi.metrics.edges().items())
    ]
    return {"endpoints": endpoints, "edges": edges}


async def _flush_access_log() -> None:
    while True:
        await asyncio.sleep(FLUSH_EVERY)
        access_log.flush()


def _read_doc(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


async def wait_for_first_snapshot(config: ZtunnelConfig) -> None:
    """Started before the agent ever wrote a snapshot (a fresh node, where
    systemd starts both at once): listen on the control socket until the
    agent sends one, then write it where the proxy loads it from."""
    if Path(config.snapshot).exists() or config.admin_socket:
        return
    got = asyncio.Event()

    async def apply(version: int, doc: dict[str, Any]) -> None:
        write_snapshot(str(config.snapshot), doc)
        got.set()

    control = ControlServer(config.control_path, ControlState(), apply)
    await control.start()
    log.info(
        "no snapshot at %s yet: waiting for the node agent on %s",
        config.snapshot,
        config.control_path,
    )
    sdnotify.notify("STATUS=waiting for the node agent's first snapshot")
    await got.wait()
    await asyncio.sleep(0.05)  # let the ack go out before the socket is replaced
    control.close()


def run_ztunnel(config: ZtunnelConfig) -> None:
    """One process, or a supervisor and `workers` processes sharing the
    listeners through SO_REUSEPORT (the kernel spreads connections over them)."""
    import uvloop

    uvloop.run(wait_for_first_snapshot(config))
    if (config.workers > 1 or config.supervised) and not config.admin_socket:
        from meshnode.ztunnel.supervisor import Supervisor

        uvloop.run(Supervisor(config).run())
        return
    proxy = Proxy(config)
    uvloop.run(proxy.run())
