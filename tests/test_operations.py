"""Config reload and graceful shutdown of ``mcp-gateway serve``, run as operators run it: a subprocess.

Each test starts ``python -m gateway serve --config FILE`` on a free 127.0.0.1 port in front of the
real SDK upstreams, trusting the in-process DevIdentityProvider, and holds a live SSE stream open
(the upstream's ``gated_stream`` tool blocks until the test releases its gate) while it reloads
(SIGHUP, or a changed file), removes a route, or shuts the gateway down (SIGTERM). What is checked
is what an operator relies on: streams on unchanged routes keep flowing across a reload, streams on
removed routes and on a draining gateway end cleanly (the client sees the end of the stream, never a
hang or a broken body), an invalid config changes nothing, and SIGTERM exits 0 within the grace
period. Every wait is bounded; polling against a deadline is the only synchronisation.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import gateway.app
from gateway.devidp import DevIdentityProvider
from tests.support.harness import make_config, start_harness
from tests.support.loopback import free_port
from tests.support.mcp_http import (
    McpHttp,
    new_gate,
    next_message,
    open_session,
    response_message,
    rest_of_stream,
    tool_call,
    tool_text,
)
from tests.support.scrape import scrape
from tests.support.serve import POLL, RELOADS, WAIT, ServedGateway, config_document, served
from tests.support.upstreams import RunningUpstream


@asynccontextmanager
async def live_stream(client: McpHttp, request_id: int, gate: str) -> AsyncIterator[aiohttp.ClientResponse]:
    """A ``gated_stream`` call whose first event has arrived: the SSE response is open and idle."""
    async with client.post(tool_call(request_id, "gated_stream", {"gate": gate})) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        async with asyncio.timeout(WAIT):
            assert (await next_message(response.content))["method"] == "notifications/message"
        yield response


# -- reload ----------------------------------------------------------------------------------------


async def test_sighup_adds_a_route_while_streams_and_sessions_on_unchanged_routes_continue(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream, upstream_sse: RunningUpstream
) -> None:
    routes = {"json": upstream_json.mcp_url, "sse": upstream_sse.mcp_url}
    port = free_port()
    async with served(tmp_path, idp, config_document(port, idp, routes)) as gw:
        json_client = await gw.client("json")
        gate = new_gate("ops")
        async with live_stream(await gw.client("sse"), 2, gate) as stream:
            assert await gw.status("/extra/mcp") == 404
            gw.write_config(config_document(port, idp, {**routes, "extra": upstream_json.mcp_url}))
            gw.send(signal.SIGHUP)
            await gw.eventually(lambda: gw.status("/extra/mcp"), 401, "the added route after SIGHUP")

            extra = await gw.client("extra")
            assert tool_text(await extra.call(tool_call(2, "echo", {"text": "new route"}))) == "new route"
            # A session (and token) from before the reload, on an unchanged route, still works.
            assert tool_text(await json_client.call(tool_call(2, "echo", {"text": "same"}))) == "same"

            upstream_sse.release(gate)
            async with asyncio.timeout(WAIT):
                final = await response_message(stream.content, 2)
                assert await rest_of_stream(stream.content) == []
        assert tool_text(final) == f"gate {gate} released"
        assert (await gw.reloads("success"), await gw.reloads("failure")) == (1, 0)


async def test_a_changed_file_is_reloaded_without_a_signal(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    port = free_port()
    watched = {"reload": {"watch_interval_seconds": 0.2}}
    routes = {"json": upstream_json.mcp_url}
    async with served(tmp_path, idp, config_document(port, idp, routes, **watched)) as gw:
        gw.write_config(config_document(port, idp, {**routes, "extra": upstream_json.mcp_url}, **watched))
        await gw.eventually(lambda: gw.status("/extra/mcp"), 401, "the added route after the file changed")
        extra = await gw.client("extra")
        assert tool_text(await extra.call(tool_call(2, "echo", {"text": "watched"}))) == "watched"
        assert await gw.reloads("success") == 1


async def test_an_invalid_config_is_refused_and_the_running_one_keeps_serving(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    port = free_port()
    audit = {"audit": {"sink": str(tmp_path / "audit.jsonl")}}
    routes = {"json": upstream_json.mcp_url}
    async with served(tmp_path, idp, config_document(port, idp, routes, **audit)) as gw:
        json_client = await gw.client("json")
        invalid = config_document(port, idp, {**routes, "extra": upstream_json.mcp_url}, **audit)
        gw.write_config({**invalid, "bogus_key": 1})
        gw.send(signal.SIGHUP)
        await gw.eventually(lambda: gw.reloads("failure"), 1, "the failed-reload counter")

        assert await gw.reloads("success") == 0
        assert await gw.status("/extra/mcp") == 404  # nothing of the invalid file applied
        assert tool_text(await json_client.call(tool_call(2, "echo", {"text": "still"}))) == "still"
        assert tool_text(await (await gw.client("json")).call(tool_call(2, "echo", {"text": "new"}))) == "new"
        stderr = gw.stderr()
        assert "config reload refused, keeping the running config" in stderr
        assert "bogus_key: unknown key" in stderr

        def refusals() -> list[dict[str, Any]]:
            lines = (tmp_path / "audit.jsonl").read_text().splitlines()
            return [e for e in map(json.loads, lines) if e["event"] == "config.reload" and e["decision"] == "deny"]

        async def refusal_count() -> int:
            return len(refusals())

        await gw.eventually(refusal_count, 1, "the config.reload deny audit event")
        assert "bogus_key" in refusals()[0]["reason"]

        # Once the file is fixed, the next reload applies it.
        gw.write_config(invalid)
        gw.send(signal.SIGHUP)
        await gw.eventually(lambda: gw.status("/extra/mcp"), 401, "the route of the fixed config")
        assert (await gw.reloads("success"), await gw.reloads("failure")) == (1, 1)


async def test_removing_a_route_ends_its_live_stream_cleanly_then_the_route_404s(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream, upstream_sse: RunningUpstream
) -> None:
    port = free_port()
    routes = {"json": upstream_json.mcp_url, "sse": upstream_sse.mcp_url}
    async with served(tmp_path, idp, config_document(port, idp, routes)) as gw:
        gate = new_gate("ops")
        try:
            async with live_stream(await gw.client("sse"), 2, gate) as stream:
                gw.write_config(config_document(port, idp, {"json": upstream_json.mcp_url}))
                gw.send(signal.SIGHUP)
                # The end of the stream, not a hang and not a broken chunked body (ClientPayloadError).
                async with asyncio.timeout(WAIT):
                    rest = await rest_of_stream(stream.content)
                assert not [m for m in rest if m.get("id") == 2], "the call cannot have completed"
        finally:
            upstream_sse.release(gate)
        assert await gw.status("/sse/mcp") == 404
        async with gw.http.get(gw.base + "/.well-known/oauth-protected-resource/sse/mcp") as response:
            assert response.status == 404
        assert tool_text(await (await gw.client("json")).call(tool_call(2, "echo", {"text": "kept"}))) == "kept"

        async def sse_gauges() -> tuple[float, float]:
            current = await gw.metrics()
            return (
                current.value("mcp_gateway_open_streams", route="sse"),
                current.value("mcp_gateway_in_flight_requests", route="sse"),
            )

        await gw.eventually(sse_gauges, (0, 0), "the removed route's stream gauges")


# -- graceful shutdown -----------------------------------------------------------------------------


async def in_flight(gw: ServedGateway, route: str) -> float:
    return (await gw.metrics()).value("mcp_gateway_in_flight_requests", route=route)


async def test_sigterm_ends_listening_streams_at_once_lets_requests_finish_and_exits_zero(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream, upstream_sse: RunningUpstream
) -> None:
    """Drain ends GET (listening) streams at once, so clients reconnect elsewhere; requests in flight,
    including a tool call whose result comes on a POST event stream, finish within the grace."""
    grace = 5
    routes = {"json": upstream_json.mcp_url, "sse": upstream_sse.mcp_url}
    document = config_document(free_port(), idp, routes, shutdown_grace_seconds=grace)
    async with served(tmp_path, idp, document) as gw:
        json_client = await gw.client("json")
        sse_client = await gw.client("sse")
        stream_gate, slow_gate = new_gate("ops"), new_gate("ops")
        try:
            listening = await sse_client.http.get(
                sse_client.url, headers=sse_client.headers(Accept="text/event-stream")
            )
            assert (listening.status, listening.content_type) == (200, "text/event-stream")
            async with live_stream(sse_client, 2, stream_gate) as stream:
                # The JSON upstream answers only when the tool returns: a request in flight, not a stream.
                slow = asyncio.create_task(json_client.call(tool_call(3, "gated_stream", {"gate": slow_gate})))
                await gw.eventually(lambda: in_flight(gw, "json"), 1, "the slow request in flight")

                gw.send(signal.SIGTERM)
                stopping = time.monotonic()
                async with asyncio.timeout(2):  # promptly: not after the grace period
                    assert await listening.content.read() == b""
                listening.release()
                assert not slow.done(), "the drain must not cut requests that are still in flight"
                upstream_sse.release(stream_gate)
                async with asyncio.timeout(WAIT):
                    rest = await rest_of_stream(stream.content)
                assert [tool_text(m) for m in rest if m.get("id") == 2] == [f"gate {stream_gate} released"]
            upstream_json.release(slow_gate)
            async with asyncio.timeout(WAIT):
                assert tool_text(await slow) == f"gate {slow_gate} released"
        finally:
            upstream_json.release(slow_gate)
            upstream_sse.release(stream_gate)
        assert await gw.exit_code(within=grace + 5) == 0
        assert time.monotonic() - stopping < grace
    assert "shutting down: ended 1 streams" in gw.stderr()


async def test_sigterm_exits_zero_when_a_request_outlasts_the_grace_period(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    grace = 1
    document = config_document(free_port(), idp, {"json": upstream_json.mcp_url}, shutdown_grace_seconds=grace)
    async with served(tmp_path, idp, document) as gw:
        client = await gw.client("json")
        gate = new_gate("ops")
        try:
            slow = asyncio.create_task(client.call(tool_call(2, "gated_stream", {"gate": gate})))
            await gw.eventually(lambda: in_flight(gw, "json"), 1, "the slow request in flight")
            gw.send(signal.SIGTERM)
            stopping = time.monotonic()
            assert await gw.exit_code(within=grace + 5) == 0
            elapsed = time.monotonic() - stopping
            (outcome,) = await asyncio.gather(slow, return_exceptions=True)
        finally:
            upstream_json.release(gate)
        assert grace - 0.1 <= elapsed < grace + 3, elapsed
        # Cut at the deadline: the client sees the connection close, not an answer.
        assert isinstance(outcome, aiohttp.ClientError), outcome


async def test_drain_turns_readyz_503_and_ends_listening_streams(
    idp: DevIdentityProvider, upstream_sse: RunningUpstream
) -> None:
    """``serve`` closes its listener right after draining, so /readyz's 503 is observed in process."""
    harness = await start_harness(idp, [{"name": "sse", "path": "/sse/mcp", "upstream": upstream_sse.mcp_url}])
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(harness.url + "/readyz") as response:
                assert response.status == 200
            client = await open_session(harness, http, "sse")
            async with http.get(client.url, headers=client.headers(Accept="text/event-stream")) as listening:
                assert listening.status == 200
                assert harness.gateway.drain() == 1
                async with http.get(harness.url + "/readyz") as response:
                    assert (response.status, await response.json()) == (503, {"status": "draining"})
                async with asyncio.timeout(WAIT):
                    assert await listening.content.read() == b""
    finally:
        await harness.runner.cleanup()


