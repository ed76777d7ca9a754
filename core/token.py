"""The join token, ``mn1.<id>.<secret>.<pin>`` (docs/protocol.md, "Enrollment").

One definition for both ends: ``meshnode token create`` makes it, ``meshnode
enroll`` parses it, the control plane parses it again and checks it against what
it stored (``controlplane/tokens.py``). Pure: no I/O.

- id: 8 lowercase hex characters, names the token in logs and the store;
- secret: 32 lowercase hex characters; the control plane keeps only its SHA-256;
- pin: 64 lowercase hex characters, the SHA-256 of the mesh root certificate's
  DER. The node checks the control plane against it before it sends anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshnode.core.errors import ApiError

__all__ = ["PREFIX", "JoinToken", "TokenError", "parse_token"]

PREFIX = "mn1"
ID_RE = re.compile(r"[0-9a-f]{8}")
SECRET_RE = re.compile(r"[0-9a-f]{32}")
PIN_RE = re.compile(r"[0-9a-f]{64}")


class TokenError(ApiError):
    """A join token is refused. `status` is the HTTP status the control plane
    answers with: 400 malformed, 401 unknown/used/expired/wrong secret, 403 for
    another node or zone."""


@dataclass(frozen=True, slots=True)
class JoinToken:
    id: str
    secret: str
    pin: str

    def __str__(self) -> str:
        return f"{PREFIX}.{self.id}.{self.secret}.{self.pin}"

    def __repr__(self) -> str:  # never print the secret by accident
        return f"JoinToken(id={self.id!r}, pin={self.pin!r})"


def parse_token(text: object) -> JoinToken:
    """`mn1.<id>.<secret>.<pin>` -> JoinToken; TokenError(400) says which part is
    wrong, without echoing the secret."""
    if not isinstance(text, str):
        raise TokenError(400, f"join token must be a string like {PREFIX}.<id>.<secret>.<pin>")
    parts = text.strip().split(".")
    if len(parts) != 4 or parts[0] != PREFIX:
        raise TokenError(
            400,
            f"malformed join token: expected {PREFIX}.<id>.<secret>.<pin> "
            f"(4 dot-separated parts, got {len(parts)}"
            + ("" if not parts or parts[0] == PREFIX else f", starting {parts[0][:8]!r}")
            + "); copy the whole line printed by `meshnode token create`",
        )
    _, tid, secret, pin = parts
    for value, pattern, what in (
        (tid, ID_RE, "id (8 lowercase hex characters)"),
        (secret, SECRET_RE, "secret (32 lowercase hex characters)"),
        (pin, PIN_RE, "pin (64 lowercase hex characters: SHA-256 of the root certificate)"),
    ):
        if not pattern.fullmatch(value):
            raise TokenError(
                400,
                f"malformed join token: bad {what}, got {len(value)} characters; "
                "copy the whole line printed by `meshnode token create`",
            )
    return JoinToken(tid, secret, pin)
