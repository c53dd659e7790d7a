"""``mcp-gateway check --explain``, run as users run it: ``python -m gateway`` in a subprocess.

One route with a conditional allow, a conditional deny, an unconditional deny and a quota whose cost is
an argument. Each test asks about one call and checks the lines that say which rule applied, what its
condition gave, what decided, the JSON-RPC error the client would get, and what the quota would be
charged. Nothing is listening: the upstream named in the config does not exist, and explain must not
need it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECRET = "explain-test-secret-7c1f"
UPSTREAM = "http://127.0.0.1:9/mcp"  # the discard port: nothing answers, and nothing may try

CONFIG = f"""\
listen: "127.0.0.1:0"
public_url: "https://mcp.example.com"
authorization:
  clients:
    - client_id: claude-enterprise
      client_secret: "{SECRET}"
    - client_id: batch-agent
      client_secret: "{SECRET}"
  identity_providers:
    - issuer: "https://acme.okta.com"
routes:
  - name: payments
    path: /payments/mcp
    upstream: "{UPSTREAM}"
    tools:
      - id: support-refunds
        groups: [support]
        allow: ["refund"]
        when: "args.amount <= 1000 && args.currency == 'EUR'"
      - id: no-self-refunds
        groups: ["*"]
        deny: ["refund"]
        when: "has(args.account) && args.account == user.sub"
      - id: contractors-never
        groups: [contractors]
        deny: ["refund"]
      - id: lookups
        groups: ["*"]
        allow: ["get_*"]
    quotas:
      - id: refund-volume
        per: user
        tools: ["refund"]
        limit: 900
        window: 1h
        cost: "args.amount"
