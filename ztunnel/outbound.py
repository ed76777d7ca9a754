"""Outbound (15001): connections the BPF programs redirected here. Find the
original destination and the source workload, route, and carry the bytes
over a pooled HBONE tunnel to the destination node."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from meshnode.ztunnel.accesslog import log_connection
from meshnode.ztunnel.pool import ConnectError, PoolKey
from meshnode.ztunnel.routing import Route, RouteError, build_route
from meshnode.ztunnel.session import PlainSide

if TYPE_CHECKING:
    from meshnode.ztunnel.proxy import ProxyInputs

log = logging.getLogger("meshnode.ztunnel.outbound")


class OutboundConnection(PlainSide):
    def __init__(self, pi: ProxyInputs) -> None:
        super().__init__()
        self.pi = pi
        self.route: Route | None = None
        self.established = False
        self.client = ""
        self.original_dst = ""
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.ready = False  # hold the client's bytes until the tunnel is up
        self.pi.active.add(self)
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        self.client = f"{peer[0]}:{peer[1]}"
        orig = self.pi.original_destination(peer[0], peer[1], sock[0], sock[1])
        if orig is None:
            self._fail(f"no original destination recorded for {self.client} (not redirected by "
                       "meshnode's BPF programs, or the record expired)")
            return
        self.original_dst = f"{orig.ip}:{orig.port}"
        self._task = asyncio.get_running_loop().create_task(
            self._connect(orig.workload_id, orig.ip, orig.port)
        )

    async def _connect(self, workload_id: int, ip: str, port: int) -> None:
        pi = self.pi
        try:
            route = build_route(pi.state, workload_id, ip, port, pi.chooser)
        except RouteError as exc:
            self._fail(str(exc))
            return
        self.route = route
        key = PoolKey(route.source.identity, route.next_hop, route.expected_identity)
        try:
            session = await pi.pool.session_for(key)
        except ConnectError as exc:
            self._fail(str(exc))
            return
        if self.finished or self.transport is None:
            return  # the client gave up meanwhile
        headers = [
            ("forwarded", f"for={self.client.rpartition(':')[0]}"),
            ("baggage", f"k8s.namespace.name={route.source.identity.namespace},"
                        f"service.name={route.source.service},k8s.workload.name={route.source.name}"),
        ]
        try:
            stream_id = session.open(route.authority, headers, self)
        except Exception as exc:  # LocalProtocolError: the connection just filled up or ended
            self._fail(f"cannot open HBONE stream to {route.next_hop[0]}: {exc}")
            return
        self.session = session
        self.stream_id = stream_id
        self._timer = asyncio.get_running_loop().call_later(
            pi.config.stream_timeout, self._stream_timeout
        )

    def _stream_timeout(self) -> None:
        if not self.established and self.session is not None:
            self.session.reset(self.stream_id)
            self._fail(f"peer did not answer CONNECT within {self.pi.config.stream_timeout:.0f}s")

    def on_established(self) -> None:
        self.established = True
        if self._timer is not None:
            self._timer.cancel()
        self.release_held()

    def _fail(self, reason: str) -> None:
        if self.finished:
            return
        self.error = reason
        if self.transport is not None:
            self.transport.abort()  # RST: the client learns at once, nothing hangs
        self._finish()

    def on_finished(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.pi.active.discard(self)
        route = self.route
        if self.error:
            log.warning("outbound %s -> %s failed: %s", self.client, self.original_dst, self.error)
        log_connection(
            direction="outbound",
            node=self.pi.state.node.name,
            src_workload=route.source.name if route else None,
            src_identity=route.source.identity.uri if route else None,
            client=self.client,
            original_dst=self.original_dst,
            dst_service=route.service.hostname if route and route.service else None,
            dst_workload=route.endpoint.workload if route else None,
            dst_identity=route.expected_identity.uri if route else None,
            dst_address=route.authority if route else None,
            dst_node=route.endpoint.node if route else None,
            bytes_sent=self.bytes_in,
            bytes_received=self.bytes_out,
            duration_ms=round((time.monotonic() - self.started) * 1000, 2),
            result="error" if self.error else "ok",
            reason=self.error,
        )
