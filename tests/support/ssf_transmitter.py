"""A Shared Signals transmitter of our own, on loopback: real SETs (RFC 8417) signed with a real key.

It serves its SSF 1.0 configuration metadata (``/.well-known/ssf-configuration``) and JWKS, pushes SETs
to a receiver (RFC 8935) and hands them out to a poller (RFC 8936: ``POST /poll``, long polling with
``returnImmediately: false``, acknowledgements recorded). ``set_for`` builds the CAEP and RISC events
the gateway acts on; ``sign`` signs anything, so tests can also mint malformed or misdirected SETs.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from jose import jwk
from jose.utils import base64url_encode

CAEP = "https://schemas.openid.net/secevent/caep/event-type/"
RISC = "https://schemas.openid.net/secevent/risc/event-type/"
SESSION_REVOKED = CAEP + "session-revoked"
ACCOUNT_DISABLED = RISC + "account-disabled"
HOLD_SECONDS = 5.0  # how long a poll is held open when nothing is queued (bounded, like real transmitters)


class TestTransmitter:
    __test__ = False  # not a pytest class

    def __init__(self, *, kid: str = "ssf-key-1") -> None:
        self.kid = kid
        self._key = jwk.construct(ec.generate_private_key(ec.SECP256R1()), "ES256")
        self.issuer = ""
        self.metadata_issuer: str | None = None  # to publish a different issuer than ours
        self._runner: web.AppRunner | None = None
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.acks: list[str] = []
        self.set_errors: dict[str, Any] = {}
        self.poll_authorizations: list[str | None] = []
        self.jwks_fetches = 0

    # -- keys and SETs ---------------------------------------------------------------------------

    def rotate(self, kid: str) -> None:
        """Sign with a new key from now on, and publish only it (a rotation without overlap)."""
        self.kid = kid
        self._key = jwk.construct(ec.generate_private_key(ec.SECP256R1()), "ES256")

    def public_jwks(self) -> dict[str, Any]:
        public = self._key.public_key().to_dict()
        return {"keys": [{**public, "kid": self.kid, "alg": "ES256", "use": "sig"}]}

    def sign(self, claims: Mapping[str, Any], *, typ: str | None = "secevent+jwt", **header: Any) -> str:
        """A JWS over ``claims`` with our key; the header is written here because python-jose's
        ``jws.sign`` always adds ``typ: JWT``."""
        protected: dict[str, Any] = {"alg": "ES256", "kid": self.kid, **({"typ": typ} if typ else {}), **header}
        signing_input = b".".join(
            base64url_encode(json.dumps(part, separators=(",", ":")).encode()) for part in (protected, dict(claims))
        )
        return (signing_input + b"." + base64url_encode(self._key.sign(signing_input))).decode()

    def claims_for(self, audience: str, event: str, subject: dict[str, Any], **overrides: Any) -> dict[str, Any]:
        """SSF 1.0 §4: ``sub_id`` at the top, the event's own members under ``events``."""
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": audience,
            "iat": int(time.time()),
            "jti": uuid.uuid4().hex,
            "sub_id": subject,
            "events": {event: {"event_timestamp": int(time.time())}},
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def set_for(self, audience: str, event: str, subject: dict[str, Any], **overrides: Any) -> str:
        return self.sign(self.claims_for(audience, event, subject, **overrides))

    # -- delivery --------------------------------------------------------------------------------

    async def push(
        self, http: aiohttp.ClientSession, url: str, token: str, *, authorization: str | None = None
    ) -> tuple[int, Any]:
        """RFC 8935 §2: POST the SET; returns the status and the JSON error (or None)."""
        headers = {"Content-Type": "application/secevent+jwt", "Accept": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization
        async with http.post(url, data=token.encode(), headers=headers) as response:
            body = await response.read()
            return response.status, json.loads(body) if body else None

    def queue(self, token: str, jti: str) -> None:
        """Make a SET available to the next poll."""
        self._queue.put_nowait((jti, token))

    # -- the server ------------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/.well-known/ssf-configuration", self._metadata)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_post("/poll", self._poll)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.issuer = f"http://127.0.0.1:{port}"
        return self.issuer

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def poll_endpoint(self) -> str:
        return self.issuer + "/poll"

    async def _metadata(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "spec_version": "1_0",
                "issuer": self.metadata_issuer or self.issuer,
                "jwks_uri": self.issuer + "/jwks",
                "delivery_methods_supported": [
                    "urn:ietf:rfc:8935",
                    "urn:ietf:rfc:8936",
                ],
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        return web.json_response(self.public_jwks())

    async def _poll(self, request: web.Request) -> web.Response:
        """RFC 8936 §2.4: record acks and errors, then answer the queued SETs, holding the request
        up to HOLD_SECONDS while there are none and ``returnImmediately`` is false."""
        self.poll_authorizations.append(request.headers.get("Authorization"))
        body = await request.json()
        self.acks.extend(body.get("ack", []))
        self.set_errors.update(body.get("setErrs", {}))
        sets: dict[str, str] = {}
        if self._queue.empty() and not body.get("returnImmediately", False):
            try:
                async with asyncio.timeout(HOLD_SECONDS):
                    jti, token = await self._queue.get()
                    sets[jti] = token
            except TimeoutError:
                pass
        while not self._queue.empty() and len(sets) < body.get("maxEvents", 100):
            jti, token = self._queue.get_nowait()
            sets[jti] = token
        return web.json_response({"sets": sets, "moreAvailable": not self._queue.empty()})
