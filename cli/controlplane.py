"""`meshnode controlplane run`: the control-plane server (docs/protocol.md)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import click

from meshnode.cli.common import fail, setup_logging
from meshnode.core.constants import CONTROLPLANE_METRICS_PORT

DEFAULT_DATA_DIR = "/var/lib/meshnode-cp"


@click.group()
def controlplane() -> None:
    """The mesh control plane: registry, CA, node and admin API."""


@controlplane.command("run")
@click.option("--listen", default="0.0.0.0:15012", show_default=True, help="HOST:PORT to serve.")
@click.option(
    "--db",
    default=None,
    help="sqlite:///path/cp.db or postgresql://user:pw@host/db [default: sqlite in --data-dir]",
)
@click.option(
    "--data-dir",
    default=DEFAULT_DATA_DIR,
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Admin token, trust bundle copy and (SQLite) the database.",
)
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option(
    "--cert-ttl",
    default="24h",
    show_default=True,
    help="Lifetime of node and workload certificates (30s, 15m, 24h, 7d).",
)
@click.option(
    "--advertise",
    default="",
    help="IP[,IP]: addresses nodes use to reach this control plane (server cert SANs).",
)
@click.option(
    "--max-workloads-per-node",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Workloads one node may register; more are refused with 429.",
)
@click.option(
    "--max-connections-per-peer",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Connections open at once from one address (nodes behind one NAT share it).",
)
@click.option(
    "--max-connections",
    default=20000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Connections open at once in total (each node holds one for its watch).",
)
@click.option(
    "--node-view",
    default="mesh",
    show_default=True,
    type=click.Choice(["mesh", "namespace"]),
    help="What each node is sent: every service (mesh), or only the services of its "
    "workloads' namespaces and of --shared-namespaces (namespace: smaller slices, but "
    "a workload reaches another namespace's service only if that one is shared).",
)
@click.option(
    "--shared-namespaces",
    default="",
    help="NS[,NS]: namespaces every node sees with --node-view namespace.",
)
@click.option(
    "--max-full-syncs",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Full slices written at once; more wait their turn (a fleet reconnecting "
    "after a restart is served paced, first come first served).",
)
@click.option(
    "--metrics-listen",
    default="",
    is_flag=False,
    flag_value=f"127.0.0.1:{CONTROLPLANE_METRICS_PORT}",
    metavar="[IP:PORT]",
    help="Serve Prometheus metrics (GET /metrics) in plain HTTP, without auth, on "
    f"IP:PORT; alone: 127.0.0.1:{CONTROLPLANE_METRICS_PORT}. Off by default. Use "
    "loopback or a monitoring network (docs/observability.md).",
)
@click.option(
    "--mode",
    default="single",
    show_default=True,
    type=click.Choice(["single", "global", "zone"]),
    help="Multi-zone (docs/multizone.md): single (one control plane for the mesh), "
    "global (zones enroll with it; policies are applied here) or zone (one zone's, "
    "with --zone and --global).",
)
@click.option("--zone", default="", help="--mode zone: this zone's name.")
@click.option(
    "--global",
    "global_url",
    default="",
    help="--mode zone: https://HOST:PORT of the global control plane (its replicas: "
    "URL,URL,...; tried in order, the last that answered first).",
)
@click.option(
    "--global-token",
    default="",
    envvar="MESHNODE_GLOBAL_TOKEN",
    help="--mode zone, first start: the zone's join token (`meshnode token create "
    "--zone-controlplane ZONE` at the global). Or env MESHNODE_GLOBAL_TOKEN.",
)
@click.option(
    "--zone-ingress",
    default="",
    metavar="IP:PORT",
    help="--mode zone: where other zones reach this zone's ingress (a node running "
    "`ztunnel run --ingress-listen`). Without it, the zone's services are not "
    "published to other zones.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def run(
    listen: str,
    db: str | None,
    data_dir: Path,
    trust_domain: str,
    cert_ttl: str,
    advertise: str,
    max_workloads_per_node: int,
    max_connections_per_peer: int,
    max_connections: int,
    node_view: str,
    shared_namespaces: str,
    max_full_syncs: int,
    metrics_listen: str,
    mode: str,
    zone: str,
    global_url: str,
    global_token: str,
    zone_ingress: str,
    log_level: str,
) -> None:
    """Serve the control-plane API over TLS 1.3 until SIGTERM."""
    from meshnode.controlplane.api import (
        ControlPlaneConfig,
        default_db_url,
        parse_duration,
        split_listen,
    )
    from meshnode.controlplane.api import run as serve
    from meshnode.controlplane.ca import CAError
    from meshnode.controlplane.metrics import parse_metrics_listen
    from meshnode.controlplane.registry import RegistryError, check_label
    from meshnode.controlplane.store import StoreError, open_store
    from meshnode.controlplane.zonesync import ZoneSyncError, parse_ingress
    from meshnode.core.identity import IdentityError, validate_trust_domain

    setup_logging(log_level)
    shared = tuple(n.strip() for n in shared_namespaces.split(",") if n.strip())
    try:
        ttl = parse_duration(cert_ttl)
        split_listen(listen)
        if metrics_listen:
            parse_metrics_listen(metrics_listen)
        for namespace in shared:
            check_label(namespace, "--shared-namespaces")
        validate_trust_domain(trust_domain)
        _check_mode(mode, zone, global_url, zone_ingress, global_token)
        if zone:
            check_label(zone, "--zone")
        if zone_ingress:
            parse_ingress(zone_ingress)
    except (ValueError, IdentityError, RegistryError, ZoneSyncError) as exc:
        fail(str(exc))
    ips = [a.strip() for a in advertise.split(",") if a.strip()]
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = open_store(db or default_db_url(data_dir))
    except (StoreError, OSError) as exc:
        fail(f"{exc}")
    config = ControlPlaneConfig(
        trust_domain=trust_domain,
        cert_ttl=timedelta(seconds=ttl),
        advertise=ips,
        data_dir=data_dir,
        max_workloads_per_node=max_workloads_per_node,
        max_connections_per_peer=max_connections_per_peer,
        max_connections=max_connections,
        max_full_syncs=max_full_syncs,
        node_view=node_view,
        shared_namespaces=shared,
        metrics_listen=metrics_listen,
        mode=mode,
        zone=zone,
        global_url=global_url,
        global_token=global_token,
        zone_ingress=zone_ingress,
    )
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(store, config, listen))
    except (StoreError, CAError, OSError, ZoneSyncError) as exc:
        fail(f"control plane stopped: {exc}")


def _check_mode(mode: str, zone: str, global_url: str, ingress: str, token: str) -> None:
    """The multi-zone options fit the mode (ValueError saying what to change)."""
    if mode == "zone":
        missing = [o for o, v in (("--zone", zone), ("--global", global_url)) if not v]
        if missing:
            raise ValueError(f"--mode zone needs {' and '.join(missing)}")
        return
    given = [
        o
        for o, v in (
            ("--zone", zone),
            ("--global", global_url),
            ("--global-token", token),
            ("--zone-ingress", ingress),
        )
        if v
    ]
    if given:
        raise ValueError(f"{', '.join(given)} only apply with --mode zone (this is --mode {mode})")
