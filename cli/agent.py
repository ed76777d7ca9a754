"""`meshnode agent run`: the node agent (a systemd service on real nodes)."""

from __future__ import annotations

from pathlib import Path

import click

from meshnode.cli.common import fail, setup_logging


@click.group()
def agent() -> None:
    """The node agent."""


@agent.command("run")
@click.option(
    "--enrolled",
    "config_dir",
    type=click.Path(path_type=Path),
    default=Path("/etc/meshnode"),
    show_default=True,
    help="The node's config directory (what `meshnode enroll` wrote).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def run(config_dir: Path, log_level: str) -> None:
    """Run the node agent of an enrolled node in the foreground (systemd runs it as
    meshnode-agent; `meshnode lab` runs one per lab node)."""
    from meshnode.bpf.errors import BpfError
    from meshnode.nodeagent.agent import Agent, AgentError, EnrolledSource
    from meshnode.nodeagent.config import NodeConfigError
    from meshnode.nodeagent.enrolled import EnrollmentError

    setup_logging(log_level)
    try:
        Agent(EnrolledSource(config_dir)).run()
    except (AgentError, NodeConfigError, BpfError, EnrollmentError) as exc:
        fail(f"node agent stopped: {exc}")
