"""Shared real parts: IdPs, upstream MCP servers, and one gateway in front of them all."""

from __future__ import annotations

import pytest

from gateway.devidp import DevIdentityProvider
from tests.support.harness import IDP_CLIENTS, GatewayHarness, start_harness
from tests.support.node import start_everything
from tests.support.upstreams import RunningUpstream, start_upstream


@pytest.fixture(scope="session")
async def idp():
    provider = DevIdentityProvider(algorithm="ES256", clients=IDP_CLIENTS)
    await provider.start()
    yield provider
    await provider.stop()


@pytest.fixture(scope="session")
async def idp_rsa():
    provider = DevIdentityProvider(algorithm="RS256", clients=IDP_CLIENTS)
    await provider.start()
    yield provider
    await provider.stop()


@pytest.fixture(scope="session")
def upstream_json() -> RunningUpstream:
    with start_upstream("streamable-json") as upstream:
        yield upstream


@pytest.fixture(scope="session")
def upstream_sse() -> RunningUpstream:
    with start_upstream("streamable-sse") as upstream:
        yield upstream


@pytest.fixture(scope="session")
def upstream_legacy() -> RunningUpstream:
    with start_upstream("sse") as upstream:
        yield upstream


@pytest.fixture(scope="session")
def everything():
    with start_everything() as server:
        yield server


@pytest.fixture(scope="session")
async def gw(idp, idp_rsa, upstream_json, upstream_sse, upstream_legacy, everything) -> GatewayHarness:
    """The gateway under test, with one route per kind of upstream."""
    routes = [
        {"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url},
        {"name": "sse", "path": "/sse/mcp", "upstream": upstream_sse.mcp_url},
        {"name": "legacy", "path": "/legacy", "upstream": upstream_legacy.base_url, "transport": "sse"},
        {"name": "everything", "path": "/everything/mcp", "upstream": everything.mcp_url},
        {
            "name": "eng",
            "path": "/eng/mcp",
            "upstream": upstream_json.mcp_url,
            "allow_groups": ["engineering"],
            "scopes": ["mcp", "mcp:admin"],
        },
        {"name": "dead", "path": "/dead/mcp", "upstream": "http://127.0.0.1:9/mcp"},
    ]
    harness = await start_harness(idp, routes, extra_idps=[idp_rsa])
    yield harness
    await harness.runner.cleanup()
