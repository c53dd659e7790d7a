"""One reading of every request (gateway/proxy/request_body.py) and shape-based list filtering.

Unit tables for the strict parse, then the gateway end to end in front of a scripted upstream that
records the exact bytes and headers it receives and answers whatever the test scripts (list-shaped
results for untracked requests, ids spelled ``1.0``, list results on a GET stream), which no SDK
server does on demand.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.devidp import DevIdentityProvider
from gateway.policy import MAX_TARGET_CHARS, RoutePolicy, Rule, RuleSet, target_problem
from gateway.proxy.jsonrpc import ResultRewriter
from gateway.proxy.request_body import (
    INVALID_REQUEST,
    MAX_DEPTH,
    PARSE_ERROR,
    BodyRefused,
    canonical_json,
    check_encoding,
    read_rpc_body,
)
from tests.support.harness import GatewayHarness, running_gateway
from tests.support.loopback import serve_app
from tests.support.mcp_http import ACCEPT, WAIT, McpHttp, read_event, request, tool_call
from tests.support.planning import plan_body

CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}

# -- the strict parse ----------------------------------------------------------------------------

REFUSED_BODIES: list[tuple[str, bytes, int]] = [
    ("empty", b"", PARSE_ERROR),
    ("not json", b"{oops", PARSE_ERROR),
    (
        "invalid utf-8 in a name",
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"ec\xffho"}}',
        PARSE_ERROR,
    ),
    ("overlong utf-8 for '/'", b'{"jsonrpc":"2.0","id":1,"method":"x\xc0\xafy"}', PARSE_ERROR),
    ("utf-8 bom", b"\xef\xbb\xbf" + json.dumps(CALL).encode(), PARSE_ERROR),
    ("utf-16 bytes", json.dumps(CALL).encode("utf-16-le"), PARSE_ERROR),
    ("NaN", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"x":NaN}}', PARSE_ERROR),
    ("Infinity", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"x":-Infinity}}', PARSE_ERROR),
    ("number beyond a double", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"x":1e400}}', PARSE_ERROR),
    ("trailing garbage", json.dumps(CALL).encode() + b" x", PARSE_ERROR),
    ("two documents", json.dumps(CALL).encode() * 2, PARSE_ERROR),
    ("python recursion limit", b"[" * 100_000 + b"]" * 100_000, PARSE_ERROR),
    (
        "deeper than the limit",
        b'{"jsonrpc":"2.0","id":1,"method":"m","params":{"a":' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}}",
        INVALID_REQUEST,
    ),
    ("empty batch", b"[]", INVALID_REQUEST),
    ("batch with a number", b"[" + json.dumps(CALL).encode() + b",1]", INVALID_REQUEST),
    ("batch with a nested batch", b"[[" + json.dumps(CALL).encode() + b"]]", INVALID_REQUEST),
    ("a string", b'"tools/call"', INVALID_REQUEST),
    ("no jsonrpc member", b'{"id":1,"method":"tools/call"}', INVALID_REQUEST),
    ("jsonrpc 1.0", b'{"jsonrpc":"1.0","id":1,"method":"tools/call"}', INVALID_REQUEST),
    ("method not a string", b'{"jsonrpc":"2.0","id":1,"method":["tools/call"]}', INVALID_REQUEST),
    ("params a string", b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":"echo"}', INVALID_REQUEST),
    ("request and response at once", b'{"jsonrpc":"2.0","id":1,"method":"m","result":{}}', INVALID_REQUEST),
    ("neither request nor response", b'{"jsonrpc":"2.0","id":1}', INVALID_REQUEST),
    ("response with result and error", b'{"jsonrpc":"2.0","id":1,"result":{},"error":{}}', INVALID_REQUEST),
    ("null id", b'{"jsonrpc":"2.0","id":null,"method":"tools/call"}', INVALID_REQUEST),
    ("id 1.0", b'{"jsonrpc":"2.0","id":1.0,"method":"tools/call"}', INVALID_REQUEST),
    ("id true", b'{"jsonrpc":"2.0","id":true,"method":"tools/call"}', INVALID_REQUEST),
    ("id object", b'{"jsonrpc":"2.0","id":{"a":1},"method":"tools/call"}', INVALID_REQUEST),
    ("id array", b'{"jsonrpc":"2.0","id":[1],"method":"tools/call"}', INVALID_REQUEST),
    ("id beyond 2^53", b'{"jsonrpc":"2.0","id":9007199254740993,"method":"tools/call"}', INVALID_REQUEST),
]


@pytest.mark.parametrize(("body", "code"), [c[1:] for c in REFUSED_BODIES], ids=[c[0] for c in REFUSED_BODIES])
def test_unreadable_bodies_are_refused(body: bytes, code: int) -> None:
    with pytest.raises(BodyRefused) as refused:
        read_rpc_body(body)
    assert (refused.value.status, refused.value.code) == (400, code)


@pytest.mark.parametrize(
    "message",
    [
        CALL,
        {**CALL, "id": "a string id"},
        {**CALL, "id": -(2**53 - 1)},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 0, "result": {"action": "accept"}},  # answering the server's elicitation
        {"jsonrpc": "2.0", "id": "s-1", "error": {"code": -1, "message": "no"}},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "m",
            "params": {"a": json.loads("[" * (MAX_DEPTH - 3) + "]" * (MAX_DEPTH - 3))},
        },
    ],
    ids=["call", "string id", "lowest safe id", "notification", "response", "error response", "deep but allowed"],
)
def test_well_formed_messages_are_read(message: dict[str, Any]) -> None:
    body = read_rpc_body(json.dumps(message).encode())
    assert not body.batch and body.messages[0].raw == message


async def test_duplicate_keys_are_read_once_and_forwarded_once() -> None:
    """Python keeps the last copy; the canonical body then carries only that copy, so an upstream that
    would keep the first copy (or refuse duplicates) reads the same call the gateway decided."""
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_everything","name":"echo"}}'
    plan = await plan_body(body)
    assert plan.forward_body == b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}'


def test_canonical_json_is_ascii_and_keeps_lone_surrogates_escaped() -> None:
    value = {"text": "ü \ud800 \u2028"}
    encoded = canonical_json(value)
    assert encoded == b'{"text":"\\u00fc \\ud800 \\u2028"}'
    assert json.loads(encoded) == value


@pytest.mark.parametrize(
    ("content_type", "encodings", "status"),
    [
        ("application/json", [], None),
        ("Application/JSON; charset=UTF-8", [], None),
        ('application/json; charset="utf-8"', ["identity"], None),
        ("application/json", ["gzip"], None),  # undone by the server stack before we read
        ("application/json", ["GZIP"], None),
        ("application/json; charset=utf-16", [], 400),
        ("application/json; charset=latin-1", [], 400),
        ("application/json", ["gzip, gzip"], 400),
        ("application/json", ["gzip", "gzip"], 400),
        ("application/json", ["x-custom"], 400),
        ("application/json", ["compress"], 400),
        ("text/plain", [], 415),
        ("text/plain, application/json", [], 415),  # the Python SDK server would accept this one
        (None, [], 415),
    ],
)
def test_content_type_and_encoding(content_type: str | None, encodings: list[str], status: int | None) -> None:
    if status is None:
        check_encoding(content_type, encodings)
        return
    with pytest.raises(BodyRefused) as refused:
        check_encoding(content_type, encodings)
    assert refused.value.status == status


@pytest.mark.parametrize(
    ("kind", "target", "problem"),
    [
        ("resources", "config://app", False),
        ("resources", "config://a..b", False),
        ("resources", "config://app?x=..", False),
        ("resources", "file:///srv/config/../secrets", True),
        ("resources", "file:///srv/config/./x", True),
        ("resources", "config://app/..;/secret", True),
        ("resources", "config://app/.;x=1/secret", True),
        ("resources", "config://app%2f..%2fsecret", True),
        ("resources", "config://app%2E%2E", True),
        ("resources", "config://app\\..\\secret", True),
        ("tools", "..", False),  # tool names are not paths
        ("tools", "x" * MAX_TARGET_CHARS, False),
        ("tools", "x" * (MAX_TARGET_CHARS + 1), True),
    ],
)
def test_target_problem(kind: str, target: str, problem: bool) -> None:
    assert (target_problem(kind, target) is not None) is problem


def test_id_spelled_as_a_double_by_the_upstream_still_matches() -> None:
    rewriter = ResultRewriter()
    rewriter.expect(7, lambda result: {**result, "seen": True})
    assert json.loads(rewriter.rewrite_json(b'{"jsonrpc":"2.0","id":7.0,"result":{}}'))["result"] == {"seen": True}


LIST_POLICY = RoutePolicy(
    RuleSet((Rule.make(["*"], ["echo"]),)), RuleSet((Rule.make(["*"], ["config://*"]),)), RuleSet(None)
)


@pytest.mark.parametrize(
    ("raw", "kept"),
    [
        (b'{"jsonrpc":"2.0","id":99,"result":{"tools":[{"name":"echo"},{"name":"secret_tool"}]}}', ["echo"]),
        (b'{"jsonrpc":"2.0","id":"x","result":{"\\u0074ools":[{"name":"echo"},{"name":"secret_tool"}]}}', ["echo"]),
        (b'[{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"secret_tool"},{"name":"echo"}]}}]', ["echo"]),
        (b'{"jsonrpc":"2.0","id":3,"result":{"tools":[{"name":"echo"}],"nextCursor":"c"}}', ["echo"]),
    ],
    ids=["untracked id", "escaped key", "batch", "nothing to drop"],
)
def test_every_list_shaped_result_is_filtered_without_tracking(raw: bytes, kept: list[str]) -> None:
    rewriter = ResultRewriter(lambda result: LIST_POLICY.filter_lists(result, frozenset()))
    out = json.loads(rewriter.rewrite_json(raw))
    message = out[0] if isinstance(out, list) else out
    assert [tool["name"] for tool in message["result"]["tools"]] == kept
    event = b"id: 4\ndata: " + raw + b"\n\n"
    assert b"secret_tool" not in rewriter.rewrite_event(event)


def test_resource_lists_drop_unsafe_and_oversized_uris() -> None:
    items = [{"uri": "config://app"}, {"uri": "config://app/../secret"}, {"uri": "config://" + "a" * MAX_TARGET_CHARS}]
    result = LIST_POLICY.filter_lists({"resources": items}, frozenset())
    assert result == {"resources": [{"uri": "config://app"}]}


# -- end to end: a scripted upstream -------------------------------------------------------------


@dataclass
class ScriptedUpstream:
    """Records every request's method, headers and body bytes; answers each JSON-RPC request with
    ``answer(message)`` (JSON), and a GET with an SSE stream of ``get_events`` that stays open."""

    received: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    get_events: list[dict[str, Any]] = field(default_factory=list)

    def answer(self, message: dict[str, Any]) -> dict[str, Any]:
        if message.get("method") == "initialize":
            # 1.0: the id spelled the way a JavaScript server may spell it.
            return {
                "jsonrpc": "2.0",
                "id": float(message["id"]),
                "result": {"capabilities": {}, "protocolVersion": "x"},
            }
        if message.get("method") == "big":
            return {"jsonrpc": "2.0", "id": message["id"], "result": {"tools": [], "blob": "x" * (17 * 1024 * 1024)}}
        # Whatever was asked, a tools list: list filtering must not depend on what the request was.
        tools = [{"name": "echo"}, {"name": "secret_tool"}]
        return {"jsonrpc": "2.0", "id": message.get("id"), "result": {"tools": tools, "content": []}}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/mcp", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append((request.method, dict(request.headers), body))
        if request.method == "GET":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for message in self.get_events:
                await response.write(b"data: " + json.dumps(message).encode() + b"\n\n")
            await asyncio.Event().wait()  # open until the client leaves (cancels this handler)
        data = json.loads(body)
        if isinstance(data, list):
            return web.json_response([self.answer(m) for m in data if "id" in m])
        if "id" not in data:
            return web.Response(status=202)
        return web.json_response(self.answer(data))


@asynccontextmanager
async def scripted(idp: DevIdentityProvider, **options: Any) -> AsyncIterator[tuple[ScriptedUpstream, GatewayHarness]]:
    upstream = ScriptedUpstream()
    async with serve_app(upstream.app(), handler_cancellation=True) as base:
        routes = [
            {
                "name": "scripted",
                "path": "/scripted/mcp",
                "upstream": base + "/mcp",
                "tools": [{"groups": ["*"], "allow": ["echo"]}],
                "resources": [{"groups": ["*"], "allow": ["config://*"]}],
            }
        ]
        async with running_gateway(idp, routes, **options) as harness:
            yield upstream, harness


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def post_raw(client: McpHttp, body: bytes, **headers: str) -> tuple[int, Any]:
    async with client.http.post(client.url, data=body, headers=client.headers(**headers)) as response:
        return response.status, await response.json(content_type=None)


async def test_what_reaches_the_upstream_is_the_canonical_body(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    async with scripted(idp) as (upstream, gw):
        client = McpHttp(http, gw.route_url("scripted"), await gw.access_token("scripted"))
        body = (
            b'{ "params" : {"name":"secret_tool", "name" : "\\u0065cho", "arguments":{"t":"\\u00fc"}},'
            b'"id":5,"method":"tools/call","jsonrpc":"2.0"}'
        )
        status, answer = await post_raw(client, body, **{"Content-Type": "application/json; charset=utf-8"})
        assert status == 200 and answer["id"] == 5
        compressed = gzip.compress(json.dumps(tool_call(6, "echo")).encode())
        status, _ = await post_raw(
            client, compressed, **{"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )
        assert status == 200
    (_, first_headers, first), (_, second_headers, second) = upstream.received
    assert (
        first == b'{"params":{"name":"echo","arguments":{"t":"\\u00fc"}},"id":5,"method":"tools/call","jsonrpc":"2.0"}'
    )
    assert second == json.dumps(tool_call(6, "echo"), separators=(",", ":")).encode()
    for headers in (first_headers, second_headers):
        assert headers["Content-Type"] == "application/json"
        assert "Content-Encoding" not in headers


@pytest.mark.parametrize(
    ("case", "body", "headers", "status", "code"),
    [
        (
            "double gzip",
            gzip.compress(gzip.compress(json.dumps(tool_call(1, "secret_tool")).encode())),
            {"Content-Encoding": "gzip, gzip"},
            400,
            PARSE_ERROR,
        ),
        (
            "unknown coding",
            zlib.compress(json.dumps(tool_call(1, "secret_tool")).encode()),
            {"Content-Encoding": "x-zlib"},
            400,
            PARSE_ERROR,
        ),
        ("corrupt gzip", b"\x1f\x8b\x08\x00garbage", {"Content-Encoding": "gzip"}, 400, PARSE_ERROR),
        (
            "gzip that fails to inflate",
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + b"\xff" * 50,
            {"Content-Encoding": "gzip"},
            400,
            PARSE_ERROR,
        ),
        (
            "utf-16 charset",
            json.dumps(tool_call(1, "secret_tool")).encode("utf-16"),
            {"Content-Type": "application/json; charset=utf-16"},
            400,
            PARSE_ERROR,
        ),
        (
            "not json media type",
            json.dumps(tool_call(1, "secret_tool")).encode(),
            {"Content-Type": "text/plain"},
            415,
            INVALID_REQUEST,
        ),
        (
            "invalid utf-8",
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"secret\xff_tool"}}',
            {},
            400,
            PARSE_ERROR,
        ),
        (
            "non-object in a batch",
            b"[" + json.dumps(tool_call(1, "echo")).encode() + b', "x"]',
            {},
            400,
            INVALID_REQUEST,
        ),
        (
            "float id",
            b'{"jsonrpc":"2.0","id":1.5,"method":"tools/call","params":{"name":"secret_tool"}}',
            {},
            400,
            INVALID_REQUEST,
        ),
    ],
)
async def test_unreadable_bodies_never_reach_the_upstream(
    idp: DevIdentityProvider,
    http: aiohttp.ClientSession,
    case: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: int,
) -> None:
    async with scripted(idp) as (upstream, gw):
        client = McpHttp(http, gw.route_url("scripted"), await gw.access_token("scripted"))
        got, answer = await post_raw(client, body, **{"Content-Type": "application/json", **headers})
    assert (got, answer["jsonrpc"], answer["error"]["code"]) == (status, "2.0", code)
    assert upstream.received == []


async def test_list_shaped_results_are_filtered_on_post_and_get_streams(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    async with scripted(idp) as (upstream, gw):
        upstream.get_events = [
            {"jsonrpc": "2.0", "id": "replayed", "result": {"tools": [{"name": "secret_tool"}, {"name": "echo"}]}},
            {"jsonrpc": "2.0", "id": 3, "result": {"resources": [{"uri": "config://a"}, {"uri": "secret://b"}]}},
        ]
        client = McpHttp(http, gw.route_url("scripted"), await gw.access_token("scripted"))
        # An allowed call whose answer has the shape of a list result: filtered although untracked.
        call = await client.call(tool_call(2, "echo"))
        assert [t["name"] for t in call["result"]["tools"]] == ["echo"]
        # The handshake's id comes back as 1.0 and is still recognised (the extension is added).
        init = await client.call(request(1, "initialize", {}))
        assert (
            "io.modelcontextprotocol/enterprise-managed-authorization" in init["result"]["capabilities"]["extensions"]
        )
        headers = client.headers(Accept="text/event-stream", **{"Last-Event-ID": "0"})
        async with http.get(client.url, headers=headers) as stream:
            async with asyncio.timeout(WAIT):
                first, second = await read_event(stream.content), await read_event(stream.content)
    assert first is not None and second is not None
    assert json.loads(first.data)["result"]["tools"] == [{"name": "echo"}]
    assert json.loads(second.data)["result"]["resources"] == [{"uri": "config://a"}]


@pytest.mark.parametrize(
    ("uri", "allowed"),
    [
        ("config://app", True),
        ("config://app/../../secret", False),
        ("config://app%2f..%2fsecret", False),
        ("config://" + "a" * 2000, False),
    ],
    ids=["plain", "dot segments", "encoded separators", "oversized"],
)
async def test_resource_uris_are_decided_on_a_safe_form(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, uri: str, allowed: bool
) -> None:
    async with scripted(idp) as (upstream, gw):
        client = McpHttp(http, gw.route_url("scripted"), await gw.access_token("scripted"))
        answer = await client.call(request(4, "resources/read", {"uri": uri}))
    assert ("error" not in answer) is allowed
    assert len(upstream.received) == int(allowed)
    if not allowed:
        assert answer["error"]["code"] == -32003
        assert len(answer["error"]["message"]) < 400  # never an attacker-sized echo


async def test_a_cancelled_call_is_audited_when_decided_and_completed_as_499(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    sink = tmp_path / "audit.log"
    async with scripted(idp, audit={"sink": str(sink)}) as (_, gw):
        client = McpHttp(http, gw.route_url("scripted"), await gw.access_token("scripted"))
        async with http.get(client.url, headers=client.headers(Accept="text/event-stream")) as stream:
            request_id = stream.headers["X-Request-Id"]
            assert stream.status == 200
            # The stream is open and will never end: its decision is already in the trail.
            async with asyncio.timeout(WAIT):
                while request_id not in (sink.read_text() if sink.exists() else ""):
                    await asyncio.sleep(0.02)
        async with asyncio.timeout(WAIT):
            while '"request.completed"' not in sink.read_text():
                await asyncio.sleep(0.02)
    lines = [json.loads(line) for line in sink.read_text().splitlines()]
    mine = [line for line in lines if line.get("request_id") == request_id]
    assert [line["event"] for line in mine] == ["request.allowed", "request.completed"]
    assert mine[1]["status"] == 499


async def test_repeated_legacy_session_parameters_are_refused(gw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    token = await gw.access_token("legacy")
    url = gw.route_url("legacy") + "/messages/?session_id=a&session%5Fid=b"
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
    async with http.post(url, json=tool_call(1, "echo"), headers=headers) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == INVALID_REQUEST


async def test_a_json_result_too_large_to_inspect_is_refused_not_truncated(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    async with scripted(idp) as (_, gw):
        client = McpHttp(http, gw.route_url("scripted"), await gw.access_token("scripted"))
        status, answer = await post_raw(
            client, json.dumps(request(9, "big")).encode(), **{"Content-Type": "application/json"}
        )
    assert status == 502
    assert answer["id"] == 9 and answer["error"]["code"] == -32012
