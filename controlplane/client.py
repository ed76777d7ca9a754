"""A small blocking HTTPS client for the control-plane API (admin CLI, tests).

Trust comes from a PEM bundle (``--ca-file``, the control plane's data dir) or from
a root pin: :func:`fetch_pinned_bundle` downloads the bundle without verification,
keeps it only if one root's SHA-256 equals the pin, and every later request is
verified against it (kubeadm-style discovery, no trust on first use).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["ApiClient", "ClientError", "fetch_pinned_bundle"]


class ClientError(Exception):
    """A request failed; `status` is the HTTP status (0 = no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ApiClient:
    url: str
    bundle_pem: bytes
    admin_token: str | None = None
    cert_file: str | None = None  # node certificate (chain) for /v1/node/*
    key_file: str | None = None
    timeout: float = 30.0

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cadata=self.bundle_pem.decode())
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def request(self, method: str, path: str, body: Any = None, *,
                content_type: str = "application/json",
                timeout: float | None = None) -> tuple[int, Any]:  # fmt: skip
        """(status, decoded JSON body); raises ClientError when there is no answer."""
        parts = urlsplit(self.url)
        if parts.scheme != "https" or not parts.hostname:
            raise ClientError(0, f"control plane URL {self.url!r} must look like https://HOST:PORT")
        conn = http.client.HTTPSConnection(
            parts.hostname, parts.port or 15012, context=self._context(),
            timeout=timeout or self.timeout,
        )  # fmt: skip
        if isinstance(body, bytes | str):
            payload = body.encode() if isinstance(body, str) else body
        else:
            payload = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": content_type, "Connection": "close"}
        if self.admin_token:
            headers["Authorization"] = f"Bearer {self.admin_token}"
        try:
            conn.request(method, path, body=payload if method != "GET" else None, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except ssl.SSLCertVerificationError as exc:
            raise ClientError(
                0,
                f"the control plane at {self.url} presented a certificate this client does "
                f"not trust ({exc.verify_message}); pass --ca-file with its trust bundle",
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(0, f"cannot reach the control plane at {self.url}: {exc}") from None
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"error": raw.decode(errors="replace")}
        return resp.status, data

    def call(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        """Like request, but a non-2xx answer raises ClientError with its message."""
        status, data = self.request(method, path, body, **kw)
        if not 200 <= status < 300:
            message = data.get("error") if isinstance(data, dict) else None
            raise ClientError(status, message or f"HTTP {status}")
        return data


def fetch_pinned_bundle(url: str, pin: str, timeout: float = 10.0) -> bytes:
    """The CP's trust bundle, accepted only if one of its roots hashes to `pin`."""
    parts = urlsplit(url)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(parts.hostname or "", parts.port or 15012,
                                       context=ctx, timeout=timeout)  # fmt: skip
    try:
        conn.request("GET", "/v1/trust-bundle")
        data = json.loads(conn.getresponse().read())
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise ClientError(0, f"cannot fetch the trust bundle from {url}: {exc}") from None
    finally:
        conn.close()
    bundle = str(data.get("trust_bundle", "")).encode()
    try:
        roots = x509.load_pem_x509_certificates(bundle)
    except ValueError:
        roots = []
    pins = {hashlib.sha256(r.public_bytes(serialization.Encoding.DER)).hexdigest() for r in roots}
    if pin.lower() not in pins:
        raise ClientError(
            0, f"the control plane at {url} does not hold the pinned root {pin}; refusing it"
        )
    # Check the server really chains to it: one verified request.
    ApiClient(url, bundle).request("GET", "/v1/trust-bundle")
    return bundle


def read_bundle(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ClientError(0, f"cannot read the trust bundle {path}: {exc.strerror}") from None
