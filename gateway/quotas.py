"""Quotas on tool calls: counters per principal, client, group or route, and the ``routes[].quotas`` config.

Counting is in **fixed windows aligned to multiples of the window length since the Unix epoch**
(UTC): a ``1h`` window runs from one full hour to the next, a ``1d`` window resets at 00:00 UTC,
whichever replica counts and whenever the gateway started. Fixed windows need one counter per key
(cheap, and one atomic Redis script), at the known price that a client can spend up to twice the
limit around a boundary (the end of one window and the start of the next).

A call whose cost does not fit in what remains of a counter is refused and consumes nothing, so a
large request cannot drain a quota it is not allowed to use. A call charged to several counters
(several quotas, or ``per: group`` with several groups) is all or nothing: every counter has room
and all are charged, or none is.

Counters live where the ID-JAG replay cache lives (``replay_store``): in process memory by default,
or in Redis so that every replica charges the same counter. A store that cannot answer fails
closed: it raises ``QuotaStoreUnavailable`` and the call must be refused, because an unknown count
must never be read as "within quota".
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import heapq
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.oauth.replay import REDIS_TIMEOUT_SECONDS
from gateway.redis_client import open_redis, uses_redis

log = logging.getLogger(__name__)

REDIS_KEY_PREFIX = "mcp-gateway:quota:"
# A Redis counter outlives its window by this much, so a replica whose clock is up to this far behind
# still charges the same counter instead of finding it expired and starting a fresh one.
KEY_GRACE_SECONDS = 60
# Relative slack when comparing with the limit: decimal costs are binary floats, and 0.1 + 0.2 must
# fit a limit of 0.3. Far below anything a limit could mean (a limit is at most MAX_LIMIT).
_SLACK = 1e-12

PER = ("user", "client", "group", "route")
MAX_LIMIT = 1e15  # integers up to here are exact in a double, in Python and in Redis's Lua alike
MAX_WINDOW_SECONDS = 366 * 86400
_QUOTA_KEYS = ("id", "per", "tools", "limit", "window", "cost")
_QUOTA_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DURATION = re.compile(r"^([1-9][0-9]{0,8})([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class QuotaStoreUnavailable(Exception):
    """The store could not count this call; the caller must refuse it, not let it through."""


@dataclass(frozen=True)
class QuotaOutcome:
    """One counter's answer. ``used`` is the count after this call (unchanged if nothing was charged);
    ``retry_after_seconds`` is the whole seconds until the window resets (at least 1), set whether
    or not the call was allowed."""

    allowed: bool
    used: float
    limit: float
    retry_after_seconds: int


@dataclass(frozen=True)
class Charge:
    """``cost`` units against the counter ``key`` whose windows of ``window_seconds`` allow ``limit``.

    A cost that is negative or not finite is refused here (``ValueError``): a ``cost`` expression
    evaluating to -5 must not give units back."""

    key: str
    cost: float
    limit: float
    window_seconds: float

    def __post_init__(self) -> None:
        if isinstance(self.cost, bool) or not isinstance(self.cost, int | float) or not 0 <= self.cost < math.inf:
            raise ValueError(f"quota cost must be a finite number >= 0, got {self.cost!r}")
        if not 0 < self.limit < math.inf:
            raise ValueError(f"quota limit must be a finite number > 0, got {self.limit!r}")
        if not 0 < self.window_seconds < math.inf:
            raise ValueError(f"quota window must be a finite number of seconds > 0, got {self.window_seconds!r}")


class QuotaStore(Protocol):
    async def consume(
        self, key: str, cost: float, limit: float, window_seconds: float, now: float | None = None
    ) -> QuotaOutcome:
        """Charge ``cost`` to ``key`` in the window holding ``now`` (default: the current time) if it fits.

        Raises ``QuotaStoreUnavailable`` when that cannot be decided."""
        ...

    async def consume_all(self, charges: Sequence[Charge], now: float | None = None) -> list[QuotaOutcome]:
        """Charge every counter if every one has room, else none; one outcome per charge, in order.

        An outcome is ``allowed`` when its own counter had room: the call may proceed only if all are.
        Raises ``QuotaStoreUnavailable`` when that cannot be decided."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


def _window(now: float, window_seconds: float) -> tuple[int, float]:
    """The index of the window holding ``now`` and the time it ends."""
    index = math.floor(now / window_seconds)
    return index, (index + 1) * window_seconds


