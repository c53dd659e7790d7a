"""Prometheus metrics (gateway/metrics.py), scraped from a real gateway while traffic flows through it.

Every scrape is parsed by prometheus-client's own text-format parser, and every check compares two
scrapes around one action, so the tests show that each counter, histogram and gauge *moves* with the
traffic that should move it (and only by as much as it should). A separate test floods the gateway
with random paths, JSON-RPC method names, tool names and HTTP methods and shows the set of time
series does not grow: nothing a client sends becomes a label value.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import __version__
from gateway.devidp import DevIdentityProvider
from gateway.metrics import GRANT_OUTCOMES, HTTP_CLASSES, KNOWN_METHODS, NO_ROUTE
from tests.support.harness import GatewayHarness, make_config, running_gateway, start_harness
from tests.support.loopback import free_port
from tests.support.mcp_http import (
    ACCEPT,
    WAIT,
    McpHttp,
    new_gate,
    next_message,
    open_session,
    request,
    response_message,
    tool_call,
    tool_text,
)
from tests.support.scrape import Scrape, scrape
from tests.support.upstreams import RunningUpstream

DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
FLOOD = 1_000  # random requests of each kind in the label-bounding test
ROUTES = {"json", "sse", "policy"}
# Every family the gateway exposes, as prometheus-client's parser names it (counters without _total).
FAMILIES = {
    "mcp_gateway_build_info": "gauge",
    "mcp_gateway_requests": "counter",
    "mcp_gateway_request_duration_seconds": "histogram",
    "mcp_gateway_upstream_duration_seconds": "histogram",
    "mcp_gateway_in_flight_requests": "gauge",
    "mcp_gateway_open_streams": "gauge",
    "mcp_gateway_token_grants": "counter",
    "mcp_gateway_jwks_fetches": "counter",
    "mcp_gateway_jwks_age_seconds": "gauge",
    "mcp_gateway_idp_keys_available": "gauge",
    "mcp_gateway_policy_decisions": "counter",
    "mcp_gateway_quota_decisions": "counter",
    "mcp_gateway_config_reloads": "counter",
    "mcp_gateway_condition_invalid": "gauge",
    "mcp_gateway_condition_checks": "counter",
    "mcp_gateway_tool_drift": "counter",
    "mcp_gateway_approvals": "counter",
    "mcp_gateway_shared_signals": "counter",
    "mcp_gateway_signal_cutoffs": "counter",
    "mcp_gateway_audit_dropped_lines": "counter",
    "mcp_gateway_upstream_pool_in_use": "gauge",
    "mcp_gateway_upstream_pool_limit": "gauge",
    "mcp_gateway_upstream_credentials": "counter",
}
# prometheus-client's standard process and Python collectors: fds and memory of a proxy holding streams.
STANDARD = {
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_cpu_seconds": "counter",
    "python_info": "gauge",
    "python_gc_collections": "counter",
}
REQUESTS = "mcp_gateway_requests_total"
GRANTS = "mcp_gateway_token_grants_total"
FETCHES = "mcp_gateway_jwks_fetches_total"
DECISIONS = "mcp_gateway_policy_decisions_total"
RELOADS = "mcp_gateway_config_reloads_total"
UPSTREAM = "mcp_gateway_upstream_duration_seconds"


@pytest.fixture(scope="module")
async def unreachable_idp() -> DevIdentityProvider:
    """A trusted IdP nobody listens for: its JWKS fetches fail."""
    return DevIdentityProvider(issuer=f"http://127.0.0.1:{free_port()}")


@pytest.fixture(scope="module")
async def mgw(
    idp: DevIdentityProvider,
    unreachable_idp: DevIdentityProvider,
    upstream_json: RunningUpstream,
    upstream_sse: RunningUpstream,
) -> AsyncIterator[GatewayHarness]:
    """A gateway of its own, so other test modules' traffic never moves these counters."""
    routes = [
        {"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url},
        {"name": "sse", "path": "/sse/mcp", "upstream": upstream_sse.mcp_url},
        {
            "name": "policy",
            "path": "/policy/mcp",
            "upstream": upstream_json.mcp_url,
            "tools": [{"groups": ["*"], "allow": ["echo", "add"], "deny": ["delete_*"]}],
        },
    ]
    # jwks_min_refresh_seconds=0: an unknown kid refetches at once, so the fetch counter can be moved.
    # The label-bounding flood has up to 64 requests of one principal open at once: no 429 series.
    limits = {"max_streams_per_principal": 64}
    async with running_gateway(
        idp, routes, extra_idps=[unreachable_idp], jwks_min_refresh_seconds=0, limits=limits
    ) as harness:
        yield harness


async def metrics(gw: GatewayHarness, http: aiohttp.ClientSession) -> Scrape:
    return await scrape(http, gw.url + "/metrics")


async def moved(gw: GatewayHarness, http: aiohttp.ClientSession, action: Callable[[], Awaitable[None]]):
    """Scrape, run ``action``, scrape again; returns ``delta(sample, **labels)`` between the two."""
    before = await metrics(gw, http)
    await action()
    after = await metrics(gw, http)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    return delta


# -- the exposition itself -------------------------------------------------------------------------


async def test_scrape_parses_and_every_family_is_prefixed_and_typed(
    mgw: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    current = await metrics(mgw, http)
    assert gateway_families(current) == FAMILIES
    assert current.families.items() >= STANDARD.items()
    assert all(f.startswith(("process_", "python_")) for f in set(current.families) - set(FAMILIES))
    assert current.value("mcp_gateway_build_info", version=__version__) == 1
    assert current.value("mcp_gateway_audit_dropped_lines_total") == 0
    assert current.value("process_open_fds") > 0
    assert current.value("process_resident_memory_bytes") > 0


def gateway_families(current: Scrape) -> dict[str, str]:
    return {name: kind for name, kind in current.families.items() if name.startswith("mcp_gateway_")}


async def test_docs_describe_every_metric(mgw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    text = DOCS.read_text()
    for family, kind in gateway_families(await metrics(mgw, http)).items():
        name = family + "_total" if kind == "counter" else family
        assert f"`{name}`" in text, f"docs/metrics.md does not describe {name}"
    assert "`process_*`" in text and "`python_*`" in text


# -- counters and histograms move with traffic -----------------------------------------------------


async def test_requests_and_latencies_count_by_route_method_and_status(
    mgw: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    async def traffic() -> None:
        client = await open_session(mgw, http, "json")  # initialize + notifications/initialized
        assert tool_text(await client.call(tool_call(2, "echo", {"text": "counted"}))) == "counted"
        # Refused before forwarding: counted as a request, never as an upstream round trip.
        async with http.post(mgw.route_url("json"), json=tool_call(3, "echo"), headers={"Accept": ACCEPT}) as denied:
            assert denied.status == 401

    delta = await moved(mgw, http, traffic)
    assert delta(REQUESTS, route="json", method="initialize", status="200") == 1
    assert delta(REQUESTS, route="json", method="notification", status="202") == 1
    assert delta(REQUESTS, route="json", method="tools/call", status="200") == 1
    # Unauthenticated: the body is never parsed, so the method is not known.
    assert delta(REQUESTS, route="json", method="other", status="401") == 1
    assert delta("mcp_gateway_request_duration_seconds_count", route="json") == 4
    assert delta("mcp_gateway_request_duration_seconds_sum", route="json") > 0
    assert delta("mcp_gateway_upstream_duration_seconds_count", route="json") == 3
    assert delta("mcp_gateway_upstream_duration_seconds_sum", route="json") > 0


async def test_histogram_buckets_are_cumulative(mgw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    await open_session(mgw, http, "json")
    current = await metrics(mgw, http)
    for family in ("mcp_gateway_request_duration_seconds", "mcp_gateway_upstream_duration_seconds"):
        buckets = sorted(
            (float(dict(labels)["le"]), value)
            for (name, labels), value in current.samples.items()
            if name == family + "_bucket" and dict(labels)["route"] == "json"
        )
        counts = [value for _, value in buckets]
        assert counts == sorted(counts)
        assert buckets[-1] == (float("inf"), current.value(family + "_count", route="json"))


async def test_token_grants_count_by_result_and_reason(mgw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    async def traffic() -> None:
        assertion = mgw.id_jag("json")
        assert (await mgw.token_request(assertion))[0] == 200
        status, body, _ = await mgw.token_request(assertion)  # the same jti again
        assert (status, body["error"]) == (400, "invalid_grant")
        status, body, _ = await mgw.token_request(mgw.id_jag("json"), client_secret="not-the-secret-0123456789")
        assert (status, body["error"]) == (401, "invalid_client")
        now = int(time.time())
        status, body, _ = await mgw.token_request(mgw.id_jag("json", iat=now - 900, exp=now - 600))
        assert (status, body["error"]) == (400, "invalid_grant")

    delta = await moved(mgw, http, traffic)
    assert delta(GRANTS, result="issued", reason="ok") == 1
    assert delta(GRANTS, result="invalid_grant", reason="replay") == 1
    assert delta(GRANTS, result="invalid_client", reason="client_auth_failed") == 1
    assert delta(GRANTS, result="invalid_grant", reason="expired") == 1


async def test_jwks_fetches_count_by_issuer_and_result_and_age_is_exposed(
    mgw: GatewayHarness, http: aiohttp.ClientSession, unreachable_idp: DevIdentityProvider
) -> None:
    current = await metrics(mgw, http)
    assert current.value(FETCHES, issuer=mgw.idp.issuer, result="ok") >= 1  # the startup prefetch
    assert current.value(FETCHES, issuer=unreachable_idp.issuer, result="error") >= 1
    assert current.has("mcp_gateway_jwks_age_seconds", issuer=mgw.idp.issuer)
    # Keys never fetched have no age (rather than a misleading zero); alert on absent() as well.
    assert not current.has("mcp_gateway_jwks_age_seconds", issuer=unreachable_idp.issuer)

    started = time.monotonic()

    async def unknown_kid() -> None:
        # An assertion whose kid the gateway does not hold makes it refetch the IdP's keys.
        claims = mgw.id_jag_claims("json")
        status, body, _ = await mgw.token_request(mgw.idp.sign(claims, headers={"kid": "rotated-away"}))
        assert (status, body["error"]) == (400, "invalid_grant")

    delta = await moved(mgw, http, unknown_kid)
    assert delta(FETCHES, issuer=mgw.idp.issuer, result="ok") == 1
    assert delta(GRANTS, result="invalid_grant", reason="signature") == 1
    age = (await metrics(mgw, http)).value("mcp_gateway_jwks_age_seconds", issuer=mgw.idp.issuer)
    assert 0 <= age <= time.monotonic() - started  # the refetch reset it


async def test_policy_decisions_count_allowed_and_denied_calls(
    mgw: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    async def traffic() -> None:
        client = await open_session(mgw, http, "policy")
        assert tool_text(await client.call(tool_call(2, "echo", {"text": "allowed"}))) == "allowed"
        denied = await client.call(tool_call(3, "delete_everything"))
        assert denied["error"]["code"] == -32003

    delta = await moved(mgw, http, traffic)
    assert delta(DECISIONS, route="policy", kind="tools", decision="allow") == 1
    assert delta(DECISIONS, route="policy", kind="tools", decision="deny") == 1
    # The denied call was answered by the gateway: one upstream round trip fewer than requests.
    assert delta(REQUESTS, route="policy", method="tools/call", status="200") == 2
    assert delta("mcp_gateway_upstream_duration_seconds_count", route="policy") == 3  # init, notif, echo


# -- known series exist from the start -------------------------------------------------------------


async def test_known_series_exist_at_zero_from_the_start_and_after_a_reload(
    idp: DevIdentityProvider, unreachable_idp: DevIdentityProvider, upstream_json: RunningUpstream, http
) -> None:
    """`increase(x[5m]) > 0` cannot see the first increment of a series that appears with value 1, so an
    alert on the first failure would never fire: every series whose labels are known is created at 0."""
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    async with running_gateway(idp, routes) as harness:
        current = await metrics(harness, http)
        for result, reason in GRANT_OUTCOMES:
            assert current.has(GRANTS, result=result, reason=reason), (result, reason)
            assert current.value(GRANTS, result=result, reason=reason) == 0
        for result in ("success", "failure"):
            assert current.has(RELOADS, result=result)
        assert current.has(FETCHES, issuer=idp.issuer, result="error")
        for kind in ("tools", "resources", "prompts"):
            for decision in ("allow", "deny"):
                assert current.has(DECISIONS, route="json", kind=kind, decision=decision)
        assert current.has("mcp_gateway_upstream_duration_seconds_count", route="json")
        assert current.has("mcp_gateway_open_streams", route="json")
        assert current.has("mcp_gateway_upstream_pool_in_use", route="json")

        extra = [*routes, {"name": "extra", "path": "/extra/mcp", "upstream": upstream_json.mcp_url}]
        assert await harness.gateway.reload(make_config(harness.url, [idp, unreachable_idp], extra))
        current = await metrics(harness, http)
        assert current.value(RELOADS, result="success") == 1
        assert current.has(RELOADS, result="failure")
        assert current.has(FETCHES, issuer=unreachable_idp.issuer, result="ok")
        assert current.has(DECISIONS, route="extra", kind="tools", decision="deny")
        assert current.has("mcp_gateway_in_flight_requests", route="extra")


# -- upstream failures, timeouts and pool usage --------------------------------------------------------


async def test_upstream_failures_and_timeouts_are_observed_in_buckets_up_to_the_timeout(
    idp: DevIdentityProvider, upstream_json: RunningUpstream, http
) -> None:
    routes = [
        {"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url},
        {"name": "down", "path": "/down/mcp", "upstream": f"http://127.0.0.1:{free_port()}/mcp"},
    ]
    timeout = 1  # the smallest upstream_timeout_seconds
    async with running_gateway(idp, routes, limits={"upstream_timeout_seconds": timeout}) as harness:
        client = await open_session(harness, http, "json")
        down = McpHttp(http, harness.route_url("down"), await harness.access_token("down"))
        gate = new_gate("metrics")

        async def failures() -> None:
            try:
                async with client.post(tool_call(2, "gated_stream", {"gate": gate})) as response:
                    assert response.status == 504
            finally:
                upstream_json.release(gate)
            async with down.post(request(1, "initialize")) as response:
                assert response.status == 502

        delta = await moved(harness, http, failures)
        assert delta(UPSTREAM + "_count", route="json") == 1
        assert delta(UPSTREAM + "_sum", route="json") >= timeout
        assert delta(UPSTREAM + "_count", route="down") == 1
        current = await metrics(harness, http)
        buckets = {
            float(dict(labels)["le"]): value
            for (name, labels), value in current.samples.items()
            if name == UPSTREAM + "_bucket" and dict(labels)["route"] == "json"
        }
        assert sorted(buckets)[-2:] == [timeout, float("inf")]
        assert buckets[float("inf")] - buckets[timeout] == 1  # the timed-out call: above the last finite bucket


async def test_pool_usage_per_route(
    mgw: GatewayHarness, http: aiohttp.ClientSession, upstream_json: RunningUpstream
) -> None:
    client = await open_session(mgw, http, "json")
    gate = new_gate("metrics")

    async def in_use() -> float:
        return (await metrics(mgw, http)).value("mcp_gateway_upstream_pool_in_use", route="json")

    idle = await in_use()
    call = asyncio.create_task(client.call(tool_call(2, "gated_stream", {"gate": gate})))
    try:
        async with asyncio.timeout(WAIT):
            while await in_use() != idle + 1:
                await asyncio.sleep(0.02)
        assert (await metrics(mgw, http)).value("mcp_gateway_upstream_pool_limit", route="json") > 0
    finally:
        upstream_json.release(gate)
    assert tool_text(await call) == f"gate {gate} released"
    async with asyncio.timeout(WAIT):
        while await in_use() != idle:
            await asyncio.sleep(0.02)


# -- gauges follow a live stream -------------------------------------------------------------------


async def test_in_flight_and_open_streams_rise_during_a_live_stream_and_fall_after(
    mgw: GatewayHarness, http: aiohttp.ClientSession, upstream_sse: RunningUpstream
) -> None:
    client = await open_session(mgw, http, "sse")
    idle = await metrics(mgw, http)
    gate = new_gate("metrics")
    async with client.post(tool_call(2, "gated_stream", {"gate": gate})) as response:
        async with asyncio.timeout(WAIT):
            assert (await next_message(response.content))["method"] == "notifications/message"
        live = await metrics(mgw, http)
        upstream_sse.release(gate)
        async with asyncio.timeout(WAIT):
            final = await response_message(response.content, 2)
    assert tool_text(final) == f"gate {gate} released"
    for gauge in ("mcp_gateway_in_flight_requests", "mcp_gateway_open_streams"):
        assert live.value(gauge, route="sse") == idle.value(gauge, route="sse") + 1, gauge
    # The gateway lowers the gauges just after the last byte left, so the client may be first: poll.
    async with asyncio.timeout(WAIT):
        while True:
            after = await metrics(mgw, http)
            if all(
                after.value(g, route="sse") == idle.value(g, route="sse")
                for g in ("mcp_gateway_in_flight_requests", "mcp_gateway_open_streams")
            ):
                break
            await asyncio.sleep(0.02)


async def test_a_client_that_goes_away_is_not_counted_as_a_gateway_error(
    mgw: GatewayHarness, http: aiohttp.ClientSession, upstream_sse: RunningUpstream
) -> None:
    client = await open_session(mgw, http, "sse")
    before = await metrics(mgw, http)
    gate = new_gate("metrics")
    try:
        response = await client.post(tool_call(2, "gated_stream", {"gate": gate}))
        async with asyncio.timeout(WAIT):
            assert (await next_message(response.content))["method"] == "notifications/message"
        response.close()  # the 2026-07-28 way to cancel: close the stream
        async with asyncio.timeout(WAIT):
            while (after := await metrics(mgw, http)).value("mcp_gateway_in_flight_requests", route="sse"):
                await asyncio.sleep(0.02)
    finally:
        upstream_sse.release(gate)
    counted = {
        dict(labels)["status"]: value - before.samples.get((name, labels), 0)
        for (name, labels), value in after.samples.items()
        if name == REQUESTS and dict(labels)["route"] == "sse" and dict(labels)["method"] == "tools/call"
    }
    assert {status: n for status, n in counted.items() if n} == {"499": 1}


# -- label values stay bounded ---------------------------------------------------------------------


def _random_name() -> str:
    """Ends in 12 unique hex digits; some start with text that would break a naive exposition."""
    return secrets.choice(["", 'x"}', "a{b=", "new\nline/"]) + secrets.token_hex(6)


async def test_client_input_never_becomes_a_label_value(mgw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    token = await mgw.access_token("json")
    policy_token = await mgw.access_token("policy")
    sent: list[str] = []
    limit = asyncio.Semaphore(64)

    async def send(method: str, url: str, json: Any = None, headers: dict[str, str] | None = None) -> None:
        async with limit, http.request(method, url, json=json, headers=headers) as response:
            assert response.status < 500, (method, url, response.status)
            await response.read()

    def requests_of_each_kind(count: int) -> list[Awaitable[None]]:
        auth = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
        policy_auth = {**auth, "Authorization": f"Bearer {policy_token}"}
        batch = []
        for _ in range(count):
            names = [_random_name() for _ in range(5)]
            sent.extend(names)
            batch += [
                send("GET", f"{mgw.url}/{names[0]}/{names[1]}"),  # no route
                send("POST", mgw.route_url("json"), json=request(1, names[2]), headers=auth),
                send("POST", mgw.route_url("json"), json={"jsonrpc": "2.0", "method": "notifications/" + names[3]}),
                send("POST", mgw.route_url("policy"), json=tool_call(1, names[4]), headers=policy_auth),
                send(secrets.choice(["PUT", "PATCH", "OPTIONS", "PROPFIND"]), mgw.route_url("json") + "/" + names[0]),
            ]
        return batch

    await asyncio.gather(*requests_of_each_kind(1))  # every kind of series exists once
    before = await metrics(mgw, http)
    await asyncio.gather(*requests_of_each_kind(FLOOD))
    after = await metrics(mgw, http)

    assert after.series() == before.series()
    assert (
        after.value(REQUESTS, route=NO_ROUTE, method="other", status="404")
        - before.value(REQUESTS, route=NO_ROUTE, method="other", status="404")
        == FLOOD
    )
    assert after.label_values(REQUESTS, "route") <= ROUTES | {NO_ROUTE}
    assert after.label_values(REQUESTS, "method") <= KNOWN_METHODS | set(HTTP_CLASSES.values()) | {"other"}
    assert all(re.fullmatch(r"[1-5][0-9][0-9]", status) for status in after.label_values(REQUESTS, "status"))
    leaked = [name for name in sent if name[-12:] in after.text]
    assert not leaked, leaked[:5]


# -- a separate metrics port -----------------------------------------------------------------------


async def test_metrics_listen_serves_metrics_only_on_its_own_port(
    idp: DevIdentityProvider, upstream_json: RunningUpstream, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    harness = await start_harness(idp, routes, metrics_listen=f"127.0.0.1:{port}")
    try:
        # On the public port /metrics is just a path no route serves.
        async with http.get(harness.url + "/metrics") as response:
            assert response.status == 404
        async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 404  # the metrics port serves nothing else
        current = await scrape(http, f"http://127.0.0.1:{port}/metrics")
        assert gateway_families(current) == FAMILIES
        assert current.value(REQUESTS, route=NO_ROUTE, method="other", status="404") == 1
    finally:
        await harness.runner.cleanup()
