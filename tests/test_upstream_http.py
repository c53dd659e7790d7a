"""The gateway's own HTTP/1.1 client on the upstream hop (gateway/proxy/upstream_http.py), on the wire.

The upstream here is a raw TCP server on 127.0.0.1 that records the bytes it receives and answers with
scripted bytes: what no real MCP server can be made to send (ambiguous framing, a second response
smuggled after the first, a protocol switch, an endless head) and what the gateway must never add to
a request. Each test drives a real gateway through a real client, or (where the gateway would never
send such a request) the connection pool alone.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.app import bind_socket
from gateway.devidp import DevIdentityProvider
from gateway.proxy.upstream_http import MAX_HEAD_BYTES, ConnectionPool, UpstreamHTTPError
from tests.support.harness import running_gateway
from tests.support.mcp_http import WAIT, connect, initialize_request
from tests.support.tls import ServerCertificate, issue_server_certificate

PROTOCOL = "2025-11-25"
JSON = b"Content-Type: application/json\r\n"  # read whole by the gateway (to rewrite it): a failure is a 502


def answer(name: str = "genuine", request_id: Any = 1) -> bytes:
    """The JSON-RPC answer to ``initialize`` with ``serverInfo.name``: which response reached the client."""
    result = {"protocolVersion": PROTOCOL, "capabilities": {}, "serverInfo": {"name": name, "version": "1"}}
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result}).encode()


def http_response(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", "Content-Type: application/json", *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Received:
    connection: int
    head: str
    body: bytes

    def header(self, name: str) -> str | None:
        for line in self.head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.lower() == name.lower():
                return value.strip()
        return None


@dataclass
class WireUpstream:
    """Answers the n-th request with ``script(n, request)``: the bytes to write, and whether to close."""

    script: Callable[[int, Received], tuple[bytes, bool]]
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    url: str = ""
    reset: bool = False  # end connections with a TCP RST (SO_LINGER 0), not a FIN

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = self.connections
        try:
            for _ in range(100):  # bounded: no test sends more on one connection
                try:
                    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request = Received(connection, head[: -len("\r\n\r\n")], b"")
                length = int(request.header("Content-Length") or 0)
                request.body = await reader.readexactly(length) if length else b""
                self.received.append(request)
                data, close = self.script(len(self.received), request)
                writer.write(data)
                await writer.drain()
                if close:
                    return
        finally:
            if self.reset:
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()


@asynccontextmanager
async def wire_upstream(script: Callable[[int, Received], tuple[bytes, bool]]) -> AsyncIterator[WireUpstream]:
    upstream = WireUpstream(script)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/mcp"
    try:
        yield upstream
    finally:
        server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # No User-Agent of the test client's own: the upstream's must then be the gateway's (none).
    timeout = aiohttp.ClientTimeout(total=WAIT)
    async with aiohttp.ClientSession(timeout=timeout, skip_auto_headers=("User-Agent",)) as session:
        yield session


async def initialize_through_gateway(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, upstream: WireUpstream, times: int = 1
) -> list[tuple[int, dict[str, Any]]]:
    """``times`` initialize requests through a gateway whose only route leads to ``upstream``."""
    answers = []
    async with running_gateway(idp, [{"name": "wire", "path": "/wire/mcp", "upstream": upstream.url}]) as gateway:
        client = await connect(gateway, http, "wire")
        for _ in range(times):
            async with client.post(initialize_request()) as response:
                answers.append((response.status, await response.json(content_type=None)))
    return answers


async def test_requests_share_one_connection_and_carry_only_what_the_gateway_decided(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    async with wire_upstream(lambda n, request: (http_response(answer()), False)) as upstream:
        answers = await initialize_through_gateway(idp, http, upstream, times=3)
    assert [status for status, _ in answers] == [200, 200, 200]
    assert [r.connection for r in upstream.received] == [1, 1, 1]  # keep-alive
    first = upstream.received[0]
    assert first.head.startswith("POST /mcp HTTP/1.1\r\n")
    assert first.header("Host") == upstream.url.split("/")[2]
    assert first.header("Content-Length") == str(len(first.body))
    assert json.loads(first.body)["method"] == "initialize"
    # What the client sent (less its token) and what the gateway states; nothing a library adds on its
    # own (aiohttp's client added User-Agent, and Accept / Accept-Encoding when missing).
    names = [line.partition(":")[0] for line in first.head.split("\r\n")[1:]]
    client_sent = ["Accept", "Content-Type"]
    gateway_states = ["Host", "Content-Length", "Accept-Encoding", "X-Forwarded-For", "X-Forwarded-Proto"]
    assert sorted(names) == sorted([*client_sent, *gateway_states, "X-Forwarded-Host"])
    assert first.header("Accept-Encoding") == "identity"


async def test_a_response_smuggled_after_the_answer_is_never_read_as_the_next_answer(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    """An upstream (or something between) that sends two responses to one request: the second must not
    wait on the connection to be taken as the answer to the next request (a response-queue desync)."""

    def script(n: int, request: Received) -> tuple[bytes, bool]:
        if n == 1:
            return http_response(answer()) + http_response(answer("smuggled")), False
        return http_response(answer("second")), False

    async with wire_upstream(script) as upstream:
        answers = await initialize_through_gateway(idp, http, upstream, times=2)
    names = [body["result"]["serverInfo"]["name"] for _, body in answers]
    assert names == ["genuine", "second"]
    assert [r.connection for r in upstream.received] == [1, 2]


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\n"
        + JSON
        + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + JSON + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\n" + JSON + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: 2\n\nhi",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        http_response(answer(), status="000 Zero"),  # RFC 9110 §15: valid status codes are 100 to 599
        http_response(answer(), status="600 Beyond"),
        # A transfer coding the gateway would not undo: the client would get gzip bytes it was not told of.
        b"HTTP/1.1 200 OK\r\n" + JSON + b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ],
    ids=[
        "content-length-and-chunked",
        "two-content-lengths",
        "bad-chunk-size",
        "bare-lf",
        "101",
        "not-http",
        "status-000",
        "status-600",
        "gzip-transfer-coding",
    ],
)
async def test_a_malformed_or_ambiguous_response_is_a_502_never_a_guess(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, response: bytes
) -> None:
    async with wire_upstream(lambda n, request: (response, False)) as upstream:
        [(status, body)] = await initialize_through_gateway(idp, http, upstream)
    assert status == 502
    assert body["error"]["code"] == -32012  # a malformed answer (-32010 is for an upstream not reached)


async def test_an_endless_response_head_is_cut_off(idp: DevIdentityProvider, http: aiohttp.ClientSession) -> None:
    filler = "X-Filler: " + "a" * 1000
    head = "\r\n".join(["HTTP/1.1 200 OK", *[filler] * (MAX_HEAD_BYTES // 1000 + 1)]) + "\r\n"
    async with wire_upstream(lambda n, request: (head.encode(), False)) as upstream:
        [(status, _)] = await initialize_through_gateway(idp, http, upstream)
    assert status == 502


async def test_a_head_over_the_limit_is_refused_even_when_it_arrives_whole(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    """Not only a head that never ends: one that ends within a read past the limit is refused too."""
    fields = [f"X-Filler-{i}: " + "a" * 1000 for i in range(MAX_HEAD_BYTES // 1000 + 16)]
    response = http_response(answer(), *fields)
    async with wire_upstream(lambda n, request: (response, False)) as upstream:
        [(status, answer_)] = await initialize_through_gateway(idp, http, upstream)
    assert status == 502
    assert answer_["error"]["code"] == -32012  # a malformed answer, not an unreachable upstream


async def test_interim_answers_are_skipped_and_close_delimited_bodies_relayed_whole(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    def script(n: int, request: Received) -> tuple[bytes, bool]:
        early_hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        if n == 1:
            return early_hints + http_response(answer("after-103")), False
        # No Content-Length, no chunking: the body ends with the connection (RFC 9112 §6.3).
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + answer("until-close"), True

    async with wire_upstream(script) as upstream:
        answers = await initialize_through_gateway(idp, http, upstream, times=3)
    names = [body["result"]["serverInfo"]["name"] for _, body in answers]
    assert names == ["after-103", "until-close", "until-close"]
    assert [r.connection for r in upstream.received] == [1, 1, 2]


async def test_a_coding_list_that_is_not_plain_chunked_is_refused_not_framed_two_ways(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    """``, chunked ,`` is chunked by RFC 9110 §5.6.1 (empty list elements are ignored), but llhttp frames
    that body as delimited by the close: the gateway would wait for an end the upstream never sends, or
    read it differently from its parser. Only a plain ``chunked`` is let through."""
    body = answer("chunked")
    data = b"HTTP/1.1 200 OK\r\n" + JSON + b"Transfer-Encoding: , chunked ,\r\n\r\n"
    data += f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    async with wire_upstream(lambda n, request: (data, False)) as upstream:
        [(status, answer_)] = await initialize_through_gateway(idp, http, upstream)
    assert (status, answer_["error"]["code"]) == (502, -32012)


async def test_connection_close_from_the_upstream_is_honoured(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    def script(n: int, request: Received) -> tuple[bytes, bool]:
        return http_response(answer(), "Connection: close"), False  # says close, but leaves it open

    async with wire_upstream(script) as upstream:
        answers = await initialize_through_gateway(idp, http, upstream, times=2)
    assert [status for status, _ in answers] == [200, 200]
    assert [r.connection for r in upstream.received] == [1, 2]


async def test_a_truncated_body_is_never_passed_off_as_whole(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    body = answer()
    truncated = http_response(body)[: -len(body) // 2]
    async with wire_upstream(lambda n, request: (truncated, True)) as upstream:
        [(status, answer_)] = await initialize_through_gateway(idp, http, upstream)
    assert status == 502  # the gateway reads an initialize answer whole (to rewrite it): a JSON-RPC error
    assert answer_["error"]["code"] == -32012


async def test_a_body_delimited_by_the_close_is_not_whole_when_the_connection_is_reset(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    """A body with no Content-Length and no chunking ends with the connection (RFC 9112 §6.3), but only a
    FIN is that end: a reset is an abort (RFC 9293 §3.10.7.4), and what came before it may be partial."""
    body = answer()
    partial = b"HTTP/1.1 200 OK\r\n" + JSON + b"\r\n" + body[: len(body) // 2]
    async with wire_upstream(lambda n, request: (partial, True)) as upstream:
        upstream.reset = True
        [(status, answer_)] = await initialize_through_gateway(idp, http, upstream)
    assert status == 502
    assert answer_["error"]["code"] == -32012


async def test_a_truncated_chunked_body_is_never_passed_off_as_whole_whatever_field_lines_carry_its_coding(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    """Transfer-Encoding split over two field lines is one list (RFC 9110 §5.3): here gzip, then chunked,
    which llhttp frames as chunked. It is refused as a coding the gateway would not undo; before that
    rule, reading only the first line took the cut-off body for one delimited by the close, and whole."""
    body = answer()
    chunked = f"{len(body):x}\r\n".encode() + body[: len(body) // 2]
    head = b"HTTP/1.1 200 OK\r\n" + JSON + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with wire_upstream(lambda n, request: (head + chunked, True)) as upstream:
        [(status, answer_)] = await initialize_through_gateway(idp, http, upstream)
    assert status == 502
    assert answer_["error"]["code"] == -32012


async def test_an_upstream_at_the_root_gets_a_request_target_that_starts_with_a_slash(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    """Route path asked with a query, upstream with no path: the origin-form target is '/?query' (RFC 9112
    §3.2.1), never '?query'."""
    async with wire_upstream(lambda n, request: (http_response(answer()), False)) as upstream:
        upstream.url = upstream.url.removesuffix("/mcp")
        async with running_gateway(idp, [{"name": "wire", "path": "/wire/mcp", "upstream": upstream.url}]) as gateway:
            client = await connect(gateway, http, "wire")
            client.url += "?tenant=a"
            async with client.post(initialize_request()) as response:
                assert response.status == 200
    assert upstream.received[0].head.startswith("POST /?tenant=a HTTP/1.1\r\n")


async def test_a_header_that_would_split_the_request_is_never_sent() -> None:
    async with wire_upstream(lambda n, request: (http_response(answer()), False)) as upstream:
        pool = ConnectionPool(upstream.url, 5.0)
        try:
            for name, value in (("X-Note", "a\r\nX-Injected: 1"), ("X-Note", "a\nb"), ("Bad Name", "v")):
                with pytest.raises(UpstreamHTTPError):
                    await pool.request("POST", "/mcp", CIMultiDict({name: value}), b"{}")
            response = await pool.request("POST", "/mcp", CIMultiDict({"X-Note": "fine"}), b"{}")
            assert response.status == 200
            response.close()
        finally:
            await pool.close()
    assert len(upstream.received) == 1 and upstream.received[0].header("X-Note") == "fine"
    assert upstream.received[0].header("X-Injected") is None


async def test_a_head_answer_has_no_body_whatever_its_content_length() -> None:
    """llhttp cannot know the request was HEAD; the pool ends the answer at its headers and does not reuse
    the connection (RFC 9110 §9.3.2)."""
    responses = iter([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", http_response(answer())])
    async with wire_upstream(lambda n, request: (next(responses), False)) as upstream:
        pool = ConnectionPool(upstream.url, 5.0)
        try:
            async with asyncio.timeout(WAIT):
                head = await pool.request("HEAD", "/mcp", CIMultiDict(), None)
                assert (head.status, head.content_length, await head.readany()) == (200, 10, b"")
                head.close()
                after = await pool.request("POST", "/mcp", CIMultiDict(), b"{}")
                assert json.loads(await after.readany())["result"]["serverInfo"]["name"] == "genuine"
                after.close()
        finally:
            await pool.close()
    assert [r.connection for r in upstream.received] == [1, 2]


async def test_endless_trailers_are_cut_off_like_an_endless_head() -> None:
    """After the last chunk come trailer fields (RFC 9112 §7.1.2), which llhttp hands over as headers: an
    upstream that never ends them must not make the gateway hold them without bound. A megabyte of them
    takes several reads (asyncio reads at most 256 KiB at once)."""
    trailers = b"".join(b"X-Trailer-%d: %s\r\n" % (i, b"a" * 1000) for i in range(1000))
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n" + trailers
    async with wire_upstream(lambda n, request: (response, False)) as upstream:
        pool = ConnectionPool(upstream.url, 5.0)
        try:
            async with asyncio.timeout(WAIT):
                streamed = await pool.request("GET", "/mcp", CIMultiDict(), None)
                assert await streamed.readany() == b"hello"
                with pytest.raises(UpstreamHTTPError):
                    await streamed.readany()
            streamed.close()
        finally:
            await pool.close()


@asynccontextmanager
async def https_upstream(certificate: ServerCertificate) -> AsyncIterator[tuple[str, list[str]]]:
    """A real HTTPS server on loopback answering ``initialize``; yields its URL and the methods it saw."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        message = await request.json()
        seen.append(message["method"])
        return web.json_response(json.loads(answer("over-tls", message["id"])))

    app = web.Application()
    app.router.add_post("/mcp", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = bind_socket("127.0.0.1", 0)
    await web.SockSite(runner, sock, ssl_context=certificate.server_context()).start()
    try:
        yield f"https://127.0.0.1:{sock.getsockname()[1]}/mcp", seen
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("names", "trusted", "reached"),
    [(["127.0.0.1"], True, True), (["127.0.0.1"], False, False), (["localhost"], True, False)],
    ids=["trusted-certificate", "unknown-authority", "certificate-for-another-name"],
)
async def test_an_https_upstream_is_reached_only_through_a_verified_certificate(
    idp: DevIdentityProvider,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    names: list[str],
    trusted: bool,
    reached: bool,
) -> None:
    """The client's token is gone by the time a request goes upstream, but what it carries (the body, the
    identity header, per-user credentials) must reach the configured server and no other: the upstream's
    certificate chain and name are verified (RFC 9110 §4.3.4), with the system's trust store, which
    ``SSL_CERT_FILE`` points at our test CA here."""
    certificate = issue_server_certificate(tmp_path, names)
    if trusted:
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate.ca_file))
    async with https_upstream(certificate) as (url, seen):
        routes = [{"name": "tls", "path": "/tls/mcp", "upstream": url}]
        async with running_gateway(idp, routes) as gateway:
            client = await connect(gateway, http, "tls")
            async with client.post(initialize_request()) as response:
                status, body = response.status, await response.json(content_type=None)
    if reached:
        assert (status, body["result"]["serverInfo"]["name"], seen) == (200, "over-tls", ["initialize"])
    else:
        assert (status, body["error"]["code"], seen) == (502, -32010, [])


@pytest.mark.parametrize(
    ("upstream", "host"),
    [
        ("http://bücher.example:8080/mcp", "xn--bcher-kva.example:8080"),
        ("https://mcp.example:443/mcp", "mcp.example"),
        ("http://[::1]:8080/mcp", "[::1]:8080"),
    ],
    ids=["international-name", "default-port", "ipv6"],
)
def test_the_host_line_is_the_ascii_authority_without_a_default_port(upstream: str, host: str) -> None:
    """RFC 9112 §3.2 (no name here resolves, so the request line and Host are checked as written)."""
    head = ConnectionPool(upstream, 5.0)._head("POST", "/mcp", CIMultiDict(), b"{}")
    assert head.split(b"\r\n")[:2] == [b"POST /mcp HTTP/1.1", f"Host: {host}".encode()]
