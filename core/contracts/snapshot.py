"""The ztunnel snapshot (agent -> ztunnel), schema ``SNAPSHOT_SCHEMA``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from meshnode.core.contracts.documents import NodeDoc, Revocation, ServiceDoc
from meshnode.core.contracts.validate import (
    ContractError,
    Fields,
    check_identity,
    check_trust_domain,
    parse_resource,
)
from meshnode.core.identity import SpiffeId
from meshnode.core.resources import (
    DEFAULT_DNS_DOMAIN,
    AuthorizationPolicy,
    MeshConfig,
    ResourceError,
)

SNAPSHOT_SCHEMA = 4  # 2: revoked; 3: dns_domain; 4: services[].zone_split


@dataclass(frozen=True, slots=True)
class SnapshotWorkload:
    """A workload in the snapshot; ``cert``/``key`` (paths) only for local ones."""

    id: int
    name: str
    namespace: str
    service_account: str
    node: str
    address: str
    port: int
    service: str = ""
    cert: str | None = None
    key: str | None = None

    def identity(self, trust_domain: str) -> SpiffeId:
        return SpiffeId(trust_domain, self.namespace, self.service_account)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "namespace": self.namespace,
            "service_account": self.service_account,
            "node": self.node,
            "address": self.address,
            "port": self.port,
            "service": self.service,
            "cert": self.cert,
            "key": self.key,
        }

    @classmethod
    def from_json(cls, obj: object, path: str = "workload") -> SnapshotWorkload:
        f = Fields(
            obj,
            path,
            (
                "id",
                "name",
                "namespace",
                "service_account",
                "node",
                "address",
                "port",
                "service",
                "cert",
                "key",
            ),
        )
        wid = f.integer("id")
        if wid < 0:
            raise ContractError(f"{f.at('id')}: {wid} is negative")
        return cls(
            id=wid,
            name=f.label("name"),
            namespace=f.label("namespace"),
            service_account=f.label("service_account"),
            node=f.label("node"),
            address=f.ip("address"),
            port=f.port("port"),
            service=f.label("service", ""),
            cert=f.string("cert", None),
            key=f.string("key", None),
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything ztunnel needs, schema ``SNAPSHOT_SCHEMA``."""

    version: int
    node: NodeDoc
    trust_domain: str
    trust_bundle: str  # path of the PEM roots
    bpf_pin_dir: str | None = None  # bpffs dir with the original-destination map
    workloads: tuple[SnapshotWorkload, ...] = ()
    services: tuple[ServiceDoc, ...] = ()
    policies: tuple[AuthorizationPolicy, ...] = ()
    authorization_default: Literal["ALLOW", "DENY"] = "ALLOW"
    revoked: tuple[Revocation, ...] = ()  # deleted nodes (documents.Revocation)
    dns_domain: str = DEFAULT_DNS_DOMAIN  # mesh DNS names: <service>.<namespace>.<domain>

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SNAPSHOT_SCHEMA,
            "version": self.version,
            "node": self.node.to_json(),
            "trust_domain": self.trust_domain,
            "trust_bundle": self.trust_bundle,
            "bpf_pin_dir": self.bpf_pin_dir,
            "workloads": [w.to_json() for w in self.workloads],
            "services": [s.to_json() for s in self.services],
            "policies": [p.to_dict() for p in self.policies],
            "authorization_default": self.authorization_default,
            "revoked": [r.to_json() for r in self.revoked],
            "dns_domain": self.dns_domain,
        }

    @classmethod
    def from_json(cls, obj: object, path: str = "snapshot") -> Snapshot:
        f = Fields(
            obj,
            path,
            (
                "schema",
                "version",
                "node",
                "trust_domain",
                "trust_bundle",
                "bpf_pin_dir",
                "workloads",
                "services",
                "policies",
                "authorization_default",
                "revoked",
                "dns_domain",
            ),
        )
        schema = f.obj.get("schema")
        if schema != SNAPSHOT_SCHEMA or isinstance(schema, bool):
            raise ContractError(
                f"{f.at('schema')}: snapshot schema {schema!r} is not "
                f"{SNAPSHOT_SCHEMA}; run the same meshnode version for the "
                "agent and ztunnel"
            )
        td = check_trust_domain(f.raw("trust_domain"), f.at("trust_domain"))
        workloads = tuple(SnapshotWorkload.from_json(w, p) for w, p in f.items("workloads"))
        services = tuple(ServiceDoc.from_json(s, p) for s, p in f.items("services"))
        for (_, wpath), w in zip(f.items("workloads"), workloads, strict=True):
            check_identity(td, w.namespace, w.service_account, wpath)
        policies = []
        for raw, ppath in f.items("policies", []):
            policy = parse_resource(raw, ppath)
            if not isinstance(policy, AuthorizationPolicy):
                raise ContractError(f"{ppath}: a {policy.kind}, not an AuthorizationPolicy")
            policies.append(policy)
        default = f.raw("authorization_default", "ALLOW")
        if default not in ("ALLOW", "DENY"):
            raise ContractError(
                f"{f.at('authorization_default')}: {default!r} is not ALLOW or DENY"
            )
        return cls(
            version=f.integer("version"),
            node=NodeDoc.from_json(f.raw("node"), f.at("node")),
            trust_domain=td,
            trust_bundle=f.string("trust_bundle"),
            bpf_pin_dir=f.string("bpf_pin_dir", None),
            workloads=workloads,
            services=services,
            policies=tuple(policies),
            authorization_default=default,
            revoked=tuple(Revocation.from_json(r, p) for r, p in f.items("revoked", [])),
            dns_domain=_dns_domain(f.raw("dns_domain", DEFAULT_DNS_DOMAIN), f.at("dns_domain")),
        )


def _dns_domain(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ContractError(f"{path}: expected a domain name, found {type(value).__name__}")
    try:
        return MeshConfig(dns_domain=value).dns_domain
    except ResourceError as exc:
        raise ContractError(f"{path}: {exc}") from None
