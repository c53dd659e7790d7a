"""Tests for the development IdP (gateway/devidp.py).

The IdP runs as a real loopback HTTP server (port 0) and is driven with a real aiohttp client, so these
tests cover the wire format the gateway and the MCP SDK clients will see: discovery documents, JWKS, and
the RFC 6749 / RFC 8693 token endpoint including its OAuth error responses (RFC 6749 §5.2).
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from jose import jwt

from gateway.devidp import (
    DEFAULT_CLIENTS,
    DEFAULT_USERS,
    GRANT_TYPE_TOKEN_EXCHANGE,
    TOKEN_TYPE_ID_JAG,
    TOKEN_TYPE_ID_TOKEN,
    DevClient,
    DevIdentityProvider,
    DevUser,
)

RAS_ISSUER = "https://gateway.example"
MCP_RESOURCE = "https://gateway.example/mcp"
AGENT_ID, AGENT_SECRET = "demo-agent", "demo-agent-secret"
# Its id at the Resource AS differs from its id at the IdP (draft "Cross-Domain Client ID Handling").
MAPPED = DevClient("wiki-app", "wiki-app-secret", resource_client_id="wiki-at-gateway")
CLIENTS = (*DEFAULT_CLIENTS, MAPPED)


@pytest_asyncio.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def _started(**kwargs: Any) -> DevIdentityProvider:
    idp = DevIdentityProvider(clients=CLIENTS, **kwargs)
    await idp.start()
    return idp


@pytest_asyncio.fixture(scope="module")
async def es_idp() -> AsyncIterator[DevIdentityProvider]:
    idp = await _started(algorithm="ES256")
    yield idp
    await idp.stop()


@pytest_asyncio.fixture(scope="module")
async def rs_idp() -> AsyncIterator[DevIdentityProvider]:
    idp = await _started(algorithm="RS256")
    yield idp
    await idp.stop()


@pytest_asyncio.fixture(scope="module")
async def restricted_idp() -> AsyncIterator[DevIdentityProvider]:
    idp = await _started(allowed_audiences=[RAS_ISSUER])
    yield idp
    await idp.stop()


@pytest.fixture(params=["ES256", "RS256"])
def idp(request: pytest.FixtureRequest, es_idp: DevIdentityProvider, rs_idp: DevIdentityProvider):
    return es_idp if request.param == "ES256" else rs_idp


async def post_token(
    http: aiohttp.ClientSession,
    idp: DevIdentityProvider,
    form: dict[str, str],
    *,
    client: tuple[str, str] | None = (AGENT_ID, AGENT_SECRET),
    auth: str = "basic",
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    """POST a form to the token endpoint with client_secret_basic or client_secret_post."""
    data = dict(form)
    kwargs: dict[str, Any] = {}
    if client is not None and auth == "basic":
        kwargs["headers"] = basic_auth(*client)
    elif client is not None:
        data.update(client_id=client[0], client_secret=client[1])
    async with http.post(idp.token_endpoint, data=data, **kwargs) as resp:
        return resp.status, await resp.json(), resp


def basic_auth(client_id: str, secret: str) -> dict[str, str]:
    """client_secret_basic header (RFC 6749 §2.3.1); test ids/secrets need no form-urlencoding."""
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def exchange_form(id_token: str, **overrides: str | None) -> dict[str, str]:
    form: dict[str, str | None] = {
        "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
        "requested_token_type": TOKEN_TYPE_ID_JAG,
        "subject_token": id_token,
        "subject_token_type": TOKEN_TYPE_ID_TOKEN,
        "audience": RAS_ISSUER,
        "resource": MCP_RESOURCE,
        "scope": "tools.read tools.call",
    }
    form.update(overrides)
    return {k: v for k, v in form.items() if v is not None}


def verify_with_jwks(token: str, jwks: dict[str, Any], alg: str, audience: str) -> dict[str, Any]:
    return jwt.decode(token, jwks, algorithms=[alg], audience=audience)


def assert_oauth_error(status: int, body: dict[str, Any], error: str, expected_status: int = 400) -> None:
    assert status == expected_status, body
    assert body["error"] == error
    assert isinstance(body.get("error_description"), str)


# ------------------------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("path", ["/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"])
async def test_discovery_documents_have_fields_required_by_oidc_rfc8414_and_mcp_sdks(
    http: aiohttp.ClientSession, idp: DevIdentityProvider, path: str
) -> None:
    async with http.get(idp.issuer + path) as resp:
        assert resp.status == 200
        meta = await resp.json()
    assert meta["issuer"] == idp.issuer  # RFC 8414 §3.3 / OIDC Discovery §4.3: must match exactly
    assert meta["token_endpoint"] == idp.token_endpoint == idp.issuer + "/token"
    assert meta["jwks_uri"] == idp.issuer + "/jwks"
    assert meta["authorization_endpoint"] == idp.issuer + "/authorize"
    assert meta["response_types_supported"]
    assert meta["subject_types_supported"] == ["public"]
    assert meta["id_token_signing_alg_values_supported"] == [idp.algorithm]
    assert set(meta["grant_types_supported"]) == {"password", GRANT_TYPE_TOKEN_EXCHANGE}
    assert set(meta["token_endpoint_auth_methods_supported"]) == {"client_secret_basic", "client_secret_post"}
    assert TOKEN_TYPE_ID_JAG in meta["identity_chaining_requested_token_types_supported"]


async def test_issuer_with_path_serves_oidc_appended_and_rfc8414_inserted_well_known_urls(
    http: aiohttp.ClientSession,
) -> None:
    # OIDC Discovery §4 appends the well-known suffix to the issuer; RFC 8414 §3.1 inserts it before the path.
    idp = DevIdentityProvider(issuer="https://idp.example/tenant-a")
    async with TestServer(idp.make_app()) as server:
        for path in (
            "/tenant-a/.well-known/openid-configuration",
            "/.well-known/oauth-authorization-server/tenant-a",
        ):
            async with http.get(server.make_url(path)) as resp:
                assert resp.status == 200
                meta = await resp.json()
            assert meta["issuer"] == "https://idp.example/tenant-a"
            assert meta["token_endpoint"] == "https://idp.example/tenant-a/token"
        async with http.get(server.make_url("/tenant-a/jwks")) as resp:
            assert await resp.json() == idp.public_jwks()


async def test_jwks_publishes_only_the_public_key_with_kid_alg_and_use(
    http: aiohttp.ClientSession, idp: DevIdentityProvider
) -> None:
    async with http.get(idp.issuer + "/jwks") as resp:
        assert resp.status == 200
        jwks = await resp.json()
    assert jwks == idp.public_jwks()
    (key,) = jwks["keys"]
    assert key["kid"] == idp.kid and key["alg"] == idp.algorithm and key["use"] == "sig"
    assert key["kty"] == ("EC" if idp.algorithm == "ES256" else "RSA")
    assert not {"d", "p", "q", "dp", "dq", "qi"} & key.keys(), "private key material leaked into JWKS"


async def test_authorize_endpoint_answers_json_error_not_a_login_page(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider
) -> None:
    async with http.get(es_idp.issuer + "/authorize?response_type=code&client_id=demo-agent") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "unsupported_response_type"


async def test_unknown_path_and_wrong_method_give_json_errors(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider
) -> None:
    async with http.get(es_idp.issuer + "/nope") as resp:
        assert resp.status == 404
        assert "error" in await resp.json()
    async with http.get(es_idp.token_endpoint) as resp:
        assert resp.status == 405
        assert "error" in await resp.json()


# -------------------------------------------------------------------------------------- password grant


@pytest.mark.parametrize("auth", ["basic", "post"])
async def test_password_grant_returns_id_token_audienced_to_the_authenticated_client(
    http: aiohttp.ClientSession, idp: DevIdentityProvider, auth: str
) -> None:
    status, body, resp = await post_token(
        http, idp, {"grant_type": "password", "username": "alice", "password": "alice-password"}, auth=auth
    )
    assert status == 200, body
    assert resp.headers["Cache-Control"] == "no-store"
    assert body["token_type"] == "Bearer" and body["expires_in"] > 0 and body["access_token"]
    assert jwt.get_unverified_header(body["id_token"])["typ"] == "JWT"
    claims = verify_with_jwks(body["id_token"], idp.public_jwks(), idp.algorithm, audience=AGENT_ID)
    assert claims["iss"] == idp.issuer
    assert claims["sub"] == "alice"
    assert claims["aud"] == AGENT_ID
    assert claims["email"] == "alice@example.com"
    assert claims["groups"] == ["engineering", "support"]


@pytest.mark.parametrize(("username", "password"), [("alice", "wrong"), ("alice", "bob-password"), ("mallory", "x")])
async def test_password_grant_with_bad_user_credentials_is_invalid_grant(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider, username: str, password: str
) -> None:
    status, body, _ = await post_token(
        http, es_idp, {"grant_type": "password", "username": username, "password": password}
    )
    assert_oauth_error(status, body, "invalid_grant")


async def test_password_grant_without_password_is_invalid_request(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider
) -> None:
    status, body, _ = await post_token(http, es_idp, {"grant_type": "password", "username": "alice"})
    assert_oauth_error(status, body, "invalid_request")


# -------------------------------------------------------------------------------------- token exchange


@pytest.mark.parametrize("auth", ["basic", "post"])
async def test_token_exchange_issues_id_jag_with_draft_header_and_claims(
    http: aiohttp.ClientSession, idp: DevIdentityProvider, auth: str
) -> None:
    id_token = idp.issue_id_token("alice", AGENT_ID)
    status, body, resp = await post_token(http, idp, exchange_form(id_token), auth=auth)
    assert status == 200, body
    assert resp.headers["Cache-Control"] == "no-store"
    assert body["issued_token_type"] == TOKEN_TYPE_ID_JAG
    assert body["token_type"] == "N_A"
    assert body["expires_in"] == 300
    assert body["scope"] == "tools.read tools.call"
    assert "refresh_token" not in body  # draft "Response": SHOULD NOT be used

    id_jag = body["access_token"]
    header = jwt.get_unverified_header(id_jag)
    assert header["typ"] == "oauth-id-jag+jwt"
    assert header["alg"] == idp.algorithm
    assert header["kid"] == idp.kid

    claims = verify_with_jwks(id_jag, idp.public_jwks(), idp.algorithm, audience=RAS_ISSUER)
    assert claims["iss"] == idp.issuer
    assert claims["sub"] == "alice"
    assert claims["aud"] == RAS_ISSUER
    assert claims["client_id"] == AGENT_ID
    assert claims["resource"] == MCP_RESOURCE
    assert claims["scope"] == "tools.read tools.call"
    assert claims["groups"] == ["engineering", "support"]
    assert claims["email"] == "alice@example.com"
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16
    assert claims["exp"] - claims["iat"] == 300
    assert abs(claims["iat"] - time.time()) < 60


async def test_id_jag_verifies_against_jwks_fetched_over_http(
    http: aiohttp.ClientSession, idp: DevIdentityProvider
) -> None:
    async with http.get(idp.issuer + "/.well-known/openid-configuration") as resp:
        jwks_uri = (await resp.json())["jwks_uri"]
    async with http.get(jwks_uri) as resp:
        jwks = await resp.json()
    id_jag = idp.issue_id_jag(username="bob", audience=RAS_ISSUER, client_id=AGENT_ID)
    claims = verify_with_jwks(id_jag, jwks, idp.algorithm, audience=RAS_ISSUER)
    assert claims["sub"] == "bob" and claims["groups"] == ["support"]


async def test_token_exchange_puts_resource_client_id_into_id_jag_client_id_claim(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider
) -> None:
    id_token = es_idp.issue_id_token("carol", MAPPED.client_id)
    status, body, _ = await post_token(
        http, es_idp, exchange_form(id_token), client=(MAPPED.client_id, MAPPED.client_secret), auth="post"
    )
    assert status == 200, body
    claims = jwt.get_unverified_claims(body["access_token"])
    assert claims["client_id"] == "wiki-at-gateway"
    assert claims["groups"] == ["contractors"]


async def test_token_exchange_without_resource_or_scope_omits_those_claims(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider
) -> None:
    id_token = es_idp.issue_id_token("bob", AGENT_ID)
    status, body, _ = await post_token(http, es_idp, exchange_form(id_token, resource=None, scope=None))
    assert status == 200, body
    assert "scope" not in body
    claims = jwt.get_unverified_claims(body["access_token"])
    assert "resource" not in claims and "scope" not in claims


async def test_token_exchange_issues_a_unique_jti_every_time(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider
) -> None:
    id_token = es_idp.issue_id_token("alice", AGENT_ID)
    jtis = set()
    for _ in range(5):
        status, body, _ = await post_token(http, es_idp, exchange_form(id_token))
        assert status == 200, body
        jtis.add(jwt.get_unverified_claims(body["access_token"])["jti"])
    assert len(jtis) == 5


async def test_token_exchange_accepts_an_allowed_audience(
    http: aiohttp.ClientSession, restricted_idp: DevIdentityProvider
) -> None:
    id_token = restricted_idp.issue_id_token("alice", AGENT_ID)
    status, body, _ = await post_token(http, restricted_idp, exchange_form(id_token))
    assert status == 200, body


async def test_full_flow_password_login_then_token_exchange(
    http: aiohttp.ClientSession, idp: DevIdentityProvider
) -> None:
    status, login, _ = await post_token(
        http, idp, {"grant_type": "password", "username": "bob", "password": "bob-password"}
    )
    assert status == 200, login
    status, body, _ = await post_token(http, idp, exchange_form(login["id_token"]), auth="post")
    assert status == 200, body
    assert jwt.get_unverified_claims(body["access_token"])["sub"] == "bob"


# ---------------------------------------------------------------------------------- client auth errors


@pytest.mark.parametrize("auth", ["basic", "post"])
@pytest.mark.parametrize("client", [(AGENT_ID, "wrong-secret"), ("no-such-client", AGENT_SECRET), (AGENT_ID, "")])
async def test_bad_client_credentials_give_401_invalid_client_with_basic_challenge(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider, auth: str, client: tuple[str, str]
) -> None:
    id_token = es_idp.issue_id_token("alice", AGENT_ID)
    status, body, resp = await post_token(http, es_idp, exchange_form(id_token), client=client, auth=auth)
    assert_oauth_error(status, body, "invalid_client", 401)
    assert resp.headers["WWW-Authenticate"].startswith("Basic")
    assert resp.headers["Cache-Control"] == "no-store"


async def test_missing_client_authentication_is_invalid_client(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider
) -> None:
    id_token = es_idp.issue_id_token("alice", AGENT_ID)
    status, body, _ = await post_token(http, es_idp, exchange_form(id_token), client=None)
    assert_oauth_error(status, body, "invalid_client", 401)


async def test_client_id_without_secret_is_rejected_because_public_clients_are_not_allowed(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider
) -> None:
    id_token = es_idp.issue_id_token("alice", AGENT_ID)
    status, body, _ = await post_token(http, es_idp, {**exchange_form(id_token), "client_id": AGENT_ID}, client=None)
    assert_oauth_error(status, body, "invalid_client", 401)


async def test_basic_and_post_client_auth_together_is_invalid_request(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider
) -> None:
    id_token = es_idp.issue_id_token("alice", AGENT_ID)
    form = {**exchange_form(id_token), "client_id": AGENT_ID, "client_secret": AGENT_SECRET}
    status, body, _ = await post_token(http, es_idp, form, auth="basic")
    assert_oauth_error(status, body, "invalid_request")


@pytest.mark.parametrize(
    "authorization",
    ["Bearer abc", "Basic !!!not-base64!!!", "Basic " + base64.b64encode(b"nocolon").decode()],
)
async def test_malformed_or_non_basic_authorization_header_is_invalid_client(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider, authorization: str
) -> None:
    id_token = es_idp.issue_id_token("alice", AGENT_ID)
    async with http.post(
        es_idp.token_endpoint, data=exchange_form(id_token), headers={"Authorization": authorization}
    ) as resp:
        assert_oauth_error(resp.status, await resp.json(), "invalid_client", 401)


async def test_basic_credentials_are_form_urldecoded_per_rfc6749_2_3_1(
    http: aiohttp.ClientSession,
) -> None:
    odd = DevClient("odd client", "s3cret+/:%")
    idp = DevIdentityProvider(clients=[odd])
    await idp.start()
    try:
        encoded = "odd+client:s3cret%2B%2F%3A%25"
        headers = {"Authorization": "Basic " + base64.b64encode(encoded.encode()).decode()}
        form = {"grant_type": "password", "username": "alice", "password": "alice-password"}
        async with http.post(idp.token_endpoint, data=form, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
    finally:
        await idp.stop()


# ---------------------------------------------------------------------------------------- grant errors


async def test_id_token_issued_to_another_client_is_invalid_grant(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider
) -> None:
    id_token = es_idp.issue_id_token("alice", MAPPED.client_id)  # aud = wiki-app, caller = demo-agent
    status, body, _ = await post_token(http, es_idp, exchange_form(id_token))
    assert_oauth_error(status, body, "invalid_grant")


async def test_expired_id_token_is_invalid_grant(http: aiohttp.ClientSession, es_idp: DevIdentityProvider) -> None:
    now = int(time.time())
    expired = es_idp.sign(
        {"iss": es_idp.issuer, "sub": "alice", "aud": AGENT_ID, "iat": now - 700, "exp": now - 100},
        typ="JWT",
    )
    status, body, _ = await post_token(http, es_idp, exchange_form(expired))
    assert_oauth_error(status, body, "invalid_grant")


async def test_id_token_from_another_idp_is_invalid_grant(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider, rs_idp: DevIdentityProvider
) -> None:
    # Same issuer string, different key: only the signature check can catch this.
    impostor = DevIdentityProvider(issuer=es_idp.issuer)
    status, body, _ = await post_token(http, es_idp, exchange_form(impostor.issue_id_token("alice", AGENT_ID)))
    assert_oauth_error(status, body, "invalid_grant")
    # Different issuer and algorithm.
    status, body, _ = await post_token(http, es_idp, exchange_form(rs_idp.issue_id_token("alice", AGENT_ID)))
    assert_oauth_error(status, body, "invalid_grant")


async def test_id_jag_cannot_be_used_as_subject_token(http: aiohttp.ClientSession, es_idp: DevIdentityProvider) -> None:
    # Even with aud = the caller, the oauth-id-jag+jwt typ must keep it from being exchanged (RFC 8725 §3.11).
    id_jag = es_idp.issue_id_jag(username="alice", audience=AGENT_ID, client_id=AGENT_ID)
    status, body, _ = await post_token(http, es_idp, exchange_form(id_jag))
    assert_oauth_error(status, body, "invalid_grant")


@pytest.mark.parametrize("subject_token", ["not-a-jwt", "a.b.c", "e30.e30.", "x" * 5000])
async def test_garbage_subject_token_is_invalid_grant_not_500(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider, subject_token: str
) -> None:
    status, body, _ = await post_token(http, es_idp, exchange_form(subject_token))
    assert_oauth_error(status, body, "invalid_grant")


async def test_id_token_for_unknown_subject_or_with_odd_claim_types_is_invalid_grant(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider
) -> None:
    now = int(time.time())
    base = {"iss": es_idp.issuer, "aud": AGENT_ID, "iat": now, "exp": now + 60}
    for claims in (
        {**base, "sub": "nobody"},
        {**base, "sub": ["alice"]},
        {**base, "sub": "alice", "iat": None},
    ):
        status, body, _ = await post_token(http, es_idp, exchange_form(es_idp.sign(claims, typ="JWT")))
        assert_oauth_error(status, body, "invalid_grant")


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"requested_token_type": "urn:ietf:params:oauth:token-type:access_token"}, "invalid_request"),
        ({"requested_token_type": None}, "invalid_request"),
        ({"subject_token_type": "urn:ietf:params:oauth:token-type:saml2"}, "invalid_request"),
        ({"subject_token": None}, "invalid_request"),
        ({"audience": None}, "invalid_request"),
        ({"audience": ""}, "invalid_request"),  # RFC 6749 §3.2: empty = omitted
        ({"resource": "relative/path"}, "invalid_target"),
        ({"resource": "https://gateway.example/mcp#frag"}, "invalid_target"),
        ({"scope": "ok bad\x7fscope"}, "invalid_scope"),
        ({"actor_token": "x", "actor_token_type": TOKEN_TYPE_ID_TOKEN}, "invalid_request"),
    ],
)
async def test_token_exchange_request_errors_use_the_right_oauth_error_code(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider, overrides: dict[str, str | None], error: str
) -> None:
    id_token = es_idp.issue_id_token("alice", AGENT_ID)
    status, body, _ = await post_token(http, es_idp, exchange_form(id_token, **overrides))
    assert_oauth_error(status, body, error)


async def test_audience_outside_allowed_audiences_is_invalid_target(
    http: aiohttp.ClientSession, restricted_idp: DevIdentityProvider
) -> None:
    id_token = restricted_idp.issue_id_token("alice", AGENT_ID)
    form = exchange_form(id_token, audience="https://evil.example")
    status, body, _ = await post_token(http, restricted_idp, form)
    assert_oauth_error(status, body, "invalid_target")


async def test_audience_equal_to_the_idp_itself_is_invalid_target(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider
) -> None:
    id_token = es_idp.issue_id_token("alice", AGENT_ID)
    status, body, _ = await post_token(http, es_idp, exchange_form(id_token, audience=es_idp.issuer))
    assert_oauth_error(status, body, "invalid_target")


@pytest.mark.parametrize("grant_type", ["authorization_code", "client_credentials", "urn:x:unknown"])
async def test_unsupported_grant_type(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider, grant_type: str
) -> None:
    status, body, _ = await post_token(http, es_idp, {"grant_type": grant_type})
    assert_oauth_error(status, body, "unsupported_grant_type")


async def test_missing_grant_type_is_invalid_request(http: aiohttp.ClientSession, es_idp: DevIdentityProvider) -> None:
    status, body, _ = await post_token(http, es_idp, {"username": "alice"})
    assert_oauth_error(status, body, "invalid_request")


# ------------------------------------------------------------------------------------ malformed bodies


@pytest.mark.parametrize(
    ("content_type", "payload"),
    [
        ("application/json", b'{"grant_type": "password"}'),
        ("text/plain", b"grant_type=password"),
        ("application/x-www-form-urlencoded", b"grant_type=password&username=%ff%fe&password=x"),
        ("application/x-www-form-urlencoded", b"grant_type=password&grant_type=password"),
        ("application/x-www-form-urlencoded", b"\xff\xfe\x00garbage"),
        ("application/x-www-form-urlencoded", b""),
    ],
)
async def test_malformed_token_request_body_is_invalid_request_not_500(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider, content_type: str, payload: bytes
) -> None:
    async with http.post(
        es_idp.token_endpoint,
        data=payload,
        headers={"Content-Type": content_type, **basic_auth(AGENT_ID, AGENT_SECRET)},
    ) as resp:
        body = await resp.json()
    assert_oauth_error(resp.status, body, "invalid_request")


async def test_duplicate_token_exchange_parameter_is_invalid_request(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider
) -> None:
    id_token = es_idp.issue_id_token("alice", AGENT_ID)
    pairs = [*exchange_form(id_token).items(), ("audience", "https://other.example")]
    async with http.post(es_idp.token_endpoint, data=pairs, headers=basic_auth(AGENT_ID, AGENT_SECRET)) as resp:
        assert_oauth_error(resp.status, await resp.json(), "invalid_request")


async def test_oversized_body_is_rejected_with_413_json(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider
) -> None:
    form = {"grant_type": "password", "username": "alice", "password": "p" * (70 * 1024)}
    async with http.post(es_idp.token_endpoint, data=form, headers=basic_auth(AGENT_ID, AGENT_SECRET)) as resp:
        assert_oauth_error(resp.status, await resp.json(), "invalid_request", 413)


# -------------------------------------------------------------------------------------- in-process API


def test_sign_mints_arbitrary_claims_and_headers_with_the_real_key(es_idp: DevIdentityProvider) -> None:
    jwks = es_idp.public_jwks()
    no_typ = es_idp.sign({"sub": "x"}, typ=None)
    assert "typ" not in jwt.get_unverified_header(no_typ)
    assert jwt.decode(no_typ, jwks, algorithms=["ES256"]) == {"sub": "x"}

    odd = es_idp.sign({"sub": "x"}, typ="JWT", headers={"kid": "other-kid", "x5u": "https://x"})
    header = jwt.get_unverified_header(odd)
    assert header == {"alg": "ES256", "kid": "other-kid", "typ": "JWT", "x5u": "https://x"}

    default = jwt.get_unverified_header(es_idp.sign({}))
    assert default == {"alg": "ES256", "kid": es_idp.kid, "typ": "oauth-id-jag+jwt"}


def test_issue_id_jag_supports_resource_list_custom_ttl_and_extra_claims(es_idp: DevIdentityProvider) -> None:
    token = es_idp.issue_id_jag(
        username="alice",
        audience=RAS_ISSUER,
        client_id="c1",
        resource=[MCP_RESOURCE, "https://gateway.example/other"],
        scope="a b",
        ttl_seconds=30,
        extra_claims={"tenant": "acme", "iss": "https://forged.example"},
    )
    claims = jwt.decode(
        token,
        es_idp.public_jwks(),
        algorithms=["ES256"],
        audience=RAS_ISSUER,
        issuer="https://forged.example",
    )
    assert claims["resource"] == [MCP_RESOURCE, "https://gateway.example/other"]
    assert claims["exp"] - claims["iat"] == 30
    assert claims["tenant"] == "acme"
    assert claims["client_id"] == "c1" and claims["scope"] == "a b"


def test_user_without_email_or_groups_gets_empty_groups_and_no_email() -> None:
    idp = DevIdentityProvider(issuer="https://idp.example", users=[DevUser("dave", "pw", sub="u-123")])
    claims = jwt.get_unverified_claims(idp.issue_id_jag(username="dave", audience=RAS_ISSUER, client_id="c"))
    assert claims["sub"] == "u-123" and claims["groups"] == [] and "email" not in claims
    assert idp.token_endpoint == "https://idp.example/token"
    with pytest.raises(KeyError):
        idp.issue_id_token("nobody", "c")


def test_constructor_rejects_unsupported_algorithm_and_issuer_is_unknown_before_start() -> None:
    with pytest.raises(ValueError):
        DevIdentityProvider(algorithm="HS256")
    with pytest.raises(RuntimeError):
        _ = DevIdentityProvider().issuer


def test_default_users_and_clients_are_the_documented_demo_accounts() -> None:
    users = {u.username: u for u in DEFAULT_USERS}
    assert users["alice"].groups == ("engineering", "support") and users["alice"].password == "alice-password"
    assert users["bob"].groups == ("support",)
    assert users["carol"].groups == ("contractors",)
    assert DevClient("demo-agent", "demo-agent-secret") in DEFAULT_CLIENTS


def test_kid_is_stable_per_key_and_differs_between_instances(es_idp: DevIdentityProvider) -> None:
    assert es_idp.kid == es_idp.kid == es_idp.public_jwks()["keys"][0]["kid"]
    assert DevIdentityProvider().kid != es_idp.kid


# --------------------------------------------------------------------------------- lifecycle & logging


async def test_start_logs_not_for_production_and_stop_is_idempotent(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    idp = DevIdentityProvider()
    with caplog.at_level(logging.WARNING, logger="gateway.devidp"):
        issuer = await idp.start()
    try:
        assert issuer.startswith("http://127.0.0.1:") and issuer == idp.issuer
        assert any("NOT FOR PRODUCTION" in r.getMessage() for r in caplog.records)
        with pytest.raises(RuntimeError):
            await idp.start()
    finally:
        await idp.stop()
    await idp.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(issuer + "/jwks"):
            pass


async def test_request_logs_never_contain_tokens_or_secrets(
    http: aiohttp.ClientSession, es_idp: DevIdentityProvider, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="gateway.devidp"):
        status, login, _ = await post_token(
            http,
            es_idp,
            {"grant_type": "password", "username": "alice", "password": "alice-password"},
            auth="post",
        )
        assert status == 200
        status, body, _ = await post_token(http, es_idp, exchange_form(login["id_token"]))
        assert status == 200
        await post_token(http, es_idp, exchange_form(login["id_token"]), client=(AGENT_ID, "bad-secret"))
    text = caplog.text
    assert "dev-idp POST /token -> 200" in text  # requests are logged ...
    for secret in (AGENT_SECRET, "alice-password", "bad-secret", login["id_token"], body["access_token"]):
        assert secret not in text  # ... but never credentials or tokens ([EMA] §7.4.2)
    # No fragment of a JWT either (each token part is long base64url; the header part is the most stable).
    assert body["access_token"].split(".")[1] not in text
