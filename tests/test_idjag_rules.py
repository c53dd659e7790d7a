"""One test per ID-JAG validation rule (SPEC §2.2), each through the real token endpoint.

Assertions are minted with the loopback IdP's real signing key (``idp.sign``), so every refusal
below is the gateway's rule at work, not a signature accident, unless the test is about signatures.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import urllib.parse
from typing import Any

import aiohttp
import pytest
from jose import jwt

from gateway.devidp import DevIdentityProvider
from tests.support.harness import (
    CLIENT_ID,
    JWT_BEARER,
    OTHER_CLIENT_ID,
    OTHER_CLIENT_SECRET,
    GatewayHarness,
    running_gateway,
    start_harness,
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}.{b64url(signature)}"


async def expect_error(
    gw: GatewayHarness, assertion: str | None, error: str, status: int = 400, **kwargs: Any
) -> dict[str, Any]:
    code, body, headers = await gw.token_request(assertion, **kwargs)
    assert (code, body.get("error")) == (status, error), body
    assert headers.get("Cache-Control") == "no-store"
    assert "error_description" in body
    return body


async def expect_token(gw: GatewayHarness, assertion: str, **kwargs: Any) -> dict[str, Any]:
    code, body, headers = await gw.token_request(assertion, **kwargs)
    assert code == 200, body
    assert headers.get("Cache-Control") == "no-store"
    return body


# -- 0. the happy path, for both IdPs (ES256 and RS256) --------------------------------------


async def test_valid_id_jag_gets_an_audience_restricted_access_token(gw: GatewayHarness) -> None:
    body = await expect_token(gw, gw.id_jag("json"))
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "mcp"
    assert body["expires_in"] == 300
    assert "refresh_token" not in body
    claims = jwt.get_unverified_claims(body["access_token"])
    assert claims["aud"] == gw.resource("json")
    assert claims["iss"] == gw.issuer
    assert claims["idp_sub"] == "alice"
    assert json.loads(claims["sub"]) == [gw.idp.issuer, None, "alice"]
    assert claims["client_id"] == CLIENT_ID
    assert claims["groups"] == ["engineering", "support"]
    assert claims["exp"] - claims["iat"] == 300
    assert jwt.get_unverified_header(body["access_token"])["typ"] == "at+jwt"


async def test_rs256_identity_provider_is_accepted(gw: GatewayHarness, idp_rsa: DevIdentityProvider) -> None:
    claims = gw.id_jag_claims("json", iss=idp_rsa.issuer)
    assert jwt.get_unverified_header(idp_rsa.sign(claims))["alg"] == "RS256"
    await expect_token(gw, idp_rsa.sign(claims))


# -- 1. request shape ------------------------------------------------------------------------


async def test_rule_request_shape_unknown_grant_type(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.id_jag(), "unsupported_grant_type", grant_type="authorization_code")


async def test_rule_request_shape_missing_assertion(gw: GatewayHarness) -> None:
    await expect_error(gw, None, "invalid_request")


async def test_rule_request_shape_repeated_assertion(gw: GatewayHarness) -> None:
    body = "&".join(
        [
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer",
            f"assertion={gw.id_jag()}",
            f"assertion={gw.id_jag()}",
            f"client_id={CLIENT_ID}",
            "client_secret=test-agent-secret-0123456789",
        ]
    )
    async with aiohttp.ClientSession() as http:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        async with http.post(gw.token_endpoint, data=body, headers=headers) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "invalid_request"


async def test_rule_request_shape_json_body_is_refused(gw: GatewayHarness) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.token_endpoint, json={"grant_type": "x"}) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "invalid_request"


# -- 2. client authentication ----------------------------------------------------------------


async def test_rule_client_auth_wrong_secret_is_invalid_client(gw: GatewayHarness) -> None:
    _, _, headers = await gw.token_request(gw.id_jag(), client_secret="not-the-secret-0123456789")
    await expect_error(gw, gw.id_jag(), "invalid_client", 401, client_secret="not-the-secret-0123456789")
    assert headers["WWW-Authenticate"].startswith("Basic")


async def test_rule_client_auth_unknown_client_is_invalid_client(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.id_jag(), "invalid_client", 401, client_id="nobody", client_secret="x" * 20)


async def test_rule_client_auth_basic_wrong_secret_is_invalid_client(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.id_jag(), "invalid_client", 401, basic=True, client_secret="nope-0123456789abcdef")


async def test_rule_client_auth_basic_is_accepted(gw: GatewayHarness) -> None:
    await expect_token(gw, gw.id_jag(), basic=True)


# RFC 6749 §2.3.1: id and secret are form-urlencoded before base64. Both contain every character
# the encoding changes: ' ' (written '+'), '+', '%' and ':' (the Basic separator).
ODD_CLIENT_ID = "acme agent+1%:ops"
ODD_CLIENT_SECRET = "s3cret with space+plus%25:colon"
# A client whose id needs no encoding, as the TypeScript SDK (which skips it) can use.
RAW_CLIENT_ID = "raw-agent"
RAW_CLIENT_SECRET = "raw secret+with%2Bplus"


def basic(client_id: str, secret: str, encode: Any) -> str:
    return "Basic " + base64.b64encode(f"{encode(client_id)}:{encode(secret)}".encode()).decode()


@pytest.fixture(scope="module")
async def odd_clients_gw(idp: DevIdentityProvider, upstream_json) -> Any:
    clients = [
        {"client_id": ODD_CLIENT_ID, "client_secret": ODD_CLIENT_SECRET},
        {"client_id": RAW_CLIENT_ID, "client_secret": RAW_CLIENT_SECRET},
    ]
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    async with running_gateway(idp, routes, authorization={"clients": clients}) as harness:
        yield harness


async def basic_token_request(h: GatewayHarness, client_id: str, authorization: str) -> tuple[int, dict[str, Any]]:
    form = {"grant_type": JWT_BEARER, "assertion": h.id_jag(client_id=client_id)}
    async with aiohttp.ClientSession() as http:
        async with http.post(h.token_endpoint, data=form, headers={"Authorization": authorization}) as response:
            return response.status, await response.json()


@pytest.mark.parametrize(
    "encode",
    [
        lambda v: urllib.parse.quote_plus(v, safe=""),  # RFC 6749 §2.3.1 / HTML forms: ' ' -> '+'
        lambda v: urllib.parse.quote(v, safe=""),  # the Python SDK: ' ' -> '%20'
    ],
    ids=["form-plus", "percent-20"],
)
async def test_rule_client_auth_basic_credentials_are_form_urlencoded(odd_clients_gw: GatewayHarness, encode) -> None:
    status, body = await basic_token_request(
        odd_clients_gw, ODD_CLIENT_ID, basic(ODD_CLIENT_ID, ODD_CLIENT_SECRET, encode)
    )
    assert status == 200, body
    wrong = basic(ODD_CLIENT_ID, ODD_CLIENT_SECRET.replace(" ", "_"), encode)
    status, body = await basic_token_request(odd_clients_gw, ODD_CLIENT_ID, wrong)
    assert (status, body["error"]) == (401, "invalid_client")


async def test_rule_client_auth_basic_credentials_are_also_tried_as_sent(odd_clients_gw: GatewayHarness) -> None:
    """The TypeScript SDK's btoa(id:secret): '+' and '%2B' in the secret are literal there."""
    raw = "Basic " + base64.b64encode(f"{RAW_CLIENT_ID}:{RAW_CLIENT_SECRET}".encode()).decode()
    status, body = await basic_token_request(odd_clients_gw, RAW_CLIENT_ID, raw)
    assert status == 200, body
    encoded = basic(RAW_CLIENT_ID, RAW_CLIENT_SECRET, lambda v: urllib.parse.quote_plus(v, safe=""))
    assert (await basic_token_request(odd_clients_gw, RAW_CLIENT_ID, encoded))[0] == 200