"""

RULE_LINES = {
    "support-refunds": "  rule support-refunds: groups support; allow refund; "
    "when args.amount <= 1000 && args.currency == 'EUR'",
    "no-self-refunds": "  rule no-self-refunds: groups *; deny refund; "
    "when has(args.account) && args.account == user.sub",
    "contractors-never": "  rule contractors-never: groups contractors; deny refund",
    "lookups": "  rule lookups: groups *; allow get_*",
}
QUOTA_LINE = "  quota refund-volume: per user; tools refund; limit 900 per 1h; cost args.amount"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("explain") / "gateway.yaml"
    path.write_text(CONFIG)
    return path


def explain(config: Path, *args: str, route: str = "payments") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(config), "--route", route, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
        cwd=REPO,
        check=False,
    )


def explained(config: Path, *args: str) -> list[str]:
    result = explain(config, *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout.splitlines()


def step_of(lines: list[str], rule: str) -> str:
    """The line saying what the decision found for ``rule`` (the one after the rule's own line)."""
    return lines[lines.index(RULE_LINES[rule]) + 1]


def client_error(lines: list[str]) -> dict[str, object]:
    prefix = "the client gets: "
    (line,) = [line for line in lines if line.startswith(prefix)]
    response = json.loads(line.removeprefix(prefix))
    assert response["jsonrpc"] == "2.0" and response["id"] == 1
    return response["error"]


def test_conditional_allow_holds(config: Path) -> None:
    lines = explained(config, "--as-groups", "support", "--explain", "refund", '{"amount": 500, "currency": "EUR"}')
    assert lines[0] == (
        "route payments: tools/call 'refund' as user explain-user (idp https://acme.okta.com), "
        "client claude-enterprise, groups support"
    )
    assert step_of(lines, "support-refunds") == (
        "    applies to these groups: yes; allow pattern: matches; condition: true -> this rule decides: allow"
    )
    # Deny rules are still checked after an allow: deny wins.
    assert step_of(lines, "no-self-refunds") == (
        "    applies to these groups: yes; deny pattern: matches; condition: false"
    )
    assert step_of(lines, "contractors-never") == "    applies to these groups: no"
    assert step_of(lines, "lookups") == (
        "    applies to these groups: yes; allow pattern: not checked (an earlier rule already allows)"
    )
    assert "decision: allow by rule support-refunds: allowed by support rule" in lines
    assert f"forwarded to: {UPSTREAM} (check contacts nothing)" in lines
    assert lines[lines.index(QUOTA_LINE) + 1] == "    counts this tool: yes; cost 500: would be charged 500"
    assert not any(line.startswith("the client gets") for line in lines)


def test_condition_false_refuses_with_the_rule(config: Path) -> None:
    lines = explained(config, "--as-groups", "support", "--explain", "refund", '{"amount": 1200, "currency": "EUR"}')
    assert step_of(lines, "support-refunds") == (
        "    applies to these groups: yes; allow pattern: matches; condition: false"
        " -> this rule decides: deny (its condition is false and no other rule allows)"
    )
    assert step_of(lines, "lookups") == "    applies to these groups: yes; allow pattern: no match"
    assert "decision: deny by rule support-refunds: condition of rule support-refunds is false" in lines
    error = client_error(lines)
    assert error["code"] == -32003
    assert error["data"] == {"reason": "condition", "method": "tools/call", "rule": "support-refunds"}
    # Refused before quotas: nothing would be charged.
    assert lines[lines.index(QUOTA_LINE) + 1] == "    not charged: the call is refused before quotas"


def test_condition_error_names_the_missing_argument(config: Path) -> None:
    lines = explained(config, "--as-groups", "support", "--explain", "refund", '{"amount": 500}')
    assert step_of(lines, "support-refunds") == (
        "    applies to these groups: yes; allow pattern: matches; condition: error: no argument 'currency'"
    )
    # The walk stops at the error: the rules after it were never looked at.
    for rule in ("no-self-refunds", "contractors-never", "lookups"):
        assert step_of(lines, rule) == "    not reached: an earlier rule decided"
    assert "decision: deny by rule support-refunds: condition of rule support-refunds: no argument 'currency'" in lines
    error = client_error(lines)
    assert error["code"] == -32003
    assert error["data"] == {
        "reason": "condition_error",
        "method": "tools/call",
        "rule": "support-refunds",
        "detail": "no argument 'currency'",
    }


@pytest.mark.parametrize(
    ("groups", "user", "rule", "step", "reason", "data_reason"),
    [
        # The conditional deny holds for the user the account belongs to (--as-user).
        (
            "support",
            "u-42",
            "no-self-refunds",
            "deny pattern: matches; condition: true",
            "denied by * rule (condition)",
            "condition",
        ),
        # An unconditional deny.
        (
            "support,contractors",
            "u-7",
            "contractors-never",
            "deny pattern: matches",
            "denied by contractors rule",
            "policy",
        ),
    ],
    ids=["conditional-deny", "unconditional-deny"],
)
def test_deny_wins_over_a_true_allow(
    config: Path, groups: str, user: str, rule: str, step: str, reason: str, data_reason: str
) -> None:
    arguments = '{"amount": 100, "currency": "EUR", "account": "u-42"}'
    lines = explained(config, "--as-groups", groups, "--as-user", user, "--explain", "refund", arguments)
    assert step_of(lines, "support-refunds") == (
        "    applies to these groups: yes; allow pattern: matches; condition: true"
    )
    assert step_of(lines, rule) == f"    applies to these groups: yes; {step} -> this rule decides: deny"
    assert f"decision: deny by rule {rule}: {reason}" in lines
    assert step_of(lines, "lookups") == "    not reached: an earlier rule decided"
    error = client_error(lines)
    assert error["code"] == -32003
    assert error["data"] == {"reason": data_reason, "method": "tools/call", "rule": rule}


def test_the_deny_of_another_user_does_not_apply(config: Path) -> None:
    arguments = '{"amount": 100, "currency": "EUR", "account": "u-42"}'
    lines = explained(config, "--as-groups", "support", "--as-user", "u-7", "--explain", "refund", arguments)
    assert step_of(lines, "no-self-refunds") == (
        "    applies to these groups: yes; deny pattern: matches; condition: false"
    )
    assert "decision: allow by rule support-refunds: allowed by support rule" in lines


def test_quota_cost_over_the_limit_throttles(config: Path) -> None:
    lines = explained(config, "--as-groups", "support", "--explain", "refund", '{"amount": 950, "currency": "EUR"}')
    assert "decision: throttle by quota refund-volume: quota refund-volume exhausted" in lines
    assert lines[lines.index(QUOTA_LINE) + 1] == (
        "    counts this tool: yes; cost 950: more than the limit 900, refused even in an empty window"
    )
    error = client_error(lines)
    assert error["code"] == -32029
    data = error["data"]
    assert isinstance(data, dict)
    assert {k: data[k] for k in ("reason", "quota", "rule")} == {
        "reason": "quota",
        "quota": "refund-volume",
        "rule": "refund-volume",
    }
    assert 1 <= data["retryAfterSeconds"] <= 3600  # the rest of the current 1h window


def test_quota_is_not_counted_for_other_tools(config: Path) -> None:
    lines = explained(config, "--as-groups", "support", "--explain", "get_balance")
    assert step_of(lines, "lookups") == (
        "    applies to these groups: yes; allow pattern: matches -> this rule decides: allow"
    )
    assert lines[lines.index(QUOTA_LINE) + 1] == "    counts this tool: no"


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ('{"amount": ', "--explain arguments are not valid JSON: Expecting value: line 1 column 12 (char 11)"),
        ('[{"amount": 1}]', "--explain arguments must be a JSON object, got an array"),
        ('"refund"', "--explain arguments must be a JSON object, got a string"),
    ],
    ids=["bad-json", "array", "string"],
)
def test_arguments_that_are_not_a_json_object(config: Path, arguments: str, problem: str) -> None:
    result = explain(config, "--as-groups", "support", "--explain", "refund", arguments)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"mcp-gateway: {problem}\n"


def test_unknown_route(config: Path) -> None:
    result = explain(config, "--explain", "refund", "{}", route="billing")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"mcp-gateway: no route named 'billing' in {config} (routes: payments)\n"
