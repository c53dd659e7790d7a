"""CEL conditions and quotas end to end: real gateways in front of the real SDK upstream (``add(a, b)``,
``echo(text)``, ``get_weather(city)``), driven by raw clients and the official Python SDK client.

The upstream's recorder (``/_test/recorded``, with each call's id and arguments) is the witness of what
was forwarded; an audit log written to a file shows the rule that decided; ``/metrics`` shows quota
state. Quotas run on the in-memory store, and on a real ``redis-server`` shared by two real
``mcp-gateway serve`` processes.

Users (tests/support/harness.py): alice is in engineering and support, bob in support, carol in
contractors. Quota windows are fixed and aligned to the epoch (gateway/quotas.py), so no test here
assumes where in a window it runs: sequences that must land in one window start clear of its end
(``clear_of_window_end``), and a reset is waited for by polling, bounded by the ``retryAfterSeconds``
the gateway reported.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp import Client
from mcp.client.auth.extensions.identity_assertion import IdentityAssertionOAuthProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from gateway.devidp import DevIdentityProvider
from tests.support.harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    OTHER_CLIENT_ID,
    OTHER_CLIENT_SECRET,
    GatewayHarness,
    running_gateway,
)
from tests.support.loopback import free_port
from tests.support.mcp_http import WAIT, McpHttp, read_response, request, tool_call, tool_text
from tests.support.redis_server import RedisServer, running_redis
from tests.support.scrape import Scrape, scrape
from tests.support.sdk import MemoryStorage, exchange_at_idp, text_of
from tests.support.serve import ServedGateway, config_document, served
from tests.support.upstreams import RunningUpstream

FORBIDDEN = -32003
QUOTA_EXCEEDED = -32029
QUOTA_DECISIONS = "mcp_gateway_quota_decisions_total"
CONDITION_RULES: dict[str, Any] = {
    "tools": [
        {"id": "small-adds", "groups": ["support"], "allow": ["add"], "when": "args.a <= 1000"},
        {
            "id": "weather-for-engineering",
            "groups": ["*"],
            "allow": ["get_weather"],
            "when": "'engineering' in user.groups",
        },
        {"id": "echo-for-test-agent", "groups": ["*"], "allow": ["echo"], "when": f"client == '{CLIENT_ID}'"},
        {"id": "no-secrets", "groups": ["*"], "deny": ["echo"], "when": "args.text.startsWith('secret')"},
    ]
}
ROUTE_UPSTREAMS = {"cond": "upstream_json", "cond-sse": "upstream_sse"}
# The framing of an answer the upstream gave on each route (refusals are always the gateway's JSON).
ROUTE_FRAMING = {"cond": "application/json", "cond-sse": "text/event-stream"}
BOTH_ROUTES = pytest.mark.parametrize("route", ["cond", "cond-sse"])


@pytest.fixture(scope="module")
async def conditions(
    idp: DevIdentityProvider,
    upstream_json: RunningUpstream,
    upstream_sse: RunningUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[GatewayHarness]:
    """A gateway with ``CONDITION_RULES`` on a JSON-response route (``cond``) and an SSE-response route
    (``cond-sse``), auditing to a file."""
    routes = [
        {"name": name, "path": f"/{name}/mcp", "upstream": url, **CONDITION_RULES}
        for name, url in (("cond", upstream_json.mcp_url), ("cond-sse", upstream_sse.mcp_url))
    ]
    audit = {"sink": str(tmp_path_factory.mktemp("conditions") / "audit.log")}
    async with running_gateway(idp, routes, audit=audit) as harness:
        yield harness


@pytest.fixture
def upstream(request: pytest.FixtureRequest, route: str) -> RunningUpstream:
    """The real upstream behind ``route`` (parametrised)."""
    return request.getfixturevalue(ROUTE_UPSTREAMS[route])


async def session(
    h: GatewayHarness, http: aiohttp.ClientSession, route: str, user: str = "alice", *, other_client: bool = False
) -> McpHttp:
    """An initialised MCP session of ``user`` through ``CLIENT_ID`` (or ``OTHER_CLIENT_ID``)."""
    client_id, secret = (OTHER_CLIENT_ID, OTHER_CLIENT_SECRET) if other_client else (CLIENT_ID, CLIENT_SECRET)
    status, body, _ = await h.token_request(
        h.id_jag(route, user=user, client_id=client_id), client_id=client_id, client_secret=secret
    )
    assert status == 200, body
    client = McpHttp(http, h.route_url(route), body["access_token"])
    await client.initialize()
    return client


async def rpc(client: McpHttp, message: dict[str, Any], **headers: str) -> tuple[str, dict[str, Any]]:
    """POST one request, expecting 200; returns the content type and the JSON-RPC answer."""
    async with client.post(message, **headers) as response:
        assert response.status == 200, await response.text()
        return response.content_type, await read_response(response, message["id"])


def forwarded(upstream: RunningUpstream) -> list[tuple[str | None, Any]]:
    """The tool calls (name, arguments) that reached ``upstream`` since its last reset."""
    return [(e["name"], e["arguments"]) for e in upstream.recorded() if e["method"] == "tools/call"]


def refusal(answer: dict[str, Any], request_id: Any, code: int = FORBIDDEN) -> dict[str, Any]:
    """The ``data`` of the gateway's JSON-RPC error answering ``request_id`` with ``code``."""
    assert answer["id"] == request_id, answer
    assert "result" not in answer, answer
    assert answer["error"]["code"] == code, answer
    return answer["error"]["data"]


