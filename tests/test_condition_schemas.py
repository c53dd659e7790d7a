"""Conditions type-checked against the tools and prompts the upstreams actually offer.

``check --upstreams`` (a subprocess, as users run it) lists every route's upstream over each transport the
gateway proxies (Streamable HTTP answering with JSON or SSE, the legacy HTTP+SSE transport, and
server-everything) and prints one line per condition that names a missing argument or compares one with
the wrong type. ``serve`` (an in-process gateway) does the same in the background at start, after a
reload, and when an upstream announces ``notifications/tools/list_changed`` on a stream it relays: the
test upstream's ``/_test/input_schema`` hook changes what its ``tools/list`` says at run time and sends
that notification, and calls are refused with ``condition_invalid`` exactly while the schema is changed.

Users (tests/support/harness.py): alice is in engineering and support, bob in support, carol in
contractors. Waiting is bounded polling against a deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.devidp import DevIdentityProvider
from gateway.proxy.jsonrpc import announces_list_changed
from tests.support.harness import GatewayHarness, make_config, running_gateway
from tests.support.loopback import free_port
from tests.support.mcp_http import WAIT, McpHttp, next_message, open_session, request, tool_call, tool_text
from tests.support.scrape import scrape
from tests.support.upstreams import RunningUpstream, start_upstream

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = -32003
INVALID = "mcp_gateway_condition_invalid"
CHECKS = "mcp_gateway_condition_checks_total"
POLL = 0.05


def run_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(config), "--upstreams"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def write_config(tmp_path: Path, routes: list[dict[str, Any]]) -> Path:
    document = {
        "listen": "127.0.0.1:0",
        "public_url": "https://mcp.example.com",
        "authorization": {
            "clients": [{"client_id": "agent", "client_secret": "agent-secret-0123456789"}],
            "identity_providers": [{"issuer": "https://idp.example.com"}],
        },
        "routes": routes,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def upstream_routes(
    upstream_json: RunningUpstream,
    upstream_sse: RunningUpstream,
    upstream_legacy: RunningUpstream,
    everything: Any,
    conditions: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """One route per kind of upstream; ``conditions`` adds rules and quotas per route name."""
    routes = [
        {"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url},
        {"name": "sse", "path": "/sse/mcp", "upstream": upstream_sse.mcp_url},
        {"name": "legacy", "path": "/legacy", "upstream": upstream_legacy.base_url, "transport": "sse"},
        {"name": "everything", "path": "/everything/mcp", "upstream": everything.mcp_url},
    ]
    return [{**route, **conditions.get(route["name"], {})} for route in routes]


# -- check --upstreams ---------------------------------------------------------------------------------


def test_check_upstreams_passes_when_every_condition_type_checks(
    tmp_path: Path, upstream_json, upstream_sse, upstream_legacy, everything
) -> None:
    conditions = {
        "json": {
            "tools": [
                {"groups": ["support"], "allow": ["echo"], "when": "args.text.size() < 100"},
                {"groups": ["engineering"], "deny": ["add"], "when": "args.a > 100"},
            ],
            "quotas": [{"id": "sums", "per": "user", "tools": ["add"], "limit": 100, "window": "1h", "cost": "args.b"}],
        },
        "sse": {"tools": [{"groups": ["*"], "allow": ["get_weather"], "when": "args.city in ['Paris', 'Oslo']"}]},
        "legacy": {"tools": [{"groups": ["*"], "allow": ["add"], "when": "args.a + args.b <= 10"}]},
        "everything": {
            "tools": [{"groups": ["*"], "allow": ["echo"], "when": "args.message != ''"}],
            "prompts": [{"groups": ["*"], "allow": ["args-prompt"], "when": "args.city == 'Paris'"}],
        },
    }
    routes = upstream_routes(upstream_json, upstream_sse, upstream_legacy, everything, conditions)
    result = run_check(write_config(tmp_path, routes))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    summary = result.stdout.split("upstreams:\n", 1)[1].splitlines()
    assert [re.sub(r"\d+", "N", line) for line in summary] == [
        "  json: N tools; conditions type-check",
        "  sse: N tools; conditions type-check",
        "  legacy: N tools; conditions type-check",
        "  everything: N tools, N prompts; conditions type-check",
    ]


def test_check_upstreams_reports_unknown_arguments_and_wrong_types_with_key_paths(
    tmp_path: Path, upstream_json, upstream_sse, upstream_legacy, everything
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/mcp"
    conditions = {
        "json": {
            "tools": [
                {"id": "typo", "groups": ["*"], "allow": ["echo"], "when": "args.txt.size() < 10"},
                # A rule applies to the listed tools its globs match, deny globs included.
                {"groups": ["support"], "allow": ["add"], "deny": ["get_*"], "when": "args.city > 3"},
            ],
            "quotas": [{"id": "q", "per": "user", "tools": ["echo"], "limit": 10, "window": "1h", "cost": "args.text"}],
        },
        "sse": {"tools": [{"groups": ["*"], "allow": ["echo", "add"], "when": "args.text == 'hi'"}]},
        "legacy": {"tools": [{"groups": ["*"], "allow": ["add"], "when": "args.a == 'one'"}]},
        "everything": {"prompts": [{"groups": ["*"], "allow": ["args-prompt"], "when": "args.town == 'Oslo'"}]},
    }
    routes = upstream_routes(upstream_json, upstream_sse, upstream_legacy, everything, conditions)
    routes.append({"name": "dead", "path": "/dead/mcp", "upstream": dead, "tools": conditions["legacy"]["tools"]})
    config = write_config(tmp_path, routes)
    result = run_check(config)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(result.stderr.splitlines()) == sorted(
        f"mcp-gateway: {config}: {line}"
        for line in [
            "routes[0].tools[0].when: tool 'echo': column 5: the tool has no argument 'txt'",
            "routes[0].tools[1].when: tool 'add': column 5: the tool has no argument 'city'",
            "routes[0].tools[1].when: tool 'get_weather': column 11: '>' cannot be applied to (string, int)",
            "routes[0].quotas[0].cost: tool 'echo': the result is string, not a number",
            "routes[1].tools[0].when: tool 'add': column 5: the tool has no argument 'text'",
            "routes[2].tools[0].when: tool 'add': column 8: '==' cannot be applied to (int, string)",
            "routes[3].prompts[0].when: prompt 'args-prompt': column 5: the prompt has no argument 'town'",
            f"routes[4].upstream: cannot list the tools of route 'dead' ({dead}): cannot connect: Connection refused",
        ]
    )
    summary = result.stdout.split("upstreams:\n", 1)[1].splitlines()
    assert [re.sub(r"\d+ (tools|prompts)", r"N \1", line) for line in summary] == [
        "  json: N tools; conditions: 4 type errors",
        "  sse: N tools; conditions: 1 type error",
        "  legacy: N tools; conditions: 1 type error",
        "  everything: N tools, N prompts; conditions: 1 type error",
        "  dead: unreachable",
    ]


# -- serve ---------------------------------------------------------------------------------------------


async def eventually(probe: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Poll ``probe`` until it returns something truthy (returned); fail after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not (got := await probe()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: still {got!r} after {WAIT}s")
        await asyncio.sleep(POLL)
    return got


async def gauge(harness: GatewayHarness, http: aiohttp.ClientSession, route: str, rule: str) -> float | None:
    current = await scrape(http, harness.url + "/metrics")
    return current.value(INVALID, route=route, rule=rule) if current.has(INVALID, route=route, rule=rule) else None


def refusal(answer: dict[str, Any]) -> dict[str, Any] | None:
    """The ``error.data`` of a condition_invalid refusal, else None."""
    error = answer.get("error") or {}
    data = error.get("data") or {}
    return data if error.get("code") == FORBIDDEN and data.get("reason") == "condition_invalid" else None


TYPED_RULES: list[dict[str, Any]] = [
    {"id": "echo-five", "groups": ["support"], "allow": ["echo"], "when": "args.text == 5"},
    {"id": "small-adds", "groups": ["support"], "allow": ["add"], "when": "args.a < 10"},
    {"id": "contractors", "groups": ["contractors"], "allow": ["echo"]},
]


async def test_serve_refuses_calls_a_condition_that_does_not_type_check_would_decide_until_a_reload_fixes_it(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, upstream_json: RunningUpstream, tmp_path: Path
) -> None:
    sink = tmp_path / "audit.log"
    audit = {"sink": str(sink)}
    route = {"name": "typed", "path": "/typed/mcp", "upstream": upstream_json.mcp_url, "tools": TYPED_RULES}
    async with running_gateway(idp, [route], audit=audit) as harness:
        bob = await open_session(harness, http, "typed", user="bob")
        carol = await open_session(harness, http, "typed", user="carol")
        # Checked in the background after start: readiness never waited for it.
        await eventually(lambda: gauge(harness, http, "typed", "echo-five"), "echo-five marked invalid")

        answer = await bob.call(tool_call(2, "echo", {"text": "5"}))
        assert refusal(answer) == {
            "reason": "condition_invalid",
            "method": "tools/call",
            "rule": "echo-five",
            "detail": "column 11: '==' cannot be applied to (string, int)",
        }
        # A condition that type-checks decides as usual; a rule that does not apply to the user is no concern.
        assert tool_text(await bob.call(tool_call(3, "add", {"a": 1, "b": 2}))) == "3"
        assert tool_text(await carol.call(tool_call(4, "echo", {"text": "hi"}))) == "hi"
        assert await gauge(harness, http, "typed", "small-adds") == 0

        fixed = [{**TYPED_RULES[0], "when": "args.text == 'five'"}, *TYPED_RULES[1:]]
        config = make_config(harness.url, [idp], [{**route, "tools": fixed}], audit=audit)
        assert await harness.gateway.reload(config)
        await eventually(
            lambda: _is_zero(gauge(harness, http, "typed", "echo-five")), "echo-five valid after the reload"
        )
        assert tool_text(await bob.call(tool_call(5, "echo", {"text": "five"}))) == "five"
        current = await scrape(http, harness.url + "/metrics")
        assert current.value(CHECKS, route="typed", result="invalid") == 1
        assert current.value(CHECKS, route="typed", result="ok") == 1
    denied = [json.loads(line) for line in sink.read_text().splitlines() if '"tool.denied"' in line]
    assert [(e["sub"], e["target"], e["rule"], e["decision"]) for e in denied] == [("bob", "echo", "echo-five", "deny")]
    assert denied[0]["reason"] == (
        "routes[0].tools[0].when does not type-check against tool 'echo': "
        "column 11: '==' cannot be applied to (string, int)"
    )


async def _is_zero(value: Awaitable[float | None]) -> bool:
    return await value == 0


async def test_list_changed_turns_a_condition_invalid_and_a_later_one_clears_it(
    idp: DevIdentityProvider, http: aiohttp.ClientSession
) -> None:
    rules = [{"id": "ok-echo", "groups": ["*"], "allow": ["echo"], "when": "args.text.startsWith('ok')"}]
    with start_upstream("streamable-sse") as upstream:
        route = {"name": "changing", "path": "/changing/mcp", "upstream": upstream.mcp_url, "tools": rules}
        async with running_gateway(idp, [route]) as harness:
            alice = await open_session(harness, http, "changing")
            stream = await http.get(alice.url, headers=alice.headers(Accept="text/event-stream"))
            try:
                assert stream.status == 200
                await alice.call(request(2, "tools/list"))  # the upstream tells sessions that listed tools
                await eventually(lambda: _is_zero(gauge(harness, http, "changing", "ok-echo")), "first check")
                assert tool_text(await alice.call(tool_call(3, "echo", {"text": "ok 1"}))) == "ok 1"

                retyped = {"type": "object", "properties": {"text": {"type": "integer"}}, "required": ["text"]}
                assert await asyncio.to_thread(upstream.set_input_schema, "echo", retyped) >= 1
                async with asyncio.timeout(WAIT):
                    assert await next_message(stream.content) == {
                        "jsonrpc": "2.0",
                        "method": "notifications/tools/list_changed",
                    }
                data = await eventually(lambda: _echo_refused(alice, "ok 2"), "echo refused after list_changed")
                assert data["rule"] == "ok-echo"
                assert data["detail"] == "column 21: 'startsWith' cannot be applied to (int, string)"
                assert await gauge(harness, http, "changing", "ok-echo") == 1

                assert await asyncio.to_thread(upstream.set_input_schema, "echo", None) >= 1
                await eventually(lambda: _echo_allowed(alice, "ok 3"), "echo allowed after the schema is restored")
                assert await gauge(harness, http, "changing", "ok-echo") == 0
            finally:
                stream.close()


async def _echo_refused(client: McpHttp, text: str) -> dict[str, Any] | None:
    return refusal(await client.call(tool_call(10, "echo", {"text": text})))


async def _echo_allowed(client: McpHttp, text: str) -> bool:
    answer = await client.call(tool_call(11, "echo", {"text": text}))
    return "result" in answer and tool_text(answer) == text


async def test_an_unreachable_upstream_at_start_is_logged_and_not_fatal(
    idp: DevIdentityProvider, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/mcp"
    route = {"name": "down", "path": "/down/mcp", "upstream": dead, "tools": TYPED_RULES}
    with caplog.at_level(logging.WARNING, logger="gateway.condition_monitor"):
        async with running_gateway(idp, [route]) as harness:
            async with http.get(harness.url + "/readyz") as ready:
                assert ready.status == 200

            async def unreachable() -> float:
                return (await scrape(http, harness.url + "/metrics")).value(CHECKS, route="down", result="unreachable")

            assert await eventually(unreachable, "an unreachable check counted") == 1
    warnings = [r for r in caplog.records if r.name == "gateway.condition_monitor"]
    assert [r.getMessage() for r in warnings] == [
        "route down: cannot list the upstream's tools to type-check conditions: cannot connect: Connection refused; "
        "retrying"
    ]
    assert warnings[0].exc_info is None


# -- which events announce a changed list ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "announces"),
    [
        (b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/tools/list_changed"}\n\n', True),
        (b'data: {"jsonrpc":"2.0","method":"notifications/prompts/list_changed","params":{}}\r\n\r\n', True),
        (b'data: [{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}]\n\n', True),
        (b'data: {"jsonrpc":"2.0","method":"notifications/resources/list_changed"}\n\n', False),
        (b'data: {"jsonrpc":"2.0","id":3,"result":{"content":[{"text":"list_changed"}]}}\n\n', False),
        (b'event: endpoint\ndata: {"method":"notifications/tools/list_changed"}\n\n', False),
        (b'data: {"jsonrpc":"2.0","method":"notifications/tools/list_changed"\n\n', False),
        (b": keep-alive\n\n", False),
    ],
)
def test_which_events_announce_a_changed_list(event: bytes, announces: bool) -> None:
    assert announces_list_changed(event) is announces
