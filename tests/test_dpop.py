"""DPoP (RFC 9449) end to end: proofs at the token endpoint bind the access token to the client's key
(``token_type: DPoP``, ``cnf.jkt``), and every request with such a token needs a fresh proof by that
key for that request; ``require_dpop`` routes accept nothing else; server nonces on demand.

The gateway runs behind a public URL that differs from the loopback address the tests reach it on
(as behind an ingress), so every accepted proof shows ``htu`` is checked against the URL the client
sees. Proofs are real JWS built by tests/support/dpop.py with python-jose.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import pytest
from jose import jwt

from gateway.config import ConfigError, describe, parse_config
from gateway.devidp import DevIdentityProvider
from gateway.oauth.dpop import NONCE_WINDOW_SECONDS, NonceIssuer
from tests.support.dpop import DpopKey, ath
from tests.support.harness import CLIENT_ID, CLIENT_SECRET, GatewayHarness, running_gateway
from tests.support.mcp_http import ACCEPT, INITIALIZED, initialize_request, tool_call
from tests.support.upstreams import RunningUpstream

PUBLIC_URL = "https://mcp.example.com"
TOKEN_URL = PUBLIC_URL + "/oauth2/token"


def routes(upstream: RunningUpstream) -> list[dict[str, Any]]:
    return [
        {"name": "json", "path": "/json/mcp", "upstream": upstream.mcp_url},
        {"name": "bound", "path": "/bound/mcp", "upstream": upstream.mcp_url, "require_dpop": True},
        {
            "name": "scoped",
            "path": "/scoped/mcp",
            "upstream": upstream.mcp_url,
            "scopes": ["mcp", "mcp:admin"],
            "require_scopes": {"tools/call": ["mcp:admin"]},
        },
    ]


@pytest.fixture(scope="module")
async def dgw(idp: DevIdentityProvider, upstream_json: RunningUpstream) -> AsyncIterator[GatewayHarness]:
    async with running_gateway(idp, routes(upstream_json), public_url=PUBLIC_URL) as harness:
        yield harness


@pytest.fixture(scope="module")
async def nonce_gw(idp: DevIdentityProvider, upstream_json: RunningUpstream) -> AsyncIterator[GatewayHarness]:
    async with running_gateway(
        idp, routes(upstream_json), public_url=PUBLIC_URL, authorization={"dpop": {"require_nonce": True}}
    ) as harness:
        yield harness


async def dpop_grant(
    gw: GatewayHarness, key: DpopKey | None, route: str = "json", *, proof: str | None = None, **claims: Any
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A token request for ``route`` with a proof by ``key`` (or ``proof`` as given; neither: none)."""
    if proof is None and key is not None:
        proof = key.proof("POST", TOKEN_URL)
    headers = {"DPoP": proof} if proof is not None else {}
    return await gw.token_request(gw.id_jag(route, **claims), headers=headers)


async def dpop_token(gw: GatewayHarness, key: DpopKey, route: str = "json") -> str:
    status, body, _ = await dpop_grant(gw, key, route)
    assert status == 200, body
    assert body["token_type"] == "DPoP"
    return body["access_token"]


async def call(
    http: aiohttp.ClientSession,
    gw: GatewayHarness,
    route: str,
    authorization: str | None,
    proofs: Sequence[str] = (),
    message: dict[str, Any] | None = None,
    **headers: str,
) -> tuple[int, dict[str, str], str]:
    """POST one MCP message to ``route`` with the given Authorization and DPoP header values."""
    sent: list[tuple[str, str]] = [("Accept", ACCEPT), *headers.items()]
    if authorization is not None:
        sent.append(("Authorization", authorization))
    sent.extend(("DPoP", proof) for proof in proofs)
    async with http.post(gw.route_url(route), json=message or initialize_request(), headers=sent) as response:
        return response.status, dict(response.headers), await response.text()


def proof_for(key: DpopKey, gw: GatewayHarness, route: str, token: str, **options: Any) -> str:
    """A proof for POST to ``route`` as the client sees it (the public URL)."""
    return key.proof("POST", gw.resource(route), access_token=token, **options)


def challenge_error(headers: dict[str, str]) -> str:
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith("DPoP "), challenge
    assert 'algs="' in challenge and "resource_metadata=" in challenge, challenge
    return challenge.split('error="', 1)[1].split('"', 1)[0]


# -- the happy path ----------------------------------------------------------------------------------


