"""Approvals for MCP 2026-07-28 clients: the gateway asks with an ``InputRequiredResult`` whose
``requestState`` it signs, and forwards the call only on the approved retry (gateway/approvals/).

Real parts: the official Python SDK client (``mcp`` 2.x, its elicitation callback and its
multi-round-trip driver) and the official Python SDK server behind the gateway; the state checks
(tampered, replayed, expired, another principal's, another call's) drive the HTTP exchange by hand.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp import Client, types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from gateway.approvals.binding import CallBinding, arguments_sha256
from gateway.approvals.stateless import RoundState
from gateway.devidp import DevIdentityProvider
from gateway.oauth.identity import SubjectIdentity
from gateway.sessions import principal_key
from tests.support.audit import audit_events
from tests.support.harness import CLIENT_ID, GatewayHarness, running_gateway
from tests.support.mcp_http import read_response
from tests.support.sdk import text_of
from tests.support.upstreams import RunningUpstream, start_upstream

VERSION = "2026-07-28"
ELICITING = {"elicitation": {"form": {}}}
FORBIDDEN = -32003
RULES = {
    "tools": [
        {"id": "support-echo", "groups": ["support"], "allow": ["echo"], "require_approval": {"message": "Echo?"}},
        {"id": "support-add", "groups": ["support"], "allow": ["add"], "require_approval": {"timeout_seconds": 5}},
        {"id": "support-weather", "groups": ["support"], "allow": ["get_weather"]},
    ]
}
TIMEOUT = aiohttp.ClientTimeout(total=15)


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningUpstream]:
    with start_upstream("streamable-json") as running:
        yield running


@pytest.fixture
async def gw(idp: DevIdentityProvider, upstream: RunningUpstream, tmp_path: Path) -> AsyncIterator[GatewayHarness]:
    upstream.reset()
    routes = [{"name": "approve", "path": "/approve/mcp", "upstream": upstream.mcp_url, **RULES}]
    async with running_gateway(idp, routes, audit={"sink": str(tmp_path / "audit.log")}) as harness:
        yield harness


def calls_seen(upstream: RunningUpstream, tool: str) -> list[Any]:
    return [e["arguments"] for e in upstream.recorded() if e["method"] == "tools/call" and e["name"] == tool]


@asynccontextmanager
async def sdk(gw: GatewayHarness, answer: Any, *, user: str = "bob") -> AsyncIterator[tuple[Client, list[str]]]:
    """An SDK client speaking 2026-07-28 whose user answers every form with ``answer`` (an
    ``ElicitResult``, or an exception to raise); the messages it was shown are collected."""
    token = await gw.access_token("approve", user=user)
    shown: list[str] = []

    async def elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult | types.ErrorData:
        shown.append(params.message)
        return answer

    async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http:
        transport = streamable_http_client(gw.route_url("approve"), http_client=http)
        async with Client(transport, mode=VERSION, elicitation_callback=elicit) as client:
            yield client, shown


async def test_approved_call_runs_once_with_the_approved_arguments(
    gw: GatewayHarness, upstream: RunningUpstream
) -> None:
    accept = types.ElicitResult(action="accept", content={"approve": True})
    async with sdk(gw, accept) as (client, shown):
        result = await client.call_tool("echo", {"text": "refund 5000"})
    assert text_of(result) == "refund 5000"
    assert len(shown) == 1
    assert shown[0].startswith("Echo?") and "'echo'" in shown[0] and "refund 5000" in shown[0]
    assert calls_seen(upstream, "echo") == [{"text": "refund 5000"}]
    # The upstream never sees the gateway's round: no requestState, no inputResponses.
    bodies = [e for e in upstream.recorded() if e["method"] == "tools/call"]
    assert len(bodies) == 1
    asked, granted = await audit_events(Path(gw.config.audit_sink), "approval.asked", "approval.granted")
    assert asked["approval_id"] == granted["approval_id"] and len(asked["approval_id"]) >= 20
    assert (granted["route"], granted["target"], granted["approver"], granted["sub"]) == (
        "approve",
        "echo",
        "bob",
        "bob",
    )
    assert "refund 5000" not in json.dumps([asked, granted])  # arguments are never logged
    calls = await audit_events(Path(gw.config.audit_sink), "tool.called")
    assert [c["rule"] for c in calls if c["target"] == "echo"] == ["support-echo"]  # the approved round
    lines = [json.loads(line) for line in Path(gw.config.audit_sink).read_text().splitlines()]
    assert not [line for line in lines if line["event"] == "tool.denied"]  # the question is no refusal
    metrics = gw.gateway.metrics.approvals
    assert metrics.labels("approve", "asked")._value.get() == 1
    assert metrics.labels("approve", "granted")._value.get() == 1


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (types.ElicitResult(action="decline"), "approval_declined"),
        (types.ElicitResult(action="cancel"), "approval_cancelled"),
        (types.ElicitResult(action="accept", content={"approve": False}), "approval_declined"),
    ],
)
async def test_a_call_not_approved_never_reaches_the_upstream(
    gw: GatewayHarness, upstream: RunningUpstream, answer: types.ElicitResult, reason: str
) -> None:
    async with sdk(gw, answer) as (client, _):
        with pytest.raises(MCPError) as refused:
            await client.call_tool("echo", {"text": "no"})
        assert refused.value.error.code == FORBIDDEN
        assert refused.value.error.data["reason"] == reason
        # A call without approval rules passes as usual in the same session.
        assert "Paris" in text_of(await client.call_tool("get_weather", {"city": "Paris"}))
    assert calls_seen(upstream, "echo") == []


async def test_a_client_without_elicitation_gets_approval_required(
    gw: GatewayHarness, upstream: RunningUpstream
) -> None:
    token = await gw.access_token("approve", user="bob")
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        status, answer = await post(http, gw, token, call(1, "echo", {"text": "x"}, capabilities={}))
    assert status == 200
    assert answer["error"]["code"] == FORBIDDEN
    assert answer["error"]["data"]["reason"] == "approval_required"
    assert "elicitation" in answer["error"]["message"]
    assert calls_seen(upstream, "echo") == []


# --- the state, by hand -------------------------------------------------------------------------------


def call(
    request_id: int,
    tool: str,
    arguments: dict[str, Any],
    *,
    capabilities: dict[str, Any] | None = None,
    state: str | None = None,
    responses: dict[str, Any] | None = None,
) -> dict[str, Any]:
    meta = {
        "io.modelcontextprotocol/protocolVersion": VERSION,
        "io.modelcontextprotocol/clientCapabilities": ELICITING if capabilities is None else capabilities,
        "io.modelcontextprotocol/clientInfo": {"name": "approvals-test", "version": "1"},
    }
    params: dict[str, Any] = {"name": tool, "arguments": arguments, "_meta": meta}
    if state is not None:
        params["requestState"] = state
    if responses is not None:
        params["inputResponses"] = responses
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


def headers_for(tool: str, token: str = "") -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": VERSION,
        "Mcp-Method": "tools/call",
        "Mcp-Name": tool,
    }


async def post(http: aiohttp.ClientSession, gw: GatewayHarness, token: str, body: dict[str, Any]) -> tuple[int, Any]:
    headers = headers_for(body["params"]["name"], token)
    async with http.post(gw.route_url("approve"), json=body, headers=headers) as response:
        return response.status, await read_response(response, body["id"])


APPROVE = {"mcp_gateway_approval": {"action": "accept", "content": {"approve": True}}}


async def ask(http: aiohttp.ClientSession, gw: GatewayHarness, token: str, tool: str, arguments: dict[str, Any]) -> str:
    status, answer = await post(http, gw, token, call(1, tool, arguments))
    assert status == 200, answer
    result = answer["result"]
    assert result["resultType"] == "input_required"
    request = result["inputRequests"]["mcp_gateway_approval"]
    assert request["method"] == "elicitation/create"
    assert request["params"]["requestedSchema"]["properties"]["approve"]["type"] == "boolean"
    return result["requestState"]


def reason_of(answer: dict[str, Any]) -> str:
    assert answer["error"]["code"] == FORBIDDEN, answer
    return answer["error"]["data"]["reason"]


async def test_an_approval_is_used_once(gw: GatewayHarness, upstream: RunningUpstream) -> None:
    token = await gw.access_token("approve", user="bob")
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        state = await ask(http, gw, token, "echo", {"text": "once"})
        status, answer = await post(http, gw, token, call(2, "echo", {"text": "once"}, state=state, responses=APPROVE))
        assert status == 200 and "once" in json.dumps(answer["result"]), answer
        status, again = await post(http, gw, token, call(3, "echo", {"text": "once"}, state=state, responses=APPROVE))
    assert reason_of(again) == "approval_state_invalid"
    assert again["error"]["data"]["detail"] == "replayed"
    assert calls_seen(upstream, "echo") == [{"text": "once"}]


async def test_an_approval_does_not_stretch_to_other_arguments_tools_or_people(
    gw: GatewayHarness, upstream: RunningUpstream
) -> None:
    bob = await gw.access_token("approve", user="bob")
    alice = await gw.access_token("approve", user="alice")
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        state = await ask(http, gw, bob, "echo", {"text": "10"})
        attempts = [
            (bob, call(2, "echo", {"text": "10000"}, state=state, responses=APPROVE)),  # other arguments
            (bob, call(3, "add", {"a": 1, "b": 2}, state=state, responses=APPROVE)),  # another tool
            (alice, call(4, "echo", {"text": "10"}, state=state, responses=APPROVE)),  # another principal
        ]
        for token, body in attempts:
            _, answer = await post(http, gw, token, body)
            assert reason_of(answer) == "approval_state_invalid"
            assert answer["error"]["data"]["detail"] == "foreign"
    assert calls_seen(upstream, "echo") == [] and calls_seen(upstream, "add") == []


def tampered(state: str) -> str:
    prefix, payload, mac = state.split(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields["a"] = "0" * 64  # claim an approval for other arguments
    forged = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=").decode()
    return f"{prefix}.{forged}.{mac}"


@pytest.mark.parametrize(
    "mangle", [tampered, lambda s: s[:-2] + ("AA" if not s.endswith("AA") else "BB"), lambda s: "mcpgw1.x"]
)
async def test_a_tampered_state_is_refused(gw: GatewayHarness, upstream: RunningUpstream, mangle: Any) -> None:
    token = await gw.access_token("approve", user="bob")
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        state = await ask(http, gw, token, "echo", {"text": "t"})
        status, answer = await post(
            http, gw, token, call(2, "echo", {"text": "t"}, state=mangle(state), responses=APPROVE)
        )
    assert status == 200
    assert reason_of(answer) == "approval_state_invalid"
    assert answer["error"]["data"]["detail"] in ("tampered", "foreign")
    assert calls_seen(upstream, "echo") == []


async def test_an_expired_state_is_refused(gw: GatewayHarness, upstream: RunningUpstream) -> None:
    token = await gw.access_token("approve", user="bob")
    # A state the gateway signed for exactly this call, that expired a second ago (no clock to wait on).
    owner = principal_key(SubjectIdentity(gw.idp.issuer, None, "bob"), CLIENT_ID)
    binding = CallBinding("approve", owner, "add", arguments_sha256({"a": 1, "b": 1}))
    expired = gw.gateway.runtime.approval_states.sign(RoundState(binding, int(time.time()) - 1, "n1", "ask"))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        status, answer = await post(http, gw, token, call(2, "add", {"a": 1, "b": 1}, state=expired, responses=APPROVE))
    assert status == 200
    assert reason_of(answer) == "approval_timeout"
    assert calls_seen(upstream, "add") == []


# --- an upstream that asks for input itself --------------------------------------------------------------


@pytest.fixture(scope="module")
def modern_upstream() -> Iterator[RunningUpstream]:
    with start_upstream("streamable-sse", module="tests.support.conformance_server") as running:
        yield running


@pytest.mark.parametrize(
    ("tool", "expected"),
    [
        ("test_input_required_result_multi_round", "Ada likes blue."),  # the upstream's state changes each round
        ("test_input_required_result_request_state", "state-ok: confirmation received"),
    ],
)
async def test_an_upstream_asking_for_input_keeps_working_after_the_approval(
    idp: DevIdentityProvider, modern_upstream: RunningUpstream, tool: str, expected: str
) -> None:
    rules = {"tools": [{"groups": ["support"], "allow": ["test_*"], "require_approval": True}]}
    routes = [{"name": "approve", "path": "/approve/mcp", "upstream": modern_upstream.mcp_url, **rules}]
    answers = {"name": "Ada", "color": "blue", "ok": True}
    asked: list[str] = []

    async def elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        if params.message.startswith("Approve the call"):
            return types.ElicitResult(action="accept", content={"approve": True})
        field = next(iter(params.requested_schema["properties"]))
        return types.ElicitResult(action="accept", content={field: answers[field]})

    async with running_gateway(idp, routes) as gw:
        token = await gw.access_token("approve", user="bob")
        async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http:
            transport = streamable_http_client(gw.route_url("approve"), http_client=http)
            async with Client(transport, mode=VERSION, elicitation_callback=elicit) as client:
                result = await client.call_tool(tool, {})
    assert text_of(result) == expected
    # Asked once by the gateway, then only by the upstream: the approval holds for every round of the call.
    assert [m.startswith("Approve the call") for m in asked].count(True) == 1
    assert len(asked) >= 2


async def test_a_retry_of_the_upstreams_round_keeps_its_state_through_the_approval(
    idp: DevIdentityProvider, modern_upstream: RunningUpstream
) -> None:
    """The call needing approval is itself the retry of an upstream round (its own requestState and the
    client's answer to it): once approved, the upstream gets exactly that round back."""
    rules = {"tools": [{"groups": ["support"], "allow": ["test_*"], "require_approval": True}]}
    routes = [{"name": "approve", "path": "/approve/mcp", "upstream": modern_upstream.mcp_url, **rules}]
    tool = "test_input_required_result_request_state"
    confirm = {"confirm": {"action": "accept", "content": {"ok": True}}}
    async with running_gateway(idp, routes) as gw:
        token = await gw.access_token("approve", user="bob")
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            # The upstream's round, started without the gateway (the SDK server seals its own state).
            direct = {k: v for k, v in headers_for(tool).items() if k != "Authorization"}
            async with http.post(modern_upstream.mcp_url, json=call(9, tool, {}), headers=direct) as response:
                upstream_state = (await read_response(response, 9))["result"]["requestState"]
            body = call(1, tool, {}, state=upstream_state, responses=confirm)
            status, asked = await post(http, gw, token, body)
            assert status == 200 and asked["result"]["resultType"] == "input_required", asked
            state = asked["result"]["requestState"]
            status, answer = await post(
                http, gw, token, call(2, tool, {}, state=state, responses={**confirm, **APPROVE})
            )
    assert status == 200, answer
    assert answer["result"]["content"][0]["text"] == "state-ok: confirmation received", answer
