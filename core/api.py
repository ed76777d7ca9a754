"""The control-plane API's paths: one definition for the server's route table and
the clients (docs/protocol.md, "Control plane API").

Paths with ``{placeholders}`` are aiohttp route templates on the server; clients
fill them with :func:`path`, which quotes each value as one path segment.
"""

from __future__ import annotations

import random
from urllib.parse import quote

__all__ = [
    "ADMIN_SOCKET_FILE",
    "ADMIN_CA_ROTATE",
    "ADMIN_NODE",
    "ADMIN_NODES",
    "ADMIN_RESOURCE",
    "ADMIN_RESOURCES",
    "ADMIN_SERVICES",
    "ADMIN_TOKENS",
    "ADMIN_WORKLOAD",
    "ADMIN_WORKLOADS",
    "ENROLL",
    "NODE_CERTIFICATES",
    "NODE_CONFIG",
    "NODE_CONFIG_MAX_WAIT",
    "NODE_CONFIG_STREAM_TYPE",
    "WATCH_BACKOFF_FIRST",
    "WATCH_BACKOFF_MAX",
    "backoff_step",
    "NODE_RENEW",
    "NODE_REPORT",
    "NODE_WORKLOAD",
    "NODE_WORKLOADS",
    "TRUST_BUNDLE",
    "ADMIN_ZONES",
    "ZONE_CONFIG",
    "ZONE_ENROLL",
    "ZONE_INTERMEDIATE",
    "ZONE_STATE",
    "path",
]

TRUST_BUNDLE = "/v1/trust-bundle"
ENROLL = "/v1/enroll"

NODE_CONFIG = "/v1/node/config"
NODE_CONFIG_MAX_WAIT = 60.0  # seconds a long poll of NODE_CONFIG may wait at most
# A streamed watch (``stream=1``): one answer per line, as the changes come.
NODE_CONFIG_STREAM_TYPE = "application/x-ndjson"
# A node's watch backs off from WATCH_BACKOFF_FIRST seconds, doubling up to
# WATCH_BACKOFF_MAX, each sleep jittered to half to all of the step, while the
# control plane is away. The cap bounds how long after a control-plane restart
# a node waits before it asks again (docs/protocol.md).
WATCH_BACKOFF_FIRST = 1.0
WATCH_BACKOFF_MAX = 15.0


def backoff_step(step: float) -> tuple[float, float]:
    """(seconds to sleep now, the next step): half to all of `step`, at random, so
    a fleet that lost its control plane together does not come back together; the
    step doubles up to WATCH_BACKOFF_MAX."""
    return step * random.uniform(0.5, 1.0), min(step * 2, WATCH_BACKOFF_MAX)


NODE_WORKLOADS = "/v1/node/workloads"
NODE_WORKLOAD = "/v1/node/workloads/{name}"
NODE_CERTIFICATES = "/v1/node/certificates"
NODE_RENEW = "/v1/node/renew"
# A node's periodic health report (core/contracts/report.py).
NODE_REPORT = "/v1/node/report"

ADMIN_TOKENS = "/v1/admin/tokens"
ADMIN_RESOURCES = "/v1/admin/resources"
ADMIN_RESOURCE = "/v1/admin/resources/{kind}/{namespace}/{name}"
ADMIN_NODES = "/v1/admin/nodes"
ADMIN_NODE = "/v1/admin/nodes/{name}"
ADMIN_SERVICES = "/v1/admin/services"
ADMIN_WORKLOADS = "/v1/admin/workloads"
ADMIN_WORKLOAD = "/v1/admin/workloads/{node}/{name}"
ADMIN_CA_ROTATE = "/v1/admin/ca/rotate"
ADMIN_ZONES = "/v1/admin/zones"

# A zone control plane and the global one (docs/multizone.md).
ZONE_ENROLL = "/v1/zone/enroll"
ZONE_STATE = "/v1/zone/state"
ZONE_CONFIG = "/v1/zone/config"
ZONE_INTERMEDIATE = "/v1/zone/intermediate"  # a new intermediate, after a root rotation


def path(template: str, **values: str) -> str:
    """``path(ADMIN_NODE, name="n1")`` -> ``/v1/admin/nodes/n1`` (values quoted)."""
    return template.format(**{k: quote(v, safe="") for k, v in values.items()})


# The control plane's root-only admin socket, in its data dir (the CLI finds it there).
ADMIN_SOCKET_FILE = "admin.sock"
