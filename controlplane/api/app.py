"""The control-plane HTTPS server on aiohttp: TLS, the route table, start and stop.

Client certificates are optional at the TLS level; each route declares its auth
(routes.py), checked here before the handler runs and before the body is read.
The body is then read up to the route's cap (413 beyond it). aiohttp parses HTTP
(chunked bodies, repeated headers, header size limits, keep-alive).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import secrets
import signal
import socket
import ssl
import stat
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from meshnode.controlplane.ca import CertificateAuthority, RotatingCA
from meshnode.controlplane.console import Console
from meshnode.controlplane.metrics import parse_metrics_listen
from meshnode.controlplane.registry import ZONE_KIND, RegistryError
from meshnode.controlplane.reports import ReportBook
from meshnode.controlplane.store import Store, StoreError
from meshnode.controlplane.zonesync import ZoneSync, enroll_zone, parse_ingress
from meshnode.core import api
from meshnode.core.errors import ApiError
from meshnode.core.fsutil import write_file_atomic
from meshnode.core.identity import node_name_from_certificate, zone_of_controlplane_certificate
from meshnode.core.pki import generate_private_key, root_pin
from meshnode.core.token import TokenError

from .auth import Auth, admin_allowed, bearer_of, local_admin_allowed, node_of_certificate
from .gate import ConnectionLimits, Gate
from .messages import ControlPlaneConfig, Request, Response, json_response
from .routes import MAX_BODY, ROUTES, Route
from .state import StateCache
from .watch import Watch
from .zones import Zones, zone_of_certificate

__all__ = [
    "ADMIN_SOCKET_FILE",
    "ADMIN_TOKEN_FILE",
    "TRUST_BUNDLE_FILE",
    "ControlPlane",
    "default_db_url",
    "parse_duration",
    "run",
    "split_listen",
]

log = logging.getLogger("meshnode.controlplane")

ADMIN_TOKEN_FILE = "admin-token"
ADMIN_SOCKET_FILE = api.ADMIN_SOCKET_FILE
TRUST_BUNDLE_FILE = "trust-bundle.pem"
SERVER_CERT_TTL = timedelta(days=7)
MAX_LINE = 8190  # request line and each header line
MAX_HEADERS = 64

Endpoint = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _OneLine(logging.Filter):
    """aiohttp logs a malformed request (an expected failure) with its traceback;
    keep the message, drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()}: {record.exc_info[1]}".replace("\n", " ")
            record.args = ()
            record.exc_info = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


http_log = logging.getLogger("meshnode.controlplane.http")
http_log.addFilter(_OneLine())


