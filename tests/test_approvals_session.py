"""Approvals for MCP 2025-11-25 clients (sessions): the gateway sends ``elicitation/create`` on the
POST's SSE response, consumes the client's answer, and forwards the call only once approved
(gateway/approvals/session.py).

Real parts: the official Python SDK client in ``mode="legacy"`` (the ``initialize`` handshake) with its
elicitation callback, and the official Python SDK server behind the gateway, answering with JSON on one
route and with SSE on the other; the answers from the wrong principal or session drive HTTP by hand.
"""

from __future__ import annotations

import asyncio
import json
import uuid
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

from gateway.b64url import encode as _b64
from gateway.devidp import DevIdentityProvider
from gateway.oauth.keys import SigningKey
from gateway.oauth.replay import RedisReplayStore
from gateway.sessions import SessionBinder, SessionCheck
from tests.support.audit import audit_events
from tests.support.harness import GatewayHarness, running_gateway
from tests.support.mcp_http import (
    INITIALIZED,
    PROTOCOL,
    WAIT,
    McpHttp,
    new_gate,
    next_message,
    read_event,
    read_response,
    request,
    tool_call,
    tool_text,
)
from tests.support.redis_server import RedisServer, running_redis
from tests.support.sdk import text_of
from tests.support.upstreams import RunningUpstream

FORBIDDEN = -32003
RULES = {
    "tools": [
        {"id": "support-echo", "groups": ["support"], "allow": ["echo"], "require_approval": {"message": "Echo?"}},
        {"id": "support-add", "groups": ["support"], "allow": ["add"], "require_approval": {"timeout_seconds": 5}},
        {"id": "support-weather", "groups": ["support"], "allow": ["get_weather"]},
        {"id": "support-gated", "groups": ["support"], "allow": ["gated_stream"], "require_approval": True},
    ]
}
ROUTES = ["json", "sse"]
TIMEOUT = aiohttp.ClientTimeout(total=15)


@pytest.fixture
async def gw(
    idp: DevIdentityProvider, upstream_json: RunningUpstream, upstream_sse: RunningUpstream, tmp_path: Path
) -> AsyncIterator[GatewayHarness]:
    upstream_json.reset()
    upstream_sse.reset()
    routes = [
        {"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url, **RULES},
        {"name": "sse", "path": "/sse/mcp", "upstream": upstream_sse.mcp_url, **RULES},
    ]
    async with running_gateway(idp, routes, audit={"sink": str(tmp_path / "audit.log")}) as harness:
        yield harness


@pytest.fixture
def upstreams(upstream_json: RunningUpstream, upstream_sse: RunningUpstream) -> dict[str, RunningUpstream]:
    return {"json": upstream_json, "sse": upstream_sse}


def calls_seen(upstream: RunningUpstream, tool: str) -> list[Any]:
    return [e["arguments"] for e in upstream.recorded() if e["method"] == "tools/call" and e["name"] == tool]


Elicit = Any  # the SDK's elicitation callback


@asynccontextmanager
async def sdk(gw: GatewayHarness, route: str, elicit: Elicit | None, *, user: str = "bob") -> AsyncIterator[Client]:
    """An SDK client with the ``initialize`` handshake; with ``elicit`` it declares form elicitation."""
    token = await gw.access_token(route, user=user)
    async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http:
        transport = streamable_http_client(gw.route_url(route), http_client=http)
        async with Client(transport, mode="legacy", elicitation_callback=elicit) as client:
            yield client


def answering(answer: types.ElicitResult, shown: list[str]) -> Elicit:
    async def elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        shown.append(params.message)
        return answer

    return elicit


@pytest.mark.parametrize("route", ROUTES)
async def test_an_approved_call_runs_once(
    gw: GatewayHarness, upstreams: dict[str, RunningUpstream], route: str
) -> None:
    shown: list[str] = []
    accept = types.ElicitResult(action="accept", content={"approve": True})
    async with sdk(gw, route, answering(accept, shown)) as client:
        result = await client.call_tool("echo", {"text": "refund 5000"})
        assert text_of(result) == "refund 5000"
        # A call without approval rules is not asked about.
        assert "Paris" in text_of(await client.call_tool("get_weather", {"city": "Paris"}))
    assert len(shown) == 1
    assert shown[0].startswith("Echo?") and "'echo'" in shown[0] and "refund 5000" in shown[0]
    assert calls_seen(upstreams[route], "echo") == [{"text": "refund 5000"}]
    # The client's answer to the gateway was consumed, never forwarded: the upstream saw no response.
    assert [e for e in upstreams[route].recorded() if e["kind"] == "response"] == []
    asked, granted = await audit_events(Path(gw.config.audit_sink), "approval.asked", "approval.granted")
    assert asked["approval_id"] == granted["approval_id"] and asked["approval_id"].startswith("mcpgw-ask-")
    assert (granted["route"], granted["target"], granted["approver"], granted["sub"]) == (route, "echo", "bob", "bob")
    assert "refund 5000" not in json.dumps([asked, granted])  # arguments are never logged
    # The call is in the trail as what it finally was: called (once approved), never "denied" while asked.
    calls = await audit_events(Path(gw.config.audit_sink), "tool.called")
    assert [(c["target"], c["rule"]) for c in calls if c["target"] == "echo"] == [("echo", "support-echo")]
    lines = [json.loads(line) for line in Path(gw.config.audit_sink).read_text().splitlines()]
    assert not [line for line in lines if line["event"] == "tool.denied" and line.get("target") == "echo"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (types.ElicitResult(action="decline"), "approval_declined"),
        (types.ElicitResult(action="cancel"), "approval_cancelled"),
        (types.ElicitResult(action="accept", content={"approve": False}), "approval_declined"),
    ],
)
async def test_a_call_not_approved_never_reaches_the_upstream(
    gw: GatewayHarness, upstreams: dict[str, RunningUpstream], route: str, answer: types.ElicitResult, reason: str
) -> None:
    shown: list[str] = []
    async with sdk(gw, route, answering(answer, shown)) as client:
        with pytest.raises(MCPError) as refused:
            await client.call_tool("echo", {"text": "no"})
    assert refused.value.error.code == FORBIDDEN
    assert refused.value.error.data["reason"] == reason
    assert len(shown) == 1
    assert calls_seen(upstreams[route], "echo") == []
    event = "approval." + reason.removeprefix("approval_")
    asked, answered = await audit_events(Path(gw.config.audit_sink), "approval.asked", event)
    assert asked["approval_id"] == answered["approval_id"] and answered["approver"] == "bob"


