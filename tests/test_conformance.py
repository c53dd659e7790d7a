"""The official MCP conformance suite scores the same through the gateway as against the bare server.

npm ``@modelcontextprotocol/conformance`` 0.1.16 runs every 2025-11-25 server scenario; 0.2.0-alpha.12 runs
the frozen 2025-11-25 and 2026-07-28 requirement sets (the latter: stateless requests, ``server/discover``,
``InputRequiredResult`` rounds, caching hints, ``Mcp-Method``/``Mcp-Name`` header validation, DNS-rebinding
protection). Each runs first against our fixture server (:mod:`tests.support.conformance_server`, the
official Python SDK), then against the gateway in front of it with a real access token (ID-JAG grant).
Each scenario must end with
the same number of passed and failed checks both ways.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.devidp import DevIdentityProvider
from tests.support.conformance import SUITES, run_suite
from tests.support.harness import running_gateway
from tests.support.upstreams import RunningUpstream, start_upstream

# What the fixture server scores alone, per generation: every scenario the suite runs, all passing
# except the tasks extension (the SDK does not implement SEP-1686 tasks; not scored for 2026-07-28).
EXPECTED_SCENARIOS = {"0.1.16/2025-11-25": 32, "0.2.0-alpha.12/2025-11-25": 33, "0.2.0-alpha.12/2026-07-28": 50}
UNSCORED_FAILING = {
    "0.1.16/2025-11-25": set(),
    "0.2.0-alpha.12/2025-11-25": set(),
    "0.2.0-alpha.12/2026-07-28": {
        "tasks-lifecycle",
        "tasks-capability-negotiation",
        "tasks-wire-fields",
        "tasks-request-state-removal",
        "tasks-mrtr-input",
        "tasks-request-headers",
        "tasks-dispatch-and-envelope",
        "tasks-required-task-error",
        "tasks-mrtr-composition",
    },
}


@pytest.fixture(scope="module")
def conformance_server() -> Iterator[RunningUpstream]:
    with start_upstream("streamable-sse", module="tests.support.conformance_server") as upstream:
        yield upstream


@pytest.mark.parametrize("suite", sorted(SUITES))
async def test_conformance_same_direct_and_through_gateway(
    idp: DevIdentityProvider, conformance_server: RunningUpstream, suite: str
) -> None:
    direct = await run_suite(suite, conformance_server.mcp_url)
    assert len(direct.scenarios) == EXPECTED_SCENARIOS[suite], direct.output
    failing = set(direct.scenarios) - set(direct.passing())
    assert failing == UNSCORED_FAILING[suite], direct.output

    routes = [{"name": "conformance", "path": "/conformance/mcp", "upstream": conformance_server.mcp_url}]
    async with running_gateway(idp, routes) as gw:
        token = await gw.access_token("conformance")
        through = await run_suite(suite, gw.route_url("conformance"), authorization=f"Bearer {token}")

    differences = {
        scenario: {"direct": direct.outcome(scenario), "gateway": through.outcome(scenario)}
        for scenario in direct.scenarios
        if scenario not in through.scenarios or direct.outcome(scenario) != through.outcome(scenario)
    }
    assert differences == {}, f"{differences}\n{through.output}"
    assert set(through.scenarios) == set(direct.scenarios)


async def test_conformance_through_gateway_needs_the_token(
    idp: DevIdentityProvider, conformance_server: RunningUpstream
) -> None:
    """The preload is what authenticates the suite: without it every scenario fails at the gateway's 401,
    so the equal scores above are the upstream's, reached through the gateway's checks."""
    routes = [{"name": "conformance", "path": "/conformance/mcp", "upstream": conformance_server.mcp_url}]
    async with running_gateway(idp, routes) as gw:
        result = await run_suite("0.1.16/2025-11-25", gw.route_url("conformance"))
    assert result.passing() == [], result.output
