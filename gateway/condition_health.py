"""Which conditions do not type-check against the tools and prompts an upstream actually offers.

A ``when`` condition compiles on its own (gateway/conditions.py), but whether ``args.amount <= 1000`` makes
sense depends on the tool: ``refund`` may have no ``amount``, or have it as a string. Given an upstream's
catalog (gateway/upstream_catalog.py), every condition is checked with CEL's type checker against the
``inputSchema`` of each tool it applies to, that is each listed tool its rule's allow or deny globs
match (a quota's ``cost`` against each tool the quota counts; a prompt rule's condition against the
prompt's arguments, which are strings).

``check --upstreams`` prints the problems; ``serve`` keeps them in a ``ConditionHealth`` that the decision
engine consults: a call that a rule with a broken condition would decide is refused with
``condition_invalid`` until a later check passes, so a schema change can never quietly turn a condition
into one that is always false (or always true).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from gateway.conditions import MAX_REASON_CHARS
from gateway.config import RouteConfig
from gateway.mcp_methods import NOUNS
from gateway.policy import Rule
from gateway.upstream_catalog import Catalog

CHECKED_KINDS = ("tools", "prompts")  # resources conditions have no arguments to type
MAX_NAME_CHARS = 256


@dataclass(frozen=True)
class ConditionProblem:
    """One condition that does not type-check against one tool or prompt."""

    key: str  # where the condition is in the config: routes[0].tools[1].when, routes[0].quotas[0].cost
    kind: str  # tools / prompts
    name: str  # the tool or prompt
    owner: str  # "rule" or "quota"
    owner_id: str  # the rule's or the quota's id
    problems: tuple[str, ...]
    # The rule whose groups decide whom the problem affects; None for a quota's cost (it counts everyone).
    rule: Rule | None = field(default=None, compare=False)

    @property
    def target(self) -> str:
        # The name comes from the upstream: escaped, so that it cannot break a log or output line.
        name = self.name if self.name.isprintable() else self.name.encode("unicode_escape").decode("ascii")
        return f"{NOUNS[self.kind]} '{name[:MAX_NAME_CHARS]}'"

    @property
    def detail(self) -> str:
        """The problems, short enough for a JSON-RPC error and an audit line."""
        text = "; ".join(self.problems)
        return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."

    def lines(self) -> list[str]:
        """``key: tool 'x': problem``, one line per problem, as ``check --upstreams`` prints them."""
        return [f"{self.key}: {self.target}: {problem}" for problem in self.problems]


def has_conditions(route: RouteConfig) -> bool:
    """Whether anything on the route can be type-checked against its upstream's catalog."""
    return any(quota.cost is not None for quota in route.quotas) or any(
        rule.when is not None for kind in CHECKED_KINDS for rule in route.policy.rules_for(kind).rules or ()
    )


def needs_prompts(route: RouteConfig) -> bool:
    return any(rule.when is not None for rule in route.policy.rules_for("prompts").rules or ())


def checks(route: RouteConfig, index: int, catalog: Catalog) -> Iterator[ConditionProblem | None]:
    """Check every condition of ``route`` (``routes[index]``) against ``catalog``, yielding after each
    check: a problem, or None when that one type-checks (so a caller on an event loop can yield too)."""
    for kind in CHECKED_KINDS:
        named = catalog.tools if kind == "tools" else catalog.prompts
        for i, rule in enumerate(route.policy.rules_for(kind).rules or ()):
            if rule.when is None:
                continue
            patterns = (*rule.allow, *rule.deny)
            for name, schema in named.items():
                if not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
                    continue
                found = rule.when.check_schema(schema)
                key = f"routes[{index}].{kind}[{i}].when"
                yield ConditionProblem(key, kind, name, "rule", rule.id, tuple(found), rule) if found else None
    for i, quota in enumerate(route.quotas):
        if quota.cost is None:
            continue
        for name, schema in catalog.tools.items():
            if not quota.applies_to(name):
                continue
            found = quota.cost.check_schema(schema)
            key = f"routes[{index}].quotas[{i}].cost"
            yield ConditionProblem(key, "tools", name, "quota", quota.id, tuple(found)) if found else None


def find_problems(route: RouteConfig, index: int, catalog: Catalog) -> list[ConditionProblem]:
    return [problem for problem in checks(route, index, catalog) if problem is not None]


class ConditionHealth:
    """The conditions found not to type-check, per route and tool: what the decision engine refuses.

    Empty (and falsy) while every condition type-checks, which keeps the lookup off the hot path."""

    def __init__(self) -> None:
        self._routes: dict[str, dict[tuple[str, str], tuple[ConditionProblem, ...]]] = {}

    def __bool__(self) -> bool:
        return bool(self._routes)

    def set_route(self, route: str, problems: Iterable[ConditionProblem]) -> None:
        """Replace what is known about ``route`` with the result of a complete check."""
        by_target: dict[tuple[str, str], list[ConditionProblem]] = {}
        for problem in problems:
            by_target.setdefault((problem.kind, problem.name), []).append(problem)
        if by_target:
            self._routes[route] = {target: tuple(found) for target, found in by_target.items()}
        else:
            self._routes.pop(route, None)

    def drop(self, route: str) -> None:
        self._routes.pop(route, None)

    def problems(self, route: str) -> list[ConditionProblem]:
        return [problem for found in self._routes.get(route, {}).values() for problem in found]

    def find(self, route: str, kind: str, name: str, groups: frozenset[str], owner: str) -> ConditionProblem | None:
        """A broken condition of an ``owner`` ("rule" or "quota") that would take part in deciding ``name``
        for a user in ``groups``, or None."""
        by_target = self._routes.get(route)
        if by_target is None:
            return None
        for problem in by_target.get((kind, name), ()):
            if problem.owner == owner and (problem.rule is None or problem.rule.applies_to(groups)):
                return problem
        return None
