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
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="A node description file (what `meshnode lab` writes).",
)
@click.option(
    "--enrolled",
    "config_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="An enrolled node's config directory (what `meshnode enroll` wrote).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def run(config_path: Path | None, config_dir: Path | None, log_level: str) -> None:
    """Run the node agent in the foreground (systemd runs it as meshnode-agent)."""
    from meshnode.bpf.errors import BpfError
    from meshnode.controlplane.ca import CAError
    from meshnode.nodeagent.agent import Agent, AgentError, EnrolledSource, FileSource
    from meshnode.nodeagent.config import NodeConfigError
    from meshnode.nodeagent.enrolled import EnrollmentError

    if (config_path is None) == (config_dir is None):
        fail("give exactly one of --config FILE (lab) or --enrolled DIR (an enrolled node)")
    setup_logging(log_level)
    try:
        source = FileSource(config_path) if config_path else EnrolledSource(config_dir)  # type: ignore[arg-type]
        Agent(source).run()
    except (AgentError, NodeConfigError, BpfError, CAError, EnrollmentError) as exc:
        fail(f"node agent stopped: {exc}")
