"""The token endpoint's per-client rate limit (EMA §7.5.1 SHOULD), through the real endpoint.

A small limit (burst 2, one request a minute) makes the bucket run dry within a test; every request
counts whatever its outcome, so assertions that fail validation are enough to spend it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, GatewayConfig, TokenRateLimitConfig, parse_config
from gateway.devidp import DevIdentityProvider
from gateway.oauth.rate_limit import ClientRateLimiter
from tests.support.harness import (
    CLIENT_ID,
    OTHER_CLIENT_ID,
    OTHER_CLIENT_SECRET,
    GatewayHarness,
    running_gateway,
)
from tests.support.scrape import scrape
from tests.support.upstreams import RunningUpstream

GRANTS = "mcp_gateway_token_grants_total"


def routes(upstream: RunningUpstream) -> list[dict[str, Any]]:
    return [{"name": "json", "path": "/json/mcp", "upstream": upstream.mcp_url}]


def limit(requests_per_minute: int, burst: int) -> dict[str, Any]:
    return {"token_rate_limit": {"requests_per_minute": requests_per_minute, "burst": burst}}


async def statuses(h: GatewayHarness, n: int, **kwargs: Any) -> list[int]:
    return [(await h.token_request(h.id_jag(), **kwargs))[0] for _ in range(n)]


async def test_a_client_over_its_limit_gets_429_with_retry_after(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    sink = tmp_path / "audit.jsonl"
    options = {"authorization": limit(1, 2), "audit": {"sink": str(sink)}}
    async with running_gateway(idp, routes(upstream_json), **options) as h:
        assert await statuses(h, 2) == [200, 200]
        status, body, headers = await h.token_request(h.id_jag())
        assert status == 429
        assert body["error"] == "temporarily_unavailable"
        assert "too many token requests" in body["error_description"]
        assert headers["Cache-Control"] == "no-store"
        assert 1 <= int(headers["Retry-After"]) <= 60  # one request a minute: at most a minute away
        # Counted and audited like every other refusal.
        async with aiohttp.ClientSession() as http:
            metrics = await scrape(http, h.url + "/metrics")
        assert metrics.value(GRANTS, result="temporarily_unavailable", reason="rate_limited") == 1
    events = [json.loads(line) for line in sink.read_text(encoding="utf-8").splitlines()]
    denied = [e for e in events if e["event"] == "token.denied"]
    assert [(e["client_id"], e["reason"], e["status"]) for e in denied] == [
        (CLIENT_ID, "temporarily_unavailable:rate_limited", 429)
    ]


async def test_each_client_has_its_own_bucket(idp: DevIdentityProvider, upstream_json: RunningUpstream) -> None:
    async with running_gateway(idp, routes(upstream_json), authorization=limit(1, 2)) as h:
        assert await statuses(h, 3) == [200, 200, 429]
        other = {"client_id": OTHER_CLIENT_ID, "client_secret": OTHER_CLIENT_SECRET}
        # The ID-JAG names CLIENT_ID, so the other client gets invalid_grant: it passed the limiter.
        assert await statuses(h, 2, **other) == [400, 400]
        assert await statuses(h, 1, **other) == [429]


async def test_failed_client_authentication_never_spends_the_named_clients_bucket(
    idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    """Naming a real client with a wrong secret (or an unknown client) draws from one shared bucket:
    an attacker can exhaust only that, not the real client's allowance, and cannot add buckets."""
    async with running_gateway(idp, routes(upstream_json), authorization=limit(1, 2)) as h:
        wrong = await statuses(h, 3, client_secret="not-the-secret-0123456789")
        unknown = await statuses(h, 2, client_id="nobody", client_secret="whatever-0123456789")
        assert wrong == [401, 401, 429]
        assert unknown == [429, 429]
        assert await statuses(h, 2) == [200, 200]


async def test_requests_per_minute_zero_disables_the_limit(
    idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    async with running_gateway(idp, routes(upstream_json), authorization=limit(0, 1)) as h:
        assert set(await statuses(h, 5)) == {200}
        assert h.gateway.runtime.token_endpoint._rate_limiter is None


def parse(**authorization: Any) -> GatewayConfig:
    return parse_config(
        {
            "public_url": "https://mcp.example.com",
            "authorization": {
                "clients": [{"client_id": CLIENT_ID, "client_secret": "a-secret-of-16-chars"}],
                "identity_providers": [{"issuer": "https://idp.example.com"}],
                **authorization,
            },
            "routes": [{"name": "a", "path": "/a", "upstream": "http://127.0.0.1:9"}],
        },
        source="gateway.yaml",
    )


def test_token_rate_limit_defaults_to_60_a_minute_with_a_burst_of_20() -> None:
    for config in (parse(), parse(token_rate_limit={})):
        assert config.authorization.token_rate_limit == TokenRateLimitConfig(requests_per_minute=60, burst=20)


@pytest.mark.parametrize(
    "value, problem",
    [
        ({"requests_per_minute": -1}, "token_rate_limit.requests_per_minute: must be between 0 and 1e+06, got -1"),
        ({"burst": 0}, "token_rate_limit.burst: must be between 1 and 1e+06, got 0"),
        ({"requests_per_minute": 1.5}, "token_rate_limit.requests_per_minute: must be an integer, got float"),
        ({"burst": True}, "token_rate_limit.burst: must be an integer, got bool"),
        ({"rpm": 5}, "token_rate_limit.rpm: unknown key"),
        ("fast", "token_rate_limit: must be a mapping, got str"),
    ],
)
def test_invalid_token_rate_limit_names_the_key(value: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(token_rate_limit=value)
    assert str(caught.value).startswith("gateway.yaml: authorization.")
    assert problem in str(caught.value)


def test_bucket_refills_at_the_configured_rate_and_says_when() -> None:
    now = [100.0]
    config = TokenRateLimitConfig(requests_per_minute=30, burst=2)
    limiter = ClientRateLimiter(config, [CLIENT_ID], clock=lambda: now[0])
    assert [limiter.acquire(CLIENT_ID) for _ in range(3)] == [0, 0, 2]  # one request every 2 s
    now[0] += 1.5
    assert limiter.acquire(CLIENT_ID) == 1
    now[0] += 0.5
    assert limiter.acquire(CLIENT_ID) == 0
    now[0] += 3600
    assert [limiter.acquire(CLIENT_ID) for _ in range(3)] == [0, 0, 2]  # never more than the burst
    # A client id that is not configured cannot get a bucket of its own: it shares the fallback one.
    assert [limiter.acquire("not-configured") for _ in range(3)] == [0, 0, 2]
    assert limiter.acquire(None) == 2
