"""The receiver: verified SETs become cut-offs, applied here and on every replica, and audited.

What a cut-off does (each check compares the token's ``iat`` with the time the gateway accepted the
SET, so every token or ID-JAG the subject held then is covered, whatever the clocks of the IdP say):

- access tokens of the subject issued before it get 401 ``invalid_token`` (gateway/pipeline/authenticate.py);
- their live event streams end at once, on the replica holding them (``Upstream.end_streams_where``);
- ID-JAGs of the subject issued before it are refused at the token endpoint (``invalid_grant``).

Audited: ``signal.received`` for every event of an accepted SET, ``token.revoked`` for each cut-off;
counted in ``mcp_gateway_shared_signals_total`` (every SET, by result) and
``mcp_gateway_signal_cutoffs_total`` (by event type).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web

from gateway.audit import AuditLog
from gateway.config import GatewayConfig
from gateway.http import BodyTooLarge, BodyTooSlow, read_limited
from gateway.metrics import Metrics
from gateway.proxy.forward import ForwardRequest, Upstream
from gateway.signals.events import CUT_OFF_EVENTS, describe, short_name, subject_keys
from gateway.signals.poller import Poller
from gateway.signals.revocations import CutoffBus, CutoffBusUnavailable, SubjectRevocations, open_bus
from gateway.signals.verify import (
    MAX_SET_BYTES,
    SetRefused,
    SetVerifier,
    VerifiedSet,
    parse_unverified,
    transmitter_key_set,
)

log = logging.getLogger(__name__)

SET_CONTENT_TYPE = "application/secevent+jwt"
BODY_TIMEOUT_SECONDS = 10.0


class SignalReceiver:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        replay: Any,
        revocations: SubjectRevocations,
        session: Callable[[], aiohttp.ClientSession],
        audit: AuditLog,
        metrics: Metrics,
        upstreams: Callable[[], Iterable[Upstream]],
        jwks_min_refresh_seconds: float = 30,
        bus: CutoffBus | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.transmitters = {t.issuer: t for t in config.transmitters}
        self.key_sets = {
            t.issuer: transmitter_key_set(t, session, min_refresh_seconds=jwks_min_refresh_seconds)
            for t in config.transmitters
        }
        self._verifier = SetVerifier(self.transmitters, self.key_sets, replay, clock=clock)
        self._bus = bus if bus is not None else open_bus(config.replay_store)
        self.revocations = revocations
        self._session = session
        self._audit = audit
        self._metrics = metrics
        self._upstreams = upstreams
        self._clock = clock
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def pushes(self) -> bool:
        return any(t.delivery == "push" for t in self.transmitters.values())

    async def prefetch_keys(self) -> None:
        """At start, so a wrong issuer or an unreachable transmitter is logged before the first SET."""
        await asyncio.gather(*(s.refresh(force=True) for s in self.key_sets.values()))

    def start(self) -> None:
        """Listen to the other replicas and start polling."""
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._bus.listen(self._learned)))
        for transmitter in self.transmitters.values():
            if transmitter.delivery == "poll":
                poller = Poller(transmitter, self._session, self.receive)
                self._tasks.append(loop.create_task(poller.run()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._bus.close()

    # -- delivery -----------------------------------------------------------------------------

    async def push(self, request: web.Request) -> web.Response:
        """RFC 8935 §2: ``POST`` a SET as ``application/secevent+jwt``; 202 once it is verified and applied,
        else 400 with ``{"err", "description"}`` (§2.3), or 503 when the transmitter should retry."""
        if request.method != "POST":
            return web.json_response({"error": "method not allowed"}, status=405, headers={"Allow": "POST"})
        try:
            if request.content_type != SET_CONTENT_TYPE:
                raise SetRefused("invalid_request", f"Content-Type must be {SET_CONTENT_TYPE} (RFC 8935 §2.1)")
            try:
                body = await read_limited(request, MAX_SET_BYTES, BODY_TIMEOUT_SECONDS)
            except BodyTooLarge:
                raise SetRefused("invalid_request", f"the SET is larger than {MAX_SET_BYTES} bytes") from None
            except BodyTooSlow:
                raise SetRefused("invalid_request", "the SET did not arrive in time") from None
            try:
                token = body.decode("ascii").strip()
            except UnicodeDecodeError:
                raise SetRefused("invalid_request", "the body is not a SET in JWS compact form") from None
            await self.receive(token, "push", request.headers.getall("Authorization", []))
        except SetRefused as refused:
            return web.json_response(refused.body(), status=refused.status, headers={"Cache-Control": "no-store"})
        return web.Response(status=202)

    async def receive(self, token: str, delivery: str, authorization: list[str] | None = None) -> VerifiedSet:
        """Verify and apply one SET (pushed or polled); raises ``SetRefused``."""
        try:
            verified = await self._verifier.verify(token, delivery, authorization)
        except SetRefused as refused:
            issuer = _claimed_issuer(token, self.transmitters)
            self._metrics.signals.labels(issuer, delivery, "refused").inc()
            log.info("shared signals: %s SET refused: %s: %s", delivery, refused.err, refused.description)
            self._audit.emit(
                "signal.refused", idp=issuer, decision="deny", reason=f"{refused.err}: {refused.description}"
            )
            raise
        self._metrics.signals.labels(verified.issuer, delivery, "accepted").inc()
        await self._apply(verified)
        return verified

    # -- effect -------------------------------------------------------------------------------

    async def _apply(self, verified: VerifiedSet) -> None:
        cutoff = self._clock()
        for event_type, payload in verified.events.items():
            subject = verified.sub_id if verified.sub_id is not None else payload.get("subject")
            names = subject_keys(subject)
            cuts = event_type in CUT_OFF_EVENTS and bool(names)
            self._audit.emit(
                "signal.received",
                idp=verified.issuer,
                target=event_type,
                sub=describe(subject),
                decision="cut_off" if cuts else "ignored",
                reason=f"jti {verified.jti}"
                + (
                    ""
                    if cuts
                    else " (no user subject)"
                    if event_type in CUT_OFF_EVENTS
                    else " (event type not acted on)"
                ),
            )
            if not cuts:
                continue
            self._metrics.signal_cutoffs.labels(short_name(event_type)).inc()
            for name in names:
                self.revocations.apply(name, cutoff)
            ended = self._end_streams()
            try:
                for name in names:
                    await self._bus.publish(name, cutoff)
            except CutoffBusUnavailable:
                raise SetRefused(
                    "temporarily_unavailable",
                    "applied here, but the other replicas could not be told (replay store unavailable)",
                    status=503,
                ) from None
            log.warning("shared signals: %s from %s: cut off %s, ended %d streams", event_type, verified.issuer,
                        ", ".join(names), ended)  # fmt: skip
            self._audit.emit(
                "token.revoked",
                idp=verified.issuer,
                target=event_type,
                sub=describe(subject),
                decision="deny",
                reason=f"tokens and ID-JAGs issued before the event; {ended} streams ended here",
            )

    def _learned(self, name: str, cutoff: float) -> None:
        """Another replica accepted a SET: apply it here too."""
        if self.revocations.apply(name, cutoff):
            ended = self._end_streams()
            log.info("shared signals: cut-off from another replica; ended %d streams here", ended)

    def _end_streams(self) -> int:
        revocations = self.revocations

        def cut_off(fwd: ForwardRequest) -> bool:
            principal = fwd.principal
            return principal is not None and revocations.refuses(
                principal.identity, principal.email, principal.issued_at
            )

        return sum(upstream.end_streams_where(cut_off) for upstream in self._upstreams())


def _claimed_issuer(token: str, transmitters: dict[str, Any]) -> str:
    """The metrics label of a refused SET: its issuer only if configured (labels stay bounded)."""
    try:
        issuer = parse_unverified(token)[1].get("iss")
    except SetRefused:
        return "unknown"
    return issuer if isinstance(issuer, str) and issuer in transmitters else "unknown"
