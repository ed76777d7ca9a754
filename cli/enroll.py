"""`meshnode enroll`: join this node to a control plane with a join token, write its
credentials and configuration, install and start the systemd services."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import click

from meshnode.cli.common import fail
from meshnode.cli.output import Progress, progress_option, progress_printer


@click.command()
@click.option(
    "--cp",
    "cp_url",
    required=True,
    metavar="URL",
    help="The control plane, https://host[:port] (port 15012 by default).",
)
@click.option(
    "--token",
    required=True,
    envvar="MESHNODE_JOIN_TOKEN",
    help="The join token mn1.<id>.<secret>.<pin> (or $MESHNODE_JOIN_TOKEN).",
)
@click.option("--name", default=None, help="Node name [default: the host name].")
@click.option("--zone", default="", help="Zone (the token may fix it).")
@click.option(
    "--ip",
    default="",
    help="The address this node expects; the control plane refuses it unless the token "
    "names it or the enrollment comes from it [default: what the control plane sees].",
)
@click.option(
    "--config-dir",
    type=click.Path(path_type=Path),
    default=Path("/etc/meshnode"),
    show_default=True,
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=Path("/var/lib/meshnode"),
    show_default=True,
)
@click.option(
    "--cgroup-parent",
    default=None,
    metavar="PATH",
    help="Where the agent attaches its BPF programs [default: the cgroup v2 root].",
)
@click.option(
    "--proxy-cgroup",
    default="",
    metavar="PATH",
    help="The cgroup ztunnel runs in, relative to the cgroup2 mount (only it may bind "
    "the proxy's address and ports) [default: the meshnode-ztunnel unit's slice].",
)
@click.option(
    "--bpf-pin-dir",
    default="",
    metavar="PATH",
    help="Where the agent pins its BPF objects (one per node on a host that runs "
    "several, like `meshnode lab`) [default: /sys/fs/bpf/meshnode].",
)
@click.option("--force", is_flag=True, help="Enroll again even if this node is enrolled.")
@click.option("--no-start", is_flag=True, help="Write the files only; install and start nothing.")
@click.option(
    "--unit-dir", type=click.Path(path_type=Path), default=Path("/etc/systemd/system"), hidden=True
)
@click.option("--timeout", type=float, default=10.0, hidden=True)
@progress_option
def enroll(
    cp_url: str,
    token: str,
    name: str | None,
    zone: str,
    ip: str,
    config_dir: Path,
    state_dir: Path,
    cgroup_parent: str | None,
    proxy_cgroup: str,
    bpf_pin_dir: str,
    force: bool,
    no_start: bool,
    unit_dir: Path,
    timeout: float,
    progress: bool | None,
) -> None:
    """Enroll this node with the control plane at --cp using a join token."""
    from meshnode.bpf.cgroups import cgroup2_mount
    from meshnode.bpf.errors import BpfError
    from meshnode.core.errors import MeshnodeError
    from meshnode.core.identity import check_node_name
    from meshnode.core.token import parse_token
    from meshnode.nodeagent import enroll as en
    from meshnode.nodeagent import units

    try:
        join = parse_token(token)
        url = en.ControlPlaneUrl.parse(cp_url)
        node_name = check_node_name(name or socket.gethostname().split(".")[0].lower())
    except MeshnodeError as exc:
        fail(str(exc))
    config_dir, state_dir = config_dir.absolute(), state_dir.absolute()
    layout = en.NodeLayout(config_dir, state_dir)

    if not force:
        try:
            found = en.existing_enrollment(layout)
        except en.EnrollError as exc:
            fail(str(exc))
        if found is not None:
            click.echo(found.message())
            return

    if os.geteuid() != 0 and not no_start:
        fail(
            "enrolling installs and starts systemd services: run it as root "
            "(or with --no-start and writable --config-dir/--state-dir)"
        )
    if cgroup_parent is None:
        try:
            cgroup_parent = str(cgroup2_mount())
        except BpfError as exc:
            fail(f"cannot choose the cgroup parent: {exc}; or pass --cgroup-parent")
    for d in (config_dir, state_dir):
        probe = d if d.exists() else next((p for p in d.parents if p.exists()), Path("/"))
        if not os.access(probe, os.W_OK):
            fail(
                f"cannot write {d} (no write access to {probe}); run as root or pick "
                "another directory"
            )

    # Steps: enrolled, written; then installed, started (unless --no-start).
    steps = Progress(2 if no_start else 4, progress_printer(progress))
    try:
        result = en.enroll(url, join, node_name, zone, ip, timeout=timeout)
    except MeshnodeError as exc:
        fail(str(exc))
    except Exception as exc:  # a bug: still one line, and nothing was written
        fail(
            f"enrollment failed unexpectedly ({type(exc).__name__}: {exc}); nothing was "
            "written; please report this"
        )
    steps.step(f"{node_name}: enrolled with {url}")
    try:
        local = {"proxy_cgroup": proxy_cgroup.strip("/"), "bpf_pin_dir": bpf_pin_dir}
        doc = en.write_enrollment(layout, result, cgroup_parent, zone, ip, local)
    except OSError as exc:
        fail(
            f"enrolled, but writing {exc.filename or config_dir} failed: {exc.strerror}; "
            "fix it and enroll again with a new token and --force"
        )
    steps.step(f"{node_name}: credentials and configuration written to {config_dir}")
    click.echo(
        f"enrolled {doc['name']} (zone {doc['zone'] or '-'}, ip {doc['ip'] or '-'}) "
        f"in trust domain {doc['trust_domain']} with {url}; config in {config_dir}"
    )

    if no_start:
        click.echo(
            f"--no-start: started nothing; run `meshnode agent run --enrolled "
            f"{config_dir}` (and ztunnel), or enroll without --no-start"
        )
        return
    why = units.systemd_missing()
    if why is not None:
        click.echo(
            f"warning: no systemd here ({why}): started nothing; run "
            f"`meshnode agent run --enrolled {config_dir}` yourself",
            err=True,
        )
        return
    try:
        rendered = units.render_units(
            units.UnitPaths(
                units.meshnode_executable(), config_dir, state_dir, units.package_source()
            )
        )
        paths = units.install_units(unit_dir, rendered)
    except (ValueError, OSError) as exc:
        fail(f"enrolled (config in {config_dir}), but installing the units failed: {exc}")
    steps.step(f"{node_name}: units installed in {unit_dir}")
    try:
        units.start_units(restart=force)
    except (units.UnitError, OSError) as exc:
        fail(
            f"enrolled and installed {', '.join(str(p) for p in paths)}, but starting them "
            f"failed: {exc}; see `journalctl -u {units.AGENT_UNIT} -u {units.ZTUNNEL_UNIT}`"
        )
    steps.step(f"{node_name}: {' and '.join(units.UNIT_NAMES)} started")
    click.echo(f"started {' and '.join(units.UNIT_NAMES)} (`systemctl status {units.AGENT_UNIT}`)")