def _retry_after(end: float, now: float) -> int:
    return max(1, math.ceil(end - now))


def _fits(used: float, cost: float, limit: float) -> bool:
    return used + cost <= limit + limit * _SLACK


def _digest(key: str) -> str:
    """Counters are named by a hash: bounded size, and no user or group name in memory dumps or Redis.
    ``surrogatepass``: a JSON claim may hold a lone surrogate (``"\\ud800"``), which plain UTF-8 refuses."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _check(charges: Sequence[Charge]) -> None:
    if not charges:
        raise ValueError("consume_all needs at least one charge")
    if len({c.key for c in charges}) != len(charges):
        # The same counter twice would be checked twice against the old count and then charged twice.
        raise ValueError("each counter may be charged once per call")


class MemoryQuotaStore:
    """Counters in this process: the default, for a single replica.

    Memory is bounded: a counter is dropped when its window ends, and at most ``max_counters`` live at
    once. When full, a call that needs a new counter fails closed (``QuotaStoreUnavailable``) while
    calls on existing counters go on; evicting a live counter instead would hand its user a fresh quota.
    """

    def __init__(self, max_counters: int = 1_000_000, *, clock: Callable[[], float] = time.time) -> None:
        self._used: dict[tuple[str, int], float] = {}
        self._ends: list[tuple[float, tuple[str, int]]] = []
        self._max_counters = max_counters
        self._clock = clock

    async def consume(
        self, key: str, cost: float, limit: float, window_seconds: float, now: float | None = None
    ) -> QuotaOutcome:
        return (await self.consume_all([Charge(key, cost, limit, window_seconds)], now))[0]

    async def consume_all(self, charges: Sequence[Charge], now: float | None = None) -> list[QuotaOutcome]:
        # No await in here: under asyncio the check and the charge cannot interleave with another call.
        _check(charges)
        now = self._clock() if now is None else now
        self._evict(now)
        counters = []
        for charge in charges:
            index, end = _window(now, charge.window_seconds)
            counter = (_digest(charge.key), index)
            counters.append((counter, end, self._used.get(counter, 0.0)))
        fits = [_fits(used, c.cost, c.limit) for c, (_, _, used) in zip(charges, counters, strict=True)]
        if all(fits):
            new = sum(1 for counter, _, _ in counters if counter not in self._used)
            if len(self._used) + new > self._max_counters:
                raise QuotaStoreUnavailable(f"the in-memory quota store is full ({self._max_counters} counters)")
            for charge, (counter, end, used) in zip(charges, counters, strict=True):
                if counter not in self._used:
                    heapq.heappush(self._ends, (end, counter))
                self._used[counter] = used + charge.cost
        return [
            QuotaOutcome(ok, self._used.get(counter, used), c.limit, _retry_after(end, now))
            for c, ok, (counter, end, used) in zip(charges, fits, counters, strict=True)
        ]

    async def close(self) -> None:
        """Nothing to release; present so every store is closed the same way."""

    def _evict(self, now: float) -> None:
        while self._ends and self._ends[0][0] <= now:
            _, counter = heapq.heappop(self._ends)
            self._used.pop(counter, None)

    def __len__(self) -> int:
        return len(self._used)


# Check every counter, then charge all or none, in one script: Redis runs a script atomically, so two
# replicas racing on one counter cannot both see room for the last units. Counts are returned as
# strings because Redis truncates Lua numbers to integers in replies.
# KEYS: one counter per charge. ARGV: cost, limit, TTL in ms, for each charge in turn.
# Reply: {1 if all charged else 0, then per charge: 1 if it fits else 0, its count}.
_CONSUME_SCRIPT = f"""
local fits = {{}}
local used = {{}}
local all = 1
for i, key in ipairs(KEYS) do
  local cost = tonumber(ARGV[3 * i - 2])
  local limit = tonumber(ARGV[3 * i - 1])
  used[i] = redis.call('GET', key) or '0'
  if tonumber(used[i]) + cost <= limit + limit * {_SLACK!r} then fits[i] = 1 else fits[i] = 0; all = 0 end
end
if all == 1 then
  for i, key in ipairs(KEYS) do
    used[i] = redis.call('INCRBYFLOAT', key, ARGV[3 * i - 2])
    redis.call('PEXPIRE', key, ARGV[3 * i])
  end
