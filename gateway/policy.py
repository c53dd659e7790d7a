"""Runtime authorization: which tools, resources and prompts a user may list and use on a route.

Enterprise-managed authorization decides *who reaches which server*; this decides *what they may do
there*. One rule set per kind (tools, resources, prompts) drives both enforcement points, so a name
hidden from ``tools/list`` is the same name refused on ``tools/call``:

    permitted(name) = some rule whose groups meet the user's allows the name
                      and no rule whose groups meet the user's denies it      (deny wins)

A kind without rules allows everything; a kind with an empty rule list allows nothing. Globs are
``fnmatch`` patterns, compiled once; decisions are memoised per (groups, name) because the same agent
lists and calls the same few tools over and over.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from gateway.approvals.spec import ApprovalSpec, parse_approval
from gateway.conditions import Condition, ConditionError, ConditionEvaluationError, compile_condition
from gateway.mcp_methods import KINDS, LIST_RESULT_KEYS

ANY_GROUP = "*"
_RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\[\]-]{0,63}$")
# Names and URIs longer than this are refused before any decision or cache: MCP tool names are at
# most 128 characters (2025-11-25 "Tool names"), and attacker-sized strings must not fill caches.
MAX_TARGET_CHARS = 1024
# Dot segments (RFC 3986 §3.3), their ';'-parameter forms that Tomcat/Jetty-style servers still
# resolve, and percent-encoded '.', '/' and '\\' let one URI match a glob and name another resource.
_UNSAFE_URI = re.compile(r"(?:^|[/\\])\.{1,2}(?:;[^/\\]*)?(?:[/\\?#]|$)|%2e|%2f|%5c|\\", re.IGNORECASE)


def target_problem(kind: str, target: str) -> str | None:
    """Why ``target`` cannot be decided on by name at all, or None."""
    if len(target) > MAX_TARGET_CHARS:
        return f"name longer than {MAX_TARGET_CHARS} characters"
    if kind == "resources" and _UNSAFE_URI.search(target):
        return "resource URI with dot segments or encoded separators"
    return None


def _compile(patterns: Iterable[str]) -> re.Pattern[str] | None:
    patterns = list(patterns)
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


@dataclass(frozen=True)
class Rule:
    groups: frozenset[str]
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    id: str = ""  # ``id`` from the config, else its place: "tools[0]"
    # ``when``: the rule applies only when this CEL condition holds for the call (gateway/conditions.py).
    when: Condition | None = field(default=None, compare=False)
    # ``require_approval``: an allow this rule gives holds only once a person approved the call.
    approval: ApprovalSpec | None = None
    _allow: re.Pattern[str] | None = field(default=None, compare=False, repr=False)
    _deny: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def make(
        cls,
        groups: Iterable[str],
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
        rule_id: str = "",
        when: Condition | None = None,
        approval: ApprovalSpec | None = None,
    ) -> Rule:
        allow, deny = tuple(allow), tuple(deny)
        return cls(frozenset(groups), allow, deny, rule_id, when, approval, _compile(allow), _compile(deny))

    def applies_to(self, groups: frozenset[str]) -> bool:
        return ANY_GROUP in self.groups or not self.groups.isdisjoint(groups)


@dataclass(frozen=True)
class Decision:
    """What a kind's rules say about one name (the engine's input, gateway/engine.py)."""

    allowed: bool
    reason: str
    rule: str | None = None
    # Refused because a ``when`` condition was false (or could not be evaluated), not by a name rule.
    by_condition: bool = False
    # Allowed by a rule with ``require_approval``: the engine asks before it allows (gateway/approvals/).
    approval: ApprovalSpec | None = None


@dataclass
class RuleStep:
    """One rule as a call's decision went through it, recorded for ``check --explain``.

    ``None`` means "not checked": the rule does not apply, has no such patterns, or (for ``allow``) an
    earlier rule already allows the name, so this one cannot change the outcome unless it denies."""

    rule: Rule
    applies: bool
    deny_matches: bool | None = None
    allow_matches: bool | None = None
    condition: bool | None = None  # the ``when`` result; None when it was not evaluated
    condition_error: str | None = None  # why the ``when`` could not be evaluated
    denies: bool = False  # its deny pattern matched (and its condition held): the walk ends here


class RuleSet:
    """The rules of one kind on one route."""

    def __init__(self, rules: tuple[Rule, ...] | None) -> None:
        self.rules = rules
        self.decide = lru_cache(maxsize=4096)(self._decide)
        self.conditional = any(rule.when is not None for rule in rules or ())
        self.asks = any(rule.approval is not None for rule in rules or ())  # some allow needs approval

    @property
    def unrestricted(self) -> bool:
        return self.rules is None

    def _decide(self, groups: frozenset[str], name: str) -> Decision:
        """By names alone, for lists: a conditional allow may hold for some call, so it lists the name;
        a conditional deny may not, so it does not hide it. Calls use ``decide_call``."""
        return self._walk(groups, name, deny_holds=_never, allow_holds=_always)

    def decide_call(
        self,
        groups: frozenset[str],
        name: str,
        holds: Callable[[Rule], bool],
        trace: list[RuleStep] | None = None,
    ) -> Decision:
        """For one call: a rule with ``when`` applies only if ``holds(rule)`` (its condition is true for
        this call); deny still wins. ``holds`` raises ``ConditionEvaluationError`` when a condition
        cannot be decided, which refuses the call. ``trace`` (for ``check --explain``) receives one
        ``RuleStep`` per rule visited, from this same walk, so an explanation cannot drift from it."""
        if trace is None and not self.conditional:
            return self.decide(groups, name)  # without conditions, calls decide as lists do (cached)
        return self._walk(groups, name, deny_holds=holds, allow_holds=holds, trace=trace)

    def _walk(
        self,
        groups: frozenset[str],
        name: str,
        *,
        deny_holds: Callable[[Rule], bool],
        allow_holds: Callable[[Rule], bool],
        trace: list[RuleStep] | None = None,
    ) -> Decision:
        """The one decision algorithm, in rule order: the first applying rule whose deny pattern matches
        (and whose ``when`` holds) refuses; else the first applying rule whose allow pattern matches
        (and whose ``when`` holds) permits; else a matching allow whose condition was false refuses
        "by condition"; else nothing allows it."""
        if self.rules is None:
            return Decision(True, "no rules")
        allowed_by: Rule | None = None
        refused_by: Rule | None = None  # a matching allow rule whose condition is false
        for rule in self.rules:
            applies = rule.applies_to(groups)
            step = None
            if trace is not None:
                step = RuleStep(rule, applies)
                trace.append(step)
            if not applies:
                continue
            if rule._deny is not None:
                matches = rule._deny.match(name) is not None
                if step is not None:
                    step.deny_matches = matches
                if matches and (rule.when is None or _holds(deny_holds, rule, step)):
                    if step is not None:
                        step.denies = True
                    by_condition = rule.when is not None
                    suffix = " (condition)" if by_condition else ""
                    reason = f"denied by {','.join(sorted(rule.groups))} rule{suffix}"
                    return Decision(False, reason, rule.id or None, by_condition)
            if allowed_by is None and rule._allow is not None:
                matches = rule._allow.match(name) is not None
                if step is not None:
                    step.allow_matches = matches
                if not matches:
                    continue
                if rule.when is None or _holds(allow_holds, rule, step):
                    allowed_by = rule
                elif refused_by is None:
                    refused_by = rule
        if allowed_by is not None:
            reason = f"allowed by {','.join(sorted(allowed_by.groups))} rule"
            return Decision(True, reason, allowed_by.id or None, approval=allowed_by.approval)
        if refused_by is not None:
            return Decision(False, f"condition of rule {refused_by.id} is false", refused_by.id or None, True)
        return Decision(False, "no rule allows it")


def _always(rule: Rule) -> bool:
    return True


def _never(rule: Rule) -> bool:
    return False


def _holds(holds: Callable[[Rule], bool], rule: Rule, step: RuleStep | None) -> bool:
    """``holds(rule)``, noting the result (or why there is none) in the explain step if one is kept."""
    if step is None:
        return holds(rule)
    try:
        step.condition = holds(rule)
    except ConditionEvaluationError as exc:
        step.condition_error = exc.reason
        raise
    return step.condition


@dataclass(frozen=True)
class RoutePolicy:
    """All runtime rules of one route."""

    tools: RuleSet
    resources: RuleSet
    prompts: RuleSet
    # JSON-RPC method glob -> scopes a token must carry to call it.
    required_scopes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @classmethod
    def unrestricted(cls) -> RoutePolicy:
        return cls(RuleSet(None), RuleSet(None), RuleSet(None))

    def rules_for(self, kind: str) -> RuleSet:
        return {"tools": self.tools, "resources": self.resources, "prompts": self.prompts}[kind]

    def missing_scopes(self, method: str, scopes: Collection[str]) -> tuple[str, ...]:
        """RFC 6750 §3.1 ``insufficient_scope``: the scopes ``method`` needs that the token lacks (asked on
        every request; most routes have no ``require_scopes``)."""
        if not self.required_scopes:
            return ()
        missing: list[str] = []
        for pattern, needed in self.required_scopes:
            if fnmatch.fnmatchcase(method, pattern):
                missing.extend(s for s in needed if s not in scopes and s not in missing)
        return tuple(missing)

    @property
    def restricts_lists(self) -> bool:
        return not (self.tools.unrestricted and self.resources.unrestricted and self.prompts.unrestricted)

    def permits(self, kind: str, name: Any, groups: frozenset[str]) -> bool:
        rules = self.rules_for(kind)
        if rules.unrestricted:
            return True
        return isinstance(name, str) and target_problem(kind, name) is None and rules.decide(groups, name).allowed

    def filter_lists(self, result: dict[str, Any], groups: frozenset[str]) -> dict[str, Any]:
        """Drop the entries ``groups`` may not use from every list in a result, recognised by shape
        (``tools``, ``resources``, ``resourceTemplates``, ``prompts``), whatever request it answers."""
        filtered = result
        for key, (kind, item_key) in LIST_RESULT_KEYS.items():
            items = result.get(key)
            if not isinstance(items, list) or self.rules_for(kind).unrestricted:
                continue
            kept = [item for item in items if isinstance(item, dict) and self.permits(kind, item.get(item_key), groups)]
            if len(kept) != len(items):
                filtered = {**filtered, key: kept}
        return filtered


def parse_rules(value: Any, key: str, error: Any) -> tuple[Rule, ...] | None:
    """Validate one kind's rule list from YAML; ``error(key, problem)`` builds the ConfigError."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise error(key, "must be a list of rules ({groups, allow, deny})")
    rules = []
    seen_ids: set[str] = set()
    kind = key.rpartition(".")[2]
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise error(where, "must be a mapping with groups, allow and/or deny")
        unknown = sorted(set(item) - {"id", "groups", "allow", "deny", "when", "require_approval"})
        if unknown:
            raise error(
                f"{where}.{unknown[0]}", "unknown key (expected id, groups, allow, deny, when, require_approval)"
            )
        lists = {}
        for name in ("groups", "allow", "deny"):
            entries = item.get(name, [])
            if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
                raise error(f"{where}.{name}", "must be a list of non-empty strings")
            lists[name] = entries
        if not lists["groups"]:
            raise error(f"{where}.groups", 'is required (use ["*"] for every user)')
        if not lists["allow"] and not lists["deny"]:
            raise error(where, "needs allow and/or deny patterns")
        rule_id = item.get("id", f"{key.rpartition('.')[2]}[{i}]")
        if not isinstance(rule_id, str) or not _RULE_ID.match(rule_id):
            raise error(f"{where}.id", "must be 1-64 letters, digits, '_', '-', '.', '[' or ']'")
        if rule_id in seen_ids:
            raise error(f"{where}.id", f"duplicate rule id '{rule_id}'")
        seen_ids.add(rule_id)
        approval = _approval(item, where, kind, lists, error)
        rules.append(
            Rule.make(
                lists["groups"], lists["allow"], lists["deny"], rule_id, _when(item, where, kind, error), approval
            )
        )
    return tuple(rules)


