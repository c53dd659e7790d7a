"""``mcp-gateway demo``: the whole SEP-990 flow on loopback, in one process, narrated.

It starts a demo MCP server with no authorization (the "legacy" upstream), a development IdP (NOT
for production), and the gateway in front of the upstream; then acts as an enterprise MCP client:
SSO at the IdP (ID token) -> RFC 8693 token exchange for an ID-JAG -> RFC 7523 jwt-bearer grant at
the gateway -> MCP ``initialize``, ``tools/list`` and ``tools/call`` through the gateway. Tokens are
shown decoded (claims only); the signatures are left out so nothing printed is a usable credential.
"""

from __future__ import annotations

import asyncio
import json
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from jose import jwt

from gateway.app import Gateway, bind_socket, start_gateway
from gateway.config import GatewayConfig, parse_config
from gateway.demo_upstream import start_demo_upstream
from gateway.devidp import DevIdentityProvider

DEMO_USER = "alice"
DEMO_PASSWORD = "alice-password"
DEMO_CLIENT_ID = "demo-agent"
DEMO_CLIENT_SECRET = "demo-agent-secret"
ROUTE_PATH = "/demo/mcp"
PROTOCOL_VERSION = "2025-11-25"


class DemoFailed(Exception):
    """A step of the flow failed; the message says which and why."""


@dataclass
class DemoServers:
    gateway_url: str
    idp_issuer: str
    upstream_url: str
    mcp_url: str
    config: GatewayConfig
    close: Callable[[], Any]
    gateway: Gateway
    idp: DevIdentityProvider


def demo_config(public_url: str, idp_issuer: str, upstream_url: str, audit_sink: str = "stdout") -> GatewayConfig:
    return parse_config(
        {
            "public_url": public_url,
            "audit": {"sink": audit_sink},
            "authorization": {
                "clients": [{"client_id": DEMO_CLIENT_ID, "client_secret": DEMO_CLIENT_SECRET}],
                "identity_providers": [{"issuer": idp_issuer}],
            },
            "routes": [
                {
                    "name": "demo",
                    "path": ROUTE_PATH,
                    "upstream": upstream_url,
                    "allow_groups": ["engineering", "support"],
                }
            ],
        },
        source="<demo>",
    )


async def start_demo_servers(host: str = "127.0.0.1", port: int = 8080, audit_sink: str | None = None) -> DemoServers:
    # The gateway's port first: if it is taken, fail before the IdP and upstream start (and log),
    # so a busy port is reported in one line.
    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        raise DemoFailed(f"cannot listen on {host}:{port}: {exc.strerror} (try --port 0)") from None
    upstream_runner, upstream_url = await start_demo_upstream(host, 0)
    idp = DevIdentityProvider()
    idp_issuer = await idp.start(host, 0)
    bound = sock.getsockname()
    public_url = f"http://{host}:{bound[1]}"
    # The audit trail goes to a file so it does not interleave with the narration.
    audit_sink = audit_sink or str(Path(tempfile.mkdtemp(prefix="mcp-gateway-demo-")) / "audit.jsonl")
    config = demo_config(public_url, idp_issuer, upstream_url, audit_sink)
    gateway = Gateway(config)
    gateway_runner, _ = await start_gateway(gateway, sock=sock)

    async def close() -> None:
        await gateway_runner.cleanup()
        await idp.stop()
        await upstream_runner.cleanup()

    return DemoServers(public_url, idp_issuer, upstream_url, public_url + ROUTE_PATH, config, close, gateway, idp)


def _claims(token: str) -> dict[str, Any]:
    return jwt.get_unverified_claims(token)


def _header(token: str) -> dict[str, Any]:
    return jwt.get_unverified_header(token)


class Narrator:
    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self.step = 0

    def title(self, text: str) -> None:
        self.step += 1
        self.emit(f"\n[{self.step}] {text}")

    def show(self, label: str, value: Any) -> None:
        rendered = json.dumps(value, indent=2, sort_keys=True) if not isinstance(value, str) else value
        self.emit(f"    {label}: " + rendered.replace("\n", "\n    "))


async def _post_form(session: aiohttp.ClientSession, url: str, form: dict[str, str]) -> dict[str, Any]:
    async with session.post(url, data=form) as response:
        body = await response.json(content_type=None)
        if response.status != 200:
            raise DemoFailed(f"POST {url} -> {response.status}: {body}")
        return body


