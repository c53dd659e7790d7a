"""Every answer of the token endpoint that is not a token is RFC 6749 §5.2 JSON with no-store.

That includes the refusals made before the endpoint proper (a foreign ``Origin``, a method other than
POST) and the 503 a client should retry, whose code is documented (README "Decisions").
"""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from gateway.devidp import DevIdentityProvider
from tests.support.harness import CLIENT_ID, CLIENT_SECRET, JWT_BEARER, GatewayHarness, running_gateway

REGISTERED_ERRORS = {
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "invalid_target",  # RFC 8707 §2
    "temporarily_unavailable",  # RFC 6749 §4.1.2.1, for 429 and 503 (README)
}


async def call(method: str, url: str, **kwargs: Any) -> tuple[int, dict[str, Any], Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, **kwargs) as response:
            assert response.content_type == "application/json", await response.text()
            return response.status, await response.json(), response.headers


def assert_rfc6749_error(body: dict[str, Any], headers: Any) -> None:
    assert body["error"] in REGISTERED_ERRORS
    assert isinstance(body["error_description"], str) and body["error_description"]
    assert set(body) == {"error", "error_description"}
    assert headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS"])
async def test_rfc6749_s3_2_token_endpoint_answers_other_methods_405_with_allow_post(
    gw: GatewayHarness, method: str
) -> None:
    status, body, headers = await call(method, gw.token_endpoint)
    assert status == 405
    assert headers["Allow"] == "POST"
    assert_rfc6749_error(body, headers)


async def test_rfc6749_s5_2_origin_refusal_is_an_oauth_error(gw: GatewayHarness) -> None:
    form = {"grant_type": JWT_BEARER, "assertion": gw.id_jag(), "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    status, body, headers = await call("POST", gw.token_endpoint, data=form, headers={"Origin": "https://evil.test"})
    assert status == 403
    assert body["error"] == "invalid_request"
    assert_rfc6749_error(body, headers)


@pytest.mark.parametrize(
    "case",
    ["json-body", "no-client-auth", "bad-grant-type", "bad-assertion", "bad-scope", "bad-resource", "huge-body"],
)
async def test_rfc6749_s5_2_every_refusal_is_json_with_no_store(gw: GatewayHarness, case: str) -> None:
    auth = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    good = {"grant_type": JWT_BEARER, "assertion": gw.id_jag(), **auth}
    request = {
        "json-body": {"json": good},
        "no-client-auth": {"data": {"grant_type": JWT_BEARER, "assertion": gw.id_jag()}},
        "bad-grant-type": {"data": {**good, "grant_type": "password"}},
        "bad-assertion": {"data": {**good, "assertion": "x.y.z"}},
        "bad-scope": {"data": {**good, "scope": "nothing-here"}},
        "bad-resource": {"data": {**good, "resource": "https://elsewhere.test/mcp"}},
        "huge-body": {"data": {**good, "pad": "x" * 70_000}},
    }[case]
    status, body, headers = await call("POST", gw.token_endpoint, **request)
    assert status in (400, 401)
    assert_rfc6749_error(body, headers)


async def test_rfc6749_s5_2_unavailable_dependency_is_503_temporarily_unavailable(
    idp: DevIdentityProvider, upstream_json
) -> None:
    """The IdP's JWKS cannot be fetched: the documented 503 code, with Retry-After."""
    idps = [{"issuer": "https://idp.test", "jwks_uri": "http://127.0.0.1:9/jwks"}]
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    async with running_gateway(idp, routes, authorization={"identity_providers": idps}) as h:
        signed = idp.sign(h.id_jag_claims(iss="https://idp.test"))
        form = {"grant_type": JWT_BEARER, "assertion": signed, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        status, body, headers = await call("POST", h.token_endpoint, data=form)
    assert status == 503
    assert body["error"] == "temporarily_unavailable"
    assert int(headers["Retry-After"]) > 0
    assert_rfc6749_error(body, headers)
