"""Workload identities: SPIFFE IDs, their TLS SNI form, and reading them from certificates.

Pure functions and values, no I/O. The only accepted SPIFFE ID shape is

    spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>

Nodes and the control plane have SPIFFE IDs of their own, which never parse as
a workload's: ``spiffe://<td>/node/<name>`` and ``spiffe://<td>/controlplane``.
A zone control plane authenticates to the global control plane as
``spiffe://<td>/zone/<zone>/controlplane``, which is neither a workload's nor a node's.

Namespace and service account must be DNS labels and the trust domain a DNS name,
because the node proxy encodes an identity into TLS SNI as
``<sa>.<ns>.<trust-domain>``: workloads on one node share the node's IP, so SNI is
how the proxy knows which workload certificate to present.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

from meshnode.core.errors import MeshnodeError

__all__ = [
    "IdentityError",
    "SpiffeId",
    "ZoneSni",
    "check_node_name",
    "controlplane_uri",
    "node_name_from_certificate",
    "node_uri",
    "single_uri_san",
    "spiffe_id_from_certificate",
    "validate_trust_domain",
    "zone_controlplane_uri",
    "zone_of_controlplane_certificate",
]

SCHEME_PREFIX = "spiffe://"

# RFC 1123 label, lowercase only: starts and ends with a letter or digit.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_MAX_DNS_NAME = 253


class IdentityError(MeshnodeError, ValueError):
    """An identity string, SNI name or certificate does not carry a valid SPIFFE ID."""


def _check_label(value: str, what: str) -> None:
    if not value:
        raise IdentityError(f"{what} is empty")
    if len(value) > 63:
        raise IdentityError(f"{what} {value!r} is longer than 63 characters")
    if not _LABEL.fullmatch(value):
        raise IdentityError(
            f"{what} {value!r} is not a DNS label: use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit (no dots)"
        )


def validate_trust_domain(trust_domain: str) -> None:
    """Raise IdentityError unless `trust_domain` is a lowercase DNS name."""
    if not trust_domain:
        raise IdentityError("trust domain is empty")
    if len(trust_domain) > _MAX_DNS_NAME:
        raise IdentityError(f"trust domain is longer than {_MAX_DNS_NAME} characters")
    for label in trust_domain.split("."):
        if not label or len(label) > 63 or not _LABEL.fullmatch(label):
            raise IdentityError(
                f"trust domain {trust_domain!r} is not a lowercase DNS name: each dot-separated "
                "label must be 1..63 lowercase letters, digits or '-', starting and ending "
                "with a letter or digit"
            )


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A workload identity ``spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>``."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        _check_label(self.namespace, "namespace")
        _check_label(self.service_account, "service account")

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse ``spiffe://<td>/ns/<ns>/sa/<sa>``; anything else raises IdentityError."""
        if not isinstance(uri, str):
            raise IdentityError(f"SPIFFE ID must be a string, not {type(uri).__name__}")
        if not uri.startswith(SCHEME_PREFIX):
            raise IdentityError(f"SPIFFE ID {uri!r} does not start with {SCHEME_PREFIX!r}")
        for char, part in (("?", "a query"), ("#", "a fragment"), ("%", "percent-encoding")):
            if char in uri:
                raise IdentityError(f"SPIFFE ID {uri!r} must not contain {part}")
        trust_domain, _, path = uri[len(SCHEME_PREFIX) :].partition("/")
        if "@" in trust_domain or ":" in trust_domain:
            raise IdentityError(
                f"SPIFFE ID {uri!r}: trust domain must not contain user info or a port"
            )
        segments = path.split("/")
        if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
            raise IdentityError(
                f"SPIFFE ID {uri!r} does not have the path /ns/<namespace>/sa/<service-account>"
            )
        try:
            return cls(trust_domain, segments[1], segments[3])
        except IdentityError as exc:
            raise IdentityError(f"SPIFFE ID {uri!r}: {exc}") from None

    @classmethod
    def from_sni(cls, name: str, trust_domain: str) -> SpiffeId:
        """Invert `sni`: ``<sa>.<ns>.<trust_domain>`` -> SpiffeId.

        DNS names compare case-insensitively (RFC 4343), so `name` is lowercased first.
        """
        validate_trust_domain(trust_domain)
        suffix = "." + trust_domain
        lowered = name.lower()
        if not lowered.endswith(suffix):
            raise IdentityError(
                f"SNI name {name!r} is not in trust domain {trust_domain!r} "
                f"(expected <sa>.<ns>{suffix})"
            )
        labels = lowered[: -len(suffix)].split(".")
        if len(labels) != 2:
            raise IdentityError(
                f"SNI name {name!r} must be exactly <sa>.<ns>{suffix}, "
                f"found {len(labels)} label(s) before the trust domain"
            )
        service_account, namespace = labels
        try:
            return cls(trust_domain, namespace, service_account)
        except IdentityError as exc:
            raise IdentityError(f"SNI name {name!r}: {exc}") from None

    @property
    def uri(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def sni(self) -> str:
        return f"{self.service_account}.{self.namespace}.{self.trust_domain}"

    def __str__(self) -> str:
        return self.uri


def spiffe_id_from_certificate(cert: x509.Certificate | bytes) -> SpiffeId:
    """The SPIFFE ID of an X.509-SVID, given as a certificate object or DER bytes.

    DER is what ``SSLSocket.getpeercert(binary_form=True)`` returns. The certificate
    must carry exactly one URI SAN (X.509-SVID rule) and it must parse.
    """
    if isinstance(cert, bytes | bytearray | memoryview):
        try:
            cert = x509.load_der_x509_certificate(bytes(cert))
        except ValueError as exc:
            raise IdentityError(f"not a DER-encoded X.509 certificate: {exc}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError(
            f"certificate {cert.subject.rfc4514_string()!r} has no subjectAltName extension"
        ) from None
    except (ValueError, x509.DuplicateExtension) as exc:
        raise IdentityError(f"certificate has malformed extensions: {exc}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise IdentityError(
            f"certificate must carry exactly one URI SAN, found {len(uris)}: {uris!r}"
        )
    return SpiffeId.parse(uris[0])


# --- zone ingress -------------------------------------------------------------------

ZONE_SNI_MARKER = "mz"


@dataclass(frozen=True, slots=True)
class ZoneSni:
    """The SNI of a connection that crosses zones through a zone ingress:

        <service>.<namespace>.<port>.<zone>.mz.<trust-domain>

    It names the service, its namespace, the service port and the zone that
    serves it, and stays a valid DNS name (every part is a DNS label, the port
    is its decimal digits). The ingress routes on it without decrypting; the
    destination node proxy reads it to pick a local endpoint of the service and
    the certificate to present. Five labels before the trust domain, the fifth
    ``mz``, so it never parses as a workload SNI (``<sa>.<ns>.<td>``: two).
    Documented in docs/protocol.md. Pure."""

    service: str
    namespace: str
    port: int
    zone: str
    trust_domain: str

    def __post_init__(self) -> None:
        _check_label(self.service, "service name")
        _check_label(self.namespace, "namespace")
        _check_label(self.zone, "zone")
        validate_trust_domain(self.trust_domain)
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise IdentityError(f"port {self.port!r} is not an integer")
        if not 1 <= self.port <= 65535:
            raise IdentityError(f"port {self.port} is outside 1-65535")
        if len(self.name) > _MAX_DNS_NAME:
            raise IdentityError(
                f"zone SNI {self.name[:60]!r}... is longer than {_MAX_DNS_NAME} characters: "
                "use shorter service, namespace or zone names"
            )

    @property
    def name(self) -> str:
        return (
            f"{self.service}.{self.namespace}.{self.port}.{self.zone}."
            f"{ZONE_SNI_MARKER}.{self.trust_domain}"
        )

    @property
    def authority(self) -> str:
        """The HBONE CONNECT :authority of a tunnel through the ingress."""
        return f"{self.name}:{self.port}"

    @staticmethod
    def shaped(name: str) -> bool:
        """Whether `name` has the shape of a zone SNI in some trust domain (for
        checks that do not know the trust domain, e.g. HBONE's :authority)."""
        labels = name.split(".")
        return (
            len(name) <= _MAX_DNS_NAME
            and len(labels) >= 6
            and labels[4] == ZONE_SNI_MARKER
            and labels[2].isdigit()
            and all(_LABEL.fullmatch(label) for label in labels)
        )

    @classmethod
    def parse(cls, name: str, trust_domain: str) -> ZoneSni:
        """Invert `name`; IdentityError (saying which part is wrong) for anything
        else. Case-insensitive, like every DNS name."""
        validate_trust_domain(trust_domain)
        if not isinstance(name, str) or len(name) > _MAX_DNS_NAME:
            raise IdentityError(f"zone SNI {str(name)[:60]!r} is not a DNS name")
        suffix = f".{ZONE_SNI_MARKER}.{trust_domain}"
        lowered = name.lower()
        if not lowered.endswith(suffix):
            raise IdentityError(
                f"SNI {name!r} is not a zone SNI of trust domain {trust_domain!r} "
                f"(expected <service>.<namespace>.<port>.<zone>{suffix})"
            )
        labels = lowered[: -len(suffix)].split(".")
        if len(labels) != 4:
            raise IdentityError(
                f"SNI {name!r} must be <service>.<namespace>.<port>.<zone>{suffix}, "
                f"found {len(labels)} label(s) before {suffix!r}"
            )
        service, namespace, port, zone = labels
        if not port.isdigit() or len(port) > 5 or (len(port) > 1 and port[0] == "0"):
            raise IdentityError(f"SNI {name!r}: port {port!r} is not a port number")
        try:
            return cls(service, namespace, int(port), zone, trust_domain)
        except IdentityError as exc:
            raise IdentityError(f"SNI {name!r}: {exc}") from None


# --- nodes and the control plane ----------------------------------------------------


def check_node_name(name: str) -> str:
    """`name` if it is usable as a node name (a DNS label), else IdentityError."""
    if not isinstance(name, str) or not _LABEL.fullmatch(name):
        raise IdentityError(
            f"node name {name!r} is not usable: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def node_uri(trust_domain: str, name: str) -> str:
    """The SPIFFE ID of a node's own certificate."""
    return f"{SCHEME_PREFIX}{trust_domain}/node/{name}"


def controlplane_uri(trust_domain: str) -> str:
    """The SPIFFE ID of the control plane's serving certificate."""
    return f"{SCHEME_PREFIX}{trust_domain}/controlplane"


def node_name_from_certificate(cert: x509.Certificate, trust_domain: str) -> str | None:
    """The node name of a node certificate of `trust_domain` (exactly one URI SAN
    ``spiffe://<td>/node/<name>``), or None for anything else."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError, x509.DuplicateExtension):
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    prefix = node_uri(trust_domain, "")
    if len(uris) != 1 or not uris[0].startswith(prefix):
        return None
    name = uris[0][len(prefix) :]
    return name if _LABEL.fullmatch(name) else None


def zone_controlplane_uri(trust_domain: str, zone: str) -> str:
    """The SPIFFE ID of a zone control plane's client certificate, with which it
    authenticates to the global control plane: ``spiffe://<td>/zone/<zone>/controlplane``.
    IdentityError unless `zone` is a DNS label."""
    if not isinstance(zone, str):
        raise IdentityError(f"zone must be a string, not {type(zone).__name__}")
    _check_label(zone, "zone")
    return f"{SCHEME_PREFIX}{trust_domain}/zone/{zone}/controlplane"


def zone_of_controlplane_certificate(cert: x509.Certificate, trust_domain: str) -> str | None:
    """The zone of a zone control plane's certificate of `trust_domain` (exactly one
    URI SAN ``spiffe://<td>/zone/<zone>/controlplane`` with `zone` a DNS label), or
    None for anything else."""
    uri = _only_uri_san(cert)
    prefix = f"{SCHEME_PREFIX}{trust_domain}/zone/"
    suffix = "/controlplane"
    if (
        uri is None
        or len(uri) <= len(prefix) + len(suffix)
        or not uri.startswith(prefix)
        or not uri.endswith(suffix)
    ):
        return None
    zone = uri[len(prefix) : -len(suffix)]
    return zone if _LABEL.fullmatch(zone) else None


def _only_uri_san(cert: x509.Certificate) -> str | None:
    """The URI SAN of `cert` when it carries exactly one, else None."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError, x509.DuplicateExtension):
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 else None


def single_uri_san(der: bytes | None) -> str:
    """The single URI SAN of a DER certificate ("" if none, several, or not a
    certificate), for identities that are not workload SPIFFE IDs (the control
    plane, a node)."""
    if not der:
        return ""
    try:
        cert = x509.load_der_x509_certificate(der)
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, x509.ExtensionNotFound, x509.DuplicateExtension):
        return ""
    uris = ext.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 else ""
