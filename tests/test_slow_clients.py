"""Slow and numerous clients (gateway/listener.py), seen from raw sockets on 127.0.0.1: a connection
that does not finish its request headers in time is closed, and connections beyond the per-process
cap are refused at once. Limits are short here; every wait is bounded by WAIT."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from gateway.devidp import DevIdentityProvider
from tests.support.harness import GatewayHarness, running_gateway

WAIT = 5.0
HEADER_TIMEOUT = 0.5
DEAD_ROUTE = [{"name": "dead", "path": "/dead/mcp", "upstream": "http://127.0.0.1:9/mcp"}]
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gateway.test\r\n\r\n"

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def raw_connection(gateway: GatewayHarness) -> AsyncIterator[Connection]:
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield reader, writer
    finally:
        writer.close()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (bounded by WAIT)."""
    async with asyncio.timeout(WAIT):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status line, body)."""
    async with asyncio.timeout(WAIT):
        status = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await reader.readexactly(length)


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HT", b"GET /healthz HTTP/1.1\r\nHost: gateway.test\r\n"])
async def test_a_connection_that_does_not_finish_its_headers_is_closed(idp: DevIdentityProvider, sent: bytes) -> None:
    async with running_gateway(idp, DEAD_ROUTE, limits={"request_header_timeout_seconds": HEADER_TIMEOUT}) as gw:
        async with raw_connection(gw) as (reader, writer):
            started = time.monotonic()
            writer.write(sent)
            await writer.drain()
            assert await read_until_closed(reader) == b""  # closed, no response
            assert time.monotonic() - started >= HEADER_TIMEOUT * 0.9


async def test_a_kept_alive_connection_that_trickles_its_next_request_is_closed(idp: DevIdentityProvider) -> None:
    async with running_gateway(idp, DEAD_ROUTE, limits={"request_header_timeout_seconds": HEADER_TIMEOUT}) as gw:
        async with raw_connection(gw) as (reader, writer):
            writer.write(HEALTHZ)
            status, _ = await read_response(reader)
            assert status.startswith(b"HTTP/1.1 200")
            writer.write(b"GET /hea")  # ... and never the rest
            await writer.drain()
            assert await read_until_closed(reader) == b""


async def test_headers_in_time_then_a_slow_body_is_left_to_the_body_timeout(idp: DevIdentityProvider) -> None:
    """Once the headers are parsed the header deadline is off: a trickling body gets the body
    timeout's 408, which needs the connection to outlive the (shorter) header deadline."""
    limits = {"request_header_timeout_seconds": 0.3, "request_body_timeout_seconds": 1.0}
    async with running_gateway(idp, DEAD_ROUTE, limits=limits) as gw:
        token = await gw.access_token("dead")
        async with raw_connection(gw) as (reader, writer):
            writer.write(
                b"POST /dead/mcp HTTP/1.1\r\nHost: gateway.test\r\nAuthorization: Bearer " + token.encode() + b"\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
            await writer.drain()
            status, _ = await read_response(reader)
    assert status.split()[1] == b"408", status


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.parametrize("whole", [True, False], ids=["arrived-whole", "still-arriving"])
async def test_a_chunked_body_over_the_limit_gets_413_whether_or_not_it_arrived_whole(
    idp: DevIdentityProvider, whole: bool
) -> None:
    """A body that arrived whole with its headers is taken without arming the body deadline
    (gateway/http.py); the size limit holds all the same. One still arriving is refused as soon as it
    passes the limit, before its last chunk is sent."""
    async with running_gateway(idp, DEAD_ROUTE, limits={"max_request_bytes": 1024}) as gw:
        token = await gw.access_token("dead")
        head = (
            b"POST /dead/mcp HTTP/1.1\r\nHost: gateway.test\r\nAuthorization: Bearer " + token.encode() + b"\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        async with raw_connection(gw) as (reader, writer):
            writer.write(head + chunk(b" " * 600) + chunk(b" " * 600) + (b"0\r\n\r\n" if whole else b""))
            await writer.drain()
            status, answer = await read_response(reader)
    assert status.split()[1] == b"413", status
    assert json.loads(answer)["error"]["code"] == -32600


async def test_connections_beyond_the_cap_are_refused_at_once_and_admitted_again_below_it(
    idp: DevIdentityProvider,
) -> None:
    async with running_gateway(idp, DEAD_ROUTE, limits={"max_client_connections": 2}) as gw:
        async with raw_connection(gw) as first, raw_connection(gw):
            async with raw_connection(gw) as (reader, _):
                refused = await read_until_closed(reader)
            assert refused.startswith(b"HTTP/1.1 503 "), refused
            assert b"Retry-After: 1\r\n" in refused
            # A connection ends (the server closes it after answering), so there is room again.
            reader, writer = first
            writer.write(HEALTHZ.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            assert (await read_until_closed(reader)).startswith(b"HTTP/1.1 200")
            async with raw_connection(gw) as (reader, writer):
                writer.write(HEALTHZ)
                status, body = await read_response(reader)
            assert status.startswith(b"HTTP/1.1 200"), status
            assert body == b'{"status": "ok"}'
