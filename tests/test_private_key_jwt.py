"""private_key_jwt client authentication (RFC 7523 §2.2 and §3; EMA §7.5.1 SHOULD).

Clients sign their assertions with real EC keys; their public keys are in the config (``jwks``) or
served by a real loopback JWKS endpoint (``jwks_uri``). The official TypeScript SDK client signs with
its own ``createPrivateKeyJwtAuth``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from jose import jwk, jws

from gateway.config import ConfigError, parse_config
from gateway.devidp import DevClient, DevIdentityProvider
from tests.support.harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    IDP_CLIENT_ID,
    IDP_CLIENT_SECRET,
    JWT_BEARER,
    GatewayHarness,
    running_gateway,
)
from tests.support.loopback import serve_app
from tests.support.node import run_xaa_client

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
INLINE_CLIENT = "agent-inline-key"
REMOTE_CLIENT = "agent-remote-key"


@dataclass
class ClientKey:
    """A client's EC P-256 key pair, as a client would hold it."""

    private: Any
    kid: str

    @classmethod
    def generate(cls) -> ClientKey:
        return cls(jwk.construct(ec.generate_private_key(ec.SECP256R1()), "ES256"), uuid.uuid4().hex)

    @property
    def public_jwk(self) -> dict[str, Any]:
        return {**self.private.public_key().to_dict(), "kid": self.kid, "use": "sig"}

    @property
    def private_jwk(self) -> dict[str, Any]:
        return {**self.private.to_dict(), "kid": self.kid}

    def assertion(self, client_id: str, aud: Any, *, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": client_id, "sub": client_id, "aud": aud, "iat": now, "exp": now + 60, "jti": uuid.uuid4().hex}
        for name, value in claims.items():
            if value is None:
                body.pop(name, None)
            else:
                body[name] = value
        header = {"kid": self.kid, "typ": "JWT", **(headers or {})}
        return jws.sign(json.dumps(body).encode(), self.private, headers=header, algorithm="ES256")


INLINE_KEY, REMOTE_KEY = ClientKey.generate(), ClientKey.generate()


@pytest.fixture(scope="module")
async def key_idp() -> AsyncIterator[DevIdentityProvider]:
    """An IdP that knows the key-authenticated client by its gateway client_id (draft §5)."""
    provider = DevIdentityProvider(clients=(DevClient(IDP_CLIENT_ID, IDP_CLIENT_SECRET, INLINE_CLIENT),))
    await provider.start()
    try:
        yield provider
    finally:
        await provider.stop()


@pytest.fixture(scope="module")
async def key_gw(key_idp: DevIdentityProvider, upstream_json) -> AsyncIterator[GatewayHarness]:
    """A gateway with a secret client, a client with an inline jwks and one with a jwks_uri."""
    idp = key_idp

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": [REMOTE_KEY.public_jwk]})

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    async with serve_app(app) as base:
        clients = [
            {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
            {"client_id": INLINE_CLIENT, "jwks": {"keys": [INLINE_KEY.public_jwk]}},
            {"client_id": REMOTE_CLIENT, "jwks_uri": base + "/jwks"},
        ]
        routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
        async with running_gateway(idp, routes, authorization={"clients": clients}) as harness:
            yield harness


async def grant(
    h: GatewayHarness, who: str, assertion: str, *, id_jag_client: str | None = None, **extra: str
) -> tuple[int, dict[str, Any]]:
    """A jwt-bearer grant for ``who``, authenticated by ``assertion``; ``extra`` adds or replaces fields."""
    form = {
        "grant_type": JWT_BEARER,
        "assertion": h.id_jag(client_id=id_jag_client or who),
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
        **extra,
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(h.token_endpoint, data=form) as response:
            assert response.headers["Cache-Control"] == "no-store"
            return response.status, await response.json()


@pytest.mark.parametrize(("client_id", "key"), [(INLINE_CLIENT, INLINE_KEY), (REMOTE_CLIENT, REMOTE_KEY)])
async def test_rfc7523_s2_2_private_key_jwt_authenticates_the_client(
    key_gw: GatewayHarness, client_id: str, key: ClientKey
) -> None:
    for aud in (key_gw.issuer, key_gw.token_endpoint, [key_gw.issuer]):
        status, body = await grant(key_gw, client_id, key.assertion(client_id, aud))
        assert status == 200, body
    # The ID-JAG's client_id claim is still compared with the client the assertion authenticated.
    status, body = await grant(key_gw, client_id, key.assertion(client_id, key_gw.issuer), id_jag_client=CLIENT_ID)
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_rfc8414_s2_metadata_advertises_private_key_jwt(key_gw: GatewayHarness) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(key_gw.url + "/.well-known/oauth-authorization-server") as response:
            metadata = await response.json()
    assert "private_key_jwt" in metadata["token_endpoint_auth_methods_supported"]
    assert "ES256" in metadata["token_endpoint_auth_signing_alg_values_supported"]
    assert "none" not in metadata["token_endpoint_auth_signing_alg_values_supported"]


def _hs256(client_id: str, aud: str) -> str:
    """The key-confusion attack: HS256 keyed with the client's public JWK."""
    secret = json.dumps(INLINE_KEY.public_jwk).encode()
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": aud, "exp": now + 60, "jti": uuid.uuid4().hex}
    return jws.sign(json.dumps(claims).encode(), secret, headers={"kid": INLINE_KEY.kid}, algorithm="HS256")


REFUSED = {
    "wrong-aud": lambda h: INLINE_KEY.assertion(INLINE_CLIENT, "https://other-as.test"),
    "no-aud": lambda h: INLINE_KEY.assertion(INLINE_CLIENT, None),
    "iss-not-sub": lambda h: INLINE_KEY.assertion(INLINE_CLIENT, h.issuer, iss="someone-else"),
    "unknown-client": lambda h: INLINE_KEY.assertion("nobody", h.issuer),
    "secret-client": lambda h: INLINE_KEY.assertion(CLIENT_ID, h.issuer),
    "other-clients-key": lambda h: REMOTE_KEY.assertion(INLINE_CLIENT, h.issuer, headers={"kid": INLINE_KEY.kid}),
    "expired": lambda h: INLINE_KEY.assertion(INLINE_CLIENT, h.issuer, exp=int(time.time()) - 120),
    "no-exp": lambda h: INLINE_KEY.assertion(INLINE_CLIENT, h.issuer, exp=None),
    "iat-in-future": lambda h: INLINE_KEY.assertion(INLINE_CLIENT, h.issuer, iat=int(time.time()) + 600),
    "too-long": lambda h: INLINE_KEY.assertion(INLINE_CLIENT, h.issuer, exp=int(time.time()) + 7200),
    "no-jti": lambda h: INLINE_KEY.assertion(INLINE_CLIENT, h.issuer, jti=None),
    "hs256": lambda h: _hs256(INLINE_CLIENT, h.issuer),
    "id-jag-typ": lambda h: INLINE_KEY.assertion(INLINE_CLIENT, h.issuer, headers={"typ": "oauth-id-jag+jwt"}),
    "garbage": lambda h: "not.a.jwt",
}


@pytest.mark.parametrize("case", REFUSED)
async def test_rfc7523_s3_invalid_client_assertion_is_invalid_client(key_gw: GatewayHarness, case: str) -> None:
    client_id = CLIENT_ID if case == "secret-client" else INLINE_CLIENT
    status, body = await grant(key_gw, client_id, REFUSED[case](key_gw))
    assert (status, body["error"]) == (401, "invalid_client"), body


async def test_rfc7523_s3_client_assertion_is_single_use(key_gw: GatewayHarness) -> None:
    assertion = INLINE_KEY.assertion(INLINE_CLIENT, key_gw.issuer)
    assert (await grant(key_gw, INLINE_CLIENT, assertion))[0] == 200
    status, body = await grant(key_gw, INLINE_CLIENT, assertion)
    assert (status, body["error"]) == (401, "invalid_client")
    assert "already been used" in body["error_description"]


@pytest.mark.parametrize(
    "extra",
    [
        {"client_secret": CLIENT_SECRET},  # two methods at once
        {"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:saml2-bearer"},
        {"client_id": REMOTE_CLIENT},  # RFC 7521 §4.2: must be the asserted client
    ],
    ids=["two-methods", "wrong-assertion-type", "other-client-id"],
)
async def test_rfc7521_s4_2_malformed_client_authentication_is_invalid_request(
    key_gw: GatewayHarness, extra: dict[str, str]
) -> None:
    status, body = await grant(key_gw, INLINE_CLIENT, INLINE_KEY.assertion(INLINE_CLIENT, key_gw.issuer), **extra)
    assert (status, body["error"]) == (400, "invalid_request"), body


def _config(client: dict[str, Any]) -> dict[str, Any]:
    return {
        "public_url": "https://mcp.example.com",
        "authorization": {"clients": [client], "identity_providers": [{"issuer": "https://idp.example.com"}]},
        "routes": [{"name": "r", "path": "/r/mcp", "upstream": "http://upstream:3000/mcp"}],
    }


@pytest.mark.parametrize(
    ("client", "key", "problem"),
    [
        (
            {"client_id": "a", "jwks": {"keys": [INLINE_KEY.private_jwk]}},
            "jwks.keys[0]",
            "is a private key",
        ),
        ({"client_id": "a", "jwks": {"keys": []}}, "jwks", "must be a JWK Set"),
        ({"client_id": "a", "jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}}, "jwks.keys[0]", "RSA or EC"),
        ({"client_id": "a", "jwks": {"keys": [{"kty": "EC", "crv": "P-256", "x": "AA"}]}}, "jwks.keys[0]", "usable"),
        (
            {"client_id": "a", "jwks_uri": "http://keys.example.com/a.json"},
            "jwks_uri",
            "must be an https URL",
        ),
        (
            {"client_id": "a", "client_secret": CLIENT_SECRET, "jwks_uri": "https://keys.example.com/a.json"},
            "client_secret",
            "set exactly one of",
        ),
    ],
)
def test_private_key_jwt_client_config_is_validated(client: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(client), source="gw.yaml")
    assert caught.value.key == f"authorization.clients[0].{key}"
    assert problem in caught.value.problem


async def test_rfc7523_s2_2_typescript_sdk_client_with_private_key_jwt(key_gw: GatewayHarness) -> None:
    """The official TS SDK's CrossAppAccessProvider with its createPrivateKeyJwtAuth signer."""
    result = await run_xaa_client(
        {
            "MCP_URL": key_gw.route_url("json"),
            "IDP_TOKEN_ENDPOINT": key_gw.idp.token_endpoint,
            "ID_TOKEN": key_gw.idp.issue_id_token("alice", IDP_CLIENT_ID),
            "IDP_CLIENT_ID": IDP_CLIENT_ID,
            "IDP_CLIENT_SECRET": IDP_CLIENT_SECRET,
            "CLIENT_ID": INLINE_CLIENT,
            "CLIENT_PRIVATE_KEY_JWK": json.dumps(INLINE_KEY.private_jwk),
            "EXPECTED_ISSUER": key_gw.issuer,
        }
    )
    assert result["ok"] is True, result
    (token_request,) = [r for r in result["requests"] if r.get("grantType") == JWT_BEARER]
    assert token_request["status"] == 200
    assert {"client_assertion", "client_assertion_type"} <= set(token_request["formKeys"])
    assert "client_secret" not in token_request["formKeys"] and "authScheme" not in token_request
