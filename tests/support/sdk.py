"""Helpers for tests that drive the gateway with the official Python MCP SDK client
(``IdentityAssertionOAuthProvider``): token storage, the ID-JAG exchange at the loopback IdP, and
reading a tool result."""

from __future__ import annotations

import aiohttp
import mcp_types as types
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

from gateway.devidp import DevIdentityProvider
from tests.support.harness import IDP_CLIENT_ID, IDP_CLIENT_SECRET


class MemoryStorage:
    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


async def exchange_at_idp(
    idp: DevIdentityProvider, audience: str, resource: str, user: str = "alice", *, scope: str | None = None
) -> str:
    """Legs 1-2 over HTTP: an ID token for ``user``, exchanged for an ID-JAG (RFC 8693); ``scope`` is
    the scope the enterprise IdP puts in the ID-JAG (none asked for by default)."""
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "requested_token_type": "urn:ietf:params:oauth:token-type:id-jag",
        "audience": audience,
        "resource": resource,
        **({"scope": scope} if scope is not None else {}),
        "subject_token": idp.issue_id_token(user, IDP_CLIENT_ID),
        "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
    }
    headers = {"Authorization": aiohttp.encode_basic_auth(IDP_CLIENT_ID, IDP_CLIENT_SECRET)}
    async with aiohttp.ClientSession() as http, http.post(idp.token_endpoint, data=form, headers=headers) as response:
        body = await response.json()
        assert response.status == 200, body
        return body["access_token"]


def text_of(result: types.CallToolResult) -> str:
    assert not result.is_error, result
    block = result.content[0]
    assert isinstance(block, types.TextContent)
    return block.text
