"""Enrolling a node with the control plane (docs/protocol.md, "Enrollment").

    token = parse_token("mn1.<id>.<secret>.<pin>")        # meshnode.core.token
    result = enroll(ControlPlaneUrl.parse(url), token, name, zone, ip)
    write_enrollment(NodeLayout(config_dir, state_dir), result, ...)

No trust on first use: before the node sends anything that matters, it finds the
root certificate whose SHA-256 (of the DER) is the token's pin, among the roots the
control plane offers -- `GET /v1/trust-bundle` and the certificates in its TLS chain,
both fetched over a connection that verifies nothing. Everything after that (the
token, the CSR) goes over a second connection that verifies the server against that
root alone, checks its name (the URL's host) and its SPIFFE ID
(`spiffe://<td>/controlplane`). The node's private key is made here and never sent.

The pure parts -- token and URL parsing, the pin check, response checks, the file
layout and the "already enrolled" decision -- take no network and are tested alone.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshnode.core import api, cpclient
from meshnode.core.constants import CONTROLPLANE_PORT
from meshnode.core.errors import MeshnodeError
from meshnode.core.fsutil import write_file_atomic
from meshnode.core.identity import check_node_name, controlplane_uri, node_uri
from meshnode.core.pki import (
    generate_private_key,
    make_node_csr,
    trust_domain_of_root,
    write_private_key,
)
from meshnode.core.token import JoinToken

__all__ = [
    "DEFAULT_CP_PORT",
    "ControlPlaneUrl",
    "EnrollError",
    "Enrolled",
    "EnrollmentResult",
    "NodeLayout",
    "enroll",
    "existing_enrollment",
    "node_document",
    "write_enrollment",
]

DEFAULT_CP_PORT = CONTROLPLANE_PORT
DEFAULT_TIMEOUT = 10.0


class EnrollError(MeshnodeError):
    """Enrollment cannot go on; the message says what failed and what to do."""


# --- addresses (pure) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControlPlaneUrl:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ControlPlaneUrl:
        """`https://host[:port]`, or just `host[:port]`; port 15012 by default."""
        raw = text.strip()
        if "://" not in raw:
            raw = "https://" + raw
        try:
            parts = urlsplit(raw)
            port = parts.port
        except ValueError as exc:
            raise EnrollError(f"control plane URL {text!r} is not valid: {exc}") from None
        if parts.scheme != "https":
            raise EnrollError(
                f"control plane URL {text!r}: only https:// is supported (the API is TLS only)"
            )
        if not parts.hostname:
            raise EnrollError(f"control plane URL {text!r} has no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise EnrollError(f"control plane URL {text!r}: give only https://host[:port], no path")
        return cls(parts.hostname, port or DEFAULT_CP_PORT)

    def __str__(self) -> str:
        host = self.host
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return f"https://{host}:{self.port}"


# --- what the control plane answers (pure checks) -----------------------------------


@dataclass(frozen=True, slots=True)
class EnrollmentResult:
    name: str
    zone: str
    ip: str
    trust_domain: str
    certificate_pem: bytes  # node certificate + intermediate(s)
    trust_bundle_pem: bytes  # roots
    key: ec.EllipticCurvePrivateKey
    control_plane: str


def _load_pems(pem: str | bytes, what: str) -> list[x509.Certificate]:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise EnrollError(f"the control plane sent a bad {what}: {exc}") from None
    if not certs:
        raise EnrollError(f"the control plane sent an empty {what}")
    return certs


def check_enroll_response(
    doc: Any,
    key: ec.EllipticCurvePrivateKey,
    pinned_root: x509.Certificate,
    name: str,
    url: str,
    now: datetime | None = None,
) -> EnrollmentResult:
    """Validate `200 /v1/enroll`: the certificate is for our key and name, chains to a
    root of the returned bundle, and the bundle is the pinned root's trust domain."""
    if not isinstance(doc, dict):
        raise EnrollError(f"the control plane at {url} answered /v1/enroll with non-object JSON")
    try:
        cert_pem, bundle_pem = doc["certificate"], doc["trust_bundle"]
        trust_domain = doc["trust_domain"]
        node = doc.get("node") or {}
    except KeyError as exc:
        raise EnrollError(f"the control plane's enrollment answer lacks {exc}") from None
    if not isinstance(cert_pem, str) or not isinstance(bundle_pem, str):
        raise EnrollError("the control plane's enrollment answer has non-string PEM fields")
    chain = _load_pems(cert_pem, "node certificate chain")
    roots = _load_pems(bundle_pem, "trust bundle")
    leaf = chain[0]

    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise EnrollError("the control plane issued a certificate for a different key")
    expected_td = trust_domain_of_root(pinned_root)
    if expected_td is not None and trust_domain != expected_td:
        raise EnrollError(
            f"the control plane says trust domain {trust_domain!r}, but the pinned root "
            f"is for {expected_td!r}"
        )
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    want = node_uri(trust_domain, name)
    if uris != [want]:
        raise EnrollError(f"the node certificate names {uris or 'nothing'}, expected [{want!r}]")
    # The bundle came over the channel the pinned root authenticated, so it is trusted
    # as a whole (during a root rotation it carries the old and the new root).
    _verify_chain(chain, roots, now)
    return EnrollmentResult(
        name=str(node.get("name") or name),
        zone=str(node.get("zone") or ""),
        ip=str(node.get("ip") or ""),
        trust_domain=trust_domain,
        certificate_pem=cert_pem.encode(),
        trust_bundle_pem=bundle_pem.encode(),
        key=key,
        control_plane=url,
    )


