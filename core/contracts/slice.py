"""The node slice (control plane -> agent): full, incremental, unchanged."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, TypeAlias

from meshnode.core.contracts.documents import (
    EndpointDoc,
    NodeDoc,
    Revocation,
    ServiceDoc,
    WorkloadDoc,
)
from meshnode.core.contracts.validate import (
    ContractError,
    Fields,
    check_trust_domain,
    parse_resource,
    resource_key,
)
from meshnode.core.resources import Resource

ChangeKind: TypeAlias = Literal["workload", "service", "endpoint", "resource"]
ChangeValue: TypeAlias = WorkloadDoc | ServiceDoc | EndpointDoc | Resource


def endpoint_key(service: str, endpoint: EndpointDoc) -> str:
    """The key of an endpoint change: ``<namespace>/<service>/<node>/<workload>``
    (`service` is ``<namespace>/<name>``)."""
    return f"{service}/{endpoint.node}/{endpoint.workload}"


def _value_key(value: ChangeValue, key: str) -> str:
    if isinstance(value, WorkloadDoc | ServiceDoc):
        return value.key
    if isinstance(value, EndpointDoc):  # the service is named only by the key
        return endpoint_key("/".join(key.split("/")[:2]), value)
    return resource_key(value)


@dataclass(frozen=True, slots=True)
class NodeSlice:
    """A node's full slice of the mesh: its own workloads, every service, the
    policy resources. ``trust_bundle`` (PEM) is sent by the control plane."""

    revision: int
    node: NodeDoc
    trust_domain: str
    workloads: tuple[WorkloadDoc, ...] = ()
    services: tuple[ServiceDoc, ...] = ()
    resources: tuple[Resource, ...] = ()
    trust_bundle: str | None = None
    # Deleted nodes whose certificates are refused (sent only when there are any,
    # so a node of a release before revocations still reads an ordinary slice).
    revoked: tuple[Revocation, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "revision": self.revision,
            "full": True,
            "node": self.node.to_json(),
            "trust_domain": self.trust_domain,
            "workloads": [w.to_json() for w in self.workloads],
            "services": [s.to_json() for s in self.services],
            "resources": [r.to_dict() for r in self.resources],
        }
        if self.trust_bundle is not None:
            out["trust_bundle"] = self.trust_bundle
        if self.revoked:
            out["revoked"] = [r.to_json() for r in self.revoked]
        return out

    @classmethod
    def from_json(cls, obj: object, path: str = "slice") -> NodeSlice:
        f = Fields(
            obj,
            path,
            (
                "revision",
                "full",
                "node",
                "trust_domain",
                "workloads",
                "services",
                "resources",
                "trust_bundle",
                "revoked",
            ),
        )
        if f.raw("full", True) is not True:
            raise ContractError(f"{f.at('full')}: a full slice has full: true")
        return cls(
            revision=_revision(f),
            node=NodeDoc.from_json(f.raw("node"), f.at("node")),
            trust_domain=check_trust_domain(f.raw("trust_domain"), f.at("trust_domain")),
            workloads=tuple(WorkloadDoc.from_json(w, p) for w, p in f.items("workloads", [])),
            services=tuple(ServiceDoc.from_json(s, p) for s, p in f.items("services", [])),
            resources=tuple(parse_resource(r, p) for r, p in f.items("resources", [])),
            trust_bundle=f.string("trust_bundle", None),
            revoked=tuple(Revocation.from_json(r, p) for r, p in f.items("revoked", [])),
        )

    def apply(self, delta: SliceDelta) -> NodeSlice:
        """This slice with `delta`'s changes folded in (a put replaces the item
        with the same key, or adds it; a delete of an absent key is a no-op; so is an
        endpoint change of a service the slice does not have)."""
        items: dict[str, dict[str, Any]] = {
            "workload": {w.key: w for w in self.workloads},
            "service": {s.key: s for s in self.services},
            "resource": {resource_key(r): r for r in self.resources},
        }
        services = items["service"]
        for change in delta.changes:
            if change.kind == "endpoint":
                service, node, workload = change.key.rsplit("/", 2)
                svc = services.get(service)
                if svc is not None:
                    services[service] = _with_endpoint(svc, node, workload, change.value)
                continue
            coll = items[change.kind]
            coll.pop(change.key, None)
            if change.value is not None:
                coll[change.key] = change.value
        return replace(
            self,
            revision=delta.revision,
            workloads=tuple(items["workload"].values()),
            services=tuple(items["service"].values()),
            resources=tuple(items["resource"].values()),
        )


def _with_endpoint(svc: ServiceDoc, node: str, workload: str, value: object) -> ServiceDoc:
    """`svc` with endpoint (node, workload) replaced by `value` (None: removed), in
    the control plane's order (by node, then workload)."""
    kept = {(e.node, e.workload): e for e in svc.endpoints}
    kept.pop((node, workload), None)
    if isinstance(value, EndpointDoc):
        kept[(node, workload)] = value
    return replace(svc, endpoints=tuple(kept[k] for k in sorted(kept)))


def _revision(f: Fields) -> int:
    revision: int = f.integer("revision")
    if revision < 0:
        raise ContractError(f"{f.at('revision')}: {revision} is negative")
    return revision


