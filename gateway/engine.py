"""The decision engine: one place that decides a call, seeing the whole of it.

``decide(context) -> Decision`` is async because a decision may wait: a quota counter in Redis today,
a human approver later. The context carries the principal (subject, client, IdP, groups, scopes), the
route, and the call as classified (method, kind, target, arguments). The checks run in a fixed order,
each able to end the decision:

1. scopes: a method that needs a scope the token lacks -> ``step_up`` (RFC 6750 §3.1
   ``insufficient_scope``; MCP authorization "Scope Challenge Handling");
2. pins: a ``tools/call`` of a tool that drifted from the route's ``tool_pins`` (gateway/tool_pins.py)
   -> ``deny`` with ``tool_drift``;
3. rules: a rule that would decide the call but whose condition does not type-check against the tool's
   current ``inputSchema`` (gateway/condition_health.py) -> ``deny`` with ``condition_invalid``;
   the route's tools / resources / prompts rules (gateway/policy.py), with their ``when``
   conditions in CEL (gateway/conditions.py) evaluated on the call's arguments, user, client, route
   and time -> ``deny`` naming the rule id (and ``condition`` when a condition decided, or
   ``condition_error`` when it could not be evaluated), or the rule that allows;
4. approval: a call allowed by a rule with ``require_approval`` -> ``approve`` (ask a person first,
   gateway/approvals/), unless the context says the call was approved; quotas are charged only then;
5. quotas: a ``tools/call`` counted by a quota whose ``cost`` does not type-check -> ``deny`` with
   ``condition_invalid``; counted by the route's quotas (gateway/quotas.py) -> ``throttle`` with the
   quota id and when to retry; a quota store that cannot answer -> ``deny`` (fail closed). Each quota's
   outcome (charged, exhausted, unavailable) goes to ``on_quota``: the metrics.

Everything runs in-process, before anything reaches the upstream. A context carrying an
:class:`Explanation` has each step recorded as it is taken (``mcp-gateway check --explain``), so the
explanation is this decision, not a reconstruction of it.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.approvals.spec import ApprovalSpec
from gateway.classify import Call
from gateway.condition_health import ConditionHealth
from gateway.conditions import ConditionEvaluationError, ConditionInput, ConditionUser
from gateway.config import RouteConfig
from gateway.oauth.access_token import Principal
from gateway.policy import Decision as RulesDecision
from gateway.policy import RoutePolicy, Rule, RuleStep, target_problem
from gateway.quotas import Charge, QuotaOutcome, QuotaRule, QuotaStore, QuotaStoreUnavailable
from gateway.tool_pins import DriftState

log = logging.getLogger(__name__)


class Effect(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    STEP_UP = "step_up"
    THROTTLE = "throttle"
    APPROVE = "approve"  # allowed once a person approves it (gateway/approvals/)


@dataclass(frozen=True)
class Decision:
    effect: Effect
    reason: str
    rule: str | None = None  # the id of the rule or quota that decided
    missing_scopes: tuple[str, ...] = ()  # step_up: what the token lacks
    data: Mapping[str, Any] | None = None  # JSON-RPC error ``data`` for a refusal the client sees
    approval: ApprovalSpec | None = None  # approve: what to ask and of whom

    @property
    def allowed(self) -> bool:
        return self.effect is Effect.ALLOW


@dataclass
class QuotaStep:
    """One of the route's quotas as a ``tools/call`` decision went through it (``check --explain``)."""

    quota: QuotaRule
    applies: bool  # whether its ``tools`` globs count this tool
    cost: float | None = None  # what the call costs it; None when not evaluated
    cost_error: str | None = None  # why ``cost`` could not be evaluated
    counters: int = 0  # how many counters the call is charged to (``per: group``: one per group)
    fits: bool | None = None  # the store's answer; None when it was not asked


@dataclass
class Explanation:
    """What one decision went through, step by step: filled in only when a context carries one."""

    rules: list[RuleStep] = field(default_factory=list)  # the rules visited, in order
    verdict: RulesDecision | None = None  # what the rules said (before quotas)
    quotas: list[QuotaStep] = field(default_factory=list)  # the quotas visited, in order


