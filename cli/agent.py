"""`meshnode agent run`: the node agent (a systemd service on real nodes)."""

from __future__ import annotations

from pathlib import Path

import click
from meshnode.cli.common import fail, setup_logging


@click.group()
def agent() -> None:
    """The node agent."""


@agent.command("run")
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="The node's description (node.json).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def run(config_path: Path, log_level: str) -> None:
    """Run the node agent in the foreground."""
    from meshnode.bpf.errors import BpfError
    from meshnode.controlplane.ca import CAError
    from meshnode.nodeagent.agent import Agent, AgentError
    from meshnode.nodeagent.config import NodeConfigError

    setup_logging(log_level)
    try:
        Agent(config_path).run()
    except (AgentError, NodeConfigError, BpfError, CAError) as exc:
        fail(f"node agent stopped: {exc}")
