"""IdP key handling (EMA §7.4.1): fetched once and cached, refetched on an unknown ``kid`` at a
bounded rate, kept while the IdP is unreachable, and discovered from IdP metadata."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.devidp import DevIdentityProvider
from tests.support.harness import GatewayHarness, running_gateway
from tests.support.loopback import serve_app

ISSUER = "https://idp.test"


@dataclass
class JwksServer:
    """A loopback JWKS endpoint whose keys and availability the test controls, and which counts fetches."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    fetches: int = 0
    failing: bool = False
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.failing:
            return web.Response(status=503)
        return web.json_response({"keys": self.keys})


@asynccontextmanager
async def gateway_for(
    jwks: JwksServer, signer: DevIdentityProvider, upstream_json, **kwargs: Any
) -> AsyncIterator[GatewayHarness]:
    """Serves ``jwks``, then a gateway trusting ISSUER with keys from it; both stop afterwards."""
    app = web.Application()
    app.router.add_get("/jwks", jwks.handle)
    async with serve_app(app) as base:
        jwks.url = base + "/jwks"
        async with running_gateway(
            signer,
            [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}],
            authorization={"identity_providers": [{"issuer": ISSUER, "jwks_uri": jwks.url}]},
            **kwargs,
        ) as h:
            yield h


async def test_keys_are_fetched_once_and_reused(upstream_json) -> None:
    signer = DevIdentityProvider(issuer=ISSUER)
    jwks = JwksServer(keys=signer.public_jwks()["keys"])
    async with gateway_for(jwks, signer, upstream_json) as h:
        for _ in range(5):
            status, body, _ = await h.token_request(h.id_jag())
            assert status == 200, body
        assert jwks.fetches == 1


async def test_unknown_kid_triggers_a_refetch_for_key_rotation(upstream_json) -> None:
    old, new = DevIdentityProvider(issuer=ISSUER), DevIdentityProvider(issuer=ISSUER)
    jwks = JwksServer(keys=old.public_jwks()["keys"])
    async with gateway_for(jwks, old, upstream_json, jwks_min_refresh_seconds=0) as h:
        assert (await h.token_request(h.id_jag()))[0] == 200
        jwks.keys = old.public_jwks()["keys"] + new.public_jwks()["keys"]  # the IdP rotates
        status, body, _ = await h.token_request(new.sign(h.id_jag_claims()))
        assert status == 200, body
        assert jwks.fetches == 2


async def test_unknown_kid_refetches_are_rate_limited(upstream_json) -> None:
    known, stranger = DevIdentityProvider(issuer=ISSUER), DevIdentityProvider(issuer=ISSUER)
    jwks = JwksServer(keys=known.public_jwks()["keys"])
    async with gateway_for(jwks, known, upstream_json, jwks_min_refresh_seconds=30) as h:
        for _ in range(10):
            status, body, _ = await h.token_request(stranger.sign(h.id_jag_claims()))
            assert (status, body["error"]) == (400, "invalid_grant")
        assert jwks.fetches == 1  # the startup fetch; forged kids cannot make us hammer the IdP


async def test_cached_keys_keep_working_while_the_idp_is_unreachable(upstream_json) -> None:
    signer = DevIdentityProvider(issuer=ISSUER)
    jwks = JwksServer(keys=signer.public_jwks()["keys"])
    async with gateway_for(jwks, signer, upstream_json, jwks_min_refresh_seconds=0) as h:
        jwks.failing = True
        status, body, _ = await h.token_request(h.id_jag())
        assert status == 200, body
        # An unknown kid now costs a (failed) refetch, and is refused as a bad assertion, not a 500.
        status, body, _ = await h.token_request(DevIdentityProvider(issuer=ISSUER).sign(h.id_jag_claims()))
        assert (status, body["error"]) == (400, "invalid_grant")
        assert jwks.fetches == 2


async def test_unreachable_idp_at_startup_answers_503_to_its_grants_and_the_pod_stays_ready(upstream_json) -> None:
    signer = DevIdentityProvider(issuer=ISSUER)
    jwks = JwksServer(keys=signer.public_jwks()["keys"], failing=True)
    async with gateway_for(jwks, signer, upstream_json, jwks_min_refresh_seconds=0) as h:
        async with aiohttp.ClientSession() as http:
            async with http.get(h.url + "/readyz") as response:
                assert response.status == 200
                assert (await response.json())["idp_keys_missing"] == [ISSUER]
        status, body, headers = await h.token_request(h.id_jag())
        assert (status, body["error"]) == (503, "temporarily_unavailable")
        assert headers["Retry-After"]
        jwks.failing = False  # the IdP recovers: the next grant fetches the keys
        status, body, _ = await h.token_request(h.id_jag())
        assert status == 200, body
        async with aiohttp.ClientSession() as http:
            async with http.get(h.url + "/readyz") as response:
                assert (response.status, await response.json()) == (200, {"status": "ready"})


async def test_jwks_uri_is_discovered_from_idp_metadata(gw: GatewayHarness) -> None:
    # The shared gateway trusts the loopback IdP without a jwks_uri: the keys came from discovery.
    assert gw.config.authorization.identity_providers[0].jwks_uri is None
    assert (await gw.token_request(gw.id_jag()))[0] == 200


async def test_rfc8414_s3_3_idp_metadata_issuer_must_match_exactly(
    idp: DevIdentityProvider, upstream_json, caplog
) -> None:
    """The IdP's metadata says ``http://127.0.0.1:P``; the config says it with a trailing slash."""
    caplog.set_level("WARNING", logger="gateway.oauth.jwks")
    configured = idp.issuer + "/"
    async with running_gateway(
        idp,
        [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}],
        authorization={"identity_providers": [{"issuer": configured}]},
    ) as h:
        async with aiohttp.ClientSession() as http:
            async with http.get(h.url + "/readyz") as response:
                # The pod stays ready (only this IdP's grants fail); /readyz names the IdP without keys.
                assert response.status == 200
                assert (await response.json())["idp_keys_missing"] == [configured]
    reported = [r for r in caplog.records if r.levelname == "ERROR" and "RFC 8414 §3.3" in r.getMessage()]
    assert reported, caplog.text
    assert f"names issuer {idp.issuer!r}, not the configured {configured!r}" in reported[0].getMessage()