# -- conditions -----------------------------------------------------------------------------------------


@BOTH_ROUTES
async def test_call_is_allowed_or_refused_by_argument_value(
    conditions: GatewayHarness, http: aiohttp.ClientSession, upstream: RunningUpstream, route: str
) -> None:
    bob = await session(conditions, http, route, "bob")
    upstream.reset()
    content_type, answer = await rpc(bob, tool_call(1, "add", {"a": 1000, "b": 1}))
    assert content_type == ROUTE_FRAMING[route]
    assert tool_text(answer) == "1001"

    content_type, answer = await rpc(bob, tool_call(2, "add", {"a": 1001, "b": 1}))
    assert content_type == "application/json"
    assert refusal(answer, 2) == {"reason": "condition", "rule": "small-adds", "method": "tools/call"}
    assert "'add'" in answer["error"]["message"] and f"'{route}'" in answer["error"]["message"]
    assert forwarded(upstream) == [("add", {"a": 1000, "b": 1})]


async def test_a_user_no_rule_covers_is_refused_by_policy_not_by_a_condition(
    conditions: GatewayHarness, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    """``small-adds`` is for support: carol's small add is refused because no rule applies to her."""
    carol = await session(conditions, http, "cond", "carol")
    upstream_json.reset()
    _, answer = await rpc(carol, tool_call(3, "add", {"a": 1, "b": 1}))
    assert refusal(answer, 3) == {"reason": "policy", "method": "tools/call"}
    assert forwarded(upstream_json) == []


@pytest.mark.parametrize(
    ("arguments", "detail"),
    [
        pytest.param({"b": 1}, "no argument 'a'", id="missing"),
        pytest.param({"a": "12", "b": 1}, "wrong type", id="wrong-type"),
    ],
)
async def test_a_condition_that_cannot_be_evaluated_refuses_with_its_reason(
    conditions: GatewayHarness,
    http: aiohttp.ClientSession,
    upstream_json: RunningUpstream,
    arguments: dict[str, Any],
    detail: str,
) -> None:
    bob = await session(conditions, http, "cond", "bob")
    upstream_json.reset()
    _, answer = await rpc(bob, tool_call(4, "add", arguments))
    data = refusal(answer, 4)
    assert (data["reason"], data["rule"]) == ("condition_error", "small-adds")
    assert data["detail"].startswith(detail)
    assert "12" not in data["detail"]  # reasons never echo argument values
    assert forwarded(upstream_json) == []


@BOTH_ROUTES
async def test_a_conditional_deny_rule_denies_only_when_its_condition_holds(
    conditions: GatewayHarness, http: aiohttp.ClientSession, upstream: RunningUpstream, route: str
) -> None:
    alice = await session(conditions, http, route)
    upstream.reset()
    _, answer = await rpc(alice, tool_call(5, "echo", {"text": "public note"}))
    assert tool_text(answer) == "public note"
    _, answer = await rpc(alice, tool_call(6, "echo", {"text": "secret plan"}))
    assert refusal(answer, 6) == {"reason": "condition", "rule": "no-secrets", "method": "tools/call"}
    assert forwarded(upstream) == [("echo", {"text": "public note"})]


async def test_a_condition_on_user_groups(
    conditions: GatewayHarness, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    alice, bob = await session(conditions, http, "cond", "alice"), await session(conditions, http, "cond", "bob")
    upstream_json.reset()
    _, answer = await rpc(alice, tool_call(7, "get_weather", {"city": "Oslo"}))
    assert tool_text(answer) == "Weather in Oslo: sunny, 21 C"
    _, answer = await rpc(bob, tool_call(8, "get_weather", {"city": "Oslo"}))
    assert refusal(answer, 8) == {"reason": "condition", "rule": "weather-for-engineering", "method": "tools/call"}
    assert forwarded(upstream_json) == [("get_weather", {"city": "Oslo"})]


async def test_a_condition_on_the_client(
    conditions: GatewayHarness, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    """The same user through another OAuth client is refused by ``client == 'test-agent'``."""
    mine = await session(conditions, http, "cond", "alice")
    other = await session(conditions, http, "cond", "alice", other_client=True)
    upstream_json.reset()
    _, answer = await rpc(mine, tool_call(9, "echo", {"text": "from test-agent"}))
    assert tool_text(answer) == "from test-agent"
    _, answer = await rpc(other, tool_call(10, "echo", {"text": "from other-agent"}))
    assert refusal(answer, 10) == {"reason": "condition", "rule": "echo-for-test-agent", "method": "tools/call"}
    assert forwarded(upstream_json) == [("echo", {"text": "from test-agent"})]


@pytest.mark.parametrize(
    ("user", "visible"),
    [("bob", {"add", "echo", "get_weather"}), ("carol", {"echo", "get_weather"})],
)
async def test_conditionally_allowed_tools_are_listed(
    conditions: GatewayHarness, http: aiohttp.ClientSession, user: str, visible: set[str]
) -> None:
    """Arguments are unknown at list time: a tool whose only allowing rule is conditional is listed; the
    conditional deny rule on ``echo`` does not hide it either."""
    client = await session(conditions, http, "cond", user)
    _, answer = await rpc(client, request(11, "tools/list"))
    assert {tool["name"] for tool in answer["result"]["tools"]} == visible


@BOTH_ROUTES
async def test_batch_with_one_allowed_and_one_refused_element(
    conditions: GatewayHarness, http: aiohttp.ClientSession, upstream: RunningUpstream, route: str
) -> None:
    """The refused element is answered by the gateway; only the allowed one reaches the upstream, with
    its arguments unchanged. (The SDK upstream, speaking MCP 2025-11-25, refuses batches itself: what
    it answers for the forwarded element is its business, so only what it received is asserted.)"""
    bob = await session(conditions, http, route, "bob")
    upstream.reset()
    batch = [tool_call("small", "add", {"a": 1, "b": 2}), tool_call("large", "add", {"a": 5000, "b": 1})]
    async with bob.post(batch) as response:
        answers = await response.json(content_type=None)
    assert isinstance(answers, list)
    by_id = {answer.get("id"): answer for answer in answers}
    assert refusal(by_id["large"], "large") == {"reason": "condition", "rule": "small-adds", "method": "tools/call"}
    requests = [(e["id"], e["name"], e["arguments"]) for e in upstream.recorded() if e["kind"] == "request"]
    assert requests == [("small", "add", {"a": 1, "b": 2})]


@asynccontextmanager
async def sdk_client(h: GatewayHarness, route: str, user: str) -> AsyncIterator[Client]:
    """The official Python SDK client, authorised as an enterprise client is (an ID-JAG from the IdP)."""

    async def assertion_provider(audience: str, resource: str) -> str:
        return await exchange_at_idp(h.idp, audience, resource, user)

    url = h.route_url(route)
    provider = IdentityAssertionOAuthProvider(
        server_url=url,
        storage=MemoryStorage(),
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        issuer=h.issuer,
        assertion_provider=assertion_provider,
    )
    async with create_mcp_http_client(auth=provider) as http_client:
        async with Client(streamable_http_client(url, http_client=http_client)) as client:
            yield client


@BOTH_ROUTES
async def test_official_sdk_client_sees_the_condition_refusal(
    conditions: GatewayHarness, upstream: RunningUpstream, route: str
) -> None:
    async with asyncio.timeout(WAIT), sdk_client(conditions, route, "bob") as client:
        assert text_of(await client.call_tool("add", {"a": 2, "b": 3})) == "5"
        upstream.reset()
        with pytest.raises(MCPError) as refused:
            await client.call_tool("add", {"a": 5000, "b": 1})
        assert refused.value.code == FORBIDDEN
        assert refused.value.data == {"reason": "condition", "rule": "small-adds", "method": "tools/call"}
        # The session goes on.
        assert text_of(await client.call_tool("add", {"a": 40, "b": 2})) == "42"
    assert forwarded(upstream) == [("add", {"a": 40, "b": 2})]


async def audit_lines(path: Path, request_ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    """The audit lines of each request id, once every one has appeared (a background task writes them)."""
    deadline = time.monotonic() + WAIT
    while True:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        lines = [json.loads(line) for line in text.splitlines()]
        found: dict[str, list[dict[str, Any]]] = {}
        for line in lines:
            if line.get("request_id") in request_ids:
                found.setdefault(line["request_id"], []).append(line)
        if set(found) == request_ids:
            return found
        assert time.monotonic() < deadline, f"audit lines missing after {WAIT}s: {text}"
        await asyncio.sleep(0.02)


async def test_condition_decisions_are_audited_with_the_rule_id(
    conditions: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    bob = await session(conditions, http, "cond", "bob")
    calls = {
        "allowed": (tool_call(12, "add", {"a": 1, "b": 1}), "tool.called", "small-adds", "allowed by support rule"),
        "condition": (
            tool_call(13, "add", {"a": 70001, "b": 1}),
            "tool.denied",
            "small-adds",
            "condition of rule small-adds is false",
        ),
        "error": (
            tool_call(14, "add", {"b": 1}),
            "tool.denied",
            "small-adds",
            "condition of rule small-adds: no argument 'a'",
        ),
        "deny": (
            tool_call(15, "echo", {"text": "secret 70002"}),
            "tool.denied",
            "no-secrets",
            "denied by * rule (condition)",
        ),
    }
    ids = {name: f"cond-audit-{name}-{uuid.uuid4().hex}" for name in calls}
    for name, (message, *_) in calls.items():
        await rpc(bob, message, **{"X-Request-Id": ids[name]})
    sink = Path(conditions.config.audit_sink)
    found = await audit_lines(sink, set(ids.values()))
    for name, (_, event, rule, reason) in calls.items():
        (line,) = (line for line in found[ids[name]] if line["event"] != "request.completed")
        assert (line["event"], line["rule"], line["reason"]) == (event, rule, reason)
        assert line["target"] == calls[name][0]["params"]["name"]
        assert line["decision"] == ("allow" if event == "tool.called" else "deny")
        assert (line["sub"], line["client_id"], line["route"]) == ("bob", CLIENT_ID, "cond")
    text = sink.read_text(encoding="utf-8")
    assert "70001" not in text and "70002" not in text  # argument values are not audited


# -- quotas -------------------------------------------------------------------------------------------


async def clear_of_window_end(window_seconds: int, needed: float = 5.0) -> None:
    """Windows are aligned to the epoch: a sequence of calls that must land in one window starts in a
    fresh one when fewer than ``needed`` seconds are left of the current (waits at most ``needed``)."""
    left = window_seconds - time.time() % window_seconds
    if left < needed:
        await asyncio.sleep(left + 0.1)


def quota(quota_id: str, per: str, tools: list[str], limit: int, window: str, **extra: str) -> dict[str, Any]:
    return {"id": quota_id, "per": per, "tools": tools, "limit": limit, "window": window, **extra}


@asynccontextmanager
async def quota_gateway(
    idp: DevIdentityProvider, upstream: RunningUpstream, quotas: list[dict[str, Any]], **options: Any
) -> AsyncIterator[GatewayHarness]:
    """A gateway of its own (fresh counters) with one route ``q`` carrying ``quotas`` and no rules."""
    route = {"name": "q", "path": "/q/mcp", "upstream": upstream.mcp_url, "quotas": quotas}
    async with running_gateway(idp, [route], **options) as harness:
        yield harness


async def quota_metrics(http: aiohttp.ClientSession, base: str, route: str, quota_id: str) -> dict[str, float]:
    metrics: Scrape = await scrape(http, base + "/metrics")
    assert metrics.families[QUOTA_DECISIONS.removesuffix("_total")] == "counter"
    results = ("charged", "exhausted", "unavailable")
    for result in results:  # every series exists from the start
        assert metrics.has(QUOTA_DECISIONS, route=route, quota=quota_id, result=result)
    return {r: metrics.value(QUOTA_DECISIONS, route=route, quota=quota_id, result=r) for r in results}


def add(request_id: Any, a: int = 1) -> dict[str, Any]:
    return tool_call(request_id, "add", {"a": a, "b": 1})


async def test_quota_exhaustion_is_refused_per_user_never_forwarded_and_counted(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, upstream_json: RunningUpstream, tmp_path: Path
) -> None:
    audit = {"sink": str(tmp_path / "audit.log")}
    quotas = [quota("adds-per-user", "user", ["add"], 3, "1h")]
    async with quota_gateway(idp, upstream_json, quotas, audit=audit) as h:
        assert await quota_metrics(http, h.url, "q", "adds-per-user") == {
            "charged": 0,
            "exhausted": 0,
            "unavailable": 0,
        }
        alice, bob = await session(h, http, "q", "alice"), await session(h, http, "q", "bob")
        await clear_of_window_end(3600)
        upstream_json.reset()
        for i in range(3):
            assert tool_text((await rpc(alice, add(i, a=i)))[1]) == str(i + 1)
        _, answer = await rpc(alice, add("over", a=99), **{"X-Request-Id": "quota-over"})
        data = refusal(answer, "over", QUOTA_EXCEEDED)
        assert data.keys() == {"reason", "quota", "retryAfterSeconds", "rule", "method"}
        assert (data["reason"], data["quota"], data["rule"]) == ("quota", "adds-per-user", "adds-per-user")
        assert isinstance(data["retryAfterSeconds"], int) and 1 <= data["retryAfterSeconds"] <= 3600
        assert "adds-per-user" in answer["error"]["message"]
        # Keyed by the principal, not the session: a new token and session do not reset it.
        again = await session(h, http, "q", "alice")
        refusal((await rpc(again, add("again")))[1], "again", QUOTA_EXCEEDED)
        # Other tools, and other users, are not counted.
        assert tool_text((await rpc(alice, tool_call(5, "echo", {"text": "still here"})))[1]) == "still here"
        assert tool_text((await rpc(bob, add(6, a=41)))[1]) == "42"
        assert await quota_metrics(http, h.url, "q", "adds-per-user") == {
            "charged": 4,
            "exhausted": 2,
            "unavailable": 0,
        }
        found = await audit_lines(tmp_path / "audit.log", {"quota-over"})
    assert forwarded(upstream_json) == [
        ("add", {"a": 0, "b": 1}),
        ("add", {"a": 1, "b": 1}),
        ("add", {"a": 2, "b": 1}),
        ("echo", {"text": "still here"}),
        ("add", {"a": 41, "b": 1}),
    ]
    (line,) = (line for line in found["quota-over"] if line["event"] != "request.completed")
    assert (line["event"], line["decision"], line["rule"]) == ("tool.denied", "deny", "adds-per-user")
    assert line["reason"] == "quota adds-per-user exhausted"


async def test_quota_resets_when_its_window_ends(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    """Spend a 2 s quota, then poll (bounded by the reported retryAfterSeconds) until it is back: it
    comes back, and not before the window could have ended."""
    window, limit = 2, 2
    async with quota_gateway(idp, upstream_json, [quota("burst", "user", ["add"], limit, f"{window}s")]) as h:
        alice = await session(h, http, "q")
        for attempt in range(2 * limit + 1):  # a window may end while we spend; then it takes longer
            sent = time.monotonic()
            _, answer = await rpc(alice, add(attempt))
            if "error" in answer:
                break
        else:
            pytest.fail(f"{2 * limit + 1} calls in a row allowed by a quota of {limit} per {window}s")
        retry_after = refusal(answer, attempt, QUOTA_EXCEEDED)["retryAfterSeconds"]
        assert 1 <= retry_after <= window
        deadline = sent + retry_after + 2.0  # the window ends within retry_after of the refusal
        for poll in range(1000):
            await asyncio.sleep(0.05)
            _, answer = await rpc(alice, add(f"poll-{poll}"))
            if "error" not in answer:
                break
            assert refusal(answer, f"poll-{poll}", QUOTA_EXCEEDED)["retryAfterSeconds"] <= retry_after
            assert time.monotonic() < deadline, f"quota not reset {retry_after}s after it was refused"
        assert tool_text(answer) == "2"
        # ceil(end - now) == retry_after at the refusal: the window cannot have ended much sooner.
        assert time.monotonic() - sent > retry_after - 1


async def test_quota_cost_is_an_expression_on_the_arguments(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    """``cost: args.a``: a call that does not fit what remains is refused and consumes nothing; a cost
    that cannot be computed, or is negative, refuses the call rather than count it as free."""
    quotas = [quota("add-budget", "user", ["add"], 10, "1h", cost="args.a")]
    async with quota_gateway(idp, upstream_json, quotas) as h:
        alice = await session(h, http, "q")
        await clear_of_window_end(3600)
        upstream_json.reset()
        assert tool_text((await rpc(alice, add(1, a=6)))[1]) == "7"
        data = refusal((await rpc(alice, add(2, a=5)))[1], 2, QUOTA_EXCEEDED)
        assert data["quota"] == "add-budget"
        assert tool_text((await rpc(alice, add(3, a=4)))[1]) == "5"  # 6 + 4: exactly the limit
        assert tool_text((await rpc(alice, add(4, a=0)))[1]) == "1"  # costs nothing
        refusal((await rpc(alice, add(5, a=1)))[1], 5, QUOTA_EXCEEDED)
        negative = refusal((await rpc(alice, add(6, a=-3)))[1], 6)
        assert (negative["reason"], negative["quota"]) == ("quota_cost", "add-budget")
        missing = refusal((await rpc(alice, tool_call(7, "add", {"b": 1})))[1], 7)
        assert (missing["reason"], missing["detail"]) == ("quota_cost", "no argument 'a'")
    assert forwarded(upstream_json) == [("add", {"a": 6, "b": 1}), ("add", {"a": 4, "b": 1}), ("add", {"a": 0, "b": 1})]


async def test_per_user_and_per_client_quotas_count_different_principals(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    quotas = [quota("adds-per-user", "user", ["add"], 2, "1h"), quota("echoes-per-client", "client", ["echo"], 2, "1h")]
    async with quota_gateway(idp, upstream_json, quotas) as h:
        alice = await session(h, http, "q", "alice")
        alice_elsewhere = await session(h, http, "q", "alice", other_client=True)
        bob = await session(h, http, "q", "bob")
        bob_elsewhere = await session(h, http, "q", "bob", other_client=True)
        await clear_of_window_end(3600)

        async def quota_refusing(client: McpHttp, message: dict[str, Any]) -> str | None:
            _, answer = await rpc(client, message)
            return refusal(answer, message["id"], QUOTA_EXCEEDED)["quota"] if "error" in answer else None

        # per user: alice's two adds through one client use her quota through the other client too.
        assert [await quota_refusing(alice, add(i)) for i in range(2)] == [None, None]
        assert await quota_refusing(alice_elsewhere, add(3)) == "adds-per-user"
        assert await quota_refusing(bob, add(4)) is None
        # per client: alice's two echoes through test-agent spend it for bob too, not other-agent.
        echo = tool_call(5, "echo", {"text": "x"})
        assert [await quota_refusing(alice, echo) for _ in range(2)] == [None, None]
        assert await quota_refusing(bob, echo) == "echoes-per-client"
        assert await quota_refusing(bob_elsewhere, echo) is None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own: the tests stop it, or need counters nobody else has touched."""
    with running_redis(tmp_path / "redis") as server:
        yield server


async def test_two_serve_processes_on_one_redis_share_a_quota(
    tmp_path: Path,
    idp: DevIdentityProvider,
    http: aiohttp.ClientSession,
    upstream_json: RunningUpstream,
    redis_server: RedisServer,
) -> None:
    """Two replicas, as a Deployment runs them: calls spread over both spend one quota."""
    limit = 4
    async with AsyncExitStack() as stack:
        replicas: list[ServedGateway] = []
        for name in ("a", "b"):
            document = config_document(free_port(), idp, {"q": upstream_json.mcp_url}, replay_store=redis_server.url)
            document["routes"][0]["quotas"] = [quota("shared-adds", "user", ["add"], limit, "1h")]
            replicas.append(await stack.enter_async_context(served(tmp_path, idp, document, name=name)))
        clients = [await replica.client("q") for replica in replicas]
        await clear_of_window_end(3600)
        upstream_json.reset()
        for i in range(limit):
            assert tool_text(await clients[i % 2].call(add(i, a=i))) == str(i + 1)
        for i, client in enumerate(clients):
            data = refusal(await client.call(add(10 + i)), 10 + i, QUOTA_EXCEEDED)
            assert data["quota"] == "shared-adds" and 1 <= data["retryAfterSeconds"] <= 3600
        for replica in replicas:
            counted = await quota_metrics(replica.http, replica.base, "q", "shared-adds")
            assert counted == {"charged": limit / 2, "exhausted": 1, "unavailable": 0}
    assert forwarded(upstream_json) == [("add", {"a": i, "b": 1}) for i in range(limit)]


async def test_redis_down_fails_closed_with_a_clear_error_and_recovers(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, upstream_json: RunningUpstream, redis_server: RedisServer
) -> None:
    quotas = [quota("adds-per-user", "user", ["add"], 100, "1h")]
    async with quota_gateway(idp, upstream_json, quotas, replay_store=redis_server.url) as h:
        alice = await session(h, http, "q")  # grants need Redis too (the replay cache): before it goes
        assert tool_text((await rpc(alice, add(1)))[1]) == "2"
        redis_server.stop()
        upstream_json.reset()
        _, answer = await rpc(alice, add(2))
        assert refusal(answer, 2) == {"reason": "quota_unavailable", "method": "tools/call"}
        assert "not permitted" in answer["error"]["message"]
        # Calls no quota counts do not need the store.
        assert tool_text((await rpc(alice, tool_call(3, "echo", {"text": "no quota"})))[1]) == "no quota"
        assert forwarded(upstream_json) == [("echo", {"text": "no quota"})]
        assert await quota_metrics(http, h.url, "q", "adds-per-user") == {
            "charged": 1,
            "exhausted": 0,
            "unavailable": 1,
        }

        redis_server.start()
        assert tool_text((await rpc(alice, add(4)))[1]) == "2"
        assert (await quota_metrics(http, h.url, "q", "adds-per-user"))["charged"] == 2
