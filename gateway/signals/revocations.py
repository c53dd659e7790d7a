"""Who is cut off since when, in this process and, through the replay store, on every replica.

Each process keeps the cut-offs in memory (a dictionary lookup per request, no round trip on the hot
path). A cut-off accepted by one replica is published to the others: with ``replay_store: memory``
there are none; with Redis it is added to a sorted set (score: when it may be forgotten) and
announced on a pub/sub channel. Every replica subscribes, and reads the whole set when it
(re)subscribes and every few seconds, so a replica that was disconnected or started later still
learns every cut-off it missed.

A cut-off is kept ``RETENTION_SECONDS``: longer than any access token (``access_token_ttl_seconds`` <=
3600) or ID-JAG (``max_assertion_lifetime_seconds`` <= 3600) issued before it can live, with the
largest clock skew (300 s) on top; after that every token it could refuse has expired anyway.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.oauth.identity import SubjectIdentity
from gateway.redis_client import open_redis, uses_redis
from gateway.signals.events import principal_keys

log = logging.getLogger(__name__)

RETENTION_SECONDS = 2 * 3600
MAX_ENTRIES = 1_000_000
REDIS_KEY = "mcp-gateway:ssf:cutoffs"
REDIS_CHANNEL = "mcp-gateway:ssf:cutoffs"
REDIS_TIMEOUT_SECONDS = 2.0
RESYNC_SECONDS = 5.0
_RETRY_SECONDS = 1.0


class SubjectRevocations:
    """This process's cut-offs: revocation key (events.py) -> the time before which (inclusive) tokens
    and ID-JAGs of that subject are refused."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._cutoffs: dict[str, float] = {}
        self._expiry: list[tuple[float, str]] = []
        self._clock = clock

    def refuses(self, identity: SubjectIdentity, email: str | None, issued_at: float) -> bool:
        """Whether a token (or ID-JAG) of this user issued at ``issued_at`` predates a cut-off. Token
        times are whole seconds: a token issued in the cut-off's second is refused too (when in
        doubt, refuse; the client gets a new one a second later)."""
        if not self._cutoffs:
            return False
        for name in principal_keys(identity.issuer, identity.subject, email):
            cutoff = self._cutoffs.get(name)
            if cutoff is not None and issued_at <= cutoff:
                return True
        return False

    def apply(self, name: str, cutoff: float) -> bool:
        """Record a cut-off; False when nothing changed (already known, or too old to matter)."""
        now = self._clock()
        self._purge(now)
        if not math.isfinite(cutoff) or cutoff + RETENTION_SECONDS <= now or cutoff <= self._cutoffs.get(name, -1):
            return False
        if name not in self._cutoffs and len(self._cutoffs) >= MAX_ENTRIES:
            log.error("shared signals: %d subjects cut off at once; refusing to remember more", MAX_ENTRIES)
            return False
        self._cutoffs[name] = cutoff
        heapq.heappush(self._expiry, (cutoff + RETENTION_SECONDS, name))
        return True

    def _purge(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            expires, name = heapq.heappop(self._expiry)
            if name in self._cutoffs and self._cutoffs[name] + RETENTION_SECONDS <= expires:
                del self._cutoffs[name]

    def __len__(self) -> int:
        return len(self._cutoffs)


Deliver = Callable[[str, float], None]


class CutoffBus(Protocol):
    async def publish(self, name: str, cutoff: float) -> None:
        """Tell the other replicas; raises ``CutoffBusUnavailable`` when that failed."""
        ...

    async def listen(self, deliver: Deliver) -> None:
        """Hand every other replica's cut-off to ``deliver``, until cancelled."""
        ...

    async def close(self) -> None: ...


class CutoffBusUnavailable(Exception):
    """The other replicas could not be told (Redis did not answer)."""


class LocalBus:
    """``replay_store: memory``: one process, nobody else to tell."""

    async def publish(self, name: str, cutoff: float) -> None:
        return None

    async def listen(self, deliver: Deliver) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisBus:
    def __init__(self, client: Redis, *, clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._clock = clock

    async def publish(self, name: str, cutoff: float) -> None:
        member = json.dumps([name, cutoff], separators=(",", ":"))
        now = self._clock()
        try:
            async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.zadd(REDIS_KEY, {member: cutoff + RETENTION_SECONDS})
                    pipe.zremrangebyscore(REDIS_KEY, "-inf", now)
                    pipe.publish(REDIS_CHANNEL, member)
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning(
                "shared signals: Redis unavailable: %s: %s", type(exc).__name__, str(exc) or "no answer in time"
            )
            raise CutoffBusUnavailable("the replay store (Redis) did not answer") from exc

    async def listen(self, deliver: Deliver) -> None:
        while True:
            try:
                await self._subscribed(deliver)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("shared signals: lost the Redis subscription (%s); resubscribing", type(exc).__name__)
                await asyncio.sleep(_RETRY_SECONDS)
            except Exception:
                # Whatever it was, this replica must keep hearing about cut-offs: log it and go on.
                log.exception("shared signals: the Redis subscription failed; resubscribing")
                await asyncio.sleep(_RETRY_SECONDS)

    async def _subscribed(self, deliver: Deliver) -> None:
        async with self._client.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(REDIS_CHANNEL)
            # After subscribing: whatever was published before is in the set, whatever comes after
            # arrives on the channel, so nothing falls between the two.
            await self._sync(deliver)
            next_sync = time.monotonic() + RESYNC_SECONDS
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message.get("type") == "message":
                    _deliver(message["data"], deliver)
                if time.monotonic() >= next_sync:
                    await self._sync(deliver)
                    next_sync = time.monotonic() + RESYNC_SECONDS

    async def _sync(self, deliver: Deliver) -> None:
        async with asyncio.timeout(REDIS_TIMEOUT_SECONDS):
            members = await self._client.zrangebyscore(REDIS_KEY, self._clock(), "+inf")
        for member in members:
            _deliver(member, deliver)

    async def close(self) -> None:
        await self._client.aclose()


def _deliver(data: bytes | str, deliver: Deliver) -> None:
    """Members are written by gateways only, but a shared Redis is no reason to trust their shape."""
    try:
        name, cutoff = json.loads(data)
    except (ValueError, TypeError):
        return
    if isinstance(name, str) and isinstance(cutoff, int | float) and not isinstance(cutoff, bool):
        deliver(name, float(cutoff))


def open_bus(url: str | None) -> CutoffBus:
    """The bus for the ``replay_store`` value: local for ``memory``, Redis otherwise."""
    if not uses_redis(url, "replay store"):
        return LocalBus()
    assert url is not None
    return RedisBus(open_redis(url, REDIS_TIMEOUT_SECONDS))
