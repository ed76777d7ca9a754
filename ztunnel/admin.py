"""A very small HTTP/1.1 server and client for the admin endpoints (GET only,
one request per connection). Not on the data path."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

Response = tuple[str, str, bytes]  # status line text, content type, body
Handler = Callable[[str, str], Awaitable[Response]]


def json_response(status: str, body: Any) -> Response:
    return status, "application/json", json.dumps(body, indent=2).encode() + b"\n"


def http_handler(route: Handler) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                             Awaitable[None]]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            line = request.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, _ = (line.split(" ") + ["", ""])[:3]
            status, ctype, payload = await route(method, target)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError, UnicodeDecodeError):
            writer.close()
            return
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    return serve


async def get_unix(path: str, target: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET target from an admin server on a Unix socket: (status, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: ztunnel\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body
