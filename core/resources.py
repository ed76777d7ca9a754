"""Mesh resources as YAML documents, kubectl-style, validated down to the field.

Pure: text or dicts in, frozen values out, no I/O. ``meshnode apply -f`` and the lab
read files with :func:`parse_documents`; snapshots carry resources as JSON with
:func:`resources_to_json` / :func:`resources_from_json`.

Every document is a mapping ``{kind, metadata: {name, namespace?}, spec}``. Errors are
:class:`ResourceError` and name the document and the field path, e.g.::

    policy.yaml: document 2 (AuthorizationPolicy deny-web): spec.rules[0].from.principals[1]:
    "spiffe://x" is not a SPIFFE ID (expected spiffe://<trust-domain>/ns/<ns>/sa/<sa>)

Unknown fields, empty lists, explicit nulls and duplicate YAML keys are errors, so a
typo never silently widens or narrows a policy. A set of documents is accepted whole
or not at all.

Kinds (semantics of AuthorizationPolicy are Istio's, enforced by ztunnel/authz.py):

- ``AuthorizationPolicy``: ``action`` ALLOW|DENY; optional ``selector.services`` (no
  selector = every workload in metadata.namespace); ``rules``, each with optional
  ``from`` (principals, namespaces, services and their ``not_`` forms) and ``to``
  (ports, not_ports). A rule matches when every field present matches (AND across
  fields, OR within a list); a rule with neither ``from`` nor ``to`` matches every
  connection. **Empty rules**: an ALLOW policy with no rules allows nothing (it still
  applies, so it denies everything it selects that no other ALLOW policy allows); a
  DENY policy with no rules denies nothing.
- ``PeerAuthentication``: ``mode`` STRICT|PERMISSIVE, optional ``selector``.
- ``TrafficSplit``: ``service`` and either ``weights`` {version: int >= 0} or
  ``zones`` {zone: int >= 0}, one weight > 0.
- ``MeshConfig``: mesh-wide, named ``default``; ``authorization.default_action``
  (ALLOW|DENY, default ALLOW) applies where no ALLOW policy does; ``dns.domain``
  (default ``mesh``) is the domain of mesh DNS names (docs/dns.md).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

import yaml

from meshnode.core.errors import MeshnodeError
from meshnode.core.identity import IdentityError, SpiffeId

__all__ = [
    "ACTIONS",
    "ALLOW",
    "DEFAULT_NAMESPACE",
    "IdentityGrant",
    "DENY",
    "KINDS",
    "MODES",
    "PERMISSIVE",
    "STRICT",
    "AuthorizationPolicy",
    "Destination",
    "MeshConfig",
    "PeerAuthentication",
    "Resource",
    "ResourceError",
    "Rule",
    "Selector",
    "Source",
    "TrafficSplit",
    "dump_documents",
    "qualify_service",
    "parse_documents",
    "resource_from_dict",
    "resources_from_json",
    "resources_to_json",
]

ALLOW = "ALLOW"
DENY = "DENY"
ACTIONS = (ALLOW, DENY)
STRICT = "STRICT"
PERMISSIVE = "PERMISSIVE"
MODES = (STRICT, PERMISSIVE)
DEFAULT_NAMESPACE = "default"
MESH_CONFIG_NAME = "default"

# RFC 1123 label, lowercase only (the same rule as SPIFFE ID namespaces and accounts).
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_SPIFFE_SHAPE = "spiffe://<trust-domain>/ns/<ns>/sa/<sa>"


class ResourceError(MeshnodeError, ValueError):
    """A resource document is invalid.

    ``where`` locates the document (``policy.yaml: document 2 (AuthorizationPolicy
    deny-web)`` or ``policy.yaml: line 3, column 7``), ``path`` is the field
    (``spec.rules[0].from.principals[1]``, empty for the whole document) and
    ``problem`` says what is wrong with it.
    """

    def __init__(self, problem: str, path: str = "", where: str = "") -> None:
        self.problem = problem
        self.path = path
        self.where = where
        super().__init__(": ".join(part for part in (where, path, problem) if part))

    def within(self, prefix: str) -> ResourceError:
        """The same error seen from the enclosing field `prefix`."""
        return ResourceError(self.problem, _join(prefix, self.path), self.where)

    def located(self, where: str) -> ResourceError:
        return ResourceError(self.problem, self.path, where)


# --- field helpers ----------------------------------------------------------------


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


@contextmanager
def _at(prefix: str) -> Iterator[None]:
    """Errors raised inside are re-raised with their path under `prefix`."""
    try:
        yield
    except ResourceError as exc:
        raise exc.within(prefix) from None


def _show(value: object) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(value: object) -> str:
    """'a string "80"', 'an integer 0', 'null', for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, int):
        kind = "an integer"
    elif isinstance(value, float):
        kind = "a number"
    elif isinstance(value, str):
        kind = "a string"
    elif isinstance(value, list):
        kind = "a list"
    elif isinstance(value, dict):
        kind = "a mapping"
    else:
        kind = f"a {type(value).__name__}"
    return f"{kind} {_show(value)}"