async def test_a_proof_at_the_token_endpoint_binds_the_token_and_each_request_proves_the_key(
    dgw: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    key = DpopKey()
    token = await dpop_token(dgw, key)
    assert jwt.get_unverified_claims(token)["cnf"] == {"jkt": key.jkt}

    status, headers, text = await call(http, dgw, "json", f"DPoP {token}", [proof_for(key, dgw, "json", token)])
    assert status == 200, text
    session_id = headers["Mcp-Session-Id"]
    # A second request needs a proof of its own (new jti), for the same token.
    status, _, text = await call(
        http,
        dgw,
        "json",
        f"DPoP {token}",
        [proof_for(key, dgw, "json", token)],
        INITIALIZED,
        **{"Mcp-Session-Id": session_id, "MCP-Protocol-Version": "2025-11-25"},
    )
    assert status == 202, text


async def test_without_a_proof_the_token_stays_a_bearer_token(dgw: GatewayHarness) -> None:
    status, body, _ = await dpop_grant(dgw, None)
    assert status == 200 and body["token_type"] == "Bearer", body
    assert "cnf" not in jwt.get_unverified_claims(body["access_token"])


# -- refusals at the resource ------------------------------------------------------------------------


async def test_a_bound_token_is_never_accepted_as_a_bearer_token(
    dgw: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    key = DpopKey()
    token = await dpop_token(dgw, key)
    status, headers, _ = await call(http, dgw, "json", f"Bearer {token}", [proof_for(key, dgw, "json", token)])
    assert status == 401
    assert challenge_error(headers) == "invalid_token"


async def test_an_unbound_token_cannot_be_sent_with_the_dpop_scheme(
    dgw: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    key = DpopKey()
    token = await dgw.access_token("json")
    status, headers, _ = await call(http, dgw, "json", f"DPoP {token}", [proof_for(key, dgw, "json", token)])
    assert status == 401
    assert challenge_error(headers) == "invalid_token"


def _rejections() -> dict[str, Any]:
    """name -> a function (key, other key, gateway, token) giving the DPoP header values to send."""
    now = int(time.time())
    return {
        "proof by another key": lambda k, o, gw, t: [proof_for(o, gw, "json", t)],
        "signature by another key": lambda k, o, gw, t: [proof_for(k, gw, "json", t, sign_with=o)],
        "wrong htm": lambda k, o, gw, t: [k.proof("GET", gw.resource("json"), access_token=t)],
        "wrong htu (another route)": lambda k, o, gw, t: [k.proof("POST", gw.resource("bound"), access_token=t)],
        "wrong htu (the internal address)": lambda k, o, gw, t: [k.proof("POST", gw.route_url("json"), access_token=t)],
        "stale iat": lambda k, o, gw, t: [proof_for(k, gw, "json", t, claims={"iat": now - 600})],
        "iat in the future": lambda k, o, gw, t: [proof_for(k, gw, "json", t, claims={"iat": now + 600})],
        "missing ath": lambda k, o, gw, t: [k.proof("POST", gw.resource("json"))],
        "ath of another token": lambda k, o, gw, t: [proof_for(k, gw, "json", t, claims={"ath": ath(t + "x")})],
        "missing jti": lambda k, o, gw, t: [proof_for(k, gw, "json", t, claims={"jti": None})],
        "wrong typ": lambda k, o, gw, t: [proof_for(k, gw, "json", t, header={"typ": "JWT"})],
        "no jwk": lambda k, o, gw, t: [proof_for(k, gw, "json", t, header={"jwk": None})],
        "private key in jwk": lambda k, o, gw, t: [
            proof_for(k, gw, "json", t, header={"jwk": {**k.public_jwk, "d": k.private.to_dict()["d"]}})
        ],
        "symmetric alg": lambda k, o, gw, t: [proof_for(k, gw, "json", t, header={"alg": "HS256"})],
        "no proof": lambda k, o, gw, t: [],
        "two proofs": lambda k, o, gw, t: [proof_for(k, gw, "json", t), proof_for(k, gw, "json", t)],
        "not a JWS": lambda k, o, gw, t: ["not-a-proof"],
    }


@pytest.mark.parametrize("case", sorted(_rejections()))
async def test_every_invalid_proof_is_refused(dgw: GatewayHarness, http: aiohttp.ClientSession, case: str) -> None:
    key, other = DpopKey(), DpopKey()
    token = await dpop_token(dgw, key)
    proofs = _rejections()[case](key, other, dgw, token)
    status, headers, text = await call(http, dgw, "json", f"DPoP {token}", proofs)
    assert status == 401, text
    assert challenge_error(headers) == "invalid_dpop_proof"
    # The token itself is fine: a good proof is still accepted.
    status, _, text = await call(http, dgw, "json", f"DPoP {token}", [proof_for(key, dgw, "json", token)])
    assert status == 200, text


async def test_a_replayed_proof_is_refused(dgw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    key = DpopKey()
    token = await dpop_token(dgw, key)
    proof = proof_for(key, dgw, "json", token)
    status, _, text = await call(http, dgw, "json", f"DPoP {token}", [proof])
    assert status == 200, text
    status, headers, _ = await call(http, dgw, "json", f"DPoP {token}", [proof])
    assert status == 401
    assert challenge_error(headers) == "invalid_dpop_proof"


async def test_a_bound_token_lacking_scope_gets_a_dpop_challenge(
    dgw: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    key = DpopKey()
    token = await dpop_token(dgw, key, "scoped")
    proof = proof_for(key, dgw, "scoped", token)
    status, headers, text = await call(http, dgw, "scoped", f"DPoP {token}", [proof], tool_call(1, "echo"))
    assert status == 403, text
    assert challenge_error(headers) == "insufficient_scope"


async def test_browsers_may_send_proofs_and_read_nonces(dgw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    preflight = {"Origin": PUBLIC_URL, "Access-Control-Request-Method": "POST"}
    async with http.options(dgw.route_url("json"), headers=preflight) as response:
        assert response.status == 204
        allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
        exposed = {h.strip().lower() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
    assert "dpop" in allowed
    assert "dpop-nonce" in exposed


# -- require_dpop routes -----------------------------------------------------------------------------


async def test_require_dpop_route_refuses_bearer_tokens_and_says_so(
    dgw: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    async with http.get(dgw.url + "/.well-known/oauth-protected-resource/bound/mcp") as r:
        assert (await r.json())["dpop_bound_access_tokens_required"] is True
    async with http.get(dgw.url + "/.well-known/oauth-protected-resource/json/mcp") as r:
        assert "dpop_bound_access_tokens_required" not in await r.json()

    # No bearer token is issued for it: the client learns before spending its ID-JAG.
    assertion = dgw.id_jag("bound")
    status, body, _ = await dgw.token_request(assertion)
    assert (status, body["error"]) == (400, "invalid_dpop_proof"), body
    key = DpopKey()
    status, body, _ = await dgw.token_request(assertion, headers={"DPoP": key.proof("POST", TOKEN_URL)})
    assert status == 200 and body["token_type"] == "DPoP", body
    token = body["access_token"]

    # A bearer token of another route is refused with a DPoP challenge; no token gets one too.
    status, headers, _ = await call(http, dgw, "bound", None)
    assert status == 401 and headers["WWW-Authenticate"].startswith("DPoP "), headers
    bearer = await dgw.access_token("json")
    status, headers, _ = await call(http, dgw, "bound", f"Bearer {bearer}")
    assert status == 401 and challenge_error(headers) == "invalid_token"
    status, _, text = await call(http, dgw, "bound", f"DPoP {token}", [proof_for(key, dgw, "bound", token)])
    assert status == 200, text


# -- the token endpoint ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_proof",
    [
        pytest.param(lambda k: k.proof("GET", TOKEN_URL), id="wrong htm"),
        pytest.param(lambda k: k.proof("POST", PUBLIC_URL + "/oauth2/revoke"), id="wrong htu"),
        pytest.param(lambda k: k.proof("POST", TOKEN_URL, claims={"iat": int(time.time()) - 600}), id="stale iat"),
        pytest.param(lambda k: k.proof("POST", TOKEN_URL, sign_with=DpopKey()), id="wrong key"),
        pytest.param(lambda k: "a.b.c", id="malformed"),
    ],
)
async def test_an_invalid_proof_at_the_token_endpoint_spends_nothing(dgw: GatewayHarness, make_proof: Any) -> None:
    key = DpopKey()
    assertion = dgw.id_jag("json")
    status, body, _ = await dgw.token_request(assertion, headers={"DPoP": make_proof(key)})
    assert (status, body["error"]) == (400, "invalid_dpop_proof"), body
    # The ID-JAG was not consumed by the refusal.
    status, body, _ = await dgw.token_request(assertion, headers={"DPoP": key.proof("POST", TOKEN_URL)})
    assert status == 200 and body["token_type"] == "DPoP", body


async def test_a_replayed_proof_at_the_token_endpoint_is_refused(dgw: GatewayHarness) -> None:
    key = DpopKey()
    proof = key.proof("POST", TOKEN_URL)
    assert (await dpop_grant(dgw, key, proof=proof))[0] == 200
    status, body, _ = await dpop_grant(dgw, key, proof=proof)
    assert (status, body["error"]) == (400, "invalid_dpop_proof"), body


async def test_an_id_jag_bound_to_a_key_needs_a_proof_by_that_key(dgw: GatewayHarness) -> None:
    key = DpopKey()
    bound = {"cnf": {"jkt": key.jkt}}
    status, body, _ = await dpop_grant(dgw, None, **bound)
    assert (status, body["error"]) == (400, "invalid_grant") and "cnf" in body["error_description"], body
    status, body, _ = await dpop_grant(dgw, DpopKey(), **bound)
    assert (status, body["error"]) == (400, "invalid_grant"), body
    status, body, _ = await dpop_grant(dgw, key, **bound)
    assert status == 200 and body["token_type"] == "DPoP", body
    assert jwt.get_unverified_claims(body["access_token"])["cnf"] == {"jkt": key.jkt}


async def test_an_id_jag_with_another_confirmation_method_is_refused(dgw: GatewayHarness) -> None:
    status, body, _ = await dpop_grant(dgw, DpopKey(), cnf={"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"})
    assert (status, body["error"]) == (400, "invalid_grant"), body


async def test_an_id_token_exchange_with_a_proof_gets_a_bound_token(
    idp: DevIdentityProvider, upstream_json: RunningUpstream, http: aiohttp.ClientSession
) -> None:
    """The ID-token bridge (RFC 8693) binds like the jwt-bearer grant, and honours require_dpop."""
    providers = [{"issuer": idp.issuer, "accept_id_tokens": True, "id_token_audiences": ["app-1"]}]
    options = {"public_url": PUBLIC_URL, "authorization": {"identity_providers": providers}}
    async with running_gateway(idp, routes(upstream_json), **options) as gw:

        async def exchange(route: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
            now = int(time.time())
            claims = {"iss": idp.issuer, "sub": "user-1", "aud": "app-1", "iat": now, "exp": now + 600}
            form = {
                "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token": idp.sign({**claims, "jti": uuid.uuid4().hex}, typ="JWT"),
                "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
                "resource": gw.resource(route),
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
            }
            async with http.post(gw.token_endpoint, data=form, headers=headers) as response:
                return response.status, await response.json()

        key = DpopKey()
        status, body = await exchange("json", {"DPoP": key.proof("POST", TOKEN_URL)})
        assert status == 200 and body["token_type"] == "DPoP", body
        assert jwt.get_unverified_claims(body["access_token"])["cnf"] == {"jkt": key.jkt}
        status, body = await exchange("bound", {})
        assert (status, body["error"]) == (400, "invalid_dpop_proof"), body


async def test_rsa_proofs_are_accepted_but_not_short_rsa_keys(dgw: GatewayHarness) -> None:
    key = DpopKey("RS256")
    status, body, _ = await dpop_grant(dgw, key)
    assert status == 200 and body["token_type"] == "DPoP", body
    assert jwt.get_unverified_claims(body["access_token"])["cnf"] == {"jkt": key.jkt}
    status, body, _ = await dpop_grant(dgw, DpopKey("RS256", rsa_bits=1024))
    assert (status, body["error"]) == (400, "invalid_dpop_proof"), body
    assert "2048" in body["error_description"]


async def test_metadata_lists_dpop_algorithms(dgw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    async with http.get(dgw.url + "/.well-known/oauth-authorization-server") as response:
        document = await response.json()
    assert "ES256" in document["dpop_signing_alg_values_supported"]
    assert "none" not in document["dpop_signing_alg_values_supported"]
    assert not any(alg.startswith("HS") for alg in document["dpop_signing_alg_values_supported"])


# -- server nonces -----------------------------------------------------------------------------------


async def test_nonce_required_at_the_token_endpoint(nonce_gw: GatewayHarness) -> None:
    key = DpopKey()
    assertion = nonce_gw.id_jag("json")
    status, body, headers = await nonce_gw.token_request(assertion, headers={"DPoP": key.proof("POST", TOKEN_URL)})
    assert (status, body["error"]) == (400, "use_dpop_nonce"), body
    nonce = headers["DPoP-Nonce"]
    forged = key.proof("POST", TOKEN_URL, nonce=nonce[:-2] + ("AA" if not nonce.endswith("AA") else "BB"))
    status, body, _ = await nonce_gw.token_request(assertion, headers={"DPoP": forged})
    assert (status, body["error"]) == (400, "use_dpop_nonce"), body
    status, body, headers = await nonce_gw.token_request(
        assertion, headers={"DPoP": key.proof("POST", TOKEN_URL, nonce=nonce)}
    )
    assert status == 200 and body["token_type"] == "DPoP", body
    assert headers["DPoP-Nonce"]


async def test_nonce_required_at_the_resource(nonce_gw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    key = DpopKey()
    _, _, headers = await nonce_gw.token_request(
        nonce_gw.id_jag("json"), headers={"DPoP": key.proof("POST", TOKEN_URL)}
    )
    status, body, _ = await nonce_gw.token_request(
        nonce_gw.id_jag("json"), headers={"DPoP": key.proof("POST", TOKEN_URL, nonce=headers["DPoP-Nonce"])}
    )
    assert status == 200, body
    token = body["access_token"]
    status, headers, _ = await call(http, nonce_gw, "json", f"DPoP {token}", [proof_for(key, nonce_gw, "json", token)])
    assert status == 401
    assert challenge_error(headers) == "use_dpop_nonce"
    nonce = headers["DPoP-Nonce"]
    status, _, text = await call(
        http, nonce_gw, "json", f"DPoP {token}", [proof_for(key, nonce_gw, "json", token, nonce=nonce)]
    )
    assert status == 200, text


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        ({"require_dpop": "yes"}, "routes[0].require_dpop", "must be true or false"),
        ({"authorization": {"dpop": {"require_nonce": 1}}}, "authorization.dpop.require_nonce", "true or false"),
        ({"authorization": {"dpop": {"nonce": True}}}, "authorization.dpop.nonce", "unknown key"),
    ],
)
def test_dpop_config_errors_name_the_key(data: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_document(data), source="gw.yaml")
    assert caught.value.key == key
    assert problem in caught.value.problem


def test_check_shows_the_dpop_settings() -> None:
    lines: list[str] = []
    describe(
        parse_config(config_document({"require_dpop": True, "authorization": {"dpop": {"require_nonce": True}}})),
        emit=lines.append,
    )
    assert any(line.startswith("  json: ") and "dpop=required" in line for line in lines), lines
    assert any(line.startswith("dpop: ") and "nonce" in line for line in lines), lines
    lines.clear()
    describe(parse_config(config_document({})), emit=lines.append)
    assert not any("dpop" in line for line in lines), lines


def config_document(data: dict[str, Any]) -> dict[str, Any]:
    """A minimal config; ``data`` adds route keys, and ``authorization`` keys under that name."""
    route = {"name": "json", "path": "/json/mcp", "upstream": "http://127.0.0.1:9/mcp", **data}
    route.pop("authorization", None)
    return {
        "public_url": PUBLIC_URL,
        "authorization": {
            "clients": [{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}],
            "identity_providers": [{"issuer": "https://idp.example.com"}],
            **data.get("authorization", {}),
        },
        "routes": [route],
    }


def test_a_nonce_is_valid_in_its_window_and_the_next_only() -> None:
    now = [1_000_000.0]
    nonces = NonceIssuer(b"k" * 32, clock=lambda: now[0])
    nonce = nonces.current()
    assert nonces.is_valid(nonce)
    now[0] += NONCE_WINDOW_SECONDS
    assert nonces.is_valid(nonce)
    now[0] += NONCE_WINDOW_SECONDS
    assert not nonces.is_valid(nonce)
    assert not NonceIssuer(b"x" * 32, clock=lambda: now[0]).is_valid(nonces.current())  # another key's nonce


async def test_introspection_reports_the_binding(dgw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    key = DpopKey()
    token = await dpop_token(dgw, key)
    form = {"token": token, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    async with http.post(dgw.url + "/oauth2/introspect", data=form) as response:
        body = await response.json()
    assert body["active"] is True
    assert body["token_type"] == "DPoP"
    assert body["cnf"] == {"jkt": key.jkt}
