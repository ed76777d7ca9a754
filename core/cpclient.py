"""The one control-plane HTTPS client (docs/protocol.md, "Control plane API").

Built on aiohttp's client; a small blocking facade (one ``asyncio.run`` per call)
serves the CLI and the agent's threads. Three kinds of use:

* admin calls (:class:`ApiClient` with ``admin_token``): verified against a PEM
  trust bundle, ``Authorization: Bearer <token>``; or, on the control plane's
  host, over its root-only admin Unix socket (``unix_socket``: plain HTTP, the
  server checks the caller's uid with SO_PEERCRED);
* node calls (:class:`NodeClient`): the node's certificate, the server verified
  against the mesh bundle AND required to carry the control plane's SPIFFE ID,
  control-plane replicas tried in order (last good first; an answered 4xx stops);
* discovery (:func:`discover_root`, :func:`fetch_pinned_bundle`): no trust on first
  use -- the roots offered over an unverified connection (``GET /v1/trust-bundle``
  and the server's leaf) are searched for the token's pinned root, and only a
  connection verified against that root alone, with the control plane's SPIFFE ID,
  carries anything that matters.

The SPIFFE ID is checked inside the TLS handshake (``SSLContext.sslobject_class``),
so a server without it fails the handshake and never sees the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshnode.core import api
from meshnode.core.constants import CONTROLPLANE_PORT
from meshnode.core.errors import ApiError
from meshnode.core.identity import controlplane_uri, single_uri_san
from meshnode.core.pki import (
    PkiError,
    find_pinned_root,
    issued_by_control_plane_intermediate,
    trust_domain_of_root,
)

__all__ = [
    "Answer",
    "ApiClient",
    "ClientError",
    "NodeClient",
    "discover_root",
    "fetch_pinned_bundle",
    "read_bundle",
    "request",
    "tls_context",
]

DEFAULT_TIMEOUT = 30.0


class ClientError(ApiError):
    """A control-plane call failed: ``status`` is the HTTP status (0 = no answer)."""


class ServerIdentityError(ssl.SSLCertVerificationError):
    """The server's certificate verified, but it is not the control plane's."""


@dataclass(slots=True)
class Answer:
    status: int
    data: Any  # decoded JSON ({"error": text} when the body was not JSON)
    peer_certificates: list[x509.Certificate] = field(default_factory=list)

    @property
    def error(self) -> str:
        msg = self.data.get("error") if isinstance(self.data, dict) else None
        return str(msg or f"HTTP {self.status}")


def tls_context(
    bundle_pem: bytes | None,
    *,
    cert_file: str | None = None,
    key_file: str | None = None,
    check_hostname: bool = True,
    server_uri: str | None = None,
    global_only: bool = False,
) -> ssl.SSLContext:
    """A TLS 1.3 client context. `bundle_pem` None verifies nothing (discovery only).
    With `server_uri` the handshake fails unless the server's leaf carries exactly
    that URI SAN -- checked before any request byte is sent. With `global_only` (a
    zone control plane talking to the global one), also unless the leaf was signed
    by a control plane's own intermediate, not a zone's: every zone control plane
    serves the same URI SAN."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if bundle_pem is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cadata=bundle_pem.decode())
        ctx.check_hostname = check_hostname
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    if server_uri is not None:
        ctx.sslobject_class = _checked_handshake(server_uri, global_only)
    return ctx


def _checked_handshake(want: str, global_only: bool = False) -> type[ssl.SSLObject]:
    class CheckedSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            der = self.getpeercert(binary_form=True)
            uri = single_uri_san(der) if der else None
            if uri != want:
                raise ServerIdentityError(
                    f"server identity is {uri or 'no URI SAN'}, not {want}: refusing it"
                )
            if global_only and not issued_by_control_plane_intermediate(
                x509.load_der_x509_certificate(der)  # type: ignore[arg-type]
            ):
                raise ServerIdentityError(
                    "the server's certificate was signed by a zone's intermediate: it is a "
                    "zone control plane, not the global one; refusing it"
                )

    return CheckedSSLObject


