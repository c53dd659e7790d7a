"""Approval by someone else (``approver_groups``): the call is parked with ``approval_pending`` and an
approval URL; a member of an approver group decides at ``/approvals/{id}``; the same principal's
identical call then runs once (gateway/approvals/delegated.py, store.py, http.py).

Real parts: the official Python SDK client (both protocol generations) for the requester, the official
Python SDK server behind the gateway (its ``recorded()`` calls prove what the upstream saw), real
gateway tokens for the approvers, a real ``redis-server`` and two ``mcp-gateway serve`` processes.
"""

from __future__ import annotations

import asyncio
import re
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
from gateway.approvals.delegated import DelegatedDesk
from gateway.approvals.desk import Answered
from gateway.approvals.spec import ApprovalSpec
from gateway.approvals.store import (
    CONFLICT,
    DECIDED,
    DECLINED,
    GRANTED,
    PENDING,
    UNKNOWN,
    ApprovalRequest,
    ApprovalStore,
    ApprovalStoreUnavailable,
    MemoryApprovalStore,
    RedisApprovalStore,
)
from gateway.devidp import DevIdentityProvider
from gateway.oauth.access_token import Principal
from gateway.proxy.request_body import RpcMessage
from tests.support.audit import audit_events
from tests.support.harness import CLIENT_ID, CLIENT_SECRET, GatewayHarness, running_gateway
from tests.support.loopback import free_port
from tests.support.mcp_http import McpHttp, legacy_call, legacy_handshake, open_legacy_stream, tool_call
from tests.support.redis_server import RedisServer, running_redis
from tests.support.sdk import text_of
from tests.support.serve import config_document, served
from tests.support.upstreams import RunningUpstream, start_upstream

FORBIDDEN = -32003
RULES = {
    "tools": [
        {
            "id": "refunds",
            "groups": ["support"],
            "allow": ["echo"],
            "require_approval": {"message": "Refund <b>now</b>?", "approver_groups": ["finance"]},
        },
        {"id": "weather", "groups": ["support"], "allow": ["get_weather"]},
    ]
}
TIMEOUT = aiohttp.ClientTimeout(total=15)
SHOWN_URLS: list[str] = []  # approval URLs the requester's client showed (URL-mode elicitation)
CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"
MODES = ["legacy", "2026-07-28"]  # 2025-11-25 sessions, and stateless 2026-07-28 requests


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningUpstream]:
    with start_upstream("streamable-json") as running:
        yield running


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
async def gw(idp: DevIdentityProvider, upstream: RunningUpstream, tmp_path: Path) -> AsyncIterator[GatewayHarness]:
    upstream.reset()
    routes = [{"name": "pay", "path": "/pay/mcp", "upstream": upstream.mcp_url, **RULES}]
    async with running_gateway(idp, routes, audit={"sink": str(tmp_path / "audit.log")}) as harness:
        yield harness


def calls_seen(upstream: RunningUpstream) -> list[Any]:
    return [e["arguments"] for e in upstream.recorded() if e["method"] == "tools/call" and e["name"] == "echo"]


@asynccontextmanager
async def sdk(gw: GatewayHarness, mode: str, **claims: Any) -> AsyncIterator[Client]:
    """The requester's SDK client (it can show forms: it must still wait for the approvers)."""
    token = await gw.access_token("pay", user="bob", **claims)

    async def elicit(context: Any, params: Any) -> Any:
        # 2026-07-28 clients that show URLs are shown the approval page (to hand to an approver) and
        # acknowledge it; nobody asks the requester to approve their own call.
        assert params.mode == "url", "the requester must not be asked to approve their own call"
        SHOWN_URLS.append(params.url)
        return types.ElicitResult(action="accept")

    async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http:
        transport = streamable_http_client(gw.route_url("pay"), http_client=http)
        async with Client(transport, mode=mode, elicitation_callback=elicit) as client:
            yield client


async def pending(client: Client, arguments: dict[str, Any]) -> dict[str, Any]:
    """Call ``echo``; it must be parked: the ``approval_pending`` error's data."""
    with pytest.raises(MCPError) as parked:
        await client.call_tool("echo", arguments)
    assert parked.value.error.code == FORBIDDEN
    data = parked.value.error.data
    assert data["reason"] == "approval_pending", data
    return data