def parse_duration(text: str) -> float:
    """``90``, ``30s``, ``15m``, ``24h``, ``7d`` -> seconds."""
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        scale = units.get(text[-1:], 0)
        value = float(text[:-1]) * scale if scale else float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (like 30s, 15m, 24h, 7d)") from None
    if value <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return value


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The request body, at most `limit` bytes (Content-Length or chunked)."""
    if limit <= 0:
        return b""  # the route takes no body; aiohttp discards what was sent
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(
            413, f"body of {request.content_length} bytes; this route takes at most {limit}"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body larger than {limit} bytes, this route's limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _to_web(response: Response) -> web.Response:
    if response.lines is not None:
        return web.Response(
            status=response.status,
            body=LinesPayload(response.lines, content_type=response.content_type),
        )
    if response.chunks:
        body = ChunksPayload(
            response.chunks, response.slots, response.owner, content_type=response.content_type
        )
        web_response = web.Response(status=response.status, body=body)
        web_response.force_close()
        return web_response
    return web.Response(
        status=response.status,
        body=response.body,
        content_type=response.content_type,
        headers=response.headers or None,
    )


class ChunksPayload(Payload):
    """A body written from shared pieces in slices, waiting for the socket to drain
    between them, so a large answer holds a bounded buffer per connection; with
    `slots`, only so many such bodies are written at once (the rest queue, first
    come first served)."""

    STEP = 256 * 1024
    # A reader that takes longer than this for one step is cut off: a node that
    # stops reading cannot hold a slot (and the others' full syncs) for ever.
    STEP_TIMEOUT = 30.0

    def __init__(
        self,
        chunks: tuple[bytes, ...],
        slots: asyncio.Semaphore | None,
        owner: tuple[set[str], str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(chunks, **kwargs)
        self._chunks = chunks
        self._slots = slots
        self._owner = owner  # (who is being written to now, who this is for)
        self._size = sum(len(c) for c in chunks)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._chunks).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        busy, who = self._owner if self._owner is not None else (set(), "")
        if who and who in busy:  # one at a time for each: nobody takes every slot
            raise ConnectionResetError(f"a full slice for {who} is already being written")
        busy.add(who)
        try:
            if self._slots is None:
                await self._write(writer)
                return
            async with self._slots:
                await self._write(writer)
        finally:
            busy.discard(who)

    async def _write(self, writer: AbstractStreamWriter) -> None:
        for chunk in self._chunks:
            view = memoryview(chunk)
            for start in range(0, len(view), self.STEP):
                async with asyncio.timeout(self.STEP_TIMEOUT):
                    await writer.write(view[start : start + self.STEP])
                    await writer.drain()


class LinesPayload(Payload):
    """A body of unknown length (chunked), written line by line as `lines` yields
    them (a streamed watch). A reader that leaves a line unread for STEP_TIMEOUT
    is cut off: its buffer stays bounded, and it reconnects when it wakes."""

    STEP_TIMEOUT = ChunksPayload.STEP_TIMEOUT

    def __init__(self, lines: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(b"", **kwargs)
        self._lines = lines

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return ""  # not known in advance

    async def write(self, writer: AbstractStreamWriter) -> None:
        transport = getattr(writer, "transport", None)
        try:
            async for line in self._lines:
                if transport is None or transport.get_write_buffer_size() or len(line) > 65536:
                    # the reader is behind, or the line is large: it gets STEP_TIMEOUT
                    async with asyncio.timeout(self.STEP_TIMEOUT):
                        await writer.write(line)
                        await writer.drain()
                else:  # the common case: the kernel takes it now
                    await writer.write(line)
        finally:
            await self._lines.aclose()  # type: ignore[attr-defined]


@web.middleware
async def _json_errors(request: web.Request, handler: Endpoint) -> web.StreamResponse:
    """The router's own 404/405 answered as ``{"error": ...}`` like every other error."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed:
        return _to_web(
            json_response(405, {"error": f"{request.method} is not allowed on {request.path}"})
        )
    except web.HTTPNotFound:
        hint = "" if request.path.startswith("/v1/") else " (the API lives under /v1)"
        return _to_web(json_response(404, {"error": f"no such endpoint {request.path}{hint}"}))


