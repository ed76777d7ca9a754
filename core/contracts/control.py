"""The control messages on ztunnel's Unix socket (agent <-> ztunnel),
version ``CONTROL_PROTOCOL_VERSION``."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, TypeAlias

from meshnode.core.contracts.documents import ServiceDoc
from meshnode.core.contracts.snapshot import Snapshot, SnapshotWorkload
from meshnode.core.contracts.validate import ContractError, Fields

CONTROL_PROTOCOL_VERSION = 1


def _message_fields(obj: object, path: str, known: tuple[str, ...]) -> Fields:
    f = Fields(obj, path, ("v", "type", *known))
    v = f.obj.get("v")
    if v != CONTROL_PROTOCOL_VERSION or isinstance(v, bool):
        raise ContractError(
            f"{f.at('v')}: protocol version {v!r} is not "
            f"{CONTROL_PROTOCOL_VERSION}; run the same meshnode version for "
            "the agent and ztunnel"
        )
    return f


@dataclass(frozen=True, slots=True)
class SnapshotMessage:
    """Replace ztunnel's whole state. The message's version is the snapshot's."""

    version: int
    state: Snapshot

    def to_json(self) -> dict[str, Any]:
        return {
            "v": CONTROL_PROTOCOL_VERSION,
            "type": "snapshot",
            "version": self.version,
            "state": self.state.to_json(),
        }

    @classmethod
    def from_json(cls, obj: object, path: str = "message") -> SnapshotMessage:
        f = _message_fields(obj, path, ("version", "state"))
        version = f.integer("version")
        state = Snapshot.from_json(f.raw("state"), f.at("state"))
        return cls(version, replace(state, version=version))


@dataclass(frozen=True, slots=True)
class AddMessage:
    """Add (or replace, by key) one workload or service."""

    version: int
    value: SnapshotWorkload | ServiceDoc

    @property
    def kind(self) -> Literal["workload", "service"]:
        return "workload" if isinstance(self.value, SnapshotWorkload) else "service"

    def to_json(self) -> dict[str, Any]:
        return {
            "v": CONTROL_PROTOCOL_VERSION,
            "type": "add",
            "version": self.version,
            "kind": self.kind,
            "value": self.value.to_json(),
        }

    @classmethod
    def from_json(cls, obj: object, path: str = "message") -> AddMessage:
        f = _message_fields(obj, path, ("version", "kind", "value"))
        kind, version = f.string("kind"), f.integer("version")
        if kind == "workload":
            return cls(version, SnapshotWorkload.from_json(f.raw("value"), f.at("value")))
        if kind == "service":
            return cls(version, ServiceDoc.from_json(f.raw("value"), f.at("value")))
        raise ContractError(f"{f.at('kind')}: {kind!r} is not workload or service")


@dataclass(frozen=True, slots=True)
class DeleteMessage:
    """Delete one workload (key: its name) or service (key: ``namespace/name``)."""

    version: int
    kind: Literal["workload", "service"]
    key: str

    def to_json(self) -> dict[str, Any]:
        return {
            "v": CONTROL_PROTOCOL_VERSION,
            "type": "delete",
            "version": self.version,
            "kind": self.kind,
            "key": self.key,
        }

    @classmethod
    def from_json(cls, obj: object, path: str = "message") -> DeleteMessage:
        f = _message_fields(obj, path, ("version", "kind", "key"))
        kind = f.string("kind")
        if kind not in ("workload", "service"):
            raise ContractError(f"{f.at('kind')}: {kind!r} is not workload or service")
        return cls(f.integer("version"), kind, f.string("key"))


ControlMessage: TypeAlias = SnapshotMessage | AddMessage | DeleteMessage
_MESSAGES: dict[str, type[SnapshotMessage] | type[AddMessage] | type[DeleteMessage]] = {
    "snapshot": SnapshotMessage,
    "add": AddMessage,
    "delete": DeleteMessage,
}


def parse_control_message(obj: object, path: str = "message") -> ControlMessage:
    if not isinstance(obj, dict):
        raise ContractError(f"{path}: expected dict, got {obj!r}")
    kind = obj.get("type")
    cls = _MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ContractError(f"{path}.type: unknown message type {kind!r} ({', '.join(_MESSAGES)})")
    return cls.from_json(obj, path)


@dataclass(frozen=True, slots=True)
class Ack:
    """The change of `version` is live."""

    version: int

    def to_json(self) -> dict[str, Any]:
        return {"v": CONTROL_PROTOCOL_VERSION, "type": "ack", "version": self.version}

    @classmethod
    def from_json(cls, obj: object, path: str = "reply") -> Ack:
        return cls(_message_fields(obj, path, ("version",)).integer("version"))


@dataclass(frozen=True, slots=True)
class Nack:
    """The change was refused; the previous state stays. ``version`` is None when
    the message was too broken to have one."""

    version: int | None
    error: str

    def to_json(self) -> dict[str, Any]:
        return {
            "v": CONTROL_PROTOCOL_VERSION,
            "type": "nack",
            "version": self.version,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, obj: object, path: str = "reply") -> Nack:
        f = _message_fields(obj, path, ("version", "error"))
        return cls(f.integer("version", None), f.string("error"))


ControlReply: TypeAlias = Ack | Nack


def parse_control_reply(obj: object, path: str = "reply") -> ControlReply:
    if not isinstance(obj, dict):
        raise ContractError(f"{path}: expected dict, got {obj!r}")
    kind = obj.get("type")
    if kind == "ack":
        return Ack.from_json(obj, path)
    if kind == "nack":
        return Nack.from_json(obj, path)
    raise ContractError(f"{path}.type: {kind!r} is not ack or nack")