async def test_rule_client_auth_public_client_is_refused(gw: GatewayHarness) -> None:
    body = await expect_error(gw, gw.id_jag(), "invalid_client", 401, client_secret=None)
    assert "required" in body["error_description"]


async def test_rule_client_auth_two_methods_at_once_is_invalid_request(gw: GatewayHarness) -> None:
    await expect_error(
        gw, gw.id_jag(), "invalid_request", basic=True, extra={"client_secret": "test-agent-secret-0123456789"}
    )


# -- 3. JWS compact only ---------------------------------------------------------------------


async def test_rule_jws_encrypted_assertion_is_refused(gw: GatewayHarness) -> None:
    jwe_shaped = ".".join(b64url(b"x") for _ in range(5))
    await expect_error(gw, jwe_shaped, "invalid_grant")


async def test_rule_jws_garbage_assertion_is_refused(gw: GatewayHarness) -> None:
    await expect_error(gw, "not-a-jwt", "invalid_grant")
    await expect_error(gw, "a.b.c", "invalid_grant")


# -- 4. typ ----------------------------------------------------------------------------------


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", "text/oauth-id-jag+jwt", "oauth-id-jag+jwt+x", None])
async def test_rule_typ_must_be_oauth_id_jag_jwt(gw: GatewayHarness, typ: str | None) -> None:
    assertion = gw.idp.sign(gw.id_jag_claims(), typ=typ)
    body = await expect_error(gw, assertion, "invalid_grant")
    assert "typ" in body["error_description"]


@pytest.mark.parametrize("typ", ["OAUTH-ID-JAG+JWT", "application/oauth-id-jag+jwt", "Application/OAuth-ID-JAG+JWT"])
async def test_rfc7515_s4_1_9_id_jag_typ_is_a_case_insensitive_media_type(gw: GatewayHarness, typ: str) -> None:
    await expect_token(gw, gw.idp.sign(gw.id_jag_claims(), typ=typ))


async def test_rule_typ_an_id_token_is_not_an_id_jag(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.idp.issue_id_token("alice", "test-idp-client"), "invalid_grant")


# -- 5. algorithm allow-list -----------------------------------------------------------------


