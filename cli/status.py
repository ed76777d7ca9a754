"""`meshnode status`: this node at a glance -- enrollment, control-plane
reachability, certificate expiry, BPF programs, workloads, services, and the
config version in force."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from meshnode.cli.common import fail
from meshnode.cli.output import document, emit, output_option


def _expiry(path: Path) -> str:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return "missing"
    end = cert.not_valid_after_utc
    left = (end - datetime.now(UTC)).total_seconds()
    when = end.strftime("%Y-%m-%d %H:%M UTC")
    if left <= 0:
        return f"EXPIRED at {when}"
    span = f"{left / 3600:.1f} h" if left >= 3600 else f"{left / 60:.0f} min"
    return f"expires {when} (in {span})"


def _ready(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            doc = json.load(resp)
            workers = doc.get("workers")
            return "ready" + (f" ({len(workers)} workers)" if workers else "")
    except Exception as exc:
        return f"NOT READY ({getattr(exc, 'reason', exc)})"


@click.command()
@click.option(
    "--config-dir",
    type=click.Path(path_type=Path),
    default=Path("/etc/meshnode"),
    show_default=True,
)
@output_option()
def status(config_dir: Path, output: str) -> None:
    """Show this node's state."""
    from meshnode.bpf.loader import MeshBpf
    from meshnode.nodeagent.enrolled import EnrollmentError, load_enrollment

    try:
        e = load_enrollment(config_dir)
    except EnrollmentError as exc:
        fail(str(exc))
    try:
        agent: dict[str, Any] = json.loads((e.state_dir / "agent-status.json").read_text())
    except (OSError, ValueError):
        agent = {}
    try:
        snap: dict[str, Any] = json.loads((e.state_dir / "ztunnel-snapshot.json").read_text())
    except (OSError, ValueError):
        snap = {}
    try:
        progs = MeshBpf.attached_programs(Path(e.cgroup_parent))
    except Exception as exc:
        progs = [{"error": str(exc)}]
    mine = [p for p in progs if str(p.get("name", "")).startswith("mn_") or "error" in p]
    alive = bool(agent.get("ready")) and time.time() - agent.get("updated", 0) < 30
    certs = {
        w["name"]: _expiry(Path(w["cert"])) for w in snap.get("workloads", []) if w.get("cert")
    }
    doc = {
        "node": {"name": e.name, "zone": e.zone, "ip": e.ip},
        "control_planes": list(e.control_planes),
        "control_plane_reachable": agent.get("cp_reachable"),
        "control_plane_error": agent.get("cp_error", ""),
        "control_plane_revision": agent.get("cp_revision"),
        "node_certificate": _expiry(e.files.cert),
        "agent": {
            "running": alive,
            "pid": agent.get("pid"),
            "config_version": agent.get("version"),
        },
        "ztunnel": _ready("http://127.0.0.1:15021/healthz/ready"),
        "ztunnel_config_version": agent.get("pushed_version"),
        "bpf_programs": mine,
        "bind_guard": _bind_guard(agent),
        "dns": _dns_state(e.dns_capture, snap.get("dns_domain", "mesh")),
        "workloads": [
            {
                "name": w["name"],
                "service": w.get("service"),
                "port": w.get("port"),
                "identity": f"spiffe://{e.trust_domain}/ns/{w['namespace']}/sa/"
                f"{w['service_account']}",
                "certificate": certs.get(w["name"], "missing"),
            }
            for w in snap.get("workloads", [])
        ],
        "services": [
            {
                "name": s["name"],
                "namespace": s.get("namespace"),
                "vip": s["vip"],
                "endpoints": len(s.get("endpoints", [])),
            }
            for s in snap.get("services", [])
        ],
        "problems": agent.get("problems", []),
    }
    emit(document("NodeStatus", doc), output, lambda: "\n".join(_text(doc, e.cgroup_parent)))


def _bind_guard(agent: dict[str, Any]) -> dict[str, Any]:
    guard = agent.get("bind_guard") or {}
    return {
        "on": bool(guard.get("on")),
        "cgroup_id": guard.get("cgroup_id"),
        "problem": guard.get("problem") if guard else "agent not running",
    }


def _text(doc: dict[str, Any], cgroup_parent: str) -> Iterator[str]:
    """The status for people, one line per item."""
    n = doc["node"]
    cp = doc["control_plane_reachable"]
    cp_text = "reachable" if cp else "UNREACHABLE" if cp is False else "unknown"
    if cp is False:
        cp_text += (
            f" ({doc['control_plane_error']}); serving revision "
            f"{doc['control_plane_revision']} from the local snapshot"
        )
    elif cp:
        cp_text += f", revision {doc['control_plane_revision']}"
    yield f"node          {n['name']} (zone {n['zone'] or '-'}, {n['ip'] or '-'})"
    yield f"enrolled with {', '.join(doc['control_planes'])}"
    yield f"control plane {cp_text}"
    yield f"node cert     {doc['node_certificate']}"
    a = doc["agent"]
    yield (
        f"agent         {'running' if a['running'] else 'NOT RUNNING'}"
        f" (pid {a['pid']}), config version {a['config_version']}"
    )
    yield f"ztunnel       {doc['ztunnel']}, config version {doc['ztunnel_config_version']}"
    d = doc["dns"]
    yield (
        f"mesh dns      {d['server']} {d['state']}, names *.{d['domain']}, "
        f"workloads' DNS {'captured' if d['capture'] else 'NOT captured (dns_capture off)'}"
    )
    yield (
        f"bpf           at {cgroup_parent}: "
        + (
            ", ".join(
                f"{p.get('name')}#{p.get('id')}"
                if "error" not in p
                else f"cannot list ({p['error']})"
                for p in doc["bpf_programs"]
            )
            or "NONE ATTACHED"
        )
    )
    guard = doc["bind_guard"]
    yield (
        "bind guard    "
        + (
            "on: only the proxy's cgroup binds 127.0.0.6 and its ports"
            if guard.get("on")
            else f"OFF ({guard.get('problem')})"
        )
    )
    yield "workloads"
    for w in doc["workloads"]:
        yield f"  {w['name']:<16} :{w['port']:<6} {w['identity']}  cert {w['certificate']}"
    if not doc["workloads"]:
        yield "  (none; add one with `meshnode workload add`)"
    yield "services"
    for s in doc["services"]:
        yield f"  {s['name']}.{s['namespace']:<14} {s['vip']:<15} {s['endpoints']} endpoints"
    for p in doc["problems"]:
        yield f"problem: {p}"


def _dns_state(capture: bool, domain: str) -> dict[str, Any]:
    """Whether the DNS proxy answers: one query for the mesh domain itself (an
    NXDOMAIN from it is an answer)."""
    import dns.exception
    import dns.message
    import dns.query

    from meshnode.core.constants import DNS_PROXY_PORT

    state = "answering"
    try:
        dns.query.udp(dns.message.make_query(f"{domain}.", "A"), "127.0.0.1", 1.0, DNS_PROXY_PORT)
    except (OSError, dns.exception.DNSException) as exc:
        state = f"NOT ANSWERING ({exc or type(exc).__name__})"
    return {
        "server": f"127.0.0.1:{DNS_PROXY_PORT}",
        "state": state,
        "domain": domain,
        "capture": capture,
    }