def _approval(
    item: dict[str, Any], where: str, kind: str, lists: dict[str, list[str]], error: Any
) -> ApprovalSpec | None:
    approval = parse_approval(item.get("require_approval"), f"{where}.require_approval", error)
    if approval is None:
        return None
    if kind != "tools":
        # Only tools/call has an approval round in every protocol generation the gateway serves.
        raise error(f"{where}.require_approval", "is only for tools rules")
    if not lists["allow"] or lists["deny"]:
        raise error(f"{where}.require_approval", "needs a rule with allow patterns and no deny patterns")
    return approval


def _when(item: dict[str, Any], where: str, kind: str, error: Any) -> Condition | None:
    if "when" not in item:
        return None
    source = item["when"]
    if not isinstance(source, str) or not source.strip():
        raise error(f"{where}.when", "must be a CEL expression (a non-empty string)")
    try:
        return compile_condition(source, kind=kind)
    except ConditionError as exc:
        raise error(f"{where}.when", str(exc)) from None


def describe_access(policy: RoutePolicy, groups: frozenset[str]) -> list[str]:
    """Human-readable effect of the rules for ``check --as-groups``."""
    lines = []
    for kind in KINDS:
        rules = policy.rules_for(kind)
        if rules.unrestricted:
            lines.append(f"{kind}: all (no rules)")
            continue
        applying = [r for r in rules.rules or () if r.applies_to(groups)]
        allow = [p + _qualifiers(r) for r in applying for p in r.allow]
        deny = [p + _qualifiers(r) for r in applying for p in r.deny]
        if not allow:
            lines.append(f"{kind}: none")
        else:
            lines.append(f"{kind}: allow {', '.join(allow)}" + (f"; deny {', '.join(deny)}" if deny else ""))
    for pattern, scopes in policy.required_scopes:
        lines.append(f"scope required for {pattern}: {' '.join(scopes)}")
    return lines


def _qualifiers(rule: Rule) -> str:
    """What else a rule needs than a matching name: a pattern listed bare would read as always holding."""
    parts = []
    if rule.when is not None:
        parts.append(f"when {rule.when.source}")
    if rule.approval is not None:
        parts.append("with approval")
    return f" ({'; '.join(parts)})" if parts else ""
