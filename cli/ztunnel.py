"""`meshnode ztunnel run`: the node proxy. Normally started by the node agent."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
from meshnode.cli.common import fail, setup_logging


@click.group()
def ztunnel() -> None:
    """The node proxy (data plane)."""


@ztunnel.command("run")
@click.option("--snapshot", type=click.Path(path_type=Path), required=True,
              help="State snapshot written by the node agent.")
@click.option("--outbound", default="127.0.0.1:15001", show_default=True)
@click.option("--inbound", default="0.0.0.0:15008", show_default=True)
@click.option("--admin", default="127.0.0.1:15000", show_default=True)
@click.option("--readiness", default="127.0.0.1:15021", show_default=True)
@click.option("--connect-timeout", default=5.0, show_default=True, type=float)
@click.option("--drain-timeout", default=10.0, show_default=True, type=float)
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def run(snapshot: Path, outbound: str, inbound: str, admin: str, readiness: str,
        connect_timeout: float, drain_timeout: float, log_level: str) -> None:
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
            connect_timeout=connect_timeout,
            drain_timeout=drain_timeout,
        ).validate()
        run_ztunnel(config)
    except (ConfigError, StateError) as exc:
        fail(f"ztunnel cannot start: {exc}")
    except OSError as exc:
        fail(f"ztunnel cannot start: {exc.strerror or exc} "
             f"({getattr(exc, 'filename', '') or 'listener address'}); is another ztunnel "
             "running on this node?")
    logging.shutdown()
    sys.exit(0)
