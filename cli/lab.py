"""`meshnode lab ...`: the lab's command line."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, TextIO

import click

if TYPE_CHECKING:
    from meshnode.lab.lab import Lab
from meshnode.cli.common import fail
from meshnode.cli.output import progress_option, progress_printer


def _lab() -> Lab:
    from meshnode.lab.lab import Lab

    return Lab()


def _errors() -> tuple[type[Exception], ...]:
    """The expected failures: printed as one line, never as a traceback."""
    from meshnode.bpf.errors import BpfError
    from meshnode.lab.host import HostError
    from meshnode.lab.lab import LabError

    return (LabError, HostError, BpfError)


@click.group()
def lab() -> None:
    """A mesh on this machine: network namespaces as nodes (needs root).

    The lab is named by $MESHNODE_LAB (default: mnlab)."""


@lab.command("up")
@click.option(
    "--nodes", default=2, show_default=True, help="How many nodes (with --zones: per zone)."
)
@click.option(
    "--zones",
    default=1,
    show_default=True,
    type=click.IntRange(1, 4),
    help="Zones (docs/multizone.md): with 2..4, a global control plane on a WAN and per "
    "zone a network, a control plane and an ingress on the zone's last node.",
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 16),
    help="ztunnel worker processes per node.",
)
@click.option(
    "--dns-upstream",
    "dns_upstreams",
    multiple=True,
    metavar="HOST:PORT",
    help="Where the nodes' mesh DNS forwards other names (repeatable); default: the "
    "host's resolvers.",
)
@click.option(
    "--demo",
    is_flag=True,
    help="Also start a demo server and client and show "
    "traffic flowing with the identities it carried.",
)
@progress_option
def up(
    nodes: int,
    zones: int,
    workers: int,
    dns_upstreams: tuple[str, ...],
    demo: bool,
    progress: bool | None,
) -> None:
    """Create the nodes and start an agent (and its ztunnel) on each."""
    lab_ = _lab()
    try:
        lab_.up(
            nodes,
            log=click.echo,
            workers=workers,
            dns_upstreams=dns_upstreams,
            progress=progress_printer(progress),
            **({"zones": zones} if zones != 1 else {}),
        )
        if demo:
            from meshnode.lab.demo import run_demo

            run_demo(lab_, log=click.echo)
    except _errors() as exc:
        fail(f"{exc}\n(clean up with `meshnode lab down`)")
    click.echo(
        f"lab {lab_.name} is up. Try `meshnode lab status`; remove it with `meshnode lab down`."
    )


@lab.command("down")
def down() -> None:
    """Remove every namespace, cgroup, BPF program, pinned map and process of the lab."""
    try:
        _lab().down(log=click.echo)
    except _errors() as exc:
        fail(str(exc))


@lab.command("status")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
def status(output: str) -> None:
    """Nodes, workloads, services with their VIPs, and the BPF programs attached."""
    try:
        st = _lab().status()
    except _errors() as exc:
        fail(str(exc))
    if output == "json":
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"lab {st['lab']}" + (f" ({len(st['zones'])} zones)" if "zones" in st else ""))
    cp = st["controlplane"]
    click.echo(
        ("GLOBAL CONTROL PLANE " if "zones" in st else "CONTROL PLANE ")
        + f"{cp['url']} pid {cp['pid']} "
        + ("up" if cp["alive"] else "DOWN")
        + (f", revision {cp['revision']}" if "revision" in cp else "")
        + (f" ({cp['error']})" if "error" in cp else "")
    )
    if "zones" in st:
        click.echo("ZONES")
        for z in st["zones"]:
            took = z.get("global_revision")
            sync = (
                f", took global revision {took}, sync "
                + ("connected" if z.get("connected") else "NOT CONNECTED")
                + (f" ({z['sync_error']})" if z.get("sync_error") else "")
                if "revision" in z
                else ""
            )
            click.echo(
                f"  {z['name']:<8} {z['url']} pid {z['pid']} "
                + ("up" if z["alive"] else "DOWN")
                + (f", revision {z['revision']}" if "revision" in z else "")
                + sync
                + (f" ({z['error']})" if "error" in z else "")
            )
            click.echo(
                f"           network {z['subnet']}, router {z['router_wan_ip']} on the WAN, "
                f"ingress {z['ingress_node']} at {z['ingress']}"
            )
    click.echo("NODES")
    for n in st["nodes"]:
        state = "ready" if n["ready"] and n["agent_alive"] and n["ztunnel_alive"] else "NOT READY"
        e = n["enrollment"]
        enrolled = (
            f"enrolled as {e['spiffe_id']} (cert until {e['cert_expires']})"
            if e.get("registered") and "spiffe_id" in e
            else f"NOT ENROLLED ({e.get('error', 'not registered with the control plane')})"
        )
        click.echo(
            f"  {n['name']:<8} {n['ip']:<14} {n['zone']:<8} {state}, agent pid "
            f"{n['agent_pid']}, ztunnel pid {n['ztunnel_pid']}, at revision {n['cp_revision']}"
        )
        click.echo(f"           {enrolled}")
        for p in n["bpf_programs"]:
            if "error" in p:
                click.echo(f"           bpf: cannot list: {p['error']}")
            else:
                click.echo(
                    f"           bpf: {p.get('attach_type', '?'):<22} {p.get('name', '?')}"
                    f" (id {p.get('id', '?')})"
                )
    click.echo("SERVICES")
    for s in st["services"]:
        remote = [f"{r['zone']} ({r['endpoints']} via {r['ingress']})" for r in s.get("remote", [])]
        click.echo(
            (
                f"  {s['name'] + '.' + s['namespace']:<24} {s['zone']:<8} "
                if "zone" in s
                else f"  {s['name']}.{s['namespace']:<12} "
            )
            + f"{s['vip']}:{s['port']:<6} -> "
            + (", ".join(s["endpoints"]) or ("(no endpoints)" if not remote else "(none here)"))
            + (f" + {', '.join(remote)}" if remote else "")
        )
    click.echo("WORKLOADS")
    for w in st["workloads"]:
        alive = "running" if w["alive"] else "EXITED"
        click.echo(
            f"  {w['name']:<12} {w['node']:<8} :{w['port']:<6} pid {w['pid']} {alive:<8} "
            f"{w['identity']}"
        )


@lab.group("workload")
def workload() -> None:
    """Mesh workloads of the lab."""


@workload.command("add", context_settings={"ignore_unknown_options": True})
@click.argument("node")
@click.argument("name")
@click.option("--service", required=True, help="The service this workload serves.")
@click.option(
    "--port",
    required=True,
    type=click.IntRange(1, 65535),
    help="The port it listens on (also the service's port on its VIP).",
)
@click.option("--namespace", default="default", show_default=True)
@click.option("--version", "version", default="", help="Subset label for traffic splits.")
@click.option(
    "--service-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="The port on the service VIP (default: the first workload's --port).",
)
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED, required=True)
def workload_add(
    node: str,
    name: str,
    service: str,
    port: int,
    namespace: str,
    version: str,
    service_port: int | None,
    cmd: tuple[str, ...],
) -> None:
    """Run CMD as a mesh workload on NODE: meshnode lab workload add NODE NAME --service S
    --port P -- CMD..."""
    lab_ = _lab()
    try:
        wl = lab_.add_workload(
            node,
            name,
            service,
            port,
            list(cmd),
            namespace=namespace,
            version=version,
            service_port=service_port,
        )
        st = lab_.load()
    except _errors() as exc:
        fail(str(exc))
    from meshnode.lab.lab import service_key

    svc = st.services[service_key(service, namespace)]
    at = (
        ", ".join(f"{vip}:{svc.port} in {zone}" for zone, vip in svc.vips.items())
        if svc.vips
        else f"{svc.vip}:{svc.port}"
    )
    click.echo(
        f"workload {wl.name} on {wl.node} (pid {wl.pid}) serves {service}.{namespace} "
        f"at {at} as spiffe://cluster.local/ns/{namespace}/sa/{service}"
    )


@workload.command("rm")
@click.argument("name")
def workload_rm(name: str) -> None:
    """Stop a workload and remove it from the mesh."""
    try:
        _lab().remove_workload(name)
    except _errors() as exc:
        fail(str(exc))
    click.echo(f"workload {name} removed")


@lab.command("apply")
@click.option(
    "-f",
    "--filename",
    type=click.File("r"),
    required=True,
    help="YAML resources (AuthorizationPolicy, PeerAuthentication, TrafficSplit, "
    "MeshConfig); - for stdin.",
)
def apply(filename: TextIO) -> None:
    """Apply policy resources to every node of the lab (all or nothing)."""
    from meshnode.core.resources import ResourceError

    text = filename.read()
    try:
        for line in _lab().apply(text, filename.name):
            click.echo(line)
    except ResourceError as exc:
        fail(f"nothing applied: {exc}")
    except _errors() as exc:
        fail(str(exc))


@lab.command("delete")
@click.argument("kind")
@click.argument("name")
@click.option("--namespace", default="default", show_default=True)
def delete(kind: str, name: str, namespace: str) -> None:
    """Delete a policy resource from the lab."""
    try:
        _lab().delete_resource(kind, name, namespace)
    except _errors() as exc:
        fail(str(exc))
    click.echo(f"{kind}/{name} deleted")


@lab.group("controlplane")
def controlplane() -> None:
    """Stop and start the lab's control planes (outages, for tests and demos)."""