def _verify_chain(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], now: datetime | None
) -> None:
    now = now or datetime.now(UTC)
    for cert in chain:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise EnrollError(
                f"certificate {cert.subject.rfc4514_string()!r} from the control plane is not "
                f"valid now ({cert.not_valid_before_utc:%Y-%m-%d %H:%M} .. "
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC); is this node's clock right?"
            )
    for child, parent in zip(chain, chain[1:], strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise EnrollError(f"the node certificate chain is broken: {exc}") from None
    last = chain[-1]
    for root in roots:
        try:
            last.verify_directly_issued_by(root)
            return
        except (ValueError, TypeError, InvalidSignature):
            continue
    raise EnrollError("the node certificate does not chain to any root of the trust bundle")


# --- files on the node (pure apart from the writes) ---------------------------------


@dataclass(frozen=True, slots=True)
class NodeLayout:
    config_dir: Path
    state_dir: Path

    @property
    def node_json(self) -> Path:
        return self.config_dir / "node.json"

    @property
    def key(self) -> Path:
        return self.config_dir / "node-key.pem"

    @property
    def cert(self) -> Path:
        return self.config_dir / "node.pem"

    @property
    def bundle(self) -> Path:
        return self.config_dir / "bundle.pem"

    @property
    def workloads(self) -> Path:
        return self.config_dir / "workloads.json"

    @property
    def ztunnel_snapshot(self) -> Path:
        return self.state_dir / "ztunnel-snapshot.json"


def node_document(
    result: EnrollmentResult,
    layout: NodeLayout,
    cgroup_parent: str,
    requested_zone: str = "",
    requested_ip: str = "",
    local: dict[str, str] | None = None,
) -> dict[str, Any]:
    """node.json. What the control plane recorded wins over what was asked for.
    `local`: node-local settings for hosts that run several nodes (the lab):
    ``proxy_cgroup``, ``bpf_pin_dir``."""
    return {
        **{k: v for k, v in (local or {}).items() if v},
        "name": result.name,
        "zone": result.zone or requested_zone,
        "ip": result.ip or requested_ip,
        "trust_domain": result.trust_domain,
        "control_planes": [result.control_plane],
        "cgroup_parent": cgroup_parent,
        "state_dir": str(layout.state_dir),
        "config_dir": str(layout.config_dir),
    }


@dataclass(frozen=True, slots=True)
class Enrolled:
    name: str
    control_planes: list[str]
    config_dir: Path

    def message(self) -> str:
        return (
            f"already enrolled as {self.name} with CP {', '.join(self.control_planes)} "
            f"(config in {self.config_dir}); nothing changed. Use --force to enroll again."
        )


def existing_enrollment(layout: NodeLayout) -> Enrolled | None:
    """The enrollment found in the config dir, or None if there is none. A node.json
    without the key or certificate (or unreadable) is an error that --force fixes."""
    path = layout.node_json
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        name = doc["name"]
        cps = doc["control_planes"]
        if not isinstance(name, str) or not isinstance(cps, list):
            raise TypeError("bad types")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EnrollError(
            f"{path} exists but is not a readable enrollment ({exc}); use --force to enroll again"
        ) from None
    missing = [p.name for p in (layout.key, layout.cert, layout.bundle) if not p.exists()]
    if missing:
        raise EnrollError(
            f"{layout.config_dir} holds a partial enrollment of {name} ({', '.join(missing)} "
            "missing); use --force to enroll again"
        )
    return Enrolled(name, [str(c) for c in cps], layout.config_dir)


def write_enrollment(
    layout: NodeLayout,
    result: EnrollmentResult,
    cgroup_parent: str,
    requested_zone: str = "",
    requested_ip: str = "",
    local: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write key, certificate, bundle, workloads.json (if absent) and node.json, the
    last one last: a node.json means the rest is in place. Returns node.json's content."""
    layout.config_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(layout.config_dir, 0o755)
    layout.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(layout.state_dir, 0o700)
    write_private_key(layout.key, result.key)
    write_file_atomic(layout.cert, result.certificate_pem, 0o644)
    write_file_atomic(layout.bundle, result.trust_bundle_pem, 0o644)
    if not layout.workloads.exists():
        write_file_atomic(layout.workloads, b"[]\n", 0o644)
    doc = node_document(result, layout, cgroup_parent, requested_zone, requested_ip, local)
    write_file_atomic(layout.node_json, (json.dumps(doc, indent=2) + "\n").encode(), 0o644)
    return doc


# --- talking to the control plane (core/cpclient.py) ---------------------------------


def discover_root(
    url: ControlPlaneUrl, pin: str, timeout: float = DEFAULT_TIMEOUT
) -> x509.Certificate:
    """Fetch the roots the server offers without trusting it, and return the one the
    token pins (PinMismatch otherwise). Only the unauthenticated
    `GET /v1/trust-bundle` goes over this connection: no token, no CSR."""
    try:
        return cpclient.discover_root(str(url), pin, timeout)
    except cpclient.ClientError as exc:
        raise EnrollError(exc.message) from None


def post_enroll(
    url: ControlPlaneUrl,
    root: x509.Certificate,
    body: dict[str, Any],
    timeout: float = DEFAULT_TIMEOUT,
) -> Any:
    """POST /v1/enroll over TLS that verifies the server against `root` alone, for the
    URL's host name and the control plane's SPIFFE ID -- both checked in the TLS
    handshake, so a server that fails them never receives the token."""
    td = trust_domain_of_root(root)
    ctx = cpclient.tls_context(
        root.public_bytes(serialization.Encoding.PEM),
        server_uri=controlplane_uri(td) if td is not None else None,
    )
    try:
        answer = cpclient.request(str(url), "POST", api.ENROLL, ctx, body=body, timeout=timeout)
    except cpclient.ClientError as exc:
        raise EnrollError(f"{exc.message}; the token was not sent") from None
    if answer.status != 200:
        raise EnrollError(
            f"the control plane at {url} refused the enrollment ({answer.status}): {answer.error}"
        )
    return answer.data


def enroll(
    url: ControlPlaneUrl,
    token: JoinToken,
    name: str,
    zone: str = "",
    ip: str = "",
    timeout: float = DEFAULT_TIMEOUT,
) -> EnrollmentResult:
    """The whole exchange; writes nothing. The key is made here and stays here."""
    check_node_name(name)
    if ip:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise EnrollError(f"--ip {ip!r} is not an IP address") from None
    root = discover_root(url, token.pin, timeout)
    key = generate_private_key()
    body: dict[str, Any] = {
        "token": str(token),
        "name": name,
        "csr": make_node_csr(key, trust_domain_of_root(root), name).decode(),
    }
    if zone:
        body["zone"] = zone
    if ip:
        body["ip"] = ip
    doc = post_enroll(url, root, body, timeout)
    return check_enroll_response(doc, key, root, name, str(url))
