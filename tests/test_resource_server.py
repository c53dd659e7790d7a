"""The resource server: bearer tokens on every proxied request, RFC 6750 challenges, RFC 9728
metadata, audience binding per route, and the discovery documents clients depend on."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import aiohttp
import pytest
from jose import jws, jwt

from gateway.oauth.access_token import AccessTokenService
from gateway.oauth.idjag import Grant
from gateway.oauth.keys import SigningKey
from tests.support.harness import GatewayHarness

PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


def challenge_params(header: str) -> dict[str, str]:
    assert header.startswith("Bearer ")
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


async def post(url: str, token: str | None = None, **headers: str) -> tuple[int, dict, aiohttp.typedefs.LooseHeaders]:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=PING, headers=headers) as response:
            return response.status, await response.json(content_type=None), response.headers


async def test_no_token_gets_401_with_resource_metadata(gw: GatewayHarness) -> None:
    status, _, headers = await post(gw.route_url("json"))
    assert status == 401
    params = challenge_params(headers["WWW-Authenticate"])
    assert params["resource_metadata"] == gw.url + "/.well-known/oauth-protected-resource/json/mcp"
    assert params["scope"] == "mcp"
    assert "error" not in params  # RFC 6750 §3.1: no error code when no token was sent


async def test_invalid_token_gets_401_invalid_token(gw: GatewayHarness) -> None:
    status, body, headers = await post(gw.route_url("json"), "not.a.token")
    assert status == 401
    assert challenge_params(headers["WWW-Authenticate"])["error"] == "invalid_token"
    assert body["error"] == "invalid_token"


async def test_token_for_one_route_is_refused_on_every_other_route(gw: GatewayHarness) -> None:
    token = await gw.access_token("json")
    # Past the gateway: the upstream answers (400, no MCP session yet), not the gateway (401).
    assert (await post(gw.route_url("json"), token))[0] == 400
    for other in ("sse", "eng", "everything"):
        status, _, headers = await post(gw.route_url(other), token)
        assert status == 401, other
        assert "not issued for this resource" in challenge_params(headers["WWW-Authenticate"])["error_description"]


async def test_id_jag_is_never_accepted_as_a_bearer_token(gw: GatewayHarness) -> None:
    id_jag = gw.id_jag("json")
    status, _, headers = await post(gw.route_url("json"), id_jag)
    assert status == 401
    assert challenge_params(headers["WWW-Authenticate"])["error"] == "invalid_token"


async def test_token_signed_by_another_key_is_refused(gw: GatewayHarness) -> None:
    forger = AccessTokenService(SigningKey.generate(), gw.issuer, 300)
    real = await gw.access_token("json")
    claims = jwt.get_unverified_claims(real)
    route = gw.gateway.routes.by_name("json")
    assert route is not None
    forged = forger.issue(Grant(claims["sub"], claims["idp"], claims["client_id"], route, ("mcp",), (), "x"))
    status, _, _ = await post(gw.route_url("json"), forged.access_token)
    assert status == 401


def own_token(gw: GatewayHarness, typ: str = "at+jwt", **raw_claims: str) -> str:
    """A token signed with the gateway's real key whose claims are given as raw JSON text, so
    values json.dumps would never write (1e400) can be tried too."""
    now = int(time.time())
    claims = {
        "iss": json.dumps(gw.issuer),
        "sub": '"alice"',
        "aud": json.dumps(gw.resource("json")),
        "client_id": '"test-agent"',
        "scope": '"mcp"',
        "groups": "[]",
        "idp": json.dumps(gw.idp.issuer),
        "jti": json.dumps(uuid.uuid4().hex),
        "iat": str(now),
        "exp": str(now + 300),
        **raw_claims,
    }
    payload = "{" + ",".join(f'"{name}":{value}' for name, value in claims.items()) + "}"
    key = gw.gateway.signing_key
    return jws.sign(payload.encode(), key.private, headers={"kid": key.kid, "typ": typ}, algorithm=key.algorithm)


async def test_own_token_helper_makes_a_token_the_gateway_accepts(gw: GatewayHarness) -> None:
    assert (await post(gw.route_url("json"), own_token(gw)))[0] == 400  # past the gateway: no MCP session


@pytest.mark.parametrize("typ", ["AT+JWT", "application/at+jwt", "Application/AT+JWT"])
async def test_rfc7515_s4_1_9_access_token_typ_is_a_case_insensitive_media_type(gw: GatewayHarness, typ: str) -> None:
    assert (await post(gw.route_url("json"), own_token(gw, typ=typ)))[0] == 400  # past the gateway


@pytest.mark.parametrize("typ", ["JWT", "oauth-id-jag+jwt", "text/at+jwt", "application/at+jwt; x=1", "at+jwt+x"])
async def test_rfc9068_s4_access_token_of_another_type_is_refused(gw: GatewayHarness, typ: str) -> None:
    status, _, headers = await post(gw.route_url("json"), own_token(gw, typ=typ))
    assert status == 401
    assert challenge_params(headers["WWW-Authenticate"])["error"] == "invalid_token"


@pytest.mark.parametrize(
    "raw",
    [
        {"exp": "NaN"},
        {"exp": "Infinity"},
        {"exp": "1e400"},
        {"exp": '"9999999999"'},
        {"exp": "9999999999.5"},
        {"iat": "-Infinity"},
        {"iat": "NaN"},
        {"iat": '"now"'},
        {"groups": '["a", NaN]'},
    ],
)
async def test_own_token_with_non_finite_or_non_integer_numbers_is_refused(
    gw: GatewayHarness, raw: dict[str, str]
) -> None:
    status, body, headers = await post(gw.route_url("json"), own_token(gw, **raw))
    assert status == 401, body
    assert challenge_params(headers["WWW-Authenticate"])["error"] == "invalid_token"


@pytest.mark.parametrize("iat_offset, exp_offset", [(0, 301), (-3600, 60), (0, 10**9)])
async def test_own_token_living_longer_than_the_configured_ttl_is_refused(
    gw: GatewayHarness, iat_offset: int, exp_offset: int
) -> None:
    assert gw.config.authorization.access_token_ttl_seconds == 300
    now = int(time.time())
    token = own_token(gw, iat=str(now + iat_offset), exp=str(now + exp_offset))
    status, _, headers = await post(gw.route_url("json"), token)
    assert status == 401
    assert "lives longer" in challenge_params(headers["WWW-Authenticate"])["error_description"]


async def test_own_token_living_exactly_the_ttl_is_accepted(gw: GatewayHarness) -> None:
    now = int(time.time())
    assert (await post(gw.route_url("json"), own_token(gw, iat=str(now - 299), exp=str(now + 1))))[0] == 400


async def test_token_with_bytes_that_are_not_utf8_gets_401_not_500(gw: GatewayHarness) -> None:
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST {gw.route_url('json').removeprefix(gw.url)} HTTP/1.1\r\nHost: {host}\r\n".encode()
            + b"Authorization: Bearer ab\xff\xfe.cd.ef\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        status_line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
    assert status_line.split()[1] == b"401"


async def test_expired_token_is_refused_even_when_cached(gw: GatewayHarness) -> None:
    tokens = gw.gateway.tokens
    route = gw.gateway.routes.by_name("json")
    assert route is not None
    issued = tokens.issue(Grant("alice", gw.idp.issuer, "test-agent", route, ("mcp",), (), "y"))
    assert (await post(gw.route_url("json"), issued.access_token))[0] == 400  # passed the gateway; now cached
    later = AccessTokenService(gw.gateway.signing_key, gw.issuer, 300, clock=lambda: time.time() + 301)
    gw.gateway.guard._tokens = later
    try:
        status, _, headers = await post(gw.route_url("json"), issued.access_token)
    finally:
        gw.gateway.guard._tokens = tokens
    assert status == 401
    assert "expired" in challenge_params(headers["WWW-Authenticate"])["error_description"]


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Bearer", "bearer   "])
async def test_non_bearer_authorization_is_a_plain_challenge(gw: GatewayHarness, value: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.route_url("json"), json=PING, headers={"Authorization": value}) as response:
            assert response.status == 401
            assert "resource_metadata=" in response.headers["WWW-Authenticate"]


async def test_token_in_query_string_is_not_accepted(gw: GatewayHarness) -> None:
    token = await gw.access_token("json")
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.route_url("json"), params={"access_token": token}, json=PING) as response:
            assert response.status == 401


async def test_protected_resource_metadata_per_route(gw: GatewayHarness) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/.well-known/oauth-protected-resource/eng/mcp") as response:
            assert response.status == 200
            document = await response.json()
        assert document == {
            "resource": gw.resource("eng"),
            "authorization_servers": [gw.issuer],
            "scopes_supported": ["mcp", "mcp:admin"],
            "bearer_methods_supported": ["header"],
            "resource_name": "eng",
            "dpop_signing_alg_values_supported": ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512"],
        }
        async with http.get(gw.url + "/.well-known/oauth-protected-resource/legacy/sse") as response:
            assert (await response.json())["resource"] == gw.resource("legacy")
        async with http.get(gw.url + "/.well-known/oauth-protected-resource/nope") as response:
            assert response.status == 404
        # Several routes: no root document, since it could only describe one of them.
        async with http.get(gw.url + "/.well-known/oauth-protected-resource") as response:
            assert response.status == 404


async def test_rfc8414_s5_openid_configuration_is_not_served(gw: GatewayHarness) -> None:
    """The gateway is no OpenID provider; both SDK clients find the RFC 8414 document first."""
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/.well-known/openid-configuration") as response:
            assert response.status == 404
        async with http.options(gw.url + "/.well-known/openid-configuration") as response:
            assert response.status != 204


async def test_authorization_server_metadata(gw: GatewayHarness) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/.well-known/oauth-authorization-server",):
            async with http.get(gw.url + path) as response:
                assert response.status == 200, path
                document = await response.json()
            assert document["issuer"] == gw.issuer
            assert document["token_endpoint"] == gw.url + "/oauth2/token"
            assert "urn:ietf:params:oauth:grant-type:jwt-bearer" in document["grant_types_supported"]
            assert document["authorization_grant_profiles_supported"] == ["urn:ietf:params:oauth:grant-profile:id-jag"]
            assert set(document["token_endpoint_auth_methods_supported"]) == {
                "private_key_jwt",
                "client_secret_basic",
                "client_secret_post",
            }
            assert document["response_types_supported"] == ["code"]
            assert document["code_challenge_methods_supported"] == ["S256"]
            assert document["authorization_endpoint"] == gw.url + "/oauth2/authorize"
        async with http.get(document["authorization_endpoint"]) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "unsupported_response_type"


async def test_jwks_publishes_the_key_that_verifies_access_tokens(gw: GatewayHarness) -> None:
    token = await gw.access_token("json")
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/oauth2/jwks") as response:
            jwks = await response.json()
    claims = jwt.decode(token, jwks, algorithms=["ES256"], audience=gw.resource("json"), issuer=gw.issuer)
    assert claims["idp_sub"] == "alice"
    assert all("d" not in key for key in jwks["keys"])  # never the private part


async def test_health_and_readiness(gw: GatewayHarness) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/healthz") as response:
            assert response.status == 200
        async with http.get(gw.url + "/readyz") as response:
            assert response.status == 200
            assert (await response.json())["status"] == "ready"
