"""Where parked calls wait for someone else's approval (``approver_groups``): process memory or Redis.

The store is chosen as the replay store is (``replay_store``: ``memory`` for one process, or a Redis URL
shared by every replica), so an approval asked at one replica can be granted at a second and used at a
third. Two records per approval:

- the approval, by its id (a 128-bit random capability): what it is for, its status and its expiry;
- a pointer from the call's binding (gateway/approvals/binding.py ``fingerprint``) to the current
  approval, so the same principal's identical call finds it again.

Every state change is one atomic step (a Lua script in Redis, a method without ``await`` in memory):
``pending -> granted | declined`` happens once, and ``granted -> used`` happens once, so two replicas
can never both forward one approved call. Records expire by TTL, ``RETAIN_EXPIRED_SECONDS`` after their
validity ends: long enough to tell a late retry that its approval expired (audited), bounded so
nothing lives forever. Expiry is judged on the gateway's clock, as for the replay store.

A store that cannot answer fails closed (``ApprovalStoreUnavailable``): the call is not forwarded.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.oauth.replay import REDIS_TIMEOUT_SECONDS
from gateway.redis_client import open_redis, uses_redis

log = logging.getLogger(__name__)

REDIS_KEY_PREFIX = "mcp-gateway:approval:"
REDIS_POINTER_PREFIX = "mcp-gateway:approval-for:"
RETAIN_EXPIRED_SECONDS = 3600
MAX_MEMORY_APPROVALS = 100_000

PENDING, GRANTED, DECLINED, USED = "pending", "granted", "declined", "used"
# What ``decide`` reports: the approval was decided now, is unknown (or expired), or was decided before.
DECIDED, UNKNOWN, CONFLICT = "decided", "unknown", "conflict"


class ApprovalStoreUnavailable(Exception):
    """The store could not answer (or, in memory, is full): refuse, never forward."""


@dataclass(frozen=True)
class ApprovalRequest:
    """What an approval is for; fixed when it is asked."""

    approval_id: str
    fingerprint: str  # CallBinding.fingerprint: route, principal, tool, arguments hash
    route: str
    tool: str
    requester: str  # the requesting user's SubjectIdentity.key (separation of duties)
    requester_sub: str
    requester_idp: str
    client_id: str
    approver_groups: tuple[str, ...]
    text: str  # gateway/approvals/binding.py summary(): what the approver is shown
    timeout_seconds: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ApprovalRequest:
        fields = json.loads(text)
        fields["approver_groups"] = tuple(fields["approver_groups"])
        return cls(**fields)


@dataclass(frozen=True)
class ApprovalRecord:
    request: ApprovalRequest
    status: str
    expires_at: float  # pending: until decided; granted: until used; declined: how long the "no" stands
    approver: str | None = None
    approver_idp: str | None = None


@dataclass(frozen=True)
class Opened:
    record: ApprovalRecord
    created: bool  # a new pending approval (False: the binding's current one)
    expired: str | None = None  # the id of this binding's previous approval, pending or granted, that expired


class ApprovalStore(Protocol):
    async def open(self, request: ApprovalRequest, now: float) -> Opened:
        """The binding's current approval if it is live (pending, granted, declined and not expired);
        else ``request`` stored as pending until ``now + timeout_seconds``."""
        ...

    async def get(self, approval_id: str, now: float) -> ApprovalRecord | None:
        """The approval, or None when unknown or expired."""
        ...

    async def decide(self, approval_id: str, status: str, approver: str, approver_idp: str, now: float) -> str:
        """``pending -> status`` (granted or declined), valid ``timeout_seconds`` from now:
        ``DECIDED``, ``UNKNOWN`` (or expired) or ``CONFLICT`` (decided before)."""
        ...

    async def use(self, approval_id: str, now: float) -> bool:
        """``granted -> used``, once: True for exactly one caller. The binding then needs a new approval."""
        ...

    async def close(self) -> None: ...


def _live(record: ApprovalRecord, now: float) -> bool:
    return record.status != USED and record.expires_at > now


class MemoryApprovalStore:
    """This process only. Bounded: when ``max_entries`` approvals are retained, asking for another
    fails closed (evicting one could forget a decision)."""

    def __init__(self, max_entries: int = MAX_MEMORY_APPROVALS, *, clock: Callable[[], float] = time.time) -> None:
        self._records: dict[str, ApprovalRecord] = {}
        self._pointers: dict[str, str] = {}
        self._forget_at: list[tuple[float, str]] = []
        self._max_entries = max_entries
        self._clock = clock

    # No await in any method: under asyncio each one is atomic.
    async def open(self, request: ApprovalRequest, now: float) -> Opened:
        self._purge()
        expired = None
        current = self._records.get(self._pointers.get(request.fingerprint, ""))
        if current is not None and _live(current, now):
            return Opened(current, False)
        if current is not None and current.status in (PENDING, GRANTED):
            expired = current.request.approval_id
        if len(self._records) >= self._max_entries:
            raise ApprovalStoreUnavailable(f"the in-memory approval store is full ({self._max_entries} approvals)")
        record = ApprovalRecord(request, PENDING, now + request.timeout_seconds)
        self._keep(record)
        self._pointers[request.fingerprint] = request.approval_id
        return Opened(record, True, expired)

    async def get(self, approval_id: str, now: float) -> ApprovalRecord | None:
        return self._current(approval_id, now)

    async def decide(self, approval_id: str, status: str, approver: str, approver_idp: str, now: float) -> str:
        record = self._current(approval_id, now)
        if record is None:
            return UNKNOWN
        if record.status != PENDING:
            return CONFLICT
        expires_at = now + record.request.timeout_seconds
        self._keep(replace(record, status=status, expires_at=expires_at, approver=approver, approver_idp=approver_idp))
        return DECIDED

    async def use(self, approval_id: str, now: float) -> bool:
        record = self._current(approval_id, now)
        if record is None or record.status != GRANTED:
            return False
        self._records[approval_id] = replace(record, status=USED)
        self._drop_pointer(record)
        return True

    async def close(self) -> None:
        """Nothing to release; present so every store is closed the same way."""

    def _current(self, approval_id: str, now: float) -> ApprovalRecord | None:
        self._purge()
        record = self._records.get(approval_id)
        return record if record is not None and record.expires_at > now else None

    def _keep(self, record: ApprovalRecord) -> None:
        self._records[record.request.approval_id] = record
        heapq.heappush(self._forget_at, (record.expires_at + RETAIN_EXPIRED_SECONDS, record.request.approval_id))

    def _drop_pointer(self, record: ApprovalRecord) -> None:
        if self._pointers.get(record.request.fingerprint) == record.request.approval_id:
            del self._pointers[record.request.fingerprint]

    def _purge(self) -> None:
        now = self._clock()
        while self._forget_at and self._forget_at[0][0] <= now:
            _, approval_id = heapq.heappop(self._forget_at)
            record = self._records.get(approval_id)
            if record is not None and record.expires_at + RETAIN_EXPIRED_SECONDS <= now:
                del self._records[approval_id]
                self._drop_pointer(record)

    def __len__(self) -> int:
        return len(self._records)


# KEYS[1]: the binding's pointer. ARGV: record prefix, new id, now, expires_at, TTL ms, fingerprint, request JSON.
# Reply: {0, current id} (live) or {1, new id[, id of the previous approval that expired unused]}.
_OPEN = """
local current = redis.call('GET', KEYS[1])
local expired = false
if current then
  local state = redis.call('HMGET', ARGV[1] .. current, 'status', 'expires_at')
  if state[1] and state[1] ~= 'used' then
    if tonumber(state[2]) > tonumber(ARGV[3]) then return {0, current} end
    if state[1] ~= 'declined' then expired = current end
  end