async def test_rule_algorithm_none_is_refused(gw: GatewayHarness) -> None:
    token = unsigned_token({"alg": "none", "typ": "oauth-id-jag+jwt"}, gw.id_jag_claims())
    body = await expect_error(gw, token, "invalid_grant")
    assert "algorithm" in body["error_description"]


async def test_rule_algorithm_hmac_with_the_public_key_is_refused(gw: GatewayHarness) -> None:
    """The key-confusion attack (RFC 8725 §2.1): HS256 keyed with the IdP's public JWK."""
    header = {"alg": "HS256", "typ": "oauth-id-jag+jwt", "kid": gw.idp.kid}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(gw.id_jag_claims()).encode())}"
    public = json.dumps(gw.idp.public_jwks()["keys"][0]).encode()
    signature = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    body = await expect_error(gw, f"{signing_input}.{b64url(signature)}", "invalid_grant")
    assert "algorithm" in body["error_description"]


async def test_rule_algorithm_outside_the_idps_list_is_refused(idp: DevIdentityProvider, upstream_json) -> None:
    h = await start_harness(
        idp,
        [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}],
        authorization={"identity_providers": [{"issuer": idp.issuer, "algorithms": ["RS256"]}]},
    )
    try:
        await expect_error(h, h.id_jag(), "invalid_grant")  # the IdP signs ES256
    finally:
        await h.runner.cleanup()


# -- 6. trusted issuer -----------------------------------------------------------------------


async def test_rule_issuer_untrusted_idp_is_refused(gw: GatewayHarness) -> None:
    stranger = DevIdentityProvider(issuer="https://evil.example.com")
    body = await expect_error(gw, stranger.sign(gw.id_jag_claims(iss="https://evil.example.com")), "invalid_grant")
    assert "issuer" in body["error_description"]


# -- 7. signature ----------------------------------------------------------------------------


async def test_rule_signature_tampered_claims_are_refused(gw: GatewayHarness) -> None:
    header, _, signature = gw.id_jag().split(".")
    forged = b64url(json.dumps(gw.id_jag_claims(sub="admin")).encode())
    body = await expect_error(gw, f"{header}.{forged}.{signature}", "invalid_grant")
    assert "signature" in body["error_description"]


async def test_rule_signature_by_a_key_the_idp_never_published(gw: GatewayHarness) -> None:
    impostor = DevIdentityProvider(issuer=gw.idp.issuer)  # same issuer string, its own key
    await expect_error(gw, impostor.sign(gw.id_jag_claims(), headers={"kid": gw.idp.kid}), "invalid_grant")
    await expect_error(gw, impostor.sign(gw.id_jag_claims()), "invalid_grant")


# -- 8. audience -----------------------------------------------------------------------------


async def test_rule_audience_must_be_this_issuer(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.id_jag(aud="https://other-as.example.com"), "invalid_grant")


async def test_rule_audience_array_must_have_exactly_one_element(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.id_jag(aud=[gw.issuer, "https://other.example.com"]), "invalid_grant")
    await expect_token(gw, gw.id_jag(aud=[gw.issuer]))


async def test_rule_audience_trailing_slash_is_tolerated(gw: GatewayHarness) -> None:
    await expect_token(gw, gw.id_jag(aud=gw.issuer + "/"))


async def test_rule_audience_missing_is_refused(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.id_jag(aud=None), "invalid_grant")


async def test_ema_aud_and_resource_are_validated_as_a_pair(gw: GatewayHarness) -> None:
    """An ID-JAG for another AS naming our resource, or for us naming another AS's resource, is refused
    whole (invalid_grant), also when the client's resource parameter names one of our routes."""
    ours, theirs = gw.resource("json"), "https://other-as.example.com/mcp"
    for claims in (
        gw.id_jag_claims(None, aud="https://other-as.example.com", resource=ours),
        gw.id_jag_claims(None, resource=theirs),
        gw.id_jag_claims(None, resource=[ours, theirs]),
    ):
        await expect_error(gw, gw.idp.sign(claims), "invalid_grant")
        await expect_error(gw, gw.idp.sign(claims), "invalid_grant", extra={"resource": ours})
    await expect_token(gw, gw.id_jag(None, aud=gw.issuer + "/", resource=ours + "/"), extra={"resource": ours})


# -- 9. client_id claim ----------------------------------------------------------------------


async def test_rule_client_id_claim_must_match_the_authenticated_client(gw: GatewayHarness) -> None:
    body = await expect_error(
        gw, gw.id_jag(), "invalid_grant", client_id=OTHER_CLIENT_ID, client_secret=OTHER_CLIENT_SECRET
    )
    assert "client_id" in body["error_description"]


async def test_rule_client_id_claim_missing_is_refused(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.id_jag(client_id=None), "invalid_grant")


# -- 10. subject -----------------------------------------------------------------------------


@pytest.mark.parametrize("sub", [None, "", 42])
async def test_rule_subject_must_be_present(gw: GatewayHarness, sub: Any) -> None:
    claims = gw.id_jag_claims()
    claims.pop("sub")
    if sub is not None:
        claims["sub"] = sub
    await expect_error(gw, gw.idp.sign(claims), "invalid_grant")


