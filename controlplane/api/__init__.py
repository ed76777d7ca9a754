"""The control-plane HTTPS API (docs/protocol.md, "Control plane API").

app.py (aiohttp application, TLS, life cycle), routes.py (the one route table with
each route's auth), auth.py (the auth checks), handlers.py and watch.py (the
handlers), state.py (the cache of the store), messages.py (request/response/config).
"""

from .app import (
    ADMIN_SOCKET_FILE,
    ADMIN_TOKEN_FILE,
    TRUST_BUNDLE_FILE,
    ControlPlane,
    default_db_url,
    parse_duration,
    run,
    split_listen,
)
from .auth import Auth, admin_allowed, local_admin_allowed
from .messages import ControlPlaneConfig

__all__ = [
    "ADMIN_SOCKET_FILE",
    "ADMIN_TOKEN_FILE",
    "TRUST_BUNDLE_FILE",
    "Auth",
    "ControlPlane",
    "ControlPlaneConfig",
    "admin_allowed",
    "default_db_url",
    "local_admin_allowed",
    "parse_duration",
    "run",
    "split_listen",
]
