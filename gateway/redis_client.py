"""How the gateway opens Redis for the state its replicas share (ID-JAG replay cache, quota counters).

Every store built on it fails closed, so a Redis that is unreachable or silent must cost a request
seconds, not minutes: connect and socket timeouts are short, and redis-py's own retries are off
(each store decides itself whether one more try is safe for its command).
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

REDIS_SCHEMES = ("redis", "rediss", "unix")


def open_redis(url: str, timeout: float) -> Redis:
    """A client for a ``redis://``, ``rediss://`` or ``unix://`` URL (credentials allowed: Redis AUTH).

    No connection is made here; the first command connects."""
    return Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout, retry=Retry(NoBackoff(), 0))


def uses_redis(url: str | None, store: str) -> bool:
    """Whether the ``replay_store`` value names Redis (True) or process memory (False: ``memory`` or
    unset); anything else is a ``ValueError`` naming ``store``."""
    if url is None or url == "memory":
        return False
    if url.partition("://")[0].lower() not in REDIS_SCHEMES:
        raise ValueError(f"{store} must be 'memory' or a {', '.join(REDIS_SCHEMES)} URL")
    return True
