"""The whole chain with an IdP, a client and an upstream we did not write: npm ``oauth2-mock-server`` signs
the ID token and (through our small token-exchange route, with its keys) the ID-JAG; the official
TypeScript SDK client runs ``requestJwtAuthorizationGrant`` against it and ``CrossAppAccessProvider``
against the gateway; the upstream is the official Python SDK server. The gateway knows the IdP only by its
issuer URL: keys come from its OIDC discovery document and JWKS."""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import pytest

from gateway.devidp import DevIdentityProvider
from tests.support.harness import CLIENT_ID, CLIENT_SECRET, running_gateway
from tests.support.mock_idp import MockIdp, start_mock_idp
from tests.support.node import run_xaa_client
from tests.support.upstreams import RunningUpstream

MOCK_IDP_CLIENT = "mock-idp-client"


@pytest.fixture(scope="module")
def mock_idp() -> Iterator[MockIdp]:
    with start_mock_idp(MOCK_IDP_CLIENT, CLIENT_ID, groups=("support",)) as idp:
        yield idp


async def id_token_from(idp: MockIdp) -> str:
    """An ID token from the mock's own token endpoint (its authorization-code grant accepts any code)."""
    form = {"grant_type": "authorization_code", "code": "any", "client_id": MOCK_IDP_CLIENT, "scope": "openid"}
    async with aiohttp.ClientSession() as http:
        async with http.post(idp.token_endpoint, data=form) as response:
            assert response.status == 200, await response.text()
            return (await response.json())["id_token"]


async def test_chain_with_oauth2_mock_server_as_the_idp(
    idp: DevIdentityProvider, mock_idp: MockIdp, upstream_json: RunningUpstream
) -> None:
    routes = [{"name": "mocked", "path": "/mocked/mcp", "upstream": upstream_json.mcp_url, "allow_groups": ["support"]}]
    authorization = {"identity_providers": [{"issuer": idp.issuer}, {"issuer": mock_idp.issuer}]}
    async with running_gateway(idp, routes, authorization=authorization) as gw:
        env = {
            "MCP_URL": gw.route_url("mocked"),
            "IDP_TOKEN_ENDPOINT": mock_idp.token_exchange_endpoint,
            "ID_TOKEN": await id_token_from(mock_idp),
            "IDP_CLIENT_ID": MOCK_IDP_CLIENT,
            "CLIENT_ID": CLIENT_ID,
            "CLIENT_SECRET": CLIENT_SECRET,
            "EXPECTED_ISSUER": gw.issuer,
            "CALL_TOOL": "echo",
            "CALL_ARGS": '{"text": "chain of strangers"}',
        }
        result = await run_xaa_client(env)
    assert result["call"]["content"][0]["text"] == "chain of strangers", mock_idp.stderr_text()
    assert result["tokenExchangeRequests"] == 1 and result["tokenRequests"] == 1
    (assertion,) = result["assertionRequests"]
    assert assertion["authorizationServerUrl"] == gw.issuer


async def test_id_jag_signed_by_an_unknown_idp_is_refused(idp: DevIdentityProvider, mock_idp: MockIdp) -> None:
    """Same chain, but the gateway does not trust the mock IdP: the grant fails at the gateway."""
    routes = [{"name": "mocked", "path": "/mocked/mcp", "upstream": "http://127.0.0.1:9/mcp"}]
    async with running_gateway(idp, routes) as gw:
        env = {
            "MCP_URL": gw.route_url("mocked"),
            "IDP_TOKEN_ENDPOINT": mock_idp.token_exchange_endpoint,
            "ID_TOKEN": await id_token_from(mock_idp),
            "IDP_CLIENT_ID": MOCK_IDP_CLIENT,
            "CLIENT_ID": CLIENT_ID,
            "CLIENT_SECRET": CLIENT_SECRET,
            "EXPECTED_ISSUER": gw.issuer,
        }
        result = await run_xaa_client(env, check=False)
    assert result["ok"] is False
    assert result["tokenExchangeRequests"] >= 1, result  # the mock IdP did its part
    assert result["errorCode"] == "invalid_grant", result
    assert "not a trusted identity provider" in result["error"], result
