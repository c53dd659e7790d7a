"""Verification of Security Event Tokens (RFC 8417) from configured Shared Signals transmitters.

A SET is accepted only when it is signed by a key of its transmitter's JWKS (found through the SSF 1.0
§7.2 transmitter configuration metadata, refetched on an unknown ``kid`` at most once per
``min_refresh_seconds``, as the IdP key sets are: gateway/oauth/jwks.py), is explicitly typed
``secevent+jwt`` (RFC 8417 §2.3), names a configured issuer and this receiver as audience (RFC 8417
§2.2, RFC 8935 §2 and RFC 8936 §2 "Validation"), carries an ``iat`` that is neither in the future nor
older than ``MAX_AGE_SECONDS``, and a ``jti`` not seen before (RFC 8417 §2.2: ``jti`` identifies the
SET, so a second delivery of it is a replay, recorded in the shared replay store). Each refusal is
one of the RFC 8935 §2.4 error codes, which the poll delivery reuses (RFC 8936 §2.4.4).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from jose import jws
from jose.exceptions import JOSEError
from jose.utils import base64url_decode

from gateway.config import ASYMMETRIC_ALGORITHMS, IdentityProviderConfig, TransmitterConfig
from gateway.oauth import jose_json
from gateway.oauth.jwks import IdpKeySet, IssuerMismatch, KeyUnavailable
from gateway.oauth.replay import ReplayStore, ReplayStoreUnavailable

SET_TYP = "secevent+jwt"
MAX_SET_BYTES = 64 * 1024
MAX_AGE_SECONDS = 12 * 3600  # the replay store remembers a jti for 24 h at most
CLOCK_SKEW_SECONDS = 60
_MAX_JTI_LENGTH = 256


class SetRefused(Exception):
    """RFC 8935 §2.3 error response: ``{"err": ..., "description": ...}``. ``status`` 503 (with no
    registered code) when the gateway could not decide and the transmitter should retry."""

    def __init__(self, err: str, description: str, *, status: int = 400) -> None:
        super().__init__(description)
        self.err = err
        self.description = description
        self.status = status

    def body(self) -> dict[str, str]:
        return {"err": self.err, "description": self.description}


@dataclass(frozen=True)
class VerifiedSet:
    issuer: str
    jti: str
    issued_at: int
    events: Mapping[str, Mapping[str, Any]]
    sub_id: Any = None


class TransmitterKeySet(IdpKeySet):
    """A transmitter's JWKS: the IdP key set machinery, discovered through SSF metadata instead."""

    async def _discover_jwks_uri(self) -> str:
        """SSF 1.0 §7.2.1: the metadata is at the issuer with ``/.well-known/ssf-configuration`` inserted
        between host and path; its ``issuer`` must equal the configured one (§7.2.3, as RFC 8414 §3.3)."""
        issuer = self.idp.issuer
        parts = urlsplit(issuer)
        url = f"{parts.scheme}://{parts.netloc}/.well-known/ssf-configuration{parts.path.rstrip('/')}"
        metadata = await self._get_json(url)
        named = metadata.get("issuer") if isinstance(metadata, dict) else None
        if named != issuer:
            raise IssuerMismatch(f"SSF metadata at {url} names issuer {named!r}, not the configured {issuer!r}")
        jwks_uri = metadata.get("jwks_uri")
        allowed = ("https://",) if issuer.startswith("https://") else ("https://", "http://")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(allowed):
            raise ValueError(f"SSF metadata at {url} has no jwks_uri starting with {' or '.join(allowed)}")
        return jwks_uri


def transmitter_key_set(
    transmitter: TransmitterConfig, session: Callable[[], aiohttp.ClientSession], *, min_refresh_seconds: float
) -> TransmitterKeySet:
    return TransmitterKeySet(
        IdentityProviderConfig(transmitter.issuer), session, min_refresh_seconds=min_refresh_seconds
    )


