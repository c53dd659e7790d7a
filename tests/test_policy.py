"""Runtime authorization rules (gateway/policy.py) and their configuration (``_parse_policy``).

Table-driven: each row is one user (a set of IdP groups), one name and the decision the rules must
give. The end-to-end behaviour through a real gateway and real upstreams is in test_runtime_authz.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from gateway.policy import Decision, RoutePolicy, Rule, RuleSet, describe_access

SUPPORT = frozenset({"support"})
ENGINEERING = frozenset({"engineering"})
ALICE = frozenset({"engineering", "support"})
CONTRACTORS = frozenset({"contractors"})
NOBODY: frozenset[str] = frozenset()

# The rules the example describes (and test_runtime_authz.py deploys).
TOOL_RULES = (
    Rule.make(["support"], allow=["echo", "get_*"]),
    Rule.make(["engineering"], allow=["*"], deny=["delete_*"]),
)
RESOURCE_RULES = (Rule.make(["engineering"], allow=["config://*"]),)
PROMPT_RULES = (Rule.make(["*"], allow=["greeting"]),)


def example_policy(required_scopes: tuple[tuple[str, tuple[str, ...]], ...] = ()) -> RoutePolicy:
    return RoutePolicy(RuleSet(TOOL_RULES), RuleSet(RESOURCE_RULES), RuleSet(PROMPT_RULES), required_scopes)


# -- rule semantics --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("groups", "name", "allowed"),
    [
        (SUPPORT, "echo", True),
        (SUPPORT, "get_weather", True),
        (SUPPORT, "add", False),
        (SUPPORT, "delete_everything", False),
        (ENGINEERING, "add", True),
        (ENGINEERING, "echo", True),
        (ENGINEERING, "delete_everything", False),  # deny in the same rule beats its allow *
        (ALICE, "delete_everything", False),  # and beats another group's rule too
        (ALICE, "get_weather", True),
        (CONTRACTORS, "echo", False),  # no rule for the group: nothing
        (NOBODY, "echo", False),
    ],
)
def test_tool_rules_decide_per_group(groups: frozenset[str], name: str, allowed: bool) -> None:
    assert RuleSet(TOOL_RULES).decide(groups, name).allowed is allowed


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("get_weather", True),
        ("get_", True),  # '*' matches the empty string
        ("forget_weather", False),  # globs are anchored at the start...
        ("echo2", False),  # ...and at the end
        ("echo\n", False),
        ("Echo", False),  # and case-sensitive: tool names are identifiers
        ("GET_WEATHER", False),
    ],
)
def test_globs_are_anchored_and_case_sensitive(name: str, allowed: bool) -> None:
    assert RuleSet(TOOL_RULES).decide(SUPPORT, name).allowed is allowed


@pytest.mark.parametrize(
    ("pattern", "name", "allowed"),
    [
        ("get_?eather", "get_weather", True),
        ("get_?eather", "get_wweather", False),
        ("[ae]dd", "add", True),
        ("[!a]dd", "add", False),
        ("config://*", "config://app", True),
        ("config://*", "config://nested/path", True),  # '*' crosses '/' in URIs
        ("config://*", "secret://config://app", False),
    ],
)
def test_glob_patterns(pattern: str, name: str, allowed: bool) -> None:
    rules = RuleSet((Rule.make(["*"], allow=[pattern]),))
    assert rules.decide(SUPPORT, name).allowed is allowed


@pytest.mark.parametrize("deny_first", [False, True], ids=["deny-last", "deny-first"])
@pytest.mark.parametrize(
    ("groups", "name", "allowed"),
    [
        (CONTRACTORS, "add", False),
        (CONTRACTORS, "echo", True),
        (SUPPORT, "add", True),  # the deny rule is for contractors only
        (frozenset({"contractors", "support"}), "add", False),
    ],
)
def test_deny_wins_whatever_the_rule_order(deny_first: bool, groups: frozenset[str], name: str, allowed: bool) -> None:
    allow_all = Rule.make(["*"], allow=["*"])
    deny_add = Rule.make(["contractors"], deny=["add"])
    rules = (deny_add, allow_all) if deny_first else (allow_all, deny_add)
    assert RuleSet(rules).decide(groups, name).allowed is allowed


@pytest.mark.parametrize("groups", [NOBODY, SUPPORT, CONTRACTORS, frozenset({"anything-at-all"})])
def test_star_group_applies_to_every_user_even_without_groups(groups: frozenset[str]) -> None:
    rules = RuleSet(PROMPT_RULES)
    assert rules.decide(groups, "greeting").allowed
    assert not rules.decide(groups, "admin_prompt").allowed


def test_group_names_are_not_globs() -> None:
    rules = RuleSet((Rule.make(["eng*"], allow=["*"]),))
    assert not rules.decide(ENGINEERING, "echo").allowed
    assert rules.decide(frozenset({"eng*"}), "echo").allowed


def test_a_deny_only_rule_allows_nothing() -> None:
    rules = RuleSet((Rule.make(["support"], deny=["delete_*"]),))
    assert not rules.decide(SUPPORT, "echo").allowed


def test_absent_kind_allows_everything_and_empty_list_allows_nothing() -> None:
    absent, empty = RuleSet(None), RuleSet(())
    assert absent.unrestricted and not empty.unrestricted
    for groups in (NOBODY, ALICE):
        assert absent.decide(groups, "delete_everything") == Decision(True, "no rules")
        assert empty.decide(groups, "echo") == Decision(False, "no rule allows it")


@pytest.mark.parametrize(
    ("groups", "name", "decision"),
    [
        (SUPPORT, "echo", Decision(True, "allowed by support rule")),
        (ALICE, "delete_everything", Decision(False, "denied by engineering rule")),
        (CONTRACTORS, "echo", Decision(False, "no rule allows it")),
    ],
)
def test_decisions_give_the_reason_the_audit_log_records(groups: frozenset[str], name: str, decision: Decision) -> None:
    assert RuleSet(TOOL_RULES).decide(groups, name) == decision


def test_memoised_decisions_are_per_group_set() -> None:
    rules = RuleSet(TOOL_RULES)
    assert not rules.decide(SUPPORT, "add").allowed
    assert rules.decide(ENGINEERING, "add").allowed
    assert not rules.decide(SUPPORT, "add").allowed


# -- scopes per method ------------------------------------------------------------------------------

REQUIRED_SCOPES = (
    ("tools/*", ("mcp:tools",)),
    ("tools/call", ("mcp:tools:call", "mcp:tools")),
    ("resources/read", ("mcp:read",)),
)


@pytest.mark.parametrize(
    ("method", "scopes", "missing"),
    [
        ("tools/call", ("mcp",), ("mcp:tools", "mcp:tools:call")),  # every matching glob, no duplicates
        ("tools/call", ("mcp", "mcp:tools"), ("mcp:tools:call",)),
        ("tools/call", ("mcp", "mcp:tools", "mcp:tools:call"), ()),
        ("tools/list", ("mcp",), ("mcp:tools",)),
        ("resources/read", (), ("mcp:read",)),
        ("resources/list", ("mcp",), ()),
        ("prompts/get", ("mcp",), ()),
        ("Tools/call", ("mcp",), ()),  # method names are case-sensitive
        ("initialize", (), ()),
    ],
)
def test_missing_scopes_follow_method_globs(method: str, scopes: tuple[str, ...], missing: tuple[str, ...]) -> None:
    assert example_policy(REQUIRED_SCOPES).missing_scopes(method, scopes) == missing


def test_no_required_scopes_means_nothing_is_missing() -> None:
    assert example_policy().missing_scopes("tools/call", ()) == ()


# -- list filtering ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "key", "items", "kept"),
    [
        (
            "tools/list",
            "tools",
            [{"name": "echo"}, {"name": "add"}, {"name": "get_weather"}, {"name": "delete_everything"}],
            [{"name": "echo"}, {"name": "get_weather"}],
        ),
        (
            "resources/list",
            "resources",
            [{"uri": "config://app", "name": "app"}, {"uri": "secret://payroll", "name": "payroll"}],
            [],  # support has no resource rule
        ),
        (
            "resources/templates/list",
            "resourceTemplates",
            [{"uriTemplate": "config://{name}"}, {"uriTemplate": "secret://{id}"}],
            [],
        ),
        ("prompts/list", "prompts", [{"name": "greeting"}, {"name": "admin_prompt"}], [{"name": "greeting"}]),
    ],
)
def test_filter_list_keeps_what_support_may_use(
    method: str, key: str, items: list[dict[str, Any]], kept: list[dict[str, Any]]
) -> None:
    result = {key: items, "nextCursor": "page-2"}
    original = copy.deepcopy(result)
    assert example_policy().filter_lists(result, SUPPORT) == {key: kept, "nextCursor": "page-2"}
    assert result == original  # the upstream's result is not mutated


@pytest.mark.parametrize(
    ("method", "key", "items", "kept"),
    [
        (
            "resources/list",
            "resources",
            [{"uri": "config://app"}, {"uri": "secret://payroll"}],
            [{"uri": "config://app"}],
        ),
        (
            "resources/templates/list",
            "resourceTemplates",
            [{"uriTemplate": "config://{name}", "name": "cfg"}, {"uriTemplate": "secret://{id}", "name": "sec"}],
            [{"uriTemplate": "config://{name}", "name": "cfg"}],
        ),
    ],
)
def test_filter_list_matches_resources_by_uri_and_templates_by_uri_template(
    method: str, key: str, items: list[dict[str, Any]], kept: list[dict[str, Any]]
) -> None:
    assert example_policy().filter_lists({key: items}, ENGINEERING) == {key: kept}


def test_filter_list_drops_items_without_a_usable_name() -> None:
    items = [{"name": "echo"}, {"name": 5}, {"title": "no name"}, "echo", None, {"name": ["echo"]}]
    assert example_policy().filter_lists({"tools": items}, SUPPORT) == {"tools": [{"name": "echo"}]}


@pytest.mark.parametrize(
    "result", [{"tools": [{"name": "delete_everything"}]}, {"tools": "not a list"}, {}], ids=["list", "odd", "none"]
)
def test_filter_list_leaves_unrestricted_or_shapeless_results_alone(result: dict[str, Any]) -> None:
    unrestricted = RoutePolicy.unrestricted()
    assert unrestricted.filter_lists(result, NOBODY) is result
    if not isinstance(result.get("tools"), list):
        assert example_policy().filter_lists(result, SUPPORT) is result


# -- configuration ----------------------------------------------------------------------------------


def config_with(route: dict[str, Any], *, index: int = 0) -> dict[str, Any]:
    """A valid config whose route number ``index`` has the given extra keys."""
    routes = [
        {"name": f"route-{i}", "path": f"/r{i}/mcp", "upstream": "http://127.0.0.1:9/mcp"} for i in range(index + 1)
    ]
    routes[index].update(route)
    return {
        "public_url": "https://mcp.example.com",
        "authorization": {
            "clients": [{"client_id": "agent", "client_secret": "agent-secret-0123456789"}],
            "identity_providers": [{"issuer": "https://idp.example.com"}],
        },
        "routes": routes,
    }


@pytest.mark.parametrize(
    ("route", "key", "problem"),
    [
        ({"tools": "echo"}, "routes[0].tools", "must be a list of rules"),
        ({"tools": {"groups": ["support"]}}, "routes[0].tools", "must be a list of rules"),
        ({"tools": ["echo"]}, "routes[0].tools[0]", "must be a mapping"),
        ({"tools": [{"groups": ["support"], "alow": ["echo"]}]}, "routes[0].tools[0].alow", "unknown key"),
        ({"resources": [{"allow": ["config://*"]}]}, "routes[0].resources[0].groups", "is required"),
        ({"resources": [{"groups": [], "allow": ["x"]}]}, "routes[0].resources[0].groups", "is required"),
        ({"prompts": [{"groups": ["*"], "allow": "greeting"}]}, "routes[0].prompts[0].allow", "non-empty strings"),
        ({"prompts": [{"groups": ["*"], "allow": [""]}]}, "routes[0].prompts[0].allow", "non-empty strings"),
        ({"tools": [{"groups": "support", "allow": ["x"]}]}, "routes[0].tools[0].groups", "non-empty strings"),
        ({"tools": [{"groups": ["support"]}]}, "routes[0].tools[0]", "needs allow and/or deny"),
        (
            {"tools": [{"groups": ["support"], "allow": ["echo"]}, {"groups": ["x"], "deny": [3]}]},
            "routes[0].tools[1].deny",
            "non-empty strings",
        ),
        (
            {"require_scopes": {"tools/call": ["mcp:tools:call"]}},
            "routes[0].require_scopes.tools/call",
            "scope 'mcp:tools:call' is not in this route's scopes",
        ),
        (
            {"scopes": ["mcp", "mcp:tools:call"], "require_scopes": {"tools/*": ["mcp:tools:call", "mcp:admin"]}},
            "routes[0].require_scopes.tools/*",
            "scope 'mcp:admin' is not in this route's scopes",
        ),
        ({"require_scopes": {"tools/call": []}}, "routes[0].require_scopes.tools/call", "non-empty list"),
        ({"require_scopes": {"tools/call": "mcp"}}, "routes[0].require_scopes.tools/call", "non-empty strings"),
        ({"require_scopes": ["tools/call"]}, "routes[0].require_scopes", "must be a mapping"),
    ],
)
def test_bad_rules_are_reported_with_their_key_path(route: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with(route), source="gw.yaml")
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"gw.yaml: {key}: ")


def test_key_paths_name_the_route_by_its_index() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with({"prompts": [{"groups": ["*"]}]}, index=2))
    assert caught.value.key == "routes[2].prompts[0]"


def test_parsed_rules_drive_the_route_policy() -> None:
    route = {
        "scopes": ["mcp", "mcp:tools:call"],
        "tools": [
            {"groups": ["support"], "allow": ["echo", "get_*"]},
            {"groups": ["engineering"], "allow": ["*"], "deny": ["delete_*"]},
        ],
        "resources": [],
        "require_scopes": {"tools/call": ["mcp:tools:call"], "prompts/*": ["mcp"]},
    }
    policy = parse_config(config_with(route)).routes[0].policy
    assert policy.tools.decide(SUPPORT, "get_weather").allowed
    assert not policy.tools.decide(ALICE, "delete_everything").allowed
    assert not policy.resources.decide(ALICE, "config://app").allowed  # empty list: none
    assert policy.prompts.unrestricted  # absent: all
    assert policy.required_scopes == (("tools/call", ("mcp:tools:call",)), ("prompts/*", ("mcp",)))
    assert policy.missing_scopes("tools/call", ("mcp",)) == ("mcp:tools:call",)


def test_route_without_rules_is_unrestricted() -> None:
    policy = parse_config(config_with({})).routes[0].policy
    assert all(policy.rules_for(kind).unrestricted for kind in ("tools", "resources", "prompts"))
    assert policy.required_scopes == ()


def test_an_explicit_null_rule_list_is_refused_rather_than_read_as_allow_all() -> None:
    """``tools:`` with every rule below it commented out is YAML null. Reading that as "no rules"
    silently opens every tool; the config module's contract is that a slip never opens a route."""
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with({"tools": None}))
    assert caught.value.key == "routes[0].tools"


# -- check --as-groups ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("groups", "lines"),
    [
        (
            SUPPORT,
            [
                "tools: allow echo, get_*",
                "resources: none",
                "prompts: allow greeting",
                "scope required for tools/call: mcp:tools:call",
            ],
        ),
        (
            ALICE,
            [
                "tools: allow echo, get_*, *; deny delete_*",
                "resources: allow config://*",
                "prompts: allow greeting",
                "scope required for tools/call: mcp:tools:call",
            ],
        ),
        (
            CONTRACTORS,
            [
                "tools: none",
                "resources: none",
                "prompts: allow greeting",
                "scope required for tools/call: mcp:tools:call",
            ],
        ),
    ],
)
def test_describe_access_shows_what_a_group_may_use(groups: frozenset[str], lines: list[str]) -> None:
    policy = example_policy((("tools/call", ("mcp:tools:call",)),))
    assert describe_access(policy, groups) == lines


def test_describe_access_of_an_unrestricted_route() -> None:
    assert describe_access(RoutePolicy.unrestricted(), SUPPORT) == [
        "tools: all (no rules)",
        "resources: all (no rules)",
        "prompts: all (no rules)",
    ]
