"""MCP 2026-07-28 multi-round-trip requests: asking for approval without keeping any state.

The gateway answers the ``tools/call`` with an ``InputRequiredResult`` (``resultType: input_required``)
whose ``inputRequests`` hold one form-mode ``elicitation/create`` and whose ``requestState`` is a token
the gateway signs. The client retries the original request with ``inputResponses`` and the echoed
``requestState`` (2026-07-28 "Multi Round-Trip Requests"); the token carries everything needed to check
the retry, so any replica finishes the round:

    "mcpgw1." base64url(JSON {route, owner, tool, args, exp, nonce, stage, inner}) "." base64url(HMAC)

- HMAC-SHA256 (RFC 2104) keyed by HKDF (RFC 5869) from the gateway's signing key: replicas sharing the
  key share the rounds, and a client cannot forge or edit a state (the attack: an approved 10 becomes
  an approved 10,000, or Alice's approval becomes Bob's);
- ``exp``: an approval round is short (the rule's ``timeout_seconds``);
- ``nonce``: a state is used once (recorded in the replay store until ``exp``): one approval, one call;
- ``stage``: ``ask`` (the gateway's question is pending) or ``approved`` (the call was approved and the
  upstream itself asked for input);
- ``inner``: the upstream's own ``requestState`` of a round in progress (the one the upstream just
  returned, or the one the asked call carried), so the gateway's state and the upstream's never collide
  and the upstream gets its own back, unchanged, with the client's answers to its questions.

The client sees its own route, tool and an argument hash in the state; nothing it did not send.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

from gateway import b64url
from gateway.approvals.binding import CallBinding
from gateway.oauth.keys import derive_key

PREFIX = "mcpgw1."
APPROVAL_INPUT = "mcp_gateway_approval"  # the gateway's key in inputRequests / inputResponses
MAX_STATE_CHARS = 262_144  # an upstream's own state rides inside ours
ASK, APPROVED = "ask", "approved"
PARKED = "parked"  # waiting for someone else (approver_groups): the client showed its user the approval URL


def derive_state_key(secret_material: bytes) -> bytes:
    return derive_key(secret_material, "approval-state/v1")


def is_gateway_state(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


@dataclass(frozen=True)
class RoundState:
    binding: CallBinding
    expires_at: int
    nonce: str
    stage: str
    inner: str | None = None  # the upstream's own requestState (stage ``approved``)


class StateInvalid(Exception):
    """Why a presented state is refused: ``tampered``, ``expired`` or ``foreign`` (another call)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class StateSigner:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._key, (PREFIX + payload).encode(), hashlib.sha256).digest()

    def sign(self, state: RoundState) -> str:
        b = state.binding
        fields = {
            "r": b.route,
            "o": hashlib.sha256(b.owner.encode()).hexdigest(),
            "t": b.tool,
            "a": b.args_sha256,
            "x": state.expires_at,
            "n": state.nonce,
            "s": state.stage,
            "u": state.inner,
        }
        payload = b64url.encode(json.dumps(fields, separators=(",", ":")).encode())
        return f"{PREFIX}{payload}.{b64url.encode(self._mac(payload))}"

    def new(self, binding: CallBinding, stage: str, now: float, ttl: int, inner: str | None = None) -> tuple[str, str]:
        """A fresh state and its nonce (the approval id the audit trail correlates on)."""
        nonce = secrets.token_urlsafe(16)
        return self.sign(RoundState(binding, int(now) + ttl, nonce, stage, inner)), nonce

    def verify(self, token: str, expected: CallBinding, now: float) -> RoundState:
        """The state, if this gateway signed it for exactly ``expected`` and it has not expired."""
        if len(token) > MAX_STATE_CHARS:
            raise StateInvalid("tampered")
        payload, _, mac = token[len(PREFIX) :].partition(".")
        try:
            authentic = hmac.compare_digest(b64url.decode(mac), self._mac(payload))
            fields = json.loads(b64url.decode(payload)) if authentic else None
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise StateInvalid("tampered") from None
        if not isinstance(fields, dict):
            raise StateInvalid("tampered")
        owner = hashlib.sha256(expected.owner.encode()).hexdigest()
        presented = (fields.get("r"), fields.get("o"), fields.get("t"), fields.get("a"))
        if presented != (expected.route, owner, expected.tool, expected.args_sha256):
            raise StateInvalid("foreign")
        expires_at, nonce, stage, inner = fields.get("x"), fields.get("n"), fields.get("s"), fields.get("u")
        if not isinstance(expires_at, int) or not isinstance(nonce, str) or stage not in (ASK, APPROVED, PARKED):
            raise StateInvalid("tampered")
        if now >= expires_at:
            raise StateInvalid("expired")
        return RoundState(expected, expires_at, nonce, stage, inner if isinstance(inner, str) else None)


def approval_request(message: str) -> dict[str, Any]:
    """A form-mode ``elicitation/create`` with one boolean: the client shows it to its user as is."""
    return {
        "method": "elicitation/create",
        "params": {
            "mode": "form",
            "message": message,
            "requestedSchema": {
                "type": "object",
                "properties": {
                    "approve": {
                        "type": "boolean",
                        "title": "Approve",
                        "description": "Let the gateway forward this call",
                    }
                },
                "required": ["approve"],
            },
        },
    }


def url_request(message: str, url: str) -> dict[str, Any]:
    """A URL-mode ``elicitation/create`` (MCP 2026-07-28 "Elicitation", URL mode): the client shows the
    URL to its user, who hands it to an approver; nothing is entered through the client."""
    return {"method": "elicitation/create", "params": {"mode": "url", "message": message, "url": url}}


def input_required(message: str, state: str, request: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "resultType": "input_required",
        "inputRequests": {APPROVAL_INPUT: request if request is not None else approval_request(message)},
        "requestState": state,
    }


def answer_of(response: Any) -> str:
    """What the person said: ``approved``, ``declined`` or ``cancelled`` (an ``ElicitResult``).
    Accepting the form without ticking ``approve`` is not an approval."""
    if not isinstance(response, dict):
        return "cancelled"
    action = response.get("action")
    if action == "accept":
        content = response.get("content")
        approved = isinstance(content, dict) and content.get("approve") is True
        return "approved" if approved else "declined"
    if action == "decline":
        return "declined"
    return "cancelled"