async def decide(
    gw: GatewayHarness, url: str, decision: str = "approve", *, user: str = "carol", groups: list[str] | None = None
) -> tuple[int, dict[str, Any]]:
    token = await gw.access_token("pay", user=user, groups=["finance"] if groups is None else groups)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        headers = {"Authorization": f"Bearer {token}"}
        async with http.post(url, json={"decision": decision}, headers=headers) as response:
            return response.status, await response.json()


async def audit_lines(gw: GatewayHarness, event: str, count: int) -> list[dict[str, Any]]:
    return await audit_events(Path(gw.config.audit_sink), event, count=count)


@pytest.mark.parametrize("mode", MODES)
async def test_an_approved_call_runs_once_and_only_with_its_arguments(
    gw: GatewayHarness, upstream: RunningUpstream, mode: str
) -> None:
    SHOWN_URLS.clear()
    async with sdk(gw, mode) as client:
        data = await pending(client, {"text": "refund 5000"})
        assert data["approval_url"] == f"{gw.config.public_url}/approvals/{data['approval_id']}"
        # A 2026-07-28 client that declares URL-mode elicitation was shown the page first.
        assert SHOWN_URLS == ([data["approval_url"]] if mode != "legacy" else [])
        assert len(data["approval_id"]) == 22 and 0 < data["expires_in"] <= 120
        # Asked again before anyone decided: the same approval, not a second one.
        assert (await pending(client, {"text": "refund 5000"}))["approval_id"] == data["approval_id"]
        assert calls_seen(upstream) == []

        assert await decide(gw, data["approval_url"]) == (200, {"approval_id": data["approval_id"], "status": GRANTED})
        # Another call (other arguments) is not covered by it.
        other = await pending(client, {"text": "refund 9000"})
        assert other["approval_id"] != data["approval_id"]
        assert text_of(await client.call_tool("echo", {"text": "refund 5000"})) == "refund 5000"
        # Used once: the identical call needs a new approval.
        again = await pending(client, {"text": "refund 5000"})
        assert again["approval_id"] not in (data["approval_id"], other["approval_id"])
        assert "Paris" in text_of(await client.call_tool("get_weather", {"city": "Paris"}))
    assert calls_seen(upstream) == [{"text": "refund 5000"}]

    asked = await audit_lines(gw, "approval.asked", 3)
    assert asked[0]["approval_id"] == data["approval_id"] and asked[0]["sub"] == "bob"
    assert asked[0]["target"] == "echo" and asked[0]["route"] == "pay" and asked[0]["approver_groups"] == ["finance"]
    (granted,) = await audit_lines(gw, "approval.granted", 1)
    assert granted["approval_id"] == data["approval_id"]
    assert (granted["approver"], granted["approver_idp"]) == ("carol", gw.idp.issuer)
    (used,) = await audit_lines(gw, "approval.used", 1)
    assert used["approval_id"] == data["approval_id"] and used["sub"] == "bob" and used["approver"] == "carol"
    assert "5000" not in Path(gw.config.audit_sink).read_text()  # never the arguments


async def test_only_an_approver_who_is_not_the_requester_decides(gw: GatewayHarness, upstream: RunningUpstream) -> None:
    # Bob is in finance too: he still cannot approve his own call.
    async with sdk(gw, "legacy", groups=["support", "finance"]) as client:
        data = await pending(client, {"text": "mine"})
        url = data["approval_url"]
        status, body = await decide(gw, url, user="alice", groups=["engineering", "support"])
        assert status == 403 and body["error"] == "forbidden" and "finance" in body["error_description"]
        status, body = await decide(gw, url, user="bob", groups=["support", "finance"])
        assert status == 403 and "separation of duties" in body["error_description"]
        assert (await pending(client, {"text": "mine"}))["approval_id"] == data["approval_id"]  # still pending
        assert (await decide(gw, url, "decline"))[0] == 200
        assert (await decide(gw, url, "approve"))[0] == 409  # decided once
        with pytest.raises(MCPError) as declined:
            await client.call_tool("echo", {"text": "mine"})
        assert declined.value.error.data["reason"] == "approval_declined"
    assert calls_seen(upstream) == []
    (line,) = await audit_lines(gw, "approval.declined", 1)
    assert line["approval_id"] == data["approval_id"] and line["approver"] == "carol"


