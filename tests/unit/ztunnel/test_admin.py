"""ztunnel's admin server and client on aiohttp: a route served on a Unix socket
(a worker) and on loopback TCP (a lone ztunnel, the supervisor)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest

from meshnode.ztunnel.admin import AdminServer, Response, get_unix, json_response


async def _route(method: str, target: str) -> Response:
    if method != "GET":
        return json_response(405, {"error": "only GET"})
    if target.startswith("/metrics"):
        return 200, "text/plain; version=0.0.4", b"x_total 1\n"
    if target.startswith("/peer?addr="):
        return json_response(200, {"target": target})
    return json_response(404, {"error": f"unknown path {target}"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unix_socket_round_trip(tmp_path: Path) -> None:
    async def main() -> None:
        server = AdminServer(_route)
        path = str(tmp_path / "admin.sock")
        await server.listen_unix(path)
        try:
            status, body = await get_unix(path, "/peer?addr=10.0.0.1:443")
            assert status == 200 and b'"/peer?addr=10.0.0.1:443"' in body
            status, body = await get_unix(path, "/nope")
            assert status == 404 and b"unknown path /nope" in body
        finally:
            await server.close()
        with pytest.raises(OSError, match="admin socket"):
            await get_unix(path, "/metrics", timeout=2)

    asyncio.run(main())


def test_tcp_serves_every_address_and_keeps_the_content_type() -> None:
    async def main() -> None:
        ports = [_free_port(), _free_port()]
        server = AdminServer(_route)
        await server.listen_tcp({("127.0.0.1", p) for p in ports})
        try:
            async with aiohttp.ClientSession() as session:
                for port in ports:
                    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                        assert resp.status == 200
                        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4"
                        assert await resp.text() == "x_total 1\n"
                async with session.post(f"http://127.0.0.1:{ports[0]}/metrics") as resp:
                    assert resp.status == 405
        finally:
            await server.close()

    asyncio.run(main())


def test_the_metrics_listener_serves_metrics_alone() -> None:
    """It may face the network (--metrics 0.0.0.0:15020): never the admin paths."""

    async def main() -> None:
        admin, metrics = _free_port(), _free_port()
        server = AdminServer(_route)
        await server.listen_tcp({("127.0.0.1", admin)})
        await server.listen_tcp({("127.0.0.1", metrics)}, only="/metrics")
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{metrics}/metrics") as resp:
                    assert resp.status == 200 and await resp.text() == "x_total 1\n"
                for target in ("/peer?addr=10.0.0.1:443", "/config_dump"):
                    async with session.get(f"http://127.0.0.1:{metrics}{target}") as resp:
                        assert resp.status == 404
                async with session.get(f"http://127.0.0.1:{admin}/peer?addr=1.2.3.4:5") as resp:
                    assert resp.status == 200
        finally:
            await server.close()
        with socket.socket() as s:  # closed with the server
            assert s.connect_ex(("127.0.0.1", metrics)) != 0

    asyncio.run(main())
