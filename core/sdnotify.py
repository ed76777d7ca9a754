"""systemd's readiness protocol (sd_notify), without libsystemd: send
"READY=1" and friends to $NOTIFY_SOCKET. A no-op outside systemd."""

from __future__ import annotations

import os
import socket


def notify(*states: str) -> bool:
    """notify("READY=1", "STATUS=serving") -> True if systemd was told."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall("\n".join(states).encode())
    except OSError:
        return False
    return True
