"""Outbound HTTP of ``mcp-gateway serve`` honours the standard proxy environment variables.

Clusters that reach the internet only through an egress proxy set ``HTTPS_PROXY`` / ``HTTP_PROXY`` and
list in-cluster names in ``NO_PROXY``. The gateway's IdP client (discovery and JWKS) and its upstream
clients must use them: otherwise the keys of an external IdP can never be fetched. Here a real forward
proxy on loopback stands in for the egress proxy; the loopback IdP and upstreams speak plain HTTP, so
``HTTP_PROXY`` is the variable in play (``HTTPS_PROXY`` applies the same way to https URLs).
"""

from __future__ import annotations

from pathlib import Path

from gateway.devidp import DevIdentityProvider
from tests.support.forward_proxy import forward_proxy
from tests.support.loopback import free_port
from tests.support.mcp_http import tool_call, tool_text
from tests.support.serve import config_document, served
from tests.support.upstreams import RunningUpstream


async def test_idp_and_upstream_requests_go_through_the_proxy_unless_no_proxy_matches(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    # The same upstream twice: by address (proxied) and as localhost, which NO_PROXY exempts.
    direct = upstream_json.mcp_url.replace("127.0.0.1", "localhost")
    assert direct != upstream_json.mcp_url
    routes = {"proxied": upstream_json.mcp_url, "direct": direct}
    async with forward_proxy() as (proxy, proxy_url):
        env = {"HTTP_PROXY": proxy_url, "NO_PROXY": "localhost"}
        async with served(tmp_path, idp, config_document(free_port(), idp, routes), env=env) as gw:
            assert any(target.startswith(idp.issuer + "/") for target in proxy.targets), proxy.targets
            for route in ("proxied", "direct"):
                client = await gw.client(route)
                assert tool_text(await client.call(tool_call(2, "echo", {"text": route}))) == route
    upstream_targets = [t for t in proxy.targets if not t.startswith(idp.issuer + "/")]
    assert upstream_targets, proxy.targets
    assert all(t.startswith(upstream_json.mcp_url) for t in upstream_targets), upstream_targets
    assert not [t for t in proxy.targets if "localhost" in t]
