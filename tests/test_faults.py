"""Faults of the parts around the gateway, with real processes: the IdP, the upstream, the client, Redis.

What an operator relies on when something around the gateway breaks: a refusal that says what is wrong
(an OAuth error or a JSON-RPC error, never a 500 or a traceback), an answer within the configured time
(never a hang), recovery without a restart once the part is back, and no upstream request left running
for a client that has gone. The IdP is a real HTTP server (DevIdentityProvider, or a loopback JWKS
server serving garbage); upstreams are the official SDK server, or tests/support/faulty_upstream.py (a
separate process that cuts its answers on demand, which no real MCP server can be made to do); Redis
is a real redis-server. Faults already covered elsewhere are not repeated here: an IdP answering 503
(test_jwks.py), an unreachable or silent upstream (test_proxy.py), Redis stopping while the gateway
runs (test_replay_redis.py). Every wait is bounded; ordering comes from gates, never from sleeps.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.devidp import DevIdentityProvider
from tests.support.faulty_upstream import FaultyUpstream, faulty_upstream
from tests.support.harness import IDP_CLIENTS, GatewayHarness, running_gateway
from tests.support.loopback import free_port, serve_app
from tests.support.mcp_http import (
    WAIT,
    McpHttp,
    connect,
    new_gate,
    next_message,
    open_legacy_stream,
    open_session,
    request,
    rest_of_stream,
    tool_call,
    tool_text,
)
from tests.support.redis_server import RedisServer
from tests.support.upstreams import RunningUpstream, start_upstream

ISSUER = "https://idp.faults.test"
JWKS_TIMEOUT = 5.0  # the gateway's bound on one JWKS or metadata fetch (gateway/oauth/jwks.py)
SOON = 1.0  # "at once": a refusal that needs no network, or a disconnect passed on


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session that fails the test if any response it gets is a 500."""
    seen: list[tuple[str, str, int]] = []

    async def on_request_end(_: Any, __: Any, params: aiohttp.TraceRequestEndParams) -> None:
        seen.append((params.method, str(params.url), params.response.status))

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        yield session
    assert not [s for s in seen if s[2] == 500], f"a 500 reached the client: {seen}"


async def idp_keys_missing(http: aiohttp.ClientSession, gateway: GatewayHarness) -> list[str]:
    """The pod stays ready without an IdP's keys (only that IdP's grants fail); /readyz names it."""
    async with http.get(gateway.url + "/readyz") as response:
        assert response.status == 200
        return (await response.json()).get("idp_keys_missing", [])


