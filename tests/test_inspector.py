"""The MCP Inspector CLI, a client we did not write, lists and calls tools through the gateway with an
access token from a real grant (ID-JAG -> JWT-bearer grant at the gateway's token endpoint)."""

from __future__ import annotations

import json

from tests.support.harness import GatewayHarness
from tests.support.inspector import run_inspector


async def test_inspector_cli_lists_and_calls_tools_through_the_gateway(gw: GatewayHarness) -> None:
    token = await gw.access_token("sse")
    authorization = {"Authorization": f"Bearer {token}"}
    url = gw.route_url("sse")

    listed = (await run_inspector(url, "--method", "tools/list", headers=authorization)).json()
    assert {"echo", "add"} <= {tool["name"] for tool in listed["tools"]}

    called = await run_inspector(
        url, "--method", "tools/call", "--tool-name", "echo", "--tool-arg", "text=via inspector", headers=authorization
    )
    assert called.json()["content"][0]["text"] == "via inspector"


async def test_inspector_cli_without_a_token_is_refused(gw: GatewayHarness) -> None:
    """The gateway's 401 sends the Inspector to OAuth, which it cannot do without a terminal."""
    run = await run_inspector(gw.route_url("sse"), "--method", "tools/list")
    assert run.returncode != 0
    assert json.loads(run.stderr)["error"]["code"] == "auth_required", run.stderr
