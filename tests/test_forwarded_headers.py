"""What a client may not tell an upstream: forwarding and identity headers (config
``strip_request_headers``), checked through the gateway against the real SDK upstream, whose
``headers_seen`` tool returns the headers of the request that carried the call."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import aiohttp
import pytest

from gateway.config import DEFAULT_STRIP_REQUEST_HEADERS, ConfigError, describe, parse_config
from gateway.devidp import DevIdentityProvider
from tests.support.harness import GatewayHarness, running_gateway
from tests.support.mcp_http import McpHttp, connect, tool_call, tool_text
from tests.support.upstreams import RunningUpstream

FORGED = {
    "Host": "evil.example.test",
    "X-Forwarded-For": "203.0.113.7",
    "X-Forwarded-Host": "admin.internal",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-User": "admin",
    "X-Forwarded-Email": "admin@example.com",
    "Forwarded": "for=203.0.113.7;host=admin.internal;proto=https",
    "X-Real-IP": "10.0.0.1",
    "X-Client-IP": "10.0.0.2",
    "True-Client-IP": "10.0.0.3",
    "CF-Connecting-IP": "10.0.0.4",
    "X-Remote-User": "admin",
    "Remote-User": "admin",
    "X-User": "admin",
    "X-User-Id": "0",
    "X-Email": "admin@example.com",
    "X-Auth-Request-User": "admin",
    "x-auth-request-email": "admin@example.com",
    "X-MCP-Identity": "admin",
    "X-Original-URL": "/admin",
}


async def headers_seen(client: McpHttp, **headers: str) -> dict[str, str]:
    return json.loads(tool_text(await client.call(tool_call(9, "headers_seen"), **headers)))


async def test_client_forwarding_and_identity_headers_never_reach_the_upstream(
    gw: GatewayHarness, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    client = await connect(gw, http, "json")
    await client.initialize()
    seen = await headers_seen(client, **FORGED, **{"X-Trace-Note": "kept"})
    assert seen["x-trace-note"] == "kept"  # an ordinary end-to-end header still passes
    assert seen["host"] == upstream_json.host_port
    # The gateway's own statements: the peer it saw, and the public origin from its config.
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-host"] == urlsplit(gw.config.public_url).netloc
    assert seen["x-forwarded-proto"] == urlsplit(gw.config.public_url).scheme
    leaked = {name.lower() for name in FORGED if name not in ("Host",)} - {
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
    }
    assert leaked.isdisjoint(seen), sorted(leaked & set(seen))
    assert "admin" not in json.dumps(seen)


async def test_a_custom_list_replaces_the_default_but_forwarding_headers_stay_stripped(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    route = {
        "name": "custom",
        "path": "/custom/mcp",
        "upstream": upstream_json.mcp_url,
        "upstream_headers": {"X-Tenant-Id": "acme"},
    }
    async with running_gateway(idp, [route], strip_request_headers=["X-Tenant-*"]) as gateway:
        client = await connect(gateway, http, "custom")
        await client.initialize()
        seen = await headers_seen(
            client,
            **{
                "X-Tenant-Id": "forged",
                "X-Tenant-Region": "forged",
                "X-Remote-User": "not-in-the-custom-list",
                "X-Forwarded-User": "admin",
                "X-Forwarded-For": "203.0.113.7",
                "Forwarded": "for=203.0.113.7",
                "X-Real-IP": "10.0.0.1",
            },
        )
    assert seen["x-tenant-id"] == "acme"  # the route's configured header is added after stripping
    assert "x-tenant-region" not in seen
    assert seen["x-remote-user"] == "not-in-the-custom-list"
    assert {"x-forwarded-user", "forwarded", "x-real-ip"}.isdisjoint(seen)
    assert seen["x-forwarded-for"] == "127.0.0.1"


BASE = {
    "public_url": "https://mcp.example.com",
    "authorization": {
        "clients": [{"client_id": "agent", "client_secret": "agent-secret-0123456789"}],
        "identity_providers": [{"issuer": "https://idp.example.com"}],
    },
    "routes": [{"name": "r", "path": "/r/mcp", "upstream": "http://upstream:3000/mcp"}],
}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("X-Auth-*", "must be a list of non-empty strings"),
        (["X-Auth-*", ""], "must be a list of non-empty strings"),
        (["*"], "'*' is not a header name"),
        (["X-*-User"], "'X-*-User' is not a header name"),
        (["X Auth"], "'X Auth' is not a header name"),
        (["Mcp-*"], "'Mcp-*' would strip Mcp-Session-Id, which MCP needs"),
        (["content-type"], "'content-type' would strip Content-Type, which MCP needs"),
        (["Last-Event-*"], "would strip Last-Event-ID"),
    ],
)
def test_invalid_strip_request_headers_are_refused_with_the_key_path(value: object, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, "strip_request_headers": value}, source="gw.yaml")
    assert caught.value.key == "strip_request_headers"
    assert problem in caught.value.problem


def test_strip_request_headers_default_and_describe() -> None:
    assert parse_config(BASE).strip_request_headers == DEFAULT_STRIP_REQUEST_HEADERS
    config = parse_config({**BASE, "strip_request_headers": ["X-Tenant-*"]})
    assert config.strip_request_headers == ("X-Tenant-*",)
    lines: list[str] = []
    describe(config, emit=lines.append)
    assert "stripped request headers: X-Forwarded-*, Forwarded, X-Real-IP, X-Tenant-*" in lines
