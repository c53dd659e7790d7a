"""Request time limits: a body that trickles in (slowloris) is cut off with 408, not held forever."""

from __future__ import annotations

import asyncio

from gateway.devidp import DevIdentityProvider
from tests.support.harness import start_harness
from tests.support.upstreams import RunningUpstream


async def test_slow_request_body_gets_408_and_is_not_forwarded(
    idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    h = await start_harness(
        idp,
        [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}],
        limits={"request_body_timeout_seconds": 0.3},
    )
    upstream_json.reset()
    try:
        token = await h.access_token("json")
        host, port = h.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        head = (
            f"POST /json/mcp HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        writer.write(head.encode() + b'{"jsonrpc":')  # ... and never the rest
        await writer.drain()
        async with asyncio.timeout(10):
            status_line = await reader.readline()
        writer.close()
        assert status_line.split()[1] == b"408", status_line
        assert upstream_json.recorded() == []
    finally:
        await h.runner.cleanup()
