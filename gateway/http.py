"""Small HTTP helpers shared by the gateway's handlers."""

from __future__ import annotations

import asyncio

from aiohttp import web

DEFAULT_BODY_TIMEOUT = 30.0


class BodyTooLarge(Exception):
    """The request body exceeds the configured limit (answered with 413)."""


class BodyTooSlow(Exception):
    """The request body did not arrive in time (answered with 408): a client trickling bytes
    (slowloris) must not hold a handler and its memory indefinitely."""


async def read_limited(request: web.Request, limit: int, deadline_seconds: float = DEFAULT_BODY_TIMEOUT) -> bytes:
    """Read a request body, refusing more than ``limit`` bytes without buffering the excess, and
    more than ``deadline_seconds`` in total.

    aiohttp's own ``client_max_size`` covers only ``request.read()``; reading the stream ourselves
    keeps one limit for declared and chunked bodies alike. A body that arrived whole with its headers (most
    MCP requests: one small JSON message) is taken as it is, without arming a deadline that cannot expire.
    """
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge
    content = request.content
    if content.is_eof():  # the end of the body was received: all of it is buffered
        body = content.read_nowait()
        if len(body) > limit:
            raise BodyTooLarge
        return body
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(deadline_seconds):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTooSlow from None
    return b"".join(chunks)


def client_ip(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return request.remote or "unknown"
