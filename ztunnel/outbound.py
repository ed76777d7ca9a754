"""Outbound (15001): connections the BPF programs redirected here. Find the
original destination and the source workload, pick an endpoint (ZeroLB: this
node decides), and carry the bytes over a pooled HBONE tunnel to the
endpoint's node. Until the tunnel is up the client's bytes are held, not sent,
so a failed attempt can be retried on another endpoint safely."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from meshnode.ztunnel.accesslog import log_connection
from meshnode.ztunnel.pool import ConnectError, PoolKey
from meshnode.ztunnel.routing import Chooser, Route, RouteError, build_route
from meshnode.ztunnel.session import HboneSession, LocalPipe, PlainSide, reset_connection
from meshnode.ztunnel.state import Endpoint, Service

if TYPE_CHECKING:
    from meshnode.ztunnel.proxy import ProxyInputs

log = logging.getLogger("meshnode.ztunnel.outbound")

# HTTP statuses of a refused CONNECT after which another endpoint may work.
RETRYABLE_STATUS = {502, 503, 504}


class _AttemptFailed(Exception):
    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.retryable = retryable


class OutboundConnection(PlainSide):
    def __init__(self, pi: ProxyInputs) -> None:
        super().__init__()
        self.pi = pi
        self.route: Route | None = None
        self.established = False
        self.client = ""
        self.original_dst = ""
        self.attempts = 0
        self._setup: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._labels: tuple[str, ...] | None = None
        self._picked: Endpoint | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.ready = False  # hold the client's bytes until the tunnel is up
        self.pi.active.add(self)
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        self.client = f"{peer[0]}:{peer[1]}"
        orig = self.pi.original_destination(peer[0], peer[1], sock[0], sock[1])
        if orig is None:
            self._fail(
                f"no original destination recorded for {self.client} (not redirected by "
                "meshnode's BPF programs, or the record expired)",
                "no_original_dst",
            )
            return
        self.original_dst = f"{orig.ip}:{orig.port}"
        self._task = asyncio.get_running_loop().create_task(
            self._connect(orig.workload_id, orig.ip, orig.port)
        )

    # -- setting up the tunnel, with retries on other endpoints ------------------------

    async def _connect(self, workload_id: int, ip: str, port: int) -> None:
        pi = self.pi
        tried: set[tuple[str, int]] = set()
        last_error = ""
        for attempt in range(pi.config.connect_attempts):
            if self.finished:
                return
            try:
                route = build_route(pi.state, workload_id, ip, port, self._chooser(tried))
            except RouteError as exc:
                if attempt == 0:
                    self._fail(str(exc), "no_route")
                else:
                    self._fail(f"{last_error}; no other endpoint to try ({exc})", "connect")
                return
            self.route = route
            endpoint = route.endpoint
            key = (endpoint.address, endpoint.port)
            if attempt:
                pi.metrics.retries.inc((route.service.hostname if route.service else "",))
            self.attempts += 1
            started = time.monotonic()
            pi.picker.on_attempt(endpoint, started)
            try:
                await self._attempt(route)
            except _AttemptFailed as exc:
                pi.picker.on_done(endpoint)
                if exc.retryable:
                    pi.picker.on_failure(endpoint, time.monotonic())
                last_error = f"{route.authority} on {endpoint.node}: {exc}"
                tried.add(key)
                if not exc.retryable or route.service is None:
                    self._fail(last_error, "connect")
                    return
                log.info(
                    "outbound %s -> %s: attempt %d failed (%s); trying another endpoint",
                    self.client,
                    self.original_dst,
                    attempt + 1,
                    last_error,
                )
                continue
            pi.picker.on_success(endpoint, time.monotonic() - started, time.monotonic())
            self._picked = endpoint
            self._on_tunnel_up()
            return
        self._fail(f"gave up after {self.attempts} attempts; last: {last_error}", "connect")

    def _chooser(self, tried: set[tuple[str, int]]) -> Chooser:
        pi = self.pi

        def choose(service: Service, candidates: Sequence[Endpoint]) -> Endpoint:
            ep = pi.picker.pick(
                service,
                candidates,
                node=pi.state.node.name,
                zone=pi.state.node.zone,
                now=time.monotonic(),
                exclude=tried,
            )
            if ep is None:
                raise RouteError(f"every endpoint of {service.hostname} was tried")
            return ep

        return choose

    async def _attempt(self, route: Route) -> None:
        if route.same_node and self.pi.config.same_node_shortcut:
            await self._attempt_local(route)
            return
        pi = self.pi
        key = PoolKey(route.source.identity, route.next_hop, route.expected_identity, route.sni)
        try:
            session = await pi.pool.session_for(key)
        except ConnectError as exc:
            raise _AttemptFailed(str(exc), retryable=True) from None
        if self.finished or self.transport is None:
            raise _AttemptFailed("the client went away", retryable=False)
        src = route.source
        headers = [
            ("forwarded", f"for={self.client.rpartition(':')[0]}"),
            (
                "baggage",
                f"k8s.namespace.name={src.identity.namespace},"
                f"service.name={src.service},k8s.workload.name={src.name}",
            ),
        ]
        try:
            stream_id = session.open(route.authority, headers, self)
        except Exception as exc:  # LocalProtocolError: the connection filled up or ended
            raise _AttemptFailed(f"cannot open an HBONE stream: {exc}", retryable=True) from None
        self.session = session
        self.stream_id = stream_id
        self._setup = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._setup), pi.config.stream_timeout)
        except TimeoutError:
            self._unbind(session)
            raise _AttemptFailed(
                f"no answer to CONNECT within {pi.config.stream_timeout:.0f}s", retryable=True
            ) from None
        finally:
            self._setup = None

    async def _attempt_local(self, route: Route) -> None:
        """Same node: no TLS, no HTTP/2 -- but the same authorization, delivery
        from the inbound source address, metrics and access log as a
        connection that came over HBONE."""
        from meshnode.ztunnel.inbound import InboundConnection, authorize

        pi = self.pi
        ip, port = route.endpoint.address, route.endpoint.port
        workload = pi.state.find_local_by_addr(ip, port)
        if workload is None:
            raise _AttemptFailed(f"no local workload at {route.authority}", retryable=True)
        denied = authorize(pi, route.source.identity, workload, port)
        if denied is not None:
            raise _AttemptFailed(denied[1], retryable=False)
        pipe = LocalPipe()
        self.bind(pipe, LocalPipe.CLIENT)
        upstream = InboundConnection(pi, route.source.identity, workload, route.authority)
        upstream.bind(pipe, LocalPipe.WORKLOAD)
        self._setup = asyncio.get_running_loop().create_future()
        try:
            await upstream.connect(pipe, ip, port)
            await asyncio.wait_for(asyncio.shield(self._setup), pi.config.stream_timeout)
        finally:
            self._setup = None

    def _unbind(self, session: HboneSession) -> None:
        if self.session is session:
            session.reset(self.stream_id)
            self.session = None
            self.stream_id = 0

    def _resolve(self, exc: _AttemptFailed | None) -> bool:
        """During set-up, events answer the pending attempt; True if consumed."""
        fut = self._setup
        if fut is None or fut.done():
            return False
        if exc is None:
            fut.set_result(None)
        else:
            self.session = None
            fut.set_exception(exc)
        return True

    # -- events from the session -------------------------------------------------------------

    def on_established(self) -> None:
        self._resolve(None)

    def on_refused(self, status: int, reason: str) -> None:
        failed = _AttemptFailed(
            f"peer refused the tunnel: {status} {reason}".strip(),
            retryable=status in RETRYABLE_STATUS,
        )
        if not self._resolve(failed):
            self.on_reset(str(failed))

    def on_reset(self, reason: str) -> None:
        if self._resolve(_AttemptFailed(reason, retryable=True)):
            return
        super().on_reset(reason)

    def _on_tunnel_up(self) -> None:
        self.established = True
        route = self.route
        assert route is not None
        self._labels = self.pi.tcp_labels_outbound(route)
        self.pi.metrics.opened.inc(self._labels)
        self.release_held()

    # -- the end ---------------------------------------------------------------------------

    def _fail(self, reason: str, kind: str) -> None:
        if self.finished:
            return
        self.error = reason
        self.pi.metrics.failed.inc(("outbound", kind))
        if self.transport is not None:
            reset_connection(self.transport)  # RST: the client learns at once, nothing hangs
        self._finish()

    def on_finished(self) -> None:
        pi = self.pi
        pi.active.discard(self)
        if self._task is not None and not self._task.done() and self._setup is not None:
            self._task.cancel()
        if self._picked is not None:
            pi.picker.on_done(self._picked)
            self._picked = None
        if self._labels is not None:
            pi.metrics.closed.inc(self._labels)
            pi.metrics.sent.inc(self._labels, self.bytes_in)
            pi.metrics.received.inc(self._labels, self.bytes_out)
        route = self.route
        if self.error:
            log.warning("outbound %s -> %s failed: %s", self.client, self.original_dst, self.error)
        log_connection(
            direction="outbound",
            node=pi.state.node.name,
            src_workload=route.source.name if route else None,
            src_identity=route.source.identity.uri if route else None,
            client=self.client,
            original_dst=self.original_dst,
            dst_service=route.service.hostname if route and route.service else None,
            dst_workload=route.endpoint.workload if route else None,
            dst_identity=route.expected_identity.uri if route else None,
            dst_address=route.authority if route else None,
            dst_node=route.endpoint.node if route else None,
            attempts=self.attempts,
            bytes_sent=self.bytes_in,
            bytes_received=self.bytes_out,
            duration_ms=round((time.monotonic() - self.started) * 1000, 2),
            result="error" if self.error else "ok",
            reason=self.error,
        )
