"""Just enough of an MCP client (Streamable HTTP 2025-11-25, and the deprecated HTTP+SSE transport)
to drive a gateway route by hand.

Used by tests that need to see the raw exchange, or to hold a request open at a known point (a
``gated_stream`` call whose first event has arrived) while something else happens to the gateway: a
scrape, a reload, a shutdown. The SSE parser here is independent of the gateway's own framing code,
so that code is not used to judge itself, and it tells a stream that ended (None) from one that is
still open.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from tests.support.harness import GatewayHarness

PROTOCOL = "2025-11-25"
ACCEPT = "application/json, text/event-stream"
WAIT = 10.0  # upper bound on any single wait for the network; tests finish far sooner
MAX_LINES_PER_EVENT = 1_000
MAX_EVENTS = 100
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


@dataclass
class SseEvent:
    fields: list[tuple[str, str]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.fields if key == name]

    @property
    def data(self) -> str:
        return "\n".join(self.values("data"))


async def read_event(content: aiohttp.StreamReader) -> SseEvent | None:
    """The next SSE event or comment block; None when the stream has ended."""
    event = SseEvent()
    for _ in range(MAX_LINES_PER_EVENT):
        line = await content.readline()
        if not line:
            return None
        text = line.decode().rstrip("\r\n")
        if not text:
            if event.fields or event.comments:
                return event
        elif text.startswith(":"):
            event.comments.append(text[1:])
        else:
            name, _, value = text.partition(":")
            event.fields.append((name, value.removeprefix(" ")))
    raise AssertionError("SSE event without an end")


async def next_message(content: aiohttp.StreamReader) -> dict[str, Any]:
    """The next JSON-RPC message on a stream, skipping keep-alives and priming events."""
    for _ in range(MAX_EVENTS):
        event = await read_event(content)
        assert event is not None, "stream ended before a message arrived"
        if event.data:
            return json.loads(event.data)
    raise AssertionError(f"no message in {MAX_EVENTS} events")


async def response_message(content: aiohttp.StreamReader, request_id: Any) -> dict[str, Any]:
    """The JSON-RPC response to ``request_id`` on a stream (notifications before it are skipped)."""
    for _ in range(MAX_EVENTS):
        message = await next_message(content)
        if message.get("id") == request_id and ("result" in message or "error" in message):
            return message
    raise AssertionError(f"no response to {request_id!r} in {MAX_EVENTS} messages")


async def rest_of_stream(content: aiohttp.StreamReader) -> list[dict[str, Any]]:
    """Every JSON-RPC message until the stream ends. A stream cut without its proper end (a broken
    chunked body) raises aiohttp.ClientPayloadError here rather than ending quietly."""
    messages = []
    for _ in range(MAX_EVENTS):
        event = await read_event(content)
        if event is None:
            return messages
        if event.data:
            messages.append(json.loads(event.data))
    raise AssertionError(f"stream still open after {MAX_EVENTS} events")


async def read_response(response: aiohttp.ClientResponse, request_id: Any) -> dict[str, Any]:
    """The JSON-RPC response to a POST, whether the upstream answered with JSON or with SSE."""
    if response.content_type == "text/event-stream":
        return await response_message(response.content, request_id)
    assert response.content_type == "application/json", response.content_type
    return await response.json()


def request(request_id: Any, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}


def initialize_request(request_id: Any = 1, client_name: str = "raw-mcp-test") -> dict[str, Any]:
    params = {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": client_name, "version": "1"}}
    return request(request_id, "initialize", params)


def tool_call(request_id: Any, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    return request(request_id, "tools/call", {"name": name, "arguments": arguments or {}})


def tool_text(message: dict[str, Any]) -> str:
    assert "result" in message, message
    assert not message["result"].get("isError"), message
    return message["result"]["content"][0]["text"]


class McpHttp:
    """One MCP session on one gateway route, authenticated with a gateway access token."""

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        self.http = http
        self.url = url
        self.token = token
        self.session_id: str | None = None

    def headers(self, **extra: str) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": ACCEPT}
        if self.session_id is not None:
            headers["Mcp-Session-Id"] = self.session_id
            headers["MCP-Protocol-Version"] = PROTOCOL
        return {**headers, **extra}

    def post(self, message: Any, **headers: str) -> Any:
        return self.http.post(self.url, json=message, headers=self.headers(**headers))

    async def initialize(self) -> dict[str, Any]:
        async with self.post(initialize_request()) as response:
            assert response.status == 200, await response.text()
            self.session_id = response.headers["Mcp-Session-Id"]
            result = await read_response(response, 1)
        async with self.post(INITIALIZED) as response:
            assert response.status == 202, await response.text()
        return result

    async def call(self, message: dict[str, Any], **headers: str) -> dict[str, Any]:
        async with self.post(message, **headers) as response:
            assert response.status == 200, await response.text()
            return await read_response(response, message["id"])


async def connect(gateway: GatewayHarness, http: aiohttp.ClientSession, route: str, **claims: Any) -> McpHttp:
    """A client for ``route`` with a fresh access token (``claims`` as for ``access_token``), before
    any handshake."""
    return McpHttp(http, gateway.route_url(route), await gateway.access_token(route, **claims))


async def open_session(gateway: GatewayHarness, http: aiohttp.ClientSession, route: str, **claims: Any) -> McpHttp:
    """:func:`connect`, then initialize and notifications/initialized."""
    client = await connect(gateway, http, route, **claims)
    await client.initialize()
    return client


def new_gate(prefix: str) -> str:
    """A fresh gate name for the test upstream's ``gated_stream`` tool."""
    return f"{prefix}-{uuid.uuid4().hex}"


# -- the deprecated HTTP+SSE transport (2024-11-05) -------------------------------------------------


async def open_legacy_stream(
    http: aiohttp.ClientSession, sse_url: str, token: str
) -> tuple[aiohttp.ClientResponse, str]:
    """GET an HTTP+SSE event stream; returns the open stream and the endpoint it announced."""
    response = await http.get(sse_url, headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream"})
    assert response.status == 200, await response.text()
    async with asyncio.timeout(WAIT):
        event = await read_event(response.content)
    assert event is not None
    assert event.values("event") == ["endpoint"]
    return response, event.data


async def legacy_handshake(
    http: aiohttp.ClientSession, stream: aiohttp.ClientResponse, post_url: str, headers: dict[str, str]
) -> dict[str, Any]:
    """initialize (answered on ``stream``) and notifications/initialized, POSTed to ``post_url``."""
    async with http.post(post_url, json=initialize_request(), headers=headers) as posted:
        assert posted.status == 202, await posted.text()
    async with asyncio.timeout(WAIT):
        initialized = await response_message(stream.content, 1)
    async with http.post(post_url, json=INITIALIZED, headers=headers) as posted:
        assert posted.status == 202
    return initialized


async def legacy_call(
    http: aiohttp.ClientSession,
    stream: aiohttp.ClientResponse,
    post_url: str,
    headers: dict[str, str],
    message: dict[str, Any],
) -> dict[str, Any]:
    """POST a request into an HTTP+SSE session (accepted with 202) and wait for its answer on ``stream``."""
    async with http.post(post_url, json=message, headers=headers) as posted:
        assert posted.status == 202
    async with asyncio.timeout(WAIT):
        return await response_message(stream.content, message["id"])