# -- 10b. sub_id (RFC 9493 subject identifier) ----------------------------------------------


@pytest.mark.parametrize(
    "sub_id",
    [
        {"format": "opaque", "id": "NameID-7f3a"},
        {"format": "email", "email": "alice@example.com"},
        {"format": "iss_sub", "iss": "https://saml-idp.example.com/metadata", "sub": "alice.saml"},
        {"format": "account", "uri": "acct:alice@example.com"},
        {"format": "phone_number", "phone_number": "+12065550100"},
        {"format": "did", "url": "did:example:123456"},
        {"format": "uri", "uri": "https://example.com/users/alice"},
        {"format": "aliases", "identifiers": [{"format": "email", "email": "alice@example.com"}]},
        {"format": "a_format_registered_later", "anything": ["goes"]},
    ],
    ids=lambda v: v["format"],
)
async def test_rule_sub_id_well_formed_is_accepted_and_sub_stays_the_user(gw: GatewayHarness, sub_id: dict) -> None:
    body = await expect_token(gw, gw.id_jag(sub_id=sub_id))
    claims = jwt.get_unverified_claims(body["access_token"])
    assert json.loads(claims["sub"]) == [gw.idp.issuer, None, "alice"]
    assert claims["idp_sub"] == "alice"


@pytest.mark.parametrize(
    ("sub_id", "problem"),
    [
        ("alice@example.com", "not a JSON object"),
        ({"email": "alice@example.com"}, "no format"),
        ({"format": 7, "id": "x"}, "no format"),
        ({"format": "email"}, "email member"),
        ({"format": "email", "email": "alice"}, "email member"),
        ({"format": "opaque", "id": ""}, "id member"),
        ({"format": "iss_sub", "iss": "https://idp.example.com"}, "sub member"),
        ({"format": "account", "uri": "mailto:alice@example.com"}, "uri member"),
        ({"format": "phone_number", "phone_number": "555-0100"}, "phone_number member"),
        ({"format": "did", "url": "https://example.com"}, "url member"),
        ({"format": "uri", "uri": "alice"}, "uri member"),
        ({"format": "aliases", "identifiers": []}, "no identifiers"),
        ({"format": "aliases", "identifiers": [{"format": "opaque"}]}, "id member"),
        ({"format": "aliases", "identifiers": [{"format": "aliases", "identifiers": []}]}, "nests aliases"),
    ],
)
async def test_rule_sub_id_malformed_is_invalid_grant(gw: GatewayHarness, sub_id: Any, problem: str) -> None:
    body = await expect_error(gw, gw.id_jag(sub_id=sub_id), "invalid_grant")
    assert "sub_id" in body["error_description"] and problem in body["error_description"], body


async def test_rule_sub_id_naming_another_subject_of_this_issuer_is_refused(gw: GatewayHarness) -> None:
    """RFC 9493 §4: sub and sub_id identify the same subject."""
    mallory = {"format": "iss_sub", "iss": gw.idp.issuer, "sub": "mallory"}
    body = await expect_error(gw, gw.id_jag(sub_id=mallory), "invalid_grant")
    assert "another subject" in body["error_description"]
    aliased = {"format": "aliases", "identifiers": [{"format": "opaque", "id": "x"}, mallory]}
    await expect_error(gw, gw.id_jag(sub_id=aliased), "invalid_grant")
    await expect_token(gw, gw.id_jag(sub_id={**mallory, "sub": "alice"}))


async def test_rule_sub_id_does_not_stand_in_for_a_missing_sub(gw: GatewayHarness) -> None:
    claims = gw.id_jag_claims(sub_id={"format": "opaque", "id": "NameID-7f3a"})
    claims.pop("sub")
    await expect_error(gw, gw.idp.sign(claims), "invalid_grant")


# -- 10c. aud_sub and aud_tenant (the user and tenant at the resource AS) ---------------------


async def test_rule_aud_sub_and_aud_tenant_are_accepted_and_do_not_change_the_user(gw: GatewayHarness) -> None:
    body = await expect_token(gw, gw.id_jag(aud_sub="gw-user-42", aud_tenant="acme"))
    claims = jwt.get_unverified_claims(body["access_token"])
    assert json.loads(claims["sub"]) == [gw.idp.issuer, None, "alice"]
    await expect_token(gw, gw.id_jag(aud_tenant="acme"))


@pytest.mark.parametrize("name", ["aud_sub", "aud_tenant"])
@pytest.mark.parametrize("value", ["", 42, ["acme"], {"id": "acme"}], ids=["empty", "number", "array", "object"])
async def test_rule_aud_sub_and_aud_tenant_must_be_strings(gw: GatewayHarness, name: str, value: Any) -> None:
    body = await expect_error(gw, gw.id_jag(**{name: value}), "invalid_grant")
    assert name in body["error_description"]


# -- 11. time --------------------------------------------------------------------------------


async def test_rule_time_expired_assertion_is_refused(gw: GatewayHarness) -> None:
    now = int(time.time())
    await expect_error(gw, gw.id_jag(iat=now - 400, exp=now - 61), "invalid_grant")


