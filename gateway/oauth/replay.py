"""Single-use enforcement for ID-JAG ``jti`` values.

EMA §7.4.2: the authorization server "MUST implement replay detection by rejecting re-use of the same
``jti`` for the lifetime of the assertion". With several replicas behind a load balancer that only
holds if they share one store, or an assertion refused by one replica could be redeemed at the next:
``RedisReplayStore`` is that shared store, ``MemoryReplayStore`` the single-process default.

The same store, with its own key prefixes, makes client assertions and DPoP proofs (RFC 9449 §11.1)
single use and holds the access tokens revoked at the RFC 7009 endpoint (``is_recorded``), so every
replica refuses them.

A store that cannot answer fails closed: it raises ``ReplayStoreUnavailable`` and the grant is
refused with a retryable error, because "unknown" must never be read as "first use".

One bad entry must not poison a store shared by every client: a key that is not a string is never a
first use, and an expiry that is absurd (NaN, infinite, huge, in the past, not a number) is clamped
to ``[now, now + MAX_RETENTION_SECONDS]`` before it is stored, so no entry lives forever and the
memory store's expiry heap only ever holds finite numbers and bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gateway.redis_client import open_redis, uses_redis

log = logging.getLogger(__name__)

REDIS_KEY_PREFIX = "mcp-gateway:jti:"
REDIS_TIMEOUT_SECONDS = 2.0
# The longest a key is remembered. Above any window the ID-JAG validator can ask for (exp <= iat +
# max_assertion_lifetime_seconds <= 3600 with iat <= now + clock_skew_seconds <= 300, plus the skew
# again), so it never shortens replay protection; it only stops an absurd expiry living forever.
MAX_RETENTION_SECONDS = 24 * 3600


class ReplayStoreUnavailable(Exception):
    """The store could not say whether a key was seen before; the caller must refuse, not accept."""


class ReplayStore(Protocol):
    async def first_use(self, key: str, expires_at: float) -> bool:
        """Record ``key`` until ``expires_at`` (see ``retention_until``); False if it was already
        recorded (a replay) or is not a string.

        Raises ``ReplayStoreUnavailable`` when that cannot be decided."""
        ...

    async def is_recorded(self, key: str) -> bool:
        """Whether ``key`` is recorded and not yet expired, without recording it (a revocation
        list lookup). Raises ``ReplayStoreUnavailable`` when that cannot be decided."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


def retention_until(expires_at: object, now: float) -> float:
    """When to forget a key: ``expires_at`` clamped to ``[now, now + MAX_RETENTION_SECONDS]``.

    Anything that is not a finite number (NaN, infinities, bool, None, text) gets the maximum: when
    in doubt a key is remembered longer, never shorter."""
    longest = now + MAX_RETENTION_SECONDS
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
        return longest
    if isinstance(expires_at, float) and not math.isfinite(expires_at):
        return longest
    return float(min(max(expires_at, now), longest))


def _refuse_non_string(key: object) -> bool:
    if isinstance(key, str):
        return False
    log.warning("replay store: refused a key of type %s (not a string)", type(key).__name__)
    return True


class MemoryReplayStore:
    """A bounded in-process store. When full it refuses new keys instead of evicting live ones,
    because evicting an unexpired ``jti`` would let that assertion be replayed. Keys are kept as
    SHA-256 digests: fixed size whatever the caller passes."""

    def __init__(self, max_entries: int = 1_000_000, *, clock: Callable[[], float] = time.time) -> None:
        self._expiry: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []
        self._max_entries = max_entries
        self._clock = clock

    async def first_use(self, key: str, expires_at: float) -> bool:
        if _refuse_non_string(key):
            return False
        now = self._clock()
        self._purge(now)
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        if digest in self._expiry:
            return False
        if len(self._expiry) >= self._max_entries:
            return False
        until = retention_until(expires_at, now)
        self._expiry[digest] = until
        heapq.heappush(self._heap, (until, digest))
        return True

    async def is_recorded(self, key: str) -> bool:
        self._purge(self._clock())
        return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest() in self._expiry

    async def close(self) -> None:
        """Nothing to release; present so every store is closed the same way."""

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expires_at, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expires_at:
                del self._expiry[key]

    def __len__(self) -> int:
        return len(self._expiry)