@dataclass(frozen=True, slots=True)
class SliceChange:
    """One entry of an incremental slice: ``value`` is set for a put, None for a delete."""

    op: Literal["put", "delete"]
    kind: ChangeKind
    key: str
    value: ChangeValue | None = None

    def __post_init__(self) -> None:
        if (self.op == "put") != (self.value is not None):
            raise ContractError(
                f"a {self.op} change of {self.kind} {self.key!r} "
                f"{'needs' if self.op == 'put' else 'has no'} a value"
            )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op, "kind": self.kind, "key": self.key}
        if self.value is not None:
            value = self.value
            out["value"] = (
                value.to_json()
                if isinstance(value, WorkloadDoc | ServiceDoc | EndpointDoc)
                else value.to_dict()
            )
        return out

    @classmethod
    def from_json(cls, obj: object, path: str = "change") -> SliceChange:
        f = Fields(obj, path, ("op", "kind", "key", "value"))
        op, kind, key = f.string("op"), f.string("kind"), f.string("key")
        if op not in ("put", "delete"):
            raise ContractError(f"{f.at('op')}: {op!r} is not put or delete")
        if kind not in ("workload", "service", "endpoint", "resource"):
            raise ContractError(
                f"{f.at('kind')}: {kind!r} is not workload, service, endpoint or resource"
            )
        if kind == "endpoint" and len(key.split("/")) != 4:
            raise ContractError(
                f"{f.at('key')}: {key!r} is not <namespace>/<service>/<node>/<workload>"
            )
        if op == "delete":
            if "value" in f.obj:
                raise ContractError(f"{f.at('value')}: a delete carries no value")
            return cls(op, kind, key)
        raw, vpath = f.raw("value"), f.at("value")
        value: ChangeValue
        if kind == "workload":
            value = WorkloadDoc.from_json(raw, vpath)
        elif kind == "service":
            value = ServiceDoc.from_json(raw, vpath)
        elif kind == "endpoint":
            value = EndpointDoc.from_json(raw, vpath)
            if key.split("/")[0] != value.namespace:
                raise ContractError(
                    f"{f.at('key')}: {key!r} names another namespace than the endpoint's "
                    f"({value.namespace!r})"
                )
        else:
            value = parse_resource(raw, vpath)
        if _value_key(value, key) != key:
            raise ContractError(
                f"{f.at('key')}: {key!r} is not the key of the value ({_value_key(value, key)!r})"
            )
        return cls(op, kind, key, value)


@dataclass(frozen=True, slots=True)
class SliceDelta:
    """The changes to a node's slice since the revision it asked from."""

    revision: int
    changes: tuple[SliceChange, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "full": False,
            "changes": [c.to_json() for c in self.changes],
        }

    @classmethod
    def from_json(cls, obj: object, path: str = "slice") -> SliceDelta:
        f = Fields(obj, path, ("revision", "full", "changes"))
        if f.raw("full") is not False:
            raise ContractError(f"{f.at('full')}: a delta has full: false")
        return cls(_revision(f), tuple(SliceChange.from_json(c, p) for c, p in f.items("changes")))


@dataclass(frozen=True, slots=True)
class SliceUnchanged:
    """The long poll ended without a change."""

    revision: int

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "unchanged": True}

    @classmethod
    def from_json(cls, obj: object, path: str = "slice") -> SliceUnchanged:
        f = Fields(obj, path, ("revision", "unchanged"))
        if f.raw("unchanged") is not True:
            raise ContractError(f"{f.at('unchanged')}: expected true")
        return cls(_revision(f))


SliceAnswer: TypeAlias = NodeSlice | SliceDelta | SliceUnchanged


def parse_slice_answer(obj: object, path: str = "slice") -> SliceAnswer:
    """An answer of ``GET /v1/node/config``: which of the three it is, validated."""
    if isinstance(obj, dict) and "unchanged" in obj:
        return SliceUnchanged.from_json(obj, path)
    if isinstance(obj, dict) and obj.get("full") is False:
        return SliceDelta.from_json(obj, path)
    return NodeSlice.from_json(obj, path)


MAX_ANSWER = 256 * 1024 * 1024  # bytes of one answer a node takes (a full slice of a large mesh)


class AnswerLines:
    """The framing of a streamed watch (``stream=1``): one compact JSON answer per
    line (compact JSON holds no newline). Bytes in as they come, whole lines out.
    A control plane without streams answers once, with no newline: :meth:`end`
    gives that last line. A line longer than `limit` is a ContractError, so a
    server that never ends a line cannot fill the node's memory."""

    def __init__(self, limit: int = MAX_ANSWER) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        lines: list[bytearray] = []
        if b"\n" in data:
            *lines, rest = self._buf.split(b"\n")
            self._buf = rest
        if len(self._buf) > self._limit:
            raise ContractError(f"watch answer longer than {self._limit} bytes; refusing the rest")
        return [bytes(line) for line in lines if line.strip()]

    def end(self) -> list[bytes]:
        rest, self._buf = bytes(self._buf), bytearray()
        return [rest] if rest.strip() else []