async def run_flow(servers: DemoServers, emit: Callable[[str], None] = print) -> dict[str, Any]:
    """Run SEP-990 end to end as a client would; returns the tool results (used by tests)."""
    say = Narrator(emit)
    idp_token_endpoint = servers.idp_issuer + "/token"
    route = servers.config.routes[0]
    async with aiohttp.ClientSession() as http:
        say.title("Without a token the gateway refuses, and says where to get one (RFC 9728)")
        async with http.post(servers.mcp_url, json={"jsonrpc": "2.0", "id": 0, "method": "ping"}) as response:
            say.show("status", response.status)
            say.show("WWW-Authenticate", response.headers.get("WWW-Authenticate", "(missing)"))
            if response.status != 401:
                raise DemoFailed(f"expected 401 without a token, got {response.status}")

        say.title(f"SSO: {DEMO_USER} signs in at the IdP ({servers.idp_issuer}) and the client gets an ID token")
        login = await _post_form(
            http,
            idp_token_endpoint,
            {
                "grant_type": "password",
                "username": DEMO_USER,
                "password": DEMO_PASSWORD,
                "client_id": DEMO_CLIENT_ID,
                "client_secret": DEMO_CLIENT_SECRET,
            },
        )
        id_token = login["id_token"]
        say.show("ID token claims", _claims(id_token))

        say.title("Token exchange at the IdP (RFC 8693): ID token -> ID-JAG for the gateway")
        exchange = await _post_form(
            http,
            idp_token_endpoint,
            {
                "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "requested_token_type": "urn:ietf:params:oauth:token-type:id-jag",
                "audience": servers.config.authorization.issuer,
                "resource": route.resource,
                "scope": "mcp",
                "subject_token": id_token,
                "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
                "client_id": DEMO_CLIENT_ID,
                "client_secret": DEMO_CLIENT_SECRET,
            },
        )
        id_jag = exchange["access_token"]
        say.show("ID-JAG header", _header(id_jag))
        say.show("ID-JAG claims", _claims(id_jag))

        say.title("JWT-bearer grant at the gateway (RFC 7523): ID-JAG -> access token, no consent screen")
        grant = await _post_form(
            http,
            servers.gateway_url + "/oauth2/token",
            {
                "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion": id_jag,
                "resource": route.resource,
                "client_id": DEMO_CLIENT_ID,
                "client_secret": DEMO_CLIENT_SECRET,
            },
        )
        access_token = grant["access_token"]
        say.show("token response", {k: v for k, v in grant.items() if k != "access_token"})
        say.show("access token claims", _claims(access_token))

        say.title(f"MCP through the gateway at {servers.mcp_url}")
        mcp = McpSession(http, servers.mcp_url, access_token)
        init = await mcp.request(
            "initialize",
            {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "mcp-gateway-demo", "version": "0"},
            },
        )
        say.show("initialize -> server", init.get("serverInfo"))
        say.show("capabilities.extensions", init.get("capabilities", {}).get("extensions"))
        await mcp.notify("notifications/initialized")
        tools = await mcp.request("tools/list", {})
        say.show("tools/list", [t["name"] for t in tools.get("tools", [])])
        echo = await mcp.request("tools/call", {"name": "echo", "arguments": {"text": "hello through the gateway"}})
        say.show("tools/call echo", echo.get("content"))
        whoami = await mcp.request("tools/call", {"name": "whoami", "arguments": {}})
        say.show("tools/call whoami (what the upstream saw)", whoami.get("structuredContent") or whoami.get("content"))
        await mcp.close()
    return {"tools": tools, "echo": echo, "whoami": whoami, "initialize": init}


class McpSession:
    """Just enough of a Streamable HTTP client (2025-11-25) to narrate the demo."""

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        self._http = http
        self._url = url
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        self._next_id = 1

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        message = {"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": params}
        self._next_id += 1
        async with self._http.post(self._url, json=message, headers=self._headers) as response:
            if response.status != 200:
                raise DemoFailed(f"{method} -> HTTP {response.status}: {await response.text()}")
            if "Mcp-Session-Id" in response.headers:
                self._headers["Mcp-Session-Id"] = response.headers["Mcp-Session-Id"]
                self._headers["MCP-Protocol-Version"] = PROTOCOL_VERSION
            body = await response.json(content_type=None)
        if "error" in body:
            raise DemoFailed(f"{method} -> JSON-RPC error {body['error']}")
        return body["result"]

    async def notify(self, method: str) -> None:
        message = {"jsonrpc": "2.0", "method": method}
        async with self._http.post(self._url, json=message, headers=self._headers) as response:
            if response.status not in (200, 202):
                raise DemoFailed(f"{method} -> HTTP {response.status}")

    async def close(self) -> None:
        async with self._http.delete(self._url, headers=self._headers):
            pass


async def run_demo(host: str, port: int, *, once: bool, emit: Callable[[str], None] = print) -> None:
    servers = await start_demo_servers(host, port)
    try:
        emit("MCP gateway demo (everything on loopback; the IdP is a DEVELOPMENT IdP, not for production)")
        emit(f"    upstream MCP server (no auth): {servers.upstream_url}")
        emit(f"    development IdP:               {servers.idp_issuer}")
        emit(f"    gateway:                       {servers.gateway_url}  (route {ROUTE_PATH})")
        await run_flow(servers, emit)
        emit("\nThe SEP-990 flow succeeded.")
        emit(f"Audit trail (one JSON line per decision): {servers.config.audit_sink}")
        if once:
            return
        emit(
            f"\nStill serving. Point an MCP client at {servers.mcp_url} with issuer {servers.gateway_url}, "
            f"client {DEMO_CLIENT_ID} / {DEMO_CLIENT_SECRET}, and ID-JAGs from {servers.idp_issuer}/token "
            f"(users alice, bob, carol; password <name>-password). Ctrl-C to stop."
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await servers.close()