async def test_an_unanswered_question_times_out_and_the_call_is_dropped(
    gw: GatewayHarness, upstream_json: RunningUpstream
) -> None:
    released = asyncio.Event()
    asked = asyncio.Event()

    async def elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.set()
        async with asyncio.timeout(WAIT):
            await released.wait()
        return types.ElicitResult(action="accept", content={"approve": True})

    async with sdk(gw, "json", elicit) as client:
        with pytest.raises(MCPError) as refused:
            async with asyncio.timeout(WAIT):
                await client.call_tool("add", {"a": 1, "b": 2})  # its rule waits 5 s
        released.set()  # the late approval reaches a gateway that no longer waits for it
        assert asked.is_set()
        assert refused.value.error.code == FORBIDDEN
        assert refused.value.error.data["reason"] == "approval_timeout"
        assert "Paris" in text_of(await client.call_tool("get_weather", {"city": "Paris"}))
    assert calls_seen(upstream_json, "add") == []
    asked, expired = await audit_events(Path(gw.config.audit_sink), "approval.asked", "approval.expired")
    assert asked["approval_id"] == expired["approval_id"]


async def test_a_client_without_elicitation_gets_approval_required(
    gw: GatewayHarness, upstream_json: RunningUpstream
) -> None:
    async with sdk(gw, "json", None) as client:
        with pytest.raises(MCPError) as refused:
            await client.call_tool("echo", {"text": "x"})
    assert refused.value.error.code == FORBIDDEN
    assert refused.value.error.data["reason"] == "approval_required"
    assert calls_seen(upstream_json, "echo") == []