end
local key = ARGV[1] .. ARGV[2]
redis.call('HSET', key, 'status', 'pending', 'expires_at', ARGV[4], 'fingerprint', ARGV[6], 'request', ARGV[7])
redis.call('PEXPIRE', key, ARGV[5])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[5])
if expired then return {1, ARGV[2], expired} end
return {1, ARGV[2]}
"""

# KEYS[1]: the approval. ARGV: pointer prefix, now, new status, approver, approver idp, expires_at, TTL ms, id.
# Reply: 1 decided, 0 unknown or expired, 2 decided before.
_DECIDE = """
local state = redis.call('HMGET', KEYS[1], 'status', 'expires_at', 'fingerprint')
if not state[1] or tonumber(state[2]) <= tonumber(ARGV[2]) then return 0 end
if state[1] ~= 'pending' then return 2 end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'approver', ARGV[4], 'approver_idp', ARGV[5], 'expires_at', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
local pointer = ARGV[1] .. state[3]
if redis.call('GET', pointer) == ARGV[8] then redis.call('PEXPIRE', pointer, ARGV[7]) end
return 1
"""

# KEYS[1]: the approval. ARGV: pointer prefix, now, id. Reply: 1 used now, 0 not usable.
_USE = """
local state = redis.call('HMGET', KEYS[1], 'status', 'expires_at', 'fingerprint')
if state[1] ~= 'granted' or tonumber(state[2]) <= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'status', 'used')
local pointer = ARGV[1] .. state[3]
if redis.call('GET', pointer) == ARGV[3] then redis.call('DEL', pointer) end
return 1
"""


class RedisApprovalStore:
    """Approvals shared by every replica: ``mcp-gateway:approval:<id>`` (a hash: status, expires_at,
    approver, approver_idp, fingerprint, request) and ``mcp-gateway:approval-for:<fingerprint>`` (the id).
    Scripts name the approval key from the pointer's value, so both must live on one server: a single
    Redis or a primary with replicas, not Redis Cluster (as for quotas).

    A ``ConnectionError`` (a pooled connection that died with a Redis restart) gets one more try on a
    new connection. If the first try had been applied, the second sees its effect: ``open`` finds the
    approval it made, ``decide`` answers "decided before", ``use`` answers "not usable" (the caller asks
    again): a lost reply never lets a call through twice."""

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = REDIS_KEY_PREFIX,
        pointer_prefix: str = REDIS_POINTER_PREFIX,
        timeout: float = REDIS_TIMEOUT_SECONDS,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._pointer_prefix = pointer_prefix
        self._timeout = timeout
        self._open = client.register_script(_OPEN)
        self._decide = client.register_script(_DECIDE)
        self._use = client.register_script(_USE)

    @classmethod
    def from_url(cls, url: str, *, timeout: float = REDIS_TIMEOUT_SECONDS) -> RedisApprovalStore:
        return cls(open_redis(url, timeout), timeout=timeout)

    async def _run(self, command: Callable[[], Any]) -> Any:
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    return await command()
                except RedisConnectionError:
                    return await command()
        except (RedisError, OSError, TimeoutError) as exc:
            # Redis error texts name the host and the failure, never the password.
            log.warning("approval store unavailable: %s: %s", type(exc).__name__, str(exc) or "no answer in time")
            raise ApprovalStoreUnavailable("the approval store (Redis) did not answer") from exc

    async def open(self, request: ApprovalRequest, now: float) -> Opened:
        expires_at = now + request.timeout_seconds
        args = [
            self._prefix,
            request.approval_id,
            repr(now),
            repr(expires_at),
            _ttl_ms(expires_at, now),
            request.fingerprint,
            request.to_json(),
        ]
        reply = await self._run(lambda: self._open(keys=[self._pointer_prefix + request.fingerprint], args=args))
        created, approval_id = bool(reply[0]), _text(reply[1])
        if created:
            expired = _text(reply[2]) if len(reply) > 2 else None
            return Opened(ApprovalRecord(request, PENDING, expires_at), True, expired)
        record = await self.get(approval_id, now)
        if record is None:  # expired between the two commands: a rare race, answered as "unavailable"
            raise ApprovalStoreUnavailable("the approval expired while it was read")
        return Opened(record, False)

    async def get(self, approval_id: str, now: float) -> ApprovalRecord | None:
        fields = await self._run(lambda: self._client.hgetall(self._prefix + approval_id))
        if not fields or b"request" not in fields:
            return None
        record = ApprovalRecord(
            ApprovalRequest.from_json(fields[b"request"]),
            _text(fields[b"status"]),
            float(fields[b"expires_at"]),
            _text(fields[b"approver"]) if b"approver" in fields else None,
            _text(fields[b"approver_idp"]) if b"approver_idp" in fields else None,
        )
        return record if record.expires_at > now else None

    async def decide(self, approval_id: str, status: str, approver: str, approver_idp: str, now: float) -> str:
        record = await self.get(approval_id, now)
        if record is None:
            return UNKNOWN
        expires_at = now + record.request.timeout_seconds
        args = [
            self._pointer_prefix,
            repr(now),
            status,
            approver,
            approver_idp,
            repr(expires_at),
            _ttl_ms(expires_at, now),
            approval_id,
        ]
        reply = await self._run(lambda: self._decide(keys=[self._prefix + approval_id], args=args))
        return {1: DECIDED, 2: CONFLICT}.get(int(reply), UNKNOWN)

    async def use(self, approval_id: str, now: float) -> bool:
        args = [self._pointer_prefix, repr(now), approval_id]
        return bool(await self._run(lambda: self._use(keys=[self._prefix + approval_id], args=args)))

    async def close(self) -> None:
        await self._client.aclose()


def _ttl_ms(expires_at: float, now: float) -> int:
    return max(1, math.ceil((expires_at + RETAIN_EXPIRED_SECONDS - now) * 1000))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def open_approval_store(url: str | None) -> ApprovalStore:
    """The store beside the replay cache named by ``replay_store``: ``memory`` (or None) or a Redis URL."""
    if not uses_redis(url, "approval store"):
        return MemoryApprovalStore()
    assert url is not None
    return RedisApprovalStore.from_url(url)
