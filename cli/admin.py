"""Admin commands against a running control plane: `meshnode token create`,
`apply -f`, `get`, `delete` (kumactl/kubectl style).

Trust: `--ca-file`, else `<data dir>/trust-bundle.pem` (written by the control plane
on its host), else `--pin SHA256` (fetch the bundle, keep it only if a root matches).
On the control plane's host, with no --cp, --ca-file or --pin: the root-only admin
socket `<data dir>/admin.sock` (no token; the server checks the caller's uid).
Otherwise TLS with an admin token: `--admin-token-file`, else env
MESHNODE_ADMIN_TOKEN, else `<data dir>/admin-token` if readable. No address is
trusted: loopback TCP without a token is refused.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import click
import yaml

from meshnode.cli.common import fail
from meshnode.cli.output import document, emit, item_list, output_option
from meshnode.core import api

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_CP = "https://127.0.0.1:15012"
DEFAULT_DATA_DIR = Path("/var/lib/meshnode-cp")

# What `get`/`delete` accept (any case, singular or plural) -> the API's name.
_KIND_ALIASES = {
    "node": "nodes",
    "nodes": "nodes",
    "no": "nodes",
    "workload": "workloads",
    "workloads": "workloads",
    "wl": "workloads",
    "service": "services",
    "services": "services",
    "svc": "services",
    "zone": "zones",
    "zones": "zones",
    "authorizationpolicy": "AuthorizationPolicy",
    "authorizationpolicies": "AuthorizationPolicy",
    "peerauthentication": "PeerAuthentication",
    "peerauthentications": "PeerAuthentication",
    "trafficsplit": "TrafficSplit",
    "trafficsplits": "TrafficSplit",
    "meshconfig": "MeshConfig",
    "meshconfigs": "MeshConfig",
    "identitygrant": "IdentityGrant",
    "identitygrants": "IdentityGrant",
}


def _connection_options(fn: F) -> F:
    options = [
        click.option(
            "--cp",
            "cp_url",
            default=DEFAULT_CP,
            show_default=True,
            envvar="MESHNODE_CP",
            help="Control plane URL.",
        ),
        click.option(
            "--ca-file",
            type=click.Path(dir_okay=False, path_type=Path),
            help="PEM trust bundle of the control plane.",
        ),
        click.option("--pin", help="SHA-256 of the CP's root certificate (fetch and pin)."),
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=DEFAULT_DATA_DIR,
            show_default=True,
            help="The control plane's data dir (trust bundle, admin token) if local.",
        ),
        click.option(
            "--admin-token-file",
            type=click.Path(dir_okay=False, path_type=Path),
            help="File with the admin token (or env MESHNODE_ADMIN_TOKEN).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _client(
    cp_url: str,
    ca_file: Path | None,
    pin: str | None,
    data_dir: Path,
    admin_token_file: Path | None,
) -> Any:
    from meshnode.core.cpclient import ApiClient, ClientError, fetch_pinned_bundle

    # On the control plane's host, the root-only admin socket: no token, no address
    # trusted; the server asks the kernel who calls.
    socket_path = data_dir / api.ADMIN_SOCKET_FILE
    try:
        local = stat.S_ISSOCK(socket_path.stat().st_mode)
    except OSError:  # absent, or a data dir this user may not enter
        local = False
    if cp_url == DEFAULT_CP and ca_file is None and not pin and local:
        return ApiClient(cp_url, b"", unix_socket=str(socket_path))
    bundle_file = data_dir / "trust-bundle.pem"
    try:
        if ca_file is not None:
            bundle = ca_file.read_bytes()
        elif pin:
            bundle = fetch_pinned_bundle(cp_url, pin)
        elif bundle_file.is_file():
            bundle = bundle_file.read_bytes()
        else:
            fail(
                f"no trust bundle for {cp_url}: pass --ca-file (copy {bundle_file} from the "
                "control plane host) or --pin <sha256 of its root>"
            )
    except OSError as exc:
        fail(f"cannot read {ca_file}: {exc.strerror}")
    except ClientError as exc:
        fail(exc.message)
    token = os.environ.get("MESHNODE_ADMIN_TOKEN", "").strip() or None
    try:
        if admin_token_file is not None:
            token = admin_token_file.read_text().strip()
        elif token is None and os.access(data_dir / "admin-token", os.R_OK):
            token = (data_dir / "admin-token").read_text().strip()
    except OSError as exc:
        fail(f"cannot read the admin token {admin_token_file}: {exc.strerror}")
    return ApiClient(cp_url, bundle, admin_token=token)


def _call(client: Any, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    from meshnode.core.cpclient import ClientError

    try:
        return client.call(method, path, body, **kw)
    except ClientError as exc:
        prefix = f"HTTP {exc.status}: " if exc.status else ""
        fail(f"{prefix}{exc.message}")


# --- token --------------------------------------------------------------------------


@click.group()
def token() -> None:
    """Join tokens for enrolling nodes."""


@token.command("create")
@click.option("--node", default="", help="The node name the token may enroll.")
@click.option(
    "--zone-controlplane",
    default="",
    metavar="ZONE",
    help="Instead of a node: a token that enrolls zone ZONE's control plane with this "
    "global control plane (docs/multizone.md).",
)
@click.option("--zone", default="", help="Pin the node to this zone.")
@click.option("--ttl", default="1h", show_default=True, help="Validity (30m, 1h, 2d).")
@click.option(
    "--identity",
    "identities",
    multiple=True,
    metavar="NS/SA",
    help="Grant the node this workload identity (<namespace>/<service-account>, or "
    "<namespace>/*); repeatable. Kept as the IdentityGrant token-<node>.",
)
@click.option(
    "--address",
    default="",
    help="The node's address [default: the address its enrollment comes from].",
)
@_connection_options
def token_create(
    node: str,
    zone_controlplane: str,
    zone: str,
    ttl: str,
    identities: tuple[str, ...],
    address: str,
    cp_url: str,
    ca_file: Path | None,
    pin: str | None,
    data_dir: Path,
    admin_token_file: Path | None,
) -> None:
    """Create a single-use join token for a node (or a zone's control plane) and
    print the command that uses it."""
    from meshnode.controlplane.api import parse_duration

    if bool(node) == bool(zone_controlplane):
        fail("give either --node NAME or --zone-controlplane ZONE")
    try:
        seconds = parse_duration(ttl)
    except ValueError as exc:
        fail(f"--ttl: {exc}")
    client = _client(cp_url, ca_file, pin, data_dir, admin_token_file)
    if zone_controlplane:
        if zone or identities or address:
            fail("--zone, --identity and --address are for node tokens")
        data = _call(
            client,
            "POST",
            api.ADMIN_TOKENS,
            {"zone_controlplane": zone_controlplane, "ttl_seconds": seconds},
        )
        click.echo(data["token"])
        click.echo(
            f"# single use, expires in {ttl}; start zone {zone_controlplane}'s control plane "
            "with it once:",
            err=True,
        )
        click.echo(
            f"meshnode controlplane run --mode zone --zone {zone_controlplane} --global "
            f"{cp_url} --global-token {data['token']}",
            err=True,
        )
        return
    body: dict[str, Any] = {"node": node, "ttl_seconds": seconds}
    if zone:
        body["zone"] = zone
    if identities:
        body["identities"] = list(identities)
    if address:
        body["address"] = address
    data = _call(client, "POST", api.ADMIN_TOKENS, body)
    click.echo(data["token"])
    granted = ", ".join(data.get("identities") or []) or "none yet (grant with meshnode apply)"
    click.echo(f"# single use, expires in {ttl}; grants {granted}; on node {node} run:", err=True)
    click.echo(f"meshnode enroll --cp {cp_url} --token {data['token']} --name {node}", err=True)


# --- apply / get / delete -------------------------------------------------------------


@click.command()
@click.option(
    "-f",
    "--filename",
    "path",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="YAML file with one or more resources ('-' = stdin).",
)
@_connection_options
def apply(
    path: str,
    cp_url: str,
    ca_file: Path | None,
    pin: str | None,
    data_dir: Path,
    admin_token_file: Path | None,
) -> None:
    """Create or update resources from YAML: all documents or none."""
    from meshnode.core.resources import ResourceError, parse_documents

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    source = "<stdin>" if path == "-" else path
    try:
        parse_documents(text, source=source)  # fail early, same messages as the server
    except ResourceError as exc:
        fail(str(exc))
    client = _client(cp_url, ca_file, pin, data_dir, admin_token_file)
    data = _call(
        client,
        "POST",
        api.ADMIN_RESOURCES + "?" + urlencode({"source": source}),
        text,
        content_type="application/yaml",
    )
    for line in data.get("results", []):
        click.echo(line)


# The control plane's mesh view: kind in `get`'s JSON (a list is `<kind>List`).
_MESH_KINDS = {"nodes": "Node", "workloads": "Workload", "services": "Service"}


def _kind(kind: str) -> str:
    resolved = _KIND_ALIASES.get(kind.lower())
    if resolved is None:
        fail(
            f"unknown kind {kind!r}; use one of: nodes, workloads, services, zones, "
            "AuthorizationPolicy, PeerAuthentication, TrafficSplit, MeshConfig, IdentityGrant"
        )
    return resolved


@click.command()
@click.argument("kind")
@click.argument("name", required=False)
@click.option("-n", "--namespace", default=None, help="Only this namespace.")
@output_option()
@_connection_options
def get(
    kind: str,
    name: str | None,
    namespace: str | None,
    output: str,
    cp_url: str,
    ca_file: Path | None,
    pin: str | None,
    data_dir: Path,
    admin_token_file: Path | None,
) -> None:
    """List nodes, workloads, services or resources of KIND (optionally one NAME)."""
    api_kind = _kind(kind)
    client = _client(cp_url, ca_file, pin, data_dir, admin_token_file)
    if api_kind == "zones":
        data = _call(client, "GET", api.ADMIN_ZONES)
        zones = [i for i in data["items"] if name is None or i.get("zone") == name]
        if name is not None and not zones:
            fail(f"zone {name!r} not known here")
        fields = {k: v for k, v in data.items() if k != "items"}
        listed = item_list("ZoneList", zones, **fields)
        emit(
            listed if name is None else document("Zone", zones[0]),
            output,
            lambda: _zones_table(data, zones),
        )
        return
    if api_kind in _MESH_KINDS:
        data = _call(
            client,
            "GET",
            {
                "nodes": api.ADMIN_NODES,
                "workloads": api.ADMIN_WORKLOADS,
                "services": api.ADMIN_SERVICES,
            }[api_kind],
        )
        items = [
            i
            for i in data["items"]
            if (name is None or i.get("name") == name)
            and (namespace is None or i.get("namespace", namespace) == namespace)
        ]
    else:
        query = {"kind": api_kind}
        if namespace:
            query["namespace"] = namespace
        if name:
            query["name"] = name
        data = _call(client, "GET", api.ADMIN_RESOURCES + "?" + urlencode(query))
        items = data["items"]
    if name is not None and not items:
        fail(f"{kind} {name!r} not found")
    if api_kind in _MESH_KINDS:
        single = _MESH_KINDS[api_kind]
        doc: Any = (
            item_list(f"{single}List", items, revision=data.get("revision"))
            if name is None
            else document(single, items[0])
        )
    elif output == "yaml":
        # Policy resources as `meshnode apply -f` takes them back: one document each.
        click.echo(yaml.safe_dump_all(items, sort_keys=False, explicit_start=True), nl=False)
        return
    else:
        # One resource: the document itself (apply refuses fields it does not know,
        # so it carries no apiVersion); several: a list of them.
        doc = (
            item_list(f"{api_kind}List", items, revision=data.get("revision"))
            if name is None
            else items[0]
        )
    emit(doc, output, lambda: _table(api_kind, items))


def _ago(when: float | None, now: float, never: str = "no report yet") -> str:
    """A node's last report: ``12s ago``, ``3m ago``; none reached this control
    plane replica since it started: ``no report yet`` (or `never`)."""
    if when is None:
        return never
    seconds = max(0, int(now - when))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def _zones_table(data: dict[str, Any], items: list[dict[str, Any]]) -> str:
    """`get zones`: at the global, every enrolled zone and its last sync; at a zone,
    how its sync with the global stands, then the other zones it knows."""
    now = time.time()
    if data.get("mode") == "global":
        rows = [["ZONE", "INGRESS", "SERVICES", "GENERATION", "LAST SYNC", "REFUSED"]] + [
            [
                i["zone"],
                i.get("ingress") or "-",
                str(i.get("services", 0)),
                "-" if i.get("generation") is None else str(i["generation"]),
                _ago(i.get("last_sync"), now, never="never"),
                str(len(i.get("refused") or [])),
            ]
            for i in items
        ]
        head = f"global control plane, revision {data.get('revision')}"
    else:
        if data.get("mode") != "zone":
            return "this control plane is not part of a multi-zone mesh (--mode single)"
        sync, status = data.get("sync") or {}, data.get("status") or {}
        state = "connected" if status.get("connected") else "NOT CONNECTED"
        head = (
            f"zone {data.get('zone')}: global {sync.get('global', '-')} {state}; took its "
            f"revision {sync.get('revision', '-')} "
            f"{_ago(sync.get('synced_at'), now, never='never')}; "
            f"published generation {status.get('published_generation', '-')}"
        )
        if status.get("last_error"):
            head += f"\nlast error: {status['last_error']}"
        for line in status.get("refused") or []:
            head += f"\nleft out by the global: {line}"
        rows = [["OTHER ZONE", "INGRESS", "SERVICES", "GENERATION"]] + [
            [i["zone"], i.get("ingress") or "-", str(i.get("services", 0)), str(i["generation"])]
            for i in items
        ]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return (
        head
        + "\n"
        + "\n".join(
            "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows
        )
    )


def _table(kind: str, items: list[dict[str, Any]]) -> str:
    if kind == "nodes":
        now = time.time()
        rows = [["NAME", "ZONE", "IP", "WORKLOADS", "REVISION", "LAST REPORT", "STALE"]] + [
            [
                i["name"],
                i["zone"] or "-",
                i["ip"],
                str(i.get("workloads", 0)),
                "-" if i.get("config_revision") is None else str(i["config_revision"]),
                _ago(i.get("last_report"), now),
                "STALE" if i.get("stale") else "-",
            ]
            for i in items
        ]
    elif kind == "workloads":
        rows = [["NODE", "NAMESPACE", "NAME", "SERVICE", "PORT", "VERSION"]] + [
            [
                i["node"],
                i["namespace"],
                i["name"],
                i["service"] or "-",
                str(i["port"]),
                i["version"] or "-",
            ]
            for i in items
        ]
    elif kind == "services":
        rows = [["NAMESPACE", "NAME", "VIP", "PORT", "ENDPOINTS", "OTHER ZONES"]] + [
            [
                i["namespace"],
                i["name"],
                i["vip"],
                str(i["ports"][0]["port"]),
                str(len(i["endpoints"])),
                ",".join(r["zone"] for r in i.get("remote", [])) or "-",
            ]
            for i in items
        ]
    else:
        rows = [["KIND", "NAMESPACE", "NAME"]] + [
            [i["kind"], i["metadata"].get("namespace", "-"), i["metadata"]["name"]] for i in items
        ]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


@click.command()
@click.argument("kind")
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("--node", default=None, help="For workloads: the node it runs on.")
@_connection_options
def delete(
    kind: str,
    name: str,
    namespace: str,
    node: str | None,
    cp_url: str,
    ca_file: Path | None,
    pin: str | None,
    data_dir: Path,
    admin_token_file: Path | None,
) -> None:
    """Delete a node (and its workloads), a workload, or a resource."""
    api_kind = _kind(kind)
    if api_kind == "services":
        fail("services exist while workloads name them; delete those workloads instead")
    client = _client(cp_url, ca_file, pin, data_dir, admin_token_file)
    if api_kind == "nodes":
        path = api.path(api.ADMIN_NODE, name=name)
    elif api_kind == "workloads":
        if not node:
            fail("deleting a workload needs --node NODE (see: meshnode get workloads)")
        path = api.path(api.ADMIN_WORKLOAD, node=node, name=name)
    else:
        ns = "default" if api_kind == "MeshConfig" else namespace
        path = api.path(api.ADMIN_RESOURCE, kind=api_kind, namespace=ns, name=name)
    data = _call(client, "DELETE", path)
    click.echo(f"{kind} {data.get('deleted', name)} deleted")


# --- ca rotate ------------------------------------------------------------------------


@click.group()
def ca() -> None:
    """The mesh CA (root rotation)."""


@ca.command("rotate")
@click.option(
    "--overlap",
    default="",
    help="How long the old root stays trusted (30m, 25h, 2d) [default: the minimum, one "
    "certificate lifetime + the watch interval + clock skew].",
)
@click.option(
    "--force",
    is_flag=True,
    help="Allow a shorter overlap (a compromised root): nodes whose certificates the old "
    "root signed are locked out and must re-enroll.",
)
@_connection_options
def ca_rotate(
    overlap: str,
    force: bool,
    cp_url: str,
    ca_file: Path | None,
    pin: str | None,
    data_dir: Path,
    admin_token_file: Path | None,
) -> None:
    """Start signing with a new root; the old one is trusted for the overlap."""
    from meshnode.controlplane.api import parse_duration

    body: dict[str, Any] = {"force": force}
    if overlap:
        try:
            body["overlap_seconds"] = 0.0 if overlap.strip() == "0" else parse_duration(overlap)
        except ValueError as exc:
            fail(f"--overlap: {exc}")
    client = _client(cp_url, ca_file, pin, data_dir, admin_token_file)
    data = _call(client, "POST", api.ADMIN_CA_ROTATE, body)
    hours = float(data.get("overlap_seconds", 0)) / 3600
    click.echo(
        f"new root {data['active'][:16]}... signs from now on; "
        f"{len(data['roots'])} roots trusted, the older ones for {hours:.1f} h more"
    )