def assert_retryable(status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    """RFC 6749 §5.2 error body: 503 temporarily_unavailable, with Retry-After, and no token."""
    assert (status, body.get("error")) == (503, "temporarily_unavailable"), body
    assert body["error_description"]
    assert headers["Retry-After"]
    assert "access_token" not in body


# -- the IdP ------------------------------------------------------------------------------------


async def test_idp_down_at_start_refuses_grants_with_503_until_it_comes_up(
    http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    """Nothing listens at the IdP's address (connection refused) while the gateway starts, so even
    the discovery of its jwks_uri fails; once the IdP process is up, the next grant succeeds."""
    port = free_port()
    idp = DevIdentityProvider(issuer=f"http://127.0.0.1:{port}", clients=IDP_CLIENTS)
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    async with running_gateway(idp, routes, jwks_min_refresh_seconds=0) as gateway:
        assert await idp_keys_missing(http, gateway) == [gateway.idp.issuer]
        started = time.monotonic()
        assert_retryable(*await gateway.token_request(gateway.id_jag()))
        assert time.monotonic() - started < SOON  # a refused connection is no reason to wait
        await idp.start(port=port)
        try:
            status, body, _ = await gateway.token_request(gateway.id_jag())
            assert status == 200, body
            assert await idp_keys_missing(http, gateway) == []
        finally:
            await idp.stop()


async def test_idp_down_during_operation_keeps_cached_keys_and_picks_up_new_ones_when_back(
    http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    port = free_port()
    idp = DevIdentityProvider(issuer=f"http://127.0.0.1:{port}", clients=IDP_CLIENTS)
    await idp.start(port=port)
    # The same IdP after a restart in which it rotated its signing key.
    rotated = DevIdentityProvider(issuer=idp.issuer, clients=IDP_CLIENTS)
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    async with running_gateway(idp, routes, jwks_min_refresh_seconds=0) as gateway:
        await idp.stop()
        status, body, _ = await gateway.token_request(gateway.id_jag())
        assert status == 200, body  # keys already held need no IdP
        status, body, _ = await gateway.token_request(rotated.sign(gateway.id_jag_claims()))
        assert (status, body["error"]) == (400, "invalid_grant"), body
        assert await idp_keys_missing(http, gateway) == []
        await rotated.start(port=port)
        try:
            status, body, _ = await gateway.token_request(rotated.sign(gateway.id_jag_claims()))
            assert status == 200, body
        finally:
            await rotated.stop()


@asynccontextmanager
async def jwks_server(respond: Any) -> AsyncIterator[str]:
    """A loopback JWKS endpoint answering with ``await respond()``; yields its URL."""

    async def handle(_: web.Request) -> web.StreamResponse:
        return await respond()

    app = web.Application()
    app.router.add_get("/jwks", handle)
    async with serve_app(app) as base:
        yield base + "/jwks"


@asynccontextmanager
async def gateway_trusting(jwks_url: str, signer: DevIdentityProvider, **options: Any) -> AsyncIterator[GatewayHarness]:
    routes = [{"name": "json", "path": "/json/mcp", "upstream": "http://127.0.0.1:9/mcp"}]
    authorization = {"identity_providers": [{"issuer": ISSUER, "jwks_uri": jwks_url}]}
    async with running_gateway(signer, routes, authorization=authorization, **options) as gateway:
        yield gateway


async def test_slow_idp_bounds_the_grant_and_cached_keys_do_not_wait_for_it() -> None:
    signer, rotated = DevIdentityProvider(issuer=ISSUER), DevIdentityProvider(issuer=ISSUER)
    slow, never = asyncio.Event(), asyncio.Event()

    async def respond() -> web.Response:
        if slow.is_set():
            await never.wait()  # accepts the connection, never answers
        return web.json_response(signer.public_jwks())

    async with jwks_server(respond) as url, gateway_trusting(url, signer, jwks_min_refresh_seconds=0) as gateway:
        slow.set()

        async def timed(assertion: str) -> tuple[float, int, dict[str, Any]]:
            started = time.monotonic()
            status, body, _ = await gateway.token_request(assertion)
            return time.monotonic() - started, status, body

        # An unknown kid makes the gateway ask the IdP; a known one must not wait for that answer.
        unknown = asyncio.create_task(timed(rotated.sign(gateway.id_jag_claims())))
        known_took, status, body = await timed(gateway.id_jag())
        assert status == 200, body
        assert known_took < SOON
        assert not unknown.done()
        async with asyncio.timeout(JWKS_TIMEOUT + WAIT):
            unknown_took, status, body = await unknown
        assert (status, body["error"]) == (400, "invalid_grant"), body
        assert unknown_took < JWKS_TIMEOUT + 3 * SOON  # bounded by the fetch timeout, with slack for a loaded machine
        never.set()


def _good_key() -> dict[str, Any]:
    return DevIdentityProvider(issuer=ISSUER).public_jwks()["keys"][0]


# Documents an IdP (or whatever answers at its address) might serve instead of its key set.
GARBAGE_JWKS: dict[str, bytes] = {
    "html": b"<html><body>502 Bad Gateway</body></html>",
    "empty": b"",
    "no keys member": b"{}",
    "keys not a list": b'{"keys": "none"}',
    "keys of numbers": b'{"keys": [1, 2]}',
    "no keys left": b'{"keys": []}',
    "entries that are not keys": b'{"keys": [{"hello": "world"}]}',
    "EC key without its point": json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k"}]}).encode(),
    "EC point off the curve": json.dumps({"keys": [{**_good_key(), "x": _good_key()["y"]}]}).encode(),
    "unknown curve": json.dumps({"keys": [{**_good_key(), "crv": "P-999"}]}).encode(),
    "kid not a string": json.dumps({"keys": [{**_good_key(), "kid": ["k"]}]}).encode(),
    "too large": b'{"keys": [' + b'{"kty": "none"},' * 20_000 + b"{}]}",
}


@pytest.mark.parametrize("document", GARBAGE_JWKS.values(), ids=GARBAGE_JWKS.keys())
async def test_jwks_garbage_at_start_is_a_retryable_error_never_a_500(
    http: aiohttp.ClientSession, document: bytes
) -> None:
    signer = DevIdentityProvider(issuer=ISSUER)

    async def respond() -> web.Response:
        return web.Response(body=document, content_type="application/json")

    async with jwks_server(respond) as url, gateway_trusting(url, signer, jwks_min_refresh_seconds=0) as gateway:
        assert await idp_keys_missing(http, gateway) == [gateway.idp.issuer]
        assert_retryable(*await gateway.token_request(gateway.id_jag()))
        # The same without a kid: a lone key is then chosen by type, which must not trip either.
        assertion = signer.sign(gateway.id_jag_claims(), headers={"kid": None})
        assert_retryable(*await gateway.token_request(assertion))


@pytest.mark.parametrize("document", GARBAGE_JWKS.values(), ids=GARBAGE_JWKS.keys())
async def test_jwks_garbage_on_refresh_keeps_the_cached_keys(http: aiohttp.ClientSession, document: bytes) -> None:
    signer = DevIdentityProvider(issuer=ISSUER)
    served = [json.dumps(signer.public_jwks()).encode()]
    fetches = 0

    async def respond() -> web.Response:
        nonlocal fetches
        fetches += 1
        return web.Response(body=served[-1], content_type="application/json")

    async with jwks_server(respond) as url, gateway_trusting(url, signer, jwks_min_refresh_seconds=0) as gateway:
        served.append(document)
        # An unknown kid forces a refresh, which gets the garbage: a bad assertion, not a 500.
        status, body, _ = await gateway.token_request(DevIdentityProvider(issuer=ISSUER).sign(gateway.id_jag_claims()))
        assert (status, body["error"]) == (400, "invalid_grant"), body
        assert fetches == 2
        for assertion in (gateway.id_jag(), signer.sign(gateway.id_jag_claims(), headers={"kid": None})):
            status, body, _ = await gateway.token_request(assertion)
            assert status == 200, body  # the good keys fetched before are still used
        assert await idp_keys_missing(http, gateway) == []


# -- the upstream -------------------------------------------------------------------------------


async def test_upstream_killed_mid_session_gets_a_fast_502_and_serves_again_once_restarted(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    upstream = start_upstream("streamable-json", port=port)
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream.mcp_url}]
    try:
        async with running_gateway(idp, routes) as gateway:
            client = await open_session(gateway, http, "json")
            assert tool_text(await client.call(tool_call(2, "add", {"a": 1, "b": 2}))) == "3"
            upstream.stop()  # the pooled keep-alive connection to it dies with it
            started = time.monotonic()
            async with client.post(tool_call(3, "add", {"a": 1, "b": 2})) as response:
                assert response.status == 502
                body = await response.json()
            assert time.monotonic() - started < SOON
            assert (body["id"], body["error"]["code"]) == (3, -32010)
            upstream = start_upstream("streamable-json", port=port)
            # The old session died with the old process; a new one works without a gateway restart.
            client = await open_session(gateway, http, "json")
            assert tool_text(await client.call(tool_call(2, "add", {"a": 2, "b": 2}))) == "4"
    finally:
        upstream.stop()


@pytest.fixture(scope="module")
def faulty() -> FaultyUpstream:
    with faulty_upstream() as upstream:
        yield upstream


@asynccontextmanager
async def faulty_route(
    idp: DevIdentityProvider,
    http: aiohttp.ClientSession,
    faulty: FaultyUpstream,
    kind: str,
    fault: str,
    rules: dict[str, Any] | None = None,
    **limits: Any,
) -> AsyncIterator[tuple[McpHttp, str]]:
    """A gateway whose only route leads to one faulty answer; yields a client and the answer's gate."""
    gate = new_gate(fault)
    routes = [{"name": "faulty", "path": "/faulty/mcp", "upstream": faulty.url(kind, fault, gate), **(rules or {})}]
    async with running_gateway(idp, routes, limits=limits) as gateway:
        yield await connect(gateway, http, "faulty"), gate


@pytest.mark.parametrize(
    "fault",
    ["reset", "close", "end"],
    ids=["connection reset", "connection closed mid-event", "stream ended before the response"],
)
async def test_upstream_cutting_an_event_stream_gives_the_client_the_events_sent_and_a_clean_end(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, faulty: FaultyUpstream, fault: str
) -> None:
    async with faulty_route(idp, http, faulty, "sse", fault) as (client, gate):
        async with client.post(tool_call(4, "work")) as response:
            assert response.status == 200
            async with asyncio.timeout(WAIT):
                first = await next_message(response.content)
                second = await next_message(response.content)
            assert [first["params"]["data"], second["params"]["data"]] == ["event 1", "event 2"]
            await faulty.release(gate)
            # The end of the stream: no hang, no broken chunked body (ClientPayloadError), and no
            # fragment of the event the upstream was cut off in.
            async with asyncio.timeout(WAIT):
                assert await rest_of_stream(response.content) == []
        assert (await faulty.closed(gate))["closed"]


async def test_upstream_reset_mid_json_body_closes_the_client_connection_instead_of_hanging(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, faulty: FaultyUpstream
) -> None:
    """Headers (with a Content-Length) are sent before the upstream fails: only closing the
    connection can tell the client the body is incomplete (RFC 9112 §8)."""
    async with faulty_route(idp, http, faulty, "json", "reset") as (client, gate):
        async with client.post(tool_call(5, "work")) as response:
            assert response.status == 200
            await faulty.release(gate)
            async with asyncio.timeout(WAIT):
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()


async def test_upstream_stalling_mid_json_body_is_cut_off_after_the_upstream_timeout(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, faulty: FaultyUpstream
) -> None:
    timeout = 1
    async with faulty_route(idp, http, faulty, "json", "stall", upstream_timeout_seconds=timeout) as (client, gate):
        started = time.monotonic()
        async with client.post(tool_call(6, "work")) as response:
            assert response.status == 200
            async with asyncio.timeout(WAIT):
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
        assert time.monotonic() - started < timeout + SOON
        # ... and the gateway dropped its request to the upstream too.
        assert await faulty.closed(gate) == {"closed": True, "cancelled": True}


async def test_upstream_reset_while_a_list_result_is_read_gets_a_502_jsonrpc_error(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, faulty: FaultyUpstream
) -> None:
    """On a route with tool rules a JSON result is read whole (to filter any list in it), so nothing was
    sent yet: a JSON-RPC error can still say what happened."""
    rules = {"tools": [{"groups": ["*"], "allow": ["*"], "deny": ["delete_*"]}]}
    async with faulty_route(idp, http, faulty, "json", "reset", rules) as (client, gate):

        async def list_tools() -> tuple[int, dict[str, Any]]:
            async with client.post(request(7, "tools/list")) as response:
                return response.status, await response.json()

        listing = asyncio.create_task(list_tools())
        await faulty.release(gate)
        async with asyncio.timeout(WAIT):
            status, body = await listing
    assert status == 502
    assert (body["id"], body["error"]["code"]) == (7, -32012)
    assert "'faulty'" in body["error"]["message"]


async def test_silent_upstream_event_stream_is_ended_after_the_idle_limit(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, faulty: FaultyUpstream
) -> None:
    idle = 0.5
    limits = {"stream_idle_timeout_seconds": idle, "stream_keepalive_seconds": 0}
    async with faulty_route(idp, http, faulty, "sse", "end", **limits) as (client, gate):
        async with client.post(tool_call(8, "work")) as response:
            async with asyncio.timeout(WAIT):
                assert (await next_message(response.content))["params"]["data"] == "event 1"
                assert (await next_message(response.content))["params"]["data"] == "event 2"
            started = time.monotonic()  # the upstream now says nothing until released (it never is)
            async with asyncio.timeout(WAIT):
                assert await rest_of_stream(response.content) == []
            # The gateway's idle clock started when it relayed the events, a moment before this one.
            assert idle / 2 <= time.monotonic() - started < idle + SOON
        assert await faulty.closed(gate) == {"closed": True, "cancelled": True}


# -- the client ---------------------------------------------------------------------------------


async def test_client_leaving_a_tool_call_stream_closes_the_upstream_request_within_a_second(
    gw: GatewayHarness, http: aiohttp.ClientSession, upstream_sse: RunningUpstream
) -> None:
    client = await open_session(gw, http, "sse")
    gate = new_gate("faults")
    upstream_sse.reset()
    try:
        response = await client.post(tool_call(9, "gated_stream", {"gate": gate}))
        async with asyncio.timeout(WAIT):
            assert (await next_message(response.content))["method"] == "notifications/message"
        await assert_upstream_sees_the_client_leave(response, upstream_sse, "POST", "/mcp")
    finally:
        upstream_sse.release(gate)


async def test_client_leaving_a_listening_stream_closes_the_upstream_stream_within_a_second(
    gw: GatewayHarness, http: aiohttp.ClientSession, upstream_sse: RunningUpstream
) -> None:
    client = await open_session(gw, http, "sse")
    upstream_sse.reset()
    response = await http.get(client.url, headers=client.headers(Accept="text/event-stream"))
    # Headers through the gateway mean the upstream has answered: its stream is open.
    assert (response.status, response.content_type) == (200, "text/event-stream")
    await assert_upstream_sees_the_client_leave(response, upstream_sse, "GET", "/mcp")


async def test_client_leaving_a_legacy_event_stream_closes_the_upstream_stream_within_a_second(
    gw: GatewayHarness, http: aiohttp.ClientSession, upstream_legacy: RunningUpstream
) -> None:
    token = await gw.access_token("legacy")
    upstream_legacy.reset()
    stream, _ = await open_legacy_stream(http, gw.route_url("legacy") + "/sse", token)
    await assert_upstream_sees_the_client_leave(stream, upstream_legacy, "GET", "/sse")


async def assert_upstream_sees_the_client_leave(
    response: aiohttp.ClientResponse, upstream: RunningUpstream, method: str, path: str
) -> None:
    assert await upstream.disconnects(0) == []
    left = time.monotonic()
    response.close()  # drops the connection, as a client that goes away does
    disconnects = await upstream.disconnects(1)
    assert disconnects == [{"method": method, "path": path}]
    assert time.monotonic() - left < SOON


# -- Redis --------------------------------------------------------------------------------------


async def test_redis_down_at_start_fails_closed_and_grants_resume_when_it_comes_up(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, upstream_json: RunningUpstream, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.port = free_port()  # where the gateway expects it; nothing listens there yet
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    async with running_gateway(idp, routes, replay_store=redis.url) as gateway:
        assertion = gateway.id_jag()
        started = time.monotonic()
        status, body, headers = await gateway.token_request(assertion)
        assert_retryable(status, body, headers)
        assert "replay protection" in body["error_description"]
        assert time.monotonic() - started < SOON
        redis.start()
        try:
            # The refusal did not use up the jti; once Redis answers, single use is enforced again.
            status, body, _ = await gateway.token_request(assertion)
            assert status == 200, body
            status, body, _ = await gateway.token_request(assertion)
            assert (status, body["error"]) == (400, "invalid_grant"), body
        finally:
            redis.stop()
