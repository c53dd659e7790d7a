"""Stage: the per-user credential for an upstream that is itself an EMA resource (routes with
``upstream_authorization``; gateway/oauth/chain.py).

The upstream token goes in ``Authorization``, the header the client's own token was stripped from
(gateway/proxy/headers.py). Exchanges and failures are audited (``upstream.credential`` /
``upstream.credential_failed``, never with a token) and counted; a cached token is neither.

Failures are JSON-RPC errors naming the step: no ID-JAG held for the access token is a 401 challenge
(a new access token, with a fresh ID-JAG, fixes it); a refusal by the IdP or the upstream's authorization
server is 403, since that is their authorization decision; one that did not answer usably is 502. An
upstream that answers 401 to a cached token gets a new one on the next request (gateway/pipeline/forward.py).
"""

from __future__ import annotations

import dataclasses
import time

from gateway.oauth.chain import ChainFailure
from gateway.pipeline.audit import who
from gateway.pipeline.authenticate import bearer_challenge
from gateway.pipeline.context import Refusal, RequestContext, rpc_error

UPSTREAM_CREDENTIAL = -32014  # JSON-RPC 2.0 §5.1 implementation-defined server error


async def upstream_credential(ctx: RequestContext) -> None:
    route, fwd, principal, services = ctx.route, ctx.forward, ctx.principal, ctx.services
    if route.upstream_authorization is None or fwd is None:
        return
    assert principal is not None and services.credentials is not None
    try:
        token = await services.credentials.token(route, principal)
    except ChainFailure as failure:
        services.metrics.upstream_credentials.labels(route.name, f"failed_{failure.step}").inc()
        reason = f"upstream_credential:{failure.step}" + (f":{failure.error}" if failure.error else "")
        if failure.step == "assertion":
            raise bearer_challenge(ctx, 401, "invalid_token", failure.message, reason=reason) from None
        status = 403 if failure.error is not None else 502
        message = f"no credential for this user at the upstream of route '{route.name}': {failure.message}"
        body = rpc_error(UPSTREAM_CREDENTIAL, message, ctx.plan.request_id if ctx.plan else None)
        raise Refusal(status, body, reason, event="upstream.credential_failed") from None
    if token.fresh:
        services.metrics.upstream_credentials.labels(route.name, "exchanged").inc()
        services.audit.emit(
            "upstream.credential",
            request_id=ctx.request_id,
            **who(principal),
            route=route.name,
            target=route.upstream_authorization.upstream_issuer,
            decision="allow",
            reason=f"upstream token obtained, valid {max(0, round(token.expires_at - time.time()))}s",
        )
    else:
        services.metrics.upstream_credentials.labels(route.name, "cached").inc()
    ctx.upstream_token = token.value
    ctx.forward = dataclasses.replace(
        fwd, added_headers=(*fwd.added_headers, ("Authorization", f"Bearer {token.value}"))
    )
