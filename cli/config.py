"""`meshnode config dump`: what this node's ztunnel knows, from its admin port
(localhost only): workloads, services, endpoints with their latency estimate
and health, policies, pool."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import click

from meshnode.cli.common import fail


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
)
def dump(admin: str, section: str) -> None:
    """Print ztunnel's config dump as JSON."""
    url = f"http://{admin}/config_dump"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc = json.load(resp)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        fail(
            f"cannot reach ztunnel's admin endpoint at {url}: {reason}. Is ztunnel running on "
            "this node? (in the lab: meshnode lab exec NODE -- meshnode config dump)"
        )
    if section == "policies":
        doc = doc.get("state", {}).get("policies", [])
    elif section != "all":
        doc = doc.get(section, {})
    click.echo(json.dumps(doc, indent=2))
