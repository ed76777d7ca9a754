"""Configuration text for the comparison proxies and the servers (pure functions).

Choices, stated once:
- nginx: ``worker_processes 1`` (on 2 shared cores a second worker only competes
  with wrk and the proxies), ``access_log off``, sendfile, files on tmpfs,
  ``keepalive_requests`` high so a keep-alive run never reconnects.
- HAProxy: TCP mode, ``nbthread`` = cores, TLS 1.3 only, both sides verify the
  peer's chain to the bench CA; TLS session reuse stays on (HAProxy's default:
  the server-side session cache and client-side resumption).
- stunnel: the same pair, TLS 1.3 only, ``verifyChain`` both sides, TCP_NODELAY.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tunnel:
    """One forwarded port of a proxy pair."""

    name: str
    client_port: int  # the client-side proxy listens on 127.0.0.1:client_port
    server_port: int  # the server-side proxy listens on server_ip:server_port (TLS)
    target: str  # what the server-side proxy connects to, "host:port"


def nginx_conf(workdir: str, name: str, port: int, root: str, user: str = "www-data") -> str:
    tmp = f"{workdir}/nginx-{name}"
    return f"""\
user {user};
worker_processes 1;
daemon off;
master_process on;
pid {tmp}.pid;
error_log {tmp}.err warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 100000000;
    default_type application/octet-stream;
    client_body_temp_path {tmp}-body;
    proxy_temp_path {tmp}-proxy;
    fastcgi_temp_path {tmp}-fastcgi;
    uwsgi_temp_path {tmp}-uwsgi;
    scgi_temp_path {tmp}-scgi;
    server {{
        listen {port} backlog=4096;
        root {root};
        location / {{ }}
    }}
}}
"""


def _haproxy_global(nbthread: int) -> str:
    return f"""\
global
    nbthread {nbthread}
    maxconn 8000
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3

defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
"""


def haproxy_client_conf(
    tunnels: list[Tunnel], server_ip: str, crt: str, ca: str, nbthread: int
) -> str:
    """The client-side sidecar: plain TCP on loopback -> mTLS to the server side."""
    out = [_haproxy_global(nbthread)]
    for t in tunnels:
        out.append(f"""
frontend {t.name}_out
    bind 127.0.0.1:{t.client_port}
    default_backend {t.name}_up

backend {t.name}_up
    server peer {server_ip}:{t.server_port} ssl crt {crt} ca-file {ca} verify required
""")
    return "".join(out)


def haproxy_server_conf(
    tunnels: list[Tunnel], server_ip: str, crt: str, ca: str, nbthread: int
) -> str:
    """The server-side sidecar: mTLS in (client certificate required) -> local server."""
    out = [_haproxy_global(nbthread)]
    for t in tunnels:
        out.append(f"""
frontend {t.name}_in
    bind {server_ip}:{t.server_port} ssl crt {crt} ca-file {ca} verify required
    default_backend {t.name}_local

backend {t.name}_local
    server app {t.target}
""")
    return "".join(out)


def haproxy_lb_conf(listen_ip: str, frontends: dict[int, list[str]], nbthread: int) -> str:
    """A central TCP load balancer: each listening port round-robins over its backends."""
    out = [_haproxy_global(nbthread)]
    for port, backends in frontends.items():
        servers = "".join(f"    server b{i} {b}\n" for i, b in enumerate(backends, 1))
        out.append(f"""
frontend lb_{port}
    bind {listen_ip}:{port}
    default_backend pool_{port}

backend pool_{port}
    balance roundrobin
{servers}""")
    return "".join(out)


def _stunnel_global(log: str) -> str:
    return f"""\
foreground = yes
pid =
syslog = no
debug = 4
output = {log}
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
"""


def stunnel_client_conf(
    tunnels: list[Tunnel], server_ip: str, cert: str, key: str, ca: str, log: str
) -> str:
    out = [_stunnel_global(log)]
    for t in tunnels:
        out.append(f"""
[{t.name}]
client = yes
accept = 127.0.0.1:{t.client_port}
connect = {server_ip}:{t.server_port}
cert = {cert}
key = {key}
CAfile = {ca}
verifyChain = yes
sslVersionMin = TLSv1.3
""")
    return "".join(out)


def stunnel_server_conf(
    tunnels: list[Tunnel], server_ip: str, cert: str, key: str, ca: str, log: str
) -> str:
    out = [_stunnel_global(log)]
    for t in tunnels:
        out.append(f"""
[{t.name}]
accept = {server_ip}:{t.server_port}
connect = {t.target}
cert = {cert}
key = {key}
CAfile = {ca}
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.3
""")
    return "".join(out)
