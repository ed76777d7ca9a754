"""The control-plane HTTPS server (docs/protocol.md, "Control plane API").

A small HTTP/1.1 server (keep-alive, Content-Length bodies) over asyncio TLS 1.3.
Client certificates are optional at the TLS level and enforced per route:
``/v1/node/*`` needs a node certificate of a registered node, ``/v1/enroll`` a join
token, ``/v1/admin/*`` a loopback peer or ``Authorization: Bearer <admin token>``.

State lives in the :class:`~meshnode.controlplane.store.Store`; this process keeps a
:class:`StateCache` (registry, change log tail, CA) refreshed whenever the store
signals a commit (ours, or another replica's via NOTIFY) and at least every second.
Long-poll watchers sleep on the cache's condition, so one commit costs one read of
the database however many nodes watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshnode.controlplane import registry as reg
from meshnode.controlplane.ca import CAError, CertificateAuthority, RotatingCA
from meshnode.controlplane.registry import Change, Registry, RegistryError
from meshnode.controlplane.store import KEEP_REVISIONS, CARow, Store, StoreError, rotating_ca
from meshnode.controlplane.tokens import DEFAULT_TOKEN_TTL, make_token
from meshnode.core.fsutil import write_file_atomic
from meshnode.core.identity import IdentityError, SpiffeId, node_name_from_certificate
from meshnode.core.pki import generate_private_key, root_pin
from meshnode.core.resources import (
    KINDS,
    ResourceError,
    parse_documents,
    resources_to_json,
)
from meshnode.core.token import TokenError, parse_token

__all__ = [
    "ADMIN_TOKEN_FILE",
    "TRUST_BUNDLE_FILE",
    "ApiError",
    "ControlPlane",
    "ControlPlaneConfig",
    "admin_allowed",
    "is_loopback",
    "run",
]

log = logging.getLogger("meshnode.controlplane")

ADMIN_TOKEN_FILE = "admin-token"
TRUST_BUNDLE_FILE = "trust-bundle.pem"
MAX_WAIT = 60.0
MAX_BODY = 4 << 20
SERVER_CERT_TTL = timedelta(days=7)
IDLE_TIMEOUT = 75.0


class ApiError(Exception):
    """An expected failure: answered as ``{"error": message}`` with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    peer_ip: str
    peer_cert: x509.Certificate | None
    identity: str = "-"  # for the request log

    def json(self) -> dict[str, Any]:
        try:
            data = json.loads(self.body or b"{}")
        except ValueError as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        return data

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"


def json_response(status: int, body: Any) -> Response:
    return Response(status, json.dumps(body, indent=1).encode() + b"\n")


_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized",
            403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            409: "Conflict", 413: "Payload Too Large", 500: "Internal Server Error",
            503: "Service Unavailable", 507: "Insufficient Storage"}  # fmt: skip


# --- auth helpers (pure) ------------------------------------------------------------


