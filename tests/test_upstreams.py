"""Validate the real upstream MCP fixtures by talking to them directly with the official SDK client.

No gateway is involved: if these fail, gateway tests built on the fixtures would be meaningless.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.support.sdk import text_of
from tests.support.upstreams import RunningUpstream, UpstreamStartError, start_upstream

TRANSPORTS = ["streamable-json", "streamable-sse", "sse"]
STREAMING_TRANSPORTS = ["streamable-sse", "sse"]
EXPECTED_TOOLS = {"echo", "add", "get_weather", "delete_everything", "headers_seen", "gated_stream"}
WAIT_SECONDS = 10


@pytest.fixture(scope="module", params=TRANSPORTS)
def upstream(request: pytest.FixtureRequest) -> Iterator[RunningUpstream]:
    with start_upstream(request.param) as running:
        yield running


@pytest.fixture(scope="module", params=STREAMING_TRANSPORTS)
def streaming_upstream(request: pytest.FixtureRequest) -> Iterator[RunningUpstream]:
    with start_upstream(request.param) as running:
        yield running


@asynccontextmanager
async def connect(
    upstream: RunningUpstream,
    mode: str = "legacy",
    headers: dict[str, str] | None = None,
    **client_kwargs: Any,
) -> AsyncIterator[Client]:
    """Open an SDK ``Client`` on the upstream's own transport, optionally with extra HTTP headers."""
    if upstream.transport == "sse":
        async with Client(sse_client(upstream.mcp_url, headers=headers), mode=mode, **client_kwargs) as client:
            yield client
        return
    async with create_mcp_http_client(headers=headers) as http_client:
        transport = streamable_http_client(upstream.mcp_url, http_client=http_client)
        async with Client(transport, mode=mode, **client_kwargs) as client:
            yield client


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_list_and_call_tools(upstream: RunningUpstream, mode: str) -> None:
    async with connect(upstream, mode) as client:
        # mcp 2.3.0 speaks 2026-07-28 to its own servers in auto mode (they answer server/discover, even
        # over legacy SSE); legacy mode is the stateful 2025-11-25 handshake.
        assert client.protocol_version == ("2025-11-25" if mode == "legacy" else "2026-07-28")
        listed = await client.list_tools()
        assert EXPECTED_TOOLS <= {tool.name for tool in listed.tools}
        assert text_of(await client.call_tool("echo", {"text": "hi there"})) == "hi there"
        added = await client.call_tool("add", {"a": 2, "b": 40})
        assert text_of(added) == "42"
        assert added.structured_content == {"result": 42}
        assert "Paris" in text_of(await client.call_tool("get_weather", {"city": "Paris"}))
        assert "nothing" in text_of(await client.call_tool("delete_everything", {}))


async def test_resources_and_prompts(upstream: RunningUpstream) -> None:
    async with connect(upstream) as client:
        uris = {str(resource.uri) for resource in (await client.list_resources()).resources}
        assert {"config://app", "secret://payroll"} <= uris
        config = (await client.read_resource("config://app")).contents[0]
        assert isinstance(config, types.TextResourceContents)
        assert json.loads(config.text)["region"] == "test"
        assert {"greeting", "admin_prompt"} <= {prompt.name for prompt in (await client.list_prompts()).prompts}
        prompt = await client.get_prompt("greeting", {"name": "Ada"})
        content = prompt.messages[0].content
        assert isinstance(content, types.TextContent)
        assert "Ada" in content.text


async def test_recorder_sees_methods_and_targets(upstream: RunningUpstream) -> None:
    upstream.reset()
    async with connect(upstream) as client:
        await client.call_tool("delete_everything", {})
        await client.read_resource("secret://payroll")
        await client.get_prompt("admin_prompt")
    recorded = upstream.recorded()
    # The client fetches tools/list on its own before a call (to validate output schemas); skip it.
    requests = [
        (entry["method"], entry["name"])
        for entry in recorded
        if entry["kind"] == "request" and entry["method"] != "tools/list"
    ]
    assert requests == [
        ("initialize", None),
        ("tools/call", "delete_everything"),
        ("resources/read", "secret://payroll"),
        ("prompts/get", "admin_prompt"),
    ]
    assert ("notifications/initialized", "notification") in {(e["method"], e["kind"]) for e in recorded}
    upstream.reset()
    assert upstream.recorded() == []


async def test_headers_seen_reports_incoming_headers(upstream: RunningUpstream) -> None:
    sent = {"Authorization": "Bearer direct-token", "X-Forwarded-For": "198.51.100.7"}
    async with connect(upstream, headers=sent) as client:
        seen = (await client.call_tool("headers_seen", {})).structured_content
    assert seen is not None
    assert seen["authorization"] == "Bearer direct-token"
    assert seen["x-forwarded-for"] == "198.51.100.7"
    assert seen["host"] == upstream.host_port
    if upstream.transport != "sse":
        # Stateful by default: the tool call carried the session id minted at initialize.
        assert seen.get("mcp-session-id")
        assert seen["mcp-protocol-version"] == "2025-11-25"


async def test_headers_seen_without_authorization(upstream: RunningUpstream) -> None:
    async with connect(upstream, mode="auto") as client:
        seen = (await client.call_tool("headers_seen", {})).structured_content
    assert seen is not None
    assert "authorization" not in seen


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_gated_stream_notifies_before_release(streaming_upstream: RunningUpstream, mode: str) -> None:
    gate = f"before-release-{mode}"
    progressed = anyio.Event()
    logged = anyio.Event()
    outcome: dict[str, types.CallToolResult] = {}

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        progressed.set()

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logged.set()

    async with connect(streaming_upstream, mode, logging_callback=on_log, log_level="info") as client:

        async def call() -> None:
            outcome["result"] = await client.call_tool("gated_stream", {"gate": gate}, progress_callback=on_progress)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.fail_after(WAIT_SECONDS):
                await progressed.wait()
                await logged.wait()
            assert "result" not in outcome  # the upstream is still blocked on the gate
            streaming_upstream.release(gate)
        assert text_of(outcome["result"]) == f"gate {gate} released"


async def test_gate_released_before_wait(streaming_upstream: RunningUpstream) -> None:
    streaming_upstream.release("early")
    async with connect(streaming_upstream) as client:
        with anyio.fail_after(WAIT_SECONDS):
            result = await client.call_tool("gated_stream", {"gate": "early"})
    assert text_of(result) == "gate early released"


async def test_foreign_host_header_is_misdirected(upstream: RunningUpstream) -> None:
    """The SDK's loopback guard is on: a proxy must send the upstream's own Host, not the client's."""
    path = "/sse" if upstream.transport == "sse" else "/mcp"
    method = "GET" if upstream.transport == "sse" else "POST"
    async with aiohttp.ClientSession() as session:
        async with session.request(
            method,
            upstream.base_url + path,
            headers={"Host": "gateway.example:443", "Accept": "application/json, text/event-stream"},
            json={"jsonrpc": "2.0", "id": 1, "method": "ping"} if method == "POST" else None,
        ) as response:
            assert response.status == 421


async def test_stateless_option_issues_no_session() -> None:
    with start_upstream("streamable-json", stateless=True) as upstream:
        async with connect(upstream) as client:
            seen = (await client.call_tool("headers_seen", {})).structured_content
    assert seen is not None
    assert "mcp-session-id" not in seen


def test_start_failure_reports_stderr() -> None:
    with pytest.raises(UpstreamStartError, match="invalid choice"):
        start_upstream("carrier-pigeon")
