"""Moved: the control-plane server is the package :mod:`meshnode.controlplane.api`.

Kept so that ``import meshnode.controlplane.server`` (e.g. checks whether the
control plane is installed) keeps working; import from ``controlplane.api``.
"""

from meshnode.controlplane.api import (
    ADMIN_TOKEN_FILE,
    TRUST_BUNDLE_FILE,
    ControlPlane,
    ControlPlaneConfig,
    admin_allowed,
    default_db_url,
    local_admin_allowed,
    parse_duration,
    run,
    split_listen,
)
from meshnode.core.errors import ApiError

__all__ = [
    "ADMIN_TOKEN_FILE",
    "TRUST_BUNDLE_FILE",
    "ApiError",
    "ControlPlane",
    "ControlPlaneConfig",
    "admin_allowed",
    "default_db_url",
    "local_admin_allowed",
    "parse_duration",
    "run",
    "split_listen",
]
