"""No response reveals software versions: aiohttp's default ``Server: Python/3.x aiohttp/3.y`` (and an
upstream's own ``Server`` header on proxied answers) become ``Server: mcp-gateway``."""

from __future__ import annotations

import aiohttp

from gateway.devidp import DevIdentityProvider
from tests.support.harness import running_gateway
from tests.support.loopback import free_port
from tests.support.mcp_http import open_session, tool_call
from tests.support.upstreams import RunningUpstream


async def test_every_answer_names_the_product_without_versions(
    idp: DevIdentityProvider, upstream_json: RunningUpstream, http: aiohttp.ClientSession
) -> None:
    metrics_port = free_port()
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    async with running_gateway(idp, routes, metrics_listen=f"127.0.0.1:{metrics_port}") as gw:
        client = await open_session(gw, http, "json")
        seen: dict[str, str] = {}
        for what, url in [
            ("health", gw.url + "/healthz"),
            ("metadata", gw.url + "/.well-known/oauth-authorization-server"),
            ("unknown path", gw.url + "/nowhere"),
            ("metrics port", f"http://127.0.0.1:{metrics_port}/metrics"),
        ]:
            async with http.get(url) as response:
                seen[what] = response.headers.get("Server", "")
        async with http.post(gw.token_endpoint, data={"grant_type": "password"}) as response:
            assert response.status == 401  # no client authentication
            seen["token error"] = response.headers.get("Server", "")
        async with client.post(tool_call(2, "echo", {"text": "x"})) as response:
            assert response.status == 200
            seen["proxied"] = response.headers.get("Server", "")
        async with client.http.get(client.url, headers=client.headers(Accept="text/event-stream")) as response:
            seen["stream"] = response.headers.get("Server", "")
    assert seen == dict.fromkeys(seen, "mcp-gateway")
