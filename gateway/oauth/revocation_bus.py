"""Ending, on every replica, the streams opened with an access token revoked at one of them (RFC 7009).

The revoked token's ``jti`` is in the shared replay store, so every replica refuses the token's next
request. A stream opened with it before the revocation (a listening GET stream, a long tool call)
carries no next request, so the replica that revoked the token says so on a Redis pub/sub channel and
each replica ends its own streams opened with that token. Best effort by design: a replica whose
subscription is down when the message passes keeps such a stream until it ends, as without the bus,
and still refuses the token's next request. The channel is named after the replay store's key prefix,
so deployments sharing a Redis do not hear each other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.oauth.replay import RedisReplayStore, ReplayStore

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_SECONDS = 2.0
POLL_SECONDS = 1.0  # below the client's socket timeout (gateway/oauth/replay.py)
RETRY_SECONDS = 1.0
MAX_TOKEN_ID_CHARS = 128


class RevokedTokenBus:
    def __init__(self, client: Redis, channel: str) -> None:
        self._client = client
        self._channel = channel
        self.subscribed = asyncio.Event()  # set while the subscription is live (tests wait on it)

    async def publish(self, token_id: str) -> None:
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                await self._client.publish(self._channel, token_id)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("revoked token not announced to the other replicas: Redis: %s", type(exc).__name__)

    async def listen(self, deliver: Callable[[str], None]) -> None:
        """Hand each token id another replica revoked to ``deliver``, until cancelled."""
        while True:
            try:
                await self._subscribed(deliver)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("lost the Redis subscription for revoked tokens (%s); resubscribing", type(exc).__name__)
            except Exception:
                # Whatever it was, this replica must keep hearing about revocations: log it and go on.
                log.exception("the Redis subscription for revoked tokens failed; resubscribing")
            self.subscribed.clear()
            await asyncio.sleep(RETRY_SECONDS)

    async def _subscribed(self, deliver: Callable[[str], None]) -> None:
        async with self._client.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(self._channel)
            self.subscribed.set()
            while True:
                message = await pubsub.get_message(timeout=POLL_SECONDS)
                if message is None or message.get("type") != "message":
                    continue
                data = message.get("data")
                token_id = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
                # Written by gateways only, but a shared Redis is no reason to trust its shape.
                if isinstance(token_id, str) and 0 < len(token_id) <= MAX_TOKEN_ID_CHARS:
                    deliver(token_id)


def revocation_bus(replay: ReplayStore) -> RevokedTokenBus | None:
    """The bus beside a Redis replay store (replicas share it); None for memory (one process)."""
    if not isinstance(replay, RedisReplayStore):
        return None
    return RevokedTokenBus(replay.client, replay.key_for("channel\x00revoked-access-tokens"))
