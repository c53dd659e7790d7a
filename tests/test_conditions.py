"""CEL conditions (gateway/conditions.py): compile errors, evaluation, costs, and typing ``args`` against a
tool's JSON Schema ``inputSchema``. Pure and table-driven: no gateway, no network."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.conditions import (
    MAX_SCHEMA_PROPERTIES,
    MAX_SOURCE_CHARS,
    ConditionError,
    ConditionEvaluationError,
    ConditionInput,
    ConditionUser,
    compile_condition,
    compile_cost,
)

ALICE = ConditionUser(sub="alice", idp="https://idp.example", groups=("support", "finance"), email="alice@example.com")
BOB = ConditionUser(sub="bob", idp="https://idp.example", groups=("engineering",))
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

REFUND_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "amount": {"type": "number"},
        "count": {"type": "integer"},
        "currency": {"type": "string"},
        "urgent": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}}},
        "note": {"type": ["string", "null"]},
        "meta": {"type": "object"},
        "anything": {},
        "first-name": {"type": "string"},
    },
    "required": ["amount", "currency"],
}


def request(args: dict[str, Any] | None = None, *, user: ConditionUser = ALICE, **overrides: Any) -> ConditionInput:
    fields: dict[str, Any] = {"client": "agent-1", "route": "payments", "tool": "refund", "now": NOW} | overrides
    return ConditionInput(args=args or {}, user=user, **fields)


# -- compile errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "kind", "message"),
    [
        (
            "args.amount <= ",
            "tools",
            "column 16: Syntax error: mismatched input '<EOF>' expecting {'[', '{', '(', '.', '-', '!', 'true', "
            "'false', 'null', NUM_FLOAT, NUM_INT, NUM_UINT, STRING, BYTES, IDENTIFIER}",
        ),
        ("args.amount <= 1000 &&", "tools", "column 23: Syntax error: mismatched input '<EOF>' expecting"),
        (
            "amount <= 1000",
            "tools",
            "column 1: unknown variable 'amount' (variables for tools: args, client, now, route, tool, user)",
        ),
        ("args.x == 1", "resources", "column 5: unknown variable 'args' (variables for resources: client, now,"),
        ("uri.startsWith('config://')", "tools", "column 1: unknown variable 'uri'"),
        ("uri.startsWith('config://')", "prompts", "column 1: unknown variable 'uri'"),
        ("tool == 'x'", "resources", "column 1: unknown variable 'tool'"),
        (
            "user.department == 'x'",
            "tools",
            "column 5: user has no member 'department' (members: email, groups, idp, sub)",
        ),
        ("'x' in user.roles", "resources", "column 12: user has no member 'roles'"),
        ("refundable(args.amount)", "tools", "column 11: unknown function 'refundable'"),
        ("client == 1", "tools", "column 8: '==' cannot be applied to (string, int)"),
        ("user.groups > 2", "tools", "column 13: '>' cannot be applied to (list(string), int)"),
        ("now < '2030-01-01'", "tools", "column 5: '<' cannot be applied to (timestamp, string)"),
        ("user.sub", "tools", "the result is string, not a bool"),
        ("size(user.groups)", "prompts", "the result is int, not a bool"),
        ("1 == 1 &&\n  zzz > 2", "tools", "line 2, column 3: unknown variable 'zzz'"),
        ("a || b || c || d || e", "tools", "column 1: unknown variable 'a' (variables for tools"),
        ("", "tools", "must be a non-empty CEL expression"),
        ("   ", "tools", "must be a non-empty CEL expression"),
        ("true || " * (MAX_SOURCE_CHARS // 8) + "true", "tools", f"longer than {MAX_SOURCE_CHARS} characters"),
    ],
)
def test_compile_errors(source: str, kind: str, message: str) -> None:
    with pytest.raises(ConditionError) as caught:
        compile_condition(source, kind=kind)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_compile_error_names_first_problems_and_counts_the_rest() -> None:
    with pytest.raises(ConditionError) as caught:
        compile_condition("a || b || c || d || e", kind="tools")
    text = str(caught.value)
    assert [part.split(":")[0] for part in text.split("; ")] == ["column 1", "column 6", "column 11"]
    assert text.endswith(" (and 2 more)")


def test_unknown_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="kind must be one of tools, resources, prompts"):
        compile_condition("true", kind="tool")


# -- evaluation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "kind", "data", "expected"),
    [
        ("args.amount <= 1000 && args.currency == 'EUR'", "tools", request({"amount": 250, "currency": "EUR"}), True),
        (
            "args.amount <= 1000 && args.currency == 'EUR'",
            "tools",
            request({"amount": 1000.0, "currency": "EUR"}),
            True,
        ),
        (
            "args.amount <= 1000 && args.currency == 'EUR'",
            "tools",
            request({"amount": 1000.5, "currency": "EUR"}),
            False,
        ),
        ("args.amount <= 1000 && args.currency == 'EUR'", "tools", request({"amount": 5, "currency": "USD"}), False),
        # CEL's && is commutative over errors: a false side decides even when the other cannot be evaluated.
        ("args.amount <= 1000 && args.currency == 'EUR'", "tools", request({"currency": "USD"}), False),
        ("has(args.amount) && args.amount > 5", "tools", request({}), False),
        # JSON's 5 arrives as an int: double() makes arithmetic on a "number" argument work for 5 and 5.5.
        ("double(args.amount) * 1.5 < 8.0", "tools", request({"amount": 5}), True),
        ("double(args.amount) * 1.5 < 8.0", "tools", request({"amount": 5.5}), False),
        ("args.tags.size() <= 2 && 'vip' in args.tags", "tools", request({"tags": ["vip"]}), True),
        ("args.address.city == 'Paris'", "tools", request({"address": {"city": "Paris"}}), True),
        ("now < timestamp('2030-01-01T00:00:00Z')", "tools", request(), True),
        ("now < timestamp('2030-01-01T00:00:00Z')", "tools", request(now=datetime(2031, 1, 1, tzinfo=UTC)), False),
        ("now.getHours('UTC') >= 9 && now.getHours('UTC') < 17", "tools", request(), True),
        ("'finance' in user.groups", "tools", request(), True),
        ("'finance' in user.groups", "tools", request(user=BOB), False),
        ("user.sub == 'alice' && user.idp == 'https://idp.example'", "prompts", request(), True),
        ("has(user.email) && user.email.endsWith('@example.com')", "tools", request(), True),
        ("has(user.email) && user.email.endsWith('@example.com')", "tools", request(user=BOB), False),
        ("client == 'agent-1' && route == 'payments' && tool == 'refund'", "tools", request(), True),
        ("tool.startsWith('summar')", "prompts", request(tool="summarize"), True),
        ("uri.startsWith('config://')", "resources", request(uri="config://app/settings"), True),
        ("uri.startsWith('config://')", "resources", request(uri="file:///etc/passwd"), False),
    ],
)
def test_evaluate(source: str, kind: str, data: ConditionInput, expected: bool) -> None:
    assert compile_condition(source, kind=kind).evaluate(data) is expected


@pytest.mark.parametrize(
    ("source", "args", "reason"),
    [
        ("args.amount <= 1000 && args.currency == 'EUR'", {"currency": "EUR"}, "no argument 'amount'"),
        (
            "args.amount <= 1000 && args.currency == 'EUR'",
            {"amount": "250", "currency": "EUR"},
            "wrong type: '<=' cannot be applied to (string, int64)",
        ),
        ("args.flag", {"flag": "yes"}, "the condition gave str, not bool"),
        ("args.flag", {"flag": 1}, "the condition gave int, not bool"),
        ("args.address.city == 'Paris'", {"address": {}}, "no key 'city'"),
        ("user.email.endsWith('@example.com')", {}, "no key 'email'"),
        ("args.amount <= 1000", {"amount": 10**30}, "a number is out of CEL's 64-bit range"),
        ("args.count / 0 == 1", {"count": 3}, "divide by zero"),
        ("args.amount * 1.5 < 8.0", {"amount": 5}, "wrong type: '*' cannot be applied to (int64, double)"),
        ("args.code.matches(args.pattern)", {"code": "a", "pattern": "["}, "invalid regular expression: missing ]: ["),
    ],
)
def test_evaluation_errors(source: str, args: dict[str, Any], reason: str) -> None:
    condition = compile_condition(source, kind="tools")
    with pytest.raises(ConditionEvaluationError) as caught:
        condition.evaluate(request(args, user=BOB))
    assert caught.value.reason == reason


def test_one_activation_serves_every_condition_on_a_request() -> None:
    data = request({"amount": 5, "currency": "EUR"})
    first = compile_condition("args.amount < 10", kind="tools")
    second = compile_condition("'support' in user.groups", kind="tools")
    assert first.evaluate(data) and second.evaluate(data)
    assert data.activation is data.activation
    assert data.activation["user"] == {
        "sub": "alice",
        "idp": "https://idp.example",
        "groups": ["support", "finance"],
        "email": "alice@example.com",
    }


# -- typing args against a tool's inputSchema ------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "problems"),
    [
        ("args.amount <= 1000 && args.currency == 'EUR'", []),
        ("args.count < 2.5 && args.amount == 3", []),
        ("args.count in [1.0, 2.0] || args.amount in [1, 2]", []),
        ("args.tags.size() > 2 || args.tags.exists(t, t.startsWith('vip'))", []),
        ("args.address.city == 'Paris'", []),
        ("args.urgent", []),
        ("args.note == null || args.note.startsWith('x')", []),
        ("args.meta.anything.at.all == 1", []),
        ("args.anything == 'x' || args.anything > 5", []),
        ("has(args.urgent) && !args.urgent", []),
        ("double(args.amount) * 1.5 < 8.0", []),
        ("args.refund_all", ["column 5: the tool has no argument 'refund_all'"]),
        (
            "args.nope == 1 && args.other.deeper == 2",
            ["column 5: the tool has no argument 'nope'", "column 23: the tool has no argument 'other'"],
        ),
        ("has(args.nope)", ["column 4: the tool has no argument 'nope'"]),
        ("args.amount == 'x'", ["column 13: '==' cannot be applied to (double, string)"]),
        ("args.count > '5'", ["column 12: '>' cannot be applied to (int, string)"]),
        ("args.currency > 5", ["column 15: '>' cannot be applied to (string, int)"]),
        (
            "args.currency.size() > 3 && args.amount.startsWith('1')",
            ["column 51: 'startsWith' cannot be applied to (double, string)"],
        ),
        ("args.urgent == 'yes'", ["column 13: '==' cannot be applied to (bool, string)"]),
        ("args.tags > 1", ["column 11: '>' cannot be applied to (list(string), int)"]),
        ("args.tags.exists(t, t > 1)", ["column 23: '>' cannot be applied to (string, int)"]),
        ("args.amount + 1 > 2", ["column 13: '+' cannot be applied to (double, int)"]),
        ("args.note == 5", ["column 11: '==' cannot be applied to (wrapper(string), int)"]),
        ("args.address.zip == '75001'", ["column 13: args.address has no property 'zip'"]),
        ("args.address == 'Paris'", ["column 14: '==' cannot be applied to (args.address, string)"]),
        ("args['first-name'] == 'Ada'", ["column 5: args[...] cannot be type-checked against the inputSchema; write"]),
        ("args.currency", ["the result is string, not a bool"]),
    ],
)
def test_check_schema(source: str, problems: list[str]) -> None:
    found = compile_condition(source, kind="tools").check_schema(REFUND_SCHEMA)
    assert len(found) == len(problems), found
    for got, expected in zip(found, problems, strict=True):
        assert got.startswith(expected), got


@pytest.mark.parametrize(
    ("schema", "source", "problems"),
    [
        # Nothing in the schema types args.amount, so it is reported even though extra arguments are allowed.
        (
            {"type": "object", "properties": {"currency": {"type": "string"}}, "additionalProperties": True},
            "args.amount > 1",
            ["column 5: the tool has no argument 'amount'"],
        ),
        ({"type": "object"}, "args.amount > 1", ["column 5: the tool has no argument 'amount'"]),
        ({}, "args.amount > 1", ["column 5: the tool has no argument 'amount'"]),
        (
            {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "array"}}}},
            "args.items[0].size() == 2",
            [],
        ),
        (
            {
                "type": "object",
                "properties": {
                    "lines": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}}}}
                },
            },
            "args.lines.all(l, l.sku.startsWith('A-')) && args.lines.exists(l, l.qty > 1)",
            ["column 68: args.lines[] has no property 'qty'"],
        ),
        # Both would map to the same protobuf JSON name; the declaration must still hold both.
        (
            {"type": "object", "properties": {"foo_bar": {"type": "string"}, "fooBar": {"type": "integer"}}},
            "args.foo_bar == 'x' && args.fooBar == 1",
            [],
        ),
        (
            {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(MAX_SCHEMA_PROPERTIES + 1)}},
            "args.p1 == 'x'",
            [f"inputSchema has more than {MAX_SCHEMA_PROPERTIES} properties; not type-checked"],
        ),
    ],
)
def test_check_schema_shapes(schema: dict[str, Any], source: str, problems: list[str]) -> None:
    assert compile_condition(source, kind="tools").check_schema(schema) == problems


def test_prompt_conditions_check_against_the_prompt_arguments() -> None:
    # MCP prompt arguments are strings; the caller describes them as a schema of string properties.
    schema = {"type": "object", "properties": {"language": {"type": "string"}, "style": {"type": "string"}}}
    assert compile_condition("args.language in ['en', 'fr']", kind="prompts").check_schema(schema) == []
    assert compile_condition("args.lang == 'en' || args.style > 2", kind="prompts").check_schema(schema) == [
        "column 5: the prompt has no argument 'lang'",
        "column 33: '>' cannot be applied to (string, int)",
    ]


def test_resource_conditions_have_no_arguments_to_check() -> None:
    condition = compile_condition("uri.startsWith('config://')", kind="resources")
    assert condition.check_schema(REFUND_SCHEMA) == []
    assert condition.argument_names == frozenset()


@pytest.mark.parametrize(
    ("source", "names"),
    [
        ("args.amount <= 1000 && args.currency == 'EUR'", {"amount", "currency"}),
        ("has(args.note) && args.address.city == 'Paris'", {"note", "address"}),
        ("args.tags.exists(t, t == args.wanted)", {"tags", "wanted"}),
        ("'finance' in user.groups", set()),
        ("args['first-name'] == 'Ada'", set()),
    ],
)
def test_argument_names(source: str, names: set[str]) -> None:
    assert compile_condition(source, kind="tools").argument_names == names


# -- costs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "args", "cost"),
    [
        ("args.amount", {"amount": 120}, 120.0),
        ("args.amount", {"amount": 12.5}, 12.5),
        ("args.tags.size()", {"tags": ["a", "b"]}, 2.0),
        ("has(args.amount) ? args.amount : 1", {}, 1.0),
    ],
)
def test_cost(source: str, args: dict[str, Any], cost: float) -> None:
    assert compile_cost(source).evaluate(request(args)) == cost


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ({"amount": -1}, "the cost is not a finite number >= 0"),
        ({"amount": -0.5}, "the cost is not a finite number >= 0"),
        ({"amount": float("inf")}, "the cost is not a finite number >= 0"),
        ({"amount": "12"}, "the cost is str, not a number"),
        ({"amount": True}, "the cost is bool, not a number"),
        ({}, "no argument 'amount'"),
    ],
)
def test_cost_errors(args: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConditionEvaluationError) as caught:
        compile_cost("args.amount").evaluate(request(args))
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("args.amount > 1", "the result is bool, not a number"),
        ("user.sub", "the result is string, not a number"),
        ("amount", "column 1: unknown variable 'amount'"),
    ],
)
def test_cost_compile_errors(source: str, message: str) -> None:
    with pytest.raises(ConditionError) as caught:
        compile_cost(source)
    assert str(caught.value).startswith(message)


def test_cost_check_schema() -> None:
    assert compile_cost("args.amount").check_schema(REFUND_SCHEMA) == []
    assert compile_cost("args.currency").check_schema(REFUND_SCHEMA) == ["the result is string, not a number"]
    assert compile_cost("args.amount * 2").check_schema(REFUND_SCHEMA) == [
        "column 13: '*' cannot be applied to (double, int)"
    ]
