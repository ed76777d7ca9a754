"""The one set of validators every contract uses, and the reader of one JSON
object (:class:`Fields`) that refuses unknown fields and names field paths."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from typing import Any

from meshnode.core.errors import MeshnodeError
from meshnode.core.identity import IdentityError, SpiffeId, validate_trust_domain
from meshnode.core.resources import Resource, ResourceError, resource_from_dict

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_VERSION = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
MISSING: Any = object()


class ContractError(MeshnodeError, ValueError):
    """A document does not follow its contract; the message starts with the
    path of the offending field."""


def check_label(value: object, path: str) -> str:
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        raise ContractError(
            f"{path}: {value!r} is not a DNS label (1-63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit)"
        )
    return value


def check_version_label(value: object, path: str) -> str:
    """A subset label such as ``v1`` (letters, digits, ``.``, ``_``, ``-``) or ``""``."""
    if value == "":
        return ""
    if not isinstance(value, str) or not _VERSION.fullmatch(value):
        raise ContractError(f"{path}: {value!r} is not a version label like v1")
    return value


def check_port(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ContractError(f"{path}: {value!r} is not a port (an integer 1-65535)")
    return value


def check_ip(value: object, path: str) -> str:
    """The address in its normal form."""
    if not isinstance(value, str):
        raise ContractError(f"{path}: {value!r} is not an IP address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ContractError(f"{path}: {value!r} is not an IP address") from None


def check_trust_domain(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ContractError(f"{path}: expected str, got {value!r}")
    try:
        validate_trust_domain(value)
    except IdentityError as exc:
        raise ContractError(f"{path}: {exc}") from None
    return value


def check_identity(trust_domain: str, namespace: str, service_account: str, path: str) -> SpiffeId:
    try:
        return SpiffeId(trust_domain, namespace, service_account)
    except IdentityError as exc:
        raise ContractError(f"{path}: {exc}") from None


class Fields:
    """One JSON object being read: refuses unknown fields, names paths."""

    __slots__ = ("obj", "path")

    def __init__(self, value: object, path: str, known: Collection[str]) -> None:
        if not isinstance(value, dict):
            raise ContractError(f"{path}: expected dict, got {value!r}")
        unknown = sorted(str(k) for k in value if k not in known)
        if unknown:
            raise ContractError(
                f"{path}: unknown field {unknown[0]!r} (known: {', '.join(known)}); "
                "is the sender a newer meshnode?"
            )
        self.obj: dict[str, Any] = value
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}"

    def raw(self, key: str, default: Any = MISSING) -> Any:
        value = self.obj.get(key)
        if value is None:
            if default is MISSING:
                raise ContractError(f"{self.path}: missing field {key!r}")
            return default
        return value

    def typed(self, key: str, kind: type, default: Any = MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not MISSING:
            return value
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            raise ContractError(f"{self.at(key)}: expected {kind.__name__}, got {value!r}")
        return value

    def string(self, key: str, default: Any = MISSING) -> Any:
        return self.typed(key, str, default)

    def integer(self, key: str, default: Any = MISSING) -> Any:
        return self.typed(key, int, default)

    # label and port check the common, valid case before building the field's
    # path: a snapshot of a large mesh has tens of thousands of them.

    def label(self, key: str, default: Any = MISSING) -> str:
        value = self.raw(key, default)
        if value.__class__ is str and (_LABEL.fullmatch(value) or value == default == ""):
            return str(value)
        return check_label(value, self.at(key))

    def port(self, key: str, default: Any = MISSING) -> int:
        value = self.raw(key, default)
        if value.__class__ is int and 0 < value < 65536:
            return int(value)
        return check_port(value, self.at(key))

    def count(self, key: str, default: Any = MISSING) -> int:
        """A count of endpoints: an integer >= 1."""
        value = int(self.integer(key, default))
        if value < 1:
            raise ContractError(f"{self.at(key)}: {value} is not a count of endpoints >= 1")
        return value

    def ip(self, key: str) -> str:
        return check_ip(self.raw(key), self.at(key))

    def items(self, key: str, default: Any = MISSING) -> list[tuple[Any, str]]:
        """A list field's entries with their paths."""
        value = self.typed(key, list, default)
        return [(item, f"{self.at(key)}[{i}]") for i, item in enumerate(value)]


def parse_resource(value: object, path: str) -> Resource:
    try:
        return resource_from_dict(value)
    except ResourceError as exc:
        raise ContractError(f"{path}: {exc}") from None


def resource_key(resource: Resource) -> str:
    """The key of a resource in slice changes: ``<kind>/<namespace>/<name>``."""
    return f"{resource.kind}/{resource.namespace}/{resource.name}"
