"""The control plane's view of one request and its answer, and its configuration.

Handlers see a :class:`Request` built after routing and authentication (the body
is read only then), and return a :class:`Response`; neither knows about aiohttp.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from meshnode.controlplane.ca import DEFAULT_INTERMEDIATE_TTL
from meshnode.controlplane.registry import DEFAULT_MAX_WORKLOADS_PER_NODE
from meshnode.core import api
from meshnode.core.errors import ApiError

__all__ = ["ControlPlaneConfig", "Request", "Response", "json_response"]


@dataclass
class ControlPlaneConfig:
    trust_domain: str = "cluster.local"
    cert_ttl: timedelta = timedelta(hours=24)
    advertise: list[str] = field(default_factory=list)
    data_dir: Path = Path("/var/lib/meshnode-cp")
    # The root-only admin Unix socket (None: <data_dir>/admin.sock).
    admin_socket: Path | None = None
    # Seconds that requests in flight get to finish on shutdown.
    shutdown_grace: float = 5.0
    # Connections open at once, from one address and in total (gate.py); nodes
    # hold one each for their watch, so the total must exceed the fleet.
    max_connections_per_peer: int = 64
    max_connections: int = 20000
    # Seconds for the TLS handshake, and for a request head after it (or between
    # requests on a kept-alive connection).
    handshake_timeout: float = 10.0
    header_timeout: float = 15.0
    # What a node sees: "mesh" (every service, the default) or "namespace" (the
    # services of its workloads' namespaces and of `shared_namespaces`).
    node_view: str = "mesh"
    shared_namespaces: tuple[str, ...] = ()
    # Full slices written at once (watch.py); the others wait their turn.
    max_full_syncs: int = 32
    # Workloads one node may register (registry.register_workload).
    max_workloads_per_node: int = DEFAULT_MAX_WORKLOADS_PER_NODE
    # HOST:PORT of the plain-HTTP Prometheus listener (controlplane/metrics.py);
    # empty: none. It has no auth: bind it to loopback or a monitoring network.
    metrics_listen: str = ""
    # Multi-zone (docs/multizone.md): "single" (one control plane, as ever),
    # "global" (zones enroll with it) or "zone" (one zone's, synced with `global_url`).
    mode: str = "single"
    zone: str = ""  # mode "zone": this zone's name
    global_url: str = ""  # mode "zone": https://HOST:PORT of the global control plane
    global_token: str = ""  # mode "zone": the zone join token, for the first start
    zone_ingress: str = ""  # mode "zone": HOST:PORT other zones reach this zone's ingress at
    # mode "global": the lifetime of the intermediates it issues zones (renewed by each
    # zone when a third is left).
    zone_intermediate_ttl: timedelta = DEFAULT_INTERMEDIATE_TTL

    @property
    def admin_socket_path(self) -> Path:
        return self.admin_socket or self.data_dir / api.ADMIN_SOCKET_FILE


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes
    peer_ip: str
    peer_cert: x509.Certificate | None
    identity: str = "-"  # for the request log

    def json(self) -> dict[str, Any]:
        try:
            data = json.loads(self.body or b"{}")
        except ValueError as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        return data

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass(slots=True)
class Response:
    """An answer. With `chunks`, the body is their concatenation, written piece by
    piece without a copy (a full slice shares its large pieces with every node);
    `slots` then paces such answers (at most so many written at once). With
    `lines`, the body is written line by line as the iterator yields them."""

    status: int
    body: bytes
    content_type: str = "application/json"
    chunks: tuple[bytes, ...] = ()
    slots: Any = None  # an asyncio.Semaphore
    # (names being written to, this one's name): at most one such answer at a time
    # for each name (a node cannot hold every slot with answers it does not read)
    owner: tuple[set[str], str] | None = None
    # A body that comes in lines, as they are made (a streamed watch); chunked.
    lines: AsyncIterator[bytes] | None = None
    # Extra response headers (e.g. Retry-After on a 429).
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, body: Any) -> Response:
    return Response(status, json.dumps(body, indent=1).encode() + b"\n")