class ControlPlane(Watch, Zones):
    def __init__(self, store: Store, config: ControlPlaneConfig) -> None:
        self.store = store
        self.config = config
        self.cache = StateCache(store)
        self.cache.on_ca_change = self._ca_changed
        self.reports = ReportBook()  # the nodes' latest health reports, in memory
        self._runner: web.AppRunner | None = None
        self._local_runner: web.AppRunner | None = None
        self._gate: Gate | None = None
        self._verified_ca: _VerifiedCA | None = None
        self.limits = ConnectionLimits(config.max_connections_per_peer, config.max_connections)
        self._ssl: ssl.SSLContext | None = None
        self._current_ssl: ssl.SSLContext | None = None
        self._server_key = generate_private_key()
        self._server_cert_expiry = 0.0
        self._served_pins: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self.admin_token: str = ""
        self.port = 0
        self.zone_sync: ZoneSync | None = None  # mode "zone": the sync with the global

    # -- the application -------------------------------------------------------------

    def application(self, local: bool = False) -> web.Application:
        """The API over TLS; with `local`, the admin API alone, for the admin socket."""
        app = web.Application(client_max_size=MAX_BODY, middlewares=[_json_errors])
        for route in ROUTES:
            if local and route.auth not in (Auth.ADMIN, Auth.PUBLIC):
                continue
            app.router.add_route(route.method, route.path, self._endpoint(route, local))
        if not local:  # the read-only web console, under /ui/ (docs/console.md)
            Console(
                lambda: self.admin_token,
                self.cache,
                self.config.trust_domain,
                lambda: self.reports,
                cert_ttl=self.config.cert_ttl.total_seconds(),
                mode=self.config.mode,
                zone=self.config.zone,
                sync_status=lambda: self.zone_sync.status.to_json() if self.zone_sync else None,
            ).mount(app)
        return app

    def _endpoint(self, route: Route, local: bool = False) -> Endpoint:
        handler = getattr(self, route.handler)

        async def endpoint(request: web.Request) -> web.Response:
            started = time.monotonic()
            req = Request(
                request.method,
                request.path,
                {k: request.query.getall(k) for k in request.query},
                b"",
                "unix" if local else (request.remote or "?"),
                None if local else _peer_certificate(request),
            )
            req.identity = req.peer_ip
            try:
                args = await self._authenticate(route.auth, req, request, local)
                req.body = await read_body(request, route.max_body)
                response = await handler(req, *args, **request.match_info)
            except ApiError as exc:
                response = json_response(exc.status, {"error": exc.message})
            except (RegistryError, TokenError) as exc:
                response = json_response(exc.status, {"error": str(exc)})
            except StoreError as exc:
                log.warning("database error: %s", exc)
                response = json_response(
                    503, {"error": f"database unavailable: {exc}; retry shortly"}
                )
            except Exception:
                log.exception("internal error on %s %s", req.method, req.path)
                response = json_response(
                    500, {"error": "internal error; see the control plane log"}
                )
            # A watch answered is routine (ten thousand nodes: ten thousand lines a
            # change); everything else, and every failure, is logged at info.
            routine = response.status == 200 and route.handler in (
                "get_node_config",
                "get_zone_config",
            )
            log.log(
                logging.DEBUG if routine else logging.INFO,
                "%s %s peer=%s status=%d %.1fms",
                req.method,
                req.path,
                req.identity,
                response.status,
                (time.monotonic() - started) * 1000,
            )
            self.metrics.observe_request(
                route.method, route.path, response.status, time.monotonic() - started
            )
            return _to_web(response)

        return endpoint

    async def _authenticate(
        self, auth: Auth, req: Request, request: web.Request, local: bool = False
    ) -> tuple[str, ...]:
        """Check the route's declared auth; the node's name for node routes."""
        if auth is Auth.NODE:
            ca = self._ca()
            cert = req.peer_cert
            if cert is not None:
                claimed = node_name_from_certificate(cert, self.config.trust_domain)
                if claimed is not None and claimed not in self.cache.registry.nodes:
                    await self.cache.refresh()  # enrolled a moment ago, maybe elsewhere
            name = node_of_certificate(
                cert, self.config.trust_domain, self._verified(ca), self.cache.registry.nodes
            )
            req.identity = f"node/{name}"
            return (name,)
        if auth is Auth.ZONE:
            self._global_only()
            ca = self._ca()
            zones = self.cache.registry.internal(ZONE_KIND)
            cert = req.peer_cert
            claimed = zone_of_controlplane_certificate(cert, ca.trust_domain) if cert else None
            if claimed is not None and claimed not in zones:
                await self.cache.refresh()  # enrolled a moment ago, maybe elsewhere
                zones = self.cache.registry.internal(ZONE_KIND)
            zone = zone_of_certificate(req.peer_cert, self.config.trust_domain, ca, zones)
            req.identity = f"zone/{zone}"
            return (zone,)
        if auth is Auth.ADMIN and local:
            uid = _peer_uid(request)
            if not local_admin_allowed(uid, os.getuid()):
                raise ApiError(
                    403,
                    f"uid {uid} may not use the admin socket: only root and the control "
                    "plane's own user may",
                )
            req.identity = f"admin@uid:{uid}"
        elif auth is Auth.ADMIN:
            authorization = bearer_of(request.headers.getall("Authorization", []))
            hashes: set[str] = set()
            if authorization:
                hashes = await asyncio.to_thread(self.store.admin_token_hashes)
            if not admin_allowed(authorization, hashes):
                raise ApiError(
                    401,
                    "the admin API needs 'Authorization: Bearer <admin token>' (the token is "
                    f"in {self.config.data_dir / ADMIN_TOKEN_FILE} on the control plane host); "
                    f"there, root may use the socket {self.config.admin_socket_path} instead "
                    "(the meshnode CLI does both by itself)",
                )
            req.identity = f"admin@{req.peer_ip}"
        # PUBLIC needs nothing; TOKEN is the join token in the body, which the
        # store checks and consumes atomically with the enrollment.
        return ()

    # -- life cycle -------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if cfg.mode == "zone":  # the zone's CA comes from the global (zonesync.py)
            await enroll_zone(
                self.store, cfg.zone, cfg.global_url, cfg.global_token, cfg.trust_domain
            )
        ca = await asyncio.to_thread(
            self.store.ensure_ca, lambda: CertificateAuthority.create(cfg.trust_domain)
        )
        if cfg.mode == "zone" and ca.active.holds_root_key:
            raise StoreError(
                f"the database holds a CA of its own, not one issued by a global control "
                f"plane: a zone control plane needs a database of its own (zone {cfg.zone})"
            )
        if ca.trust_domain != cfg.trust_domain:
            raise StoreError(
                f"the database holds a CA for trust domain {ca.trust_domain!r}, not "
                f"{cfg.trust_domain!r}; start with --trust-domain {ca.trust_domain}"
            )
        self.admin_token = await asyncio.to_thread(self._ensure_admin_token)
        await self.cache.refresh()
        self._current_ssl = self._make_ssl()
        # The listening context only hands each handshake to the current one, so a
        # CA rotation (new server certificate, new bundle) needs no restart.
        self._ssl = self._make_ssl()
        self._ssl.sni_callback = self._pick_context
        runner = web.AppRunner(
            self.application(),
            access_log=None,
            logger=http_log,
            keepalive_timeout=cfg.header_timeout,
            max_line_size=MAX_LINE,
            max_field_size=MAX_LINE,
            max_headers=MAX_HEADERS,
            shutdown_timeout=cfg.shutdown_grace,
        )
        await runner.setup()
        self._runner = runner
        # Our own listener: each connection is counted (per peer, in total) before
        # any TLS work, then upgraded and handed to aiohttp (gate.py).
        server_factory = runner.server
        assert server_factory is not None
        self._gate = Gate(self.limits, server_factory, self._ssl, cfg.handshake_timeout)
        self.port = self._gate.listen(host, port)
        await self._start_admin_socket()
        if cfg.metrics_listen:  # plain HTTP, no auth (controlplane/metrics.py)
            cache = self.cache
            await self.metrics.serve(
                *parse_metrics_listen(cfg.metrics_listen),
                lambda: self.metrics.observe_state(cache.revision, cache.registry),
            )
        self._spawn(self._watch_loop())
        if cfg.mode == "zone":
            ingress = parse_ingress(cfg.zone_ingress) if cfg.zone_ingress else None
            self.zone_sync = ZoneSync(
                self.store, self.cache, cfg.zone, cfg.global_url, ingress, lambda: self._stopping
            )
            self._spawn(self.zone_sync.run())
        log.info(
            "control plane serving on %s:%d (trust domain %s, revision %d)",
            host,
            self.port,
            cfg.trust_domain,
            self.cache.revision,
        )

    async def stop(self) -> None:
        """Stop accepting, answer waiting long polls, give requests in flight
        ``config.shutdown_grace`` seconds, then close every connection."""
        self._stopping = True
        self.cache.changed.notify_all()
        if self._gate is not None:
            await self._gate.close()  # accept no more
        if self._runner is not None:
            await self._runner.cleanup()
        if self._local_runner is not None:
            await self._local_runner.cleanup()
            with contextlib.suppress(OSError):
                self.config.admin_socket_path.unlink()
        await self.metrics.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _start_admin_socket(self) -> None:
        """The admin API on a Unix socket for root on this host (mode 0600; the
        kernel tells who calls, SO_PEERCRED). Without it, admin needs the token."""
        path = self.config.admin_socket_path
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()  # left by a control plane that stopped without cleanup
        runner = web.AppRunner(
            self.application(local=True),
            access_log=None,
            logger=http_log,
            keepalive_timeout=self.config.header_timeout,
            max_line_size=MAX_LINE,
            max_field_size=MAX_LINE,
            max_headers=MAX_HEADERS,
            shutdown_timeout=self.config.shutdown_grace,
        )
        await runner.setup()
        old = os.umask(0o177)  # born 0600: never a moment open to others
        try:
            await web.UnixSite(runner, str(path)).start()
        except OSError as exc:
            await runner.cleanup()
            log.warning(
                "no admin socket at %s (%s): local admin needs the admin token; use a "
                "shorter --data-dir if the path is too long",
                path,
                exc.strerror or exc,
            )
            return
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._local_runner = runner
        log.info("admin socket %s (root only)", path)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch_loop(self) -> None:
        """Refresh the cache on every commit signal, and at least every second."""
        while not self._stopping:
            try:
                await asyncio.to_thread(self.store.wait_for_change, 1.0)
                await self.cache.refresh()
                # Half-life renewal, and a root retiring at the end of an overlap.
                ca = self.cache.ca
                if time.time() > self._server_cert_expiry or (
                    ca is not None and self._trusted_pins(ca) != self._served_pins
                ):
                    self._current_ssl = self._make_ssl()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be away for a while
                log.warning("cannot refresh state from the database: %s", exc)
                await asyncio.sleep(1.0)

    def _ensure_admin_token(self) -> str:
        path = self.config.data_dir / ADMIN_TOKEN_FILE
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            token = ""
        if not token:
            token = secrets.token_hex(32)
            write_file_atomic(path, token.encode() + b"\n", 0o600)
            print(
                f"admin token written to {path} (mode 0600). Remote admin use:\n"
                f"  export MESHNODE_ADMIN_TOKEN=$(cat {path})   # or --admin-token-file {path}",
                flush=True,
            )
        self.store.add_admin_token_hash(hashlib.sha256(token.encode()).hexdigest(), time.time())
        return token

    # -- TLS ----------------------------------------------------------------------------

    def _make_ssl(self) -> ssl.SSLContext:
        ca = self._ca()
        names = ["localhost", socket.gethostname()]
        ips = ["127.0.0.1", "::1", *self.config.advertise]
        self._served_pins = self._trusted_pins(ca)
        chain = ca.serving().issue_controlplane_certificate(
            self._server_key, names, ips, SERVER_CERT_TTL
        )
        self._server_cert_expiry = time.time() + SERVER_CERT_TTL.total_seconds() / 2
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cadata=ca.trust_bundle_pem().decode())
        key_pem = self._server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # load_cert_chain reads files only; a private temp dir, removed at once.
        with tempfile.TemporaryDirectory() as tmp:
            cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            write_file_atomic(cert_path, chain, 0o600)
            write_file_atomic(key_path, key_pem, 0o600)
            ctx.load_cert_chain(cert_path, key_path)
        with contextlib.suppress(OSError):
            write_file_atomic(
                self.config.data_dir / TRUST_BUNDLE_FILE, ca.trust_bundle_pem(), 0o644
            )
        return ctx

    @staticmethod
    def _trusted_pins(ca: RotatingCA) -> list[str]:
        return [
            root_pin(c.root_certificate.public_bytes(serialization.Encoding.DER))
            for c in ca.trusted()
        ]

    def _pick_context(
        self, sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext
    ) -> None:
        if self._current_ssl is not None:
            sock.context = self._current_ssl

    def _verified(self, ca: RotatingCA) -> _VerifiedCA:
        """`ca`, remembering which certificates it verified (a signature check once
        per certificate and CA set, not once per long poll; the validity dates are
        still checked each time)."""
        if self._verified_ca is None or self._verified_ca.ca is not ca:
            self._verified_ca = _VerifiedCA(ca)
        return self._verified_ca

    def _ca_changed(self) -> None:
        if self._ssl is not None:
            self._current_ssl = self._make_ssl()


