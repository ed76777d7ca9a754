"""`meshnode dns`: ask the node's mesh DNS proxy, as a workload would (docs/dns.md)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from meshnode.cli.common import fail
from meshnode.core.constants import DNS_PROXY_PORT

DEFAULT_SERVER = f"127.0.0.1:{DNS_PROXY_PORT}"


@click.group()
def dns() -> None:
    """The node's mesh DNS."""


def ask(
    name: str,
    rdtype: str = "A",
    server: str = DEFAULT_SERVER,
    tcp: bool = False,
    timeout: float = 2.0,
) -> dict[str, Any]:
    """One query to the DNS proxy: {"rcode", "answers", "flags"}; OSError-like
    failures raise click exceptions through `fail`."""
    import dns.exception
    import dns.message
    import dns.query
    import dns.rcode
    import dns.rdatatype

    from meshnode.ztunnel.config import ConfigError, parse_hostport

    try:
        host, port = parse_hostport(server)
        query = dns.message.make_query(name, rdtype)
    except (ConfigError, ValueError, dns.exception.DNSException) as exc:
        fail(f"cannot ask {name!r} ({rdtype}) of {server}: {exc}")
    try:
        send = dns.query.tcp if tcp else dns.query.udp
        reply = send(query, host, timeout=timeout, port=port)
    except (OSError, dns.exception.DNSException) as exc:
        fail(
            f"the mesh DNS proxy on {server} did not answer ({exc or type(exc).__name__}); "
            "is meshnode-ztunnel running (`meshnode status`)?"
        )
    answers = [
        f"{rrset.name} {rrset.ttl} {dns.rdatatype.to_text(rrset.rdtype)} {rd.to_text()}"
        for rrset in reply.answer
        for rd in rrset
    ]
    return {
        "rcode": dns.rcode.to_text(reply.rcode()),
        "answers": answers,
        "authoritative": bool(reply.flags & 0x0400),
        "truncated": bool(reply.flags & 0x0200),
    }


@dns.command()
@click.argument("name")
@click.option("--type", "rdtype", default="A", show_default=True, help="Record type.")
@click.option("--server", default=DEFAULT_SERVER, show_default=True, help="The DNS proxy.")
@click.option("--tcp", is_flag=True, help="Ask over TCP.")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
def lookup(name: str, rdtype: str, server: str, tcp: bool, output: str) -> None:
    """Resolve NAME through the node's mesh DNS proxy, as a workload would: mesh
    names from the node's state, others forwarded to the node's resolvers."""
    got = ask(name, rdtype, server, tcp)
    if output == "json":
        click.echo(json.dumps(got, indent=2))
        return
    source = "mesh (authoritative)" if got["authoritative"] else "forwarded"
    click.echo(f"{name} {rdtype}: {got['rcode']}, {source}")
    for line in got["answers"]:
        click.echo(f"  {line}")
    if got["rcode"] != "NOERROR":
        sys.exit(1)
