"""Per-client rate limit at the token endpoint: one token bucket per client, per process.

EMA §7.5.1: "Token endpoints SHOULD apply rate limiting and monitoring". Each request draws one
token from a bucket of ``burst`` tokens refilled at ``requests_per_minute / 60`` per second.

Buckets exist only for the configured ``client_id``s plus one shared bucket, all made up front: no
request can add an entry, so memory is fixed and an attacker cannot evict anyone's bucket. Requests
that fail before a client authenticates (malformed, unknown client, wrong secret) draw from the
shared bucket, never from the client they name: guessing a client's secret, or flooding with its
id, throttles the attacker and the other failures, not that client. A config reload builds a new
limiter, with full buckets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.config import TokenRateLimitConfig


@dataclass
class _Bucket:
    tokens: float
    updated: float


class ClientRateLimiter:
    def __init__(
        self,
        config: TokenRateLimitConfig,
        client_ids: Iterable[str],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert config.requests_per_minute > 0, "a limit of 0 means no limiter"
        self._rate = config.requests_per_minute / 60
        self._burst = float(config.burst)
        self._clock = clock
        now = clock()
        self._shared = _Bucket(self._burst, now)
        self._buckets = {client_id: _Bucket(self._burst, now) for client_id in client_ids}

    def acquire(self, client_id: str | None) -> int:
        """Take one request from ``client_id``'s bucket (None: the shared bucket of requests that did
        not authenticate). 0 when allowed; else the whole seconds until one is available."""
        bucket = self._buckets.get(client_id, self._shared) if client_id is not None else self._shared
        now = self._clock()
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0
        return max(1, math.ceil((1 - bucket.tokens) / self._rate))
