"""End to end with the official SDK clients, configured only as an enterprise client would be:
the gateway's issuer, a client id/secret, and ID-JAGs from the IdP (SPEC §6).

The Python client (mcp 2.x ``IdentityAssertionOAuthProvider``) fetches a fresh ID-JAG through a real
RFC 8693 exchange at the loopback IdP; the TypeScript client (``CrossAppAccessProvider`` +
``requestJwtAuthorizationGrant``) additionally discovers everything from the gateway's 401 (RFC 9728).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from mcp import Client
from mcp.client.auth.extensions.identity_assertion import IdentityAssertionOAuthProvider
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.support.harness import CLIENT_ID, CLIENT_SECRET, IDP_CLIENT_ID, IDP_CLIENT_SECRET, GatewayHarness
from tests.support.node import run_xaa_client
from tests.support.sdk import MemoryStorage, exchange_at_idp, text_of


@asynccontextmanager
async def sdk_client(
    gw: GatewayHarness,
    route: str,
    *,
    mode: str = "legacy",
    auth_method: str = "client_secret_post",
    scope: str | None = None,
    user: str = "alice",
    calls: list[tuple[str, str]] | None = None,
) -> AsyncIterator[Client]:
    url = gw.route_url(route) + ("/sse" if route == "legacy" else "")

    async def assertion_provider(audience: str, resource: str) -> str:
        if calls is not None:
            calls.append((audience, resource))
        return await exchange_at_idp(gw.idp, audience, resource, user)

    provider = IdentityAssertionOAuthProvider(
        server_url=url,
        storage=MemoryStorage(),
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        issuer=gw.issuer,
        assertion_provider=assertion_provider,
        scope=scope,
        token_endpoint_auth_method=auth_method,  # type: ignore[arg-type]
    )
    if route == "legacy":
        async with Client(sse_client(url, auth=provider), mode=mode) as client:
            yield client
        return
    async with create_mcp_http_client(auth=provider) as http_client:
        async with Client(streamable_http_client(url, http_client=http_client), mode=mode) as client:
            yield client


@pytest.mark.parametrize("route", ["json", "sse", "legacy"])
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_python_sdk_client_lists_and_calls_tools(gw: GatewayHarness, route: str, mode: str) -> None:
    calls: list[tuple[str, str]] = []
    async with sdk_client(gw, route, mode=mode, calls=calls) as client:
        tools = await client.list_tools()
        assert {"echo", "add", "headers_seen"} <= {t.name for t in tools.tools}
        assert text_of(await client.call_tool("echo", {"text": "through the gateway"})) == "through the gateway"
        assert text_of(await client.call_tool("add", {"a": 20, "b": 22})) == "42"
    # The client asked for exactly one ID-JAG, for our issuer and this route's resource.
    assert len(calls) == 1
    audience, resource = calls[0]
    assert audience == gw.issuer
    assert resource.startswith(gw.resource(route))


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
async def test_python_sdk_client_both_client_auth_methods(gw: GatewayHarness, auth_method: str) -> None:
    async with sdk_client(gw, "json", auth_method=auth_method) as client:
        assert text_of(await client.call_tool("echo", {"text": auth_method})) == auth_method


async def test_upstream_never_sees_the_client_token(gw: GatewayHarness) -> None:
    async with sdk_client(gw, "sse") as client:
        result = await client.call_tool("headers_seen", {})
    seen: dict[str, Any] = result.structured_content or {}
    headers = seen.get("result", seen)
    assert "authorization" not in {k.lower() for k in headers}
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == gw.url.removeprefix("http://")


async def test_python_sdk_client_on_server_everything(gw: GatewayHarness) -> None:
    async with sdk_client(gw, "everything") as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert "echo" in tools
        result = await client.call_tool("echo", {"message": "hi everything"})
        assert "hi everything" in text_of(result)


async def test_python_sdk_client_refused_for_user_outside_allow_groups(gw: GatewayHarness) -> None:
    with pytest.raises(Exception) as caught:
        async with sdk_client(gw, "eng", user="bob") as client:
            await client.list_tools()
    assert "invalid_grant" in _flatten(caught.value)


def _flatten(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return " ".join(_flatten(e) for e in exc.exceptions)
    return str(exc)


def _node_env(gw: GatewayHarness, route: str, **extra: str) -> dict[str, str]:
    return {
        "MCP_URL": gw.route_url(route) + ("/sse" if route == "legacy" else ""),
        "TRANSPORT": "sse" if route == "legacy" else "streamable-http",
        "IDP_TOKEN_ENDPOINT": gw.idp.token_endpoint,
        "ID_TOKEN": gw.idp.issue_id_token("alice", IDP_CLIENT_ID),
        "IDP_CLIENT_ID": IDP_CLIENT_ID,
        "IDP_CLIENT_SECRET": IDP_CLIENT_SECRET,
        "CLIENT_ID": CLIENT_ID,
        "CLIENT_SECRET": CLIENT_SECRET,
        "EXPECTED_ISSUER": gw.issuer,
        **extra,
    }


@pytest.mark.parametrize("route", ["json", "sse", "legacy", "everything"])
async def test_typescript_sdk_client_discovers_and_calls_tools(gw: GatewayHarness, route: str) -> None:
    args = '{"message": "from node"}' if route == "everything" else '{"text": "from node"}'
    result = await run_xaa_client(_node_env(gw, route, CALL_TOOL="echo", CALL_ARGS=args))
    assert result["ok"] is True
    assert "echo" in result["tools"]
    assert "from node" in result["call"]["content"][0]["text"]
    # The TS client learned the AS and the resource only from our 401 + RFC 9728 metadata.
    (assertion,) = result["assertionRequests"]
    assert assertion["authorizationServerUrl"] == gw.issuer
    assert gw.resource(route) in assertion["resourceUrl"]
    assert result["tokenRequests"] == 1


async def test_typescript_sdk_client_refused_with_wrong_secret(gw: GatewayHarness) -> None:
    result = await run_xaa_client(_node_env(gw, "json", CLIENT_SECRET="wrong-secret-0123456789"), check=False)
    assert result["ok"] is False
    assert result.get("errorCode") == "invalid_client" or "client authentication failed" in result["error"], result
