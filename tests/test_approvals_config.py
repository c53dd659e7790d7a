"""``require_approval`` as configured and explained: parsed onto the rule with every mistake named by its
key, and shown by ``check --explain`` / ``--as-groups`` as what it is (an "ask", not a deny)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.approvals.spec import ApprovalSpec
from gateway.config import ConfigError, parse_config


def route_with(rule: dict[str, Any], kind: str = "tools") -> dict[str, Any]:
    return {"name": "r", "path": "/r/mcp", "upstream": "http://127.0.0.1:9/mcp", kind: [rule]}


def minimal_config(route: dict[str, Any]) -> dict[str, Any]:
    return {
        "public_url": "https://mcp.example.com",
        "authorization": {
            "clients": [{"client_id": "agent", "client_secret": "agent-secret-0123456789"}],
            "identity_providers": [{"issuer": "https://idp.example.com"}],
        },
        "routes": [route],
    }


@pytest.mark.parametrize(
    ("rule", "kind", "key", "problem"),
    [
        ({"require_approval": "yes"}, "tools", "require_approval", "must be true, false or a mapping"),
        ({"require_approval": {"timeout": 5}}, "tools", "require_approval.timeout", "unknown key"),
        ({"require_approval": {"timeout_seconds": 1}}, "tools", "require_approval.timeout_seconds", "from 5"),
        ({"require_approval": {"timeout_seconds": True}}, "tools", "require_approval.timeout_seconds", "integer"),
        ({"require_approval": {"message": ""}}, "tools", "require_approval.message", "non-empty"),
        ({"require_approval": {"approver_groups": []}}, "tools", "require_approval.approver_groups", "at least one"),
        ({"require_approval": {"approver_groups": ["*"]}}, "tools", "require_approval.approver_groups", "not '*'"),
        ({"require_approval": True}, "prompts", "require_approval", "only for tools rules"),
        ({"require_approval": True, "deny": ["x"]}, "tools", "require_approval", "no deny patterns"),
    ],
)
def test_bad_require_approval_is_reported_with_its_key(rule: dict[str, Any], kind: str, key: str, problem: str) -> None:
    rule = {"groups": ["support"], "allow": ["echo"], **rule}
    config = minimal_config(route_with(rule, kind))
    with pytest.raises(ConfigError) as caught:
        parse_config(config, source="gw.yaml")
    assert caught.value.key == f"routes[0].{kind}[0].{key}"
    assert problem in caught.value.problem


def test_require_approval_is_parsed_onto_the_rule() -> None:
    rule = {
        "groups": ["support"],
        "allow": ["refund"],
        "require_approval": {"message": "Big refund", "timeout_seconds": 300, "approver_groups": ["finance"]},
    }
    policy = parse_config(minimal_config(route_with(rule))).routes[0].policy
    verdict = policy.tools.decide(frozenset({"support"}), "refund")
    assert verdict.allowed and verdict.approval == ApprovalSpec("Big refund", 300, ("finance",))
    plain = parse_config(minimal_config(route_with({"groups": ["support"], "allow": ["refund"]}))).routes[0].policy
    assert plain.tools.decide(frozenset({"support"}), "refund").approval is None


CONFIG = """\
listen: "127.0.0.1:0"
public_url: "https://mcp.example.com"
authorization:
  clients: [{client_id: agent, client_secret: "approvals-test-secret-0123"}]
  identity_providers: [{issuer: "https://idp.example.com"}]
routes:
  - name: billing
    path: /billing/mcp
    upstream: "http://127.0.0.1:9/mcp"
    tools:
      - id: big-refunds
        groups: [support]
        allow: [refund]
        when: "args.amount > 1000"
        require_approval: {approver_groups: [finance], timeout_seconds: 300}
      - id: refunds
        groups: [support]
        allow: [refund]
"""


def check(config: Path, *args: str) -> str:
    command = [sys.executable, "-m", "gateway", "check", "--config", str(config), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_check_explains_an_approval_as_an_ask(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    big = check(config, "--explain", "refund", "--route", "billing", "--as-groups", "support", '{"amount": 5000}')
    assert "require_approval by a member of finance within 300 s" in big
    assert "decision: ask for approval by rule big-refunds" in big
    small = check(config, "--explain", "refund", "--route", "billing", "--as-groups", "support", '{"amount": 50}')
    assert "decision: allow by rule refunds" in small
    listed = check(config, "--as-groups", "support")
    assert "allow refund (when args.amount > 1000; with approval), refund" in listed
