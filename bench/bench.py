"""Gateway micro- and end-to-end benchmarks (not a test: numbers, not assertions).

    python bench/bench.py [--requests 2000]

Measures, on loopback in one process (client, gateway and upstream share the machine, so absolute
figures are pessimistic; the deltas are what matter):
- access-token validation: uncached (signature check) vs cached (hash lookup) per call;
- planning a tools/call (parse + decide), and what one CEL ``when`` condition adds to it;
- ID-JAG validation + token issue at the token endpoint (HTTP round trip);
- tools/call latency direct to the upstream vs through the gateway (p50/p90/p99), i.e. proxy overhead;
- first SSE byte latency through the gateway for a streaming response.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable

import aiohttp

from gateway.conditions import Condition, compile_condition
from gateway.config import RouteConfig, TokenRateLimitConfig
from gateway.demo import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, ROUTE_PATH, McpSession, start_demo_servers
from gateway.enforce import plan_request
from gateway.engine import DecisionEngine
from gateway.oauth.access_token import AccessTokenService, Principal
from gateway.oauth.idjag import Grant
from gateway.policy import RoutePolicy, Rule, RuleSet
from gateway.proxy.request_body import read_rpc_body


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(name: str, samples: list[float]) -> None:
    ms = [s * 1000 for s in samples]
    print(
        f"{name:<44} n={len(ms):<6} p50={pct(ms, 0.5):7.3f} ms  p90={pct(ms, 0.9):7.3f} ms  "
        f"p99={pct(ms, 0.99):7.3f} ms  mean={statistics.fmean(ms):7.3f} ms"
    )


async def timed(n: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


async def bench_policy(n: int) -> dict[str, float]:
    """Policy evaluation on a tools/call body (strict parse + decide + canonical re-serialisation),
    without network; then the same plan where the rule that allows the call has one CEL ``when``
    condition, run alternately with the plain one. The difference of the p50s is what one condition
    adds to a tools/call: building the call's activation and evaluating, and losing the memoised
    by-name decision that unconditional rules get (issue goal: < 50 µs)."""
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {"name": "get_weather", "arguments": {"city": "x"}},
        }
    ).encode()
    headers: dict[str, str] = {}
    principal = Principal(
        "alice", "bench", "https://idp", "https://gw/b", ("mcp", "mcp:tools:call"), ("support",), 0, "t"
    )
    when = compile_condition(BENCH_CONDITION, kind="tools")
    plain, conditional = (
        RouteConfig("b", "/b", "http://127.0.0.1:9/mcp", "https://gw/b", policy=_bench_policy(condition))
        for condition in (None, when)
    )
    engine = DecisionEngine()
    planned, conditioned, parsed = [], [], []
    for _ in range(n):
        for route, samples in ((plain, planned), (conditional, conditioned)):
            started = time.perf_counter_ns()
            plan = await plan_request(read_rpc_body(body), headers, engine, principal, route)
            samples.append(time.perf_counter_ns() - started)
            assert plan.forward_body is not None
        started = time.perf_counter_ns()
        read_rpc_body(body)
        parsed.append(time.perf_counter_ns() - started)
    print(f"{'tools/call policy plan (parse+decide), p50':<44} {pct(planned, 0.5) / 1000:9.1f} us/op")
    print(f"{'  of which JSON parse, p50':<44} {pct(parsed, 0.5) / 1000:9.1f} us/op")
    print(f"{'  same, allowing rule with a when, p50':<44} {pct(conditioned, 0.5) / 1000:9.1f} us/op")
    added = (pct(conditioned, 0.5) - pct(planned, 0.5)) / 1000
    print(f"{'  added by one CEL condition, p50':<44} {added:9.1f} us/op  ({BENCH_CONDITION})")
    return {"plan_us": pct(planned, 0.5) / 1000, "parse_us": pct(parsed, 0.5) / 1000, "condition_us": added}


BENCH_CONDITION = "size(args.city) <= 100 && 'support' in user.groups"


def _bench_policy(when: Condition | None) -> RoutePolicy:
    return RoutePolicy(
        RuleSet(
            (
                Rule.make(["support"], ["echo", "get_*"], when=when),
                Rule.make(["engineering"], ["*"], ["delete_*"]),
            )
        ),
        RuleSet(None),
        RuleSet(None),
        (("tools/call", ("mcp:tools:call",)),),
    )


def token_validation_us(tokens: AccessTokenService, route: RouteConfig, grant: Grant, n: int) -> tuple[float, float]:
    """Microseconds per ``verify`` of ``n`` fresh access tokens: first sight (signature check), then
    again (warm cache: a hash lookup)."""
    issued = [tokens.issue(grant).access_token for _ in range(n)]
    started = time.perf_counter()
    for token in issued:
        tokens.verify(token, route.resource)
    uncached = (time.perf_counter() - started) / n
    started = time.perf_counter()
    for token in issued:
        tokens.verify(token, route.resource)
    cached = (time.perf_counter() - started) / n
    return uncached * 1e6, cached * 1e6


def bench_token_validation(servers, n: int) -> None:
    gateway_tokens: AccessTokenService = servers.gateway.tokens
    route = servers.config.routes[0]
    grant = Grant("alice", servers.idp_issuer, DEMO_CLIENT_ID, route, ("mcp",), ("engineering",), "bench")
    uncached, cached = token_validation_us(gateway_tokens, route, grant, n)
    print(f"{'access token verify, uncached (ES256)':<44} {uncached:9.1f} us/op")
    print(f"{'access token verify, cached':<44} {cached:9.1f} us/op")


async def main(requests: int) -> None:
    audit_dir = tempfile.mkdtemp(prefix="mcp-gateway-bench-")
    servers = await start_demo_servers("127.0.0.1", 0, audit_sink=f"{audit_dir}/audit.jsonl")
    try:
        bench_token_validation(servers, min(requests, 2000))
        await bench_policy(20000)
        async with aiohttp.ClientSession() as http:
            idp_token = servers.idp_issuer + "/token"
            form = {
                "grant_type": "password",
                "username": "alice",
                "password": "alice-password",
                "client_id": DEMO_CLIENT_ID,
                "client_secret": DEMO_CLIENT_SECRET,
            }
            async with http.post(idp_token, data=form) as r:
                id_token = (await r.json())["id_token"]
            idp = servers.idp

            async def grant_once() -> str:
                assertion = idp.issue_id_jag(
                    username="alice",
                    audience=servers.config.authorization.issuer,
                    client_id=DEMO_CLIENT_ID,
                    resource=servers.mcp_url,
                )
                body = {
                    "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                    "assertion": assertion,
                    "client_id": DEMO_CLIENT_ID,
                    "client_secret": DEMO_CLIENT_SECRET,
                }
                async with http.post(servers.gateway_url + "/oauth2/token", data=body) as r:
                    assert r.status == 200, await r.text()
                    return (await r.json())["access_token"]

            del id_token
            # What a grant costs, not the per-client rate limit (which would answer 429 here).
            unlimited = TokenRateLimitConfig(requests_per_minute=0)
            authorization = dataclasses.replace(servers.config.authorization, token_rate_limit=unlimited)
            assert await servers.gateway.reload(dataclasses.replace(servers.config, authorization=authorization))
            report("token endpoint: jwt-bearer grant (HTTP)", await timed(min(requests, 500), grant_once))
            token = await grant_once()

            direct = McpSession(http, servers.upstream_url, "unused")
            await direct.request(
                "initialize",
                {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}},
            )
            proxied = McpSession(http, servers.mcp_url, token)
            await proxied.request(
                "initialize",
                {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}},
            )
            call = {"name": "echo", "arguments": {"text": "x" * 64}}
            for _ in range(50):  # warm up connection pools
                await direct.request("tools/call", call)
                await proxied.request("tools/call", call)
            direct_samples = await timed(requests, lambda: direct.request("tools/call", call))
            proxied_samples = await timed(requests, lambda: proxied.request("tools/call", call))
            report("tools/call direct to upstream", direct_samples)
            report("tools/call through gateway", proxied_samples)
            overhead = pct(proxied_samples, 0.5) - pct(direct_samples, 0.5)
            print(f"{'gateway overhead at p50':<44} {overhead * 1000:9.3f} ms")
    finally:
        await servers.close()
    print(f"(route {ROUTE_PATH}; one process on loopback; {requests} requests per series)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    asyncio.run(main(parser.parse_args().requests))
