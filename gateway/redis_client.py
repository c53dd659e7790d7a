"""How the gateway opens Redis for the state its replicas share (ID-JAG replay cache, quota counters).

Every store built on it fails closed, so a Redis that is unreachable or silent must cost a request
seconds, not minutes: connect and socket timeouts are short, and redis-py's own retries are off
(each store decides itself whether one more try is safe for its command).
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def open_redis(url: str, timeout: float) -> Redis:
    """A client for a ``redis://``, ``rediss://`` or ``unix://`` URL (credentials allowed: Redis AUTH).

    No connection is made here; the first command connects."""
    return Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout, retry=Retry(NoBackoff(), 0))
