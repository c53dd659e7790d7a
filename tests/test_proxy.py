"""Behaviour of the reverse proxy (gateway/proxy/*, ``Gateway.handle_route``) through the real gateway.

Raw aiohttp clients speak MCP Streamable HTTP 2025-11-25 (and sessionless 2026-07-28 POSTs) and the
deprecated HTTP+SSE transport to real upstream MCP servers (SPEC §5). Where an SDK server cannot show
what the proxy did (a cancelled request, a server that never answers, the raw request line), a tiny
aiohttp upstream written here observes it. Ordering is made deterministic with gates and events, never
with sleeps, and every wait is bounded. No test may see a gateway 500 (checked on every client).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from gateway.app import Gateway, bind_socket, start_gateway
from gateway.devidp import DevIdentityProvider
from gateway.oauth.identity import SubjectIdentity
from gateway.proxy.forward import upstream_path_remainder
from gateway.proxy.jsonrpc import EMA_EXTENSION
from gateway.sessions import SessionCheck, principal_key
from tests.support.harness import CLIENT_ID, GatewayHarness, make_config, running_gateway
from tests.support.loopback import serve_app
from tests.support.mcp_http import (
    ACCEPT,
    MAX_EVENTS,
    PROTOCOL,
    WAIT,
    McpHttp,
    connect,
    initialize_request,
    legacy_call,
    legacy_handshake,
    new_gate,
    next_message,
    open_legacy_stream,
    read_event,
    read_response,
    request,
    response_message,
    tool_call,
    tool_text,
)
from tests.support.upstreams import RunningUpstream

MODERN_PROTOCOL = "2026-07-28"
APP_ORIGIN = "http://app.example.test"
FOREIGN_ORIGIN = "http://evil.example.test"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session that also checks "no 500 anywhere": every response any test gets is recorded."""
    seen: list[tuple[str, str, int]] = []

    async def on_request_end(_: Any, __: Any, params: aiohttp.TraceRequestEndParams) -> None:
        seen.append((params.method, str(params.url), params.response.status))

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        yield session
    assert not [s for s in seen if s[2] == 500], f"a 500 reached the client: {seen}"


# -- a tiny upstream -----------------------------------------------------------------------------


class TinyUpstream:
    """An upstream that shows what happens on its side of the proxy: the request lines it received,
    and whether a request it was still serving got cancelled (the gateway closed the connection)."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.cancelled = asyncio.Event()
        self._never = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/stream", self.stream)
        app.router.add_post("/silent", self.silent)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Streamable HTTP SSE answer that sends one notification and then never finishes."""
        self.received.append(request.raw_path)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        note = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "working"}}
        await response.write(f"event: message\ndata: {json.dumps(note)}\n\n".encode())
        await self._wait_forever()
        return response

    async def silent(self, request: web.Request) -> web.StreamResponse:
        """Accepts the request and never answers."""
        self.received.append(request.raw_path)
        await self._wait_forever()
        return web.Response()

    async def echo(self, request: web.Request) -> web.Response:
        self.received.append(request.raw_path)
        return web.json_response({"raw_path": request.raw_path, "query": dict(request.query)})

    async def _wait_forever(self) -> None:
        try:
            await self._never.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@asynccontextmanager
async def tiny_upstream() -> AsyncIterator[tuple[TinyUpstream, str]]:
    upstream = TinyUpstream()
    # handler_cancellation: a closed connection cancels the handler, which is what we observe.
    async with serve_app(upstream.app(), handler_cancellation=True) as base:
        yield upstream, base


# -- streaming ----------------------------------------------------------------------------------


