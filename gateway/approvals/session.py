"""Asking the caller up to MCP 2025-11-25: ``elicitation/create`` on the POST's own SSE response.

MCP 2025-11-25 Streamable HTTP ("Sending Messages to the Server"): a server answering a POST with an
SSE stream may send requests to the client on it before the response, and the client POSTs its answer
(a JSON-RPC response) back in the same session; "Elicitation" (form mode) is such a request. So the
gateway opens the SSE response itself, asks, waits for the answer, and only then forwards the call.

The answer reaches the gateway as a separate POST, possibly long after: :class:`PendingAsks` holds the
asks this process waits on, keyed by the gateway's request id (unguessable, with a prefix the gateway
recognises, so an answer to it is never forwarded upstream). An answer counts only from the principal
and session the question went to: another user who learnt the id cannot approve someone else's call.

With ``replay_store`` on Redis (replicas, ``serve --workers N``) the answer may reach another process:
:class:`SharedAsks` records each question in Redis (who may answer, as hashes, with a TTL); the process
that receives an answer it does not wait on itself checks it there, takes the record (``DEL``: one
answer wins) and ``RPUSH``es the answer, and the asking process ``BLPOP``s it.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.approvals import stateless
from gateway.approvals.desk import ApprovalObserver, Ask
from gateway.oauth.replay import RedisReplayStore, ReplayStore

log = logging.getLogger(__name__)

ASK_ID_PREFIX = "mcpgw-ask-"
# Explicit bound on the questions one process keeps open at once (each holds a client connection).
MAX_PENDING_ASKS = 10_000
TIMEOUT, UNAVAILABLE = "timeout", "unavailable"
REDIS_ASK_PREFIX = "mcp-gateway:ask:"
REDIS_ANSWER_PREFIX = "mcp-gateway:ask-answer:"
REDIS_TIMEOUT_SECONDS = 2.0
# BLPOP's wait, below the client's socket timeout (gateway/redis_client.py): the asking process polls.
POLL_SECONDS = 1
ANSWER_TTL_MS = 60_000  # an answer nobody takes (its question just timed out) is forgotten


def is_gateway_id(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(ASK_ID_PREFIX)


class Delivery(enum.Enum):
    DELIVERED = "delivered"
    FOREIGN = "foreign"  # pending, but asked of another principal or in another session: 403
    UNKNOWN = "unknown"  # not pending (answered already, timed out, or another process asked): 404
    UNAVAILABLE = "unavailable"  # Redis did not answer: 503, the client may answer again


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class SharedAsks:
    """Questions and answers in the Redis replicas share (``replay_store``), so any process takes an
    answer. Keys are hashes of the ask id; the record holds hashes of owner and session, nothing readable."""

    def __init__(self, client: Redis) -> None:
        self._client = client

    async def register(self, ask_id: str, owner: str, session: str, ttl_seconds: int) -> bool:
        record = json.dumps({"o": _digest(owner), "s": _digest(session)})
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                await self._client.set(REDIS_ASK_PREFIX + _digest(ask_id), record, px=ttl_seconds * 1000)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("approval question not shared: Redis: %s", type(exc).__name__)
            return False
        return True

    async def forget(self, ask_id: str) -> None:
        """Best effort: the record expires with its TTL anyway."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                await self._client.delete(REDIS_ASK_PREFIX + _digest(ask_id))
        except (RedisError, OSError, TimeoutError):
            pass

    async def deliver(self, message: dict[str, Any], owner: str, session: str | None) -> Delivery:
        key = REDIS_ASK_PREFIX + _digest(message["id"])
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                raw = await self._client.get(key)
                if raw is None:
                    return Delivery.UNKNOWN
                record = json.loads(raw)
                same_owner = hmac.compare_digest(record["o"], _digest(owner))
                same_session = session is not None and hmac.compare_digest(record["s"], _digest(session))
                if not (same_owner and same_session):
                    return Delivery.FOREIGN
                if not await self._client.delete(key):
                    return Delivery.UNKNOWN  # another answer won, or the question just ended
                async with self._client.pipeline(transaction=True) as pipe:
                    answer_key = REDIS_ANSWER_PREFIX + _digest(message["id"])
                    pipe.rpush(answer_key, json.dumps(message))
                    pipe.pexpire(answer_key, ANSWER_TTL_MS)
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("approval answer not delivered: Redis: %s", type(exc).__name__)
            return Delivery.UNAVAILABLE
        return Delivery.DELIVERED

    async def wait(self, ask_id: str, answer: asyncio.Future[dict[str, Any]]) -> None:
        """Poll for an answer another process received; until it comes, the asker cancels this, or Redis
        fails (then only an answer reaching this process counts)."""
        key = REDIS_ANSWER_PREFIX + _digest(ask_id)
        while not answer.done():
            try:
                popped = await self._client.blpop([key], timeout=POLL_SECONDS)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("approval answers of other processes not received: Redis: %s", type(exc).__name__)
                return
            if popped is not None and not answer.done():
                answer.set_result(json.loads(popped[1]))