def _base(url: str) -> str:
    parts = urlsplit(url if "://" in url else "https://" + url)
    if parts.scheme != "https" or not parts.hostname:
        raise ClientError(0, f"control plane URL {url!r} must look like https://HOST[:PORT]")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"https://{host}:{parts.port or CONTROLPLANE_PORT}"


def _describe(url: str, exc: BaseException) -> str:
    """What went wrong reaching `url`, for a person."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert_error = exc.certificate_error
        if isinstance(cert_error, ServerIdentityError):
            return f"the server at {url}: {cert_error}"
        reason = getattr(cert_error, "verify_message", "") or str(cert_error)
        return (
            f"the control plane at {url} presented a certificate this client does "
            f"not trust ({reason})"
        )
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS 1.3 handshake with {url} failed ({exc}); is it a meshnode control plane?"
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
        exc.os_error, ConnectionRefusedError
    ):
        return (
            f"cannot reach the control plane at {url}: connection refused (is "
            "`meshnode controlplane run` listening there?)"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot reach the control plane at {url}: {exc.os_error.strerror or exc}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return f"the control plane at {url} did not answer in time"
    return f"cannot talk to the control plane at {url}: {exc or type(exc).__name__}"


def _describe_unix(path: str, exc: BaseException) -> str:
    os_error = getattr(exc, "os_error", exc)
    if isinstance(os_error, PermissionError):
        return (
            f"cannot use the control plane's admin socket {path}: permission denied; run "
            "as root (sudo), or use the admin token over TLS (--cp https://HOST:15012 "
            "--admin-token-file FILE)"
        )
    if isinstance(os_error, FileNotFoundError | ConnectionRefusedError):
        return (
            f"no control plane answers on its admin socket {path} (is `meshnode "
            "controlplane run` running with this --data-dir?)"
        )
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return f"the control plane did not answer in time on {path}"
    return f"cannot talk to the control plane on {path}: {exc or type(exc).__name__}"


async def request_async(
    url: str,
    method: str,
    path: str,
    ctx: ssl.SSLContext | None,
    *,
    unix_socket: str | None = None,
    body: Any = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    want_peer: bool = False,
) -> Answer:
    """One request on a fresh connection; ClientError(0, ...) when there is no answer.
    With `unix_socket`, over that socket (plain HTTP; `url` only names it in errors)."""
    base = "http://localhost" if unix_socket else _base(url)
    if isinstance(body, bytes | str):
        payload: bytes | None = body.encode() if isinstance(body, str) else body
    else:
        payload = json.dumps(body).encode() if body is not None else None
    hdrs = {"Accept": "application/json", **(headers or {})}
    if payload is not None:
        hdrs["Content-Type"] = content_type
    connector: aiohttp.BaseConnector
    if unix_socket:
        connector = aiohttp.UnixConnector(path=unix_socket, force_close=True)
    else:
        connector = aiohttp.TCPConnector(ssl=ctx if ctx is not None else True, force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:
        return await _send(session, base, method, path, payload, hdrs, want_peer, unix_socket)


async def _send(
    session: aiohttp.ClientSession,
    base: str,
    method: str,
    path: str,
    payload: bytes | None,
    hdrs: dict[str, str],
    want_peer: bool = False,
    unix_socket: str | None = None,
    timeout: float | None = None,
) -> Answer:
    peer: list[x509.Certificate] = []
    kw: dict[str, Any] = {}
    if timeout is not None:
        kw["timeout"] = aiohttp.ClientTimeout(total=timeout)
    try:
        async with session.request(method, base + path, data=payload, headers=hdrs, **kw) as resp:
            if want_peer and resp.connection is not None and resp.connection.transport:
                peer = _peer_certificates(resp.connection.transport.get_extra_info("ssl_object"))
            raw = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        if unix_socket:
            raise ClientError(0, _describe_unix(unix_socket, exc)) from None
        raise ClientError(0, _describe(base, exc)) from None
    return Answer(status, _decoded(raw), peer)


def _decoded(raw: bytes) -> Any:
    """A body's JSON, or {"error": its start} when it is not JSON."""
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {"error": raw[:200].decode(errors="replace")}


