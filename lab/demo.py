"""The lab demo: an HTTP server workload that greets each client by the SPIFFE
identity the mesh proved for it, and a client workload that calls it through
the service VIP with plain, unmodified curl.

Run as workloads:  python -m meshnode.lab.demo server --port 8080 --name api
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

NOT_MESHED = "(not meshed: plaintext from outside the mesh)"


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over the node's peer socket (a Unix socket)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def peer_identity(peer_socket: str | None, local: tuple[str, int], remote: tuple[str, int]) -> str:
    """Ask this node's ztunnel, on its peer socket, which identity the
    connection `local` <- `remote` carried. ztunnel answers only because this
    process is in the workload's cgroup (SO_PEERCRED), and only about this
    workload's own connections."""
    if not peer_socket:
        return NOT_MESHED
    conn = _UnixHTTPConnection(peer_socket, timeout=2)
    try:
        conn.request("GET", f"/v1/peer?local={local[0]}:{local[1]}&remote={remote[0]}:{remote[1]}")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return NOT_MESHED
        return str(json.loads(body)["identity"])
    except (OSError, ValueError, KeyError):
        return NOT_MESHED
    finally:
        conn.close()


def serve(port: int, name: str, peer_socket: str | None = None) -> None:
    node = socket.gethostname()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            ip, port = self.client_address[:2]
            local = self.connection.getsockname()[:2]
            ident = peer_identity(peer_socket, local, (ip, port))
            body = f"hello {ident}, this is {name} (connection from {ip}:{port})\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            sys.stdout.write(f"{name}@{node} {self.client_address[0]} {fmt % args}\n")
            sys.stdout.flush()

    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.serve_forever()


def slow_server(port: int, name: str, accept_delay: float, backlog: int) -> None:
    """A server slow to accept: it takes a new connection only every
    `accept_delay` seconds, with a tiny backlog, so under load clients wait
    in the kernel's queues (or for SYN retries) before being served."""
    import threading

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(backlog)

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(65536)
                body = f"hello, this is {name} (slow)\n".encode()
                conn.sendall(
                    b"HTTP/1.0 200 OK\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
            except OSError:
                pass

    while True:
        time.sleep(accept_delay)
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def echo_server(port: int, name: str) -> None:
    """Line echo, for long-lived connections: each line comes back prefixed
    with the server's name."""
    import threading

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(128)

    def handle(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                f.write(name.encode() + b": " + line)
                f.flush()

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def idle() -> None:
    while True:
        time.sleep(3600)


def run_demo(lab: Any, log: Any = print) -> None:
    py = [sys.executable, "-m", "meshnode.lab.demo"]
    st = lab.load()
    nodes = sorted(st.nodes)
    server_node = nodes[1] if len(nodes) > 1 else nodes[0]
    peer_sock = str(Path(lab.node_dir(server_node)) / "state" / "peer.sock")
    lab.add_workload(
        server_node,
        "api",
        "api",
        8080,
        [*py, "server", "--port", "8080", "--name", "api", "--peer-socket", peer_sock],
    )
    lab.add_workload(nodes[0], "web", "web", 9090, [*py, "idle"], wait_listening=0)
    vip = lab.load().services["api"].vip
    log(f"\ndemo: workload web on {nodes[0]} calls service api ({vip}:8080) on {server_node}")
    log(f"      meshnode lab exec {nodes[0]} --workload web -- curl -s http://{vip}:8080/")
    for _ in range(3):
        code = lab.exec(
            nodes[0], ["curl", "-s", "--max-time", "5", f"http://{vip}:8080/"], workload="web"
        )
        if code != 0:
            log(f"demo: curl failed with exit code {code}; see the logs in {lab.dir}")
    time.sleep(0.5)  # ztunnel writes its access log in batches, every 200 ms
    log("\naccess log (one JSON line per connection, from each node's ztunnel):")
    for node in (nodes[0], server_node):
        logf = Path(lab.node_dir(node)) / "state" / "ztunnel.log"
        lines = [ln for ln in logf.read_text().splitlines() if ln.startswith("{")][-1:]
        for line in lines:
            rec = json.loads(line)
            log(
                f"  {node} {rec.get('direction'):<8} {rec.get('src_identity')} -> "
                f"{rec.get('dst_identity')} {rec.get('dst_address')} "
                f"sent {rec.get('bytes_sent')}B received {rec.get('bytes_received')}B "
                f"{rec.get('result')}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(prog="meshnode-demo")
    sub = parser.add_subparsers(dest="what", required=True)
    srv = sub.add_parser("server")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--name", default="server")
    srv.add_argument(
        "--peer-socket",
        default="/run/meshnode/peer.sock",
        help="ztunnel's peer socket, to greet clients by their proven identity "
        "(default: where an enrolled node's ztunnel unit puts it)",
    )
    slow = sub.add_parser("slow-server")
    slow.add_argument("--port", type=int, default=8080)
    slow.add_argument("--name", default="slow")
    slow.add_argument("--accept-delay", type=float, default=0.2)
    slow.add_argument("--backlog", type=int, default=1)
    echo = sub.add_parser("echo-server")
    echo.add_argument("--port", type=int, default=7000)
    echo.add_argument("--name", default="echo")
    sub.add_parser("idle")
    args = parser.parse_args()
    if args.what == "server":
        serve(args.port, args.name, args.peer_socket)
    elif args.what == "echo-server":
        echo_server(args.port, args.name)
    elif args.what == "slow-server":
        slow_server(args.port, args.name, args.accept_delay, args.backlog)
    else:
        idle()


if __name__ == "__main__":
    main()