async def test_bad_tokens_ids_and_bodies_are_refused_cleanly(gw: GatewayHarness) -> None:
    async with sdk(gw, "legacy") as client:
        url = (await pending(client, {"text": "x"}))["approval_url"]
    carol = await gw.access_token("pay", user="carol", groups=["finance"])
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        cases = [
            (url, {}, {"decision": "approve"}, 401),  # no token
            (url, {"Authorization": "Bearer not-a-token"}, {}, 401),
            (url, {"Authorization": f"Bearer {carol}"}, {"decision": "maybe"}, 400),
            (url, {"Authorization": f"Bearer {carol}"}, {"decision": ["approve"]}, 400),
            (url, {"Authorization": f"Bearer {carol}"}, [1], 400),
            (url, {"Authorization": f"Bearer {carol}", "Origin": "https://evil.example"}, {}, 403),
            (url[:-4] + "AAAA", {"Authorization": f"Bearer {carol}"}, {}, 404),  # unknown id
            (gw.url + "/approvals/../x", {"Authorization": f"Bearer {carol}"}, {}, 404),
        ]
        for target, headers, body, status in cases:
            async with http.post(target, json=body, headers=headers) as response:
                assert response.status == status, (target, headers, body, await response.text())
                assert "error" in await response.json()
        async with http.put(url) as response:
            assert response.status == 405
        form_cases = [
            ({"Authorization": f"Bearer {carol}"}, {"access_token": carol}, 400),  # two ways at once (RFC 6750 §2)
            ({}, [("access_token", carol), ("decision", "approve"), ("decision", "decline")], 400),
            ({}, {"access_token": carol, "decision": "x" * 20_000}, 413),
        ]
        for headers, form, status in form_cases:
            async with http.post(url, data=form, headers=headers) as response:
                assert response.status == status, await response.text()
        # A token revoked at the RFC 7009 endpoint decides nothing.
        revocation = {"token": carol, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        async with http.post(gw.url + "/oauth2/revoke", data=revocation) as response:
            assert response.status == 200
        async with http.post(url, json={}, headers={"Authorization": f"Bearer {carol}"}) as response:
            assert response.status == 401 and "revoked" in (await response.json())["error_description"]
        async with http.get(url) as response:
            assert "pending" in await response.text()  # nothing above decided it


async def test_the_page_escapes_everything_and_its_form_decides(gw: GatewayHarness, upstream: RunningUpstream) -> None:
    async with sdk(gw, "legacy") as client:
        data = await pending(client, {"text": "<script>alert(1)</script>"})
        url = data["approval_url"]
        async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
            async with http.get(url) as response:
                assert response.status == 200 and response.content_type == "text/html"
                page = await response.text()
                headers = response.headers
            assert (
                headers["Content-Security-Policy"]
                == "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"
            )
            assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"
            assert headers["Referrer-Policy"] == "no-referrer"
            assert "<script>" not in page and "&lt;script&gt;" in page
            assert "<b>" not in page and "Refund &lt;b&gt;now&lt;/b&gt;?" in page
            assert ">bob (" in page and "finance" in page and "pending" in page
            assert re.search(r'<input type="password" name="access_token"', page)

            carol = await gw.access_token("pay", user="carol", groups=["finance"])
            form = {"access_token": carol, "decision": "approve"}
            async with http.post(url, data=form, headers={"Origin": "https://evil.example"}) as response:
                assert response.status == 403
            async with http.post(url, data=form, headers={"Origin": gw.config.public_url}) as response:
                assert response.status == 200, await response.text()
            async with http.get(url) as response:
                page = await response.text()
            assert "granted by carol" in page and "access_token" not in page  # no form once decided
        assert text_of(await client.call_tool("echo", {"text": "<script>alert(1)</script>"}))
    assert calls_seen(upstream) == [{"text": "<script>alert(1)</script>"}]


async def test_a_client_of_the_raw_protocol_gets_the_same_answers(
    gw: GatewayHarness, upstream: RunningUpstream
) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        bob = McpHttp(http, gw.route_url("pay"), await gw.access_token("pay", user="bob"))
        await bob.initialize()
        answer = await bob.call(tool_call(7, "echo", {"text": "raw"}))
        assert answer["id"] == 7 and answer["error"]["data"]["reason"] == "approval_pending"
        assert "/approvals/" in answer["error"]["message"]
    assert calls_seen(upstream) == []


async def test_a_retry_after_expiry_asks_again_and_the_expiry_is_audited() -> None:
    """The desk on its own, with a clock of its own (no waiting for ``timeout_seconds``)."""
    clock = [time.time()]
    events: list[tuple[str, dict[str, Any]]] = []

    def observe(event: str, **fields: Any) -> None:
        events.append((event, fields))

    desk = DelegatedDesk(MemoryApprovalStore(), "https://gw.example", observe, clock=lambda: clock[0])
    raw = tool_call(1, "echo", {"text": "late"})
    message = RpcMessage("tools/call", 1, raw["params"], raw)
    binding = CallBinding("pay", "bob-key", "echo", arguments_sha256({"text": "late"}))
    spec = ApprovalSpec(timeout_seconds=5, approver_groups=("finance",))
    bob = Principal("bob", "c", "https://idp.example", "https://gw.example/pay/mcp", (), ("support",), 0.0, "jti")
    first = await desk.settle(message, binding, spec, "text", bob)
    clock[0] += 6
    second = await desk.settle(message, binding, spec, "text", bob)
    assert isinstance(first, Answered) and isinstance(second, Answered)
    first_id = first.response["error"]["data"]["approval_id"]
    assert second.response["error"]["data"]["approval_id"] != first_id
    seen = [(event, fields["approval_id"]) for event, fields in events]
    assert seen[:2] == [("approval.asked", first_id), ("approval.expired", first_id)]
    assert events[2][0] == "approval.asked"


# --- the store, memory and Redis alike ---------------------------------------------------------------


def approval(approval_id: str, fingerprint: str = "f" * 64, timeout: int = 60) -> ApprovalRequest:
    return ApprovalRequest(
        approval_id, fingerprint, "pay", "echo", "bob-key", "bob", "idp", "c", ("finance",), "t", timeout
    )


@pytest.fixture(params=["memory", "redis"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[tuple[ApprovalStore, ApprovalStore]]:
    """Two handles on one store: two replicas sharing Redis, or one process's memory."""
    if request.param == "memory":
        memory = MemoryApprovalStore()
        yield memory, memory
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"test:{time.monotonic_ns()}:"
    pair = [RedisApprovalStore.from_url(server.url) for _ in range(2)]
    for store in pair:
        store._prefix, store._pointer_prefix = prefix + "a:", prefix + "p:"  # isolated from other tests
    yield pair[0], pair[1]
    for store in pair:
        await store.close()


async def test_store_transitions_happen_once(stores: tuple[ApprovalStore, ApprovalStore]) -> None:
    one, two = stores
    now = time.time()
    first = await one.open(approval("a" * 22), now)
    assert first.created and first.record.status == PENDING
    again = await two.open(approval("b" * 22), now)
    assert not again.created and again.record.request.approval_id == "a" * 22
    assert await one.use("a" * 22, now) is False  # not granted yet
    decided = await asyncio.gather(
        one.decide("a" * 22, GRANTED, "carol", "idp", now), two.decide("a" * 22, DECLINED, "dave", "idp", now)
    )
    assert sorted(decided) == sorted([DECIDED, CONFLICT])
    record = await two.get("a" * 22, now)
    assert record is not None and record.status in (GRANTED, DECLINED)
    if record.status == DECLINED:
        return
    used = await asyncio.gather(one.use("a" * 22, now), two.use("a" * 22, now))
    assert sorted(used) == [False, True]
    assert (await two.open(approval("c" * 22), now)).created  # used: the binding needs a new approval
    assert await one.decide("z" * 22, GRANTED, "carol", "idp", now) == UNKNOWN


async def test_store_reports_an_approval_that_expired_unused(stores: tuple[ApprovalStore, ApprovalStore]) -> None:
    one, two = stores
    now = time.time()
    await one.open(approval("d" * 22, "e" * 64, timeout=5), now)
    assert await two.get("d" * 22, now + 6) is None
    assert await two.decide("d" * 22, GRANTED, "carol", "idp", now + 6) == UNKNOWN
    later = await two.open(approval("g" * 22, "e" * 64), now + 6)
    assert later.created and later.expired == "d" * 22


async def test_the_memory_store_is_bounded() -> None:
    store = MemoryApprovalStore(max_entries=2)
    now = time.time()
    for i in range(2):
        await store.open(approval(f"{i}" * 22, f"{i}" * 64), now)
    with pytest.raises(ApprovalStoreUnavailable):
        await store.open(approval("x" * 22, "x" * 64), now)
    assert len(store) == 2


# --- replicas: two serve processes sharing one Redis ---------------------------------------------------


async def test_an_approval_crosses_serve_processes_sharing_redis(
    tmp_path: Path, idp: DevIdentityProvider, upstream: RunningUpstream, redis_server: RedisServer
) -> None:
    upstream.reset()
    documents = []
    for port in (free_port(), free_port()):
        document = config_document(port, idp, {"pay": upstream.mcp_url}, replay_store=redis_server.url)
        document["routes"][0].update(RULES)
        documents.append(document)
    async with (
        served(tmp_path, idp, documents[0], name="one") as one,
        served(tmp_path, idp, documents[1], name="two") as two,
    ):
        bob = await one.client("pay", user="bob", groups=["support"])
        answer = await bob.call(tool_call(2, "echo", {"text": "replicated"}))
        data = answer["error"]["data"]
        assert data["reason"] == "approval_pending"
        assert data["approval_url"].startswith(one.public_url + "/approvals/")
        # Carol approves at the other replica, with a token that replica issued her.
        carol = await two.token("pay", user="carol")
        url = two.base + "/approvals/" + data["approval_id"]
        async with two.http.post(url, json={}, headers={"Authorization": f"Bearer {carol}"}) as response:
            assert response.status == 403  # carol is no approver without the finance group
        # Bob, even in finance, cannot approve his own call.
        bob_at_two = await two.token("pay", user="bob", groups=["support", "finance"])
        async with two.http.post(url, json={}, headers={"Authorization": f"Bearer {bob_at_two}"}) as response:
            assert response.status == 403
        finance = await two.token("pay", user="carol", groups=["finance"])
        async with two.http.post(url, json={}, headers={"Authorization": f"Bearer {finance}"}) as response:
            assert response.status == 200, await response.text()
        answer = await bob.call(tool_call(3, "echo", {"text": "replicated"}))
        assert answer["result"]["content"][0]["text"] == "replicated"
        answer = await bob.call(tool_call(4, "echo", {"text": "replicated"}))
        assert answer["error"]["data"]["reason"] == "approval_pending"
        assert data["approval_id"] not in one.stderr() + two.stderr()  # the capability is not logged
    assert calls_seen(upstream) == [{"text": "replicated"}]


async def test_an_upstream_asking_for_input_keeps_working_after_an_approval_by_someone_else(
    idp: DevIdentityProvider,
) -> None:
    """MCP 2026-07-28: the approved call's upstream answers with its own InputRequiredResult rounds; the
    rounds belong to the one approved call (the gateway wraps the upstream's state), so they need no
    second approval."""
    rules = {
        "tools": [{"groups": ["support"], "allow": ["test_*"], "require_approval": {"approver_groups": ["finance"]}}]
    }
    tool = "test_input_required_result_multi_round"
    answers = {"name": "Ada", "color": "blue"}

    async def elicit(context: Any, params: Any) -> types.ElicitResult:
        if params.mode == "url":  # the approval page, shown to the requester to pass on
            return types.ElicitResult(action="accept")
        field = next(iter(params.requested_schema["properties"]))
        return types.ElicitResult(action="accept", content={field: answers[field]})

    with start_upstream("streamable-sse", module="tests.support.conformance_server") as modern:
        routes = [{"name": "pay", "path": "/pay/mcp", "upstream": modern.mcp_url, **rules}]
        async with running_gateway(idp, routes) as gw:
            token = await gw.access_token("pay", user="bob")
            async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http:
                transport = streamable_http_client(gw.route_url("pay"), http_client=http)
                async with Client(transport, mode="2026-07-28", elicitation_callback=elicit) as client:
                    with pytest.raises(MCPError) as parked:
                        await client.call_tool(tool, {})
                    url = parked.value.error.data["approval_url"]
                    assert (await decide(gw, url))[0] == 200
                    assert text_of(await client.call_tool(tool, {})) == "Ada likes blue."


def modern_call(request_id: int, arguments: dict[str, Any], **params: Any) -> dict[str, Any]:
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"elicitation": {"url": {}}},
        "io.modelcontextprotocol/clientInfo": {"name": "approvals-test", "version": "1"},
    }
    body = {"name": "echo", "arguments": arguments, "_meta": meta, **params}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": body}


async def modern_post(http: aiohttp.ClientSession, gw: GatewayHarness, token: str, body: dict[str, Any]) -> Any:
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "echo",
    }
    async with http.post(gw.route_url("pay"), json=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def test_a_client_that_shows_urls_gets_the_approval_page_as_a_url_elicitation(
    gw: GatewayHarness, upstream: RunningUpstream
) -> None:
    """MCP 2026-07-28 URL-mode elicitation: the approval page is shown to the requester; the retry is
    forwarded once if an approver granted it meanwhile; dismissed, nothing is forwarded; the round's
    state is used once."""
    token = await gw.access_token("pay", user="bob")
    seen = {"action": "accept"}
    async with aiohttp.ClientSession(timeout=TIMEOUT) as http:
        first = (await modern_post(http, gw, token, modern_call(1, {"text": "10"})))["result"]
        assert first["resultType"] == "input_required"
        request = first["inputRequests"]["mcp_gateway_approval"]
        assert request["method"] == "elicitation/create" and request["params"]["mode"] == "url"
        url, state = request["params"]["url"], first["requestState"]
        assert url.startswith(f"{gw.config.public_url}/approvals/")

        dismissed = modern_call(
            2, {"text": "10"}, requestState=state, inputResponses={"mcp_gateway_approval": {"action": "cancel"}}
        )
        answer = await modern_post(http, gw, token, dismissed)
        assert answer["error"]["data"]["reason"] == "approval_cancelled"

        state = (await modern_post(http, gw, token, modern_call(3, {"text": "10"})))["result"]["requestState"]
        assert (await decide(gw, url))[0] == 200  # the approver decided before the requester came back
        retry = modern_call(4, {"text": "10"}, requestState=state, inputResponses={"mcp_gateway_approval": seen})
        done = await modern_post(http, gw, token, retry)
        assert done["result"]["content"][0]["text"] == "10", done
        replayed = await modern_post(http, gw, token, {**retry, "id": 5})
        assert replayed["error"]["data"]["detail"] == "replayed"
    assert calls_seen(upstream) == [{"text": "10"}]


async def test_legacy_http_sse_clients_are_parked_and_run_the_call_once_approved(
    idp: DevIdentityProvider, upstream_legacy: RunningUpstream
) -> None:
    """The 2024-11-05 HTTP+SSE transport: answers travel on the GET stream, refusals too; approval by
    someone else works for it as for any client (nobody can be asked on that transport)."""
    routes = [{"name": "pay", "path": "/pay", "upstream": upstream_legacy.base_url, "transport": "sse", **RULES}]
    async with running_gateway(idp, routes) as gw, aiohttp.ClientSession(timeout=TIMEOUT) as http:
        token = await gw.access_token("pay", user="bob")
        headers = {"Authorization": f"Bearer {token}"}
        stream, endpoint = await open_legacy_stream(http, gw.route_url("pay") + "/sse", token)
        try:
            await legacy_handshake(http, stream, gw.url + endpoint, headers)
            upstream_legacy.reset()
            parked = await legacy_call(http, stream, gw.url + endpoint, headers, tool_call(2, "echo", {"text": "7"}))
            data = parked["error"]["data"]
            assert data["reason"] == "approval_pending", parked
            assert calls_seen(upstream_legacy) == []
            assert (await decide(gw, data["approval_url"]))[0] == 200
            done = await legacy_call(http, stream, gw.url + endpoint, headers, tool_call(3, "echo", {"text": "7"}))
            assert done["result"]["content"][0]["text"] == "7", done
            again = await legacy_call(http, stream, gw.url + endpoint, headers, tool_call(4, "echo", {"text": "7"}))
            assert again["error"]["data"]["reason"] == "approval_pending"
        finally:
            stream.close()
    assert calls_seen(upstream_legacy) == [{"text": "7"}]