class KeptConnection:
    """One kept-alive HTTPS connection, for a caller that asks again and again from
    one thread (the agent's watch: one TLS handshake per connection, not one per
    long poll; at 10,000 nodes that is the difference between a handshake per node
    and hundreds per second). A new URL or TLS context (a renewed certificate)
    starts a new connection; a kept one the server closed is retried once, fresh."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._key: tuple[str, int] | None = None

    def request(
        self,
        url: str,
        method: str,
        path: str,
        ctx: ssl.SSLContext,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Answer:
        return self._run(self._request(url, method, path, ctx, timeout))

    async def _request(
        self, url: str, method: str, path: str, ctx: ssl.SSLContext, timeout: float
    ) -> Answer:
        hdrs = {"Accept": "application/json"}
        for attempt in (1, 2):
            fresh = self._session is None or (url, id(ctx)) != self._key
            session = await self._session_for(url, ctx)
            try:
                return await _send(session, _base(url), method, path, None, hdrs, timeout=timeout)
            except ClientError:
                await self._drop()
                if fresh or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def stream(
        self,
        url: str,
        path: str,
        ctx: ssl.SSLContext,
        on_line: Callable[[bytes], bool],
        idle: float,
    ) -> Answer:
        """GET `path` and hand each line of the answer to `on_line` as it comes,
        until the answer ends or `on_line` returns False; Answer(200, None) then.
        An answer that is not 200 is returned whole. No byte for `idle` seconds, or
        a connection lost half-way, is ClientError(0, ...). A stream cut short
        leaves nothing behind: the next call starts on a new connection."""
        return self._run(self._stream(url, path, ctx, on_line, idle))

    def _run(self, call: Coroutine[Any, Any, Answer]) -> Answer:
        """Run `call` on this connection's own event loop (kept between calls, as
        the session on it is)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(call)

    async def _stream(
        self,
        url: str,
        path: str,
        ctx: ssl.SSLContext,
        on_line: Callable[[bytes], bool],
        idle: float,
    ) -> Answer:
        from meshnode.core.contracts import AnswerLines

        session = await self._session_for(url, ctx)
        base = _base(url)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=DEFAULT_TIMEOUT, sock_read=idle)
        finished = False
        try:
            async with session.get(
                base + path, headers={"Accept": "application/json"}, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    raw = await resp.read()
                    finished = True
                    return Answer(resp.status, _decoded(raw))
                lines = AnswerLines()
                async for data in resp.content.iter_any():
                    for line in lines.feed(data):
                        if not on_line(line):
                            return Answer(200, None)
                for line in lines.end():
                    if not on_line(line):
                        return Answer(200, None)
                finished = True
                return Answer(200, None)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ClientError(0, _describe(base, exc)) from None
        finally:
            if not finished:  # cut short: the connection is mid-answer
                await self._drop()

    async def _session_for(self, url: str, ctx: ssl.SSLContext) -> aiohttp.ClientSession:
        """The kept session for `url` and `ctx` (a new one when either changed)."""
        key = (url, id(ctx))
        if key != self._key:
            await self._drop()
            self._key = key
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=ctx, limit=1, keepalive_timeout=60)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def _drop(self) -> None:
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            self._session = None

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run_until_complete(self._drop())
            self._loop.close()
            self._loop = None