def _peer_uid(request: web.BaseRequest) -> int | None:
    """The uid of the process at the other end of a Unix socket, from the kernel."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _peer_certificate(request: web.BaseRequest) -> x509.Certificate | None:
    """The client certificate the TLS layer verified against the bundle, if any
    (parsed once per certificate: a watch asks again on the same connection)."""
    transport = request.transport
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    return _parsed(der) if der else None


@functools.lru_cache(maxsize=32768)
def _parsed(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


class _VerifiedCA:
    """:meth:`RotatingCA.verify_leaf` with its signature checks remembered for a
    minute (a root retires by the clock, not only when the CA set changes)."""

    MAX = 32768
    RECHECK = 60.0

    def __init__(self, ca: RotatingCA) -> None:
        self.ca = ca
        self._ok: dict[bytes, tuple[bool, float]] = {}

    def verify_leaf(self, leaf: x509.Certificate) -> bool:
        now = datetime.now(UTC)
        if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
            return False
        key = leaf.fingerprint(hashes.SHA256())
        mono = time.monotonic()
        hit = self._ok.get(key)
        if hit is not None and mono - hit[1] < self.RECHECK:
            return hit[0]
        if len(self._ok) >= self.MAX:
            self._ok.clear()
        ok = self.ca.verify_leaf(leaf)
        self._ok[key] = (ok, mono)
        return ok


# --- entry point --------------------------------------------------------------------


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT, e.g. 0.0.0.0:15012")
    return host.strip("[]"), int(port)


async def run(
    store: Store,
    config: ControlPlaneConfig,
    listen: str,
    ready: Callable[[ControlPlane], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    host, port = split_listen(listen)
    cp = ControlPlane(store, config)
    await cp.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready(cp)
    await stop.wait()
    log.info("shutting down")
    await cp.stop()
    await asyncio.to_thread(store.close)


def default_db_url(data_dir: Path) -> str:
    return f"sqlite://{os.path.abspath(data_dir / 'cp.db')}"
