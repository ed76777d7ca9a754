"""`meshnode config dump`: what this node's ztunnel knows, from its admin port
(localhost only): workloads, services, endpoints with their latency estimate
and health, policies, pool."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import click

from meshnode.cli.common import fail
from meshnode.cli.output import columns, document, emit, output_option


@click.group()
def config() -> None:
    """The node proxy's live configuration."""


@config.command("dump")
@click.option(
    "--admin",
    default="127.0.0.1:15000",
    show_default=True,
    help="ztunnel's admin address on this node.",
)
@click.option(
    "--section",
    type=click.Choice(["all", "state", "endpoints", "config", "policies"]),
    default="all",
    show_default=True,
    help="Only this part of the dump (policies: the state's policies).",
)
@output_option(default="json")
def dump(admin: str, section: str, output: str) -> None:
    """Print ztunnel's config dump (JSON by default; table: a summary)."""
    url = f"http://{admin}/config_dump"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            raw = json.load(resp)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        fail(
            f"cannot reach ztunnel's admin endpoint at {url}: {reason}. Is ztunnel running on "
            "this node? (in the lab: meshnode lab exec NODE -- meshnode config dump)"
        )
    except ValueError as exc:
        fail(f"ztunnel's admin endpoint at {url} answered something that is not JSON: {exc}")
    if not isinstance(raw, dict):
        fail(f"ztunnel's admin endpoint at {url} answered {type(raw).__name__}, not an object")
    if section == "policies":
        body = {"policies": raw.get("state", {}).get("policies", [])}
    elif section != "all":
        body = {section: raw.get(section, {})}
    else:
        body = raw
    emit(document("ConfigDump", body), output, lambda: _summary(raw, section))


def _summary(raw: dict[str, Any], section: str) -> str:
    """A few lines for people: what the proxy holds, and each endpoint's health."""
    state = raw.get("state", {})
    node = state.get("node", {})
    lines = []
    if section in ("all", "state", "config"):
        lines += [
            f"node        {node.get('name', '?')} ({node.get('ip', '?')}, zone "
            f"{node.get('zone') or '-'}), trust domain {state.get('trust_domain', '?')}",
            f"version     {state.get('version', '?')}, {raw.get('workers', 1)} worker(s), "
            f"{raw.get('active_connections', 0)} active connections, pool "
            f"{raw.get('pool', {}).get('connections', 0)} connections",
            f"workloads   {len(state.get('workloads', []))}, services "
            f"{len(state.get('services', []))}, policies {len(state.get('policies', []))} "
            f"(default {state.get('authorization_default', '?')})",
        ]
    if section in ("all", "policies"):
        rows = [["KIND", "NAMESPACE", "NAME"]] + [
            [
                str(p.get("kind", "?")),
                str(p.get("metadata", {}).get("namespace", "-")),
                str(p.get("metadata", {}).get("name", "?")),
            ]
            for p in state.get("policies", [])
        ]
        lines += ["", columns(rows)] if len(rows) > 1 else []
    if section in ("all", "endpoints"):
        rows = [["ENDPOINT", "STATE", "EWMA MS"]] + [
            [
                f"{e.get('address', '?')}:{e.get('port', '?')}"
                + (f" (worker {e['worker']})" if "worker" in e else ""),
                str(e.get("state", "?")),
                "-" if e.get("ewma_ms") is None else f"{float(e['ewma_ms']):.2f}",
            ]
            for e in raw.get("endpoints", [])
        ]
        lines += ["", columns(rows)] if len(rows) > 1 else ["", "no endpoints"]
    return "\n".join(lines).strip("\n")
