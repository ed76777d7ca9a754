"""The one base of every error meshnode raises on purpose.

A ``MeshnodeError`` carries a message a person can act on: what failed, why,
and what to do. Entry points (the CLI, the services' main loops) catch it and
print the message, never a traceback. Anything else that escapes is a bug.

Errors that travel over the control-plane API carry the HTTP status to answer
with (``ApiError.status``); that is the only place a status code lives.
"""

from __future__ import annotations

__all__ = ["ApiError", "MeshnodeError"]


class MeshnodeError(Exception):
    """An expected failure; ``str(exc)`` is the whole story for the operator."""


class ApiError(MeshnodeError):
    """A request to the control plane is refused: ``status`` is the HTTP status
    (400 malformed, 401 unauthenticated, 403 not allowed, 404 unknown, 409
    conflict, 413 too large; 0 when there was no answer at all)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