async def test_rule_time_issued_in_the_past_within_its_lifetime_is_accepted(gw: GatewayHarness) -> None:
    now = int(time.time())
    await expect_token(gw, gw.id_jag(iat=now - 250, exp=now + 50))


async def test_gateways_draft_s4_access_token_never_outlives_the_id_jag(gw: GatewayHarness) -> None:
    now = int(time.time())
    body = await expect_token(gw, gw.id_jag(iat=now - 200, exp=now + 100))
    claims = jwt.get_unverified_claims(body["access_token"])
    assert claims["exp"] == now + 100  # not iat + the 300 s TTL
    assert body["expires_in"] == claims["exp"] - claims["iat"] <= 100
    # The token is good until then (the resource server accepts the shorter lifetime).
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {body['access_token']}"}
        async with http.post(gw.route_url("json"), json={"jsonrpc": "2.0", "id": 1, "method": "ping"}) as response:
            assert response.status == 401
        async with http.post(
            gw.route_url("json"), json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers=headers
        ) as response:
            assert response.status != 401


async def test_gateways_draft_s4_assertion_past_its_exp_is_refused_even_within_clock_skew(gw: GatewayHarness) -> None:
    """The clock skew no longer extends exp: a token for it could not outlive it and be usable."""
    now = int(time.time())
    body = await expect_error(gw, gw.id_jag(iat=now - 300, exp=now - 30), "invalid_grant")
    assert "expired" in body["error_description"]


async def test_rule_time_missing_exp_is_refused(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.id_jag(exp=None), "invalid_grant")


async def test_rule_time_missing_iat_is_refused(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.id_jag(iat=None), "invalid_grant")


async def test_rule_time_issued_in_the_future_is_refused(gw: GatewayHarness) -> None:
    now = int(time.time())
    await expect_error(gw, gw.id_jag(iat=now + 120, exp=now + 300), "invalid_grant")


async def test_rule_time_not_before_in_the_future_is_refused(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.id_jag(nbf=int(time.time()) + 120), "invalid_grant")


async def test_rule_time_lifetime_above_maximum_is_refused(gw: GatewayHarness) -> None:
    now = int(time.time())
    body = await expect_error(gw, gw.id_jag(iat=now, exp=now + 3600), "invalid_grant")
    assert "lifetime" in body["error_description"]


@pytest.mark.parametrize("exp", ["tomorrow", True])
async def test_rule_time_non_numeric_exp_is_refused(gw: GatewayHarness, exp: Any) -> None:
    await expect_error(gw, gw.id_jag(exp=exp), "invalid_grant")


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
async def test_rule_time_non_finite_time_claim_is_refused(gw: GatewayHarness, claim: str, value: float) -> None:
    """json.dumps writes NaN / Infinity / -Infinity, which Python's json would read back."""
    body = await expect_error(gw, gw.id_jag(**{claim: value}), "invalid_grant")
    assert "JSON number" in body["error_description"]


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
@pytest.mark.parametrize("kind", ["fraction", "string", "huge", "negative"])
async def test_rule_time_claims_must_be_integer_numeric_dates(gw: GatewayHarness, claim: str, kind: str) -> None:
    now = int(time.time())
    value = {"fraction": now + 0.5, "string": str(now), "huge": 10**400, "negative": -1}[kind]
    body = await expect_error(gw, gw.id_jag(**{claim: value}), "invalid_grant")
    assert f"valid {claim}" in body["error_description"]


async def test_rule_claims_non_finite_number_anywhere_is_refused(gw: GatewayHarness) -> None:
    body = await expect_error(gw, gw.id_jag(extra={"deep": [1, float("nan")]}), "invalid_grant")
    assert "NaN is not a JSON number" in body["error_description"]


async def test_rule_claims_non_finite_number_in_the_header_is_refused(gw: GatewayHarness) -> None:
    assertion = gw.idp.sign(gw.id_jag_claims(), headers={"x": float("-inf")})
    body = await expect_error(gw, assertion, "invalid_grant")
    assert "-Infinity is not a JSON number" in body["error_description"]


# -- 12. jti and replay ----------------------------------------------------------------------


async def test_rule_jti_missing_is_refused(gw: GatewayHarness) -> None:
    body = await expect_error(gw, gw.id_jag(jti=None), "invalid_grant")
    assert "jti" in body["error_description"]


async def test_rule_jti_replay_is_refused(gw: GatewayHarness) -> None:
    assertion = gw.id_jag()
    await expect_token(gw, assertion)
    body = await expect_error(gw, assertion, "invalid_grant")
    assert "already been used" in body["error_description"]


async def test_rule_jti_refused_assertion_does_not_burn_its_jti(gw: GatewayHarness) -> None:
    claims = gw.id_jag_claims()
    await expect_error(
        gw, gw.idp.sign(claims), "invalid_grant", client_id=OTHER_CLIENT_ID, client_secret=OTHER_CLIENT_SECRET
    )
    await expect_token(gw, gw.idp.sign(claims))


