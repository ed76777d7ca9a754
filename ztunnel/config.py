"""ztunnel's configuration: defaults, then command-line flags / environment
(MESHNODE_ZTUNNEL_*), then ``validate()``. Served back by the admin endpoint."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meshnode.core.constants import (
    ADMIN_PORT,
    DELIVERY_ADDRESS,
    DNS_PROXY_PORT,
    HBONE_PORT,
    METRICS_PORT,
    OUTBOUND_PORT,
)
from meshnode.core.constants import READY_PORT as READINESS_PORT
from meshnode.core.errors import MeshnodeError

__all__ = ["ADMIN_PORT", "HBONE_PORT", "METRICS_PORT", "OUTBOUND_PORT", "READINESS_PORT"]


class ConfigError(MeshnodeError, ValueError):
    pass


@dataclass(slots=True)
class ZtunnelConfig:
    snapshot: Path
    outbound: tuple[str, int] = ("127.0.0.1", OUTBOUND_PORT)
    inbound: tuple[str, int] = ("0.0.0.0", HBONE_PORT)
    admin: tuple[str, int] = ("127.0.0.1", ADMIN_PORT)
    readiness: tuple[str, int] = ("127.0.0.1", READINESS_PORT)
    metrics: tuple[str, int] = ("127.0.0.1", METRICS_PORT)
    # The mesh DNS proxy (UDP and TCP; docs/dns.md); None: none.
    dns: tuple[str, int] | None = ("127.0.0.1", DNS_PROXY_PORT)
    # Where it forwards other names; empty: the node's resolvers (dns.read_upstreams).
    dns_upstreams: tuple[tuple[str, int], ...] = ()
    # The zone ingress (multi-zone, ztunnel/ingress.py): other zones' mesh TLS,
    # forwarded by SNI to this zone's nodes. None: off. It faces other zones, so
    # it may listen on any address.
    ingress: tuple[str, int] | None = None
    # Source address of connections delivered to local workloads: STRICT mode
    # lets only this address reach a workload's mesh ports (as Istio uses it).
    inbound_source: str = DELIVERY_ADDRESS
    connect_timeout: float = 5.0  # TCP + TLS to the peer node, and to the workload
    stream_timeout: float = 10.0  # CONNECT sent -> 200 received
    drain_timeout: float = 10.0  # on SIGTERM: time given to open connections
    # On an upgrade (SIGUSR2 to the supervisor, `systemctl reload meshnode-ztunnel`):
    # time the old workers give their open connections while new ones take new
    # connections. Longer-lived connections are closed at its end.
    retire_timeout: float = 600.0
    # Run the supervisor even with one worker, so that an upgrade can hand over.
    supervised: bool = False
    idle_timeout: float = 300.0  # pooled HBONE connection with no streams
    max_streams: int = 100  # streams per pooled HBONE connection
    connect_attempts: int = 3  # endpoints tried per connection before giving up
    workers: int = 1  # processes sharing the listeners (SO_REUSEPORT)
    same_node_shortcut: bool = True  # same-node traffic skips TLS (policy, metrics kept)
    admin_socket: str | None = None  # set in a worker: its admin on a Unix socket
    control_socket: str | None = None  # the agent's channel; default: next to the snapshot
    peer_socket: str | None = None  # workloads ask who a connection is from (peer.py)

    def validate(self) -> ZtunnelConfig:
        # Metrics may face the network (Prometheus scrapes each node): that
        # listener serves /metrics alone (admin.py). The others are loopback only.
        for name in ("admin", "readiness", "dns"):
            if getattr(self, name) is None:
                continue
            host, _ = getattr(self, name)
            if not ipaddress.ip_address(host).is_loopback:
                raise ConfigError(f"{name} endpoint must listen on loopback, not {host}")
        self._check_ingress_port()
        for name in (
            "connect_timeout",
            "stream_timeout",
            "drain_timeout",
            "idle_timeout",
            "retire_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if not 1 <= self.connect_attempts <= 10:
            raise ConfigError("connect_attempts must be within 1..10")
        if not 1 <= self.workers <= 64:
            raise ConfigError("workers must be within 1..64")
        if not 1 <= self.max_streams <= 1000:
            raise ConfigError("max_streams must be within 1..1000")
        return self

    def _check_ingress_port(self) -> None:
        """The ingress must not share a port with another listener on an
        overlapping address: with SO_REUSEPORT both would bind, and the kernel
        would spread connections over the two."""
        if self.ingress is None or self.ingress[1] == 0:
            return
        host, port = self.ingress
        for name in ("outbound", "inbound", "admin", "readiness", "metrics", "dns"):
            other = getattr(self, name)
            if other is None or other[1] != port:
                continue
            a, b = ipaddress.ip_address(host), ipaddress.ip_address(other[0])
            if a == b or a.is_unspecified or b.is_unspecified:
                raise ConfigError(
                    f"ingress {host}:{port} shares port {port} with the {name} listener "
                    f"({other[0]}:{other[1]}): give the zone ingress a port of its own"
                )

    @property
    def control_path(self) -> str:
        return self.control_socket or str(Path(self.snapshot).parent / "ztunnel.sock")

    @property
    def peer_path(self) -> str:
        return self.peer_socket or str(Path(self.snapshot).parent / "peer.sock")

    def dump(self) -> dict[str, Any]:
        out = asdict(self)
        out["snapshot"] = str(self.snapshot)
        out.pop("admin_socket", None)
        return out


def parse_hostport(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``"127.0.0.1:15001"``, ``":15001"`` or ``"15001"``."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = default_host, value
    host = host.strip("[]") or default_host
    try:
        ipaddress.ip_address(host)
        p = int(port)
    except ValueError:
        raise ConfigError(f"{value!r} is not IP:PORT") from None
    if not 0 <= p < 65536:
        raise ConfigError(f"{value!r}: port out of range")
    return host, p