end
local reply = {{all}}
for i = 1, #KEYS do
  reply[#reply + 1] = fits[i]
  reply[#reply + 1] = used[i]
end
return reply
"""


class RedisQuotaStore:
    """Counters shared by every replica in Redis, one key per counter and window:
    ``mcp-gateway:quota:<sha256 of the counter key>:<window index>``, expiring ``KEY_GRACE_SECONDS``
    after its window ends (measured on the gateway's clock, like the window itself).

    The script is sent once and then run by hash (EVALSHA); redis-py loads it again when Redis answers
    NOSCRIPT (after a restart or failover). Counting across several keys in one script needs them on one
    server: a single Redis or a primary with replicas, not Redis Cluster.

    Like the replay store, a ``ConnectionError`` (a pooled connection that died with a Redis restart)
    gets exactly one more try on a new connection. If the first try had in fact been applied, that call
    is counted twice: a lost reply can only make a quota stricter, never looser. Anything else, and the
    overall deadline, raises ``QuotaStoreUnavailable``.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = REDIS_KEY_PREFIX,
        timeout: float = REDIS_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._script = client.register_script(_CONSUME_SCRIPT)
        self._prefix = prefix
        self._timeout = timeout
        self._clock = clock

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = REDIS_KEY_PREFIX, timeout: float = REDIS_TIMEOUT_SECONDS
    ) -> RedisQuotaStore:
        """A store for a ``redis://``, ``rediss://`` or ``unix://`` URL; the first call connects."""
        return cls(open_redis(url, timeout), prefix=prefix, timeout=timeout)

    def key_for(self, key: str, window_index: int) -> str:
        """The Redis key counting ``key`` in one window (public so tests and operators can find it)."""
        return f"{self._prefix}{_digest(key)}:{window_index}"

    async def consume(
        self, key: str, cost: float, limit: float, window_seconds: float, now: float | None = None
    ) -> QuotaOutcome:
        return (await self.consume_all([Charge(key, cost, limit, window_seconds)], now))[0]

    async def consume_all(self, charges: Sequence[Charge], now: float | None = None) -> list[QuotaOutcome]:
        _check(charges)
        now = self._clock() if now is None else now
        windows = [_window(now, c.window_seconds) for c in charges]
        keys = [self.key_for(c.key, index) for c, (index, _) in zip(charges, windows, strict=True)]
        args: list[str | int] = []
        for charge, (_, end) in zip(charges, windows, strict=True):
            ttl_ms = math.ceil((end - now + KEY_GRACE_SECONDS) * 1000)
            args += [repr(float(charge.cost)), repr(float(charge.limit)), ttl_ms]
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    reply = await self._script(keys=keys, args=args)
                except RedisConnectionError:
                    reply = await self._script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            # Redis error texts name the host and the failure, never the password.
            log.warning("quota store unavailable: %s: %s", type(exc).__name__, str(exc) or "no answer in time")
            raise QuotaStoreUnavailable("the quota store (Redis) did not answer") from exc
        return [
            QuotaOutcome(bool(reply[1 + 2 * i]), float(reply[2 + 2 * i]), charge.limit, _retry_after(end, now))
            for i, (charge, (_, end)) in enumerate(zip(charges, windows, strict=True))
        ]

    async def close(self) -> None:
        await self._client.aclose()


def open_quota_store(replay_store_url: str | None) -> QuotaStore:
    """The store beside the replay cache named by ``replay_store``: ``memory`` (or None) or a Redis URL."""
    if not uses_redis(replay_store_url, "quota store"):
        return MemoryQuotaStore()
    assert replay_store_url is not None
    return RedisQuotaStore.from_url(replay_store_url)


@dataclass(frozen=True)
class QuotaRule:
    """One entry of ``routes[].quotas``. ``cost_source`` is the CEL text of ``cost`` (None: each call
    costs 1); compiling and evaluating it is the decision engine's job."""

    id: str
    per: str
    tools: tuple[str, ...]
    limit: float
    window_seconds: int
    cost_source: str | None
    _tools: re.Pattern[str] = field(compare=False, repr=False)
    # The compiled ``cost`` (set when the config is loaded: gateway/config.py compiles it).
    cost: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def make(
        cls, id: str, per: str, tools: Iterable[str], limit: float, window_seconds: int, cost_source: str | None = None
    ) -> QuotaRule:
        tools = tuple(tools)
        matcher = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in tools))
        return cls(id, per, tools, limit, window_seconds, cost_source, matcher)

    def applies_to(self, tool_name: str) -> bool:
        """Whether a ``tools/call`` of ``tool_name`` is counted (``fnmatch`` globs, case-sensitive)."""
        return self._tools.match(tool_name) is not None

    def subject_key(self, route: str, principal_key: str, client_id: str, groups: Iterable[str]) -> list[str]:
        """The counters one call is charged to, each a store key naming route, quota and subject.

        ``principal_key`` is the user's identity key (issuer, tenant and subject; never a session: sessions are
        free to mint). ``per: client`` counts every user of one client together, ``per: route`` every
        call on the route. ``per: group`` keeps one counter per group the user has, and charges all of
        them: a call is refused when any of the user's groups has spent its limit. A user without groups
        is charged to one counter shared by every such user, so a quota never stops applying because
        the IdP sent no groups."""
        base = f"{route}\x00{self.id}\x00{self.per}"
        if self.per == "user":
            return [f"{base}\x00{principal_key}"]
        if self.per == "client":
            return [f"{base}\x00{client_id}"]
        if self.per == "route":
            return [base]
        names = sorted(set(groups))
        if not names:
            return [f"{route}\x00{self.id}\x00no-group"]
        return [f"{base}\x00{name}" for name in names]


