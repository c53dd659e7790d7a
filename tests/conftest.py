"""Shared real parts: IdPs, upstream MCP servers, and one gateway in front of them all."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from gateway.devidp import DevIdentityProvider
from tests.support.harness import IDP_CLIENTS, GatewayHarness, running_gateway
from tests.support.node import start_everything
from tests.support.upstreams import RunningUpstream, start_upstream


@asynccontextmanager
async def running_idp(algorithm: str) -> AsyncIterator[DevIdentityProvider]:
    provider = DevIdentityProvider(algorithm=algorithm, clients=IDP_CLIENTS)
    await provider.start()
    try:
        yield provider
    finally:
        await provider.stop()


@pytest.fixture(scope="session")
async def idp():
    async with running_idp("ES256") as provider:
        yield provider


@pytest.fixture(scope="session")
async def idp_rsa():
    async with running_idp("RS256") as provider:
        yield provider


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
    async with running_gateway(idp, routes, extra_idps=[idp_rsa]) as harness:
        yield harness


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain client session (test_proxy.py has its own, which also checks that no 500 is seen)."""
    async with aiohttp.ClientSession() as session:
        yield session
