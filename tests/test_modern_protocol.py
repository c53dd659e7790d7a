"""The 2026-07-28 protocol generation through the gateway with runtime rules: stateless requests carry
their protocol version and capabilities in ``_meta`` and name themselves in ``Mcp-Method`` / ``Mcp-Name``
(SEP-2243); ``server/discover`` replaces ``initialize``; ``subscriptions/listen`` is the notification
stream (SEP-2575); list results carry caching hints (SEP-2549). The upstream is the conformance fixture
(official Python SDK), which serves this generation."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from gateway.devidp import DevIdentityProvider
from tests.support.harness import GatewayHarness, running_gateway
from tests.support.mcp_http import next_message, read_response
from tests.support.upstreams import RunningUpstream, start_lenient, start_upstream

VERSION = "2026-07-28"
META = {
    "io.modelcontextprotocol/protocolVersion": VERSION,
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "modern-test", "version": "1"},
}
PERMITTED = {"test_simple_text", "test_trigger_tool_change"}
RULES = {"tools": [{"id": "support-tools", "groups": ["support"], "allow": sorted(PERMITTED)}]}
FORBIDDEN = -32003
HEADER_MISMATCH = -32020
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=15)


@pytest.fixture(scope="module")
def modern_upstream() -> Iterator[RunningUpstream]:
    with start_upstream("streamable-sse", module="tests.support.conformance_server") as upstream:
        yield upstream


@pytest.fixture
async def modern_gw(idp: DevIdentityProvider, modern_upstream: RunningUpstream) -> AsyncIterator[GatewayHarness]:
    routes = [{"name": "modern", "path": "/modern/mcp", "upstream": modern_upstream.mcp_url, **RULES}]
    async with running_gateway(idp, routes) as gw:
        yield gw


def message(request_id: int, method: str, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": {**params, "_meta": META}}


def headers(token: str, body: dict[str, Any], **extra: str) -> dict[str, str]:
    """SEP-2243 standard headers: Mcp-Method always, Mcp-Name for calls that name a target."""
    values = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": VERSION,
        "Mcp-Method": body["method"],
    }
    name = body["params"].get("name")
    if isinstance(name, str):
        values["Mcp-Name"] = name
    return {**values, **extra}


async def rpc(http: aiohttp.ClientSession, gw: GatewayHarness, token: str, body: dict[str, Any], **extra: str) -> Any:
    async with http.post(gw.route_url("modern"), json=body, headers=headers(token, body, **extra)) as response:
        return response.status, await read_response(response, body["id"])


async def test_discover_and_lists_are_served_and_filtered(modern_gw: GatewayHarness) -> None:
    token = await modern_gw.access_token("modern", user="bob")
    async with aiohttp.ClientSession(timeout=STREAM_TIMEOUT) as http:
        status, discovered = await rpc(http, modern_gw, token, message(1, "server/discover"))
        assert status == 200, discovered
        result = discovered["result"]
        assert VERSION in result["supportedVersions"] and "tools" in result["capabilities"]
        # server/discover lists capabilities, not tools: nothing in it for the rules to filter.
        assert "tools" not in result
        status, listed = await rpc(http, modern_gw, token, message(2, "tools/list"))
    assert status == 200, listed
    assert {tool["name"] for tool in listed["result"]["tools"]} == PERMITTED
    # The upstream's caching hints pass through; the gateway caches nothing itself.
    assert listed["result"]["cacheScope"] == "private" and isinstance(listed["result"]["ttlMs"], int)


async def test_calls_are_decided_per_user(modern_gw: GatewayHarness) -> None:
    token = await modern_gw.access_token("modern", user="bob")
    async with aiohttp.ClientSession(timeout=STREAM_TIMEOUT) as http:
        status, allowed = await rpc(http, modern_gw, token, message(3, "tools/call", name="test_simple_text"))
        assert status == 200 and allowed["result"]["content"][0]["text"].startswith("This is a simple text")
        status, denied = await rpc(http, modern_gw, token, message(4, "tools/call", name="test_image_content"))
        assert denied["error"]["code"] == FORBIDDEN, denied
        # Mcp-Name must name what the body calls (SEP-2243): a permitted name in the header does not
        # let a forbidden call through.
        body = message(5, "tools/call", name="test_image_content")
        status, mismatch = await rpc(http, modern_gw, token, body, **{"Mcp-Name": "test_simple_text"})
    assert status == 400 and mismatch["error"]["code"] == HEADER_MISMATCH, mismatch


async def test_subscriptions_listen_stream_through_the_gateway(modern_gw: GatewayHarness) -> None:
    token = await modern_gw.access_token("modern", user="bob")
    body = message(6, "subscriptions/listen", notifications={"toolsListChanged": True})
    async with aiohttp.ClientSession(timeout=STREAM_TIMEOUT) as http:
        async with http.post(modern_gw.route_url("modern"), json=body, headers=headers(token, body)) as stream:
            assert stream.status == 200 and stream.content_type == "text/event-stream"
            acknowledged = await next_message(stream.content)
            assert acknowledged["method"] == "notifications/subscriptions/acknowledged", acknowledged
            status, _ = await rpc(http, modern_gw, token, message(7, "tools/call", name="test_trigger_tool_change"))
            assert status == 200
            changed = await next_message(stream.content)
    assert changed["method"] == "notifications/tools/list_changed", json.dumps(changed)


@pytest.mark.parametrize(
    ("version_in", "omitted", "refused"),
    [
        ("meta", "Mcp-Method", True),
        ("header", "Mcp-Method", True),
        ("meta", "Mcp-Name", True),
        ("meta", "", False),  # both present: served
        ("none", "Mcp-Method", False),  # 2025-11-25 and earlier have no mirror headers
    ],
)
async def test_mirror_headers_are_required_from_2026_07_28(
    idp: DevIdentityProvider, version_in: str, omitted: str, refused: bool
) -> None:
    """SEP-2243: a 2026-07-28 request must carry Mcp-Method, and Mcp-Name when it names a target. The
    upstream here runs whatever it is sent, so the refusal is the gateway's own."""
    with start_lenient() as lenient:
        routes = [{"name": "lenient", "path": "/lenient/mcp", "upstream": lenient.mcp_url}]
        async with running_gateway(idp, routes) as gw:
            token = await gw.access_token("lenient")
            body = message(8, "tools/call", name="echo", arguments={"text": "hi"})
            if version_in != "meta":
                del body["params"]["_meta"]
            sent = headers(token, body)
            sent.pop(omitted, None)
            if version_in != "header":
                del sent["MCP-Protocol-Version"]
            async with aiohttp.ClientSession(timeout=STREAM_TIMEOUT) as http:
                async with http.post(gw.route_url("lenient"), json=body, headers=sent) as response:
                    status, answer = response.status, await read_response(response, 8)
        executed = lenient.executed()
    if refused:
        assert status == 400 and answer["error"]["code"] == HEADER_MISMATCH, answer
        assert omitted in answer["error"]["message"] and executed == []
    else:
        assert status == 200 and executed == ["echo"], answer
