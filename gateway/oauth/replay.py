"""Single-use enforcement for ID-JAG ``jti`` values.

EMA §7.4.2: the authorization server "MUST implement replay detection by rejecting re-use of the same
``jti`` for the lifetime of the assertion". The store is an interface so that several replicas can
share one (Redis, in the operations issue); the in-memory store is the single-process default.
"""

from __future__ import annotations

import heapq
import time
from typing import Protocol


class ReplayStore(Protocol):
    async def first_use(self, key: str, expires_at: float) -> bool:
        """Record ``key`` until ``expires_at``; False if it was already recorded (a replay)."""
        ...


class MemoryReplayStore:
    """A bounded in-process store. When full it refuses new keys instead of evicting live ones,
    because evicting an unexpired ``jti`` would let that assertion be replayed."""

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._max_entries = max_entries

    async def first_use(self, key: str, expires_at: float) -> bool:
        now = time.time()
        self._purge(now)
        if key in self._expiry:
            return False
        if len(self._expiry) >= self._max_entries:
            return False
        self._expiry[key] = expires_at
        heapq.heappush(self._heap, (expires_at, key))
        return True

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expires_at, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expires_at:
                del self._expiry[key]

    def __len__(self) -> int:
        return len(self._expiry)
