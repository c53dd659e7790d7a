"""Stage: the audit trail of the proxied path (README "Audit log").

Decisions are written the moment they are made, before the upstream is called, so a call whose stream
never ends or that the client cancels is in the trail all the same; how the request ended follows in
``request.completed``. A refusal is one line carrying its status.
"""

from __future__ import annotations

from typing import Any

from gateway.audit import elapsed_ms
from gateway.enforce import CallRecord
from gateway.oauth.access_token import Principal
from gateway.pipeline.context import Refusal, RequestContext

_CALL_EVENTS = {
    "tools": ("tool.called", "tool.denied"),
    "resources": ("resource.accessed", "resource.denied"),
    "prompts": ("prompt.got", "prompt.denied"),
}


def who(principal: Principal | None) -> dict[str, Any]:
    if principal is None:
        return {}
    # sub is unique only within its IdP and tenant: the three together name the user.
    return {
        "sub": principal.subject,
        "client_id": principal.client_id,
        "idp": principal.idp_issuer,
        "tenant": principal.tenant,
        "groups": principal.groups,
    }


def audit_refusal(ctx: RequestContext, refusal: Refusal) -> None:
    if not refusal.audited:
        return
    ctx.services.audit.emit(
        refusal.event,
        request_id=ctx.request_id,
        **who(ctx.principal),
        route=ctx.route.name,
        method=ctx.request.method,
        decision="deny",
        reason=refusal.reason,
        status=refusal.status,
    )


def audit_decisions(ctx: RequestContext) -> None:
    plan, route, audit = ctx.plan, ctx.route, ctx.services.audit
    assert plan is not None
    principal = who(ctx.principal)
    if not plan.calls:
        audit.emit(
            "request.allowed",
            request_id=ctx.request_id,
            route=route.name,
            **principal,
            method=ctx.request.method,
            decision="allow",
        )
        return
    for call in plan.calls:
        if not call.asked:  # a question: its approval.* lines tell what happened
            audit_call(ctx, call)


def audit_call(ctx: RequestContext, call: CallRecord) -> None:
    """One decided call: its ``tool.called`` / ``tool.denied`` (...) line and its policy metric."""
    decision = "allow" if call.allowed else "deny"
    route = ctx.route
    if call.kind is not None:
        ctx.services.metrics.policy_decisions_of(route.name, call.kind, decision).inc()
    allowed_event, denied_event = _CALL_EVENTS.get(call.kind or "", ("request.allowed", "request.denied"))
    ctx.services.audit.emit(
        allowed_event if call.allowed else denied_event,
        request_id=ctx.request_id,
        route=route.name,
        **who(ctx.principal),
        method=call.method,
        target=call.target,
        decision=decision,
        reason=call.reason,
        rule=call.rule,
        args_sha256=call.args_sha256,
    )


def audit_completion(ctx: RequestContext, status: int) -> None:
    ctx.services.audit.emit(
        "request.completed",
        request_id=ctx.request_id,
        route=ctx.route.name,
        **who(ctx.principal),
        method=ctx.request.method,
        status=status,
        latency_ms=elapsed_ms(ctx.started),
    )


def audit_approval(ctx: RequestContext, event: str, **fields: Any) -> None:
    """approval.asked / granted / declined / cancelled / expired / refused / used (gateway/approvals/)."""
    ctx.services.audit.emit(event, request_id=ctx.request_id, **who(ctx.principal), **fields)
    ctx.services.metrics.approvals.labels(ctx.route.name, event.removeprefix("approval.")).inc()
