"""ID-JAGs shaped as identity providers issue them in the field, redeemed end to end.

Each is minted with a loopback IdP's real key and carries every claim such an IdP adds beyond the ones
the gateway needs (authentication context, profile, subject identifiers): the gateway must tolerate
them, keep the user the IdP's ``iss`` + ``sub``, and the access token must work at the MCP route.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import aiohttp
from jose import jwt

from gateway.devidp import DevIdentityProvider
from tests.support.harness import CLIENT_ID, GatewayHarness
from tests.support.mcp_http import ACCEPT, initialize_request, read_response


def okta_xaa_claims(gw: GatewayHarness, issuer: str, **extra: Any) -> dict[str, Any]:
    """Cross App Access (XAA) shape, after the draft's §3.1 example: ``aud`` and ``resource`` with a
    trailing slash, an Okta user id as ``sub``, authentication context and profile claims."""
    now = int(time.time())
    return {
        "jti": "ID.jag-" + uuid.uuid4().hex,
        "iss": issuer,
        "sub": "00u8k2f3nqXyZ1a2b3c4",
        "aud": gw.issuer + "/",
        "client_id": CLIENT_ID,
        "exp": now + 300,
        "iat": now,
        "resource": gw.resource("json") + "/",
        "scope": "mcp",
        "auth_time": now - 120,
        "amr": ["pwd", "mfa", "otp"],
        "acr": "urn:okta:loa:2fa:any",
        "email": "alice@example.com",
        "name": "Alice Example",
        "ver": 1,
        "groups": ["engineering"],
        **extra,
    }


async def redeem(gw: GatewayHarness, assertion: str) -> dict[str, Any]:
    status, body, _ = await gw.token_request(assertion)
    assert status == 200, body
    return body


async def initialize(gw: GatewayHarness, access_token: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {access_token}", "Accept": ACCEPT}
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.route_url("json"), json=initialize_request(), headers=headers) as response:
            assert response.status == 200, await response.text()
            return await asyncio.wait_for(read_response(response, 1), 10)


async def test_okta_xaa_id_jag_is_redeemed_and_its_token_works(
    gw: GatewayHarness, idp_rsa: DevIdentityProvider
) -> None:
    claims = okta_xaa_claims(gw, idp_rsa.issuer)
    body = await redeem(gw, idp_rsa.sign(claims))
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "mcp"
    assert body["resource"] == gw.resource("json") + "/"  # echoed as the claim spelled it
    token = jwt.get_unverified_claims(body["access_token"])
    assert token["aud"] == gw.resource("json")
    assert json.loads(token["sub"]) == [idp_rsa.issuer, None, "00u8k2f3nqXyZ1a2b3c4"]
    assert token["email"] == "alice@example.com"
    assert token["exp"] <= claims["exp"]
    assert "result" in await initialize(gw, body["access_token"])


async def test_saml_resource_app_id_jag_with_sub_id_keeps_sub_as_the_user(
    gw: GatewayHarness, idp_rsa: DevIdentityProvider
) -> None:
    """For a resource app federated by SAML the IdP adds the NameID as an RFC 9493 ``sub_id``, and
    ``aud_sub`` / ``aud_tenant`` (the user and tenant at the resource AS). The same user with and
    without them is one principal: same access token ``sub``."""
    saml = {
        "sub_id": {
            "format": "aliases",
            "identifiers": [
                {"format": "opaque", "id": "alice.nameid.7f3a"},
                {"format": "email", "email": "alice@example.com"},
            ],
        },
        "aud_sub": "gw-account-42",
        "aud_tenant": "acme",
    }
    with_saml = await redeem(gw, idp_rsa.sign(okta_xaa_claims(gw, idp_rsa.issuer, **saml)))
    without = await redeem(gw, idp_rsa.sign(okta_xaa_claims(gw, idp_rsa.issuer)))
    subjects = {jwt.get_unverified_claims(b["access_token"])["sub"] for b in (with_saml, without)}
    assert subjects == {json.dumps([idp_rsa.issuer, None, "00u8k2f3nqXyZ1a2b3c4"], separators=(",", ":"))}
    assert "result" in await initialize(gw, with_saml["access_token"])
