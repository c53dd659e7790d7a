"""One user cannot take a route from the others (gateway/proxy/forward.py ``Upstream``): a cap on the
requests one principal holds open per route (``limits.max_streams_per_principal``), a pool for
listening GET streams apart from the one for calls, each of ``routes[].max_connections``, and a short
wait for a pooled connection (``limits.upstream_pool_timeout_seconds``) answered 503, never a 504
after the upstream timeout. Real SDK upstreams; the ``gated_stream`` tool holds a call open."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, parse_config
from gateway.devidp import DevIdentityProvider
from tests.support.harness import running_gateway
from tests.support.mcp_http import (
    new_gate,
    next_message,
    open_session,
    rest_of_stream,
    tool_call,
    tool_text,
)
from tests.support.upstreams import RunningUpstream

WAIT = 10.0
POOL_TIMEOUT = 0.5


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll an outside observable (the upstream's record of what it received), bounded by WAIT."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT}s: {what}"
        await asyncio.sleep(0.02)


async def exchange(request: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, JSON body and headers of one request (``client.post(...)`` or ``http.get(...)``)."""
    async with request as response:
        return response.status, await response.json(content_type=None), dict(response.headers)


async def timed(request: Any) -> tuple[float, int, dict[str, Any], dict[str, str]]:
    started = time.monotonic()
    async with asyncio.timeout(WAIT):
        status, body, headers = await exchange(request)
    return time.monotonic() - started, status, body, headers


async def test_one_principal_at_its_stream_cap_is_refused_429_while_others_are_served(
    idp: DevIdentityProvider, upstream_sse: RunningUpstream, tmp_path: Path
) -> None:
    sink = tmp_path / "audit.log"
    routes = [{"name": "sse", "path": "/sse/mcp", "upstream": upstream_sse.mcp_url}]
    limits = {"max_streams_per_principal": 2}
    gate = new_gate("fair")
    async with aiohttp.ClientSession() as http:
        async with running_gateway(idp, routes, limits=limits, audit={"sink": str(sink)}) as gw:
            alice = await open_session(gw, http, "sse")
            bob = await open_session(gw, http, "sse", user="bob")
            listening = await http.get(alice.url, headers=alice.headers(Accept="text/event-stream"))
            assert listening.status == 200  # alice's first open stream: the GET stream
            try:
                async with alice.post(tool_call(2, "gated_stream", {"gate": gate})) as call:
                    assert call.content_type == "text/event-stream"  # her second: a call still running
                    async with asyncio.timeout(WAIT):
                        assert (await next_message(call.content))["method"] == "notifications/message"

                    status, body, headers = await exchange(alice.post(tool_call(3, "echo", {"text": "third"})))
                    assert status == 429, body
                    assert body["error"]["code"] == -32013
                    assert "too many open streams" in body["error"]["message"]
                    assert body["id"] == 3
                    assert int(headers["Retry-After"]) > 0
                    # Another user of the same route is not affected.
                    assert tool_text(await bob.call(tool_call(3, "echo", {"text": "bob"}))) == "bob"

                    upstream_sse.release(gate)
                    async with asyncio.timeout(WAIT):
                        assert await rest_of_stream(call.content)
                # Her call ended: she is below the cap again.
                assert tool_text(await alice.call(tool_call(4, "echo", {"text": "again"}))) == "again"
            finally:
                upstream_sse.release(gate)
                listening.close()
    refusals = [line for line in map(json.loads, sink.read_text().splitlines()) if line.get("reason") == "stream_limit"]
    assert len(refusals) == 1, refusals
    assert refusals[0]["event"] == "request.denied"
    assert (refusals[0]["sub"], refusals[0]["decision"], refusals[0]["status"]) == ("alice", "deny", 429)


async def test_listening_streams_have_their_own_pool_and_a_full_pool_answers_503_quickly(
    idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url, "max_connections": 1}]
    # The upstream timeout is long: a full pool must not wait for it.
    limits = {"upstream_pool_timeout_seconds": POOL_TIMEOUT, "upstream_timeout_seconds": 300}
    gate = new_gate("pool")
    async with aiohttp.ClientSession() as http:
        async with running_gateway(idp, routes, limits=limits) as gw:
            alice = await open_session(gw, http, "json")
            bob = await open_session(gw, http, "json", user="bob")
            listening = await http.get(alice.url, headers=alice.headers(Accept="text/event-stream"))
            try:
                assert listening.status == 200  # the only connection of the stream pool
                # Calls still find a connection while the stream pool is full.
                assert tool_text(await alice.call(tool_call(2, "echo", {"text": "a"}))) == "a"
                assert tool_text(await bob.call(tool_call(2, "echo", {"text": "b"}))) == "b"

                get = http.get(bob.url, headers=bob.headers(Accept="text/event-stream"))
                elapsed, status, body, headers = await timed(get)
                assert status == 503, body
                assert body["error"]["code"] == -32010
                assert "no free stream connection" in body["error"]["message"]
                assert int(headers["Retry-After"]) > 0
                assert POOL_TIMEOUT * 0.9 <= elapsed < WAIT

                # Now the call pool: alice's gated call holds its only connection.
                upstream_json.reset()
                held = asyncio.create_task(alice.call(tool_call(3, "gated_stream", {"gate": gate})))
                await until(lambda: "tools/call" in upstream_json.recorded_methods(), "the held call upstream")
                elapsed, status, body, headers = await timed(bob.post(tool_call(4, "echo", {"text": "late"})))
                assert status == 503, body
                assert "no free call connection" in body["error"]["message"]
                assert (body["id"], int(headers["Retry-After"]) > 0) == (4, True)
                assert POOL_TIMEOUT * 0.9 <= elapsed < WAIT

                upstream_json.release(gate)
                async with asyncio.timeout(WAIT):
                    assert tool_text(await held) == f"gate {gate} released"
                assert tool_text(await bob.call(tool_call(5, "echo", {"text": "now"}))) == "now"
            finally:
                upstream_json.release(gate)
                listening.close()


BASE = {
    "public_url": "https://mcp.example.com",
    "authorization": {
        "clients": [{"client_id": "agent", "client_secret": "agent-secret-0123456789"}],
        "identity_providers": [{"issuer": "https://idp.example.com"}],
    },
    "routes": [{"name": "r", "path": "/r/mcp", "upstream": "http://upstream:3000/mcp"}],
}


def test_pool_and_stream_limits_have_defaults() -> None:
    config = parse_config(BASE)
    assert config.routes[0].max_connections == 256
    assert (config.limits.max_streams_per_principal, config.limits.upstream_pool_timeout_seconds) == (32, 5.0)


@pytest.mark.parametrize(
    ("edit", "key", "problem"),
    [
        ({"routes": [{**BASE["routes"][0], "max_connections": 0}]}, "routes[0].max_connections", "between 1 and"),
        ({"routes": [{**BASE["routes"][0], "max_connections": "many"}]}, "routes[0].max_connections", "an integer"),
        ({"limits": {"max_streams_per_principal": 0}}, "limits.max_streams_per_principal", "between 1 and"),
        ({"limits": {"upstream_pool_timeout_seconds": "5s"}}, "limits.upstream_pool_timeout_seconds", "a number"),
    ],
)
def test_invalid_pool_and_stream_limits_name_their_key(edit: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, **edit}, source="gw.yaml")
    assert (caught.value.key, problem in caught.value.problem) == (key, True)
