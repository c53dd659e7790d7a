"""What an approval is for: one principal's call of one tool on one route, with these exact arguments.

An approval must not stretch to another call: a refund of 10 approved must not pay out 10,000. So every
approval names the SHA-256 of the canonical JSON of the arguments (sorted keys, no insignificant
whitespace: RFC 8785's intent, with Python's number spelling), and the call it lets through must hash
the same. The principal is issuer + tenant + sub + client (gateway/sessions.py ``principal_key``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from gateway.approvals.spec import ApprovalSpec

SUMMARY_CHARS = 600  # the arguments as shown to the person asked: enough to judge, bounded for the UI


def canonical_arguments(arguments: Any) -> str:
    return json.dumps(
        arguments if arguments is not None else {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def arguments_sha256(arguments: Any) -> str:
    # surrogatepass: JSON may carry lone surrogates ("\ud800"), which strict UTF-8 cannot encode.
    return hashlib.sha256(canonical_arguments(arguments).encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class CallBinding:
    route: str
    owner: str  # principal_key(identity, client_id)
    tool: str
    args_sha256: str

    @property
    def fingerprint(self) -> str:
        """One string naming the binding (for store keys): JSON keeps it injective."""
        parts = [self.route, self.owner, self.tool, self.args_sha256]
        return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


def summary(spec: ApprovalSpec, route: str, tool: str, arguments: Any, requester: str | None = None) -> str:
    """The text a person approves: the rule's message, then what exactly would run."""
    shown = canonical_arguments(arguments)
    if len(shown) > SUMMARY_CHARS:
        shown = shown[:SUMMARY_CHARS] + "..."
    who = f" for {requester}" if requester else ""
    what = f"Approve the call of tool '{tool}' on '{route}'{who} with arguments {shown}?"
    return f"{spec.message}\n\n{what}" if spec.message else what
