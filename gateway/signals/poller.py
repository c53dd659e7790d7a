"""Poll delivery (RFC 8936): the gateway asks the transmitter for SETs and acknowledges them.

Each request (§2.4) acknowledges the SETs of the previous answer (``ack``) and reports the ones it
refused (``setErrs``, with the RFC 8935 error codes), and asks with ``returnImmediately: false``, so a
transmitter that supports long polling answers as soon as an event exists (§2.4.1). After an
empty answer the poller waits ``poll_interval_seconds``; after SETs it asks again at once, to
acknowledge them. SETs refused with a retryable error (503) are neither acknowledged nor reported,
so the transmitter delivers them again. Failures are logged and retried after the interval.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from gateway.config import TransmitterConfig
from gateway.signals.verify import SetRefused, VerifiedSet

log = logging.getLogger(__name__)

MAX_EVENTS = 100
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# How long a long-polling transmitter may hold the request before it must answer.
REQUEST_TIMEOUT_SECONDS = 60.0

Receive = Callable[[str, str, "list[str] | None"], Awaitable[VerifiedSet]]


class Poller:
    def __init__(
        self, transmitter: TransmitterConfig, session: Callable[[], aiohttp.ClientSession], receive: Receive
    ) -> None:
        assert transmitter.poll_endpoint is not None
        self._transmitter = transmitter
        self._url = transmitter.poll_endpoint
        self._session = session
        self._receive = receive
        self._ack: list[str] = []
        self._errors: dict[str, dict[str, str]] = {}

    async def run(self) -> None:
        interval = self._transmitter.poll_interval_seconds
        while True:
            try:
                got_sets = await self.poll_once()
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                log.warning("shared signals: polling %s failed: %s", self._url, str(exc) or type(exc).__name__)
                got_sets = False
            except Exception:
                # The poller must outlive any one bad answer: log it and poll again after the interval.
                log.exception("shared signals: polling %s failed", self._url)
                got_sets = False
            if not got_sets:
                await asyncio.sleep(interval)

    async def poll_once(self) -> bool:
        """One request; True when it brought SETs (or says more are available)."""
        request: dict[str, Any] = {"maxEvents": MAX_EVENTS, "returnImmediately": False}
        if self._ack:
            request["ack"] = self._ack
        if self._errors:
            request["setErrs"] = self._errors
        headers = {"Accept": "application/json"}
        if self._transmitter.poll_authorization is not None:
            headers["Authorization"] = self._transmitter.poll_authorization.value
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
        async with self._session().post(
            self._url, json=request, headers=headers, timeout=timeout, allow_redirects=False
        ) as response:
            response.raise_for_status()
            body = await response.content.read(MAX_RESPONSE_BYTES + 1)
        if len(body) > MAX_RESPONSE_BYTES:
            raise ValueError(f"the answer is larger than {MAX_RESPONSE_BYTES} bytes")
        # Sent: these are acknowledged now (RFC 8936 §2.4: the transmitter may forget them).
        self._ack, self._errors = [], {}
        try:
            answer = json.loads(body)
        except ValueError:
            raise ValueError("the answer is not JSON") from None
        sets = answer.get("sets") if isinstance(answer, dict) else None
        if not isinstance(sets, dict):
            raise ValueError("the answer has no 'sets' object (RFC 8936 §2.5)")
        for jti, token in sets.items():
            await self._one(str(jti), token)
        return bool(sets) or answer.get("moreAvailable") is True

    async def _one(self, jti: str, token: Any) -> None:
        if not isinstance(token, str):
            self._errors[jti] = {"err": "invalid_request", "description": "the SET is not a string"}
            return
        try:
            await self._receive(token, "poll", None)
        except SetRefused as refused:
            if refused.status != 503:
                self._errors[jti] = refused.body()
            return
        self._ack.append(jti)
