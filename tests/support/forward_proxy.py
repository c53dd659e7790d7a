"""A minimal HTTP forward proxy on 127.0.0.1, standing in for a cluster's egress proxy.

Clients configured with ``HTTP_PROXY`` send requests in absolute form (RFC 9112 §3.2.2:
``GET http://host:port/path HTTP/1.1``); the proxy records each target, forwards the request to it
with ``Connection: close`` and relays the answer until the origin closes. Plain HTTP only (no CONNECT):
the test IdPs and upstreams speak HTTP on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

_MAX_HEADER_LINES = 100
_TIMEOUT = 10.0


class ForwardProxy:
    def __init__(self) -> None:
        self.targets: list[str] = []  # absolute URLs requested through the proxy, in order

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_TIMEOUT):
                await self._forward(reader, writer)
        except (TimeoutError, OSError, ValueError):
            pass
        finally:
            writer.close()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method, target, _ = (await reader.readline()).decode("latin-1").split(" ", 2)
        headers: list[tuple[str, str]] = []
        for _ in range(_MAX_HEADER_LINES):
            line = (await reader.readline()).decode("latin-1").rstrip("\r\n")
            if not line:
                break
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
        self.targets.append(target)
        parts = urlsplit(target)
        if parts.scheme != "http" or parts.hostname is None:
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        length = int(next((v for n, v in headers if n.lower() == "content-length"), "0"))
        body = await reader.readexactly(length) if length else b""
        origin_reader, origin_writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            kept = [(n, v) for n, v in headers if n.lower() not in ("connection", "proxy-connection", "keep-alive")]
            head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in kept)
            origin_writer.write((head + "Connection: close\r\n\r\n").encode("latin-1") + body)
            await origin_writer.drain()
            while chunk := await origin_reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        finally:
            origin_writer.close()


@asynccontextmanager
async def forward_proxy() -> AsyncIterator[tuple[ForwardProxy, str]]:
    """A running proxy and its URL (for ``HTTP_PROXY``) for the block."""
    proxy = ForwardProxy()
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield proxy, f"http://127.0.0.1:{port}"
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_TIMEOUT):
                await server.wait_closed()
