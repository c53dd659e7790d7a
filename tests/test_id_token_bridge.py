"""The ID-token bridge: RFC 8693 token exchange of OpenID Connect ID tokens for identity providers marked
``accept_id_tokens``. Three loopback IdPs sign ID tokens shaped like Entra ID's (``tid``, ``groups``, no
``jti``), Google's (``hd``, no groups) and Keycloak's (``realm_access.roles``); the access tokens they get
are then used on a real upstream."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, describe, load_config, parse_config
from gateway.devidp import DevIdentityProvider
from gateway.signals.events import principal_keys
from tests.support.harness import CLIENT_ID, CLIENT_SECRET, GatewayHarness, start_harness
from tests.support.mcp_http import McpHttp, tool_call, tool_text
from tests.support.upstreams import RunningUpstream

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
APP_ID = "11111111-2222-3333-4444-555555555555"  # the AI client's app id at the IdP
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"


@dataclass
class Bridge:
    gateway: GatewayHarness
    entra: DevIdentityProvider
    google: DevIdentityProvider
    keycloak: DevIdentityProvider

    def id_token(self, idp: DevIdentityProvider, **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": idp.issuer, "sub": "user-1", "aud": APP_ID, "iat": now, "exp": now + 3600}
        if idp is self.entra:
            # uti: Entra's unique token identifier (not a jti: the bridge hashes the token instead).
            claims |= {"tid": TENANT, "oid": "oid-1", "groups": ["engineering"], "uti": uuid.uuid4().hex}
        elif idp is self.google:
            claims |= {"hd": "example.com", "email": "alice@example.com", "azp": APP_ID, "nonce": uuid.uuid4().hex}
        else:
            claims |= {"jti": uuid.uuid4().hex, "realm_access": {"roles": ["engineering", "offline_access"]}}
        for key, value in overrides.items():
            if value is None:
                claims.pop(key, None)
            else:
                claims[key] = value
        return idp.sign(claims, typ="JWT")

    async def exchange(self, subject: str, route: str = "eng", **extra: str) -> tuple[int, dict[str, Any]]:
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject,
            "subject_token_type": ID_TOKEN,
            "resource": self.gateway.resource(route),
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            **extra,
        }
        async with aiohttp.ClientSession() as http, http.post(self.gateway.token_endpoint, data=form) as response:
            return response.status, await response.json()


@pytest.fixture(scope="module")
async def bridge(upstream_json: RunningUpstream) -> AsyncIterator[Bridge]:
    idps = [DevIdentityProvider(algorithm=alg) for alg in ("RS256", "RS256", "ES256")]
    for idp in idps:
        await idp.start()
    entra, google, keycloak = idps
    providers = [
        {"issuer": entra.issuer, "accept_id_tokens": True, "id_token_audiences": [APP_ID], "tenant": TENANT},
        {"issuer": google.issuer, "accept_id_tokens": True, "id_token_audiences": [APP_ID],
         "hosted_domain": "example.com"},
        {"issuer": keycloak.issuer, "accept_id_tokens": True, "id_token_audiences": [APP_ID],
         "claims": {"groups": "realm_access.roles"}},
    ]  # fmt: skip
    routes = [
        {"name": "eng", "path": "/eng/mcp", "upstream": upstream_json.mcp_url, "allow_groups": ["engineering"]},
        {"name": "open", "path": "/open/mcp", "upstream": upstream_json.mcp_url},
    ]
    harness = await start_harness(
        entra, routes, extra_idps=[google, keycloak], authorization={"identity_providers": providers}
    )
    try:
        yield Bridge(harness, entra, google, keycloak)
    finally:
        await harness.runner.cleanup()
        for idp in idps:
            await idp.stop()


async def use(bridge: Bridge, token: str, route: str) -> str:
    async with aiohttp.ClientSession() as http:
        client = McpHttp(http, bridge.gateway.route_url(route), token)
        await client.initialize()
        return tool_text(await client.call(tool_call(2, "echo", {"text": "bridged"})))


@pytest.mark.parametrize("shape", ["entra", "google", "keycloak"])
async def test_id_tokens_of_each_shape_get_an_access_token_that_works(bridge: Bridge, shape: str) -> None:
    idp = getattr(bridge, shape)
    route = "open" if shape == "google" else "eng"  # Google ID tokens carry no groups
    subject = bridge.id_token(idp)
    status, body = await bridge.exchange(subject, route)
    assert status == 200, body
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert (body["token_type"], body["scope"], body["resource"]) == ("Bearer", "mcp", bridge.gateway.resource(route))
    assert 0 < body["expires_in"] <= bridge.gateway.config.authorization.access_token_ttl_seconds
    principal = bridge.gateway.gateway.tokens.verify(body["access_token"], bridge.gateway.resource(route))
    assert (principal.subject, principal.idp_issuer, principal.client_id) == ("user-1", idp.issuer, CLIENT_ID)
    assert principal.tenant == (TENANT if shape == "entra" else None)
    if shape != "google":
        assert "engineering" in principal.groups
    assert await use(bridge, body["access_token"], route) == "bridged"


async def test_the_access_token_never_outlives_the_id_token(bridge: Bridge) -> None:
    now = int(time.time())
    status, body = await bridge.exchange(bridge.id_token(bridge.keycloak, iat=now - 3500, exp=now + 20))
    assert status == 200, body
    assert body["expires_in"] <= 20


@pytest.mark.parametrize(
    ("shape", "overrides", "extra", "description"),
    [
        ("entra", {"aud": "another-app"}, {}, "ID token aud is not one of id_token_audiences"),
        ("entra", {"tid": "another-tenant"}, {}, "ID token tenant (tid) is not the configured tenant"),
        ("entra", {"tid": None}, {}, "ID token tenant (tid) is not the configured tenant"),
        ("entra", {"groups": None, "_claim_names": {"groups": "src1"}, "_claim_sources": {"src1": {}}}, {},
         "group overage"),
        ("entra", {"groups": None, "hasgroups": True}, {}, "group overage"),
        ("google", {"hd": None}, {}, "ID token hd is not example.com"),
        ("google", {"hd": "gmail.com"}, {}, "ID token hd is not example.com"),
        ("keycloak", {"realm_access": {"roles": ["offline_access"]}}, {}, "not in a group allowed"),
        ("keycloak", {"exp": int(time.time()) - 5}, {}, "expired"),
        ("keycloak", {"iat": int(time.time()) + 600}, {}, "issued in the future"),
        ("keycloak", {}, {"subject_token_type": "urn:ietf:params:oauth:token-type:jwt"}, "subject_token_type must be"),
    ],
)  # fmt: skip
async def test_refusals_name_the_problem(
    bridge: Bridge, shape: str, overrides: dict[str, Any], extra: dict[str, str], description: str
) -> None:
    status, body = await bridge.exchange(bridge.id_token(getattr(bridge, shape), **overrides), **extra)
    assert status == 400, body
    assert body["error"] in ("invalid_grant", "invalid_request")
    assert description in body["error_description"], body


async def test_an_id_token_is_single_use_by_jti_or_by_hash(bridge: Bridge) -> None:
    for idp in (bridge.entra, bridge.keycloak):  # Entra's have no jti, Keycloak's do
        subject = bridge.id_token(idp)
        assert (await bridge.exchange(subject))[0] == 200
        status, body = await bridge.exchange(subject, "open")
        assert (status, body["error"], body["error_description"]) == (
            400,
            "invalid_grant",
            "assertion has already been used",
        )


async def test_an_id_jag_or_an_idp_without_the_flag_is_not_an_id_token(
    bridge: Bridge, idp: DevIdentityProvider
) -> None:
    status, body = await bridge.exchange(bridge.keycloak.sign({"iss": bridge.keycloak.issuer}, typ="oauth-id-jag+jwt"))
    assert (status, body["error_description"]) == (400, "the subject token is not an ID token")
    # A trusted IdP that is not marked accept_id_tokens: its ID tokens are refused.
    providers = [{"issuer": idp.issuer}]
    route = {"name": "r", "path": "/r/mcp", "upstream": "http://127.0.0.1:9/mcp"}
    other = await start_harness(idp, [route], authorization={"identity_providers": providers})
    try:
        async with aiohttp.ClientSession() as http:
            now = int(time.time())
            claims = {"iss": idp.issuer, "sub": "u", "aud": APP_ID, "iat": now, "exp": now + 60}
            form = {"grant_type": TOKEN_EXCHANGE, "subject_token": idp.sign(claims, typ="JWT"),
                    "subject_token_type": ID_TOKEN, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}  # fmt: skip
            async with http.post(other.token_endpoint, data=form) as response:
                assert response.status == 400
                assert (await response.json())["error"] == "unsupported_grant_type"
            async with http.get(other.url + "/.well-known/oauth-authorization-server") as response:
                assert TOKEN_EXCHANGE not in (await response.json())["grant_types_supported"]
        async with aiohttp.ClientSession() as http:
            async with http.get(bridge.gateway.url + "/.well-known/oauth-authorization-server") as response:
                assert TOKEN_EXCHANGE in (await response.json())["grant_types_supported"]
    finally:
        await other.runner.cleanup()


BASE = {
    "public_url": "https://mcp.example.com",
    "authorization": {"clients": [{"client_id": "agent", "client_secret": "agent-secret-0123456789"}]},
    "routes": [{"name": "r", "path": "/r/mcp", "upstream": "http://upstream:3000/mcp"}],
}


@pytest.mark.parametrize(
    ("idp", "problem"),
    [
        ({"accept_id_tokens": True}, "identity_providers[0].id_token_audiences: is required with accept_id_tokens"),
        ({"id_token_audiences": ["a"]}, "identity_providers[0].id_token_audiences: applies only with accept_id_tokens"),
        ({"hosted_domain": "example.com"}, "identity_providers[0].hosted_domain: applies only with accept_id_tokens"),
        ({"accept_id_tokens": "yes"}, "identity_providers[0].accept_id_tokens: must be true or false"),
        ({"claims": {"groups": "a..b"}}, "identity_providers[0].claims.groups: must be a claim name or a dot"),
        ({"claims": {"groups": "roles"}, "groups_claim": "roles"}, "set either groups_claim or claims.groups"),
        ({"claims": {"roles": "x", "groups": "g"}}, "identity_providers[0].claims.roles: unknown key"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(idp: dict[str, Any], problem: str) -> None:
    data = {
        **BASE,
        "authorization": {
            **BASE["authorization"],
            "identity_providers": [{"issuer": "https://idp.example.com", **idp}],
        },
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source="gw.yaml")
    assert str(caught.value).startswith("gw.yaml: authorization.") and problem in str(caught.value), str(caught.value)


def test_the_config_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_CLIENT_SECRET", "example-secret-0123456789")
    config = load_config(Path(__file__).resolve().parents[1] / "config" / "id-token-bridge.yaml")
    entra, google, keycloak = config.authorization.identity_providers
    assert all(idp.accept_id_tokens for idp in (entra, google, keycloak))
    assert (entra.tenant, google.hosted_domain, keycloak.groups_location) == (
        "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "example.com",
        ("realm_access", "roles"),
    )
    lines: list[str] = []
    describe(config, emit=lines.append)
    assert any("groups=realm_access.roles" in line and "id_tokens(aud=ai-client)" in line for line in lines), lines


async def test_id_tokens_live_at_most_an_hour_and_a_shared_signals_cut_off_refuses_older_ones(bridge: Bridge) -> None:
    now = int(time.time())
    status, body = await bridge.exchange(bridge.id_token(bridge.keycloak, iat=now - 10, exp=now + 3600))
    assert (status, body["error_description"]) == (400, "assertion lifetime exceeds the allowed maximum")
    # The IdP cut the user off (as a pushed SET would): ID tokens issued up to then are refused.
    revocations = bridge.gateway.gateway.services.revocations
    assert revocations.apply(principal_keys(bridge.keycloak.issuer, "user-2", None)[0], now)
    before = bridge.id_token(bridge.keycloak, sub="user-2", iat=now - 5, exp=now + 600)
    status, body = await bridge.exchange(before, "open")
    assert (status, body["error"], body["error_description"]) == (
        400,
        "invalid_grant",
        "the identity provider revoked this user's sessions after the assertion was issued",
    )
    after = bridge.id_token(bridge.keycloak, sub="user-2", iat=now + 1, exp=now + 600)
    status, body = await bridge.exchange(after, "open")
    assert status == 200, body