def is_loopback(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def admin_allowed(
    peer_ip: str,
    authorization: str | None,
    token_hashes: set[str],
    trusted_peer: Callable[[str], bool] = is_loopback,
) -> bool:
    """May this request use /v1/admin? A trusted (loopback) peer, or a Bearer token
    whose SHA-256 is one of `token_hashes` (compared in constant time)."""
    if trusted_peer(peer_ip):
        return True
    if not authorization or not authorization.startswith("Bearer "):
        return False
    presented = hashlib.sha256(authorization[len("Bearer ") :].strip().encode()).hexdigest()
    ok = False
    for h in token_hashes:
        ok |= hmac.compare_digest(presented, h)
    return ok


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


# --- the cache of what the store holds ---------------------------------------------


class StateCache:
    """The registry at `revision`, the change log after `floor`, and the CA set."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.revision = -1
        self.floor = 0
        self.registry = Registry()
        self.log: list[Change] = []
        self.ca: RotatingCA | None = None
        self._ca_rows: list[CARow] = []
        self._lock = asyncio.Lock()
        self.changed = asyncio.Condition()
        self.on_ca_change: Callable[[], None] = lambda: None

    async def refresh(self) -> None:
        """Catch up with the store (cheap when nothing changed: one SELECT)."""
        async with self._lock:
            current = await asyncio.to_thread(self._store.revision)
            if current == self.revision:
                return
            after = None if self.revision < 0 else self.revision
            state = await asyncio.to_thread(self._store.read_state, after)
            if after is None or state.floor > self.revision:
                self.log = state.changes
                self.floor = state.floor
            else:
                self.log.extend(state.changes)
            cut = state.revision - KEEP_REVISIONS
            if cut > self.floor:
                self.log = [c for c in self.log if c.revision > cut]
                self.floor = cut
            self.registry = state.registry
            self.revision = state.revision
            if state.ca and state.ca != self._ca_rows:
                self._ca_rows = state.ca
                self.ca = rotating_ca(state.ca)
                self.on_ca_change()
        async with self.changed:
            self.changed.notify_all()


# --- the server ---------------------------------------------------------------------


@dataclass
class ControlPlaneConfig:
    trust_domain: str = "cluster.local"
    cert_ttl: timedelta = timedelta(hours=24)
    advertise: list[str] = field(default_factory=list)
    data_dir: Path = Path("/var/lib/meshnode-cp")
    # Which peers may use /v1/admin without a token; tests replace it to exercise
    # the Bearer path (every address a test can bind is loopback).
    trusted_peer: Callable[[str], bool] = is_loopback


Handler = Callable[[Request], Awaitable[Response]]


class ControlPlane:
    def __init__(self, store: Store, config: ControlPlaneConfig) -> None:
        self.store = store
        self.config = config
        self.cache = StateCache(store)
        self.cache.on_ca_change = self._ca_changed
        self._server: asyncio.Server | None = None
        self._ssl: ssl.SSLContext | None = None
        self._current_ssl: ssl.SSLContext | None = None
        self._server_key = generate_private_key()
        self._server_cert_expiry = 0.0
        self._served_pins: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connections: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self.admin_token: str = ""
        self.port = 0

    # -- life cycle -------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca = await asyncio.to_thread(
            self.store.ensure_ca, lambda: CertificateAuthority.create(cfg.trust_domain)
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
        self._server = await asyncio.start_server(
            self._connection, host or None, port, ssl=self._ssl, reuse_address=True,
            ssl_handshake_timeout=10,
        )  # fmt: skip
        self.port = self._server.sockets[0].getsockname()[1]
        self._spawn(self._watch_loop())
        log.info("control plane serving on %s:%d (trust domain %s, revision %d)",
                 host, self.port, cfg.trust_domain, self.cache.revision)  # fmt: skip

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, answer waiting long polls, give requests `grace` seconds."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        async with self.cache.changed:
            self.cache.changed.notify_all()
        if self._connections:
            _, pending = await asyncio.wait(set(self._connections), timeout=grace)
            for task in pending:
                task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._connections, return_exceptions=True)

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
        return [root_pin(c.root_certificate.public_bytes(serialization.Encoding.DER))
                for c in ca.trusted()]  # fmt: skip

    def _pick_context(
        self, sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext
    ) -> None:
        if self._current_ssl is not None:
            sock.context = self._current_ssl

    def _ca_changed(self) -> None:
        if self._ssl is not None:
            self._current_ssl = self._make_ssl()

    def _ca(self) -> RotatingCA:
        if self.cache.ca is None:
            raise ApiError(503, "the CA is not loaded yet; retry in a second")
        return self.cache.ca

    # -- HTTP ---------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await self._serve_connection(reader, writer)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        sslobj = writer.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        cert = x509.load_der_x509_certificate(der) if der else None
        while not self._stopping:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
            except asyncio.LimitOverrunError:
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                return
            method, target, _ = parts
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                return
            started = time.monotonic()
            url = urlsplit(target)
            request = Request(method, unquote(url.path), parse_qs(url.query), headers, b"",
                              str(peer[0]), cert)  # fmt: skip
            if length > MAX_BODY:
                response = json_response(413, {"error": f"body larger than {MAX_BODY} bytes"})
                keep = False
            else:
                request.body = await asyncio.wait_for(reader.readexactly(length), 30)
                response = await self._dispatch(request)
                keep = headers.get("connection", "").lower() != "close"
            ms = (time.monotonic() - started) * 1000
            log.info("%s %s peer=%s status=%d %.1fms", method, url.path, request.identity,
                     response.status, ms)  # fmt: skip
            reason = _REASONS.get(response.status, "")
            writer.write(
                f"HTTP/1.1 {response.status} {reason}\r\n"
                f"Content-Type: {response.content_type}\r\n"
                f"Content-Length: {len(response.body)}\r\n"
                f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n".encode()
                + response.body
            )
            await writer.drain()
            if not keep:
                return

    async def _dispatch(self, req: Request) -> Response:
        req.identity = req.peer_ip
        try:
            handler, args = self._route(req)
            return await handler(req, *args)
        except ApiError as exc:
            return json_response(exc.status, {"error": exc.message})
        except (RegistryError, TokenError) as exc:
            return json_response(exc.status, {"error": str(exc)})
        except StoreError as exc:
            log.warning("database error: %s", exc)
            return json_response(503, {"error": f"database unavailable: {exc}; retry shortly"})
        except Exception:
            log.exception("internal error on %s %s", req.method, req.path)
            return json_response(500, {"error": "internal error; see the control plane log"})

    def _route(self, req: Request) -> tuple[Callable[..., Awaitable[Response]], tuple[str, ...]]:
        m, parts = req.method, [p for p in req.path.split("/") if p]
        if parts[:1] != ["v1"]:
            raise ApiError(404, f"no such endpoint {req.path} (the API lives under /v1)")
        p = parts[1:]
        table: list[tuple[str, list[str], Callable[..., Awaitable[Response]]]] = [
            ("GET", ["trust-bundle"], self.get_trust_bundle),
            ("POST", ["enroll"], self.post_enroll),
            ("GET", ["node", "config"], self.get_node_config),
            ("POST", ["node", "workloads"], self.post_node_workload),
            ("DELETE", ["node", "workloads", "*"], self.delete_node_workload),
            ("POST", ["node", "certificates"], self.post_node_certificate),
            ("POST", ["node", "renew"], self.post_node_renew),
            ("POST", ["admin", "tokens"], self.post_admin_token),
            ("POST", ["admin", "resources"], self.post_admin_resources),
            ("GET", ["admin", "resources"], self.get_admin_resources),
            ("DELETE", ["admin", "resources", "*", "*", "*"], self.delete_admin_resource),
            ("GET", ["admin", "nodes"], self.get_admin_nodes),
            ("DELETE", ["admin", "nodes", "*"], self.delete_admin_node),
            ("GET", ["admin", "services"], self.get_admin_services),
            ("GET", ["admin", "workloads"], self.get_admin_workloads),
            ("DELETE", ["admin", "workloads", "*", "*"], self.delete_admin_workload),
            ("POST", ["admin", "ca", "rotate"], self.post_admin_rotate),
        ]
        path_known = False
        for method, pattern, fn in table:
            if len(pattern) == len(p) and all(
                a in ("*", b) for a, b in zip(pattern, p, strict=True)
            ):
                path_known = True
                if method == m:
                    args = tuple(b for a, b in zip(pattern, p, strict=True) if a == "*")
                    if p[0] == "admin":
                        return self._admin(fn), args
                    if p[0] == "node":
                        return self._node(fn), args
                    return fn, args
        if path_known:
            raise ApiError(405, f"{m} is not allowed on {req.path}")
        raise ApiError(404, f"no such endpoint {req.path}")

    # -- per-route authentication ---------------------------------------------------------

    def _admin(self, fn: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        async def guarded(req: Request, *args: str) -> Response:
            auth = req.headers.get("authorization")
            hashes: set[str] = set()
            if auth and not self.config.trusted_peer(req.peer_ip):
                hashes = await asyncio.to_thread(self.store.admin_token_hashes)
            if not admin_allowed(req.peer_ip, auth, hashes, self.config.trusted_peer):
                raise ApiError(
                    401,
                    "the admin API is open to localhost only, or with 'Authorization: Bearer "
                    f"<admin token>' (the token is in {self.config.data_dir / ADMIN_TOKEN_FILE} "
                    "on the control plane host)",
                )
            req.identity = f"admin@{req.peer_ip}"
            return await fn(req, *args)

        return guarded

    def _node(self, fn: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
        async def guarded(req: Request, *args: str) -> Response:
            name = await self.node_of(req)
            req.identity = f"node/{name}"
            return await fn(req, name, *args)

        return guarded

    async def node_of(self, req: Request) -> str:
        """The registered node that made this request, from its verified certificate."""
        if req.peer_cert is None:
            raise ApiError(
                401,
                "the node API needs the node's client certificate (from `meshnode enroll`)",
            )
        ca = self._ca()
        name = node_name_from_certificate(req.peer_cert, self.config.trust_domain)
        if name is None:
            raise ApiError(
                403,
                "the client certificate is not a node certificate of trust domain "
                f"{self.config.trust_domain} (expected URI SAN spiffe://"
                f"{self.config.trust_domain}/node/<name>)",
            )
        if not ca.verify_leaf(req.peer_cert):
            raise ApiError(
                403, f"the certificate of node {name} is expired or from a retired CA; re-enroll"
            )
        await self.cache.refresh()
        if name not in self.cache.registry.nodes:
            raise ApiError(
                403, f"node {name} is not registered (deleted?); enroll it again with a new token"
            )
        return name

    # -- public ---------------------------------------------------------------------------

    async def get_trust_bundle(self, req: Request) -> Response:
        ca = self._ca()
        return json_response(200, {"trust_domain": ca.trust_domain,
                                   "trust_bundle": ca.trust_bundle_pem().decode()})  # fmt: skip

    async def post_enroll(self, req: Request) -> Response:
        body = req.json()
        ca = self._ca()
        token = parse_token(body.get("token", ""))
        try:
            name = reg.check_label(body.get("name"), "name")
            zone = body.get("zone", "") or ""
            if zone:
                reg.check_label(zone, "zone")
            ip = reg.check_ip(body.get("ip") or req.peer_ip, "ip")
        except RegistryError as exc:
            raise ApiError(400, str(exc)) from None
        csr = body.get("csr")
        if not isinstance(csr, str):
            raise ApiError(400, "csr: missing; send a PEM P-256 CSR made on the node")
        try:  # sign first: a bad CSR must not consume the token
            chain = ca.active.issue_node_certificate(csr.encode(), name, self.config.cert_ttl)
        except CAError as exc:
            raise ApiError(400, f"csr: {exc}") from None
        revision, node = await asyncio.to_thread(
            self.store.enroll, token, name, zone, ip, time.time()
        )
        await self.cache.refresh()
        req.identity = f"enroll/{name}"
        return json_response(200, {
            "certificate": chain.decode(),
            "trust_bundle": ca.trust_bundle_pem().decode(),
            "trust_domain": ca.trust_domain,
            "node": node.to_dict(),
            "revision": revision,
        })  # fmt: skip

    # -- node API -------------------------------------------------------------------------

    async def get_node_config(self, req: Request, node: str) -> Response:
        try:
            since = int(req.arg("since")) if req.arg("since") is not None else None  # type: ignore[arg-type]
            wait = min(float(req.arg("wait") or 0), MAX_WAIT)
        except ValueError:
            raise ApiError(
                400, "since must be an integer revision and wait a number of seconds"
            ) from None
        deadline = time.monotonic() + max(wait, 0.0)
        cache = self.cache
        while True:
            if node not in cache.registry.nodes:
                raise ApiError(403, f"node {node} was removed from the registry; enroll again")
            changes = (
                None if since is None
                else reg.changes_since(cache.log, cache.floor, since, node, cache.revision)
            )  # fmt: skip
            if changes is None:
                return json_response(200, self._full_slice(node))
            if changes:
                return json_response(200, {"revision": cache.revision, "full": False,
                                           "changes": changes})  # fmt: skip
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping:
                if since == cache.revision or wait > 0:
                    return json_response(200, {"revision": cache.revision, "unchanged": True})
                return json_response(200, {"revision": cache.revision, "full": False,
                                           "changes": []})  # fmt: skip
            await self._wait_change(cache.revision, remaining)

    async def _wait_change(self, seen: int, timeout: float) -> None:
        """Sleep until the cached revision moves past `seen`, shutdown, or `timeout`."""
        cache = self.cache
        async with cache.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    cache.changed.wait_for(lambda: cache.revision != seen or self._stopping),
                    timeout,
                )

    def _full_slice(self, node: str) -> dict[str, Any]:
        c = self.cache
        return reg.node_slice(c.registry, node, c.revision, self.config.trust_domain,
                              self._ca().trust_bundle_pem().decode())  # fmt: skip

    async def post_node_workload(self, req: Request, node: str) -> Response:
        body = req.json()
        try:
            wl = reg.workload_from_request(node, body)
        except RegistryError as exc:
            raise ApiError(400, f"workload: {exc}") from None
        revision, _ = await asyncio.to_thread(
            self.store.mutate, lambda tx, r, rev: (reg.put_workload(r, wl), None)
        )
        await self.cache.refresh()
        return json_response(200, {"revision": revision, "workload": wl.slice_dict()})

    async def delete_node_workload(self, req: Request, node: str, name: str) -> Response:
        revision, _ = await asyncio.to_thread(
            self.store.mutate, lambda tx, r, rev: (reg.delete_workload(r, node, name), None)
        )
        await self.cache.refresh()
        return json_response(200, {"revision": revision, "deleted": name})

    async def post_node_certificate(self, req: Request, node: str) -> Response:
        body = req.json()
        ns, sa, csr = body.get("namespace"), body.get("service_account"), body.get("csr")
        if not isinstance(csr, str):
            raise ApiError(400, "csr: missing; send a PEM P-256 CSR")
        try:
            identity = SpiffeId(self.config.trust_domain, str(ns), str(sa))
        except IdentityError as exc:
            raise ApiError(400, f"namespace/service_account: {exc}") from None
        hosted = any(
            w.node == node and w.namespace == ns and w.service_account == sa
            for w in self.cache.registry.workloads.values()
        )
        if not hosted:
            raise ApiError(
                403,
                f"node {node} hosts no workload with identity {identity.uri}; register the "
                "workload on this node (POST /v1/node/workloads) before asking for its "
                "certificate",
            )
        ca = self._ca()
        try:
            chain = ca.active.issue_workload_certificate(
                csr.encode(), identity, self.config.cert_ttl
            )
        except CAError as exc:
            raise ApiError(400, f"csr: {exc}") from None
        return json_response(200, {"certificate": chain.decode(),
                                   "trust_bundle": ca.trust_bundle_pem().decode()})  # fmt: skip

    async def post_node_renew(self, req: Request, node: str) -> Response:
        csr = req.json().get("csr")
        if not isinstance(csr, str):
            raise ApiError(400, "csr: missing; send a PEM P-256 CSR")
        ca = self._ca()
        try:
            chain = ca.active.issue_node_certificate(csr.encode(), node, self.config.cert_ttl)
        except CAError as exc:
            raise ApiError(400, f"csr: {exc}") from None
        return json_response(200, {"certificate": chain.decode(),
                                   "trust_bundle": ca.trust_bundle_pem().decode()})  # fmt: skip

    # -- admin API ------------------------------------------------------------------------

    async def post_admin_token(self, req: Request) -> Response:
        body = req.json()
        try:
            node = reg.check_label(body.get("node"), "node")
            zone = body.get("zone", "") or ""
            if zone:
                reg.check_label(zone, "zone")
        except RegistryError as exc:
            raise ApiError(400, str(exc)) from None
        ttl = body.get("ttl_seconds", DEFAULT_TOKEN_TTL)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0:
            raise ApiError(400, f"ttl_seconds: {ttl!r} must be a positive number")
        # The pin names the root the server's chain ends in (see RotatingCA.serving).
        pin = root_pin(
            self._ca().serving().root_certificate.public_bytes(serialization.Encoding.DER)
        )
        token, record = make_token(node, zone, float(ttl), pin, time.time())
        await asyncio.to_thread(self.store.create_token, record)
        return json_response(200, {"token": token, "expires_at": record.expires_at,
                                   "node": node, "zone": zone})  # fmt: skip

    async def post_admin_resources(self, req: Request) -> Response:
        try:
            text = req.body.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "the resources must be UTF-8 YAML") from None
        source = req.arg("source") or "request"
        try:
            docs = resources_to_json(parse_documents(text, source=source))
        except ResourceError as exc:
            raise ApiError(400, str(exc)) from None
        if not docs:
            raise ApiError(400, f"{source}: no resources in the input")
        revision, results = await asyncio.to_thread(
            self.store.mutate, lambda tx, r, rev: reg.apply_resources(r, docs)
        )
        await self.cache.refresh()
        return json_response(200, {"revision": revision, "results": results})

    async def get_admin_resources(self, req: Request) -> Response:
        await self.cache.refresh()
        kind, ns, name = req.arg("kind"), req.arg("namespace"), req.arg("name")
        if kind is not None and kind not in KINDS:
            raise ApiError(400, f"unknown kind {kind!r} (known: {', '.join(sorted(KINDS))})")
        items = [
            doc for (k, n, nm), doc in sorted(self.cache.registry.resources.items())
            if (kind is None or k == kind) and (ns is None or n == ns)
            and (name is None or nm == name)
        ]  # fmt: skip
        return json_response(200, {"revision": self.cache.revision, "items": items})

    async def delete_admin_resource(self, req: Request, kind: str, ns: str, name: str) -> Response:
        revision, _ = await asyncio.to_thread(
            self.store.mutate, lambda tx, r, rev: (reg.delete_resource(r, kind, ns, name), None)
        )
        await self.cache.refresh()
        return json_response(200, {"revision": revision, "deleted": f"{kind}/{ns}/{name}"})

    async def get_admin_nodes(self, req: Request) -> Response:
        await self.cache.refresh()
        r = self.cache.registry
        items = [
            {**n.to_dict(), "workloads": sum(1 for w in r.workloads.values() if w.node == n.name)}
            for _, n in sorted(r.nodes.items())
        ]
        return json_response(200, {"revision": self.cache.revision, "items": items})

    async def delete_admin_node(self, req: Request, name: str) -> Response:
        revision, _ = await asyncio.to_thread(
            self.store.mutate, lambda tx, r, rev: (reg.delete_node(r, name), None)
        )
        await self.cache.refresh()
        return json_response(200, {"revision": revision, "deleted": name})

    async def get_admin_services(self, req: Request) -> Response:
        await self.cache.refresh()
        items = list(reg.service_documents(self.cache.registry).values())
        return json_response(200, {"revision": self.cache.revision, "items": items})

    async def get_admin_workloads(self, req: Request) -> Response:
        await self.cache.refresh()
        items = [w.to_dict() for _, w in sorted(self.cache.registry.workloads.items())]
        return json_response(200, {"revision": self.cache.revision, "items": items})

    async def delete_admin_workload(self, req: Request, node: str, name: str) -> Response:
        revision, _ = await asyncio.to_thread(
            self.store.mutate, lambda tx, r, rev: (reg.delete_workload(r, node, name), None)
        )
        await self.cache.refresh()
        return json_response(200, {"revision": revision, "deleted": f"{node}/{name}"})

    async def post_admin_rotate(self, req: Request) -> Response:
        overlap = req.json().get("overlap_seconds", 86400)
        if isinstance(overlap, bool) or not isinstance(overlap, int | float) or overlap < 0:
            raise ApiError(400, f"overlap_seconds: {overlap!r} must be a number >= 0")
        new = await asyncio.to_thread(
            self.store.rotate_ca, lambda ca: ca.rotate(timedelta(seconds=overlap))
        )
        await self.cache.refresh()
        pins = [root_pin(c.root_certificate.public_bytes(serialization.Encoding.DER))
                for c in new.trusted()]  # fmt: skip
        return json_response(200, {"revision": self.cache.revision, "roots": pins,
                                   "active": pins[-1]})  # fmt: skip


# --- entry point --------------------------------------------------------------------


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT, e.g. 0.0.0.0:15012")
    return host.strip("[]"), int(port)


async def run(store: Store, config: ControlPlaneConfig, listen: str,
              ready: Callable[[ControlPlane], None] | None = None) -> None:  # fmt: skip
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
