"""The Node-side test tools work on their own, before any gateway is involved.

* server-everything (npm) starts on loopback and answers the official *Python* SDK client;
* ``xaa_client.mjs`` (official *TypeScript* SDK client) lists/calls tools without auth (``NO_AUTH=1``),
  reports failures as one JSON line, and drives the full ID-JAG flow against a throwaway in-test stub
  (IdP token exchange + RFC 9728/8414 metadata + jwt-bearer token endpoint + a tiny MCP responder).
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.support.loopback import free_port, serve_app
from tests.support.node import (
    EverythingServer,
    NodeClientError,
    ensure_node_modules,
    node_bin,
    run_xaa_client,
    start_everything,
)

EVERYTHING_TOOLS = {"echo", "get-sum", "get-env"}
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ID_JAG_TYPE = "urn:ietf:params:oauth:token-type:id-jag"


@pytest.fixture(scope="module")
def everything() -> Iterator[EverythingServer]:
    with start_everything() as server:
        yield server


@pytest.fixture(scope="module")
def everything_sse() -> Iterator[EverythingServer]:
    with start_everything("sse") as server:
        yield server


def test_node_and_packages_present() -> None:
    ensure_node_modules()
    assert node_bin()


def test_everything_listens_on_loopback_only(everything: EverythingServer) -> None:
    assert everything.host == "127.0.0.1"
    assert everything.port > 0
    assert everything.mcp_url == f"http://127.0.0.1:{everything.port}/mcp"
    other = _non_loopback_address()
    if other is not None:  # the bind address really is loopback, not the wildcard
        with pytest.raises(OSError), socket.create_connection((other, everything.port), timeout=2):
            pass


async def test_everything_answers_python_sdk(everything: EverythingServer) -> None:
    async with Client(streamable_http_client(everything.mcp_url), mode="legacy") as client:
        tools = {tool.name for tool in (await client.list_tools()).tools}
        result = await client.call_tool("echo", {"message": "from python"})
    assert EVERYTHING_TOOLS <= tools, everything.log_text()
    assert result.content[0].text == "Echo: from python"


async def test_node_client_without_auth_streamable_http(everything: EverythingServer) -> None:
    result = await run_xaa_client(
        {
            "MCP_URL": everything.mcp_url,
            "NO_AUTH": "1",
            "CALL_TOOL": "get-sum",
            "CALL_ARGS": json.dumps({"a": 2, "b": 3}),
            "TERMINATE_SESSION": "1",
        }
    )
    assert EVERYTHING_TOOLS <= set(result["tools"])
    assert result["call"]["content"][0]["text"] == "The sum of 2 and 3 is 5."
    assert result["assertionRequests"] == [] and result["tokenRequests"] == 0
    methods = [(r["method"], r["status"], r.get("rpc")) for r in result["requests"]]
    assert methods[0] == ("POST", 200, ["initialize"])
    assert ("POST", 200, ["tools/call"]) in methods
    assert methods[-1] == ("DELETE", 200, None)
    assert result["protocolVersion"] == "2025-11-25"


async def test_node_client_without_auth_sse(everything_sse: EverythingServer) -> None:
    result = await run_xaa_client({"MCP_URL": everything_sse.mcp_url, "TRANSPORT": "sse", "NO_AUTH": "1"})
    assert EVERYTHING_TOOLS <= set(result["tools"])
    assert result["requests"][0]["method"] == "GET"
    assert all("/message?sessionId=" in r["url"] for r in result["requests"][1:])


async def test_node_client_reports_failure_as_json() -> None:
    port = free_port()
    with pytest.raises(NodeClientError) as raised:
        await run_xaa_client({"MCP_URL": f"http://127.0.0.1:{port}/mcp", "NO_AUTH": "1"})
    assert raised.value.result is not None and raised.value.result["stage"] == "connect"
    result = await run_xaa_client({"MCP_URL": f"http://127.0.0.1:{port}/mcp", "NO_AUTH": "1"}, check=False)
    assert result["ok"] is False and result["_returncode"] == 1
    config = await run_xaa_client({"MCP_URL": "http://127.0.0.1:1/mcp"}, check=False)
    assert config["stage"] == "config" and "IDP_TOKEN_ENDPOINT" in config["error"]


# --------------------------------------------------------------------------------------------------
# Full ID-JAG flow of the TypeScript client against an in-test stub (no gateway yet).


@dataclass
class XaaStub:
    base_url: str = ""
    id_token: str = field(default_factory=lambda: "idtoken-" + secrets.token_urlsafe(24))
    idp_client_secret: str = field(default_factory=lambda: "idp-secret-" + secrets.token_urlsafe(12))
    client_secret: str = field(default_factory=lambda: "as-secret-" + secrets.token_urlsafe(12))
    issued: dict[str, str] = field(default_factory=dict)  # kind -> issued value
    exchanges: list[dict[str, str]] = field(default_factory=list)
    grants: list[dict[str, Any]] = field(default_factory=list)

    @property
    def resource(self) -> str:
        return self.base_url + "/mcp"

    def client_env(self) -> dict[str, str]:
        return {
            "MCP_URL": self.resource,
            "IDP_TOKEN_ENDPOINT": self.base_url + "/idp/token",
            "ID_TOKEN": self.id_token,
            "IDP_CLIENT_ID": "idp-client",
            "IDP_CLIENT_SECRET": self.idp_client_secret,
            "CLIENT_ID": "mcp-client",
            "CLIENT_SECRET": self.client_secret,
            "EXPECTED_ISSUER": self.base_url,
            "CALL_TOOL": "stub-echo",
            "CALL_ARGS": json.dumps({"text": "hi"}),
        }

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/idp/token", self.idp_token)
        app.router.add_get("/.well-known/oauth-protected-resource/mcp", self.prm)
        app.router.add_get("/.well-known/oauth-authorization-server", self.as_metadata)
        app.router.add_post("/token", self.token)
        app.router.add_route("*", "/mcp", self.mcp)
        return app

    async def idp_token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.exchanges.append({k: str(v) for k, v in form.items()})
        expected = {
            "grant_type": TOKEN_EXCHANGE,
            "requested_token_type": ID_JAG_TYPE,
            "subject_token": self.id_token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
            "client_id": "idp-client",
            "client_secret": self.idp_client_secret,
            "audience": self.base_url,
            "resource": self.resource,
        }
        if any(form.get(k) != v for k, v in expected.items()):
            return web.json_response({"error": "invalid_request"}, status=400)
        self.issued["id_jag"] = "jag-" + secrets.token_urlsafe(24)
        body = {"issued_token_type": ID_JAG_TYPE, "access_token": self.issued["id_jag"], "token_type": "N_A"}
        return web.json_response({**body, "expires_in": 300, "scope": form.get("scope", "")})

    async def prm(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "resource": self.resource,
                "authorization_servers": [self.base_url],
                "scopes_supported": ["mcp:tools"],
            }
        )

    async def as_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "issuer": self.base_url,
                "token_endpoint": self.base_url + "/token",
                "authorization_endpoint": self.base_url + "/authorize",
                "response_types_supported": ["code"],
                "grant_types_supported": [JWT_BEARER],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            }
        )

    async def token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        authorization = request.headers.get("Authorization", "")
        basic = base64.b64decode(authorization[6:]).decode() if authorization.startswith("Basic ") else None
        self.grants.append({"form": form, "basic": basic})
        if basic != f"mcp-client:{self.client_secret}":
            return web.json_response({"error": "invalid_client"}, status=401)
        if form.get("grant_type") != JWT_BEARER or form.get("assertion") != self.issued.get("id_jag"):
            return web.json_response({"error": "invalid_grant"}, status=400)
        self.issued["access_token"] = "at-" + secrets.token_urlsafe(24)
        return web.json_response(
            {"access_token": self.issued["access_token"], "token_type": "Bearer", "expires_in": 600}
        )

    async def mcp(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.issued.get('access_token')}":
            challenge = (
                f'Bearer resource_metadata="{self.base_url}/.well-known/oauth-protected-resource/mcp", '
                'scope="mcp:tools"'
            )
            return web.json_response({"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": challenge})
        if request.method != "POST":
            return web.Response(status=405, headers={"Allow": "POST"})
        message = await request.json()
        if "id" not in message:
            return web.Response(status=202)
        if message["method"] == "initialize":
            result: dict[str, Any] = {
                "protocolVersion": message["params"]["protocolVersion"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "xaa-stub", "version": "0"},
            }
        elif message["method"] == "tools/list":
            result = {"tools": [{"name": "stub-echo", "inputSchema": {"type": "object"}}]}
        elif message["method"] == "tools/call":
            result = {"content": [{"type": "text", "text": json.dumps(message["params"]["arguments"])}]}
        else:
            return web.json_response({"jsonrpc": "2.0", "id": message["id"], "error": {"code": -32601, "message": "?"}})
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result})


@pytest.fixture
async def xaa_stub() -> AsyncIterator[XaaStub]:
    stub = XaaStub()
    async with serve_app(stub.app()) as base_url:
        stub.base_url = base_url
        yield stub


async def test_node_client_full_id_jag_flow_against_stub(xaa_stub: XaaStub) -> None:
    result = await run_xaa_client(xaa_stub.client_env())

    assert result["tools"] == ["stub-echo"]
    assert result["call"]["content"][0]["text"] == '{"text": "hi"}'
    assert result["assertionRequests"] == [
        {"authorizationServerUrl": xaa_stub.base_url, "resourceUrl": xaa_stub.resource, "scope": "mcp:tools"}
    ]
    assert result["tokenRequests"] == 1 and result["tokenExchangeRequests"] == 1
    # leg 2 as the IdP saw it (values were checked by the stub)
    assert len(xaa_stub.exchanges) == 1 and xaa_stub.exchanges[0]["scope"] == "mcp:tools"
    # leg 3: client_secret_basic, the provider's scope and the PRM resource
    assert xaa_stub.grants == [
        {
            "form": {
                "grant_type": JWT_BEARER,
                "assertion": xaa_stub.issued["id_jag"],
                "scope": "mcp:tools",
                "resource": xaa_stub.resource,
            },
            "basic": f"mcp-client:{xaa_stub.client_secret}",
        }
    ]
    # discovery order as recorded by the wrapped fetch
    trail = [(r["method"], r["url"].removeprefix(xaa_stub.base_url), r["status"]) for r in result["requests"]]
    assert trail[:6] == [
        ("POST", "/mcp", 401),
        ("GET", "/.well-known/oauth-protected-resource/mcp", 200),
        ("GET", "/.well-known/oauth-authorization-server", 200),
        ("POST", "/idp/token", 200),
        ("POST", "/token", 200),
        ("POST", "/mcp", 200),
    ]
    assert result["requests"][0]["wwwAuthenticate"].startswith("Bearer resource_metadata=")
    assert result["requests"][4]["authScheme"] == "Basic"
    assert result["requests"][5]["authScheme"] == "Bearer"
    # nothing secret leaks into the output line
    printed = json.dumps(result)
    for secret in (
        xaa_stub.id_token,
        xaa_stub.idp_client_secret,
        xaa_stub.client_secret,
        xaa_stub.issued["id_jag"],
        xaa_stub.issued["access_token"],
    ):
        assert secret not in printed


async def test_node_client_reports_idp_rejection(xaa_stub: XaaStub) -> None:
    env = {**xaa_stub.client_env(), "ID_TOKEN": "idtoken-wrong"}
    result = await run_xaa_client(env, check=False)
    assert result["ok"] is False
    assert result["stage"] == "assertion"
    assert "invalid_request" in result["error"]
    assert result["tokenRequests"] == 0 and result["tokenExchangeRequests"] == 1


def _non_loopback_address() -> str | None:
    """This host's outbound IPv4 address (None if it has none), to show the server is not reachable there."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1; a UDP connect sends no packet
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address