def shared_asks(replay: ReplayStore) -> SharedAsks | None:
    """Questions are shared where the replay store is: Redis (replicas, workers), else this process only."""
    return SharedAsks(replay.client) if isinstance(replay, RedisReplayStore) else None


@dataclass(frozen=True)
class _Pending:
    owner: str
    session: str
    answer: asyncio.Future[dict[str, Any]]


class PendingAsks:
    """The questions this process waits on, by the gateway's request id."""

    def __init__(self, limit: int = MAX_PENDING_ASKS) -> None:
        self._pending: dict[str, _Pending] = {}
        self._by_owner: dict[str, int] = {}
        self._limit = limit

    def open(self, owner: str, session: str, owner_limit: int) -> tuple[str, asyncio.Future[dict[str, Any]]] | None:
        """A new question's id and the future its answer arrives on; None when too many are open, in
        all or for this principal (``owner_limit``: one user's questions cannot crowd out others')."""
        if len(self._pending) >= self._limit or self._by_owner.get(owner, 0) >= owner_limit:
            return None
        ask_id = ASK_ID_PREFIX + secrets.token_urlsafe(24)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ask_id] = _Pending(owner, session, answer)
        self._by_owner[owner] = self._by_owner.get(owner, 0) + 1
        return ask_id, answer

    def close(self, ask_id: str) -> None:
        pending = self._pending.pop(ask_id, None)
        if pending is not None:
            left = self._by_owner.pop(pending.owner) - 1
            if left:
                self._by_owner[pending.owner] = left

    async def deliver(
        self, message: dict[str, Any], owner: str, session: str | None, shared: SharedAsks | None = None
    ) -> Delivery:
        """Hand a client's JSON-RPC response to the question it answers (once), here or, through
        ``shared``, in the process that asked it."""
        pending = self._pending.get(message.get("id"))  # type: ignore[arg-type]  # ids are str here
        if pending is None or pending.answer.done():
            return await shared.deliver(message, owner, session) if shared is not None else Delivery.UNKNOWN
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
    owner_limit: int,
    approver: str,
    send: Callable[[dict[str, Any]], Awaitable[None]],
    keep_alive: Callable[[], Awaitable[None]],
    keepalive_seconds: float | None,
    observe: ApprovalObserver,
    shared: SharedAsks | None = None,
) -> str:
    """Send the question with ``send``, wait up to the rule's ``timeout_seconds`` for the answer, and
    say what came of it: ``approved``, ``declined``, ``cancelled``, ``timeout`` or ``unavailable``.
    Every step is told to ``observe`` with the gateway's request id as the approval id."""
    opened = pending.open(owner, session, owner_limit)
    if opened is None:
        return UNAVAILABLE
    ask_id, answer = opened
    binding = ask.binding
    poll: asyncio.Task[None] | None = None

    def event(name: str, **fields: Any) -> None:
        observe(name, approval_id=ask_id, route=binding.route, target=binding.tool, **fields)

    try:
        if shared is not None:
            # Forgotten when the wait ends; the TTL is the backstop should Redis not hear that.
            if not await shared.register(ask_id, owner, session, ask.spec.timeout_seconds + 5):
                return UNAVAILABLE
            poll = asyncio.create_task(shared.wait(ask_id, answer))
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
    except (asyncio.CancelledError, ConnectionError):
        # The client left (aiohttp cancels the handler, or a write fails): the call is dropped.
        event("approval.cancelled", reason="client_left")
        raise
    finally:
        pending.close(ask_id)
        if shared is not None and poll is not None:
            poll.cancel()
            await shared.forget(ask_id)
    message = answer.result()
    # An error response (the client could not show the form) is no approval: cancelled.
    outcome = stateless.answer_of(message.get("result")) if "result" in message else "cancelled"
    event("approval.granted" if outcome == "approved" else f"approval.{outcome}", approver=approver)
    return outcome
