"""The admin endpoints' HTTP server and client, on aiohttp (not on the data path).

A route is ``async (method, target) -> (status, content type, body)``; the proxy
and the supervisor each provide one. The server listens on loopback TCP addresses
(a lone ztunnel, the supervisor) or on a Unix socket (a worker, asked by its
supervisor with :func:`get_unix`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

__all__ = ["AdminServer", "Handler", "Response", "get_unix", "json_response"]

Response = tuple[int, str, bytes]  # status, content type, body
Handler = Callable[[str, str], Awaitable[Response]]

KEEPALIVE_TIMEOUT = 5.0
MAX_LINE = 8190


def json_response(status: int, body: Any) -> Response:
    return status, "application/json", json.dumps(body, indent=2).encode() + b"\n"


class AdminServer:
    """Serves `route` on TCP addresses and/or a Unix socket until :meth:`close`."""

    def __init__(self, route: Handler) -> None:
        self._route = route
        self._runner: web.ServerRunner | None = None
        self._narrow: list[AdminServer] = []  # listeners that answer one path

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        status, ctype, body = await self._route(request.method, request.path_qs)
        return web.Response(status=status, body=body, headers={"Content-Type": ctype})

    async def _setup(self) -> web.ServerRunner:
        if self._runner is None:
            self._runner = web.ServerRunner(
                web.Server(
                    self._handle,
                    access_log=None,
                    keepalive_timeout=KEEPALIVE_TIMEOUT,
                    max_line_size=MAX_LINE,
                    max_field_size=MAX_LINE,
                ),
                shutdown_timeout=1.0,
            )
            await self._runner.setup()
        return self._runner

    async def listen_tcp(
        self, addresses: Iterable[tuple[str, int]], only: str | None = None
    ) -> None:
        """With `only`, these addresses answer that path alone (404 to the rest):
        the metrics listener, which may face the network, never serves the admin."""
        if only is not None:
            narrow = AdminServer(_only(self._route, only))
            self._narrow.append(narrow)
            await narrow.listen_tcp(addresses)
            return
        runner = await self._setup()
        for host, port in addresses:
            await web.TCPSite(runner, host, port, reuse_address=True).start()

    async def listen_unix(self, path: str) -> None:
        await web.UnixSite(await self._setup(), path).start()

    async def close(self) -> None:
        for narrow in self._narrow:
            await narrow.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _only(route: Handler, path: str) -> Handler:
    async def only(method: str, target: str) -> Response:
        if urlsplit(target).path != path:
            return json_response(404, {"error": f"only {path} is served here"})
        return await route(method, target)

    return only


async def get_unix(path: str, target: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET target from an admin server on a Unix socket: (status, body).
    OSError when the server cannot be reached or breaks off."""
    try:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=path),
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as session,
            session.get("http://ztunnel" + target) as resp,
        ):
            return resp.status, await resp.read()
    except aiohttp.ClientError as exc:
        raise OSError(f"admin socket {path}: {exc}") from None
