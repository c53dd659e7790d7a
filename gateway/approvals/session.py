"""Asking the caller up to MCP 2025-11-25: ``elicitation/create`` on the POST's own SSE response.

MCP 2025-11-25 Streamable HTTP ("Sending Messages to the Server"): a server answering a POST with an
SSE stream may send requests to the client on it before the response, and the client POSTs its answer
(a JSON-RPC response) back in the same session; "Elicitation" (form mode) is such a request. So the
gateway opens the SSE response itself, asks, waits for the answer, and only then forwards the call.

The answer reaches the gateway as a separate POST, possibly long after: :class:`PendingAsks` holds the
asks this process waits on, keyed by the gateway's request id (unguessable, with a prefix the gateway
recognises, so an answer to it is never forwarded upstream). An answer counts only from the principal
and session the question went to: another user who learnt the id cannot approve someone else's call.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.approvals import stateless
from gateway.approvals.desk import ApprovalObserver, Ask

ASK_ID_PREFIX = "mcpgw-ask-"
# Explicit bound on the questions one process keeps open at once (each holds a client connection).
MAX_PENDING_ASKS = 10_000
TIMEOUT, UNAVAILABLE = "timeout", "unavailable"


def is_gateway_id(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(ASK_ID_PREFIX)


class Delivery(enum.Enum):
    DELIVERED = "delivered"
    FOREIGN = "foreign"  # pending, but asked of another principal or in another session: 403
    UNKNOWN = "unknown"  # not pending here (answered already, timed out, or another process asked): 404


@dataclass(frozen=True)
class _Pending:
    owner: str
    session: str
    answer: asyncio.Future[dict[str, Any]]


class PendingAsks:
    """The questions this process waits on, by the gateway's request id."""

    def __init__(self, limit: int = MAX_PENDING_ASKS) -> None:
        self._pending: dict[str, _Pending] = {}
        self._limit = limit

    def open(self, owner: str, session: str) -> tuple[str, asyncio.Future[dict[str, Any]]] | None:
        """A new question's id and the future its answer arrives on; None when too many are open."""
        if len(self._pending) >= self._limit:
            return None
        ask_id = ASK_ID_PREFIX + secrets.token_urlsafe(24)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ask_id] = _Pending(owner, session, answer)
        return ask_id, answer

    def close(self, ask_id: str) -> None:
        self._pending.pop(ask_id, None)

    def deliver(self, message: dict[str, Any], owner: str, session: str | None) -> Delivery:
        """Hand a client's JSON-RPC response to the question it answers (once)."""
        pending = self._pending.get(message.get("id"))  # type: ignore[arg-type]  # ids are str here
        if pending is None or pending.answer.done():
            return Delivery.UNKNOWN
        same_owner = hmac.compare_digest(pending.owner.encode(), owner.encode())
        same_session = session is not None and hmac.compare_digest(pending.session.encode(), session.encode())
        if not (same_owner and same_session):
            return Delivery.FOREIGN
        pending.answer.set_result(message)
        return Delivery.DELIVERED

    def __len__(self) -> int:
        return len(self._pending)


async def ask_caller(
    ask: Ask,
    pending: PendingAsks,
    *,
    owner: str,
    session: str,
    approver: str,
    send: Callable[[dict[str, Any]], Awaitable[None]],
    keep_alive: Callable[[], Awaitable[None]],
    keepalive_seconds: float | None,
    observe: ApprovalObserver,
) -> str:
    """Send the question with ``send``, wait up to the rule's ``timeout_seconds`` for the answer, and
    say what came of it: ``approved``, ``declined``, ``cancelled``, ``timeout`` or ``unavailable``.
    Every step is told to ``observe`` with the gateway's request id as the approval id."""
    opened = pending.open(owner, session)
    if opened is None:
        return UNAVAILABLE
    ask_id, answer = opened
    binding = ask.binding

    def event(name: str, **fields: Any) -> None:
        observe(name, approval_id=ask_id, route=binding.route, target=binding.tool, **fields)

    try:
        event("approval.asked", reason="elicitation")
        await send({"jsonrpc": "2.0", "id": ask_id, **stateless.approval_request(ask.text)})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ask.spec.timeout_seconds
        while not answer.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                event("approval.expired", reason="elicitation")
                return TIMEOUT
            # asyncio.wait, not a timeout around the future: a timeout would cancel the future itself.
            await asyncio.wait({answer}, timeout=min(remaining, keepalive_seconds or remaining))
            if not answer.done() and loop.time() < deadline:
                await keep_alive()  # SSE comment: proxies and load balancers keep an idle stream open
    finally:
        pending.close(ask_id)
    message = answer.result()
    # An error response (the client could not show the form) is no approval: cancelled.
    outcome = stateless.answer_of(message.get("result")) if "result" in message else "cancelled"
    event("approval.granted" if outcome == "approved" else f"approval.{outcome}", approver=approver)
    return outcome