async def test_sse_route_relays_events_before_the_upstream_response_completes(
    gw: GatewayHarness, http: aiohttp.ClientSession, upstream_sse: RunningUpstream
) -> None:
    client = await connect(gw, http, "sse")
    await client.initialize()
    gate = new_gate("proxy")
    async with client.post(tool_call(2, "gated_stream", {"gate": gate})) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        async with asyncio.timeout(WAIT):
            first = await next_message(response.content)
        # The upstream is still blocked on the gate: this event cannot have come from a buffered body.
        assert first["method"] == "notifications/message"
        upstream_sse.release(gate)
        async with asyncio.timeout(WAIT):
            final = await response_message(response.content, 2)
    assert tool_text(final) == f"gate {gate} released"


async def test_legacy_route_relays_events_before_the_upstream_response_completes(
    gw: GatewayHarness, http: aiohttp.ClientSession, upstream_legacy: RunningUpstream
) -> None:
    token = await gw.access_token("legacy")
    headers = {"Authorization": f"Bearer {token}"}
    stream, endpoint = await open_legacy_stream(http, gw.route_url("legacy") + "/sse", token)
    async with stream:
        await legacy_handshake(http, stream, gw.url + endpoint, headers)
        gate = new_gate("proxy")
        call = tool_call(2, "gated_stream", {"gate": gate})
        async with http.post(gw.url + endpoint, json=call, headers=headers) as posted:
            assert posted.status == 202
        async with asyncio.timeout(WAIT):
            first = await next_message(stream.content)
        assert first["method"] == "notifications/message"
        upstream_legacy.release(gate)
        async with asyncio.timeout(WAIT):
            final = await response_message(stream.content, 2)
    assert tool_text(final) == f"gate {gate} released"


async def test_idle_stream_gets_keepalive_comments(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, upstream_sse: RunningUpstream
) -> None:
    routes = [{"name": "sse", "path": "/sse/mcp", "upstream": upstream_sse.mcp_url}]
    async with running_gateway(idp, routes, limits={"stream_keepalive_seconds": 0.2}) as gateway:
        client = await connect(gateway, http, "sse")
        await client.initialize()
        gate = new_gate("proxy")
        async with client.post(tool_call(2, "gated_stream", {"gate": gate})) as response:
            async with asyncio.timeout(WAIT):
                assert (await next_message(response.content))["method"] == "notifications/message"
                # The upstream is idle until the release; only the gateway can be talking now.
                for _ in range(MAX_EVENTS):
                    event = await read_event(response.content)
                    assert event is not None
                    if event.comments == [" keep-alive"] and not event.fields:
                        break
                else:
                    raise AssertionError("no keep-alive comment on an idle stream")
            upstream_sse.release(gate)
            async with asyncio.timeout(WAIT):
                final = await response_message(response.content, 2)
    assert tool_text(final) == f"gate {gate} released"