async def test_quotas_count_a_call_only_once_it_is_approved(
    idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    upstream_json.reset()
    quota = {"id": "one-echo", "per": "user", "tools": ["echo"], "limit": 1, "window": "1h"}
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url, **RULES, "quotas": [quota]}]
    answers = [
        types.ElicitResult(action="decline"),
        types.ElicitResult(action="accept", content={"approve": True}),
        types.ElicitResult(action="accept", content={"approve": True}),
    ]

    async def elicit(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        return answers.pop(0)

    async with running_gateway(idp, routes) as gw, sdk(gw, "json", elicit) as client:
        with pytest.raises(MCPError) as declined:
            await client.call_tool("echo", {"text": "first"})
        assert declined.value.error.data["reason"] == "approval_declined"
        assert text_of(await client.call_tool("echo", {"text": "second"})) == "second"  # the decline cost nothing
        with pytest.raises(MCPError) as over:
            await client.call_tool("echo", {"text": "third"})
    assert over.value.error.code == -32029
    assert over.value.error.data["reason"] == "quota"
    assert answers == []
    assert calls_seen(upstream_json, "echo") == [{"text": "second"}]


# --- the answer, by hand ----------------------------------------------------------------------------------


async def eliciting_session(gw: GatewayHarness, http: aiohttp.ClientSession, user: str, route: str = "json") -> McpHttp:
    client = McpHttp(http, gw.route_url(route), await gw.access_token(route, user=user))
    params = {
        "protocolVersion": PROTOCOL,
        "capabilities": {"elicitation": {}},
        "clientInfo": {"name": "raw-approvals-test", "version": "1"},
    }
    async with client.post(request(1, "initialize", params)) as response:
        assert response.status == 200, await response.text()
        client.session_id = response.headers["Mcp-Session-Id"]
        await read_response(response, 1)
    async with client.post(INITIALIZED) as response:
        assert response.status == 202
    return client


@pytest.mark.parametrize("accept", ["application/json", "application/json, text/event-stream;q=0"])
async def test_a_post_that_cannot_be_answered_with_sse_gets_approval_required(
    gw: GatewayHarness, upstream_json: RunningUpstream, accept: str
) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        bob = await eliciting_session(gw, http, "bob")
        async with bob.post(tool_call(4, "echo", {"text": "x"}), Accept=accept) as response:
            assert response.status == 200
            answer = await read_response(response, 4)
    assert answer["error"]["data"]["reason"] == "approval_required"
    assert calls_seen(upstream_json, "echo") == []


def approval(question: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": question["id"], "result": {"action": "accept", "content": {"approve": True}}}


async def test_only_the_principal_and_session_asked_can_answer(
    gw: GatewayHarness, upstream_json: RunningUpstream
) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        bob = await eliciting_session(gw, http, "bob")
        bob_again = await eliciting_session(gw, http, "bob")  # same principal, another session
        alice = await eliciting_session(gw, http, "alice")
        async with bob.post(tool_call(7, "echo", {"text": "pay alice"})) as asked:
            assert asked.status == 200
            assert asked.content_type == "text/event-stream"
            async with asyncio.timeout(WAIT):
                question = await next_message(asked.content)
            assert question["method"] == "elicitation/create"
            assert question["params"]["requestedSchema"]["properties"]["approve"]["type"] == "boolean"
            # Alice answers in her own session, then with Bob's session id: refused both times.
            async with alice.post(approval(question)) as answered:
                assert answered.status == 403
                assert (await answered.json())["error"]["code"] == FORBIDDEN
            async with alice.post(approval(question), **{"Mcp-Session-Id": bob.session_id}) as answered:
                assert answered.status == 403
            async with bob_again.post(approval(question)) as answered:
                assert answered.status == 403
            # Mixed into a batch, even Bob's own answer is refused.
            batch = [approval(question), request(8, "tools/list")]
            async with bob.post(batch) as answered:
                assert answered.status == 400
                assert "error" in await answered.json()
            # Bob himself declines.
            decline = {"jsonrpc": "2.0", "id": question["id"], "result": {"action": "decline"}}
            async with bob.post(decline) as answered:
                assert answered.status == 202
            async with asyncio.timeout(WAIT):
                refused = await read_response(asked, 7)
                assert await read_event(asked.content) is None  # the response ends there
        assert refused["error"]["data"]["reason"] == "approval_declined"
        # The question is answered: the same id is no longer pending, and not forwarded either.
        async with bob.post(approval(question)) as answered:
            assert answered.status == 404
            assert (await answered.json())["error"]["code"] == -32600
    assert calls_seen(upstream_json, "echo") == []
    assert [e for e in upstream_json.recorded() if e["kind"] == "response"] == []


async def test_an_approved_streaming_answer_is_relayed_event_by_event(
    gw: GatewayHarness, upstream_sse: RunningUpstream
) -> None:
    gate = new_gate("approved-stream")
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        bob = await eliciting_session(gw, http, "bob", route="sse")
        async with bob.post(tool_call(9, "gated_stream", {"gate": gate})) as asked:
            async with asyncio.timeout(WAIT):
                question = await next_message(asked.content)
            async with bob.post(approval(question)) as answered:
                assert answered.status == 202
            async with asyncio.timeout(WAIT):
                # The upstream's first event arrives while its call is still held at the gate: not buffered.
                notification = await next_message(asked.content)
            assert "id" not in notification and gate in json.dumps(notification)
            upstream_sse.release(gate)
            async with asyncio.timeout(WAIT):
                result = await read_response(asked, 9)
    assert tool_text(result) == f"gate {gate} released"


async def test_a_client_that_leaves_while_asked_forwards_nothing(
    gw: GatewayHarness, upstream_json: RunningUpstream
) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        bob = await eliciting_session(gw, http, "bob")
        asked = await bob.post(tool_call(3, "echo", {"text": "gone"}))
        async with asyncio.timeout(WAIT):
            question = await next_message(asked.content)
        pending = gw.gateway.services.asks
        assert len(pending) == 1
        asked.close()  # the client leaves: its connection closes
        async with asyncio.timeout(WAIT):
            while len(pending):  # the gateway drops the question when it sees the connection go
                await asyncio.sleep(0.01)
        # The answer that comes anyway finds no question waiting.
        async with bob.post(approval(question)) as answered:
            assert answered.status == 404
    assert calls_seen(upstream_json, "echo") == []
    (cancelled,) = await audit_events(Path(gw.config.audit_sink), "approval.cancelled")
    assert (cancelled["approval_id"], cancelled["reason"]) == (question["id"], "client_left")


async def test_the_session_id_carries_the_capability_under_its_mac(gw: GatewayHarness) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        bob = await eliciting_session(gw, http, "bob")
        assert bob.session_id is not None
        parts = bob.session_id.split(".")
        assert parts[3] == "e"
        # A session id of a client without the capability, edited to claim it, is no session at all.
        plain = McpHttp(http, gw.route_url("json"), bob.token)
        await plain.initialize()
        assert plain.session_id is not None and plain.session_id.split(".")[3] == "-"
        forged = plain.session_id.split(".")
        forged[3] = "e"
        plain.session_id = ".".join(forged)
        async with plain.post(tool_call(2, "echo", {"text": "x"})) as response:
            assert response.status == 404
            assert json.loads(await response.text())["error"]["code"] == -32001


# --- replicas: the answer reaches another process --------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis-approvals")) as server:
        yield server


async def test_the_answer_may_reach_another_replica_through_redis(
    idp: DevIdentityProvider, upstream_json: RunningUpstream, redis_server: RedisServer
) -> None:
    """Two gateways of one deployment (one public URL, signing key and Redis): Bob is asked at the
    first, his answer lands at the second, and the first forwards the call into Bob's open stream."""
    upstream_json.reset()
    prefix = f"test:{uuid.uuid4().hex}:"
    stores = [RedisReplayStore.from_url(redis_server.url, prefix=prefix) for _ in range(2)]
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url, **RULES}]
    options = {"public_url": "https://mcp.example.com", "signing_key": SigningKey.generate()}
    try:
        async with (
            running_gateway(idp, routes, store=stores[0], **options) as first,
            running_gateway(idp, routes, store=stores[1], **options) as second,
            aiohttp.ClientSession(timeout=TIMEOUT) as http,
        ):
            bob = await eliciting_session(first, http, "bob")
            bob_at_second = McpHttp(http, second.route_url("json"), bob.token)
            bob_at_second.session_id = bob.session_id
            alice_at_second = await eliciting_session(second, http, "alice")
            async with bob.post(tool_call(5, "echo", {"text": "across"})) as asked:
                async with asyncio.timeout(WAIT):
                    question = await next_message(asked.content)
                async with alice_at_second.post(approval(question)) as answered:
                    assert answered.status == 403  # checked against the question's record in Redis
                async with bob_at_second.post(approval(question)) as answered:
                    assert answered.status == 202, await answered.text()
                async with asyncio.timeout(WAIT):
                    result = await read_response(asked, 5)
            assert tool_text(result) == "across"
            async with bob_at_second.post(approval(question)) as answered:
                assert answered.status == 404  # one answer per question
    finally:
        for store in stores:
            await store.close()
    assert calls_seen(upstream_json, "echo") == [{"text": "across"}]


def test_session_ids_wrapped_before_the_capability_are_still_accepted() -> None:
    binder = SessionBinder(b"k" * 32)
    owner = _b64(binder._digest(b"k" * 32, "owner", "json", "bob"))

    def old_id(*middle: str) -> str:
        mac = _b64(binder._digest(b"k" * 32, "session", "up-1", *middle))
        return ".".join((_b64(b"up-1"), *middle, mac))

    for presented in (old_id(owner), old_id(owner, "1700000000")):
        assert binder.unwrap("json", "bob", presented) == (SessionCheck.OK, "up-1")
        assert not SessionBinder.elicits(presented)
    assert SessionBinder.elicits(binder.wrap("json", "bob", "up-1", elicitation=True))
    assert binder.unwrap("json", "bob", old_id(owner, "1700000000", "x"))[0] is SessionCheck.UNKNOWN
    assert binder.unwrap("json", "alice", binder.wrap("json", "bob", "up-1"))[0] is SessionCheck.FOREIGN