async def test_rule_jti_same_value_from_another_idp_is_independent(gw: GatewayHarness, idp_rsa) -> None:
    jti = "shared-jti-value"
    await expect_token(gw, gw.id_jag(jti=jti + str(time.time())))
    claims = gw.id_jag_claims(jti=jti, iss=idp_rsa.issuer)
    await expect_token(gw, idp_rsa.sign(claims))
    await expect_token(gw, gw.id_jag(jti=jti))


# -- 13. resource ----------------------------------------------------------------------------


async def test_rule_resource_claim_must_be_a_served_resource(gw: GatewayHarness) -> None:
    body = await expect_error(gw, gw.id_jag(resource="https://elsewhere.example.com/mcp"), "invalid_grant")
    assert "resource" in body["error_description"]


async def test_rule_resource_parameter_must_be_in_the_assertion(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.id_jag("json"), "invalid_target", extra={"resource": gw.resource("sse")})


async def test_rule_resource_parameter_unknown_is_invalid_target(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.id_jag(None), "invalid_target", extra={"resource": "https://nowhere.example.com/x"})


async def test_rule_resource_absent_binds_to_the_requested_resource(gw: GatewayHarness) -> None:
    body = await expect_token(gw, gw.id_jag(None), extra={"resource": gw.resource("sse")})
    assert jwt.get_unverified_claims(body["access_token"])["aud"] == gw.resource("sse")


async def test_rule_resource_absent_everywhere_is_ambiguous_with_many_routes(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.id_jag(None), "invalid_target")


async def test_rule_resource_absent_binds_to_the_only_route(idp: DevIdentityProvider, upstream_json) -> None:
    h = await start_harness(idp, [{"name": "only", "path": "/only/mcp", "upstream": upstream_json.mcp_url}])
    try:
        body = await expect_token(h, h.id_jag(None))
        assert jwt.get_unverified_claims(body["access_token"])["aud"] == h.resource("only")
    finally:
        await h.runner.cleanup()


async def test_rule_resource_legacy_sse_endpoint_names_its_route(gw: GatewayHarness) -> None:
    """The Python SDK's resource for a legacy HTTP+SSE server is the URL it connects to, path/sse."""
    sse_url = gw.resource("legacy") + "/sse"
    body = await expect_token(gw, gw.id_jag(None, resource=sse_url), extra={"resource": sse_url})
    assert jwt.get_unverified_claims(body["access_token"])["aud"] == gw.resource("legacy")
    assert body["resource"] == sse_url


@pytest.mark.parametrize("below", ["/tools", "/sse", "/x/y"])
async def test_ema_s5_1_resource_claim_below_a_route_is_refused(gw: GatewayHarness, below: str) -> None:
    """A token must be audience-restricted to what the ID-JAG named: a path below a route is not the route."""
    narrower = gw.resource("json") + below
    body = await expect_error(gw, gw.id_jag(None, resource=narrower), "invalid_grant")
    assert "exact resource identifier" in body["error_description"]
    await expect_error(gw, gw.id_jag(None, resource=narrower), "invalid_grant", extra={"resource": narrower})
    await expect_error(gw, gw.id_jag("json"), "invalid_target", extra={"resource": narrower})
    await expect_error(gw, gw.id_jag(None), "invalid_target", extra={"resource": narrower})


async def test_draft_s4_4_2_resource_is_echoed_as_the_claim_spelled_it(gw: GatewayHarness) -> None:
    """xaa.dev appends a trailing slash; clients check the returned set is a subset of the claim."""
    slashed = gw.resource("json") + "/"
    body = await expect_token(gw, gw.id_jag(None, resource=slashed))
    assert body["resource"] == slashed
    assert jwt.get_unverified_claims(body["access_token"])["aud"] == gw.resource("json")
    body = await expect_token(gw, gw.id_jag(None, resource=slashed), extra={"resource": gw.resource("json")})
    assert body["resource"] == slashed
    upper = gw.resource("json").replace("http://", "HTTP://")
    body = await expect_token(gw, gw.id_jag(None, resource=[slashed, gw.resource("sse")]), extra={"resource": upper})
    assert body["resource"] == slashed


async def test_draft_s4_4_2_resource_is_echoed_as_the_client_sent_it(gw: GatewayHarness) -> None:
    sent = gw.resource("sse").replace("http://", "HTTP://") + "/"
    body = await expect_token(gw, gw.id_jag(None), extra={"resource": sent})
    assert body["resource"] == sent


async def test_rfc8707_s2_several_resource_parameters_naming_one_route_are_served(gw: GatewayHarness) -> None:
    spellings = [gw.resource("json"), gw.resource("json") + "/"]
    body = await expect_token(gw, gw.id_jag(None), extra_pairs=[("resource", r) for r in spellings])
    assert body["resource"] == spellings
    assert jwt.get_unverified_claims(body["access_token"])["aud"] == gw.resource("json")
    body = await expect_token(gw, gw.id_jag("json"), extra_pairs=[("resource", r) for r in spellings])
    assert body["resource"] == gw.resource("json")