# -- reload, in process: what the swap keeps and what it restarts -----------------------------------


async def test_a_request_in_flight_finishes_when_a_reload_replaces_its_upstream_pool(
    idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    """Changing ``limits`` replaces every route's pool (so does changing a route's upstream, transport
    or headers). A request already sent upstream must still get its answer: only requests that
    start after the swap use the new pool, and only live streams are ended."""
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    harness = await start_harness(idp, routes)
    gate = new_gate("ops")
    try:
        async with aiohttp.ClientSession() as http:
            client = await open_session(harness, http, "json")
            calls = len(upstream_json.recorded())
            slow = asyncio.create_task(client.call(tool_call(2, "gated_stream", {"gate": gate})))
            async with asyncio.timeout(WAIT):
                while len(upstream_json.recorded()) == calls:  # the call has reached the upstream
                    await asyncio.sleep(POLL)
            old = harness.gateway.runtime.upstreams["json"]
            changed = make_config(harness.url, [idp], routes, limits={"stream_keepalive_seconds": 20})
            assert await harness.gateway.reload(changed)
            assert harness.gateway.runtime.upstreams["json"] is not old
            # A scrape gives the reload's background work its turn before the upstream answers.
            assert (await scrape(http, harness.url + "/metrics")).value(RELOADS, result="success") == 1
            upstream_json.release(gate)
            async with asyncio.timeout(WAIT):
                assert tool_text(await slow) == f"gate {gate} released"
    finally:
        upstream_json.release(gate)
        await harness.runner.cleanup()


async def test_keys_of_an_idp_added_by_reload_are_fetched_when_it_comes_back(
    idp: DevIdentityProvider, upstream_json: RunningUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pod stays ready throughout; a retry loop, not a token request, fetches the keys."""
    monkeypatch.setattr(gateway.app, "_JWKS_RETRY_SECONDS", POLL)
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    harness = await start_harness(idp, routes, jwks_min_refresh_seconds=0)
    port = free_port()
    late_idp = DevIdentityProvider(issuer=f"http://127.0.0.1:{port}")
    try:
        async with aiohttp.ClientSession() as http:

            async def available() -> float:
                scraped = await scrape(http, harness.url + "/metrics")
                return scraped.value("mcp_gateway_idp_keys_available", issuer=late_idp.issuer)

            assert await harness.gateway.reload(make_config(harness.url, [idp, late_idp], routes))
            async with http.get(harness.url + "/readyz") as response:
                assert (response.status, (await response.json())["idp_keys_missing"]) == (200, [late_idp.issuer])
            assert await available() == 0
            await late_idp.start(port=port)
            deadline = time.monotonic() + 2  # a retry loop would need one POLL interval
            while await available() != 1:
                assert time.monotonic() < deadline, "keys not fetched after the IdP came back"
                await asyncio.sleep(POLL)
            async with http.get(harness.url + "/readyz") as response:
                assert (response.status, await response.json()) == (200, {"status": "ready"})
    finally:
        await late_idp.stop()
        await harness.runner.cleanup()
