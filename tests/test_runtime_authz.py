"""Runtime authorization end to end: real gateways in front of real MCP upstreams.

What each user may list and call is decided by the route's rules (gateway/policy.py) on the JSON
body (gateway/enforce.py). The upstream's recorder (``/_test/recorded``) is the witness that a denied
request never reached it; the official Python SDK client shows scope step-up; an audit log written to
a file shows that every decision is recorded once and without secrets.

Users (tests/support/harness.py): alice is in engineering and support, bob in support, carol in
contractors. Under ``RULES`` alice may use every tool but ``delete_*``, bob only ``echo`` and
``get_*``, carol no tool; only engineering reads ``config://*``; everybody gets the ``greeting`` prompt.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from mcp import Client
from mcp.client.auth.extensions.identity_assertion import IdentityAssertionOAuthProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from gateway.audit import FIELDS
from gateway.devidp import DevIdentityProvider
from tests.support.harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    OTHER_CLIENT_ID,
    OTHER_CLIENT_SECRET,
    GatewayHarness,
    make_config,
    running_gateway,
    start_harness,
)
from tests.support.loopback import serve_app
from tests.support.mcp_http import (
    ACCEPT,
    INITIALIZED,
    WAIT,
    McpHttp,
    initialize_request,
    legacy_call,
    legacy_handshake,
    open_legacy_stream,
    open_session,
    read_response,
    request,
    rest_of_stream,
    tool_call,
    tool_text,
)
from tests.support.sdk import MemoryStorage, exchange_at_idp, text_of
from tests.support.upstreams import RunningUpstream

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = -32003
HEADER_MISMATCH = -32020
FULL_SCOPE = "mcp mcp:tools:call"
RULES: dict[str, Any] = {
    "tools": [
        {"groups": ["support"], "allow": ["echo", "get_*"]},
        {"groups": ["engineering"], "allow": ["*"], "deny": ["delete_*"]},
    ],
    "resources": [{"groups": ["engineering"], "allow": ["config://*"]}],
    "prompts": [{"groups": ["*"], "allow": ["greeting"]}],
}
SCOPES = ["mcp", "mcp:tools:call"]
REQUIRE_TOOLS_CALL = {"tools/call": ["mcp:tools:call"]}
AUDIT_EVENTS = {
    "token.issued",
    "token.denied",
    "request.allowed",
    "request.denied",
    "tool.called",
    "tool.denied",
    "resource.accessed",
    "resource.denied",
    "prompt.got",
    "prompt.denied",
    "session.mismatch",
    "config.reload",
    "request.completed",
}
CALL_KINDS = {"tool", "resource", "prompt"}
DONE = "request.completed"  # the prefixes of the per-call audit events


def policy_routes(json_upstream: str, sse_upstream: str, legacy_upstream: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "tools",
            "path": "/tools/mcp",
            "upstream": json_upstream,
            **RULES,
            "scopes": SCOPES,
            "require_scopes": REQUIRE_TOOLS_CALL,
        },
        {"name": "tools-sse", "path": "/tools-sse/mcp", "upstream": sse_upstream, **RULES, "scopes": SCOPES},
        {"name": "plain", "path": "/plain/mcp", "upstream": json_upstream},
        {"name": "legacy", "path": "/legacy", "upstream": legacy_upstream, "transport": "sse"},
        {"name": "legacy-rules", "path": "/legacy-rules", "upstream": legacy_upstream, "transport": "sse", **RULES},
    ]


@pytest.fixture(scope="module")
async def authz(
    idp: DevIdentityProvider,
    upstream_json: RunningUpstream,
    upstream_sse: RunningUpstream,
    upstream_legacy: RunningUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[GatewayHarness]:
    """A gateway whose routes carry the rules above: ``tools`` (JSON responses, tools/call needs
    scope mcp:tools:call), ``tools-sse`` (SSE responses), legacy HTTP+SSE routes with and without
    rules, and ``plain`` (no rules, to see what the upstream offers)."""
    routes = policy_routes(upstream_json.mcp_url, upstream_sse.mcp_url, upstream_legacy.base_url)
    audit = {"sink": str(tmp_path_factory.mktemp("authz") / "audit.log")}
    async with running_gateway(idp, routes, audit=audit) as harness:
        yield harness


ROUTE_UPSTREAMS = {"tools": "upstream_json", "tools-sse": "upstream_sse"}
BOTH_ROUTES = pytest.mark.parametrize("route", ["tools", "tools-sse"])


@pytest.fixture
def upstream(request: pytest.FixtureRequest, route: str) -> RunningUpstream:
    """The real upstream behind ``route`` (parametrised)."""
    return request.getfixturevalue(ROUTE_UPSTREAMS[route])


async def session_for(
    h: GatewayHarness, http: aiohttp.ClientSession, route: str, user: str = "alice", scope: str = FULL_SCOPE
) -> McpHttp:
    return await open_session(h, http, route, user=user, scope=scope)


def forwarded(upstream: RunningUpstream) -> list[tuple[str, str | None]]:
    """The requests (method, target) that reached ``upstream`` since its last reset."""
    return [(e["method"], e["name"]) for e in upstream.recorded() if e["kind"] == "request"]


async def rpc(client: McpHttp, message: Any, **headers: str) -> tuple[int, str, Any]:
    """POST one message (or batch); returns status, content type and the JSON-RPC answer."""
    async with client.post(message, **headers) as response:
        if response.status == 200 and isinstance(message, dict):
            return response.status, response.content_type, await read_response(response, message["id"])
        return response.status, response.content_type, await response.json(content_type=None)


def assert_forbidden(answer: dict[str, Any], request_id: Any, target: str, route: str) -> None:
    assert answer["id"] == request_id, answer
    error = answer["error"]
    assert error["code"] == FORBIDDEN
    assert f"'{target}'" in error["message"] and f"'{route}'" in error["message"]
    assert error["data"]["reason"] == "policy"


# -- list filtering -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def all_tools(authz: GatewayHarness) -> set[str]:
    """Every tool the upstream offers, listed through the route without rules."""
    async with aiohttp.ClientSession() as http:
        client = await session_for(authz, http, "plain")
        _, _, answer = await rpc(client, request(2, "tools/list"))
    tools = {tool["name"] for tool in answer["result"]["tools"]}
    assert {"echo", "add", "get_weather", "delete_everything"} <= tools
    return tools


def visible_tools(user: str, tools: set[str]) -> set[str]:
    """What ``RULES`` let ``user`` see, written out independently of gateway/policy.py."""
    if user == "alice":
        return {t for t in tools if not t.startswith("delete_")}
    if user == "bob":
        return {t for t in tools if t == "echo" or t.startswith("get_")}
    return set()


@BOTH_ROUTES
@pytest.mark.parametrize("user", ["alice", "bob", "carol"])
async def test_tools_list_shows_only_permitted_tools(
    authz: GatewayHarness,
    http: aiohttp.ClientSession,
    upstream: RunningUpstream,
    all_tools: set[str],
    route: str,
    user: str,
) -> None:
    client = await session_for(authz, http, route, user)
    upstream.reset()
    status, content_type, answer = await rpc(client, request(2, "tools/list"))
    assert status == 200
    # The upstream decides the framing; the filter must work in both.
    assert content_type == ("text/event-stream" if route == "tools-sse" else "application/json")
    listed = {tool["name"] for tool in answer["result"]["tools"]}
    assert listed == visible_tools(user, all_tools)
    if listed:  # the kept entries are the upstream's, untouched
        assert all("inputSchema" in tool for tool in answer["result"]["tools"])
    assert forwarded(upstream) == [("tools/list", None)]


@BOTH_ROUTES
@pytest.mark.parametrize(
    ("user", "method", "key", "visible"),
    [
        ("alice", "resources/list", "resources", {"config://app"}),
        ("bob", "resources/list", "resources", set()),
        ("alice", "prompts/list", "prompts", {"greeting"}),
        ("carol", "prompts/list", "prompts", {"greeting"}),
    ],
)
async def test_resource_and_prompt_lists_show_only_permitted_items(
    authz: GatewayHarness,
    http: aiohttp.ClientSession,
    upstream: RunningUpstream,
    route: str,
    user: str,
    method: str,
    key: str,
    visible: set[str],
) -> None:
    client = await session_for(authz, http, route, user)
    status, _, answer = await rpc(client, request(2, method))
    assert status == 200
    items = answer["result"][key]
    assert {item.get("uri", item.get("name")) for item in items} == visible


# -- denied and allowed calls -----------------------------------------------------------------------

DENIED_CALLS = [
    pytest.param("bob", "tools/call", {"name": "delete_everything", "arguments": {}}, id="bob-delete_everything"),
    pytest.param("bob", "tools/call", {"name": "add", "arguments": {"a": 1, "b": 2}}, id="bob-add"),
    pytest.param("alice", "tools/call", {"name": "delete_everything", "arguments": {}}, id="alice-delete_*"),
    pytest.param("carol", "tools/call", {"name": "echo", "arguments": {"text": "x"}}, id="carol-echo"),
    pytest.param("alice", "resources/read", {"uri": "secret://payroll"}, id="alice-secret"),
    pytest.param("bob", "resources/read", {"uri": "config://app"}, id="bob-config"),
    pytest.param("alice", "resources/subscribe", {"uri": "secret://payroll"}, id="alice-subscribe-secret"),
    pytest.param("alice", "prompts/get", {"name": "admin_prompt"}, id="alice-admin_prompt"),
]


@BOTH_ROUTES
@pytest.mark.parametrize(("user", "method", "params"), DENIED_CALLS)
async def test_denied_call_is_answered_by_the_gateway_and_never_forwarded(
    authz: GatewayHarness,
    http: aiohttp.ClientSession,
    upstream: RunningUpstream,
    route: str,
    user: str,
    method: str,
    params: dict[str, Any],
) -> None:
    client = await session_for(authz, http, route, user)
    upstream.reset()
    status, content_type, answer = await rpc(client, request(7, method, params))
    assert (status, content_type) == (200, "application/json")
    assert_forbidden(answer, 7, params.get("name", params.get("uri")), route)
    assert forwarded(upstream) == []


async def test_named_call_without_a_request_id_is_still_decided(
    authz: GatewayHarness, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    """SDK servers ignore such a message, but a server that runs a notification-style call must not
    get a call the gateway never checked."""
    message = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "delete_everything", "arguments": {}}}
    client = await session_for(authz, http, "tools", "bob")
    upstream_json.reset()
    async with client.post(message) as response:
        assert response.status == 200
        answer = await response.json()
    assert_forbidden(answer, None, "delete_everything", "tools")
    assert upstream_json.recorded() == []  # not even as a notification


async def test_null_request_id_is_refused_as_invalid_request(
    authz: GatewayHarness, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    """MCP: a request id MUST NOT be null. A server that reads ``"id": null`` as a request and one that
    reads it as a notification disagree on what runs: refused before any decision."""
    message = {"jsonrpc": "2.0", "id": None, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}
    client = await session_for(authz, http, "tools", "bob")
    upstream_json.reset()
    async with client.post(message) as response:
        assert response.status == 400
        answer = await response.json()
    assert answer["error"]["code"] == -32600
    assert upstream_json.recorded() == []


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("tools/call", {"name": ["delete_everything"], "arguments": {}}),
        ("tools/call", {"arguments": {}}),
        ("resources/read", {"uri": {"href": "secret://payroll"}}),
    ],
    ids=["name-is-a-list", "no-name", "uri-is-an-object"],
)
async def test_call_without_a_string_target_is_refused_where_rules_apply(
    authz: GatewayHarness, http: aiohttp.ClientSession, upstream_json: RunningUpstream, method: str, params: Any
) -> None:
    """Nothing to match the rules against: refused, rather than left to how the upstream reads it."""
    client = await session_for(authz, http, "tools", "bob")
    upstream_json.reset()
    status, _, answer = await rpc(client, request(6, method, params))
    assert status == 200
    assert answer["error"]["code"] == FORBIDDEN
    assert "without a string name" in answer["error"]["message"]
    assert upstream_json.recorded() == []


ALLOWED_CALLS = [
    pytest.param("bob", tool_call(3, "echo", {"text": "hello"}), "hello", id="bob-echo"),
    pytest.param(
        "bob", tool_call(3, "get_weather", {"city": "Oslo"}), "Weather in Oslo: sunny, 21 C", id="bob-get_weather"
    ),
    pytest.param("alice", tool_call(3, "add", {"a": 2, "b": 40}), "42", id="alice-add"),
]


@BOTH_ROUTES
@pytest.mark.parametrize(("user", "message", "text"), ALLOWED_CALLS)
async def test_permitted_tool_call_reaches_the_upstream_unchanged(
    authz: GatewayHarness,
    http: aiohttp.ClientSession,
    upstream: RunningUpstream,
    route: str,
    user: str,
    message: dict[str, Any],
    text: str,
) -> None:
    client = await session_for(authz, http, route, user)
    upstream.reset()
    status, _, answer = await rpc(client, message)
    assert status == 200
    assert tool_text(answer) == text
    assert forwarded(upstream) == [("tools/call", message["params"]["name"])]


@BOTH_ROUTES
async def test_permitted_resource_read_and_prompt_get_reach_the_upstream(
    authz: GatewayHarness, http: aiohttp.ClientSession, upstream: RunningUpstream, route: str
) -> None:
    client = await session_for(authz, http, route, "alice")
    upstream.reset()
    _, _, read = await rpc(client, request(4, "resources/read", {"uri": "config://app"}))
    assert json.loads(read["result"]["contents"][0]["text"]) == {"feature_flags": ["demo"], "region": "test"}
    _, _, prompt = await rpc(client, request(5, "prompts/get", {"name": "greeting", "arguments": {"name": "Bob"}}))
    assert prompt["result"]["messages"][0]["content"]["text"] == "Please greet Bob warmly."
    assert forwarded(upstream) == [("resources/read", "config://app"), ("prompts/get", "greeting")]


async def open_stream(
    h: GatewayHarness, http: aiohttp.ClientSession, route: str, user: str
) -> tuple[aiohttp.ClientResponse, str, dict[str, str]]:
    """An initialised legacy HTTP+SSE session: the event stream, the POST URL and its headers."""
    token = await h.access_token(route, user=user)
    headers = {"Authorization": f"Bearer {token}"}
    stream, endpoint = await open_legacy_stream(http, h.route_url(route) + "/sse", token)
    post_url = h.url + endpoint
    await legacy_handshake(http, stream, post_url, headers)
    return stream, post_url, headers


async def test_routes_without_rules_are_unaffected(
    authz: GatewayHarness, http: aiohttp.ClientSession, upstream_legacy: RunningUpstream
) -> None:
    """The rules are per route: the ``legacy`` route has none, so carol may call anything there."""
    stream, post_url, headers = await open_stream(authz, http, "legacy", "carol")
    async with stream:
        upstream_legacy.reset()
        answer = await legacy_call(http, stream, post_url, headers, tool_call(2, "delete_everything"))
    assert tool_text(answer) == "deleted nothing (test upstream)"
    assert forwarded(upstream_legacy) == [("tools/call", "delete_everything")]


# -- batches --------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["tools"])
async def test_batch_forwards_permitted_elements_only(
    authz: GatewayHarness, http: aiohttp.ClientSession, upstream: RunningUpstream, route: str
) -> None:
    """The SDK upstream refuses JSON-RPC batches (2025-06-18 dropped them) but records what it was
    sent: only the permitted element; the denied one is answered by the gateway."""
    client = await session_for(authz, http, route, "bob")
    upstream.reset()
    batch = [tool_call(1, "echo", {"text": "a"}), tool_call(2, "delete_everything"), tool_call(3, "add")]
    _, _, answers = await rpc(client, batch)
    assert forwarded(upstream) == [("tools/call", "echo")]
    by_id = {answer.get("id"): answer for answer in answers}
    assert_forbidden(by_id[2], 2, "delete_everything", route)
    assert_forbidden(by_id[3], 3, "add", route)


@pytest.mark.parametrize("route", ["tools", "tools-sse"])
async def test_batch_of_only_denied_elements_never_reaches_the_upstream(
    authz: GatewayHarness, http: aiohttp.ClientSession, upstream: RunningUpstream, route: str
) -> None:
    client = await session_for(authz, http, route, "bob")
    upstream.reset()
    batch = [tool_call("x", "delete_everything"), request("y", "prompts/get", {"name": "admin_prompt"})]
    status, content_type, answers = await rpc(client, batch)
    assert (status, content_type) == (200, "application/json")
    assert isinstance(answers, list) and len(answers) == 2
    assert_forbidden(answers[0], "x", "delete_everything", route)
    assert_forbidden(answers[1], "y", "admin_prompt", route)
    assert forwarded(upstream) == []


class BatchUpstream:
    """A JSON-RPC server that still answers batches (as 2025-03-26 servers do), in JSON or SSE."""

    TOOLS = ("echo", "add", "delete_everything")

    def __init__(self) -> None:
        self.received: list[tuple[str | None, str | None]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        messages = body if isinstance(body, list) else [body]
        answers = []
        for message in messages:
            params = message.get("params") or {}
            self.received.append((message.get("method"), params.get("name")))
            if "id" not in message:
                continue
            if message["method"] == "tools/list":
                result: dict[str, Any] = {"tools": [{"name": n, "inputSchema": {}} for n in self.TOOLS]}
            else:
                result = {"content": [{"type": "text", "text": f"called {params.get('name')}"}]}
            answers.append({"jsonrpc": "2.0", "id": message["id"], "result": result})
        if request.path.endswith("/json"):
            return web.json_response(answers)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for answer in answers:
            await response.write(f"event: message\ndata: {json.dumps(answer)}\n\n".encode())
        await response.write_eof()
        return response


@asynccontextmanager
async def batch_upstream() -> AsyncIterator[tuple[BatchUpstream, str]]:
    upstream = BatchUpstream()
    app = web.Application()
    app.router.add_post("/{framing}", upstream.handle)
    async with serve_app(app) as base:
        yield upstream, base


async def all_messages(response: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    if response.content_type == "application/json":
        return await response.json()
    async with asyncio.timeout(WAIT):
        return await rest_of_stream(response.content)


@pytest.mark.parametrize("framing", ["json", "sse"])
async def test_mixed_batch_gets_upstream_results_filtered_and_gateway_errors_merged(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, framing: str
) -> None:
    async with batch_upstream() as (upstream, base):
        route = {"name": "batch", "path": "/batch/mcp", "upstream": f"{base}/{framing}", **RULES}
        harness = await start_harness(idp, [route])
        try:
            token = await harness.access_token("batch", user="bob")
            batch = [
                request("list", "tools/list"),
                tool_call(1, "echo", {"text": "hi"}),
                tool_call(2, "delete_everything"),
                INITIALIZED,
                request(3, "prompts/get", {"name": "admin_prompt"}),
            ]
            headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
            async with http.post(harness.route_url("batch"), json=batch, headers=headers) as response:
                assert response.status == 200
                answers = {m["id"]: m for m in await all_messages(response)}
        finally:
            await harness.runner.cleanup()
    assert upstream.received == [("tools/list", None), ("tools/call", "echo"), ("notifications/initialized", None)]
    assert set(answers) == {"list", 1, 2, 3}
    assert [tool["name"] for tool in answers["list"]["result"]["tools"]] == ["echo"]
    assert answers[1]["result"]["content"][0]["text"] == "called echo"
    assert_forbidden(answers[2], 2, "delete_everything", "batch")
    assert_forbidden(answers[3], 3, "admin_prompt", "batch")


# -- Mcp-Method / Mcp-Name mirrors -------------------------------------------------------------------


async def test_denied_call_claiming_an_allowed_tool_in_mcp_name_is_refused_as_a_mismatch(
    authz: GatewayHarness, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    """An upstream routing on ``Mcp-Name: echo`` must never receive a body that calls
    ``delete_everything``: the gateway authorises the body and refuses the disagreement."""
    client = await session_for(authz, http, "tools", "bob")
    upstream_json.reset()
    headers = {"Mcp-Method": "tools/call", "Mcp-Name": "echo"}
    status, _, answer = await rpc(client, tool_call(8, "delete_everything"), **headers)
    assert status == 400
    assert answer["id"] == 8
    assert answer["error"]["code"] == HEADER_MISMATCH
    assert forwarded(upstream_json) == []


@pytest.mark.parametrize(
    ("message", "headers", "problem"),
    [
        pytest.param(
            tool_call(9, "echo", {"text": "x"}), {"Mcp-Method": "tools/list"}, "Mcp-Method", id="method-differs"
        ),
        pytest.param(tool_call(9, "add", {"a": 1, "b": 1}), {"Mcp-Name": "echo"}, "Mcp-Name", id="name-differs"),
        pytest.param(
            request(9, "resources/read", {"uri": "config://app"}),
            {"Mcp-Name": "config://other"},
            "Mcp-Name",
            id="uri-differs",
        ),
        pytest.param(request(9, "tools/list"), {"Mcp-Name": "echo"}, "Mcp-Name", id="name-on-unnamed-method"),
        pytest.param(
            tool_call(9, "echo", {"text": "x"}), {"Mcp-Name": "=?base64?YWRk?="}, "Mcp-Name", id="base64-name-differs"
        ),
        pytest.param(
            [tool_call(9, "echo", {"text": "x"})], {"Mcp-Method": "tools/call"}, "batch", id="headers-on-a-batch"
        ),
    ],
)
async def test_header_and_body_disagreement_is_refused_before_forwarding(
    authz: GatewayHarness,
    http: aiohttp.ClientSession,
    upstream_json: RunningUpstream,
    message: Any,
    headers: dict[str, str],
    problem: str,
) -> None:
    client = await session_for(authz, http, "tools", "alice")  # alice may call all of these
    upstream_json.reset()
    status, content_type, answer = await rpc(client, message, **headers)
    assert (status, content_type) == (400, "application/json")
    assert answer["error"]["code"] == HEADER_MISMATCH
    assert problem in answer["error"]["message"]
    assert answer["id"] == 9
    assert forwarded(upstream_json) == []


async def test_repeated_mirror_header_is_refused(
    authz: GatewayHarness, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    """The gateway checked one copy; an upstream may route on the other (or on both, joined)."""
    client = await session_for(authz, http, "tools", "bob")
    upstream_json.reset()
    headers = [*client.headers().items(), ("Mcp-Name", "echo"), ("Mcp-Name", "delete_everything")]
    async with http.post(client.url, json=tool_call(11, "echo", {"text": "x"}), headers=headers) as response:
        assert response.status == 400
        answer = await response.json()
    assert answer["error"]["code"] == HEADER_MISMATCH
    assert forwarded(upstream_json) == []


async def test_batch_behind_a_byte_order_mark_is_refused(
    authz: GatewayHarness, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    """Some JSON parsers skip a UTF-8 BOM and some refuse it (RFC 8259 §8.1 lets them choose): the
    gateway refuses it, so the body cannot mean one thing here and another upstream."""
    client = await session_for(authz, http, "tools", "alice")
    upstream_json.reset()
    batch = [tool_call(12, "echo", {"text": "x"}), tool_call(13, "delete_everything")]
    body = b"\xef\xbb\xbf" + json.dumps(batch).encode()
    headers = client.headers(**{"Content-Type": "application/json", "Mcp-Method": "tools/call", "Mcp-Name": "echo"})
    async with http.post(client.url, data=body, headers=headers) as response:
        assert response.status == 400
        answer = await response.json()
    assert answer["error"]["code"] == -32700
    assert forwarded(upstream_json) == []


@pytest.mark.parametrize(
    "headers",
    [
        {"Mcp-Method": "tools/call", "Mcp-Name": "echo"},
        {"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?ZWNobw==?="},  # MCP's encoding of non-ASCII values
    ],
    ids=["plain", "base64"],
)
async def test_agreeing_mirror_headers_are_forwarded(
    authz: GatewayHarness, http: aiohttp.ClientSession, upstream_json: RunningUpstream, headers: dict[str, str]
) -> None:
    client = await session_for(authz, http, "tools", "bob")
    upstream_json.reset()
    status, _, answer = await rpc(client, tool_call(10, "echo", {"text": "mirrored"}), **headers)
    assert status == 200
    assert tool_text(answer) == "mirrored"
    assert forwarded(upstream_json) == [("tools/call", "echo")]


# -- scopes ---------------------------------------------------------------------------------------

_CHALLENGE_PARAM = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def challenge(header: str) -> dict[str, str]:
    scheme, _, params = header.partition(" ")
    assert scheme == "Bearer", header
    return dict(_CHALLENGE_PARAM.findall(params))


async def test_insufficient_scope_gets_403_with_a_step_up_challenge(
    authz: GatewayHarness, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    client = await session_for(authz, http, "tools", "alice", scope="mcp")
    upstream_json.reset()
    assert (await rpc(client, request(2, "tools/list")))[0] == 200  # only tools/call needs mcp:tools:call
    async with client.post(tool_call(3, "echo", {"text": "x"})) as response:
        assert response.status == 403
        params = challenge(response.headers["WWW-Authenticate"])
        body = await response.json()
    assert params["error"] == "insufficient_scope"
    assert params["scope"] == "mcp mcp:tools:call"  # what the token has plus what is missing
    assert params["resource_metadata"] == f"{authz.url}/.well-known/oauth-protected-resource/tools/mcp"
    assert body["error"] == "insufficient_scope"
    assert forwarded(upstream_json) == [("tools/list", None)]


async def test_scope_requirements_are_per_route(
    authz: GatewayHarness, http: aiohttp.ClientSession, upstream_sse: RunningUpstream
) -> None:
    client = await session_for(authz, http, "tools-sse", "alice", scope="mcp")
    status, _, answer = await rpc(client, tool_call(3, "echo", {"text": "no step-up here"}))
    assert status == 200
    assert tool_text(answer) == "no step-up here"


@asynccontextmanager
async def stepping_up_client(
    h: GatewayHarness, idp_scope: str, storage: MemoryStorage, assertions: list[str]
) -> AsyncIterator[Client]:
    """The official SDK client asking for scope ``mcp`` only; the IdP grants ``idp_scope``."""

    async def assertion_provider(audience: str, resource: str) -> str:
        assertions.append(resource)
        return await exchange_at_idp(h.idp, audience, resource, scope=idp_scope)

    provider = IdentityAssertionOAuthProvider(
        server_url=h.route_url("tools"),
        storage=storage,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        issuer=h.issuer,
        assertion_provider=assertion_provider,
        scope="mcp",
    )
    async with create_mcp_http_client(auth=provider) as http_client:
        async with Client(streamable_http_client(h.route_url("tools"), http_client=http_client)) as client:
            yield client


async def test_sdk_client_steps_up_when_the_idp_grants_the_scope(
    authz: GatewayHarness, upstream_json: RunningUpstream, all_tools: set[str]
) -> None:
    storage, assertions = MemoryStorage(), []
    async with asyncio.timeout(WAIT), stepping_up_client(authz, FULL_SCOPE, storage, assertions) as client:
        assert {t.name for t in (await client.list_tools()).tools} == visible_tools("alice", all_tools)
        assert storage.tokens is not None and storage.tokens.scope == "mcp"
        upstream_json.reset()
        assert text_of(await client.call_tool("echo", {"text": "stepped up"})) == "stepped up"
    # One grant for the session, a second one (with the union of scopes) after the 403.
    assert len(assertions) == 2
    assert storage.tokens.scope == FULL_SCOPE
    assert forwarded(upstream_json) == [("tools/call", "echo")]


async def test_sdk_client_step_up_fails_cleanly_when_the_idp_withholds_the_scope(
    authz: GatewayHarness, upstream_json: RunningUpstream
) -> None:
    storage, assertions = MemoryStorage(), []
    async with asyncio.timeout(WAIT), stepping_up_client(authz, "mcp", storage, assertions) as client:
        await client.list_tools()
        upstream_json.reset()
        with pytest.raises(MCPError):
            await client.call_tool("echo", {"text": "never runs"})
        # The session is still usable for what the token does cover.
        assert (await client.list_tools()).tools
    assert len(assertions) == 2  # it did try to step up...
    assert storage.tokens is not None and storage.tokens.scope == "mcp"  # ...but got no more than the IdP gave
    assert ("tools/call", "echo") not in forwarded(upstream_json)


# -- sessions across principals -----------------------------------------------------------------------


@BOTH_ROUTES
async def test_session_of_another_principal_is_refused(
    authz: GatewayHarness, http: aiohttp.ClientSession, upstream: RunningUpstream, route: str
) -> None:
    alice = await session_for(authz, http, route, "alice")
    bob = McpHttp(http, alice.url, await authz.access_token(route, user="bob", scope=FULL_SCOPE))
    bob.session_id = alice.session_id  # stolen
    upstream.reset()
    # Refused as theft whether or not the rules would let bob make the call itself.
    for call in (tool_call(2, "echo", {"text": "as alice"}), tool_call(2, "delete_everything")):
        status, _, answer = await rpc(bob, call)
        assert status == 403
        assert answer["error"] == {"code": FORBIDDEN, "message": "this session belongs to another user or client"}
    assert forwarded(upstream) == []
    # The owner is unaffected, and an id nobody issued is simply unknown.
    assert tool_text((await rpc(alice, tool_call(3, "echo", {"text": "mine"})))[2]) == "mine"
    bob.session_id = "forged." + alice.session_id.split(".", 1)[1]
    assert (await rpc(bob, tool_call(4, "echo", {"text": "x"})))[0] == 404


@pytest.mark.parametrize("param", ["session_id", "sessionId"])
async def test_legacy_session_id_query_parameter_of_another_principal_is_refused(
    authz: GatewayHarness, http: aiohttp.ClientSession, upstream_legacy: RunningUpstream, param: str
) -> None:
    """HTTP+SSE carries the session in the POST URL (Python SDK ``session_id``, TypeScript SDK
    ``sessionId``); whoever knows alice's URL must still not post into her session."""
    stream, post_url, _ = await open_stream(authz, http, "legacy", "alice")
    async with stream:
        stolen = post_url.replace("session_id=", f"{param}=")
        bob = {"Authorization": f"Bearer {await authz.access_token('legacy', user='bob')}"}
        upstream_legacy.reset()
        async with http.post(stolen, json=tool_call(2, "echo", {"text": "as alice"}), headers=bob) as response:
            assert response.status == 403
            assert (await response.json())["error"]["code"] == FORBIDDEN
    assert forwarded(upstream_legacy) == []