@dataclass(frozen=True)
class DecisionContext:
    principal: Principal
    route: RouteConfig
    call: Call
    now: float
    explanation: Explanation | None = None
    approved: bool = False  # a person approved this very call (gateway/approvals/): ask no more

    @property
    def groups(self) -> frozenset[str]:
        return frozenset(self.principal.groups)


NOT_A_NAMED_CALL = Decision(Effect.ALLOW, "not a named call")
# Told (route, quota id, result) for each quota a call was checked against: "charged" (the call fits and
# was counted), "exhausted" (the quota that refused it), "unavailable" (the store could not answer).
QuotaObserver = Callable[[str, str, str], None]


class DecisionEngine:
    def __init__(
        self,
        quota_store: QuotaStore | None = None,
        condition_health: ConditionHealth | None = None,
        *,
        on_quota: QuotaObserver | None = None,
        tool_drift: DriftState | None = None,
    ) -> None:
        self._quotas = quota_store
        self._health = condition_health
        self._on_quota = on_quota
        self._drift = tool_drift

    async def decide(self, ctx: DecisionContext) -> Decision:
        policy = ctx.route.policy
        missing = policy.missing_scopes(ctx.call.method, ctx.principal.scopes)
        if missing:
            return Decision(Effect.STEP_UP, "insufficient_scope:" + " ".join(missing), missing_scopes=missing)
        call = ctx.call
        if call.kind is None:
            return NOT_A_NAMED_CALL
        facts = _Facts(ctx)
        decision = (
            self._drifted(ctx)
            or self._invalid_condition(ctx, "rule")
            or _by_rules(policy, call.kind, call.target, ctx.groups, facts, ctx.explanation)
        )
        if decision.approval is not None and not ctx.approved:
            return Decision(Effect.APPROVE, "approval required", decision.rule, approval=decision.approval)
        if decision.allowed and call.method == "tools/call" and ctx.route.quotas and call.target is not None:
            return self._invalid_condition(ctx, "quota") or await self._charge(ctx, call.target, facts) or decision
        return decision

    def _drifted(self, ctx: DecisionContext) -> Decision | None:
        """Refuse a call of a tool that ``on_tool_drift`` keeps from agents (changed, or not pinned)."""
        route, call = ctx.route, ctx.call
        if route.tool_pins is None or call.method != "tools/call" or self._drift is None:
            return None
        why = self._drift.refuses(route.name, route.tool_pins, route.on_tool_drift, call.target)
        if why is None:
            return None
        return Decision(Effect.DENY, f"tool_drift: {why}", data={"reason": "tool_drift"})

    def _invalid_condition(self, ctx: DecisionContext, owner: str) -> Decision | None:
        """Refuse a call that a rule's condition or a quota's cost found not to type-check would decide."""
        call = ctx.call
        if not self._health or call.kind is None or call.target is None:
            return None
        broken = self._health.find(ctx.route.name, call.kind, call.target, ctx.groups, owner)
        if broken is None:
            return None
        data = {"reason": "condition_invalid", broken.owner: broken.owner_id, "detail": broken.detail}
        reason = f"{broken.key} does not type-check against {broken.target}: {broken.detail}"
        return Decision(Effect.DENY, reason, rule=broken.owner_id, data=data)

    async def _charge(self, ctx: DecisionContext, tool: str, facts: _Facts) -> Decision | None:
        """Charge every quota counting this call, all or nothing; None when it fits them all."""
        principal = ctx.principal
        identity = principal.identity.key  # issuer + tenant + sub: one person, whichever client or session
        charges: list[Charge] = []
        quota_of: list[str] = []
        for quota in ctx.route.quotas:
            applies = quota.applies_to(tool)
            step = None
            if ctx.explanation is not None:
                step = QuotaStep(quota, applies)
                ctx.explanation.quotas.append(step)
            if not applies:
                continue
            try:
                cost = quota.cost.evaluate(facts.input) if quota.cost is not None else 1.0
                keys = quota.subject_key(ctx.route.name, identity, principal.client_id, principal.groups)
                for key in keys:
                    charges.append(Charge(key, cost, quota.limit, quota.window_seconds))
                    quota_of.append(quota.id)
            except (ConditionEvaluationError, ValueError) as exc:
                detail = exc.reason if isinstance(exc, ConditionEvaluationError) else str(exc)
                if step is not None:
                    step.cost_error = detail
                data = {"reason": "quota_cost", "quota": quota.id, "detail": detail}
                return Decision(Effect.DENY, f"cost of quota {quota.id}: {detail}", rule=quota.id, data=data)
            if step is not None:
                step.cost, step.counters = cost, len(keys)
        if not charges:
            return None
        if self._quotas is None:
            self._observe(ctx.route.name, quota_of, "unavailable")
            return Decision(Effect.DENY, "no quota store", data={"reason": "quota_unavailable"})
        try:
            outcomes = await self._quotas.consume_all(charges, now=ctx.now)
        except QuotaStoreUnavailable as exc:
            log.error("route %s: quota store unavailable, refusing the call: %s", ctx.route.name, exc)
            self._observe(ctx.route.name, quota_of, "unavailable")
            return Decision(Effect.DENY, "quota store unavailable", data={"reason": "quota_unavailable"})
        if ctx.explanation is not None:
            _note_outcomes(ctx.explanation, quota_of, outcomes)
        for quota_id, outcome in zip(quota_of, outcomes, strict=True):
            if not outcome.allowed:
                self._observe(ctx.route.name, [quota_id], "exhausted")
                data = {"reason": "quota", "quota": quota_id, "retryAfterSeconds": outcome.retry_after_seconds}
                return Decision(Effect.THROTTLE, f"quota {quota_id} exhausted", rule=quota_id, data=data)
        self._observe(ctx.route.name, quota_of, "charged")
        return None

    def _observe(self, route: str, quota_ids: list[str], result: str) -> None:
        if self._on_quota is not None:
            for quota_id in dict.fromkeys(quota_ids):  # a per-group quota charges several counters: once per quota
                self._on_quota(route, quota_id, result)