def _peer_certificates(sslobj: ssl.SSLObject | None) -> list[x509.Certificate]:
    """The certificates the server sent, unverified: its whole chain where Python
    has the public ``get_unverified_chain`` (3.13+), else its leaf."""
    if sslobj is None:
        return []
    getter: Callable[[], Sequence[Any]] | None = getattr(sslobj, "get_unverified_chain", None)
    certs = []
    if getter is not None:
        for item in getter() or []:
            with contextlib.suppress(ValueError):
                if isinstance(item, bytes):
                    certs.append(x509.load_der_x509_certificate(item))
                else:  # ssl.Certificate; public_bytes() is PEM by default
                    certs.append(x509.load_pem_x509_certificate(str(item.public_bytes()).encode()))
        return certs
    leaf = sslobj.getpeercert(binary_form=True)
    if leaf:
        with contextlib.suppress(ValueError):
            certs.append(x509.load_der_x509_certificate(leaf))
    return certs


def request(url: str, method: str, path: str, ctx: ssl.SSLContext | None, **kw: Any) -> Answer:
    """The blocking form of :func:`request_async` (not from inside an event loop)."""
    return asyncio.run(request_async(url, method, path, ctx, **kw))


# --- admin calls --------------------------------------------------------------------


@dataclass
class ApiClient:
    """Calls verified against `bundle_pem`, with an admin token or a node certificate."""

    url: str
    bundle_pem: bytes
    admin_token: str | None = None
    cert_file: str | None = None  # node certificate (chain) for /v1/node/*
    key_file: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    unix_socket: str | None = None  # the admin socket on the control plane's host

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> tuple[int, Any]:
        """(status, decoded JSON body); raises ClientError when there is no answer."""
        headers = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
        ctx = None
        if not self.unix_socket:
            ctx = tls_context(self.bundle_pem, cert_file=self.cert_file, key_file=self.key_file)
        answer = request(
            self.url,
            method,
            path,
            ctx,
            unix_socket=self.unix_socket,
            body=body,
            content_type=content_type,
            headers=headers,
            timeout=timeout or self.timeout,
        )
        return answer.status, answer.data

    def call(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        """Like request, but a non-2xx answer raises ClientError with its message."""
        status, data = self.request(method, path, body, **kw)
        if not 200 <= status < 300:
            message = data.get("error") if isinstance(data, dict) else None
            raise ClientError(status, message or f"HTTP {status}")
        return data


# --- discovery ----------------------------------------------------------------------


def discover_root(url: str, pin: str, timeout: float = 10.0) -> x509.Certificate:
    """The root whose SHA-256 is `pin`, among those the server offers over a connection
    that verifies nothing: GET /v1/trust-bundle and the certificates of its TLS
    handshake. Only that unauthenticated GET goes over it: no token, no CSR."""
    answer = request(
        url, "GET", api.TRUST_BUNDLE, tls_context(None), timeout=timeout, want_peer=True
    )
    candidates = list(answer.peer_certificates)
    bundle = answer.data.get("trust_bundle") if isinstance(answer.data, dict) else None
    if answer.status == 200 and isinstance(bundle, str):
        # unparsable: then only the TLS chain counts; the pin check says what was seen
        with contextlib.suppress(ValueError):
            candidates += x509.load_pem_x509_certificates(bundle.encode())
    return find_pinned_root(candidates, pin, _base(url))


def fetch_pinned_bundle(
    url: str, pin: str, timeout: float = 10.0, global_only: bool = False
) -> bytes:
    """The CP's trust bundle, accepted only if one of its roots hashes to `pin` and
    the server's certificate chains to that root (a second, verified request); with
    `global_only`, signed by a control plane's own intermediate (tls_context)."""
    try:
        root = discover_root(url, pin, timeout)
    except PkiError as exc:
        raise ClientError(0, str(exc)) from None
    root_pem = root.public_bytes(serialization.Encoding.PEM)
    td = trust_domain_of_root(root)
    ctx = tls_context(
        root_pem, server_uri=controlplane_uri(td) if td else None, global_only=global_only
    )
    answer = request(url, "GET", api.TRUST_BUNDLE, ctx, timeout=timeout)
    bundle = answer.data.get("trust_bundle") if isinstance(answer.data, dict) else None
    if answer.status != 200 or not isinstance(bundle, str):
        raise ClientError(answer.status, f"{_base(url)} gave no trust bundle: {answer.error}")
    return bundle.encode()


def read_bundle(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ClientError(0, f"cannot read the trust bundle {path}: {exc.strerror}") from None


# --- node calls ---------------------------------------------------------------------


class NodeClient:
    """Node calls with the node's certificate to one of several control planes.

    The server must chain to the bundle in `bundle_file` and carry `server_uri`
    (``controlplane_uri(td)``). Replicas are tried in order, the last good one
    first; an answered 4xx is final (the control plane means it)."""

    def __init__(
        self,
        urls: Sequence[str],
        bundle_file: Path,
        cert_file: Path,
        key_file: Path,
        server_uri: str,
        timeout: float = 10.0,
    ) -> None:
        self.order = list(urls)
        self.bundle_file, self.cert_file, self.key_file = bundle_file, cert_file, key_file
        self.server_uri = server_uri
        self.timeout = timeout
        self._ctx: ssl.SSLContext | None = None
        self._ctx_key: tuple[float, float] = (0.0, 0.0)
        self._kept = KeptConnection()

    def _context(self) -> ssl.SSLContext:
        """Rebuilt when the certificate or the bundle changes on disk (renewal)."""
        key = (self.cert_file.stat().st_mtime, self.bundle_file.stat().st_mtime)
        if self._ctx is None or key != self._ctx_key:
            self._ctx = tls_context(
                self.bundle_file.read_bytes(),
                cert_file=str(self.cert_file),
                key_file=str(self.key_file),
                check_hostname=False,  # the SPIFFE ID instead
                server_uri=self.server_uri,
            )
            self._ctx_key = key
        return self._ctx

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout: float | None = None,
        keep: bool = False,
    ) -> Any:
        """The decoded JSON of a 2xx answer; ClientError otherwise. With `keep` (a
        body-less call from one thread, again and again), on a kept-alive connection."""
        wait = timeout or self.timeout

        def ask(url: str, ctx: ssl.SSLContext) -> Answer:
            if keep:
                return self._kept.request(url, method, path, ctx, wait)
            return request(url, method, path, ctx, body=body, timeout=wait)

        return self._first_answer(ask)

    def stream(self, path: str, on_line: Callable[[bytes], bool], idle: float) -> None:
        """A streamed GET on the kept connection: each line of the answer goes to
        `on_line` (until it returns False). Replicas are tried in order like
        :meth:`request`; a 4xx answer raises ClientError with its message; so does
        a stream lost half-way (status 0), after the lines that came."""
        delivered = 0

        def counted(line: bytes) -> bool:
            nonlocal delivered
            delivered += 1
            return on_line(line)

        self._first_answer(
            lambda url, ctx: self._kept.stream(url, path, ctx, counted, idle),
            final=lambda: delivered > 0,  # lines were taken: the caller asks again from there
        )

    def _first_answer(
        self,
        ask: Callable[[str, ssl.SSLContext], Answer],
        final: Callable[[], bool] = lambda: False,
    ) -> Any:
        """`ask` each replica in order (the last good one first) until one answers
        below 500: its data for a 2xx, ClientError for a 3xx/4xx. A failure with no
        answer moves on to the next replica, unless `final()` says otherwise."""
        errors = []
        ctx = self._context()
        for url in list(self.order):
            try:
                answer = ask(url, ctx)
            except ClientError as exc:
                if final():
                    raise
                errors.append(str(exc))
                continue
            if answer.status >= 500:
                errors.append(f"{url}: {answer.status} {answer.error}")
                continue
            if self.order[0] != url:
                self.order.remove(url)
                self.order.insert(0, url)
            if answer.status >= 300:
                raise ClientError(answer.status, answer.error)
            return answer.data
        raise ClientError(0, "no control plane reachable: " + "; ".join(errors))

    def close(self) -> None:
        """Close the kept connection (from the thread that used it)."""
        self._kept.close()
