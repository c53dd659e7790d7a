"""Revocation of the gateway's own access tokens: the RFC 7009 endpoint and the list every request checks.

A revoked token is recorded by its ``jti`` in the replay store until the token's ``exp`` (afterwards it
is refused for its age anyway). With a Redis ``replay_store`` every replica sees the record, so the
token is refused everywhere from the next request on; the access-token cache (gateway/oauth/
access_token.py) does not bypass it, because the authenticate stage looks the ``jti`` up after
validation, on every request.

When the store cannot answer, a revocation is refused (503: RFC 7009 §2.2.1 has the client then assume
the token is still valid), but the per-request lookup does not take the routes down with it: calls
that need no shared state keep working through a Redis outage (as with quotas, README "Quotas"), and
the lookup answers from what this replica already knows: tokens revoked here or seen revoked here stay
refused until they expire. The window this leaves (a token revoked elsewhere, during the outage, and
not yet seen here) is bounded by the access token lifetime, and logged.

RFC 7009 §2.1: the client authenticates as at the token endpoint, and may revoke only tokens issued to
it; another client's token is refused with ``unauthorized_client`` (the RFC says the request "is
refused"; the caller already holds the token, so the refusal tells it nothing it could not learn by
using it). §2.2: an invalid, expired or unknown token is answered 200 like a revoked one, and the
``token_type_hint`` is only a hint: the gateway issues access tokens only, so it looks there anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from cachetools import TTLCache
from multidict import MultiDictProxy

from gateway.oauth.access_token import AccessTokenService, InvalidToken, Principal
from gateway.oauth.client_auth import ClientAuthenticator
from gateway.oauth.errors import NO_STORE, InvalidRequest, OAuthError, TemporarilyUnavailable, UnauthorizedClient
from gateway.oauth.replay import ReplayStore, ReplayStoreUnavailable
from gateway.oauth.token_endpoint import read_form

log = logging.getLogger(__name__)

# Its own key family in the replay store: ID-JAG keys are "<issuer>\0<jti>", client assertions and DPoP
# proofs have their own prefixes, so no key of one kind can stand for another.
_KEY_PREFIX = "access_token_revoked\x00"
# The largest authorization.access_token_ttl_seconds the config accepts.
MAX_ACCESS_TOKEN_TTL_SECONDS = 3600


class TokenRevocations:
    """The shared revocation list of access tokens, by ``jti``, with this replica's own memory of it."""

    def __init__(self, replay: ReplayStore, *, max_local: int = 100_000) -> None:
        self._replay = replay
        # jti -> True for tokens known here to be revoked, as long as any access token can live.
        self._known: TTLCache[str, bool] = TTLCache(maxsize=max_local, ttl=MAX_ACCESS_TOKEN_TTL_SECONDS)
        self._store_down = False

    async def revoke(self, principal: Principal) -> None:
        """Raises ``ReplayStoreUnavailable`` when the record cannot be written."""
        await self._replay.first_use(_KEY_PREFIX + principal.token_id, principal.expires_at)
        self._known[principal.token_id] = True

    async def is_revoked(self, principal: Principal, *, strict: bool = False) -> bool:
        """Whether the token is revoked; when the store cannot answer, what this replica knows, or with
        ``strict`` (introspection must not call a token active without knowing) ``ReplayStoreUnavailable``."""
        if principal.token_id in self._known:
            return True
        try:
            revoked = await self._replay.is_recorded(_KEY_PREFIX + principal.token_id)
        except ReplayStoreUnavailable:
            if strict:
                raise
            if not self._store_down:
                log.warning("revoked tokens cannot be looked up: only those known to this replica are refused")
            self._store_down = True
            return False
        self._store_down = False
        if revoked:
            self._known[principal.token_id] = True
        return revoked


async def authenticated_token(
    request: web.Request, clients: ClientAuthenticator
) -> tuple[str, str, MultiDictProxy[str]]:
    """The authenticated client and the ``token`` parameter of a revocation or introspection request
    (RFC 7009 §2.1, RFC 7662 §2.1: client authentication as at the token endpoint)."""
    form = await read_form(request)
    client_id = await clients.authenticate(request.headers.get("Authorization"), form)
    tokens = form.getall("token", [])
    if len(tokens) != 1 or not tokens[0]:
        raise InvalidRequest("exactly one token parameter is required")
    if len(form.getall("token_type_hint", [])) > 1:
        raise InvalidRequest("parameter token_type_hint is repeated")
    return client_id, tokens[0], form


class RevocationEndpoint:
    def __init__(
        self,
        clients: ClientAuthenticator,
        tokens: AccessTokenService,
        revocations: TokenRevocations,
        *,
        on_revoked: Callable[[Principal], None] | None = None,
    ) -> None:
        self._clients = clients
        self._tokens = tokens
        self._revocations = revocations
        self._on_revoked = on_revoked

    async def handle(self, request: web.Request) -> web.Response:
        try:
            client_id, token, _ = await authenticated_token(request, self._clients)
            try:
                principal = self._tokens.inspect(token)
            except InvalidToken:
                return _revoked()  # RFC 7009 §2.2: "invalid tokens do not cause an error response"
            if principal.client_id != client_id:
                raise UnauthorizedClient("the token was not issued to this client", reason="foreign_token")
            try:
                await self._revocations.revoke(principal)
            except ReplayStoreUnavailable:
                # RFC 7009 §2.2.1: 503, and the client must assume the token is still valid.
                raise TemporarilyUnavailable(
                    "revocation is unavailable; retry later", reason="replay_store_unavailable"
                ) from None
        except OAuthError as error:
            log.info("token revocation refused: error=%s reason=%s", error.error, error.reason)
            return error.to_response()
        log.info("access token revoked: client=%s token_id=%s", client_id, principal.token_id)
        if self._on_revoked is not None:
            self._on_revoked(principal)
        return _revoked()


def _revoked() -> web.Response:
    return web.Response(status=200, headers=NO_STORE)
