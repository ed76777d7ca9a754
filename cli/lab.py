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
@click.option("--nodes", default=2, show_default=True, help="How many nodes.")
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
    nodes: int, workers: int, dns_upstreams: tuple[str, ...], demo: bool, progress: bool | None
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
    click.echo(f"lab {st['lab']}")
    cp = st["controlplane"]
    click.echo(
        f"CONTROL PLANE {cp['url']} pid {cp['pid']} "
        + ("up" if cp["alive"] else "DOWN")
        + (f", revision {cp['revision']}" if "revision" in cp else "")
        + (f" ({cp['error']})" if "error" in cp else "")
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
        click.echo(
            f"  {s['name']}.{s['namespace']:<12} {s['vip']}:{s['port']:<6} -> "
            f"{', '.join(s['endpoints']) or '(no endpoints)'}"
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
    click.echo(
        f"workload {wl.name} on {wl.node} (pid {wl.pid}) serves {service}.{namespace} "
        f"at {svc.vip}:{svc.port} as spiffe://cluster.local/ns/{namespace}/sa/{service}"
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
