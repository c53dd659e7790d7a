"""Applying decisions to one client request: what is forwarded, what the gateway answers itself,
and which results are rewritten on the way back.

The messages were read strictly once (gateway/proxy/request_body.py) and classified purely
(gateway/classify.py); each decidable message goes to the decision engine (gateway/engine.py). Batches
are decided element by element: allowed elements are forwarded, refused ones are answered by the
gateway and never reach the upstream. A named call is decided even when it has no ``id`` (a
notification): the SDK servers ignore such a message, but a server that runs it anyway must not run
something the gateway never checked. What is forwarded is the canonical JSON of the kept messages.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from gateway.approvals.desk import Answered, ApprovalDesk, Approved, Ask, refusal
from gateway.approvals.stateless import is_gateway_state
from gateway.classify import Call, classify, decidable, header_mismatch
from gateway.config import RouteConfig
from gateway.engine import Decision, DecisionContext, DecisionEngine, Effect, Explanation
from gateway.mcp_methods import HANDSHAKE_METHODS, NOUNS
from gateway.oauth.access_token import Principal
from gateway.proxy.jsonrpc import ResultRewriter, advertise_ema_extension
from gateway.proxy.request_body import RpcBody, RpcMessage, canonical_json
from gateway.tool_pins import DriftState

# JSON-RPC codes the gateway answers with (implementation-defined server errors, JSON-RPC 2.0 §5.1;
# -32020 is MCP 2026-07-28's HeaderMismatch).
FORBIDDEN = -32003
QUOTA_EXCEEDED = -32029
HEADER_MISMATCH = -32020
AUDIT_TARGET_CHARS = 256


@dataclass(frozen=True)
class CallRecord:
    """One JSON-RPC request as decided, for the audit trail and metrics."""

    method: str
    kind: str | None
    target: str | None
    allowed: bool
    reason: str
    args_sha256: str | None = None
    rule: str | None = None
    # Neither allowed nor refused yet: a person is being asked (the approval.* lines tell the rest).
    asked: bool = False


@dataclass
class Plan:
    forward_body: bytes | None
    local_responses: list[dict[str, Any]] = field(default_factory=list)
    rewriter: ResultRewriter = field(default_factory=ResultRewriter)
    calls: list[CallRecord] = field(default_factory=list)
    batch: bool = False
    missing_scopes: tuple[str, ...] = ()
    mismatch: str | None = None
    request_id: Any = None  # the first request's id, for gateway-made error bodies
    ask: Ask | None = None  # a call to ask the caller about on this POST's SSE response before forwarding


def list_filter_for(route: RouteConfig, groups: frozenset[str], drift: DriftState | None = None) -> ResultRewriter:
    """A rewriter that filters every list-shaped result for ``groups`` and, on a route with ``tool_pins``,
    checks its tools against the pins (none needed on open routes without pins)."""
    policy = route.policy
    by_policy = partial(policy.filter_lists, groups=groups) if policy.restricts_lists else None
    if route.tool_pins is None or drift is None:
        return ResultRewriter(by_policy)
    by_pins = partial(drift.check_list, route.name, route.tool_pins, route.on_tool_drift)
    if by_policy is None:
        return ResultRewriter(by_pins)
    return ResultRewriter(lambda result: by_policy(by_pins(result)))


def stream_plan(route: RouteConfig, groups: frozenset[str], drift: DriftState | None = None) -> Plan:
    """GET and DELETE: nothing to decide or forward, but whatever the stream carries is filtered."""
    return Plan(forward_body=None, rewriter=list_filter_for(route, groups, drift))


async def plan_request(
    rpc: RpcBody,
    headers: Mapping[str, str],
    engine: DecisionEngine,
    principal: Principal,
    route: RouteConfig,
    *,
    digest_arguments: Callable[[Any], str] | None = None,
    explanation: Explanation | None = None,
    tool_drift: DriftState | None = None,
    approvals: ApprovalDesk | None = None,
) -> Plan:
    """Decide every message of one request; ``forward_body`` is the canonical JSON of the messages
    allowed through (None when none is), so the upstream reads exactly what was decided.
    ``explanation`` records the steps of the decision (``check --explain`` plans a one-message request).
    ``approvals`` settles the calls the engine says to ask about; without it they need approval."""
    messages, batch = rpc.messages, rpc.batch
    plan = Plan(
        forward_body=None,
        batch=batch,
        rewriter=list_filter_for(route, frozenset(principal.groups), tool_drift),
        request_id=next((m.id for m in messages if m.is_request), None),
    )
    # The mirror headers are part of Streamable HTTP; the legacy HTTP+SSE transport has none.
    plan.mismatch = header_mismatch(messages, headers, batch, required=route.transport != "sse")
    if plan.mismatch:
        return plan
    missing: list[str] = []
    kept: list[dict[str, Any]] = []
    now = time.time()
    for message in messages:
        if not decidable(message):
            kept.append(message.raw)
            continue
        call = classify(message)
        context = DecisionContext(principal, route, call, now, explanation)
        decision = await engine.decide(context)
        if decision.effect is Effect.STEP_UP:
            missing.extend(s for s in decision.missing_scopes if s not in missing)
            continue
        digest = None
        if digest_arguments is not None and call.method == "tools/call":
            digest = digest_arguments(call.arguments)
        target = _for_audit(call.target)
        raw = message.raw
        if decision.effect is Effect.APPROVE or (decision.allowed and _carries_gateway_state(call)):
            settled = await _settle(approvals, message, call, decision, batch=batch or plan.ask is not None)
            if isinstance(settled, Answered):
                plan.calls.append(
                    CallRecord(
                        call.method, call.kind, target, False, settled.reason, digest, decision.rule, settled.asked
                    )
                )
                plan.local_responses.append(settled.response)
                continue
            if isinstance(settled, Ask):
                plan.calls.append(
                    CallRecord(call.method, call.kind, target, False, "approval asked", digest, decision.rule, True)
                )
                plan.ask = settled
                continue
            if decision.effect is Effect.APPROVE:  # approved: decided again as approved (quotas count it now)
                decision = await engine.decide(dataclasses.replace(context, approved=True))
            raw = settled.raw
            if settled.after is not None and decision.allowed and message.is_request:
                plan.rewriter.expect(message.id, settled.after)
        record = CallRecord(call.method, call.kind, target, decision.allowed, decision.reason, digest, decision.rule)
        plan.calls.append(record)
        if not decision.allowed:
            plan.local_responses.append(_refused(message, call.kind, call.target, route.name, decision))
            continue
        if message.is_request and call.method in HANDSHAKE_METHODS:
            plan.rewriter.expect(message.id, advertise_ema_extension)
        kept.append(raw)
    plan.missing_scopes = tuple(missing)
    if kept:
        plan.forward_body = canonical_json(kept if batch else kept[0])
    return plan


async def decide_approved(
    engine: DecisionEngine,
    principal: Principal,
    route: RouteConfig,
    ask: Ask,
    digest_arguments: Callable[[Any], str] | None = None,
) -> tuple[CallRecord, dict[str, Any] | None]:
    """A call asked about on its SSE response (``plan.ask``) and approved: decided again as approved,
    so quotas count it now, as for :class:`Approved`. The decision's record (for the audit trail), and
    None: forward it; else the refusal to answer with (a quota spent, or a rule changed by a reload,
    while the person decided)."""
    call = classify(ask.message)
    decision = await engine.decide(DecisionContext(principal, route, call, time.time(), approved=True))
    digest = digest_arguments(call.arguments) if digest_arguments is not None else None
    target = _for_audit(call.target)
    record = CallRecord(call.method, call.kind, target, decision.allowed, decision.reason, digest, decision.rule)
    if decision.allowed:
        return record, None
    return record, _refused(ask.message, call.kind, call.target, route.name, decision)


def _carries_gateway_state(call: Call) -> bool:
    """A call retried with the gateway's own ``requestState`` (gateway/approvals/stateless.py): the
    upstream must never see it, so it is checked and unwrapped even if the call no longer needs approval."""
    return call.method == "tools/call" and is_gateway_state((call.message.params or {}).get("requestState"))


async def _settle(
    approvals: ApprovalDesk | None, message: RpcMessage, call: Call, decision: Decision, *, batch: bool
) -> Answered | Approved | Ask:
    spec = decision.approval if decision.effect is Effect.APPROVE else None
    if approvals is None:
        return refusal(message, "approval_required", f"Calling tool '{_for_audit(call.target)}' needs approval")
    settled = await approvals.settle(message, call, spec)
    if isinstance(settled, Ask) and batch:
        # The question goes on this POST's SSE response, before the call: one call per request.
        text = f"Calling tool '{_for_audit(call.target)}' needs your approval: send it in a request of its own"
        return refusal(message, "approval_required", text)
    return settled


def _for_audit(target: str | None) -> str | None:
    """Audit lines carry at most a bounded prefix of a client-chosen name."""
    if target is None or len(target) <= AUDIT_TARGET_CHARS:
        return target
    return target[:AUDIT_TARGET_CHARS] + "..."


def _refused(
    message: RpcMessage, kind: str | None, target: str | None, route_name: str, decision: Decision
) -> dict[str, Any]:
    noun = NOUNS.get(kind or "", "request")
    what = f"{noun} '{_for_audit(target)}'" if target is not None else f"{noun} without a string name"
    if decision.effect is Effect.THROTTLE:
        code, text = QUOTA_EXCEEDED, f"Quota exceeded: {what} on route '{route_name}' ({decision.reason})"
    else:
        code, text = FORBIDDEN, f"Forbidden: {what} is not permitted for you on route '{route_name}'"
    data: dict[str, Any] = {"reason": "policy", "method": message.method}
    if decision.rule is not None:
        data["rule"] = decision.rule
    data.update(decision.data or {})
    return {"jsonrpc": "2.0", "id": message.id, "error": {"code": code, "message": text, "data": data}}