def parse_quotas(value: Any, key: str, error: Any) -> tuple[QuotaRule, ...]:
    """Validate one route's ``quotas`` list from YAML; ``error(key, problem)`` builds the ConfigError."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise error(key, "must be a list of quotas ({id, per, tools, limit, window, cost})")
    rules: list[QuotaRule] = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise error(where, "must be a mapping with id, per, tools, limit, window and optionally cost")
        unknown = sorted(str(k) for k in item if k not in _QUOTA_KEYS)
        if unknown:
            raise error(f"{where}.{unknown[0]}", f"unknown key (expected {', '.join(_QUOTA_KEYS)})")
        rule_id = _quota_id(item.get("id"), f"{where}.id", error)
        if any(rule.id == rule_id for rule in rules):
            raise error(f"{where}.id", f"duplicate quota id {rule_id!r} on this route")
        per = item.get("per")
        if per is None:
            raise error(f"{where}.per", f"is required ({', '.join(PER)})")
        if per not in PER:
            raise error(f"{where}.per", f"must be one of {', '.join(PER)}, got {per!r}")
        tools = item.get("tools")
        if not isinstance(tools, list) or not tools or not all(isinstance(t, str) and t for t in tools):
            raise error(f"{where}.tools", 'must be a non-empty list of tool name globs (["*"] for every tool)')
        limit = _limit(item.get("limit"), f"{where}.limit", error)
        window = _window_seconds(item.get("window"), f"{where}.window", error)
        cost = item.get("cost")
        if cost is not None and (not isinstance(cost, str) or not cost.strip()):
            raise error(f"{where}.cost", f"must be a CEL expression (a non-empty string), got {_kind(cost)}")
        rules.append(QuotaRule.make(rule_id, per, tools, limit, window, cost))
    return tuple(rules)


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _quota_id(value: Any, where: str, error: Any) -> str:
    if value is None:
        raise error(where, "is required (it names the quota in errors, metrics and audit)")
    if not isinstance(value, str) or not _QUOTA_ID.match(value):
        raise error(where, f"must be 1-64 letters, digits, '.', '-' or '_', got {value!r}")
    return value


def _limit(value: Any, where: str, error: Any) -> float:
    if value is None:
        raise error(where, "is required (units per window)")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise error(where, f"must be a positive number, got {_kind(value)}")
    if not 0 < value <= MAX_LIMIT:
        raise error(where, f"must be a positive number up to {MAX_LIMIT:g}, got {value}")
    return value


def _window_seconds(value: Any, where: str, error: Any) -> int:
    if value is None:
        raise error(where, "is required (a duration such as 30s, 15m, 1h or 1d)")
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise error(where, f"must be a duration such as 30s, 15m, 1h or 1d, or whole seconds, got {value!r}")
    if not 1 <= seconds <= MAX_WINDOW_SECONDS:
        raise error(where, f"must be between 1s and {MAX_WINDOW_SECONDS // 86400}d, got {value!r}")
    return seconds
