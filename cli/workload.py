"""`meshnode workload add|rm|ls`: the workloads of this (enrolled) node. The
registry is local (/etc/meshnode/workloads.json); the agent registers each
workload with the control plane, fetches its certificate and meshes its
connections."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from meshnode.cli.common import fail
from meshnode.cli.output import columns, emit, item_list, output_option

if TYPE_CHECKING:
    from meshnode.nodeagent.enrolled import Enrollment

DEFAULT_CONFIG_DIR = Path("/etc/meshnode")


def _enrollment(config_dir: Path) -> Enrollment:
    from meshnode.nodeagent.enrolled import EnrollmentError, load_enrollment

    try:
        return load_enrollment(config_dir)
    except EnrollmentError as exc:
        fail(str(exc))


def _agent_status(state_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((state_dir / "agent-status.json").read_text()))
    except (OSError, ValueError):
        return {}


class Refused(Exception):
    """The control plane refused the workload (the agent reported why)."""


def _poke_agent(state_dir: Path, wait_for: str | None, gone: bool = False) -> str:
    """SIGHUP the agent, wait until it applied the change; returns a note. Raises
    Refused when the agent reports that the control plane refused `wait_for`."""
    status = _agent_status(state_dir)
    pid = status.get("pid")
    if not pid or not status.get("ready"):
        return (
            "the node agent is not running: it picks this up when it starts "
            "(systemctl start meshnode-agent)"
        )
    try:
        os.kill(int(pid), signal.SIGHUP)
    except ProcessLookupError:
        return "the node agent is not running: it picks this up when it starts"
    before = status.get("updated", 0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        st = _agent_status(state_dir)
        names = st.get("workloads", [])
        if st.get("updated", 0) > before:
            refusal = (st.get("refused") or {}).get(wait_for) if not gone else None
            if refusal:
                raise Refused(refusal)
            if (wait_for in names) != gone:
                return "applied by the node agent"
        time.sleep(0.1)
    return "the node agent has not applied it yet; see `journalctl -u meshnode-agent`"


@click.group()
def workload() -> None:
    """Workloads of this node."""


@workload.command("add")
@click.argument("name")
@click.option("--service", required=True)
@click.option("--port", required=True, type=click.IntRange(1, 65535))
@click.option("--namespace", default="default", show_default=True)
@click.option("--version", "version", default="", help="Subset label for traffic splits.")
@click.option("--systemd-unit", default="", help="The workload is this systemd unit.")
@click.option("--cgroup", default="", help="The workload is this cgroup (path).")
@click.option("--pid", default=0, type=int, help="The workload is this process's cgroup.")
@click.option(
    "--config-dir", type=click.Path(path_type=Path), default=DEFAULT_CONFIG_DIR, show_default=True
)
def add(
    name: str,
    service: str,
    port: int,
    namespace: str,
    version: str,
    systemd_unit: str,
    cgroup: str,
    pid: int,
    config_dir: Path,
) -> None:
    """Mesh a workload of this node."""
    from meshnode.bpf.cgroups import cgroup2_mount
    from meshnode.core.identity import IdentityError, SpiffeId
    from meshnode.nodeagent.enrolled import (
        EnrollmentError,
        WorkloadSpec,
        load_workloads,
        resolve_cgroup,
        save_workloads,
    )

    if sum(bool(x) for x in (systemd_unit, cgroup, pid)) != 1:
        fail("say what the workload is: exactly one of --systemd-unit, --cgroup or --pid")
    e = _enrollment(config_dir)
    try:
        ident = SpiffeId(e.trust_domain, namespace, service)
    except IdentityError as exc:
        fail(f"bad --service or --namespace: {exc}")
    spec = WorkloadSpec(
        name=name,
        service=service,
        port=port,
        namespace=namespace,
        version=version,
        systemd_unit=systemd_unit,
        cgroup=cgroup,
        pid=pid,
    )
    note = ""
    try:
        path = resolve_cgroup(spec, cgroup2_mount())
        if not path.is_dir():
            note = f" (cgroup {path} does not exist yet: meshed once it does)"
    except EnrollmentError as exc:
        note = f" ({exc}; meshed once it runs)"
    try:
        previous = load_workloads(e.files.workloads)
        workloads = [w for w in previous if w.name != name]
        if any(w.port == port for w in workloads):
            fail(f"port {port} is already used by another workload of this node")
        save_workloads(e.files.workloads, [*workloads, spec])
    except EnrollmentError as exc:
        fail(str(exc))
    try:
        result = _poke_agent(e.state_dir, name)
    except Refused as refusal:
        # Nothing half-done stays behind: the node's registry is as it was.
        had = any(w.name == name for w in previous)  # an update: the old one stays
        try:
            save_workloads(e.files.workloads, previous)
            _poke_agent(e.state_dir, None if had else name, gone=True)
        except (EnrollmentError, Refused):
            pass
        fail(f"workload {name} ({ident}) not added: the control plane refused it: {refusal}")
    click.echo(f"workload {name} ({ident}) on port {port}{note}: {result}")


@workload.command("rm")
@click.argument("name")
@click.option(
    "--config-dir", type=click.Path(path_type=Path), default=DEFAULT_CONFIG_DIR, show_default=True
)
def rm(name: str, config_dir: Path) -> None:
    """Stop meshing a workload (the process itself is left alone)."""
    from meshnode.nodeagent.enrolled import EnrollmentError, load_workloads, save_workloads

    e = _enrollment(config_dir)
    try:
        workloads = load_workloads(e.files.workloads)
        if not any(w.name == name for w in workloads):
            fail(f"no workload {name} on this node (`meshnode workload ls`)")
        save_workloads(e.files.workloads, [w for w in workloads if w.name != name])
    except EnrollmentError as exc:
        fail(str(exc))
    click.echo(f"workload {name} removed: {_poke_agent(e.state_dir, name, gone=True)}")


@workload.command("ls")
@click.option(
    "--config-dir", type=click.Path(path_type=Path), default=DEFAULT_CONFIG_DIR, show_default=True
)
@output_option()
def ls(config_dir: Path, output: str) -> None:
    """The workloads of this node."""
    from meshnode.nodeagent.enrolled import EnrollmentError, load_workloads

    e = _enrollment(config_dir)
    try:
        workloads = load_workloads(e.files.workloads)
    except EnrollmentError as exc:
        fail(str(exc))
    applied = set(_agent_status(e.state_dir).get("workloads", []))
    items: list[dict[str, Any]] = [
        {
            "name": w.name,
            "namespace": w.namespace,
            "service": w.service,
            "port": w.port,
            "version": w.version,
            "systemd_unit": w.systemd_unit,
            "cgroup": w.cgroup,
            "pid": w.pid or None,
            "meshed": w.name in applied,
        }
        for w in workloads
    ]
    emit(
        item_list("LocalWorkloadList", items, node=e.name),
        output,
        lambda: columns(
            [["NAME", "SERVICE", "PORT", "WHAT", "MESHED"]]
            + [
                [
                    i["name"],
                    i["service"],
                    str(i["port"]),
                    f"unit {i['systemd_unit']}"
                    if i["systemd_unit"]
                    else f"cgroup {i['cgroup']}"
                    if i["cgroup"]
                    else f"pid {i['pid']}",
                    "yes" if i["meshed"] else "not yet",
                ]
                for i in items
            ]
        ),
    )
