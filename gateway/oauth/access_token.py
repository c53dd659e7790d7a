"""Gateway-issued access tokens (RFC 9068 JWT profile) and their validation on every request.

EMA §5.1: the token "MUST be audience-restricted to the MCP Server identified by the resource claim";
MCP authorization "Token Handling": servers MUST validate that tokens were issued for them (RFC 8707
§2). Valid results are cached by a hash of the token until they expire, so the hot path does a
dictionary lookup instead of a signature check; the audience is compared on every hit, so a token
for one route is refused on every other route even when cached.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from cachetools import TTLCache
from jose import jws
from jose.exceptions import JOSEError

from gateway.oauth import jose_json
from gateway.oauth.identity import SubjectIdentity
from gateway.oauth.idjag import Grant
from gateway.oauth.keys import SigningKey

ACCESS_TOKEN_TYP = "at+jwt"


class InvalidToken(Exception):
    """RFC 6750 §3.1 ``invalid_token``: the description is safe to return to the client."""


@dataclass(frozen=True)
class Principal:
    """Who is calling, as established by a valid access token."""

    subject: str
    client_id: str
    idp_issuer: str
    audience: str
    scopes: tuple[str, ...]
    groups: tuple[str, ...]
    expires_at: float
    token_id: str
    tenant: str | None = None
    email: str | None = None
    # RFC 9449 §6: the ``cnf.jkt`` of a DPoP-bound token (the RFC 7638 thumbprint of the client's key).
    jkt: str | None = None
    # The token's ``iat``: a Shared Signals cut-off refuses tokens issued before it.
    issued_at: float = 0.0

    @cached_property
    def identity(self) -> SubjectIdentity:
        """The user, namespaced by IdP and tenant: key every per-user decision on this, never on
        ``subject`` alone (gateway/oauth/identity.py). Cached: a principal lives in the token cache
        and is asked for its identity several times per request."""
        return SubjectIdentity(self.idp_issuer, self.tenant, self.subject)


@dataclass(frozen=True)
class PreviousKey:
    """A key that no longer signs but still verifies, until ``retire_at``.

    Retire time = when it stopped signing + the access token TTL + clock skew: by then the longest
    token it could have signed has expired, even on a verifier whose clock is behind. Past it, a
    token signed by the key is forged (the key leaked) or stale, and is refused."""

    key: SigningKey
    retire_at: float


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_in: int
    scope: str
    token_id: str


class AccessTokenService:
    def __init__(
        self,
        key: SigningKey,
        issuer: str,
        ttl_seconds: int,
        *,
        cache_size: int = 100_000,
        clock: Callable[[], float] = time.time,
        previous_keys: tuple[PreviousKey, ...] = (),
    ) -> None:
        self._key = key
        # Rotation: tokens signed by a previous key stay valid until the key retires.
        self.previous_keys = tuple(p for p in previous_keys if p.key.kid != key.kid)
        self._retire_at = {p.key.kid: p.retire_at for p in self.previous_keys}
        self._by_kid = {p.key.kid: p.key for p in self.previous_keys} | {key.kid: key}
        self._issuer = issuer
        self._ttl = ttl_seconds
        self._clock = clock
        self._cache: TTLCache[bytes, Principal] = TTLCache(maxsize=cache_size, ttl=ttl_seconds)

    def trusted_keys(self) -> list[SigningKey]:
        """The keys that verify tokens now (published at ``jwks_uri``): the signing key and every
        previous key not yet retired."""
        now = self._clock()
        return [self._key, *(p.key for p in self.previous_keys if now < p.retire_at)]

    def issue(self, grant: Grant, *, jkt: str | None = None) -> IssuedToken:
        """Sign an access token for ``grant``, bound to the DPoP key ``jkt`` when given (RFC 9449 §6.1:
        ``cnf.jkt``, the proof key's RFC 7638 thumbprint). It lives the configured TTL, but never past the ID-JAG
        it came from: draft-parecki-oauth-identity-assertion-gateways §4 ("MUST NOT issue an access
        token whose expiration is later than the expiration of the ID-JAG"): the IdP's decision of
        how long the delegation lasts is kept, whatever TTL is configured here."""
        now = int(self._clock())
        expires_at = int(min(now + self._ttl, grant.assertion_expires_at))
        token_id = secrets.token_urlsafe(16)
        claims = {
            "iss": self._issuer,
            # RFC 7519 §4.1.2 / RFC 9068 §2.2: ``sub`` must be unique for *this* issuer, which
            # serves users of several IdPs; ``idp``, ``tenant`` and ``idp_sub`` say who it is.
            "sub": grant.identity.key,
            "idp_sub": grant.subject,
            "aud": grant.route.resource,
            "client_id": grant.client_id,
            "scope": " ".join(grant.scopes),
            "groups": list(grant.groups),
            "idp": grant.idp_issuer,
            **({"tenant": grant.tenant} if grant.tenant is not None else {}),
            # The ID-JAG's email (OpenID Connect Core §5.1), for conditions on ``user.email``.
            **({"email": grant.email} if grant.email is not None else {}),
            **({"cnf": {"jkt": jkt}} if jkt is not None else {}),
            "jti": token_id,
            "iat": now,
            "exp": expires_at,
        }
        token = jws.sign(
            json.dumps(claims, separators=(",", ":")).encode(),
            self._key.private,
            headers={"kid": self._key.kid, "typ": ACCESS_TOKEN_TYP},
            algorithm=self._key.algorithm,
        )
        return IssuedToken(token, expires_at - now, claims["scope"], token_id)

    def verify(self, token: str, resource: str) -> Principal:
        principal = self.inspect(token)
        if principal.audience != resource:
            raise InvalidToken("the access token was not issued for this resource")
        return principal

    def inspect(self, token: str) -> Principal:
        """The principal of a valid, unexpired token of this gateway, for any resource (introspection
        and revocation, RFC 7662 / RFC 7009); ``verify`` adds the audience check. Revocation is not
        checked here: it lives in the shared replay store (gateway/oauth/revocation.py)."""
        if not token.isascii():
            # RFC 6750 §2.1: a b64token is ASCII. aiohttp hands non-UTF-8 header bytes over as
            # surrogates, which would not even encode for hashing.
            raise InvalidToken("the access token is malformed")
        digest = hashlib.sha256(token.encode()).digest()
        principal = self._cache.get(digest)
        if principal is None:
            principal = self._verify_uncached(token)
            self._cache[digest] = principal
        if principal.expires_at <= self._clock():
            raise InvalidToken("the access token has expired")
        return principal

    def _verify_uncached(self, token: str) -> Principal:
        try:
            header = jose_json.unverified_header(token)
        except ValueError:
            raise InvalidToken("the access token is malformed") from None
        # RFC 9068 §4: check typ (a media type, RFC 7515 §4.1.9), so an IdP's ID-JAG or ID token is
        # never accepted as a bearer token.
        key = self._by_kid.get(header.get("kid")) if isinstance(header.get("kid"), str) else None
        if key is None:
            raise InvalidToken("the access token was signed with an unknown key")
        retire_at = self._retire_at.get(key.kid, math.inf)
        if self._clock() >= retire_at:
            raise InvalidToken("the access token was signed with a retired key")
        if not jose_json.typ_is(header.get("typ"), ACCESS_TOKEN_TYP) or header.get("alg") != key.algorithm:
            raise InvalidToken("the access token was not issued by this gateway")
        try:
            payload = jws.verify(token, key.public, algorithms=[key.algorithm])
        except (JOSEError, ValueError):
            raise InvalidToken("the access token signature is invalid") from None
        try:
            claims = jose_json.loads(payload)
        except ValueError:
            raise InvalidToken("the access token is malformed") from None
        if not isinstance(claims, dict) or claims.get("iss") != self._issuer:
            raise InvalidToken("the access token was not issued by this gateway")
        expires_at, issued_at = jose_json.numeric_date(claims.get("exp")), jose_json.numeric_date(claims.get("iat"))
        if expires_at is None or issued_at is None:
            raise InvalidToken("the access token has no valid exp or iat")
        if expires_at - issued_at > self._ttl:
            # Every token we sign lives exactly the TTL: a longer one was not made by this gateway's
            # code (a leaked key) or predates a shorter TTL. No skew: both times are our own.
            raise InvalidToken("the access token lives longer than this gateway issues tokens for")
        try:
            return Principal(
                # A token without ``idp_sub`` predates namespaced subjects: its ``sub`` is the IdP's.
                subject=str(claims.get("idp_sub", claims["sub"])),
                client_id=str(claims["client_id"]),
                idp_issuer=str(claims.get("idp", "")),
                audience=str(claims["aud"]),
                scopes=tuple(str(claims.get("scope", "")).split()),
                groups=tuple(str(g) for g in claims.get("groups", [])),
                # A cached principal must not outlive its key's trust either.
                expires_at=min(float(expires_at), retire_at),
                token_id=str(claims["jti"]),
                tenant=_optional_string(claims.get("tenant")),
                email=_optional_string(claims.get("email")),
                jkt=_confirmation(claims.get("cnf")),
                issued_at=float(issued_at),
            )
        except (KeyError, TypeError, ValueError):
            raise InvalidToken("the access token is malformed") from None


def _confirmation(cnf: object) -> str | None:
    """RFC 7800 ``cnf``: we only ever write ``{"jkt": ...}`` (RFC 9449 §6.1)."""
    if cnf is None:
        return None
    if not isinstance(cnf, dict) or not isinstance(cnf.get("jkt"), str) or not cnf["jkt"]:
        raise TypeError("cnf is not a jkt confirmation")
    return cnf["jkt"]


def _optional_string(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value
