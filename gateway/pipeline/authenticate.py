"""Stage: a valid gateway access token (RFC 6750, RFC 9068) and no revocation, on every request.

Revoked: by the config (``revoked``), or by the IdP through Shared Signals (gateway/signals/: a token
issued before the IdP revoked its user's sessions, disabled the account or changed its credentials).

MCP authorization "Token Handling": the token is required on every request and invalid or expired
ones get 401 with a challenge pointing at the RFC 9728 metadata (§5.1), so a client can discover the
authorization server from the 401 alone. DPoP-bound tokens need their proof (gateway/bearer.py);
tokens revoked at the RFC 7009 endpoint are refused on every replica, cached or not
(gateway/oauth/revocation.py). A store that cannot check a DPoP proof's single use refuses with 503.
"""

from __future__ import annotations

from gateway.bearer import BearerChallenge, challenge_body, challenge_headers
from gateway.oauth import metadata
from gateway.oauth.replay import ReplayStoreUnavailable
from gateway.pipeline.context import Refusal, RequestContext


async def authenticate(ctx: RequestContext) -> None:
    runtime, route = ctx.runtime, ctx.route
    try:
        principal = await runtime.guard.authenticate(ctx.request, route)
        token_revoked = await runtime.token_revocations.is_revoked(principal)
    except BearerChallenge as challenge:
        raise bearer_challenge(
            ctx,
            challenge.status,
            challenge.error,
            challenge.description,
            reason=challenge.reason,
            dpop=challenge.dpop,
            nonce=challenge.nonce,
        ) from None
    except ReplayStoreUnavailable:
        raise _unavailable() from None
    if token_revoked:
        raise bearer_challenge(ctx, 401, "invalid_token", "the access token has been revoked", reason="revoked")
    if runtime.is_revoked(principal.identity, principal.client_id):
        raise bearer_challenge(ctx, 401, "invalid_token", "access has been revoked", reason="revoked")
    if ctx.services.revocations.refuses(principal.identity, principal.email, principal.issued_at):
        ctx.principal = principal  # audited with who was refused: the token is authentic, only cut off
        raise bearer_challenge(
            ctx, 401, "invalid_token", "the identity provider revoked this session; sign in again", reason="signal"
        )
    ctx.principal = principal


def bearer_challenge(
    ctx: RequestContext,
    status: int,
    error: str | None,
    description: str,
    *,
    reason: str | None = None,
    dpop: bool = False,
    nonce: str | None = None,
) -> Refusal:
    prm_url = metadata.prm_url(ctx.runtime.config, ctx.route)
    return Refusal(
        status,
        challenge_body(error, description),
        reason or ("no_token" if error is None else "token"),
        headers=challenge_headers(
            prm_url, ctx.route.scopes, error, description, dpop=dpop or ctx.route.require_dpop, nonce=nonce
        ),
    )


def _unavailable() -> Refusal:
    """The shared store cannot say whether the DPoP proof was replayed: fail closed."""
    return Refusal(
        503,
        {"error": "temporarily_unavailable", "error_description": "DPoP proof replay checks are unavailable"},
        "replay_store_unavailable",
        headers={"Retry-After": "5", "Cache-Control": "no-store"},
    )