def _note_outcomes(explanation: Explanation, quota_of: list[str], outcomes: list[QuotaOutcome]) -> None:
    """A quota fits when every counter it was charged to had room (``per: group`` may charge several)."""
    steps = {step.quota.id: step for step in explanation.quotas}
    for quota_id, outcome in zip(quota_of, outcomes, strict=True):
        step = steps[quota_id]
        step.fits = outcome.allowed and step.fits is not False


class _Facts:
    """The call as conditions see it (gateway/conditions.py), built once, only if a condition needs it."""

    def __init__(self, ctx: DecisionContext) -> None:
        self._ctx = ctx
        self._input: ConditionInput | None = None
        self.evaluating: str | None = None  # the rule whose condition is being evaluated

    @property
    def input(self) -> ConditionInput:
        if self._input is None:
            ctx, call = self._ctx, self._ctx.call
            principal = ctx.principal
            named = call.target or ""
            self._input = ConditionInput(
                args=call.arguments if isinstance(call.arguments, dict) else {},
                user=ConditionUser(principal.subject, principal.idp_issuer, principal.groups, principal.email),
                client=principal.client_id,
                route=ctx.route.name,
                tool=named if call.kind in ("tools", "prompts") else "",
                uri=named if call.kind == "resources" else "",
                now=datetime.fromtimestamp(ctx.now, UTC),
            )
        return self._input

    def holds(self, rule: Rule) -> bool:
        assert rule.when is not None
        self.evaluating = rule.id
        return rule.when.evaluate(self.input)


def _by_rules(
    policy: RoutePolicy,
    kind: str,
    target: str | None,
    groups: frozenset[str],
    facts: _Facts,
    explanation: Explanation | None = None,
) -> Decision:
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
    try:
        verdict = rules.decide_call(groups, target, facts.holds, explanation.rules if explanation else None)
    except ConditionEvaluationError as exc:
        # A condition that cannot be decided (a missing argument, a value of the wrong type) refuses.
        data = {"reason": "condition_error", "rule": facts.evaluating, "detail": exc.reason}
        return Decision(Effect.DENY, f"condition of rule {facts.evaluating}: {exc.reason}", facts.evaluating, data=data)
    if explanation is not None:
        explanation.verdict = verdict
    effect = Effect.ALLOW if verdict.allowed else Effect.DENY
    data = {"reason": "condition", "rule": verdict.rule} if verdict.by_condition else None
    return Decision(effect, verdict.reason, rule=verdict.rule, data=data, approval=verdict.approval)


def decision_context(principal: Principal, route: RouteConfig, call: Call) -> DecisionContext:
    return DecisionContext(principal, route, call, time.time())