class SetVerifier:
    def __init__(
        self,
        transmitters: Mapping[str, TransmitterConfig],
        key_sets: Mapping[str, IdpKeySet],
        replay: ReplayStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._transmitters = transmitters
        self._key_sets = key_sets
        self._replay = replay
        self._clock = clock

    async def verify(self, token: str, delivery: str, authorization: list[str] | None = None) -> VerifiedSet:
        """Raises ``SetRefused``. ``delivery``: how it arrived; a transmitter configured to be polled
        may not push. ``authorization``: the push request's Authorization header values, checked
        against the transmitter's ``push_authorization_file`` (RFC 8935 §2 leaves how the recipient
        authenticates the transmitter to the deployment; a shared bearer value is the common one)."""
        header, unverified = parse_unverified(token)
        if not jose_json.typ_is(header.get("typ"), SET_TYP):
            raise SetRefused("invalid_request", f"the JWT is not a SET: typ must be {SET_TYP} (RFC 8417 §2.3)")
        alg = header.get("alg")
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise SetRefused("invalid_key", f"alg must be one of {', '.join(ASYMMETRIC_ALGORITHMS)}")
        iss = unverified.get("iss")
        transmitter = self._transmitters.get(iss) if isinstance(iss, str) else None
        if transmitter is None or transmitter.delivery != delivery:
            raise SetRefused("invalid_issuer", f"the SET issuer is not a transmitter configured for {delivery}")
        _authenticate(transmitter, authorization)
        claims = await self._verify_signature(token, header, alg, transmitter)
        if claims.get("iss") != transmitter.issuer:
            raise SetRefused("invalid_issuer", "the SET issuer is not a configured transmitter")
        self._check_audience(claims, transmitter)
        issued_at = self._check_issued_at(claims)
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > _MAX_JTI_LENGTH:
            raise SetRefused("invalid_request", "the SET has no valid jti (RFC 8417 §2.2)")
        events = claims.get("events")
        if not isinstance(events, dict) or not events or not all(isinstance(v, dict) for v in events.values()):
            raise SetRefused("invalid_request", "the SET has no events object (RFC 8417 §2.2)")
        await self._check_first_use(transmitter, jti, issued_at)
        return VerifiedSet(transmitter.issuer, jti, issued_at, events, claims.get("sub_id"))

    async def _verify_signature(
        self, token: str, header: dict[str, Any], alg: str, transmitter: TransmitterConfig
    ) -> dict[str, Any]:
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise SetRefused("invalid_request", "the SET's kid is malformed")
        try:
            key = await self._key_sets[transmitter.issuer].get_key(kid, alg)
        except KeyUnavailable as exc:
            if exc.unreachable:
                raise SetRefused(
                    "temporarily_unavailable", "the transmitter's keys could not be fetched; retry later", status=503
                ) from None
            raise SetRefused("invalid_key", "the SET is signed with a key the transmitter does not publish") from None
        try:
            claims = jose_json.loads(jws.verify(token, key, algorithms=[alg]))
        except (JOSEError, ValueError):
            raise SetRefused("invalid_key", "the SET signature does not verify") from None
        return claims

    def _check_audience(self, claims: dict[str, Any], transmitter: TransmitterConfig) -> None:
        """RFC 8417 §2.2 ``aud``: a string or an array of strings; one of them must be us."""
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        wanted = transmitter.audience.rstrip("/")
        if not any(isinstance(a, str) and a.rstrip("/") == wanted for a in audiences):
            raise SetRefused("invalid_audience", "the SET audience is not this receiver")

    def _check_issued_at(self, claims: dict[str, Any]) -> int:
        iat = jose_json.numeric_date(claims.get("iat"))
        if iat is None:
            raise SetRefused("invalid_request", "the SET has no valid iat (an integer NumericDate, RFC 8417 §2.2)")
        now = self._clock()
        if iat > now + CLOCK_SKEW_SECONDS:
            raise SetRefused("invalid_request", "the SET is issued in the future")
        if iat < now - MAX_AGE_SECONDS:
            raise SetRefused("invalid_request", f"the SET is older than {MAX_AGE_SECONDS} seconds")
        return iat

    async def _check_first_use(self, transmitter: TransmitterConfig, jti: str, issued_at: int) -> None:
        until = issued_at + MAX_AGE_SECONDS + CLOCK_SKEW_SECONDS
        try:
            first = await self._replay.first_use(f"ssf\x00{transmitter.issuer}\x00{jti}", until)
        except ReplayStoreUnavailable:
            raise SetRefused(
                "temporarily_unavailable", "replay protection is unavailable; retry later", status=503
            ) from None
        if not first:
            raise SetRefused("invalid_request", "this SET (jti) was already received")


def _authenticate(transmitter: TransmitterConfig, authorization: list[str] | None) -> None:
    expected = transmitter.push_authorization
    if expected is None or authorization is None:
        return
    presented = authorization[0] if len(authorization) == 1 else ""
    if not hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), expected.value.encode()):
        raise SetRefused("authentication_failed", "the Authorization header does not authenticate this transmitter")


def parse_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims, read before the signature is checked only to pick the transmitter and key."""
    parts = token.split(".")
    if len(parts) != 3 or not token.isascii():
        raise SetRefused("invalid_request", "the body is not a signed JWT (a SET in JWS compact form)")
    try:
        header = jose_json.unverified_header(token)
        claims = jose_json.loads(base64url_decode(parts[1].encode("ascii")))
    except ValueError:
        raise SetRefused("invalid_request", "the SET's header or claims are not JSON") from None
    if not isinstance(claims, dict):
        raise SetRefused("invalid_request", "the SET's claims are not a JSON object")
    return header, claims
