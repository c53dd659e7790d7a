"""Stage: decide every message of the request with the decision engine, and plan what happens.

A request whose ``Mcp-Method`` / ``Mcp-Name`` headers disagree with its body is refused (400,
-32020); one that needs scopes the token lacks gets one 403 challenge naming every scope needed
(RFC 6750 §3.1; MCP "Scope Challenge Handling": SDK clients then re-run the grant with the union).
"""

from __future__ import annotations

import functools

from gateway.approvals.delegated import DelegatedDesk
from gateway.approvals.desk import ApprovalDesk
from gateway.bearer import challenge_body, challenge_headers
from gateway.enforce import HEADER_MISMATCH, plan_request, stream_plan
from gateway.oauth import metadata
from gateway.pipeline.audit import audit_approval
from gateway.pipeline.context import Refusal, RequestContext, rpc_refusal
from gateway.proxy.headers import SESSION_HEADER
from gateway.sessions import SessionBinder


async def decide(ctx: RequestContext) -> None:
    principal, route = ctx.principal, ctx.route
    assert principal is not None
    if ctx.rpc is None:  # GET (a listening stream) and DELETE carry no messages; their results are filtered
        ctx.plan = stream_plan(route, frozenset(principal.groups), ctx.services.tool_drift)
        return
    desk = None
    if route.policy.tools.asks:  # only routes with require_approval rules ask (the hot path builds nothing)
        observe = functools.partial(audit_approval, ctx)
        store = ctx.services.approvals
        desk = ApprovalDesk(
            principal=principal,
            route=route.name,
            headers=ctx.request.headers,
            signer=ctx.runtime.approval_states,
            replay=ctx.runtime.replay,
            observe=observe,
            delegated=DelegatedDesk(store, ctx.runtime.config.public_url, observe) if store is not None else None,
            session_elicitation=SessionBinder.elicits(ctx.request.headers.get(SESSION_HEADER, "")),
            can_stream=_can_stream(ctx),
        )
    plan = await plan_request(
        ctx.rpc,
        ctx.request.headers,
        ctx.runtime.engine,
        principal,
        route,
        digest_arguments=ctx.runtime.argument_digest,
        tool_drift=ctx.services.tool_drift,
        approvals=desk,
    )
    if plan.mismatch:
        raise rpc_refusal(400, HEADER_MISMATCH, plan.mismatch, "header_mismatch", plan.request_id)
    if plan.missing_scopes:
        needed = tuple(dict.fromkeys((*principal.scopes, *plan.missing_scopes)))
        description = f"this request needs scope {' '.join(plan.missing_scopes)}"
        prm_url = metadata.prm_url(ctx.runtime.config, route)
        raise Refusal(
            403,
            challenge_body("insufficient_scope", description),
            "insufficient_scope:" + " ".join(plan.missing_scopes),
            # RFC 9449 §7.1: a DPoP-bound token is challenged with the DPoP scheme.
            headers=challenge_headers(
                prm_url, needed, "insufficient_scope", description, dpop=principal.jkt is not None or route.require_dpop
            ),
        )
    ctx.plan = plan


def _can_stream(ctx: RequestContext) -> bool:
    """Whether the gateway may ask on this POST's SSE response (gateway/approvals/session.py): one
    request (its question comes before that call's answer), a client that accepts ``text/event-stream``,
    and Streamable HTTP (the legacy HTTP+SSE transport answers POSTs on the GET stream instead)."""
    assert ctx.rpc is not None
    if ctx.rpc.batch or ctx.route.transport == "sse":
        return False
    accept = ",".join(ctx.request.headers.getall("Accept", []))
    return any(_accepts_event_stream(item) for item in accept.split(","))


def _accepts_event_stream(item: str) -> bool:
    """One media range of ``Accept``: ``text/event-stream``, not refused with ``q=0`` (RFC 9110 §12.5.1)."""
    media_type, *parameters = (part.strip().lower() for part in item.split(";"))
    if media_type != "text/event-stream":
        return False
    weights = [value.strip() for name, _, value in (p.partition("=") for p in parameters) if name.strip() == "q"]
    return not weights or weights[0] not in ("0", "0.", "0.0", "0.00", "0.000")
