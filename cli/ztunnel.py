"""`meshnode ztunnel run`: the node proxy. Normally started by the node agent."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from meshnode.cli.common import fail, setup_logging


@click.group()
def ztunnel() -> None:
    """The node proxy (data plane)."""


@ztunnel.command("run")
@click.option(
    "--snapshot",
    type=click.Path(path_type=Path),
    required=True,
    help="State snapshot written by the node agent.",
)
@click.option("--outbound", default="127.0.0.1:15001", show_default=True)
@click.option("--inbound", default="0.0.0.0:15008", show_default=True)
@click.option("--admin", default="127.0.0.1:15000", show_default=True)
@click.option("--readiness", default="127.0.0.1:15021", show_default=True)
@click.option(
    "--metrics",
    default="127.0.0.1:15020",
    show_default=True,
    help="Prometheus metrics: this address serves /metrics and nothing else; "
    "0.0.0.0:15020 lets a Prometheus on the network scrape it (docs/observability.md).",
)
@click.option(
    "--dns",
    default="127.0.0.1:15053",
    show_default=True,
    help="The mesh DNS proxy (UDP and TCP), where the agent sends mesh workloads' "
    "DNS; loopback only; 'off' to run without it.",
)
@click.option(
    "--dns-upstream",
    "dns_upstreams",
    multiple=True,
    metavar="HOST[:PORT]",
    help="Where the mesh DNS forwards other names (repeatable); default: the "
    "node's resolvers (/etc/resolv.conf, or systemd-resolved's upstreams).",
)
@click.option(
    "--ingress-listen",
    "ingress_listen",
    default=None,
    metavar="HOST:PORT",
    help="Run the zone ingress (multi-zone, docs/multizone.md) on this address: other "
    "zones' mesh TLS, forwarded by its SNI, never decrypted, to the node of this zone "
    "that serves it. It faces other zones, so any address is allowed; off by default.",
)
@click.option(
    "--workers",
    default=0,
    show_default=True,
    type=click.IntRange(0, 64),
    help="Worker processes sharing the listeners; 0 = one per core (up to 8).",
)
@click.option(
    "--admin-socket",
    default=None,
    hidden=True,
    help="(internal) run as one worker of a supervisor, admin on this Unix socket.",
)
@click.option(
    "--peer-socket",
    default=None,
    help="Unix socket where workloads ask who a connection is from "
    "(default: peer.sock next to the snapshot).",
)
@click.option("--connect-timeout", default=5.0, show_default=True, type=float)
@click.option("--drain-timeout", default=10.0, show_default=True, type=float)
@click.option(
    "--retire-timeout",
    default=600.0,
    show_default=True,
    type=float,
    help="On an upgrade (SIGUSR2, `systemctl reload meshnode-ztunnel`): how long the "
    "old workers serve their open connections while new workers take new ones.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def run(
    snapshot: Path,
    outbound: str,
    inbound: str,
    admin: str,
    readiness: str,
    metrics: str,
    dns: str,
    dns_upstreams: tuple[str, ...],
    ingress_listen: str | None,
    workers: int,
    admin_socket: str | None,
    peer_socket: str | None,
    connect_timeout: float,
    drain_timeout: float,
    retire_timeout: float,
    log_level: str,
) -> None:
    """Run the node proxy."""
    from meshnode.ztunnel.config import ConfigError, ZtunnelConfig, parse_hostport
    from meshnode.ztunnel.proxy import run_ztunnel
    from meshnode.ztunnel.state import StateError

    setup_logging(log_level)
    try:
        config = ZtunnelConfig(
            snapshot=snapshot,
            outbound=parse_hostport(outbound),
            inbound=parse_hostport(inbound, "0.0.0.0"),
            admin=parse_hostport(admin),
            readiness=parse_hostport(readiness),
            metrics=parse_hostport(metrics),
            dns=None if dns == "off" else parse_hostport(dns),
            dns_upstreams=tuple(_upstream(u) for u in dns_upstreams),
            ingress=None if ingress_listen is None else parse_hostport(ingress_listen, "0.0.0.0"),
            connect_timeout=connect_timeout,
            drain_timeout=drain_timeout,
            retire_timeout=retire_timeout,
            workers=workers or min(os.cpu_count() or 1, 8),
            # --workers 0 (the unit's): always a supervisor, which can upgrade in place.
            supervised=workers == 0,
            admin_socket=admin_socket,
            peer_socket=peer_socket,
        ).validate()
        run_ztunnel(config)
    except (ConfigError, StateError) as exc:
        fail(f"ztunnel cannot start: {exc}")
    except OSError as exc:
        fail(
            f"ztunnel cannot start: {exc.strerror or exc} "
            f"({getattr(exc, 'filename', '') or 'listener address'}); is another ztunnel "
            "running on this node?"
        )
    logging.shutdown()
    sys.exit(0)


def _upstream(value: str) -> tuple[str, int]:
    """``IP`` (port 53), ``IP:PORT`` or ``[IPv6]:PORT``."""
    import ipaddress

    from meshnode.ztunnel.config import ConfigError, parse_hostport

    plain = value.count(":") != 1 and not value.startswith("[")  # an IP, no port
    host, port = (value, 53) if plain else parse_hostport(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"--dns-upstream {value!r}: give an IP address, not a name") from None
    return host, port
