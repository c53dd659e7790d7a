"""The decision engine: one place that decides a call, seeing the whole of it.

``decide(context) -> Decision`` is async because a decision may wait: a quota counter in Redis today,
a human approver later. The context carries the principal (subject, client, IdP, groups, scopes), the
route, and the call as classified (method, kind, target, arguments). The checks run in a fixed order,
each able to end the decision:

1. scopes: a method that needs a scope the token lacks -> ``step_up`` (RFC 6750 §3.1
   ``insufficient_scope``; MCP authorization "Scope Challenge Handling");
2. rules: the route's tools / resources / prompts rules (gateway/policy.py) -> ``deny`` naming the
   rule id, or the rule that allows;
3. quotas: a ``tools/call`` counted by the route's quotas (gateway/quotas.py) -> ``throttle`` with the
   quota id and when to retry; a quota store that cannot answer -> ``deny`` (fail closed).

Everything runs in-process, before anything reaches the upstream.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.classify import Call
from gateway.config import RouteConfig
from gateway.oauth.access_token import Principal
from gateway.policy import RoutePolicy, target_problem
from gateway.quotas import Charge, QuotaStore, QuotaStoreUnavailable, user_identity

log = logging.getLogger(__name__)


class Effect(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    STEP_UP = "step_up"
    THROTTLE = "throttle"


@dataclass(frozen=True)
class Decision:
    effect: Effect
    reason: str
    rule: str | None = None  # the id of the rule or quota that decided
    missing_scopes: tuple[str, ...] = ()  # step_up: what the token lacks
    data: Mapping[str, Any] | None = None  # JSON-RPC error ``data`` for a refusal the client sees

    @property
    def allowed(self) -> bool:
        return self.effect is Effect.ALLOW


@dataclass(frozen=True)
class DecisionContext:
    principal: Principal
    route: RouteConfig
    call: Call
    now: float

    @property
    def groups(self) -> frozenset[str]:
        return frozenset(self.principal.groups)


NOT_A_NAMED_CALL = Decision(Effect.ALLOW, "not a named call")


class DecisionEngine:
    def __init__(self, quota_store: QuotaStore | None = None) -> None:
        self._quotas = quota_store

    async def decide(self, ctx: DecisionContext) -> Decision:
        policy = ctx.route.policy
        missing = policy.missing_scopes(ctx.call.method, ctx.principal.scopes)
        if missing:
            return Decision(Effect.STEP_UP, "insufficient_scope:" + " ".join(missing), missing_scopes=missing)
        call = ctx.call
        if call.kind is None:
            return NOT_A_NAMED_CALL
        decision = _by_rules(policy, call.kind, call.target, ctx.groups)
        if decision.allowed and call.method == "tools/call" and ctx.route.quotas and call.target is not None:
            return await self._charge(ctx, call.target) or decision
        return decision

    async def _charge(self, ctx: DecisionContext, tool: str) -> Decision | None:
        """Charge every quota counting this call, all or nothing; None when it fits them all."""
        principal = ctx.principal
        identity = user_identity(principal.idp_issuer, principal.subject)
        charges: list[Charge] = []
        quota_of: list[str] = []
        for quota in ctx.route.quotas:
            if not quota.applies_to(tool):
                continue
            for key in quota.subject_key(ctx.route.name, identity, principal.client_id, principal.groups):
                charges.append(Charge(key, 1.0, quota.limit, quota.window_seconds))
                quota_of.append(quota.id)
        if not charges:
            return None
        if self._quotas is None:
            return Decision(Effect.DENY, "no quota store", data={"reason": "quota_unavailable"})
        try:
            outcomes = await self._quotas.consume_all(charges, now=ctx.now)
        except QuotaStoreUnavailable as exc:
            log.error("route %s: quota store unavailable, refusing the call: %s", ctx.route.name, exc)
            return Decision(Effect.DENY, "quota store unavailable", data={"reason": "quota_unavailable"})
        for quota_id, outcome in zip(quota_of, outcomes, strict=True):
            if not outcome.allowed:
                data = {"reason": "quota", "quota": quota_id, "retryAfterSeconds": outcome.retry_after_seconds}
                return Decision(Effect.THROTTLE, f"quota {quota_id} exhausted", rule=quota_id, data=data)
        return None


def _by_rules(policy: RoutePolicy, kind: str, target: str | None, groups: frozenset[str]) -> Decision:
    rules = policy.rules_for(kind)
    if rules.unrestricted:
        return Decision(Effect.ALLOW, "no rules")
    if target is None:
        # No string name to match (missing, a list, a number): a restricted kind refuses it rather
        # than let the upstream interpret (or coerce) what the gateway could not check.
        return Decision(Effect.DENY, "no name to check")
    problem = target_problem(kind, target)
    if problem is not None:
        return Decision(Effect.DENY, problem)
    verdict = rules.decide(groups, target)
    return Decision(Effect.ALLOW if verdict.allowed else Effect.DENY, verdict.reason, rule=verdict.rule)


def decision_context(principal: Principal, route: RouteConfig, call: Call) -> DecisionContext:
    return DecisionContext(principal, route, call, time.time())
