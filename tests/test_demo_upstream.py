"""The aiohttp-only demo MCP server: driven by the official SDK client and by raw HTTP for error cases."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from gateway.demo_upstream import make_demo_upstream_app, start_demo_upstream
from tests.support.loopback import serve_app
from tests.support.sdk import text_of

ACCEPT = "application/json, text/event-stream"


@pytest.fixture(scope="module")
async def demo_url() -> AsyncIterator[str]:
    runner, url = await start_demo_upstream()
    try:
        yield url
    finally:
        await runner.cleanup()


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def initialize_body(version: str = "2025-11-25", request_id: int = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"},
        },
    }


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """POST a JSON-RPC body (or raw bytes) and return status, headers and parsed JSON (None if empty)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", "Accept": ACCEPT, **(headers or {})}
    async with http.post(url, data=data, headers=all_headers) as response:
        raw = await response.read()
        return response.status, dict(response.headers), (json.loads(raw) if raw else None)


async def open_session(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    status, headers, _ = await post(http, url, initialize_body())
    assert status == 200
    return {"Mcp-Session-Id": headers["Mcp-Session-Id"], "MCP-Protocol-Version": "2025-11-25"}


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_official_client_lists_and_calls_tools(demo_url: str, mode: str) -> None:
    async with Client(streamable_http_client(demo_url), mode=mode) as client:
        assert client.protocol_version == "2025-11-25"
        assert client.server_info is not None and client.server_info.name == "mcp-gateway-demo-upstream"
        assert {tool.name for tool in (await client.list_tools()).tools} == {"echo", "add", "whoami"}
        assert text_of(await client.call_tool("echo", {"text": "hello gateway"})) == "hello gateway"
        assert text_of(await client.call_tool("add", {"a": 19, "b": 23})) == "42"
        whoami = await client.call_tool("whoami", {})
        assert whoami.structured_content is not None
        assert whoami.structured_content["authorization"] == "absent"


async def test_auto_mode_probes_discover_then_initializes() -> None:
    """Pin the wire sequence: session-less ``server/discover`` -> -32601 -> ``initialize`` with a session."""
    seen: list[tuple[str, str | None, str | None, str | None]] = []

    @web.middleware
    async def record(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        method = None
        if request.method == "POST":
            method = json.loads(await request.read()).get("method")
        seen.append(
            (
                request.method,
                method,
                request.headers.get("Mcp-Session-Id"),
                request.headers.get("MCP-Protocol-Version"),
            )
        )
        return await handler(request)

    app = make_demo_upstream_app()
    app.middlewares.append(record)
    async with serve_app(app) as base:
        async with Client(streamable_http_client(base + "/mcp")) as client:  # default mode is "auto"
            await client.list_tools()

    posts = [(method, session, version) for verb, method, session, version in seen if verb == "POST"]
    assert posts[0] == ("server/discover", None, "2026-07-28")
    assert posts[1] == ("initialize", None, None)
    session_id = posts[2][1]
    assert posts[2] == ("notifications/initialized", session_id, "2025-11-25")
    assert session_id is not None
    assert ("tools/list", session_id, "2025-11-25") in posts
    assert ("DELETE", None, session_id, "2025-11-25") in seen  # the client ends its session on exit


async def test_whoami_reports_presence_never_the_credential(demo_url: str) -> None:
    secret = "Bearer do-not-echo-me"
    headers = {"Authorization": secret, "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    async with create_mcp_http_client(headers=headers) as http_client:
        async with Client(streamable_http_client(demo_url, http_client=http_client), mode="legacy") as client:
            result = await client.call_tool("whoami", {})
    assert result.structured_content is not None
    assert result.structured_content["authorization"] == "present"
    assert result.structured_content["forwarded"] == {
        "x-forwarded-for": "203.0.113.9",
        "x-forwarded-proto": "https",
    }
    assert "do-not-echo-me" not in result.model_dump_json()


async def test_malformed_json_is_parse_error(demo_url: str, http: aiohttp.ClientSession) -> None:
    status, _, body = await post(http, demo_url, b"{not json")
    assert status == 400
    assert body["error"]["code"] == -32700
    assert body["id"] is None


async def test_batch_is_invalid_request(demo_url: str, http: aiohttp.ClientSession) -> None:
    status, _, body = await post(http, demo_url, [initialize_body()])
    assert status == 400
    assert body["error"]["code"] == -32600


@pytest.mark.parametrize(
    ("requested", "negotiated"),
    [
        ("2025-11-25", "2025-11-25"),
        ("2025-06-18", "2025-06-18"),
        ("2025-03-26", "2025-03-26"),
        ("2024-11-05", "2025-11-25"),
    ],
)
async def test_initialize_negotiates_version_and_mints_session(
    demo_url: str, http: aiohttp.ClientSession, requested: str, negotiated: str
) -> None:
    status, headers, body = await post(http, demo_url, initialize_body(requested, request_id=7))
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert body["id"] == 7
    assert body["result"]["protocolVersion"] == negotiated
    assert body["result"]["capabilities"] == {"tools": {}}
    assert body["result"]["serverInfo"]["name"] == "mcp-gateway-demo-upstream"
    session_id = headers["Mcp-Session-Id"]
    assert session_id and all(0x21 <= ord(ch) <= 0x7E for ch in session_id)


async def test_session_required_and_checked(demo_url: str, http: aiohttp.ClientSession) -> None:
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    status, _, body = await post(http, demo_url, ping)
    assert status == 400
    assert body["error"]["code"] == -32600
    status, _, _ = await post(http, demo_url, ping, {"Mcp-Session-Id": "no-such-session"})
    assert status == 404
    status, _, body = await post(http, demo_url, ping, await open_session(http, demo_url))
    assert (status, body) == (200, {"jsonrpc": "2.0", "id": 2, "result": {}})


async def test_unknown_methods_are_method_not_found(demo_url: str, http: aiohttp.ClientSession) -> None:
    discover = {"jsonrpc": "2.0", "id": "d", "method": "server/discover", "params": {}}
    status, _, body = await post(http, demo_url, discover, {"MCP-Protocol-Version": "2026-07-28"})
    assert status == 200
    assert body == {
        "jsonrpc": "2.0",
        "id": "d",
        "error": {"code": -32601, "message": "Method not found: server/discover"},
    }
    session = await open_session(http, demo_url)
    status, _, body = await post(http, demo_url, {"jsonrpc": "2.0", "id": 3, "method": "resources/list"}, session)
    assert status == 200
    assert body["error"]["code"] == -32601


async def test_notifications_and_responses_get_202(demo_url: str, http: aiohttp.ClientSession) -> None:
    session = await open_session(http, demo_url)
    notification = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert (await post(http, demo_url, notification, session))[::2] == (202, None)
    response = {"jsonrpc": "2.0", "id": 99, "result": {}}
    assert (await post(http, demo_url, response, session))[::2] == (202, None)


async def test_unsupported_protocol_version_header(demo_url: str, http: aiohttp.ClientSession) -> None:
    session = await open_session(http, demo_url) | {"MCP-Protocol-Version": "1999-01-01"}
    status, _, body = await post(http, demo_url, {"jsonrpc": "2.0", "id": 4, "method": "tools/list"}, session)
    assert status == 400
    assert body["error"]["code"] == -32600


async def test_tool_errors(demo_url: str, http: aiohttp.ClientSession) -> None:
    session = await open_session(http, demo_url)
    bad_args = {
        "jsonrpc": "2.0",
        "id": 5,
        "method": "tools/call",
        "params": {"name": "add", "arguments": {"a": "x"}},
    }
    _, _, body = await post(http, demo_url, bad_args, session)
    assert body["result"]["isError"] is True
    unknown = {"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "rm", "arguments": {}}}
    _, _, body = await post(http, demo_url, unknown, session)
    assert body["error"]["code"] == -32602


async def test_get_is_405_and_delete_ends_session(demo_url: str, http: aiohttp.ClientSession) -> None:
    session = await open_session(http, demo_url)
    async with http.get(demo_url, headers={"Accept": "text/event-stream", **session}) as response:
        assert response.status == 405
    async with http.delete(demo_url) as response:
        assert response.status == 400
    async with http.delete(demo_url, headers=session) as response:
        assert response.status == 204
    status, _, _ = await post(http, demo_url, {"jsonrpc": "2.0", "id": 8, "method": "tools/list"}, session)
    assert status == 404
    async with http.delete(demo_url, headers=session) as response:
        assert response.status == 404
