"""Runtime policy on the legacy HTTP+SSE transport, where responses to POSTed requests arrive on the
long-lived GET stream rather than in the POST response (gateway/app.py ``_legacy_session``)."""

from __future__ import annotations

import mcp_types as types
import pytest
from mcp import Client
from mcp.client.sse import sse_client

from gateway.devidp import DevIdentityProvider
from gateway.proxy.jsonrpc import EMA_EXTENSION
from tests.support.harness import GatewayHarness, running_gateway
from tests.support.upstreams import RunningUpstream

RULES = {
    "tools": [
        {"groups": ["support"], "allow": ["echo", "get_*"]},
        {"groups": ["engineering"], "allow": ["*"], "deny": ["delete_*"]},
    ],
    "prompts": [{"groups": ["*"], "allow": ["greeting"]}],
}


@pytest.fixture(scope="module")
async def legacy_gw(idp: DevIdentityProvider, upstream_legacy: RunningUpstream) -> GatewayHarness:
    routes = [{"name": "legacy", "path": "/legacy", "upstream": upstream_legacy.base_url, "transport": "sse", **RULES}]
    async with running_gateway(idp, routes) as harness:
        yield harness


async def open_client(h: GatewayHarness, user: str) -> tuple[Client, str]:
    token = await h.access_token("legacy", user=user)
    return Client(
        sse_client(h.route_url("legacy") + "/sse", headers={"Authorization": f"Bearer {token}"}), mode="legacy"
    ), token


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("bob", {"echo", "get_weather"}),
        ("alice", {"echo", "add", "get_weather", "headers_seen", "gated_stream"}),
    ],
)
async def test_legacy_tool_list_is_filtered_on_the_get_stream(
    legacy_gw: GatewayHarness, upstream_legacy: RunningUpstream, user: str, expected: set[str]
) -> None:
    client, _ = await open_client(legacy_gw, user)
    async with client:
        names = {t.name for t in (await client.list_tools()).tools}
        prompts = {p.name for p in (await client.list_prompts()).prompts}
    assert names == expected
    assert prompts == {"greeting"}


async def test_legacy_denied_call_never_reaches_the_upstream(
    legacy_gw: GatewayHarness, upstream_legacy: RunningUpstream
) -> None:
    client, _ = await open_client(legacy_gw, "bob")
    upstream_legacy.reset()
    async with client:
        result = await client.call_tool("echo", {"text": "ok"})
        assert isinstance(result.content[0], types.TextContent) and result.content[0].text == "ok"
        with pytest.raises(Exception) as denied:
            await client.call_tool("delete_everything", {})
    assert "not permitted" in str(denied.value)
    names = [entry.get("name") for entry in upstream_legacy.recorded()]
    assert "echo" in names
    assert "delete_everything" not in names


async def test_legacy_initialize_advertises_the_ema_extension(legacy_gw: GatewayHarness) -> None:
    client, _ = await open_client(legacy_gw, "alice")
    async with client:
        capabilities = client.server_capabilities
    dumped = capabilities.model_dump(by_alias=True) if capabilities is not None else {}
    assert EMA_EXTENSION in (dumped.get("extensions") or {})