def _which(zone: str | None, global_: bool) -> str | None:
    """--zone NAME or --global (a multi-zone lab); neither: a single-zone lab's."""
    if zone and global_:
        fail("give --zone NAME or --global, not both")
    if global_:
        return "global"
    if zone is None:
        from meshnode.lab.lab import LabError

        try:
            zones = _lab().load().zones
        except LabError as exc:
            fail(str(exc))
        if zones:
            fail(f"the lab has zones: --global, or --zone with one of {', '.join(zones)}")
    return zone


@controlplane.command("stop")
@click.option("--zone", default=None, metavar="NAME", help="That zone's control plane.")
@click.option("--global", "global_", is_flag=True, help="The global control plane.")
@click.option("--kill", is_flag=True, help="SIGKILL at once (a crash), not SIGTERM.")
def controlplane_stop(zone: str | None, global_: bool, kill: bool) -> None:
    """Stop a control plane (SIGTERM, then SIGKILL): nodes go on from what they hold."""
    which = _which(zone, global_)
    try:
        _lab().stop_controlplane(which, kill=kill)
    except _errors() as exc:
        fail(str(exc))
    click.echo(f"{which or 'the'} control plane " + ("killed" if kill else "stopped"))


@controlplane.command("start")
@click.option("--zone", default=None, metavar="NAME", help="That zone's control plane.")
@click.option("--global", "global_", is_flag=True, help="The global control plane.")
def controlplane_start(zone: str | None, global_: bool) -> None:
    """Start a stopped control plane again (same data, same address)."""
    which = _which(zone, global_)
    try:
        _lab().start_controlplane(which)
    except _errors() as exc:
        fail(str(exc))
    click.echo(f"{which or 'the'} control plane is up")


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("node")
@click.option(
    "--workload",
    "workload_name",
    default=None,
    help="Run inside this workload's cgroup, so its connections are meshed.",
)
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED, required=True)
def exec_(node: str, workload_name: str | None, cmd: tuple[str, ...]) -> None:
    """Run CMD on NODE (meshnode lab exec NODE [--workload W] -- CMD...)."""
    try:
        code = _lab().exec(node, list(cmd), workload=workload_name)
    except _errors() as exc:
        fail(str(exc))
    raise SystemExit(code)
