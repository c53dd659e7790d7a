"""The token endpoint: RFC 7523 jwt-bearer grant carrying an ID-JAG (SEP-990 leg 3).

Order of checks: the form must parse, then the client must authenticate (so unauthenticated callers
learn nothing about assertions; the ID-JAG draft §4.4.1 binds the assertion to the authenticated
client) and be within its rate limit (``ClientRateLimiter``, EMA §7.5.1), then the grant type and the
single assertion (RFC 7523 §2.1), then the ``DPoP`` proof if one is sent (RFC 9449 §5: the token is
then bound to its key, ``token_type`` ``DPoP``), then every ID-JAG rule (``IdJagValidator``). Responses follow
RFC 6749 §5.1/§5.2 with ``Cache-Control: no-store``; no refresh token is issued (draft §4.4.3
"Refresh Token": SHOULD NOT).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from gateway.http import BodyTooLarge, BodyTooSlow, read_limited
from gateway.oauth.access_token import AccessTokenService, IssuedToken
from gateway.oauth.client_auth import ClientAuthenticator
from gateway.oauth.dpop import DpopVerifier, ProofError
from gateway.oauth.errors import (
    NO_STORE,
    InvalidDpopProof,
    InvalidGrant,
    InvalidRequest,
    OAuthError,
    RateLimited,
    TemporarilyUnavailable,
    UnsupportedGrantType,
    UseDpopNonce,
)
from gateway.oauth.id_token_bridge import ID_TOKEN_TYPE, IdTokenBridge
from gateway.oauth.identity import SubjectIdentity
from gateway.oauth.idjag import Grant, IdJagValidator
from gateway.oauth.rate_limit import ClientRateLimiter
from gateway.oauth.replay import ReplayStoreUnavailable

log = logging.getLogger(__name__)

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
_MAX_FORM_BYTES = 64 * 1024


@dataclass(frozen=True)
class GrantOutcome:
    """One decision of the token endpoint, for logs, metrics and (later) the audit trail."""

    client_id: str | None
    grant: Grant | None
    error: OAuthError | None


class TokenEndpoint:
    def __init__(
        self,
        clients: ClientAuthenticator,
        validator: IdJagValidator,
        tokens: AccessTokenService,
        *,
        dpop: DpopVerifier,
        url: str,
        on_outcome: Callable[[GrantOutcome], None] | None = None,
        is_revoked: Callable[[SubjectIdentity, str], bool] | None = None,
        rate_limiter: ClientRateLimiter | None = None,
        cut_off: Callable[[Grant], bool] | None = None,
        retain: Callable[[Grant, IssuedToken, str], None] | None = None,
        bridge: IdTokenBridge | None = None,
    ) -> None:
        """``cut_off``: whether the IdP revoked the grant's user after its ID-JAG was issued (Shared
        Signals, gateway/signals/)."""
        self._dpop = dpop
        self._url = url  # this endpoint as clients see it (the metadata's token_endpoint): the proofs' htu
        # The ID-token bridge (RFC 8693 token exchange of an OpenID Connect ID token), when an IdP allows it.
        self._bridge = bridge if bridge is not None and bridge.enabled else None
        # Keeps the ID-JAG of a grant for a route that chains it upstream (gateway/oauth/chain.py).
        self._retain = retain
        self._is_revoked = is_revoked
        self._cut_off = cut_off
        self._rate_limiter = rate_limiter
        self._clients = clients
        self._validator = validator
        self._tokens = tokens
        self._on_outcome = on_outcome

    async def handle(self, request: web.Request) -> web.Response:
        client_id: str | None = None
        try:
            form, client_id = await self._authenticate(request)
            self._throttle(client_id)
            exchange = self._is_token_exchange(form)
            assertion = self._subject_token(form) if exchange else self._assertion(form)
            jkt = await self._dpop_key(request)
            grant = await self._validate(assertion, form, client_id, exchange=exchange, jkt=jkt)
            if self._is_revoked is not None and self._is_revoked(grant.identity, client_id):
                # Deprovisioning stops new ID-JAGs at the IdP; this covers ID-JAGs already issued.
                raise InvalidGrant("access for this user or client has been revoked", reason="revoked")
            if self._cut_off is not None and self._cut_off(grant):
                raise InvalidGrant(
                    "the identity provider revoked this user's sessions after the assertion was issued",
                    reason="revoked",
                )
        except OAuthError as error:
            self._report(GrantOutcome(client_id, None, error))
            log.info("token request refused: client=%s error=%s reason=%s", client_id, error.error, error.reason)
            return error.to_response()
        issued = self._tokens.issue(grant, jkt=jkt)
        if self._retain is not None and not exchange and grant.route.upstream_authorization is not None:
            self._retain(grant, issued, assertion)
        self._report(GrantOutcome(client_id, grant, None))
        log.info(
            "access token issued: client=%s user=%s route=%s scope=%r token_id=%s",
            client_id,
            grant.identity.key,
            grant.route.name,
            issued.scope,
            issued.token_id,
        )
        body = {
            "access_token": issued.access_token,
            "token_type": "DPoP" if jkt is not None else "Bearer",
            "expires_in": issued.expires_in,
            "scope": issued.scope,
            # Draft §4.4.2: the granted resources, as the assertion (or the client) spelled them.
            "resource": grant.resources[0] if len(grant.resources) == 1 else list(grant.resources),
        }
        if exchange:
            body["issued_token_type"] = ACCESS_TOKEN_TYPE  # RFC 8693 §2.2.1: REQUIRED
        headers = dict(NO_STORE)
        if jkt is not None and self._dpop.require_nonce:
            headers["DPoP-Nonce"] = self._dpop.nonces.current()  # RFC 9449 §8.2: the next nonce to use
        return web.Response(text=json.dumps(body), content_type="application/json", headers=headers)

    async def _validate(
        self, assertion: str, form: MultiDictProxy[str], client_id: str, *, exchange: bool, jkt: str | None
    ) -> Grant:
        resources, scope = _resources(form), _optional(form, "scope")
        if exchange and self._bridge is not None:
            grant = await self._bridge.validate(assertion, client_id=client_id, resources=resources, scope=scope)
            # The ID-token bridge has no DPoP rules of its own; a require_dpop route still gets no bearer token.
            if grant.route.require_dpop and jkt is None:
                raise InvalidDpopProof(
                    "this resource requires DPoP-bound access tokens: send a DPoP proof", reason="dpop"
                )
            return grant
        return await self._validator.validate(
            assertion, client_id=client_id, resources=resources, scope=scope, dpop_jkt=jkt
        )

    async def _dpop_key(self, request: web.Request) -> str | None:
        """The thumbprint of the key of a valid ``DPoP`` proof, or None when the request has none."""
        proofs = request.headers.getall("DPoP", [])
        if not proofs:
            return None
        try:
            return await self._dpop.verify(proofs, method=request.method, url=self._url)
        except ProofError as exc:
            if exc.nonce is not None:
                raise UseDpopNonce(exc.description, exc.nonce) from None
            raise InvalidDpopProof(exc.description, reason="dpop") from None
        except ReplayStoreUnavailable:
            raise TemporarilyUnavailable(
                "replay protection is unavailable; retry later", reason="replay_store_unavailable"
            ) from None

    async def _authenticate(self, request: web.Request) -> tuple[MultiDictProxy[str], str]:
        """The form and the authenticated client. A request that fails before authenticating draws
        from the rate limiter's shared bucket, never from the client it names."""
        try:
            form = await read_form(request)
            return form, await self._clients.authenticate(request.headers.get("Authorization"), form)
        except OAuthError:
            self._throttle(None)
            raise

    def _throttle(self, client_id: str | None) -> None:
        """EMA §7.5.1 rate limiting, before any costly check of the assertion."""
        retry_after = self._rate_limiter.acquire(client_id) if self._rate_limiter is not None else 0
        if retry_after:
            raise RateLimited(retry_after)

    def _is_token_exchange(self, form: MultiDictProxy[str]) -> bool:
        grant_types = form.getall("grant_type", [])
        if len(grant_types) != 1:
            raise InvalidRequest("exactly one grant_type is required")
        if grant_types[0] == TOKEN_EXCHANGE and self._bridge is not None:
            return True
        if grant_types[0] != JWT_BEARER:
            also = f" and {TOKEN_EXCHANGE} with ID tokens" if self._bridge is not None else ""
            raise UnsupportedGrantType(f"only {JWT_BEARER}{also} is supported")
        return False

    def _subject_token(self, form: MultiDictProxy[str]) -> str:
        """RFC 8693 §2.1, for the ID-token bridge: one ID token as the subject, no actor, and an access
        token (the default) as the requested type."""
        subject = _optional(form, "subject_token")
        if subject is None:
            raise InvalidRequest("subject_token is required")
        if _optional(form, "subject_token_type") != ID_TOKEN_TYPE:
            raise InvalidRequest(f"subject_token_type must be {ID_TOKEN_TYPE}")
        if _optional(form, "requested_token_type") not in (None, ACCESS_TOKEN_TYPE):
            raise InvalidRequest(f"requested_token_type must be {ACCESS_TOKEN_TYPE}")
        if _optional(form, "actor_token") is not None:
            raise InvalidRequest("actor_token is not supported")
        return subject

    def _assertion(self, form: MultiDictProxy[str]) -> str:
        assertions = form.getall("assertion", [])
        if len(assertions) != 1 or not assertions[0]:
            raise InvalidRequest("exactly one assertion is required (RFC 7523 §2.1)")
        return assertions[0]

    def _report(self, outcome: GrantOutcome) -> None:
        if self._on_outcome is not None:
            self._on_outcome(outcome)


async def read_form(request: web.Request) -> MultiDictProxy[str]:
    """The ``application/x-www-form-urlencoded`` body of an OAuth endpoint (RFC 6749 §3.2, RFC 7009
    §2.1, RFC 7662 §2.1), bounded in size and time."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise InvalidRequest("the body must be application/x-www-form-urlencoded")
    try:
        body = await read_limited(request, _MAX_FORM_BYTES)
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except BodyTooLarge:
        raise InvalidRequest("the request body is too large") from None
    except BodyTooSlow:
        raise InvalidRequest("the request body did not arrive in time") from None
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not UTF-8") from None
    return MultiDictProxy(MultiDict(pairs))


def _resources(form: MultiDictProxy[str]) -> tuple[str, ...]:
    """RFC 8707 §2: ``resource`` may be repeated; RFC 6749 §3.1: one without a value is omitted."""
    return tuple(value for value in form.getall("resource", []) if value)


def _optional(form: MultiDictProxy[str], name: str) -> str | None:
    values = form.getall(name, [])
    if len(values) > 1:
        raise InvalidRequest(f"parameter {name} is repeated")
    return values[0] if values and values[0] else None
