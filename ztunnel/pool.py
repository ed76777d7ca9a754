"""Pooled HBONE connections: a new client connection costs a stream, not a TLS
handshake. Keyed by (source identity, peer node address, expected peer
identity), like Istio's ztunnel; one lock per key so that a burst of new
connections opens one TLS connection, not a hundred."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshnode.core.identity import SpiffeId
from meshnode.ztunnel import hbone
from meshnode.ztunnel.recheck import not_after
from meshnode.ztunnel.session import HboneSession
from meshnode.ztunnel.tls import TlsContexts, TlsError, peer_identity

log = logging.getLogger("meshnode.ztunnel.pool")


class ConnectError(Exception):
    """Could not reach or trust the peer node; the message says which and why."""


@dataclass(frozen=True, slots=True)
class PoolKey:
    source: SpiffeId
    peer: tuple[str, int]
    expected: SpiffeId
    sni: str = ""  # "" = the expected identity's SNI; a zone SNI through an ingress

    @property
    def server_name(self) -> str:
        return self.sni or self.expected.sni


class HbonePool:
    def __init__(
        self,
        tls: TlsContexts,
        *,
        connect_timeout: float = 5.0,
        idle_timeout: float = 300.0,
        max_streams: int = hbone.DEFAULT_MAX_STREAMS,
    ) -> None:
        self._tls = tls
        self._sessions: dict[PoolKey, list[HboneSession]] = {}
        self._locks: dict[PoolKey, asyncio.Lock] = {}
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_streams = max_streams
        self.handshakes = 0
        # Refuses a peer certificate (a deleted node's), set by the proxy per state.
        self.refuse: Callable[[bytes | None], str | None] | None = None
        self.retired = 0  # connections not reused past a certificate's expiry
        self.metrics: Any = None  # ProxyMetrics, set by the proxy

    def size(self) -> int:
        return sum(len(v) for v in self._sessions.values())

    def _find(self, key: PoolKey) -> HboneSession | None:
        # Never a closed, failed (keepalive timeout, GOAWAY with an error) or
        # draining (GOAWAY NO_ERROR, idle) connection: has_capacity() is False
        # for the last two.
        # Nor one past either end's certificate expiry: it is retired (closed
        # once its last stream ends) and a new one is dialled with fresh certs.
        now = time.time()
        for session in self._sessions.get(key, ()):
            if now >= session.valid_until:
                self._retire(key, session, "certificate expired")
                continue
            if session.usable and session.conn.has_capacity():
                return session
        return None

    def _retire(self, key: PoolKey, session: HboneSession, reason: str) -> None:
        self._drop(key, session)
        if not session.handlers:
            session.close(reason)
        else:
            session.conn.close(hbone.NO_ERROR, reason)  # GOAWAY: no new streams
            session.flush()
        self.retired += 1

    def sessions(self) -> list[HboneSession]:
        """Every pooled connection."""
        return [s for sessions in self._sessions.values() for s in sessions]

    def close_where(self, pred: Callable[[HboneSession], bool], reason: str) -> int:
        """Close the pooled connections `pred` selects (their streams are reset)."""
        n = 0
        for key, sessions in list(self._sessions.items()):
            for session in list(sessions):
                if pred(session):
                    self._drop(key, session)
                    session.close(reason)
                    n += 1
        return n

    async def session_for(self, key: PoolKey) -> HboneSession:
        session = self._find(key)
        if session is not None:
            return session
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            session = self._find(key)
            if session is None:
                session = await self._connect(key)
                self._sessions.setdefault(key, []).append(session)
            return session

    async def _connect(self, key: PoolKey) -> HboneSession:
        loop = asyncio.get_running_loop()
        try:
            ctx = self._tls.client_context(key.source)
        except TlsError as exc:
            raise ConnectError(str(exc)) from None
        host, port = key.peer

        def factory() -> HboneSession:
            limits = hbone.HboneLimits(
                max_concurrent_streams=self.max_streams, idle_timeout=self.idle_timeout
            )
            conn = hbone.HboneConnection(client_side=True, limits=limits)
            return HboneSession(conn, on_lost=lambda s: self._drop(key, s))

        started = time.monotonic()
        try:
            transport, session = await asyncio.wait_for(
                loop.create_connection(
                    factory,
                    host,
                    port,
                    ssl=ctx,
                    server_hostname=key.server_name,
                    ssl_handshake_timeout=self.connect_timeout,
                ),
                self.connect_timeout,
            )
        except TimeoutError:
            raise ConnectError(
                f"HBONE connect to {host}:{port} timed out after {self.connect_timeout:.0f}s"
            ) from None
        except OSError as exc:
            raise ConnectError(
                f"HBONE connect to {host}:{port} failed: {exc.strerror or exc}"
            ) from None
        except Exception as exc:  # ssl.SSLError and friends
            raise ConnectError(f"TLS handshake with {host}:{port} failed: {exc}") from None
        self.handshakes += 1
        if self.metrics is not None:
            self.metrics.handshake.observe(time.monotonic() - started)
        try:
            actual = peer_identity(transport.get_extra_info("ssl_object"))
        except TlsError as exc:
            transport.abort()
            raise ConnectError(f"peer {host}:{port}: {exc}") from None
        if actual != key.expected:
            transport.abort()
            raise ConnectError(
                f"peer {host}:{port} presented identity {actual}, expected {key.expected}; "
                "refusing to send traffic to it"
            )
        session.peer = actual
        session.local_identity = key.source
        ssl_object = transport.get_extra_info("ssl_object")
        session.peer_cert = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        refused = self.refuse(session.peer_cert) if self.refuse is not None else None
        if refused is not None:
            transport.abort()
            raise ConnectError(f"peer {host}:{port} ({actual}): {refused}")
        expiries = [self._tls.not_after(key.source)]
        if session.peer_cert is not None:
            expiries.append(not_after(session.peer_cert))
        session.valid_until = min(expiries)
        log.debug(
            "HBONE connection %s -> %s (%s) up in %.1f ms",
            key.source,
            key.expected,
            f"{host}:{port}",
            (time.monotonic() - started) * 1000,
        )
        return session

    def _drop(self, key: PoolKey, session: HboneSession) -> None:
        sessions = self._sessions.get(key)
        if sessions and session in sessions:
            sessions.remove(session)
            if not sessions:
                del self._sessions[key]
                self._locks.pop(key, None)

    def sweep(self, now: float | None = None) -> int:
        """Close connections idle (no streams) for longer than idle_timeout."""
        now = time.monotonic() if now is None else now
        closed = 0
        for sessions in list(self._sessions.values()):
            for session in list(sessions):
                if not session.handlers and now - session.last_active > self.idle_timeout:
                    session.close("idle")
                    closed += 1
        return closed

    async def run_sweeper(self, every: float = 30.0) -> None:
        while True:
            await asyncio.sleep(every)
            self.sweep()

    def close_all(self) -> None:
        for sessions in list(self._sessions.values()):
            for session in list(sessions):
                with contextlib.suppress(Exception):
                    session.close("shutting down")
        self._sessions.clear()
