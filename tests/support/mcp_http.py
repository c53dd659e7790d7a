"""Just enough of an MCP Streamable HTTP client (2025-11-25) to drive a gateway route by hand.

Used by tests that need to hold a request open at a known point (a ``gated_stream`` call whose first
event has arrived) while something else happens to the gateway: a scrape, a reload, a shutdown. The
SSE parser here is independent of the gateway's own framing code, so that code is not used to judge
itself, and it tells a stream that ended (None) from one that is still open.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp

PROTOCOL = "2025-11-25"
ACCEPT = "application/json, text/event-stream"
MAX_LINES_PER_EVENT = 1_000
MAX_EVENTS = 100
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


@dataclass
class SseEvent:
    fields: list[tuple[str, str]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    @property
    def data(self) -> str:
        return "\n".join(value for key, value in self.fields if key == "data")


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
        params = {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "ops-test", "version": "1"}}
        async with self.post(request(1, "initialize", params)) as response:
            assert response.status == 200, await response.text()
            self.session_id = response.headers["Mcp-Session-Id"]
            result = await read_response(response, 1)
        async with self.post(INITIALIZED) as response:
            assert response.status == 202, await response.text()
        return result

    async def call(self, message: dict[str, Any]) -> dict[str, Any]:
        async with self.post(message) as response:
            assert response.status == 200, await response.text()
            return await read_response(response, message["id"])
