"""RFC 7662 token introspection of the gateway's own access tokens.

The caller authenticates as at the token endpoint (§2.1). What it learns (§2.2, §4): a client may
introspect only the tokens issued to it; for any other token, as for invalid, expired or revoked ones,
the answer is ``{"active": false}``. §2.2 allows exactly that ("the authorization server MAY respond
with ``active: false``" to a caller not allowed to know more), and it means the endpoint cannot be
used for token scanning: a client that got hold of another client's token learns nothing about it
here. An active token's answer carries its claims, ``token_type`` ``DPoP`` with ``cnf.jkt`` for a
DPoP-bound token (RFC 9449 §6.2), else ``Bearer``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.oauth.access_token import AccessTokenService, InvalidToken, Principal
from gateway.oauth.client_auth import ClientAuthenticator
from gateway.oauth.errors import NO_STORE, OAuthError, TemporarilyUnavailable
from gateway.oauth.replay import ReplayStoreUnavailable
from gateway.oauth.revocation import TokenRevocations, authenticated_token

log = logging.getLogger(__name__)


class IntrospectionEndpoint:
    def __init__(
        self,
        clients: ClientAuthenticator,
        tokens: AccessTokenService,
        revocations: TokenRevocations,
        *,
        issuer: str,
        is_refused: Callable[[Principal], bool],
    ) -> None:
        """``is_refused``: whether the routes would refuse the token's holder anyway (``revoked`` in the
        config, a Shared Signals cut-off): such a token is not active either."""
        self._clients = clients
        self._tokens = tokens
        self._revocations = revocations
        self._issuer = issuer
        self._is_refused = is_refused

    async def handle(self, request: web.Request) -> web.Response:
        try:
            client_id, token, _ = await authenticated_token(request, self._clients)
            principal = await self._active(token, client_id)
        except OAuthError as error:
            log.info("token introspection refused: error=%s reason=%s", error.error, error.reason)
            return error.to_response()
        body = _describe(principal, self._issuer) if principal is not None else {"active": False}
        return web.Response(text=json.dumps(body), content_type="application/json", headers=NO_STORE)

    async def _active(self, token: str, client_id: str) -> Principal | None:
        try:
            principal = self._tokens.inspect(token)
        except InvalidToken:
            return None
        if principal.client_id != client_id or self._is_refused(principal):
            return None
        try:
            revoked = await self._revocations.is_revoked(principal, strict=True)
        except ReplayStoreUnavailable:
            raise TemporarilyUnavailable(
                "introspection is unavailable; retry later", reason="replay_store_unavailable"
            ) from None
        return None if revoked else principal


def _describe(principal: Principal, issuer: str) -> dict[str, Any]:
    """RFC 7662 §2.2 members, with the values the token itself carries."""
    body: dict[str, Any] = {
        "active": True,
        "scope": " ".join(principal.scopes),
        "client_id": principal.client_id,
        "token_type": "DPoP" if principal.jkt is not None else "Bearer",
        "exp": int(principal.expires_at),
        "iat": int(principal.issued_at),
        "sub": principal.identity.key,
        "aud": principal.audience,
        "iss": issuer,
        "jti": principal.token_id,
    }
    if principal.jkt is not None:
        body["cnf"] = {"jkt": principal.jkt}
    return body
