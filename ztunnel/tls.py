"""TLS for HBONE: TLS 1.3 only, mutual authentication, ALPN h2, the mesh trust
bundle as the only anchor.

Workloads on one node may share the node's IP, so the inbound listener cannot
pick the certificate to present by destination address, as Istio's ztunnel
does with per-pod IPs. The client names the identity it expects in SNI
(``<sa>.<ns>.<trust-domain>``) and the server switches to that workload's
certificate; the client still verifies the URI SAN it receives, so SNI is only
a hint and never trusted on its own. A tunnel from another zone names a service
instead (a zone SNI, ``core/identity.ZoneSni``): the server presents the
identity of a local endpoint of that service.
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from meshnode.core.errors import MeshnodeError
from meshnode.core.identity import (
    IdentityError,
    SpiffeId,
    ZoneSni,
    spiffe_id_from_certificate,
)
from meshnode.core.logbudget import LogBudget
from meshnode.ztunnel.recheck import root_fingerprints, roots_removed
from meshnode.ztunnel.state import ProxyState

log = logging.getLogger("meshnode.ztunnel.tls")

ALPN = "h2"


class TlsError(MeshnodeError):
    """A TLS peer or a local certificate failed our checks."""


def _base_context(purpose: ssl.Purpose, trust_bundle: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identities are SPIFFE URI SANs, checked by us
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=trust_bundle)
    ctx.set_alpn_protocols([ALPN])
    # HBONE connections are pooled and long-lived; resumption tickets would only
    # cost a signature per handshake on the server side.
    if purpose is ssl.Purpose.CLIENT_AUTH:
        ctx.num_tickets = 0
    return ctx


@dataclass(slots=True)
class _IdentityContexts:
    fingerprint: tuple[float, float]
    server: ssl.SSLContext
    client: ssl.SSLContext
    not_after: float  # the certificate's expiry, Unix time


class TlsContexts:
    """One client and one server context per local workload identity, and the
    listener's context that dispatches on SNI. Rebuilt from each new state;
    contexts whose certificate files did not change are kept."""

    def __init__(self) -> None:
        self._trust_domain = ""
        self._bundle_fingerprint: tuple[str, float] | None = None
        self._by_identity: dict[SpiffeId, _IdentityContexts] = {}
        self._identity_by_server_ctx: dict[int, SpiffeId] = {}
        self._listener: ssl.SSLContext | None = None
        self._roots: frozenset[bytes] = frozenset()
        self._zone_ids: dict[tuple[str, str, int], SpiffeId] = {}
        self._zone = ""

    def update(self, state: ProxyState) -> bool:
        """Rebuild from the state. True if the new trust bundle dropped a root
        (connections verified under the old one must go: see recheck.py)."""
        roots_dropped = False
        bundle_fp = (state.trust_bundle, _mtime(state.trust_bundle))
        if bundle_fp != self._bundle_fingerprint or state.trust_domain != self._trust_domain:
            # A new trust bundle invalidates every context built on the old one.
            self._by_identity.clear()
            self._bundle_fingerprint = bundle_fp
            self._trust_domain = state.trust_domain
            self._listener = None
            try:
                roots = root_fingerprints(Path(state.trust_bundle).read_bytes())
            except OSError:
                roots = frozenset()
            roots_dropped = roots_removed(self._roots, roots)
            self._roots = roots
        fresh: dict[SpiffeId, _IdentityContexts] = {}
        for identity, wl in state.local_identities().items():
            assert wl.cert_path and wl.key_path
            fp = (_mtime(wl.cert_path), _mtime(wl.key_path))
            known = self._by_identity.get(identity)
            if known is not None and known.fingerprint == fp:
                fresh[identity] = known
                continue
            try:
                server = _base_context(ssl.Purpose.CLIENT_AUTH, state.trust_bundle)
                server.load_cert_chain(wl.cert_path, wl.key_path)
                client = _base_context(ssl.Purpose.SERVER_AUTH, state.trust_bundle)
                client.load_cert_chain(wl.cert_path, wl.key_path)
                expiry = _not_after_pem(wl.cert_path)
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.error(
                    "cannot load the certificate of %s from %s: %s; its connections will "
                    "fail until the node agent writes a valid one",
                    identity,
                    wl.cert_path,
                    exc,
                )
                continue
            fresh[identity] = _IdentityContexts(fp, server, client, expiry)
        self._by_identity = fresh
        self._identity_by_server_ctx = {id(c.server): i for i, c in fresh.items()}
        self._zone_ids = zone_identities(state)
        self._zone = state.node.zone
        if self._listener is None:
            self._listener = _base_context(ssl.Purpose.CLIENT_AUTH, state.trust_bundle)
            self._listener.sni_callback = self._on_sni
        return roots_dropped

    def not_after(self, identity: SpiffeId) -> float:
        """When the local certificate of `identity` expires (Unix time; 0 if none)."""
        ctxs = self._by_identity.get(identity)
        return ctxs.not_after if ctxs is not None else 0.0

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    def listener_context(self) -> ssl.SSLContext:
        if self._listener is None:
            raise TlsError("no TLS state yet")
        return self._listener

    def client_context(self, identity: SpiffeId) -> ssl.SSLContext:
        ctxs = self._by_identity.get(identity)
        if ctxs is None:
            raise TlsError(f"no certificate for local identity {identity}")
        return ctxs.client

    def served_identity(self, ssl_object: ssl.SSLObject | None) -> SpiffeId | None:
        if ssl_object is None:
            return None
        return self._identity_by_server_ctx.get(id(ssl_object.context))

    def _zone_identity(self, server_name: str) -> SpiffeId | None:
        """The identity to present for a zone SNI (a tunnel from another zone,
        through our ingress) naming a service with an endpoint here."""
        try:
            sni = ZoneSni.parse(server_name, self._trust_domain)
        except IdentityError:
            return None
        if sni.zone != self._zone:
            return None
        return self._zone_ids.get((sni.namespace, sni.service, sni.port))

    def _on_sni(
        self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext
    ) -> int | None:
        if not server_name:
            _refused("no_sni", "no server name (SNI): cannot tell which workload")
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        try:
            identity: SpiffeId | None = SpiffeId.from_sni(server_name, self._trust_domain)
        except IdentityError:
            identity = self._zone_identity(server_name)
        ctxs = self._by_identity.get(identity) if identity else None
        if ctxs is None:
            _refused("unknown_name", "no workload or service %r on this node", server_name[:255])
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslobj.context = ctxs.server
        return None


def zone_identities(state: ProxyState) -> dict[tuple[str, str, int], SpiffeId]:
    """(namespace, service, service port) -> the identity this node serves for a
    zone SNI naming them: that of a local endpoint of the service on that port
    (the first by name when several identities serve it). Pure."""
    out: dict[tuple[str, str, int], list[SpiffeId]] = {}
    for svc in state.services_by_name.values():
        for e in svc.endpoints:
            if e.remote or e.node != state.node.name:
                continue
            w = state.find_local_by_addr(e.address, e.port)
            if w is None or not w.cert_path:
                continue
            ports = (
                [e.service_port]
                if e.service_port
                else [p.port for p in svc.ports if p.target_port == e.port]
            )
            for port in ports:
                out.setdefault((svc.namespace, svc.name, port), []).append(w.identity)
    return {k: min(v, key=lambda i: i.uri) for k, v in out.items()}


# What a TLS client can make us log before it authenticated: a few lines, then
# one a second per reason, each saying how many were left out.
_REFUSALS = LogBudget(per_second=1.0, burst=10.0)


def _refused(reason: str, what: str, *args: object) -> None:
    skipped = _REFUSALS.take(reason, time.monotonic())
    if skipped is None:
        return
    suffix = f" ({skipped} more like it not logged)" if skipped else ""
    log.warning("inbound TLS handshake refused: " + what + suffix, *args)


def quiet_undecodable_server_names() -> None:
    """A ClientHello whose server name is not ASCII fails the handshake inside
    CPython's SNI callback glue, which hands the UnicodeDecodeError to
    ``sys.unraisablehook``: a traceback on stderr per connection, that anyone who
    reaches a TLS port of ours could make. Log one line instead (at most once a
    second), and leave every other unraisable exception to the hook before."""
    previous = sys.unraisablehook
    if getattr(previous, "_meshnode_sni", False):
        return

    def hook(unraisable: Any) -> None:
        exc, obj = unraisable.exc_value, unraisable.object
        if isinstance(exc, UnicodeDecodeError) and isinstance(obj, bytes):
            _refused("not_ascii", "the server name (SNI) %r is not ASCII", obj[:80])
            return
        previous(unraisable)

    hook._meshnode_sni = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def peer_identity(ssl_object: ssl.SSLObject | None) -> SpiffeId:
    """The verified peer's SPIFFE ID (the chain was already verified by OpenSSL
    against the trust bundle)."""
    if ssl_object is None:
        raise TlsError("not a TLS connection")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise TlsError("peer presented no certificate")
    try:
        return spiffe_id_from_certificate(der)
    except IdentityError as exc:
        raise TlsError(f"peer certificate carries no usable SPIFFE ID: {exc}") from None


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


def _not_after_pem(path: str) -> float:
    """Expiry (Unix time) of the first certificate of a PEM file."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    return cert.not_valid_after_utc.timestamp()
