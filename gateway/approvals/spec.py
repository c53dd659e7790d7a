"""``require_approval`` on a tools rule: what to ask, for how long, and of whom."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_TIMEOUT_SECONDS = 120
MAX_TIMEOUT_SECONDS = 86_400  # a parked call waits a day at most: approvals are for calls, not standing grants
MAX_MESSAGE_CHARS = 1000


@dataclass(frozen=True)
class ApprovalSpec:
    message: str | None = None  # shown to the person asked, before the gateway's summary of the call
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS  # how long an approval may be waited for, and then used
    approver_groups: tuple[str, ...] = ()  # empty: the caller approves their own call

    @property
    def delegated(self) -> bool:
        return bool(self.approver_groups)


def parse_approval(value: Any, where: str, error: Callable[[str, str], Exception]) -> ApprovalSpec | None:
    """``require_approval: true`` or ``{message, timeout_seconds, approver_groups}``; ``false`` is none."""
    if value is False or value is None:
        return None
    if value is True:
        return ApprovalSpec()
    if not isinstance(value, dict):
        raise error(where, "must be true, false or a mapping with message, timeout_seconds, approver_groups")
    unknown = sorted(set(value) - {"message", "timeout_seconds", "approver_groups"})
    if unknown:
        raise error(f"{where}.{unknown[0]}", "unknown key (expected message, timeout_seconds, approver_groups)")
    message = value.get("message")
    if message is not None and (not isinstance(message, str) or not message.strip()):
        raise error(f"{where}.message", "must be a non-empty string")
    if message is not None and len(message) > MAX_MESSAGE_CHARS:
        raise error(f"{where}.message", f"must be at most {MAX_MESSAGE_CHARS} characters")
    timeout = value.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 5 <= timeout <= MAX_TIMEOUT_SECONDS:
        raise error(f"{where}.timeout_seconds", f"must be an integer from 5 to {MAX_TIMEOUT_SECONDS}")
    groups = value.get("approver_groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
        raise error(f"{where}.approver_groups", "must be a list of non-empty group names")
    if "approver_groups" in value and not groups:
        raise error(f"{where}.approver_groups", "must name at least one group (omit it to let the caller approve)")
    if "*" in groups:
        raise error(f"{where}.approver_groups", "must name groups, not '*' (anyone could approve)")
    return ApprovalSpec(message, timeout, tuple(dict.fromkeys(groups)))