def _fields(value: object, allowed: Sequence[str], required: Sequence[str] = ()) -> dict[Any, Any]:
    """`value` as a mapping with only `allowed` keys and all `required` ones."""
    if not isinstance(value, dict):
        raise ResourceError(f"expected a mapping, found {_describe(value)}")
    for key in value:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            raise ResourceError(f"unknown field (allowed: {', '.join(allowed)}){hint}", str(key))
    for key in required:
        if key not in value:
            raise ResourceError("required field is missing", key)
    return value


def _list(value: object, empty_hint: str | None = None) -> tuple[Any, ...]:
    """`value` as a tuple; with `empty_hint`, an empty list is an error that says why."""
    if not isinstance(value, list):
        raise ResourceError(f"expected a list, found {_describe(value)}")
    if not value and empty_hint is not None:
        raise ResourceError(f"must not be empty ({empty_hint})")
    return tuple(value)


def _check_label(value: object, path: str) -> None:
    if not isinstance(value, str):
        raise ResourceError(f"expected a string (a DNS label), found {_describe(value)}", path)
    if not _LABEL.fullmatch(value):
        raise ResourceError(
            f"{_show(value)} is not a DNS label (1-63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit)",
            path,
        )


def _check_choice(value: object, choices: Sequence[str], path: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ResourceError(f"{_show(value)} is not one of {', '.join(choices)}", path)


def _check_port(value: object, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ResourceError(
            f"expected a port number (an integer 1-65535), found {_describe(value)}", path
        )
    if not 1 <= value <= 65535:
        raise ResourceError(f"port {value} is out of range 1-65535", path)


# Suffixes that complete any proper prefix of a SPIFFE ID into a valid one: finish the
# current label (or not), then add the segments still missing.
_COMPLETIONS = (
    "",
    "a",
    "/a",
    "a/a",
    "sa/a",
    "/sa/a",
    "a/sa/a",
    "/a/sa/a",
    "s/a/sa/a",
    "ns/a/sa/a",
    "/ns/a/sa/a",
    "a/ns/a/sa/a",
)


def _is_spiffe_prefix(prefix: str) -> bool:
    if not prefix.startswith("spiffe://"):
        return False
    for completion in _COMPLETIONS:
        try:
            SpiffeId.parse(prefix + completion)
        except IdentityError:
            continue
        return True
    return False


def _check_principal(value: object, path: str) -> None:
    """A SPIFFE ID, or a prefix of one that ends at a segment boundary followed by
    ``*`` (``spiffe://td/ns/prod/*``): a wildcard stands for whole path segments, so
    ``ns/prod/*`` can never also match ``ns/prod-evil``."""
    if not isinstance(value, str):
        raise ResourceError(f"expected a string (a SPIFFE ID), found {_describe(value)}", path)
    if "*" in value:
        prefix = value[:-1]
        if not value.endswith("*") or "*" in prefix or not _is_spiffe_prefix(prefix):
            raise ResourceError(
                f"{_show(value)} is not a SPIFFE ID prefix followed by one trailing '*' "
                "(e.g. spiffe://<trust-domain>/ns/<ns>/sa/*)",
                path,
            )
        if not prefix.endswith("/"):
            cut = prefix.rsplit("/", 1)[0] + "/"
            raise ResourceError(
                f"{_show(value)}: a wildcard must stand for whole path segments, so it must "
                f"follow a '/' (write {_show(cut + '*')} or list the exact IDs); otherwise "
                f"{_show(prefix)} would also match every ID that merely starts with it",
                path,
            )
        return
    try:
        SpiffeId.parse(value)
    except IdentityError:
        raise ResourceError(
            f"{_show(value)} is not a SPIFFE ID (expected {_SPIFFE_SHAPE})", path
        ) from None


def _check_service_ref(value: object, path: str) -> None:
    """``<service>`` (in the policy's own namespace) or ``<namespace>/<service>``."""
    if not isinstance(value, str):
        raise ResourceError(f"expected a service name, found {_describe(value)}", path)
    parts = value.split("/")
    if len(parts) > 2:
        raise ResourceError(
            f"{_show(value)} is not a service: use <service> (same namespace as the policy) "
            "or <namespace>/<service>",
            path,
        )
    for part in parts:
        _check_label(part, path)


def qualify_service(ref: str, namespace: str) -> str:
    """A service reference as ``<namespace>/<service>``: a bare name is taken to be
    in `namespace` (the policy's)."""
    return ref if "/" in ref else f"{namespace}/{ref}"


def _check_metadata(name: object, namespace: object) -> None:
    _check_label(name, "metadata.name")
    _check_label(namespace, "metadata.namespace")


def _document_parts(kind: str, data: object) -> tuple[Any, Any, Any]:
    """(name, namespace, spec) of a document of `kind`; values not yet validated."""
    doc = _fields(data, ("kind", "metadata", "spec"), ("kind", "metadata", "spec"))
    if doc["kind"] != kind:
        raise ResourceError(f"expected {kind}, found {_show(doc['kind'])}", "kind")
    with _at("metadata"):
        meta = _fields(doc["metadata"], ("name", "namespace"), ("name",))
    return meta["name"], meta.get("namespace", DEFAULT_NAMESPACE), doc["spec"]


def _document(kind: str, name: str, namespace: str | None, spec: dict[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {"kind": kind, "metadata": metadata, "spec": spec}


# --- shared pieces ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Selector:
    """The workloads (by service name) a policy applies to, within its namespace."""

    services: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.services:
            raise ResourceError(
                "must not be empty (omit the selector to select every workload in the namespace)",
                "services",
            )
        for i, service in enumerate(self.services):
            _check_label(service, f"services[{i}]")

    def to_dict(self) -> dict[str, Any]:
        return {"services": list(self.services)}

    @classmethod
    def from_dict(cls, data: object) -> Selector:
        spec = _fields(data, ("services",), ("services",))
        with _at("services"):
            services = _list(spec["services"])
        return cls(services)


def _selector_from(spec: dict[str, Any]) -> Selector | None:
    if "selector" not in spec:
        return None
    with _at("selector"):
        return Selector.from_dict(spec["selector"])


_ANY_HINT = "omit the field to match any"


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """``from`` of a rule. An empty tuple means the field is absent (matches any)."""

    principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    not_services: tuple[str, ...] = ()

    FIELDS: ClassVar[tuple[str, ...]] = (
        "principals",
        "namespaces",
        "services",
        "not_principals",
        "not_namespaces",
        "not_services",
    )

    def __post_init__(self) -> None:
        for name in self.FIELDS:
            check = (
                _check_principal
                if name.endswith("principals")
                else _check_service_ref
                if name.endswith("services")
                else _check_label
            )
            for i, value in enumerate(getattr(self, name)):
                check(value, f"{name}[{i}]")

    def is_empty(self) -> bool:
        return not any(getattr(self, name) for name in self.FIELDS)

    def to_dict(self) -> dict[str, Any]:
        return {name: list(getattr(self, name)) for name in self.FIELDS if getattr(self, name)}

    @classmethod
    def from_dict(cls, data: object) -> Source:
        spec = _fields(data, cls.FIELDS)
        values: dict[str, tuple[str, ...]] = {}
        for name in cls.FIELDS:
            if name in spec:
                with _at(name):
                    values[name] = _list(spec[name], _ANY_HINT)
        return cls(**values)


@dataclass(frozen=True, slots=True, kw_only=True)
class Destination:
    """``to`` of a rule: destination ports. An empty tuple means absent (any port)."""

    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()

    FIELDS: ClassVar[tuple[str, ...]] = ("ports", "not_ports")

    def __post_init__(self) -> None:
        for name in self.FIELDS:
            for i, port in enumerate(getattr(self, name)):
                _check_port(port, f"{name}[{i}]")

    def is_empty(self) -> bool:
        return not (self.ports or self.not_ports)

    def to_dict(self) -> dict[str, Any]:
        return {name: list(getattr(self, name)) for name in self.FIELDS if getattr(self, name)}

    @classmethod
    def from_dict(cls, data: object) -> Destination:
        spec = _fields(data, cls.FIELDS)
        values: dict[str, tuple[int, ...]] = {}
        for name in cls.FIELDS:
            if name in spec:
                with _at(name):
                    values[name] = _list(spec[name], _ANY_HINT)
        return cls(**values)


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One rule: matches when `from_` and `to` both match; an empty rule matches all."""

    from_: Source = field(default_factory=Source)
    to: Destination = field(default_factory=Destination)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if not self.from_.is_empty():
            out["from"] = self.from_.to_dict()
        if not self.to.is_empty():
            out["to"] = self.to.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: object) -> Rule:
        spec = _fields(data, ("from", "to"))
        with _at("from"):
            source = Source.from_dict(spec["from"]) if "from" in spec else Source()
        with _at("to"):
            destination = Destination.from_dict(spec["to"]) if "to" in spec else Destination()
        return cls(from_=source, to=destination)


# --- kinds --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizationPolicy:
    """L4 allow/deny for connections to the selected workloads (Istio semantics).

    No selector: every workload in `namespace`. No rules: ALLOW allows nothing, DENY
    denies nothing.
    """

    kind: ClassVar[str] = "AuthorizationPolicy"

    name: str
    namespace: str = DEFAULT_NAMESPACE
    action: str
    selector: Selector | None = None
    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        _check_metadata(self.name, self.namespace)
        _check_choice(self.action, ACTIONS, "spec.action")

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    @property
    def ref(self) -> str:
        """``namespace/name``, how decisions and logs name the policy."""
        return f"{self.namespace}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"action": self.action}
        if self.selector is not None:
            spec["selector"] = self.selector.to_dict()
        spec["rules"] = [rule.to_dict() for rule in self.rules]
        return _document(self.kind, self.name, self.namespace, spec)

    @classmethod
    def from_dict(cls, data: object) -> AuthorizationPolicy:
        name, namespace, raw = _document_parts(cls.kind, data)
        with _at("spec"):
            spec = _fields(raw, ("action", "selector", "rules"), ("action",))
            selector = _selector_from(spec)
            rules: list[Rule] = []
            with _at("rules"):
                for i, rule in enumerate(_list(spec.get("rules", []))):
                    with _at(f"[{i}]"):
                        rules.append(Rule.from_dict(rule))
        return cls(
            name=name,
            namespace=namespace,
            action=spec["action"],
            selector=selector,
            rules=tuple(rules),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerAuthentication:
    """Whether the selected workloads accept plaintext (PERMISSIVE) or only mTLS."""

    kind: ClassVar[str] = "PeerAuthentication"

    name: str
    namespace: str = DEFAULT_NAMESPACE
    mode: str
    selector: Selector | None = None

    def __post_init__(self) -> None:
        _check_metadata(self.name, self.namespace)
        _check_choice(self.mode, MODES, "spec.mode")

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    def to_dict(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"mode": self.mode}
        if self.selector is not None:
            spec["selector"] = self.selector.to_dict()
        return _document(self.kind, self.name, self.namespace, spec)

    @classmethod
    def from_dict(cls, data: object) -> PeerAuthentication:
        name, namespace, raw = _document_parts(cls.kind, data)
        with _at("spec"):
            spec = _fields(raw, ("mode", "selector"), ("mode",))
            selector = _selector_from(spec)
        return cls(name=name, namespace=namespace, mode=spec["mode"], selector=selector)


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficSplit:
    """Weighted split of `service`'s connections, across endpoint versions
    (``weights``) or across zones (``zones``): exactly one of the two."""

    kind: ClassVar[str] = "TrafficSplit"
    _BOTH: ClassVar[str] = (
        'give "weights" (a split by version) or "zones" (a split by zone), not both: '
        "a TrafficSplit splits its service one way"
    )

    name: str
    namespace: str = DEFAULT_NAMESPACE
    service: str
    weights: tuple[tuple[str, int], ...] = ()  # (version, weight), in document order
    zones: tuple[tuple[str, int], ...] = ()  # (zone, weight), in document order

    def __post_init__(self) -> None:
        _check_metadata(self.name, self.namespace)
        _check_label(self.service, "spec.service")
        if self.weights and self.zones:
            raise ResourceError(self._BOTH, "spec")
        if self.zones:
            self._check_weights(self.zones, "spec.zones", "zone")
        else:
            self._check_weights(self.weights, "spec.weights", "version")

    @staticmethod
    def _check_weights(pairs: tuple[tuple[str, int], ...], path: str, what: str) -> None:
        """{label: int >= 0}, at least one entry and one weight > 0, no label twice."""
        if not pairs:
            raise ResourceError(f"must name at least one {what}", path)
        seen: set[str] = set()
        for label, weight in pairs:
            at = f"{path}.{label}"
            _check_label(label, at)
            if label in seen:
                raise ResourceError(f"{what} appears twice", at)
            seen.add(label)
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                raise ResourceError(
                    f"weight must be an integer >= 0, found {_describe(weight)}", at
                )
        if not any(weight > 0 for _, weight in pairs):
            raise ResourceError("at least one weight must be > 0", path)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    def to_dict(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"service": self.service}
        if self.zones:
            spec["zones"] = dict(self.zones)
        else:
            spec["weights"] = dict(self.weights)
        return _document(self.kind, self.name, self.namespace, spec)

    @classmethod
    def from_dict(cls, data: object) -> TrafficSplit:
        name, namespace, raw = _document_parts(cls.kind, data)
        with _at("spec"):
            spec = _fields(raw, ("service", "weights", "zones"), ("service",))
            given = [key for key in ("weights", "zones") if key in spec]
            if not given:
                raise ResourceError(
                    'required field is missing: "weights" (a split by version) or '
                    '"zones" (a split by zone)'
                )
            if len(given) > 1:
                raise ResourceError(cls._BOTH)
            (key,) = given
            value = spec[key]
            what = "version" if key == "weights" else "zone"
            if not isinstance(value, dict):
                raise ResourceError(
                    f"expected a mapping of {what} to weight, found {_describe(value)}", key
                )
            if not value:
                raise ResourceError(f"must name at least one {what}", key)
            pairs = tuple(value.items())
        return cls(
            name=name,
            namespace=namespace,
            service=spec["service"],
            weights=pairs if key == "weights" else (),
            zones=pairs if key == "zones" else (),
        )


DEFAULT_DNS_DOMAIN = "mesh"


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshConfig:
    """Mesh-wide settings; exactly one, named ``default`` (no namespace)."""

    kind: ClassVar[str] = "MeshConfig"

    name: str = MESH_CONFIG_NAME
    namespace: str = DEFAULT_NAMESPACE
    default_action: str = ALLOW  # spec.authorization.default_action
    dns_domain: str = DEFAULT_DNS_DOMAIN  # spec.dns.domain

    def __post_init__(self) -> None:
        for i, label in enumerate(self.dns_domain.split(".") if self.dns_domain else [""]):
            _check_label(label, f"spec.dns.domain (label {i + 1})")
        if self.name != MESH_CONFIG_NAME:
            raise ResourceError(
                f'MeshConfig must be named "{MESH_CONFIG_NAME}" (one per mesh), '
                f"found {_show(self.name)}",
                "metadata.name",
            )
        if self.namespace != DEFAULT_NAMESPACE:
            raise ResourceError(
                f"MeshConfig is mesh-wide: omit metadata.namespace, found {_show(self.namespace)}",
                "metadata.namespace",
            )
        _check_choice(self.default_action, ACTIONS, "spec.authorization.default_action")

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    def to_dict(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"authorization": {"default_action": self.default_action}}
        if self.dns_domain != DEFAULT_DNS_DOMAIN:
            spec["dns"] = {"domain": self.dns_domain}
        return _document(self.kind, self.name, None, spec)

    @classmethod
    def from_dict(cls, data: object) -> MeshConfig:
        name, namespace, raw = _document_parts(cls.kind, data)
        with _at("spec"):
            spec = _fields(raw, ("authorization", "dns"))
            default_action: Any = ALLOW
            domain: Any = DEFAULT_DNS_DOMAIN
            if "authorization" in spec:
                with _at("authorization"):
                    authz = _fields(spec["authorization"], ("default_action",), ("default_action",))
                default_action = authz["default_action"]
            if "dns" in spec:
                with _at("dns"):
                    dns = _fields(spec["dns"], ("domain",), ("domain",))
                domain = dns["domain"]
                if not isinstance(domain, str):
                    raise ResourceError(
                        f"expected a domain name, found {_describe(domain)}", "spec.dns.domain"
                    )
        return cls(name=name, namespace=namespace, default_action=default_action, dns_domain=domain)


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityGrant:
    """Which nodes may host which workload identities (mesh-wide, no namespace).

    The control plane signs a workload certificate, and lists a workload as an
    endpoint, only when a grant names the calling node (by name or zone) and the
    identity (``<namespace>/<service-account>``, or ``<namespace>/*`` for every
    service account of a namespace). A node never grants itself anything."""

    kind: ClassVar[str] = "IdentityGrant"

    name: str
    namespace: str = DEFAULT_NAMESPACE
    nodes: tuple[str, ...] = ()
    zones: tuple[str, ...] = ()
    identities: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_label(self.name, "metadata.name")
        if self.namespace != DEFAULT_NAMESPACE:
            raise ResourceError(
                "IdentityGrant is mesh-wide: omit metadata.namespace, found "
                f"{_show(self.namespace)}",
                "metadata.namespace",
            )
        if not self.nodes and not self.zones:
            raise ResourceError("name at least one node or zone the grant is for", "spec")
        for i, node in enumerate(self.nodes):
            _check_label(node, f"spec.nodes[{i}]")
        for i, zone in enumerate(self.zones):
            _check_label(zone, f"spec.zones[{i}]")
        if not self.identities:
            raise ResourceError(
                "must name at least one identity, as <namespace>/<service-account>",
                "spec.identities",
            )
        for i, ident in enumerate(self.identities):
            _check_identity_ref(ident, f"spec.identities[{i}]")

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    def covers_node(self, node: str, zone: str) -> bool:
        return node in self.nodes or (bool(zone) and zone in self.zones)

    def covers_identity(self, namespace: str, service_account: str) -> bool:
        return any(
            ident in (f"{namespace}/{service_account}", f"{namespace}/*")
            for ident in self.identities
        )

    def to_dict(self) -> dict[str, Any]:
        spec: dict[str, Any] = {}
        if self.nodes:
            spec["nodes"] = list(self.nodes)
        if self.zones:
            spec["zones"] = list(self.zones)
        spec["identities"] = list(self.identities)
        return _document(self.kind, self.name, None, spec)

    @classmethod
    def from_dict(cls, data: object) -> IdentityGrant:
        name, namespace, raw = _document_parts(cls.kind, data)
        values: dict[str, tuple[str, ...]] = {}
        with _at("spec"):
            spec = _fields(raw, ("nodes", "zones", "identities"), ("identities",))
            for field_name in ("nodes", "zones", "identities"):
                if field_name in spec:
                    with _at(field_name):
                        values[field_name] = _list(spec[field_name])
        return cls(name=name, namespace=namespace, **values)


def _check_identity_ref(value: object, path: str) -> None:
    """``<namespace>/<service-account>`` or ``<namespace>/*``."""
    if not isinstance(value, str) or value.count("/") != 1:
        raise ResourceError(
            f"{_show(value)} is not an identity: use <namespace>/<service-account> "
            "(or <namespace>/* for all of a namespace)",
            path,
        )
    namespace, service_account = value.split("/")
    _check_label(namespace, path)
    if service_account != "*":
        _check_label(service_account, path)


Resource: TypeAlias = (
    AuthorizationPolicy | PeerAuthentication | TrafficSplit | MeshConfig | IdentityGrant
)

KINDS: dict[str, Callable[[object], Resource]] = {
    cls.kind: cls.from_dict
    for cls in (AuthorizationPolicy, PeerAuthentication, TrafficSplit, MeshConfig, IdentityGrant)
}


def resource_from_dict(data: object) -> Resource:
    """One document (already loaded from YAML/JSON) -> its resource, dispatched on kind."""
    if not isinstance(data, dict):
        raise ResourceError(
            f"expected a mapping with kind, metadata and spec, found {_describe(data)}"
        )
    if "kind" not in data:
        raise ResourceError("required field is missing", "kind")
    kind = data["kind"]
    if not isinstance(kind, str) or kind not in KINDS:
        raise ResourceError(
            f"unknown kind {_show(kind)} (known: {', '.join(sorted(KINDS))})", "kind"
        )
    return KINDS[kind](data)


# --- sets of documents ----------------------------------------------------------


def _label(data: object) -> str:
    """``(AuthorizationPolicy deny-web)`` from a raw document, as far as it is readable."""
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        return ""
    metadata = data.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return f" ({data['kind']} {name})" if isinstance(name, str) else f" ({data['kind']})"


def _parse_all(items: Iterable[tuple[str, object]]) -> list[Resource]:
    """Parse (where, document) pairs; also reject duplicates within the set."""
    resources: list[Resource] = []
    seen: dict[tuple[str, str, str], str] = {}
    splits: dict[tuple[str, str], str] = {}
    for where, data in items:
        try:
            resource = resource_from_dict(data)
        except ResourceError as exc:
            raise exc.located(where) from None
        if resource.key in seen:
            raise ResourceError(
                f"{resource.kind} {resource.namespace}/{resource.name} is already defined by "
                f"{seen[resource.key]}",
                "metadata.name",
                where,
            )
        seen[resource.key] = where
        if isinstance(resource, TrafficSplit):
            target = (resource.namespace, resource.service)
            if target in splits:
                raise ResourceError(
                    f'service "{resource.service}" is already split by {splits[target]}',
                    "spec.service",
                    where,
                )
            splits[target] = where
        resources.append(resource)
    return resources


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` may be overridden on purpose
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {_show(key)}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def _yaml_error(exc: yaml.YAMLError, source: str) -> ResourceError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return ResourceError(
            f"invalid YAML: {problem}",
            where=f"{source}: line {mark.line + 1}, column {mark.column + 1}",
        )
    return ResourceError(f"invalid YAML: {problem}", where=source)


def parse_documents(text: str, source: str = "<input>") -> list[Resource]:
    """All resources of a multi-document YAML text, or ResourceError naming the first
    bad document and field. `source` (a file name) prefixes error messages. Empty
    documents (a stray ``---``) are skipped but keep their number."""
    try:
        documents = list(yaml.load_all(text, Loader=_StrictLoader))
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    return _parse_all(
        (f"{source}: document {index}{_label(data)}", data)
        for index, data in enumerate(documents, 1)
        if data is not None
    )


def dump_documents(resources: Iterable[Resource]) -> str:
    """Resources as multi-document YAML that :func:`parse_documents` reads back."""
    return yaml.safe_dump_all(
        [resource.to_dict() for resource in resources],
        sort_keys=False,
        default_flow_style=False,
        explicit_start=True,
    )


def resources_to_json(resources: Iterable[Resource]) -> list[dict[str, Any]]:
    """JSON-ready dicts (for snapshots); :func:`resources_from_json` inverts this."""
    return [resource.to_dict() for resource in resources]


def resources_from_json(items: object, source: str = "<json>") -> list[Resource]:
    """Validate and build resources from :func:`resources_to_json` output (all or none)."""
    if not isinstance(items, list):
        raise ResourceError(f"expected a list of resources, found {_describe(items)}", where=source)
    return _parse_all(
        (f"{source}: resources[{index}]{_label(data)}", data) for index, data in enumerate(items)
    )
