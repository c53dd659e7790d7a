"""Readiness of ``mcp-gateway serve`` does not depend on the identity providers.

A pod is ready when its config is loaded and it is not draining. An IdP whose keys cannot be fetched
fails only the grants it signed (503 ``temporarily_unavailable``, so clients retry), shows as 0 in
``mcp_gateway_idp_keys_available`` and is named in the /readyz body; everything else keeps working.
Before this, /readyz answered 503 until every IdP's keys were fetched: new pods stayed out of service
through an IdP outage, and a reload adding one unreachable IdP turned every ready pod unready at once.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from gateway.devidp import DevIdentityProvider
from tests.support.loopback import free_port
from tests.support.mcp_http import tool_call, tool_text
from tests.support.serve import ServedGateway, config_document, served
from tests.support.upstreams import RunningUpstream

AVAILABLE = "mcp_gateway_idp_keys_available"


async def readyz(gw: ServedGateway) -> tuple[int, Any]:
    async with gw.http.get(gw.base + "/readyz") as response:
        return response.status, await response.json()


async def test_an_unreachable_idp_fails_only_its_own_grants_and_the_pod_stays_ready(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    down = DevIdentityProvider(issuer=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    port = free_port()
    routes = {"json": upstream_json.mcp_url}
    # `served` waits for /readyz to answer 200.
    async with served(tmp_path, idp, config_document(port, [idp, down], routes)) as gw:
        assert await readyz(gw) == (200, {"status": "ready", "idp_keys_missing": [down.issuer]})
        client = await gw.client("json")  # a grant with an ID-JAG of the reachable IdP, then a session
        assert tool_text(await client.call(tool_call(2, "echo", {"text": "served"}))) == "served"

        status, body = await gw.grant("json", down)
        assert (status, body["error"]) == (503, "temporarily_unavailable")
        scraped = await gw.metrics()
        assert scraped.value(AVAILABLE, issuer=idp.issuer) == 1
        assert scraped.value(AVAILABLE, issuer=down.issuer) == 0
        assert scraped.has(AVAILABLE, issuer=down.issuer)  # a zero, not a missing series

        # A live reload that adds another unreachable IdP leaves the pod ready and serving.
        also_down = DevIdentityProvider(issuer=f"http://127.0.0.1:{free_port()}")
        gw.write_config(config_document(port, [idp, down, also_down], routes))
        gw.send(signal.SIGHUP)
        await gw.eventually(lambda: gw.reloads("success"), 1, "the reload adding an unreachable IdP")
        status, body = await readyz(gw)
        assert (status, sorted(body["idp_keys_missing"])) == (200, sorted([down.issuer, also_down.issuer]))
        assert tool_text(await client.call(tool_call(3, "echo", {"text": "still"}))) == "still"
        fresh = await gw.client("json")
        assert tool_text(await fresh.call(tool_call(2, "echo", {"text": "new grant"}))) == "new grant"
        assert (await gw.metrics()).value(AVAILABLE, issuer=also_down.issuer) == 0