# -- revocation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("revoked", "client_id", "client_secret"),
    [
        ({"subjects": ["bob"]}, CLIENT_ID, CLIENT_SECRET),
        ({"clients": [OTHER_CLIENT_ID]}, OTHER_CLIENT_ID, OTHER_CLIENT_SECRET),
    ],
    ids=["subject", "client"],
)
async def test_revocation_cuts_off_live_tokens_and_new_grants_at_once(
    idp: DevIdentityProvider,
    http: aiohttp.ClientSession,
    upstream_json: RunningUpstream,
    revoked: dict[str, list[str]],
    client_id: str,
    client_secret: str,
) -> None:
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    h = await start_harness(idp, routes)
    try:

        async def grant(user: str, as_client: str, secret: str) -> tuple[int, dict[str, Any]]:
            assertion = h.id_jag(user=user, client_id=as_client)
            status, body, _ = await h.token_request(assertion, client_id=as_client, client_secret=secret)
            return status, body

        status, body = await grant("bob", client_id, client_secret)
        assert status == 200, body
        victim = McpHttp(http, h.route_url("json"), body["access_token"])
        await victim.initialize()
        survivor = await session_for(h, http, "json", "alice", scope="mcp")
        assert (await rpc(victim, tool_call(2, "echo", {"text": "before"})))[0] == 200

        assert await h.gateway.reload(make_config(h.url, [idp], routes, revoked=revoked))
        upstream_json.reset()
        async with victim.post(tool_call(3, "echo", {"text": "after"})) as response:
            assert response.status == 401
            assert challenge(response.headers["WWW-Authenticate"])["error"] == "invalid_token"
        status, body = await grant("bob", client_id, client_secret)
        assert (status, body["error"]) == (400, "invalid_grant")
        # Everybody else carries on.
        assert (await rpc(survivor, tool_call(4, "echo", {"text": "still here"})))[0] == 200
        assert (await grant("alice", CLIENT_ID, CLIENT_SECRET))[0] == 200
    finally:
        await h.runner.cleanup()
    assert forwarded(upstream_json) == [("tools/call", "echo")]  # only the survivor's call


