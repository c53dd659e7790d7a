"""The signed identity header (``routes[].identity_header``): the real SDK upstream's ``headers_seen``
tool shows what arrived, and the README's own verification snippets (Python with python-jose, Node with
``jose``) verify it against the gateway's ``/oauth2/jwks``, run as separate processes."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, IdentityHeaderConfig, describe, load_config, parse_config
from gateway.devidp import DevIdentityProvider
from gateway.oauth.identity import SubjectIdentity
from gateway.urls import origin_of
from tests.support.harness import CLIENT_ID, GatewayHarness, running_gateway
from tests.support.mcp_http import McpHttp, connect, read_response, tool_call, tool_text
from tests.support.node import NODE_DIR, NODE_MODULES, node_bin
from tests.support.upstreams import RunningUpstream

README = Path(__file__).resolve().parents[1] / "README.md"
WAIT = 30.0


def readme_snippet(marker: str, gateway: str, audience: str) -> str:
    """The code block after ``<!-- marker -->`` in the README, pointed at this gateway and audience."""
    match = re.search(rf"<!-- {marker} -->\n```\w+\n(.*?)```", README.read_text(), re.DOTALL)
    assert match is not None, marker
    code = match.group(1)
    for placeholder, value in (("https://mcp.example.com", gateway), ("https://linear-internal.example.com", audience)):
        assert code.count(f'"{placeholder}"') == 1, placeholder
        code = code.replace(f'"{placeholder}"', json.dumps(value))
    return code


async def run_verifier(argv: list[str], cwd: Path | None = None) -> tuple[int, str]:
    # A child process, not a thread: the gateway serving /oauth2/jwks runs in this event loop.
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), WAIT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode()


async def verify_in_python(gateway: GatewayHarness, audience: str, token: str) -> tuple[int, str]:
    code = readme_snippet("identity-header-python", gateway.issuer, audience)
    code += "\nimport sys\nprint(json.dumps(caller(sys.argv[1])))\n"
    return await run_verifier([sys.executable, "-c", code, token])


async def verify_in_node(gateway: GatewayHarness, audience: str, token: str) -> tuple[int, str]:
    # jose comes with the MCP SDKs in tests/node (not pinned there itself). Node 20 runs no TypeScript,
    # so the snippet's one type annotation is removed.
    assert (NODE_MODULES / "jose" / "package.json").is_file(), "jose is missing from tests/node/node_modules"
    code = readme_snippet("identity-header-typescript", gateway.issuer, audience)
    code = code.replace("headerValue: string", "headerValue")
    code += "\nconsole.log(JSON.stringify(await caller(process.argv[1])));\n"
    # An --eval module resolves bare imports from the working directory.
    return await run_verifier([node_bin(), "--input-type=module", "--eval", code, token], cwd=NODE_DIR)


async def headers_seen(client: McpHttp, **headers: str) -> dict[str, str]:
    return json.loads(tool_text(await client.call(tool_call(9, "headers_seen"), **headers)))


def route(upstream: RunningUpstream, name: str, **options: Any) -> dict[str, Any]:
    return {"name": name, "path": f"/{name}/mcp", "upstream": upstream.mcp_url, **options}


async def test_the_upstream_gets_a_verifiable_identity_and_never_the_clients_header(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    routes = [route(upstream_json, "linear", identity_header={}), route(upstream_json, "plain")]
    async with running_gateway(idp, routes) as gateway:
        client = await connect(gateway, http, "linear", email="alice@example.com")
        await client.initialize()
        forged = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9."
        async with client.post(tool_call(9, "headers_seen"), **{"X-MCP-Identity": forged}) as response:
            request_id = response.headers["X-Request-Id"]
            seen = json.loads(tool_text(await read_response(response, 9)))
        token = seen["x-mcp-identity"]
        assert forged not in token
        audience = origin_of(upstream_json.mcp_url)
        status, out = await verify_in_python(gateway, audience, token)
        assert status == 0, out
        claims = json.loads(out)
        status, out = await verify_in_node(gateway, audience, token)
        assert status == 0, out
        assert json.loads(out) == claims
        # A route without the option sends none, and still strips a client's (the default strip list).
        plain = await connect(gateway, http, "plain")
        await plain.initialize()
        assert "x-mcp-identity" not in await headers_seen(plain, **{"X-MCP-Identity": forged})
    assert claims["iss"] == gateway.issuer
    assert claims["aud"] == audience
    assert claims["sub"] == SubjectIdentity(idp.issuer, None, "alice").key
    assert (claims["idp_sub"], claims["idp"]) == ("alice", idp.issuer)
    assert claims["email"] == "alice@example.com"
    assert claims["groups"] == ["engineering", "support"]
    assert (claims["client_id"], claims["route"]) == (CLIENT_ID, "linear")
    assert claims["request_id"] == request_id
    assert claims["exp"] - claims["iat"] == 60
    assert len(claims["jti"]) >= 16


async def test_a_custom_name_is_stripped_even_when_the_strip_list_omits_it_and_the_verifier_checks_aud(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    header = {"name": "X-Caller", "ttl_seconds": 5, "audience": "https://tools.internal.example"}
    routes = [route(upstream_json, "tools", identity_header=header)]
    async with running_gateway(idp, routes, strip_request_headers=["X-Unrelated"]) as gateway:
        client = await connect(gateway, http, "tools", user="bob")
        await client.initialize()
        first = (await headers_seen(client, **{"X-Caller": "admin"}))["x-caller"]
        second = (await headers_seen(client))["x-caller"]
        status, out = await verify_in_python(gateway, header["audience"], first)
        assert status == 0, out
        claims = json.loads(out)
        assert (claims["idp_sub"], claims["exp"] - claims["iat"], "email" in claims) == ("bob", 5, False)
        assert json.loads((await verify_in_python(gateway, header["audience"], second))[1])["jti"] != claims["jti"]
        # The snippets refuse a token meant for another upstream, and the gateway's own access token.
        status, out = await verify_in_python(gateway, origin_of(upstream_json.mcp_url), first)
        assert status != 0 and "audience" in out.lower(), out
        status, out = await verify_in_node(gateway, "https://other.example", first)
        assert status != 0 and "aud" in out, out
        status, out = await verify_in_python(gateway, header["audience"], client.token)
        assert status != 0 and "not a gateway identity token" in out, out
        # ...and the gateway never takes an identity token as a bearer token (typ is not at+jwt).
        async with http.post(
            gateway.route_url("tools"), json=tool_call(1, "echo"), headers={"Authorization": f"Bearer {first}"}
        ) as response:
            assert response.status == 401


BASE = {
    "public_url": "https://mcp.example.com",
    "authorization": {
        "clients": [{"client_id": "agent", "client_secret": "agent-secret-0123456789"}],
        "identity_providers": [{"issuer": "https://idp.example.com"}],
    },
}


def config_with(identity_header: Any, **route: Any) -> dict[str, Any]:
    item = {"name": "r", "path": "/r/mcp", "upstream": "http://Upstream:3000/mcp", **route}
    return {**BASE, "routes": [{**item, "identity_header": identity_header}]}


def test_defaults_off_by_default_and_shown_by_check() -> None:
    header = parse_config(config_with({})).routes[0].identity_header
    assert header is not None
    assert (header.name, header.ttl_seconds, header.audience) == ("X-MCP-Identity", 60, "http://upstream:3000")
    without = {k: v for k, v in config_with({})["routes"][0].items() if k != "identity_header"}
    assert parse_config({**BASE, "routes": [without]}).routes[0].identity_header is None
    lines: list[str] = []
    describe(parse_config(config_with({"name": "X-Caller"})), emit=lines.append)
    assert any("identity_header=X-Caller(aud=http://upstream:3000,ttl=60s)" in line for line in lines), lines


@pytest.mark.parametrize(
    ("identity_header", "route", "problem"),
    [
        (None, {}, "routes[0].identity_header: is empty"),
        ({"name": "Authorization"}, {}, "routes[0].identity_header.name: 'Authorization' is managed"),
        ({"name": "mcp-session-id"}, {}, "routes[0].identity_header.name: 'mcp-session-id' is managed"),
        ({"name": "X-Forwarded-User"}, {}, "routes[0].identity_header.name: 'X-Forwarded-User' is managed"),
        ({"name": "X Bad"}, {}, "routes[0].identity_header.name: 'X Bad' is not a valid HTTP header name"),
        ({"name": "X-Key"}, {"upstream_headers": {"x-key": "v"}}, "'X-Key' is also set in upstream_headers"),
        ({"ttl_seconds": 0}, {}, "routes[0].identity_header.ttl_seconds: must be between 1 and 3600"),
        ({"audience": ""}, {}, "routes[0].identity_header.audience: must be a non-empty string"),
        ({"nmae": "X-Id"}, {}, "routes[0].identity_header.nmae: unknown key"),
    ],
)
def test_config_errors_name_the_key(identity_header: Any, route: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with(identity_header, **route), source="gw.yaml")
    assert str(caught.value).startswith("gw.yaml: ") and problem in str(caught.value), str(caught.value)


def test_the_config_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_CLIENT_SECRET", "example-secret-0123456789")
    (route,) = load_config(Path(__file__).resolve().parents[1] / "config" / "identity-header.yaml").routes
    assert route.identity_header == IdentityHeaderConfig("X-MCP-Identity", 60, "https://linear-internal.example.com")