async def test_client_disconnect_cancels_the_upstream_request(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    """2026-07-28 transport: closing the SSE response stream MUST be treated as cancellation, so
    the gateway must close its upstream request when its client goes away (SPEC §5.2)."""
    async with tiny_upstream() as (upstream, base):
        routes = [{"name": "tiny", "path": "/tiny/mcp", "upstream": base + "/stream"}]
        async with running_gateway(idp, routes) as gateway:
            client = await connect(gateway, http, "tiny")
            response = await client.post(tool_call(2, "gated_stream", {"gate": "never"}))
            async with asyncio.timeout(WAIT):
                assert (await next_message(response.content))["method"] == "notifications/message"
            assert not upstream.cancelled.is_set()
            response.close()  # drops the connection, as a client that goes away does
            async with asyncio.timeout(WAIT):
                await upstream.cancelled.wait()


# -- sessions (2025-11-25) and sessionless 2026-07-28 ----------------------------------------------


@pytest.mark.parametrize("route", ["json", "sse", "everything"])
async def test_initialize_result_advertises_the_ema_extension(
    gw: GatewayHarness, http: aiohttp.ClientSession, route: str
) -> None:
    result = (await (await connect(gw, http, route)).initialize())["result"]
    assert result["capabilities"]["extensions"][EMA_EXTENSION] == {}
    assert result["protocolVersion"] == PROTOCOL
    assert result["serverInfo"]["name"]  # the rest of the upstream's result is intact


@pytest.mark.parametrize(("route", "upstream_fixture"), [("json", "upstream_json"), ("sse", "upstream_sse")])
async def test_session_id_is_bound_to_its_principal_and_carries_later_requests(
    gw: GatewayHarness,
    http: aiohttp.ClientSession,
    request: pytest.FixtureRequest,
    route: str,
    upstream_fixture: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream: RunningUpstream = request.getfixturevalue(upstream_fixture)
    client = await connect(gw, http, route)
    await client.initialize()
    assert client.session_id
    # Later (the gateway's clock says a minute), the upstream echoing its session id on an answer: the
    # client keeps the id it has (its creation second is when the session began, not this answer's).
    binder = gw.gateway.runtime.sessions
    monkeypatch.setattr(binder, "_clock", lambda: time.time() + 60)
    async with client.post(tool_call(2, "echo", {"text": "through the gateway"})) as response:
        assert tool_text(await read_response(response, 2)) == "through the gateway"
        assert response.headers.get("Mcp-Session-Id", client.session_id) == client.session_id
    # Clients see a gateway-bound id (gateway/sessions.py), never the upstream's own: the upstream
    # does not know it, and the gateway maps it back to the upstream's id for this principal only.
    direct = {"Accept": ACCEPT, "Mcp-Session-Id": client.session_id, "MCP-Protocol-Version": PROTOCOL}
    async with http.post(upstream.mcp_url, json=tool_call(3, "echo", {"text": "direct"}), headers=direct) as response:
        assert response.status in (400, 404)
    owner = principal_key(SubjectIdentity(gw.idp.issuer, None, "alice"), CLIENT_ID)
    status, upstream_id = gw.gateway.runtime.sessions.unwrap(route, owner, client.session_id)
    assert status is SessionCheck.OK and upstream_id
    direct["Mcp-Session-Id"] = upstream_id
    async with http.post(upstream.mcp_url, json=tool_call(4, "echo", {"text": "direct"}), headers=direct) as response:
        assert response.status == 200
        assert tool_text(await read_response(response, 4)) == "direct"


async def test_get_with_session_opens_an_event_stream(gw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    client = await connect(gw, http, "json")
    await client.initialize()
    async with http.get(client.url, headers=client.headers(Accept="text/event-stream")) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        assert response.headers["Mcp-Session-Id"] == client.session_id
        assert response.headers.getall("X-Accel-Buffering") == ["no"]


async def test_delete_ends_the_session_and_the_upstream_404_passes_through(
    gw: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    client = await connect(gw, http, "json")
    await client.initialize()
    async with http.delete(client.url, headers=client.headers()) as response:
        assert response.status == 200
        assert response.headers["Mcp-Session-Id"] == client.session_id
    async with client.post(tool_call(2, "echo", {"text": "too late"})) as response:
        assert response.status == 404
        body = await response.json()
    assert body["error"]["message"] == "Session not found"


@pytest.mark.parametrize(
    ("case", "extra_headers", "message"),
    [
        ("no session", {}, tool_call(2, "echo", {"text": "x"})),
        ("unsupported protocol", {"MCP-Protocol-Version": "1999-01-01"}, request(2, "tools/list")),
    ],
)
async def test_upstream_errors_pass_through_unchanged(
    gw: GatewayHarness,
    http: aiohttp.ClientSession,
    upstream_json: RunningUpstream,
    case: str,
    extra_headers: dict[str, str],
    message: Any,
) -> None:
    """Clients decide on fallback and re-initialisation from the upstream's status and JSON-RPC body
    (SPEC §5.2), so the gateway must not replace them with its own."""
    if message is None:
        message = discover_request()
    body = message.encode() if isinstance(message, str) else json.dumps(message).encode()
    headers = {"Accept": ACCEPT, "Content-Type": "application/json", **extra_headers}
    async with http.post(upstream_json.mcp_url, data=body, headers=headers) as response:
        direct = (response.status, await response.read())
    token = await gw.access_token("json")
    async with http.post(
        gw.route_url("json"), data=body, headers={**headers, "Authorization": f"Bearer {token}"}
    ) as response:
        proxied = (response.status, await response.read())
    assert 400 <= direct[0] < 500, direct
    assert proxied == direct


def discover_request(request_id: Any = 1) -> dict[str, Any]:
    meta = {
        "io.modelcontextprotocol/protocolVersion": MODERN_PROTOCOL,
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    return request(request_id, "server/discover", {"_meta": meta})


@pytest.mark.parametrize("route", ["json", "sse"])
async def test_sessionless_server_discover_passes_through(
    gw: GatewayHarness, http: aiohttp.ClientSession, route: str
) -> None:
    token = await gw.access_token(route)
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": ACCEPT,
        "MCP-Protocol-Version": MODERN_PROTOCOL,
        "Mcp-Method": "server/discover",
    }
    async with http.post(gw.route_url(route), json=discover_request(7), headers=headers) as response:
        assert response.status == 200
        assert "Mcp-Session-Id" not in response.headers
        message = await read_response(response, 7)
    result = message["result"]
    assert result["supportedVersions"] == [MODERN_PROTOCOL]
    assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "gateway-test-upstream"
    assert result["capabilities"]["extensions"][EMA_EXTENSION] == {}
    assert "tools" in result["capabilities"]


# -- headers ------------------------------------------------------------------------------------


async def headers_seen(client: McpHttp, **headers: str) -> dict[str, str]:
    return json.loads(tool_text(await client.call(tool_call(9, "headers_seen"), **headers)))


async def test_upstream_never_sees_client_credentials(gw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    client = await connect(gw, http, "json")
    await client.initialize()
    seen = await headers_seen(
        client, Cookie="sid=secret-cookie", Origin=gw.url, **{"Proxy-Authorization": "Basic c2VjcmV0"}
    )
    assert {"authorization", "cookie", "origin", "proxy-authorization"}.isdisjoint(seen), seen
    assert client.token not in json.dumps(seen)


async def test_upstream_sees_forwarded_headers_and_its_own_host(
    gw: GatewayHarness, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    client = await connect(gw, http, "json")
    await client.initialize()
    # The SDK upstream refuses (421) a Host outside its allow-list; the exact value is checked too.
    seen = await headers_seen(client, **{"X-Forwarded-For": "203.0.113.7"})
    assert seen["host"] == upstream_json.host_port
    assert seen["x-forwarded-for"] == "127.0.0.1"  # the peer only: a client's claim is not passed on
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == gw.url.removeprefix("http://")


async def test_mcp_transport_headers_reach_the_upstream(gw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    client = await connect(gw, http, "json")
    await client.initialize()
    sent = {"Mcp-Method": "tools/call", "Mcp-Name": "headers_seen", "Mcp-Param-Region": "=?base64?ZXU=?="}
    seen = await headers_seen(client, **sent)
    owner = principal_key(SubjectIdentity(gw.idp.issuer, None, "alice"), CLIENT_ID)
    assert seen["mcp-session-id"] == gw.gateway.runtime.sessions.unwrap("json", owner, client.session_id)[1]
    assert seen["mcp-protocol-version"] == PROTOCOL
    assert seen["accept"] == ACCEPT
    assert {k.lower(): v for k, v in sent.items()}.items() <= seen.items()


async def test_hop_by_hop_headers_are_dropped(gw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    client = await connect(gw, http, "json")
    await client.initialize()
    seen = await headers_seen(
        client,
        Connection="keep-alive, X-Hop-Secret",
        **{"X-Hop-Secret": "only for the next hop", "Keep-Alive": "timeout=5", "X-End-To-End": "kept"},
    )
    assert seen["x-end-to-end"] == "kept"
    assert {"x-hop-secret", "keep-alive"}.isdisjoint(seen), seen
    assert "X-Hop-Secret" not in seen.get("connection", "")


async def test_route_upstream_headers_are_added_with_env_expansion(
    idp: DevIdentityProvider,
    http: aiohttp.ClientSession,
    upstream_json: RunningUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROXY_TEST_UPSTREAM_KEY", "k-0123456789")
    route = {
        "name": "keyed",
        "path": "/keyed/mcp",
        "upstream": upstream_json.mcp_url,
        "upstream_headers": {"X-Upstream-Key": "Bearer ${PROXY_TEST_UPSTREAM_KEY}", "X-Tenant": "acme"},
    }
    async with running_gateway(idp, [route]) as gateway:
        client = await connect(gateway, http, "keyed")
        await client.initialize()
        # A client cannot forge or add to the configured value.
        seen = await headers_seen(client, **{"X-Upstream-Key": "forged"})
    assert seen["x-upstream-key"] == "Bearer k-0123456789"
    assert seen["x-tenant"] == "acme"


async def test_every_response_carries_a_request_id(gw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    token = await gw.access_token("json")
    auth = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
    sse_client = await connect(gw, http, "sse")
    async with sse_client.post(initialize_request()) as sse_response:
        assert sse_response.content_type == "text/event-stream"
        ids = [sse_response.headers.get("X-Request-Id")]
    for method, path, headers in [
        ("POST", "/json/mcp", auth),  # upstream JSON, rewritten
        ("POST", "/json/mcp", {}),  # gateway 401
        ("DELETE", "/json/mcp", auth),  # upstream 400, streamed through
        ("GET", "/nowhere", {}),  # gateway 404
        ("PUT", "/json/mcp", auth),  # gateway 405
    ]:
        async with http.request(method, gw.url + path, json=initialize_request(), headers=headers) as response:
            ids.append(response.headers.get("X-Request-Id"))
    assert all(i is not None and len(i) == 32 for i in ids), ids
    assert len(set(ids)) == len(ids)


class _SelfSendingGateway(Gateway):
    """The gateway with one more handler, which sends its answer itself (prepare, write, write_eof) before
    returning without naming any request id: the shape of every streamed or relayed answer."""

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_post("/self-sent", self._self_sent)
        super()._add_routes(app)

    @staticmethod
    async def _self_sent(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b"{}")
        await response.write_eof()
        return response


async def test_a_response_its_handler_sent_itself_carries_the_request_id(
    idp: DevIdentityProvider, upstream_json: RunningUpstream, http: aiohttp.ClientSession
) -> None:
    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = make_config(url, [idp], [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}])
    runner, _ = await start_gateway(_SelfSendingGateway(config), sock=sock, shutdown_timeout=1.0)
    try:
        async with http.post(url + "/self-sent", headers={"X-Request-Id": "ingress-7"}) as response:
            assert (response.status, await response.read()) == (200, b"{}")
            kept = response.headers.get("X-Request-Id")
        async with http.post(url + "/self-sent") as response:
            fresh = response.headers.get("X-Request-Id", "")
    finally:
        await runner.cleanup()
    assert kept == "ingress-7"
    assert re.fullmatch(r"[0-9a-f]{32}", fresh), fresh


async def test_event_streams_disable_proxy_buffering(idp: DevIdentityProvider, http: aiohttp.ClientSession) -> None:
    """The tiny upstream does not send X-Accel-Buffering itself, so the header is the gateway's."""
    async with tiny_upstream() as (_, base):
        routes = [{"name": "tiny", "path": "/tiny/mcp", "upstream": base + "/stream"}]
        async with running_gateway(idp, routes) as gateway:
            client = await connect(gateway, http, "tiny")
            async with client.post(tool_call(1, "anything")) as response:
                assert response.content_type == "text/event-stream"
                assert response.headers.getall("X-Accel-Buffering") == ["no"]
                assert response.headers["Cache-Control"] == "no-cache"
                assert "Content-Encoding" not in response.headers


# -- legacy HTTP+SSE (2024-11-05) ----------------------------------------------------------------


async def test_legacy_endpoint_is_rewritten_and_posting_there_works(
    gw: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    token = await gw.access_token("legacy")
    headers = {"Authorization": f"Bearer {token}"}
    stream, endpoint = await open_legacy_stream(http, gw.route_url("legacy") + "/sse", token)
    async with stream:
        assert stream.headers.getall("X-Accel-Buffering") == ["no"]
        assert endpoint.startswith("/legacy/messages/?session_id=")
        initialized = await legacy_handshake(http, stream, gw.url + endpoint, headers)
        assert initialized["result"]["serverInfo"]["name"] == "gateway-test-upstream"
        answer = await legacy_call(http, stream, gw.url + endpoint, headers, tool_call(2, "add", {"a": 2, "b": 40}))
    assert tool_text(answer) == "42"


# -- errors -------------------------------------------------------------------------------------


async def test_unreachable_upstream_gets_a_fast_502_naming_the_route(
    gw: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    client = await connect(gw, http, "dead")
    started = time.monotonic()
    async with asyncio.timeout(WAIT), client.post(tool_call(5, "echo")) as response:
        assert response.status == 502
        body = await response.json()
    assert time.monotonic() - started < 2.0
    assert body["id"] == 5
    assert body["error"]["code"] == -32010
    assert "'dead'" in body["error"]["message"]


async def test_upstream_that_never_answers_gets_504(idp: DevIdentityProvider, http: aiohttp.ClientSession) -> None:
    async with tiny_upstream() as (upstream, base):
        routes = [{"name": "silent", "path": "/silent/mcp", "upstream": base + "/silent"}]
        async with running_gateway(idp, routes, limits={"upstream_timeout_seconds": 1}) as gateway:
            client = await connect(gateway, http, "silent")
            async with asyncio.timeout(WAIT), client.post(tool_call(6, "echo")) as response:
                assert response.status == 504
                body = await response.json()
            assert body["id"] == 6
            assert body["error"]["code"] == -32011
            assert "'silent'" in body["error"]["message"]
            # The gateway gave up on the upstream request too, instead of leaving it open.
            async with asyncio.timeout(WAIT):
                await upstream.cancelled.wait()


def initialize_body_of_size(size: int) -> bytes:
    body = json.dumps(initialize_request(client_name="")).encode()
    return json.dumps(initialize_request(client_name="x" * (size - len(body)))).encode()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_above_the_limit_gets_413_and_is_not_forwarded(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, upstream_json: RunningUpstream, chunked: bool
) -> None:
    limit = 1024
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    async with running_gateway(idp, routes, limits={"max_request_bytes": limit}) as gateway:
        client = await connect(gateway, http, "json")

        async def post(body: bytes) -> tuple[int, bytes]:
            async def chunks() -> AsyncIterator[bytes]:
                yield body[:100]
                yield body[100:]

            headers = client.headers(**{"Content-Type": "application/json"})
            async with http.post(client.url, data=chunks() if chunked else body, headers=headers) as response:
                return response.status, await response.read()

        assert (await post(initialize_body_of_size(limit)))[0] == 200  # at the limit: forwarded
        upstream_json.reset()
        status, body = await post(initialize_body_of_size(limit + 1))
    assert status == 413
    assert json.loads(body)["error"]["code"] == -32600
    assert upstream_json.recorded() == []


@pytest.mark.parametrize("method", ["POST", "GET", "DELETE", "OPTIONS"])
@pytest.mark.parametrize("origin", [FOREIGN_ORIGIN, "null", "not a url"])
async def test_foreign_origin_gets_403_and_is_not_forwarded(
    gw: GatewayHarness, http: aiohttp.ClientSession, upstream_json: RunningUpstream, method: str, origin: str
) -> None:
    client = await connect(gw, http, "json")
    upstream_json.reset()
    headers = client.headers(Origin=origin, **{"Access-Control-Request-Method": "POST"})
    async with http.request(method, client.url, json=initialize_request(), headers=headers) as response:
        assert response.status == 403
        body = await response.json()
        assert "Access-Control-Allow-Origin" not in response.headers
    assert body["error"]["code"] == -32003
    assert upstream_json.recorded() == []


async def test_allowed_origin_is_forwarded_with_cors_headers(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    async with running_gateway(idp, routes, allowed_origins=[APP_ORIGIN]) as gateway:
        client = await connect(gateway, http, "json")
        # The SDK upstream answers 403 to an Origin it does not know: success shows it was not sent on.
        async with client.post(initialize_request(), Origin=APP_ORIGIN) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
            exposed = {h.strip().lower() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
            assert "Origin" in response.headers.getall("Vary")
        assert {"mcp-session-id", "www-authenticate"} <= exposed
        # A browser must be able to read the 401 challenge too.
        async with http.post(client.url, json=initialize_request(), headers={"Origin": APP_ORIGIN}) as response:
            assert response.status == 401
            assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN


async def test_preflight_from_an_allowed_origin_gets_204(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    async with running_gateway(idp, routes, allowed_origins=[APP_ORIGIN]) as gateway:
        headers = {
            "Origin": APP_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, mcp-protocol-version, mcp-session-id",
        }
        # No bearer token: browsers never send credentials on a preflight.
        async with http.options(gateway.route_url("json"), headers=headers) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
            allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
            methods = {m.strip() for m in response.headers["Access-Control-Allow-Methods"].split(",")}
    assert {"authorization", "content-type", "mcp-protocol-version", "mcp-session-id", "last-event-id"} <= allowed
    assert {"mcp-method", "mcp-name"} <= allowed
    assert {"GET", "POST", "DELETE"} <= methods


@pytest.mark.parametrize("method", ["PUT", "PATCH", "HEAD"])
async def test_unsupported_method_gets_405(gw: GatewayHarness, http: aiohttp.ClientSession, method: str) -> None:
    client = await connect(gw, http, "json")
    async with http.request(method, client.url, headers=client.headers()) as response:
        assert response.status == 405
        assert {m.strip() for m in response.headers["Allow"].split(",")} == {"GET", "POST", "DELETE"}


@pytest.mark.parametrize("path", ["/nowhere", "/json", "/json/mcpx", "/", "/json%2Fmcp"])
async def test_unknown_path_gets_404(gw: GatewayHarness, http: aiohttp.ClientSession, path: str) -> None:
    token = await gw.access_token("json")
    url = URL(gw.url + path, encoded=True)
    async with http.post(url, json=initialize_request(), headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 404
        assert (await response.json()) == {"error": "no route for this path"}


@pytest.mark.parametrize(
    "rest",
    [
        "/../../secret",
        "/..%2F..%2Fsecret",
        "/%2E%2E/%2e%2e/secret",
        "/a/./../../secret",
        "/..\\..\\secret",
        "/..",
        "/..;/..;/secret",
        "/%2e%2e;x=y/%2e%2e%3b/secret",
    ],
)
async def test_dot_segments_cannot_leave_the_route_prefix(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, rest: str
) -> None:
    """The upstream URL is the route's upstream plus the rest of the path; URL normalisation must not
    turn '/tiny/mcp/../../secret' into the upstream host's '/secret' (outside what the token covers)."""
    async with tiny_upstream() as (upstream, base):
        routes = [{"name": "tiny", "path": "/tiny/mcp", "upstream": base + "/echo/mcp"}]
        async with running_gateway(idp, routes) as gateway:
            client = await connect(gateway, http, "tiny")
            async with http.get(client.url, headers=client.headers()) as response:
                assert response.status == 200  # control: the route itself reaches the upstream
            url = URL(client.url + rest, encoded=True)  # sent as written, not normalised by the client
            async with http.get(url, headers=client.headers()) as response:
                assert response.status == 404
    assert upstream.received == ["/echo/mcp"]


@pytest.mark.parametrize(
    ("raw_path", "expected"),
    [
        ("/r", ""),
        ("/r/a;b=c/d", "/a;b=c/d"),
        ("/r/...;/x", "/...;/x"),
        ("/r/..a;/x", "/..a;/x"),
        ("/r/;/x", "/;/x"),
        ("/r/a%3Bb", "/a%3Bb"),
        ("/r/..;", None),
        ("/r/.;", None),
        ("/r/..;x=y/secret", None),
        ("/r/a/.;/b", None),
        ("/r/a/..;a;b/..;/secret", None),
        ("/r/%2e%2e;/secret", None),
        ("/r/%2E%2E%3B/secret", None),
        ("/r/.%3bx/secret", None),
        ("/r/..;%2Fsecret", None),
        ("/r\\..;\\secret", None),
        ("/r/a\\..;\\..;\\secret", None),
        ("/rx/..;", None),
    ],
)
def test_dot_segments_with_path_parameters_are_dot_segments(raw_path: str, expected: str | None) -> None:
    """Tomcat and Jetty drop ';params' from a segment before resolving dot segments, so '..;x=y' walks
    up a level on them: such a segment is refused like '..', plain or percent-encoded."""
    assert upstream_path_remainder(raw_path, "/r") == expected


async def test_path_and_query_are_forwarded_verbatim(idp: DevIdentityProvider, http: aiohttp.ClientSession) -> None:
    async with tiny_upstream() as (upstream, base):
        routes = [{"name": "tiny", "path": "/tiny", "upstream": base + "/echo"}]
        async with running_gateway(idp, routes) as gateway:
            client = await connect(gateway, http, "tiny")
            raw = "/messages/a%2Fb%20c?session_id=s%2B1&q=%23frag%26x%3Dy&pct=%2541"
            async with http.get(URL(client.url + raw, encoded=True), headers=client.headers()) as response:
                assert response.status == 200
                echoed = await response.json()
    assert echoed["raw_path"] == "/echo" + raw
    assert echoed["query"] == {"session_id": "s+1", "q": "#frag&x=y", "pct": "%41"}
    assert upstream.received == ["/echo" + raw]


@pytest.mark.parametrize(
    "body",
    [b"not json", b"", b"[]", b"[1]", b"\xff\xfe", b'{"id": {"a": [1]}}'],
    ids=["text", "empty", "empty batch", "batch of numbers", "bad utf-8", "object id"],
)
async def test_malformed_bodies_are_the_upstreams_to_reject(
    gw: GatewayHarness, http: aiohttp.ClientSession, body: bytes
) -> None:
    token = await gw.access_token("json")
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT, "Content-Type": "application/json"}
    async with http.post(gw.route_url("json"), data=body, headers=headers) as response:
        assert response.status == 400
        assert (await response.json())["jsonrpc"] == "2.0"  # the upstream's JSON-RPC error, not ours


async def test_deeply_nested_body_is_refused_not_forwarded_not_a_500(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    """JSON nested past Python's recursion limit is where parsers disagree (one gives up, another
    reads it): the gateway refuses it as a parse error and forwards nothing (a tiny upstream
    records what reaches it, since the SDK test upstream itself answers such a body with a 500)."""
    body = b"[" * 100_000 + b"]" * 100_000
    async with tiny_upstream() as (upstream, base):
        routes = [{"name": "tiny", "path": "/tiny/mcp", "upstream": base + "/echo"}]
        async with running_gateway(idp, routes) as gateway:
            client = await connect(gateway, http, "tiny")
            headers = client.headers(**{"Content-Type": "application/json"})
            async with http.post(client.url, data=body, headers=headers) as response:
                assert response.status == 400
                assert (await response.json())["error"]["code"] == -32700
    assert upstream.received == []