async def test_rfc8707_s2_several_resource_parameters_naming_two_routes_are_invalid_target(gw: GatewayHarness) -> None:
    both = [("resource", gw.resource("json")), ("resource", gw.resource("sse"))]
    body = await expect_error(gw, gw.id_jag(None), "invalid_target", extra_pairs=both)
    assert "more than one route" in body["error_description"]
    claim = [gw.resource("json"), gw.resource("sse")]
    await expect_error(gw, gw.id_jag(None, resource=claim), "invalid_target", extra_pairs=both)
    unknown = [("resource", gw.resource("json")), ("resource", "https://nowhere.example.com/mcp")]
    await expect_error(gw, gw.id_jag(None), "invalid_target", extra_pairs=unknown)


@pytest.mark.parametrize(
    "spelling",
    [
        "{base}/%6Aso%6E/mcp",  # unreserved characters percent-encoded (§6.2.2.2)
        "{base}/json/./mcp",  # dot segments (§6.2.2.3)
        "{base}/eng/../json/mcp",
        "{base}/json/mcp/extra/..",
        "{base}/json/%2e/mcp",
        "{scheme}://{HOST}/json/mcp",  # case (§6.2.2.1)
    ],
)
async def test_rfc3986_s6_2_2_resource_is_normalised_before_matching(gw: GatewayHarness, spelling: str) -> None:
    scheme, _, host = gw.url.partition("://")
    value = spelling.format(base=gw.url, scheme=scheme.upper(), HOST=host.upper())
    body = await expect_token(gw, gw.id_jag(None), extra={"resource": value})
    assert jwt.get_unverified_claims(body["access_token"])["aud"] == gw.resource("json")
    assert body["resource"] == value
    await expect_token(gw, gw.id_jag(None, resource=value))


@pytest.mark.parametrize(
    "spelling",
    [
        "{base}/JSON/mcp",  # the path is case-sensitive
        "{base}/json%2Fmcp",  # a reserved character stays encoded
        "{base}/json/mcp//",  # only one trailing slash is tolerated
        "{base}/json/mcp/.%2e/x",
    ],
)
async def test_rfc3986_s6_2_2_normalisation_does_not_merge_different_resources(
    gw: GatewayHarness, spelling: str
) -> None:
    value = spelling.format(base=gw.url)
    await expect_error(gw, gw.id_jag(None), "invalid_target", extra={"resource": value})
    await expect_error(gw, gw.id_jag(None, resource=value), "invalid_grant")


async def test_rule_resource_array_with_request_parameter_selects_one(gw: GatewayHarness) -> None:
    both = [gw.resource("json"), gw.resource("sse")]
    await expect_error(gw, gw.id_jag(None, resource=both), "invalid_target")
    body = await expect_token(gw, gw.id_jag(None, resource=both), extra={"resource": gw.resource("sse")})
    assert jwt.get_unverified_claims(body["access_token"])["aud"] == gw.resource("sse")


async def test_rule_resource_malformed_claim_is_refused(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.id_jag(None, resource={"url": "x"}), "invalid_grant")


def spelled_with(resource: str, kind: str) -> str:
    """``resource`` with a fragment or userinfo that canonical_url would drop or ignore."""
    scheme, _, rest = resource.partition("://")
    return {
        "fragment": resource + "#section",
        "empty-fragment": resource + "#",
        "user": f"{scheme}://alice@{rest}",
        "user-password": f"{scheme}://alice:secret@{rest}",
    }[kind]


ODD_SPELLINGS = ["fragment", "empty-fragment", "user", "user-password"]


@pytest.mark.parametrize("kind", ODD_SPELLINGS)
async def test_rfc8707_s2_resource_parameter_with_fragment_or_userinfo_is_invalid_target(
    gw: GatewayHarness, kind: str
) -> None:
    body = await expect_error(
        gw, gw.id_jag("json"), "invalid_target", extra={"resource": spelled_with(gw.resource("json"), kind)}
    )
    assert ("fragment" if "fragment" in kind else "userinfo") in body["error_description"]


@pytest.mark.parametrize("kind", ODD_SPELLINGS)
async def test_rfc8707_s2_resource_claim_with_fragment_or_userinfo_is_invalid_grant(
    gw: GatewayHarness, kind: str
) -> None:
    odd = spelled_with(gw.resource("json"), kind)
    body = await expect_error(gw, gw.id_jag(None, resource=[gw.resource("sse"), odd]), "invalid_grant")
    assert ("fragment" if "fragment" in kind else "userinfo") in body["error_description"]
    await expect_error(gw, gw.id_jag(None, resource=odd), "invalid_grant", extra={"resource": gw.resource("json")})


async def test_rule_resource_that_is_not_a_url_is_refused_not_a_500(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.id_jag(None), "invalid_target", extra={"resource": "http://[::1/json/mcp"})
    await expect_error(gw, gw.id_jag(None, resource="http://[::1/json/mcp"), "invalid_grant")


# -- 14. scope -------------------------------------------------------------------------------


async def test_rule_scope_claim_outside_the_route_is_refused(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.id_jag(scope="payroll:write"), "invalid_grant")


