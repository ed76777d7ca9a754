"""The proxy's asyncio shell over real sockets and real TLS, two node proxies
in one process on loopback addresses (tests/support/mesh.py). Only the BPF
lookup is stood in for. Proves the relay: bytes both ways, half-close,
aborts reaching the other side at once, back-pressure against a slow reader,
and the same-node path."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from meshnode.ztunnel.proxy import OriginalDst
from tests.support.mesh import build_mesh, connect_as

N1, N2 = "127.0.0.2", "127.0.0.3"


def run(coro_fn: Callable[[Path], Awaitable[Any]], tmp: Path) -> Any:
    return uvloop.run(asyncio.wait_for(coro_fn(tmp), 60))


async def _mesh(tmp: Path, handler: Callable[..., Awaitable[None]], port: int) -> Any:
    server = await asyncio.start_server(handler, N2, port)
    nodes = build_mesh(tmp, port, base_port=25100 + (port % 50) * 40)
    for n in nodes.values():
        await n.proxy.start()
    return server, nodes


async def _client(nodes: Any, node: str, _site: int, wid: int, dst=("240.0.0.1", 80)):  # type: ignore[no-untyped-def]
    return await connect_as(nodes[node], wid, dst)


async def _stop(server: Any, nodes: Any) -> None:
    server.close()
    for n in nodes.values():
        await n.proxy.drain()


def test_bytes_both_ways_and_half_close(tmp_path: Path) -> None:
    payload = os.urandom(8 << 20)

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's half-close arrives
        writer.write(hashlib.sha256(data).hexdigest().encode())
        writer.write(payload)  # and then a big answer, after our FIN came in
        await writer.drain()
        writer.close()

    async def main(tmp: Path) -> None:
        server, nodes = await _mesh(tmp, sink, 18201)
        r, w = await _client(nodes, "node1", 41201, 1)
        w.write(payload)
        await w.drain()
        w.write_eof()  # half-close: the server sees EOF but can still answer
        got = await r.read()
        assert got[:64].decode() == hashlib.sha256(payload).hexdigest()
        assert got[64:] == payload
        w.close()
        await _stop(server, nodes)

    run(main, tmp_path)


def test_server_abort_resets_the_client_promptly(tmp_path: Path) -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        # A real RST: linger 0 (uvloop's abort() alone closes with a FIN).
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def main(tmp: Path) -> None:
        server, nodes = await _mesh(tmp, rude, 18202)
        r, w = await _client(nodes, "node1", 41202, 1)
        w.write(b"x")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ConnectionResetError):
            while await asyncio.wait_for(r.read(100), 5):
                pass
            raise AssertionError("the client saw a clean EOF, not a reset")
        assert loop.time() - t0 < 2
        await _stop(server, nodes)

    run(main, tmp_path)


def test_slow_reader_bounds_what_the_proxies_buffer(tmp_path: Path) -> None:
    """The server never reads: the client can only push what the socket
    buffers plus one HTTP/2 stream window through, then it blocks."""
    hold = asyncio.Event()

    async def stuck(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await hold.wait()
        writer.close()

    async def main(tmp: Path) -> None:
        from meshnode.ztunnel import hbone

        server, nodes = await _mesh(tmp, stuck, 18203)
        r, w = await _client(nodes, "node1", 41203, 1)
        sent = 0
        chunk = b"z" * (1 << 20)
        try:
            while sent < (200 << 20):
                w.write(chunk)
                await asyncio.wait_for(w.drain(), 2)
                sent += len(chunk)
        except TimeoutError:
            pass
        # Kernel buffers (client, two proxies, server) plus one stream window:
        # far below the 200 MiB we tried to push.
        assert sent < hbone.STREAM_WINDOW + (48 << 20), sent
        hold.set()
        w.close()
        await _stop(server, nodes)

    run(main, tmp_path)


def test_same_node_short_cut_keeps_identity_and_skips_tls(tmp_path: Path) -> None:
    async def who(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        await reader.read(1)
        writer.write(f"{peer[0]}:{peer[1]}".encode())
        await writer.drain()
        writer.close()

    async def main(tmp: Path) -> None:
        server, nodes = await _mesh(tmp, who, 18204)
        pi = nodes["node2"].proxy.pi
        r, w = await _client(nodes, "node2", 41204, 2)  # ops -> api, both on node2
        w.write(b"?")
        got = (await r.read()).decode()
        host, _, port = got.rpartition(":")
        assert host == "127.0.0.6"  # delivered like an inbound connection
        assert pi.pool.handshakes == 0  # no TLS at all
        opened = sum(v for k, v in pi.metrics.opened.values.items() if k[0] == "destination")
        assert opened == 1
        w.close()
        await _stop(server, nodes)

    run(main, tmp_path)


def test_aborted_slow_downloads_do_not_stall_the_pooled_connection(tmp_path: Path) -> None:
    """A client that stops reading a download and then aborts leaves a stream
    window of bytes its proxy never wrote out. Those bytes must go back to the
    pooled connection's window when the stream goes: 16 such clients used to
    eat all 64 MiB of it, and every later connection over it stalled."""
    from meshnode.ztunnel import hbone

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            what = await reader.read(1)
            writer.write(b"d" * ((1 << 20) if what == b"s" else (16 << 20)))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def main(tmp: Path) -> None:
        loop = asyncio.get_running_loop()
        server, nodes = await _mesh(tmp, serve, 18205)
        pool = nodes["node1"].proxy.pi.pool
        aborted = hbone.CONNECTION_WINDOW // hbone.STREAM_WINDOW + 4
        for _ in range(aborted):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 10)
            sock.bind(("127.0.0.1", 0))
            nodes["node1"].orig.records[sock.getsockname()] = OriginalDst("240.0.0.1", 80, 1)
            sock.setblocking(False)
            await loop.sock_connect(sock, (N1, 15001))
            await loop.sock_sendall(sock, b"b")
            # Wait until node1 holds what it may for this stuck reader: the
            # stream window, less what the kernel took before the socket filled.
            deadline = loop.time() + 10
            held, still = 0, 0
            while loop.time() < deadline and still < 5:
                await asyncio.sleep(0.02)
                handlers = [
                    h for ss in pool._sessions.values() for s in ss for h in s.handlers.values()
                ]
                now_held = handlers[0].unacked if handlers else 0
                still = still + 1 if now_held == held and held >= (1 << 20) else 0
                held = now_held
            assert held >= 1 << 20, held
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # abort: RST
            await asyncio.sleep(0.02)
        r, w = await _client(nodes, "node1", 41399, 1)
        w.write(b"s")
        got = await asyncio.wait_for(r.readexactly(1 << 20), 10)
        assert len(got) == 1 << 20
        assert pool.handshakes == 1  # every download went over the one pooled connection
        w.close()
        await _stop(server, nodes)

    run(main, tmp_path)


def test_ping_flood_over_real_tls_from_a_peer_that_does_not_read(tmp_path: Path) -> None:
    """An authenticated peer sends PINGs and never reads the ACKs: the inbound
    proxy stops reading its TLS socket once READ_PAUSE_AT of answers wait, so
    what it holds stays bounded however much the peer offers (before: every
    byte of PINGs became a byte of queued ACKs)."""
    import ssl

    from hyperframe.frame import PingFrame, SettingsFrame

    from meshnode.ztunnel import session as session_mod

    async def main(tmp: Path) -> None:
        server, nodes = await _mesh(tmp, lambda r, w: None, 18206)  # type: ignore[arg-type,return-value]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_cert_chain(tmp / "web.pem", tmp / "web-key.pem")
        ctx.load_verify_locations(tmp / "bundle.pem")
        ctx.check_hostname = False  # SPIFFE IDs are URI SANs
        reader, writer = await asyncio.open_connection(
            N2, 15008, ssl=ctx, server_hostname="api.default.cluster.local"
        )
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
        pings = b"".join(
            PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize() for i in range(4096)
        )
        offered = 0
        try:
            while offered < (32 << 20):
                writer.write(pings)
                await asyncio.wait_for(writer.drain(), 2)
                offered += len(pings)
        except TimeoutError:
            pass  # the proxy stopped reading: our writes back up
        (sess,) = nodes["node2"].proxy.pi.inbound_sessions
        assert sess.transport is not None
        held = sess.transport.get_write_buffer_size()
        assert offered < 32 << 20, f"the proxy read all {offered} bytes, holds {held} of ACKs"
        assert held <= session_mod.READ_PAUSE_AT + (1 << 20), (held, offered)
        writer.transport.abort()
        await _stop(server, nodes)

    run(main, tmp_path)
