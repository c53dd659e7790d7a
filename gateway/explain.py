"""``mcp-gateway check --explain``: one call decided exactly as the gateway would, every step shown.

The call takes the proxied path's own code: its JSON-RPC message is read by the strict body reader
(gateway/proxy/request_body.py), classified, and planned by ``plan_request`` (gateway/enforce.py) with
a decision engine that records each step in an :class:`~gateway.engine.Explanation` as it is taken,
so what is printed is that decision, not a second reading of the rules. Nothing outside the process
is contacted: no upstream, no IdP, no shared quota store. Quotas are charged to a fresh in-memory store
that is thrown away, so the output says what the call *would* be charged and no real counter moves.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config import GatewayConfig, RouteConfig
from gateway.enforce import QUOTA_EXCEEDED, Plan, plan_request
from gateway.engine import DecisionEngine, Explanation, QuotaStep
from gateway.mcp_methods import KINDS, NOUNS
from gateway.oauth.access_token import Principal
from gateway.policy import Decision as RulesDecision
from gateway.policy import Rule, RuleSet, RuleStep
from gateway.proxy.request_body import BodyRefused, canonical_json, read_rpc_body
from gateway.quotas import MemoryQuotaStore, QuotaRule
from gateway.tool_pins import DriftState

# The request each kind is explained as, and the params member naming its target.
_METHODS: Mapping[str, tuple[str, str]] = {
    "tools": ("tools/call", "name"),
    "prompts": ("prompts/get", "name"),
    "resources": ("resources/read", "uri"),
}
_UNITS = (("d", 86400), ("h", 3600), ("m", 60))


class ExplainError(ValueError):
    """A question ``--explain`` cannot answer (unknown route, arguments that are not a JSON object):
    one line, exit status 2."""


@dataclass(frozen=True)
class Question:
    route: str
    target: str  # the tool or prompt name, or the resource URI
    arguments: str | None  # the JSON text given on the command line
    groups: frozenset[str]
    kind: str
    user: str  # the ``sub``
    client: str | None = None  # None: the first configured client


def explain(config: GatewayConfig, question: Question) -> list[str]:
    """The explanation, one output line each; raises ExplainError for a question that makes no sense."""
    route = next((r for r in config.routes if r.name == question.route), None)
    if route is None:
        names = ", ".join(r.name for r in config.routes)
        raise ExplainError(f"no route named {question.route!r} in {config.source} (routes: {names})")
    if question.kind not in KINDS:
        raise ExplainError(f"--kind must be one of {', '.join(KINDS)}, got {question.kind!r}")
    arguments = _arguments(question)
    method, key = _METHODS[question.kind]
    params: dict[str, Any] = {key: question.target}
    if arguments is not None:
        params["arguments"] = arguments
    try:
        rpc = read_rpc_body(canonical_json({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
    except BodyRefused as refused:  # nested deeper than any client may send
        raise ExplainError(f"--explain arguments would be refused: {refused.message}") from None
    principal = _principal(config, route, question)
    lines = [
        f"route {route.name}: {method} {question.target!r} as user {principal.subject} (idp {principal.idp_issuer}), "
        f"client {principal.client_id}, groups {_names(principal.groups) or '(none)'}",
    ]
    if arguments is not None:
        lines.append(f"arguments: {json.dumps(arguments, ensure_ascii=False)}")
    if route.allow_groups is not None and not set(route.allow_groups) & set(principal.groups):
        lines.append(f"access: these groups are not in the route's allow_groups ({_names(route.allow_groups)})")
        lines.append("decision: deny (no access token is granted for this route: the grant fails with invalid_grant)")
        return lines
    needed = route.policy.missing_scopes(method, ())
    if needed:
        lines.append(
            f"scopes: {method} needs {' '.join(needed)} (assumed granted: the token is taken to carry every "
            "scope of the route; one without gets 403 insufficient_scope and steps up)"
        )
    explanation = Explanation()
    # A throwaway store: the same charging code runs, against counters nobody else reads.
    # No list seen (nothing is contacted): of the pins, only "not pinned" under on_tool_drift: hide decides.
    engine = DecisionEngine(MemoryQuotaStore(), tool_drift=DriftState())
    plan = asyncio.run(plan_request(rpc, {}, engine, principal, route, explanation=explanation))
    lines += _rules(question.kind, route.policy.rules_for(question.kind), explanation)
    lines += _decision(route, plan)
    if method == "tools/call" and route.quotas:
        lines += _quotas(route.quotas, question.target, explanation)
    return lines


def _arguments(question: Question) -> dict[str, Any] | None:
    if question.arguments is None:
        return {} if question.kind != "resources" else None
    if question.kind == "resources":
        raise ExplainError("a resource read takes no arguments (give only the URI)")
    try:
        value = json.loads(question.arguments, parse_constant=_not_json, parse_float=_finite)
    except ValueError as exc:
        raise ExplainError(f"--explain arguments are not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ExplainError(f"--explain arguments must be a JSON object, got {_json_type(value)}")
    return value


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a double")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"


def _principal(config: GatewayConfig, route: RouteConfig, question: Question) -> Principal:
    auth = config.authorization
    client = question.client if question.client is not None else auth.clients[0].client_id
    idp = auth.identity_providers[0].issuer if auth.identity_providers else ""
    return Principal(
        subject=question.user,
        client_id=client,
        idp_issuer=idp,
        audience=route.resource,
        scopes=route.scopes,
        groups=tuple(sorted(question.groups)),
        expires_at=time.time() + auth.access_token_ttl_seconds,
        token_id="check-explain",
    )


def _rules(kind: str, rules: RuleSet, explanation: Explanation) -> list[str]:
    noun = NOUNS[kind]
    if rules.rules is None:
        return [f"rules for {kind}: none on this route (every {noun} is allowed)"]
    if not rules.rules:
        return [f"rules for {kind}: an empty list (no {noun} is allowed)"]
    lines = [f"rules for {kind}, in order (deny wins over allow):"]
    steps, verdict = explanation.rules, explanation.verdict
    for i, rule in enumerate(rules.rules):
        lines.append("  " + _rule_line(rule))
        if i < len(steps):
            lines.append("    " + _step_line(steps[i]) + _outcome(steps[i], verdict))
        elif steps:
            lines.append("    not reached: an earlier rule decided")
        else:
            lines.append("    not consulted: the call was decided before the rules (see the decision)")
    return lines


def _outcome(step: RuleStep, verdict: RulesDecision | None) -> str:
    if verdict is None or verdict.rule != step.rule.id:
        return ""
    if verdict.allowed:
        return " -> this rule decides: allow"
    if step.denies:
        return " -> this rule decides: deny"
    return " -> this rule decides: deny (its condition is false and no other rule allows)"


def _rule_line(rule: Rule) -> str:
    parts = [f"rule {rule.id}: groups {_names(rule.groups)}"]
    if rule.allow:
        parts.append(f"allow {_names(rule.allow)}")
    if rule.deny:
        parts.append(f"deny {_names(rule.deny)}")
    if rule.when is not None:
        parts.append(f"when {rule.when.source}")
    if rule.approval is not None:
        who = f"a member of {_names(rule.approval.approver_groups)}" if rule.approval.delegated else "the caller"
        parts.append(f"require_approval by {who} within {rule.approval.timeout_seconds} s")
    return "; ".join(parts)


def _step_line(step: RuleStep) -> str:
    if not step.applies:
        return "applies to these groups: no"
    parts = ["applies to these groups: yes"]
    rule = step.rule
    if rule.deny:
        parts.append("deny pattern: " + ("matches" if step.deny_matches else "no match"))
    if rule.allow:
        if step.allow_matches is None:
            why = "this rule denies" if step.denies else "an earlier rule already allows"
            parts.append(f"allow pattern: not checked ({why})")
        else:
            parts.append("allow pattern: " + ("matches" if step.allow_matches else "no match"))
    if rule.when is not None:
        if step.condition_error is not None:
            parts.append(f"condition: error: {step.condition_error}")
        elif step.condition is None:
            parts.append("condition: not evaluated (no pattern matches)")
        else:
            parts.append(f"condition: {'true' if step.condition else 'false'}")
    return "; ".join(parts)


def _decision(route: RouteConfig, plan: Plan) -> list[str]:
    record = plan.calls[0]
    by = f" by rule {record.rule}" if record.rule else ""
    if record.allowed:
        return [
            f"decision: allow{by}: {record.reason}",
            f"forwarded to: {route.upstream} (check contacts nothing)",
        ]
    response = plan.local_responses[0]
    effect = "throttle" if response["error"]["code"] == QUOTA_EXCEEDED else "deny"
    if response["error"]["data"].get("reason") == "approval_required":
        return [
            f'decision: ask for approval{by}: the call is forwarded once a person approves it (see README "Approvals")',
        ]
    if "quota" in response["error"]["data"]:  # refused by a quota (exhausted, or its cost failed)
        by = f" by quota {record.rule}"
    return [
        f"decision: {effect}{by}: {record.reason}",
        f"the client gets: {json.dumps(response, ensure_ascii=False)}",
    ]


def _quotas(quotas: tuple[QuotaRule, ...], tool: str, explanation: Explanation) -> list[str]:
    steps = {step.quota.id: step for step in explanation.quotas}
    refused = any(step.fits is False for step in steps.values())
    lines = ["quotas (counted in a fresh window: live counters are neither read nor charged):"]
    for quota in quotas:
        cost = quota.cost_source if quota.cost_source is not None else "1"
        lines.append(
            f"  quota {quota.id}: per {quota.per}; tools {_names(quota.tools)}; "
            f"limit {_number(quota.limit)} per {_duration(quota.window_seconds)}; cost {cost}"
        )
        step = steps.get(quota.id)
        if step is not None:
            lines.append("    " + _quota_line(step, refused))
        elif not quota.applies_to(tool):
            lines.append("    counts this tool: no")
        elif explanation.quotas:
            lines.append("    not reached: an earlier quota refused the call")
        else:
            lines.append("    not charged: the call is refused before quotas")
    return lines


def _quota_line(step: QuotaStep, refused: bool) -> str:
    """``refused``: some quota has no room, and charging is all or nothing."""
    if not step.applies:
        return "counts this tool: no"
    if step.cost_error is not None:
        return f"counts this tool: yes; cost: error: {step.cost_error}"
    cost = _number(step.cost or 0)
    counters = f" to each of {step.counters} counters (one per group)" if step.counters > 1 else ""
    if step.fits is False:
        return (
            f"counts this tool: yes; cost {cost}: more than the limit {_number(step.quota.limit)}, "
            "refused even in an empty window"
        )
    if step.fits is None:
        return f"counts this tool: yes; cost {cost}: not charged (another quota's cost refused the call)"
    if refused:
        return f"counts this tool: yes; cost {cost}: fits, but not charged (another quota refuses the call)"
    return f"counts this tool: yes; cost {cost}: would be charged {cost}{counters}"


def _names(values: Any) -> str:
    return ", ".join(sorted(values)) if isinstance(values, frozenset) else ", ".join(values)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


def _duration(seconds: int) -> str:
    for unit, size in _UNITS:
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