async def test_rule_scope_is_the_intersection_with_the_request(gw: GatewayHarness) -> None:
    body = await expect_token(gw, gw.id_jag("eng", scope="mcp mcp:admin"), extra={"scope": "mcp:admin other"})
    assert body["scope"] == "mcp:admin"


async def test_rule_scope_never_exceeds_the_assertion(gw: GatewayHarness) -> None:
    body = await expect_token(gw, gw.id_jag("eng", scope="mcp"), extra={"scope": "mcp mcp:admin"})
    assert body["scope"] == "mcp"


async def test_rule_scope_request_disjoint_from_grant_is_invalid_scope(gw: GatewayHarness) -> None:
    await expect_error(gw, gw.id_jag("eng", scope="mcp"), "invalid_scope", extra={"scope": "mcp:admin"})


async def test_ema_s7_2_1_scope_less_id_jag_gets_the_default_scopes_not_every_scope(gw: GatewayHarness) -> None:
    body = await expect_token(gw, gw.id_jag("eng", scope=None))
    assert body["scope"] == "mcp"  # the route's first scope: it has no default_scopes
    await expect_error(gw, gw.id_jag("eng", scope=None), "invalid_scope", extra={"scope": "mcp:admin"})
    body = await expect_token(gw, gw.id_jag("eng", scope=None), extra={"scope": "mcp mcp:admin"})
    assert body["scope"] == "mcp"


async def test_ema_s7_2_1_scope_less_id_jag_gets_the_configured_default_scopes(
    idp: DevIdentityProvider, upstream_json
) -> None:
    route = {"name": "r", "path": "/r/mcp", "upstream": upstream_json.mcp_url, "scopes": ["read", "write", "admin"]}
    async with running_gateway(idp, [{**route, "default_scopes": ["read", "write"]}]) as h:
        body = await expect_token(h, h.id_jag("r", scope=None))
        assert body["scope"] == "read write"
        body = await expect_token(h, h.id_jag("r", scope=None), extra={"scope": "write admin"})
        assert body["scope"] == "write"
        body = await expect_token(h, h.id_jag("r", scope="admin"))  # what the IdP names is granted
        assert body["scope"] == "admin"


# -- 15. cnf (DPoP) --------------------------------------------------------------------------


async def test_rule_cnf_bound_assertion_without_a_dpop_proof_is_refused(gw: GatewayHarness) -> None:
    """With a proof by the bound key it is redeemed (tests/test_dpop.py)."""
    body = await expect_error(
        gw, gw.id_jag(cnf={"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}), "invalid_grant"
    )
    assert "cnf" in body["error_description"]


# -- authorization_details (RAR) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "details",
    [[{"type": "mcp_tool", "actions": ["read"], "locations": ["https://mcp.example.com/json/mcp"]}], []],
    ids=["restricting", "empty"],
)
async def test_draft_s4_4_1_authorization_details_is_refused_not_ignored(gw: GatewayHarness, details: list) -> None:
    """An IdP that restricted access only through RAR must not have its ID-JAG widened to every scope."""
    claims = gw.id_jag_claims("eng", scope=None, authorization_details=details)
    body = await expect_error(gw, gw.idp.sign(claims), "invalid_grant")
    assert "authorization_details" in body["error_description"]
    await expect_token(gw, gw.id_jag("eng", scope=None))  # the same grant without RAR


# -- 16. tenant ------------------------------------------------------------------------------


async def test_rule_tenant_must_match_the_configured_tenant(idp: DevIdentityProvider, upstream_json) -> None:
    h = await start_harness(
        idp,
        [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}],
        authorization={"identity_providers": [{"issuer": idp.issuer, "tenant": "acme"}]},
    )
    try:
        await expect_error(h, h.id_jag(tenant="globex"), "invalid_grant")
        await expect_error(h, h.id_jag(), "invalid_grant")
        await expect_token(h, h.id_jag(tenant="acme"))
    finally:
        await h.runner.cleanup()


# -- groups ----------------------------------------------------------------------------------


async def test_rule_groups_user_outside_allow_groups_is_refused(gw: GatewayHarness) -> None:
    body = await expect_error(gw, gw.id_jag("eng", user="bob"), "invalid_grant")
    assert "group" in body["error_description"]
    await expect_token(gw, gw.id_jag("eng", user="alice"))


# -- 18. no tokens in logs ------------------------------------------------------------------


async def test_rule_logging_never_contains_assertions_or_tokens(gw: GatewayHarness, caplog) -> None:
    caplog.set_level("DEBUG")
    assertion = gw.id_jag()
    body = await expect_token(gw, assertion)
    await expect_error(gw, assertion, "invalid_grant")
    await expect_error(gw, gw.id_jag(), "invalid_client", 401, client_secret="wrong-secret-0123456789")
    text = caplog.text
    assert caplog.records, "expected the gateway to log its decisions"
    for secret in (assertion, body["access_token"], "test-agent-secret-0123456789", "wrong-secret-0123456789"):
        assert secret not in text
    assert assertion.split(".")[2] not in text
