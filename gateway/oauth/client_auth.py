"""Confidential-client authentication at the token endpoint.

The ID-JAG draft (§8.1): the grant "SHOULD only be supported for confidential clients", and the
``client_id`` claim is compared with the *authenticated* client (never the unauthenticated request
parameter). Three methods are accepted:

* ``private_key_jwt`` (RFC 7523 §2.2, §3; RFC 7521 §4.2): a JWT signed with the client's private key,
  verified with its public keys from the config (``jwks``) or its ``jwks_uri``. EMA §7.5.1 recommends
  it for high-impact tools; no shared secret exists that could leak from the gateway's config.
* ``client_secret_basic`` (the TypeScript SDK, the conformance AS) and ``client_secret_post`` (the
  Python SDK's default), RFC 6749 §2.3.1. Secrets are compared in constant time, including for
  unknown client ids, so response timing does not reveal which client ids exist.

RFC 6749 §2.3.1: for ``client_secret_basic`` the client id and secret are each encoded with
``application/x-www-form-urlencoded`` before base64, so ``+`` is a space and ``%XX`` a byte. The
TypeScript SDK skips that encoding (``btoa(id:secret)``), which matters only for ids or secrets
containing ``+`` or ``%``: the credentials exactly as sent are tried as well, second. Either way the
client must present its exact secret, so this widens nothing.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import unquote_plus

import aiohttp
from jose import jws
from jose.backends.base import Key
from jose.exceptions import JOSEError
from multidict import MultiDictProxy

from gateway.config import ASYMMETRIC_ALGORITHMS, AuthorizationConfig, ClientConfig, IdentityProviderConfig
from gateway.oauth import jose_json
from gateway.oauth.errors import InvalidClient, InvalidRequest, TemporarilyUnavailable
from gateway.oauth.jwks import IdpKeySet, KeyUnavailable, StaticKeySet
from gateway.oauth.replay import ReplayStore, ReplayStoreUnavailable

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_UNKNOWN_CLIENT_SECRET = b"\x00" * 32
_MAX_ASSERTION_BYTES = 8 * 1024
_MAX_JTI_LENGTH = 256
# JWTs of other kinds, which must never pass as a client assertion (RFC 8725 §3.11).
_FOREIGN_TYPS = ("oauth-id-jag+jwt", "at+jwt")


class _KeySource(Protocol):
    async def get_key(self, kid: str | None, alg: str) -> Key: ...


class ClientAuthenticator:
    def __init__(
        self,
        config: AuthorizationConfig,
        *,
        token_endpoint: str,
        replay: ReplayStore,
        session: Callable[[], aiohttp.ClientSession],
        clock: Callable[[], float] = time.time,
    ) -> None:
        clients = config.clients
        self._config = config
        self._secrets: Mapping[str, bytes] = {
            c.client_id: c.client_secret.value.encode() for c in clients if c.client_secret is not None
        }
        self._keys: Mapping[str, _KeySource] = {c.client_id: _key_source(c, session) for c in clients if _has_keys(c)}
        # RFC 7523 §3 item 3: the AS's issuer, or its token endpoint URL, identifies it as audience.
        self._audiences = (config.issuer, token_endpoint)
        self._replay = replay
        self._clock = clock

    async def authenticate(self, authorization: str | None, form: MultiDictProxy[str]) -> str:
        """Return the authenticated client_id or raise InvalidClient / InvalidRequest (or, when the
        client's keys or the replay store cannot be reached, TemporarilyUnavailable)."""
        form_id = _single(form, "client_id")
        form_secret = _single(form, "client_secret")
        assertion_type = _single(form, "client_assertion_type")
        assertion = _single(form, "client_assertion")
        basic = authorization is not None and authorization[:6].lower() == "basic "
        if assertion_type is not None or assertion is not None:
            if basic or form_secret is not None:
                raise InvalidRequest("use exactly one client authentication method")
            return await self._private_key_jwt(assertion_type, assertion, form_id)
        return self._client_secret(authorization if basic else None, form_id, form_secret)

    def _client_secret(self, authorization: str | None, form_id: str | None, form_secret: str | None) -> str:
        if authorization is not None:
            if form_secret is not None:
                raise InvalidRequest("use exactly one client authentication method")
            candidates = _decode_basic(authorization[6:])
            if form_id is not None and all(form_id != client_id for client_id, _ in candidates):
                raise InvalidRequest("client_id parameter does not match the authenticated client")
        elif form_secret is not None:
            if form_id is None:
                raise InvalidRequest("client_secret was given without client_id")
            candidates = [(form_id, form_secret)]
        else:
            raise InvalidClient(
                "client authentication is required (private_key_jwt, client_secret_basic or client_secret_post)",
                reason="client_auth_missing",
            )
        authenticated = None
        for client_id, secret in candidates:
            expected = self._secrets.get(client_id)
            matches = hmac.compare_digest(secret.encode(), expected or _UNKNOWN_CLIENT_SECRET)
            if expected is not None and matches and authenticated is None:
                authenticated = client_id
        if authenticated is None:
            raise InvalidClient("client authentication failed", reason="client_auth_failed")
        return authenticated

    # -- private_key_jwt (RFC 7523 §2.2 and §3) -----------------------------------------------

    async def _private_key_jwt(self, assertion_type: str | None, assertion: str | None, form_id: str | None) -> str:
        if assertion_type != CLIENT_ASSERTION_TYPE or not assertion:
            raise InvalidRequest(f"client_assertion_type must be {CLIENT_ASSERTION_TYPE}, with one client_assertion")
        header, claims = _parse(assertion)
        # RFC 7523 §3 items 1-2: for client authentication, iss and sub are both the client_id.
        client_id = claims.get("sub")
        if not isinstance(client_id, str) or claims.get("iss") != client_id:
            raise _refused("iss and sub must both be the client_id")
        if form_id is not None and form_id != client_id:
            raise InvalidRequest("client_id parameter does not match the client assertion")  # RFC 7521 §4.2
        source = self._keys.get(client_id)
        if source is None:  # unknown, or a client with a secret: the same answer for both
            raise InvalidClient("client authentication failed", reason="client_auth_failed")
        claims = await self._verify_signature(assertion, header, source)
        self._check_audience(claims)
        expires_at = self._check_times(claims)
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > _MAX_JTI_LENGTH:
            # RFC 7523 §3 item 7 lets the AS refuse replays: we do, so every assertion needs a jti.
            raise _refused("the client assertion has no valid jti")
        try:
            first_use = await self._replay.first_use(
                f"client_assertion\x00{client_id}\x00{jti}", expires_at + self._config.clock_skew_seconds
            )
        except ReplayStoreUnavailable:
            raise TemporarilyUnavailable(
                "replay protection is unavailable; retry later", reason="replay_store_unavailable"
            ) from None
        if not first_use:
            raise _refused("the client assertion has already been used")
        return client_id

    async def _verify_signature(self, assertion: str, header: dict[str, Any], source: _KeySource) -> dict[str, Any]:
        """RFC 7523 §3 item 9: signed with the client's key; an asymmetric algorithm (RFC 8725 §3.1)."""
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
            raise _refused("the client assertion algorithm is not allowed")
        if kid is not None and not isinstance(kid, str):
            raise _refused("the client assertion kid is malformed")
        try:
            key = await source.get_key(kid, alg)
        except KeyUnavailable as exc:
            if exc.unreachable:
                raise TemporarilyUnavailable(
                    "the client's keys are unavailable; retry later", reason="client_jwks_unavailable"
                ) from None
            raise _refused("the client assertion is signed with an unknown key") from None
        try:
            return jose_json.loads(jws.verify(assertion, key, algorithms=[alg]))
        except (JOSEError, ValueError):
            raise _refused("the client assertion signature is invalid") from None

    def _check_audience(self, claims: dict[str, Any]) -> None:
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if not any(isinstance(a, str) and a in self._audiences for a in audiences):
            raise _refused("the client assertion aud must be this authorization server's issuer or token endpoint")

    def _check_times(self, claims: dict[str, Any]) -> int:
        """RFC 7523 §3 items 4-6, with the clock skew and maximum lifetime used for ID-JAGs."""
        now, skew = self._clock(), self._config.clock_skew_seconds
        exp = jose_json.numeric_date(claims.get("exp"))
        if exp is None or now > exp + skew:
            raise _refused("the client assertion has expired or has no valid exp")
        iat, nbf = claims.get("iat"), claims.get("nbf")
        for name, value in (("iat", iat), ("nbf", nbf)):
            if value is not None and (jose_json.numeric_date(value) is None or value > now + skew):
                raise _refused(f"the client assertion {name} is invalid or in the future")
        issued = iat if iat is not None else now
        if exp - issued > self._config.max_assertion_lifetime_seconds:
            raise _refused("the client assertion lifetime exceeds the allowed maximum")
        return exp


def _has_keys(client: ClientConfig) -> bool:
    return client.jwks is not None or client.jwks_uri is not None


def _key_source(client: ClientConfig, session: Callable[[], aiohttp.ClientSession]) -> _KeySource:
    if client.jwks is not None:
        return StaticKeySet(list(client.jwks))
    # The client is the issuer of its assertions (RFC 7523 §3 item 1), so its keys are fetched,
    # cached and refreshed on an unknown kid exactly like an IdP's.
    return IdpKeySet(IdentityProviderConfig(issuer=client.client_id, jwks_uri=client.jwks_uri), session)


def _parse(assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """RFC 7521 §4.2: "a single assertion", here a compact JWS (never a JWE: we hold no key for one)."""
    if len(assertion) > _MAX_ASSERTION_BYTES or assertion.count(".") != 2:
        raise _refused("the client assertion is not a compact JWS")
    try:
        header = jose_json.unverified_header(assertion)
        claims = jose_json.loads(jws.get_unverified_claims(assertion))
    except (JOSEError, ValueError, TypeError):
        raise _refused("the client assertion is malformed") from None
    if not isinstance(claims, dict) or "crit" in header:
        raise _refused("the client assertion is malformed")
    if any(jose_json.typ_is(header.get("typ"), typ) for typ in _FOREIGN_TYPS):
        raise _refused("the client assertion is another kind of JWT (typ)")
    return header, claims


def _refused(description: str) -> InvalidClient:
    """RFC 7521 §4.2.1: an invalid client assertion is ``invalid_client``."""
    return InvalidClient(description, reason="client_assertion")


def _single(form: MultiDictProxy[str], name: str) -> str | None:
    """RFC 6749 §3.2: "Request and response parameters MUST NOT be included more than once"."""
    values = form.getall(name, [])
    if len(values) > 1:
        raise InvalidRequest(f"parameter {name} is repeated")
    return values[0] if values else None


def _decode_basic(encoded: str) -> list[tuple[str, str]]:
    """(client_id, secret) candidates: form-decoded (RFC 6749 §2.3.1) first, then as sent if different."""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidClient("malformed Basic credentials", reason="client_auth_failed") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep or not client_id:
        raise InvalidClient("malformed Basic credentials", reason="client_auth_failed")
    # The ':' is split before decoding: an encoded id may contain one ('%3A').
    try:
        form_decoded = (unquote_plus(client_id, errors="strict"), unquote_plus(secret, errors="strict"))
    except UnicodeDecodeError:
        return [(client_id, secret)]  # '%XX' that is not UTF-8: it can only be meant as sent
    return [form_decoded] if form_decoded == (client_id, secret) else [form_decoded, (client_id, secret)]
