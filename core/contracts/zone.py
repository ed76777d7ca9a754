"""The sync between a zone control plane and the global control plane
(docs/multizone.md, docs/protocol.md "Across zones").

- Up, ``PUT /v1/zone/state``: a zone's :class:`ZoneState`, what other zones need
  of it: its ingress address and, per service with endpoints in the zone, the
  service port, the one identity its endpoints prove across zones and how many
  there are. Never a node's name or address.
- Down, ``GET /v1/zone/config?after=<revision>`` (a long poll): a
  :class:`ZoneConfig`, the global's policies and identity grants and the other
  zones' states; or :class:`ZoneUnchanged` when nothing changed in the poll.

Both ends are authenticated by mutual TLS (the zone by its certificate
``spiffe://<td>/zone/<zone>/controlplane``). Every answer is whole, not a delta:
a zone that missed any number of revisions (or restarted) is up to date after one
answer, and a state push is idempotent (the global keeps the highest
``generation``). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from meshnode.core.contracts.documents import RemoteZoneDoc
from meshnode.core.contracts.validate import ContractError, Fields, check_trust_domain
from meshnode.core.resources import Resource, ResourceError, resource_from_dict

__all__ = [
    "MAX_ZONE_SERVICES",
    "ZoneAnswer",
    "ZoneConfig",
    "ZoneService",
    "ZoneState",
    "ZoneUnchanged",
    "parse_zone_answer",
]

# Services one zone may publish; a state beyond it is refused (a zone cannot make
# every other zone's nodes hold an unbounded list).
MAX_ZONE_SERVICES = 10_000


@dataclass(frozen=True, slots=True)
class ZoneService:
    """One service with endpoints in a zone, as other zones see it."""

    namespace: str
    name: str
    port: int  # the service port (what the zone SNI names)
    service_account: str  # the identity its endpoints prove across zones
    endpoints: int  # how many (a weight)

    FIELDS = ("namespace", "name", "port", "service_account", "endpoints")

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.FIELDS}

    @classmethod
    def from_json(cls, obj: object, path: str = "service") -> ZoneService:
        f = Fields(obj, path, cls.FIELDS)
        return cls(
            namespace=f.label("namespace"),
            name=f.label("name"),
            port=f.port("port"),
            service_account=f.label("service_account"),
            endpoints=f.count("endpoints"),
        )


@dataclass(frozen=True, slots=True)
class ZoneState:
    """What a zone publishes (``PUT /v1/zone/state``). `generation` grows with
    every change the zone makes (its control plane's revision); the global keeps
    the state of the highest. ``ingress_port`` 0: the zone has no ingress (its
    services cannot be reached from other zones, and are not published)."""

    zone: str
    generation: int
    ingress_ip: str
    ingress_port: int
    services: tuple[ZoneService, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "zone": self.zone,
            "generation": self.generation,
            "ingress_ip": self.ingress_ip,
            "ingress_port": self.ingress_port,
            "services": [s.to_json() for s in self.services],
        }

    @classmethod
    def from_json(cls, obj: object, path: str = "state") -> ZoneState:
        f = Fields(obj, path, ("zone", "generation", "ingress_ip", "ingress_port", "services"))
        generation = f.integer("generation")
        if generation < 0:
            raise ContractError(f"{f.at('generation')}: {generation} is negative")
        port = f.integer("ingress_port")
        if not 0 <= port <= 65535:
            raise ContractError(f"{f.at('ingress_port')}: {port} is outside 0-65535")
        items = f.items("services", [])
        if len(items) > MAX_ZONE_SERVICES:
            raise ContractError(
                f"{f.at('services')}: {len(items)} services, more than {MAX_ZONE_SERVICES}"
            )
        services = tuple(ZoneService.from_json(s, p) for s, p in items)
        keys = [s.key for s in services]
        if len(set(keys)) != len(keys):
            raise ContractError(f"{f.at('services')}: a service is listed twice")
        return cls(
            zone=f.label("zone"),
            generation=generation,
            ingress_ip=f.ip("ingress_ip") if port else "",
            ingress_port=port,
            services=tuple(sorted(services, key=lambda s: s.key)),
        )

    def remote_entries(self) -> dict[tuple[str, str], RemoteZoneDoc]:
        """What another zone's nodes see of this zone: one remote entry per service,
        by (namespace, name); none without an ingress."""
        if not self.ingress_port:
            return {}
        return {
            s.key: RemoteZoneDoc(
                zone=self.zone,
                ingress_ip=self.ingress_ip,
                ingress_port=self.ingress_port,
                namespace=s.namespace,
                service_account=s.service_account,
                port=s.port,
                endpoints=s.endpoints,
            )
            for s in self.services
        }


@dataclass(frozen=True, slots=True)
class ZoneConfig:
    """The global's answer to a zone: everything the zone takes from it."""

    revision: int
    trust_domain: str
    trust_bundle: str  # PEM: the global's roots
    resources: tuple[Resource, ...]  # policies and identity grants
    zones: tuple[ZoneState, ...]  # the other zones

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "trust_domain": self.trust_domain,
            "trust_bundle": self.trust_bundle,
            "resources": [r.to_dict() for r in self.resources],
            "zones": [z.to_json() for z in self.zones],
        }

    @classmethod
    def from_json(cls, obj: object, path: str = "config") -> ZoneConfig:
        f = Fields(obj, path, ("revision", "trust_domain", "trust_bundle", "resources", "zones"))
        resources = []
        for raw, rpath in f.items("resources", []):
            try:
                resources.append(resource_from_dict(raw))
            except ResourceError as exc:
                raise ContractError(f"{rpath}: {exc}") from None
        return cls(
            revision=_revision(f),
            trust_domain=check_trust_domain(f.raw("trust_domain"), f.at("trust_domain")),
            trust_bundle=f.string("trust_bundle"),
            resources=tuple(resources),
            zones=tuple(ZoneState.from_json(z, p) for z, p in f.items("zones", [])),
        )


@dataclass(frozen=True, slots=True)
class ZoneUnchanged:
    """The long poll ended without a change."""

    revision: int

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "unchanged": True}

    @classmethod
    def from_json(cls, obj: object, path: str = "config") -> ZoneUnchanged:
        f = Fields(obj, path, ("revision", "unchanged"))
        if f.raw("unchanged") is not True:
            raise ContractError(f"{f.at('unchanged')}: expected true")
        return cls(_revision(f))


ZoneAnswer: TypeAlias = ZoneConfig | ZoneUnchanged


def parse_zone_answer(obj: object, path: str = "config") -> ZoneAnswer:
    """An answer of ``GET /v1/zone/config``, validated."""
    if isinstance(obj, dict) and "unchanged" in obj:
        return ZoneUnchanged.from_json(obj, path)
    return ZoneConfig.from_json(obj, path)


def _revision(f: Fields) -> int:
    revision = f.integer("revision")
    if revision < 0:
        raise ContractError(f"{f.at('revision')}: {revision} is negative")
    return int(revision)