class RedisReplayStore:
    """Keys shared by every replica in Redis, each set once with ``SET NX`` and a TTL.

    ``SET key marker NX PX ttl`` is one atomic command, so two replicas racing on the same ``jti``
    cannot both see "first use", and Redis expires the key itself: nothing to purge. Keys are
    ``prefix + sha256(iss NUL jti)``: bounded length, and no issuer or user-chosen text in Redis.
    The TTL is measured on the gateway's clock, the same one that checked ``exp``, so a Redis host
    whose clock runs ahead cannot shorten the replay window.

    After a Redis restart or failover a pooled connection is dead, and redis-py may notice only when a
    command fails on it; so a ``ConnectionError`` gets exactly one more try on a new connection.
    The first SET may have been applied before its connection died, so on that try a refusal is
    checked against this call's random ``marker``: our own write is a first use, not a replay.
    Anything else (timeouts, errors, the overall deadline) raises ``ReplayStoreUnavailable``.
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
        self._prefix = prefix
        self._timeout = timeout
        self._clock = clock

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = REDIS_KEY_PREFIX, timeout: float = REDIS_TIMEOUT_SECONDS
    ) -> RedisReplayStore:
        """A store for a ``redis://``, ``rediss://`` or ``unix://`` URL (credentials allowed: Redis AUTH).

        No connection is made here; the first ``first_use`` connects. Timeouts are short and redis-py's
        own retries off (``first_use`` retries once, safely) so that an unreachable Redis costs a
        token request seconds, not minutes."""
        return cls(open_redis(url, timeout), prefix=prefix, timeout=timeout)

    @property
    def client(self) -> Redis:
        """The connection pool, for other state replicas share through the same Redis (approval answers)."""
        return self._client

    def key_for(self, key: str) -> str:
        """The Redis key holding ``key`` (public so tests and operators can find it)."""
        return self._prefix + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()

    async def first_use(self, key: str, expires_at: float) -> bool:
        if _refuse_non_string(key):
            return False
        name = self.key_for(key)
        now = self._clock()
        # Redis refuses PX 0 or less; an already expired assertion was refused before it got here.
        ttl_ms = max(1, math.ceil((retention_until(expires_at, now) - now) * 1000))
        marker = secrets.token_hex(8).encode()
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    return bool(await self._client.set(name, marker, nx=True, px=ttl_ms))
                except RedisConnectionError:
                    if await self._client.set(name, marker, nx=True, px=ttl_ms):
                        return True
                    return await self._client.get(name) == marker
        except (RedisError, OSError, TimeoutError) as exc:
            # Redis error texts name the host and the failure, never the password.
            log.warning("replay store unavailable: %s: %s", type(exc).__name__, str(exc) or "no answer in time")
            raise ReplayStoreUnavailable("the replay store (Redis) did not answer") from exc

    async def is_recorded(self, key: str) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    return bool(await self._client.exists(self.key_for(key)))
                except RedisConnectionError:
                    # A pooled connection dead after a Redis restart: one more try on a new one (read only).
                    return bool(await self._client.exists(self.key_for(key)))
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("replay store unavailable: %s: %s", type(exc).__name__, str(exc) or "no answer in time")
            raise ReplayStoreUnavailable("the replay store (Redis) did not answer") from exc

    async def close(self) -> None:
        await self._client.aclose()


def open_replay_store(url: str | None) -> ReplayStore:
    """The store named by the ``replay_store`` config value: ``memory`` (or None) or a Redis URL."""
    if not uses_redis(url, "replay store"):
        return MemoryReplayStore()
    assert url is not None
    return RedisReplayStore.from_url(url)
