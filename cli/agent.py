"""`meshnode agent run`: the node agent (a systemd service on real nodes)."""

from __future__ import annotations

from pathlib import Path

import click

from meshnode.cli.common import fail, setup_logging

_enrolled = click.option(
    "--enrolled",
    "config_dir",
    type=click.Path(path_type=Path),
    default=Path("/etc/meshnode"),
    show_default=True,
    help="The node's config directory (what `meshnode enroll` wrote).",
)


@click.group()
def agent() -> None:
    """The node agent."""


@agent.command("run")
@_enrolled
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


@agent.command("detach")
@_enrolled
def detach(config_dir: Path) -> None:
    """Detach the mesh's BPF programs from this node's cgroup tree and remove its
    pinned maps: workloads' traffic is no longer captured. A stopped agent leaves
    them in place on purpose (a restart or an upgrade never drops traffic); removing
    the package runs this after stopping meshnode-agent and meshnode-ztunnel.
    Run it only with the agent stopped."""
    import shutil

    from meshnode.bpf.errors import BpfError
    from meshnode.bpf.loader import MeshBpf
    from meshnode.nodeagent.enrolled import EnrollmentError, load_enrollment

    try:
        e = load_enrollment(config_dir)
        gone = MeshBpf(Path(e.bpf_pin_dir)).detach_stale(Path(e.cgroup_parent))
    except (EnrollmentError, BpfError, OSError) as exc:
        fail(f"cannot detach the mesh's BPF programs: {exc}")
    pins = Path(e.bpf_pin_dir)
    shutil.rmtree(pins, ignore_errors=True)
    names = ", ".join(sorted({g["name"] for g in gone})) or "none were attached"
    click.echo(f"detached {len(gone)} programs from {e.cgroup_parent} ({names}); removed {pins}")
