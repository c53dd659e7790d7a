"""Small HTTP helpers shared by the gateway's handlers."""

from __future__ import annotations

from aiohttp import web


class BodyTooLarge(Exception):
    """The request body exceeds the configured limit (answered with 413)."""


async def read_limited(request: web.Request, limit: int) -> bytes:
    """Read a request body, refusing more than ``limit`` bytes without buffering the excess.

    aiohttp's own ``client_max_size`` covers only ``request.read()``; reading the stream ourselves
    keeps one limit for declared and chunked bodies alike.
    """
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def client_ip(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return request.remote or "unknown"