# -- audit trail ----------------------------------------------------------------------------------


def keyed_digest(secret_material: bytes, arguments: Any) -> str:
    """HMAC-SHA256 of the canonical arguments under the HKDF-derived audit key (README "Audit log")."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"mcp-gateway", info=b"audit-arguments/v1").derive(
        secret_material
    )
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


async def read_audit(path: Path, request_ids: set[str]) -> None:
    """Wait until every request id has appeared (the log is written by a background task)."""
    deadline = time.monotonic() + WAIT
    while True:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        if request_ids <= {json.loads(line).get("request_id") for line in text.splitlines()}:
            return
        assert time.monotonic() < deadline, f"audit lines missing after {WAIT}s: {text}"
        await asyncio.sleep(0.02)


async def test_every_decision_is_audited_once_with_documented_fields_and_no_secrets(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, upstream_json: RunningUpstream, tmp_path: Path
) -> None:
    sink = tmp_path / "audit.log"
    routes = policy_routes(upstream_json.mcp_url, upstream_json.mcp_url, upstream_json.base_url)[:1]
    h = await start_harness(idp, routes, audit={"sink": str(sink), "argument_hashes": True})
    secrets = [CLIENT_SECRET, OTHER_CLIENT_SECRET, "wrong-secret-0123456789"]
    expected: dict[str, list[str]] = {}  # X-Request-Id -> the events it must produce, in order
    hashes: dict[str, str] = {}  # X-Request-Id -> args_sha256 expected on its call event

    async def token(user: str, scope: str) -> str:
        assertion = h.id_jag("tools", user=user, scope=scope)
        status, body, _ = await h.token_request(assertion)
        assert status == 200, body
        secrets.extend([assertion, body["access_token"]])
        return body["access_token"]

    async def send(client: McpHttp, message: Any, events: list[str], **headers: str) -> None:
        async with client.post(message, **headers) as response:
            await response.read()
            expected[response.headers["X-Request-Id"]] = events
            if events in (["tool.called", DONE], ["tool.denied", DONE]):
                digest = keyed_digest(h.gateway.signing_key.secret_material, message["params"]["arguments"])
                hashes[response.headers["X-Request-Id"]] = digest

    try:
        alice = McpHttp(http, h.route_url("tools"), await token("alice", FULL_SCOPE))
        async with alice.post(initialize_request()) as response:
            assert response.status == 200
            alice.session_id = response.headers["Mcp-Session-Id"]
            expected[response.headers["X-Request-Id"]] = ["request.allowed", DONE]
        await send(alice, INITIALIZED, ["request.allowed", DONE])
        argument_values = ["argument-value-ü-71c3", "argument-value-92ad", "argument-value-0f4e"]
        await send(alice, tool_call(2, "echo", {"text": argument_values[0]}), ["tool.called", DONE])
        nested = {"z": argument_values[1], "a": [1, {"y": "ü", "x": None}]}
        await send(alice, tool_call(3, "delete_everything", nested), ["tool.denied", DONE])
        await send(alice, request(4, "resources/read", {"uri": "config://app"}), ["resource.accessed", DONE])
        await send(alice, request(5, "resources/read", {"uri": "secret://payroll"}), ["resource.denied", DONE])
        greeting = {"name": "greeting", "arguments": {"name": argument_values[2]}}
        await send(alice, request(6, "prompts/get", greeting), ["prompt.got", DONE])
        await send(alice, request(7, "prompts/get", {"name": "admin_prompt"}), ["prompt.denied", DONE])
        batch = [tool_call(8, "echo", {"text": "b"}), tool_call(9, "delete_everything")]
        await send(alice, batch, ["tool.called", "tool.denied", DONE])
        await send(alice, tool_call(10, "delete_everything"), ["request.denied"], **{"Mcp-Name": "echo"})
        narrow = McpHttp(http, alice.url, await token("alice", "mcp"))
        narrow.session_id = alice.session_id
        await send(narrow, tool_call(11, "echo", {"text": "x"}), ["request.denied"])
        thief = McpHttp(http, alice.url, await token("bob", FULL_SCOPE))
        thief.session_id = alice.session_id
        await send(thief, request(12, "tools/list"), ["session.mismatch"])
        await send(McpHttp(http, alice.url, ""), request(13, "tools/list"), ["request.denied"])
        unused_assertion = h.id_jag("tools")
        secrets.append(unused_assertion)
        refused = await h.token_request(unused_assertion, client_secret="wrong-secret-0123456789")
        assert refused[0] == 401
        assert await h.gateway.reload(h.config)
        await read_audit(sink, set(expected))
    finally:
        await h.runner.cleanup()  # flushes the queue: nothing can be added after this
    lines = [json.loads(line) for line in sink.read_text(encoding="utf-8").splitlines()]

    by_request: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        assert set(line) <= set(FIELDS), line
        assert line["event"] in AUDIT_EVENTS
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
        if line["event"] == DONE:  # how a request ended, not a decision
            assert "decision" not in line and isinstance(line["status"], int) and line["latency_ms"] >= 0
        else:
            assert line["decision"] in ("allow", "deny")
        if "request_id" in line:
            by_request.setdefault(line["request_id"], []).append(line)
    assert {rid: [line["event"] for line in got] for rid, got in by_request.items()} == expected
    others = sorted((line["event"], line.get("sub"), line["decision"]) for line in lines if "request_id" not in line)
    assert others == [
        ("config.reload", None, "allow"),
        ("token.denied", None, "deny"),
        ("token.issued", "alice", "allow"),
        ("token.issued", "alice", "allow"),
        ("token.issued", "bob", "allow"),
    ]

    (token_denied,) = (line for line in lines if line["event"] == "token.denied")
    assert token_denied["status"] == 401 and token_denied["reason"].startswith("invalid_client")
    calls = [line for got in by_request.values() for line in got if line["event"].split(".")[0] in CALL_KINDS]
    assert len(calls) == 8
    for line in calls:
        assert {"request_id", "route", "sub", "client_id", "idp", "groups", "method", "target", "reason"} <= set(line)
        assert (line["sub"], line["client_id"], line["idp"], line["route"]) == ("alice", CLIENT_ID, idp.issuer, "tools")
        assert "status" not in line  # decided before the upstream answered: the status is on request.completed
    for request_id, digest in hashes.items():
        line = by_request[request_id][0]
        assert line["args_sha256"] == digest
    denied = next(line for line in calls if line["target"] == "delete_everything" and "args_sha256" in line)
    assert denied["reason"] == "denied by engineering rule"
    reasons = {line["event"]: line.get("reason") for got in by_request.values() for line in got}
    assert reasons["session.mismatch"] == "session belongs to another principal"

    text = sink.read_text(encoding="utf-8")
    for secret in [*secrets, *argument_values]:
        assert secret not in text
    assert json.dumps(argument_values[0])[1:-1] not in text  # not even JSON-escaped


# -- mcp-gateway check --as-groups ------------------------------------------------------------------


def test_check_as_groups_shows_what_a_group_may_use(tmp_path: Path) -> None:
    routes = policy_routes("http://127.0.0.1:9/mcp", "http://127.0.0.1:9/mcp", "http://127.0.0.1:9")[:2]
    eng = {"name": "eng", "path": "/eng/mcp", "upstream": "http://127.0.0.1:9/mcp", "allow_groups": ["engineering"]}
    routes.append(eng)
    config = {
        "public_url": "https://mcp.example.com",
        "authorization": {
            "clients": [{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}],
            "identity_providers": [{"issuer": "https://idp.example.com"}],
        },
        "routes": routes,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(path), "--as-groups", "support"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  tools: /tools/mcp -> "))
    assert lines[start + 1 : start + 5] == [
        "    as support: tools: allow echo, get_*",
        "    as support: resources: none",
        "    as support: prompts: allow greeting",
        "    as support: scope required for tools/call: mcp:tools:call",
    ]
    assert lines[start + 5].startswith("  tools-sse: /tools-sse/mcp -> ")  # no scope line: none required
    assert lines[start + 6 : start + 9] == lines[start + 1 : start + 4]
    assert lines[start + 9].startswith("  eng: /eng/mcp -> ")
    assert lines[start + 10] == "    as support: no access (not in allow_groups)"
    assert CLIENT_SECRET not in result.stdout


# -- legacy HTTP+SSE routes with rules ----------------------------------------------------------------


async def test_legacy_denied_call_is_answered_on_the_event_stream_and_never_forwarded(
    authz: GatewayHarness, http: aiohttp.ClientSession, upstream_legacy: RunningUpstream
) -> None:
    """HTTP+SSE clients ignore POST bodies and wait for every answer on the GET stream."""
    stream, post_url, headers = await open_stream(authz, http, "legacy-rules", "bob")
    async with stream:
        upstream_legacy.reset()
        denied = await legacy_call(http, stream, post_url, headers, tool_call(2, "delete_everything"))
        assert_forbidden(denied, 2, "delete_everything", "legacy-rules")
        allowed = await legacy_call(http, stream, post_url, headers, tool_call(3, "echo", {"text": "ok"}))
        assert tool_text(allowed) == "ok"
    assert forwarded(upstream_legacy) == [("tools/call", "echo")]


async def test_legacy_tools_list_shows_only_permitted_tools(
    authz: GatewayHarness, http: aiohttp.ClientSession, all_tools: set[str]
) -> None:
    stream, post_url, headers = await open_stream(authz, http, "legacy-rules", "bob")
    async with stream:
        answer = await legacy_call(http, stream, post_url, headers, request(2, "tools/list"))
    assert {tool["name"] for tool in answer["result"]["tools"]} == visible_tools("bob", all_tools)
