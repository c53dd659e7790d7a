"""Trusted IdPs' signing keys: discovered, fetched, cached, and refreshed on rotation.

EMA §7.4.1: the authorization server "MUST verify the JWS signature using a trusted key for the
issuing IdP" and "MUST handle key rotation safely (for example, using ``kid``)". Keys are fetched
once and reused; an unknown ``kid`` triggers at most one refetch per ``min_refresh_seconds`` (so a
flood of forged ``kid`` values cannot turn the gateway into a traffic amplifier against the IdP);
and keys already held keep working while the IdP is unreachable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from cachetools import LRUCache
from jose import jwk
from jose.backends.base import Key
from jose.exceptions import JWKError

from gateway.config import IdentityProviderConfig

log = logging.getLogger(__name__)

# JWS "alg" family -> JWK "kty" (RFC 7518 §3.1, §6.1). Checking it stops a key of one type being
# used with an algorithm of another (key confusion, RFC 8725 §2.1).
_KTY_FOR_ALG = {"RS": "RSA", "PS": "RSA", "ES": "EC"}
_MAX_DOCUMENT_BYTES = 256 * 1024
_ALG_FOR_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}  # RFC 7518 §3.4


class KeyUnavailable(Exception):
    """No usable key: ``unreachable`` says the IdP could not be asked (retryable) rather than
    that it answered without the key (the assertion is bad)."""

    def __init__(self, message: str, *, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class IssuerMismatch(ValueError):
    """The IdP's metadata names another issuer than the one configured (RFC 8414 §3.3)."""


@dataclass
class JwksFetchResult:
    issuer: str
    ok: bool
    key_count: int


class IdpKeySet:
    """One IdP's JWKS, held in memory and refreshed lazily."""

    def __init__(
        self,
        idp: IdentityProviderConfig,
        session: Callable[[], aiohttp.ClientSession],
        *,
        max_age_seconds: float = 3600,
        min_refresh_seconds: float = 30,
        timeout_seconds: float = 5,
        on_fetch: Callable[[JwksFetchResult], None] | None = None,
    ) -> None:
        self.idp = idp
        self._on_fetch = on_fetch
        self._session = session
        self._max_age = max_age_seconds
        self._min_refresh = min_refresh_seconds
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._jwks_uri = idp.jwks_uri
        self._keys: list[dict[str, Any]] = []
        self._constructed: LRUCache[tuple[str | None, str], Key] = LRUCache(maxsize=64)
        self.fetched_at: float | None = None
        self._last_attempt = float("-inf")
        self._lock = asyncio.Lock()
        self.last_error: str | None = None

    @property
    def has_keys(self) -> bool:
        return self.fetched_at is not None

    async def get_key(self, kid: str | None, alg: str) -> Key:
        """The verification key for a JWS header; refreshes when stale or the ``kid`` is unknown."""
        stale = self.fetched_at is None or time.monotonic() - self.fetched_at > self._max_age
        if stale:
            await self.refresh()
        found = select_jwk(self._keys, kid, alg)
        if found is None and not stale:
            await self.refresh()
            found = select_jwk(self._keys, kid, alg)
        if found is None:
            if not self.has_keys:
                raise KeyUnavailable(f"keys of {self.idp.issuer} could not be fetched", unreachable=True)
            raise KeyUnavailable(f"no key {kid!r} for {alg} in the JWKS of {self.idp.issuer}", unreachable=False)
        cache_key = (found.get("kid"), alg)
        key = self._constructed.get(cache_key)
        if key is None:
            key = construct_key(found, kid, alg)
            self._constructed[cache_key] = key
        return key

    async def refresh(self, *, force: bool = False) -> JwksFetchResult:
        """Fetch the JWKS (single-flight, rate-limited); on failure keep the keys already held."""
        async with self._lock:
            now = time.monotonic()
            if not force and now - self._last_attempt < self._min_refresh:
                return JwksFetchResult(self.idp.issuer, self.has_keys, len(self._keys))
            self._last_attempt = now
            try:
                if self._jwks_uri is None:
                    self._jwks_uri = await self._discover_jwks_uri()
                document = await self._get_json(self._jwks_uri)
                keys = document.get("keys") if isinstance(document, dict) else None
                if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
                    raise ValueError("JWKS document has no 'keys' list")
                keys = [k for k in keys if _is_usable(k)]
                if not keys:
                    # RFC 7517 §5: keys of a type not understood, missing members or out of range
                    # are ignored; a set with nothing left is a failed fetch, not a replacement.
                    raise ValueError("JWKS document has no usable signing key")
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                self.last_error = _describe(exc)
                # A misconfigured issuer never heals by retrying: say so loudly, at start.
                log.log(
                    logging.ERROR if isinstance(exc, IssuerMismatch) else logging.WARNING,
                    "JWKS refresh for %s failed: %s (keeping %d cached keys)",
                    self.idp.issuer,
                    self.last_error,
                    len(self._keys),
                )
                return self._report(JwksFetchResult(self.idp.issuer, False, len(self._keys)))
            self._keys = keys
            self._constructed.clear()
            self.fetched_at = time.monotonic()
            self.last_error = None
            log.info("fetched %d keys for %s", len(keys), self.idp.issuer)
            return self._report(JwksFetchResult(self.idp.issuer, True, len(keys)))

    def _report(self, result: JwksFetchResult) -> JwksFetchResult:
        if self._on_fetch is not None:
            self._on_fetch(result)
        return result

    async def _discover_jwks_uri(self) -> str:
        """OIDC Discovery §4 (issuer + path) first, then RFC 8414 §3 (path inserted after well-known).

        RFC 8414 §3.3 (and OIDC Discovery §4.3): the ``issuer`` in the metadata MUST be identical to
        the configured issuer, compared as strings; a document that differs, even by a trailing
        slash, is not used (mix-up defence), and the mismatch is reported as the problem."""
        issuer = self.idp.issuer.rstrip("/")
        parts = urlsplit(issuer)
        candidates = [
            f"{issuer}/.well-known/openid-configuration",
            f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{parts.path}",
        ]
        last: Exception | None = None
        mismatch: IssuerMismatch | None = None
        for url in candidates:
            try:
                metadata = await self._get_json(url)
            except (aiohttp.ClientResponseError, ValueError) as exc:
                last = exc
                continue
            named = metadata.get("issuer") if isinstance(metadata, dict) else None
            if named != self.idp.issuer:
                mismatch = mismatch or IssuerMismatch(
                    f"metadata at {url} names issuer {named!r}, not the configured {self.idp.issuer!r}; "
                    "RFC 8414 §3.3 requires them identical: correct the identity provider's issuer in the config"
                )
                continue
            jwks_uri = metadata.get("jwks_uri")
            # EMA §7.4.1: keys are fetched "over authenticated TLS"; the configured issuer passed
            # that rule (gateway/config.py), so an https issuer may not send us to a plain-http JWKS.
            allowed = ("https://",) if issuer.startswith("https://") else ("https://", "http://")
            if isinstance(jwks_uri, str) and jwks_uri.startswith(allowed):
                return jwks_uri
            last = ValueError(f"metadata at {url} has no jwks_uri starting with {' or '.join(allowed)}")
        if mismatch is not None:
            raise mismatch
        raise ValueError(f"cannot discover jwks_uri: {_describe(last) if last else 'no metadata'}")

    async def _get_json(self, url: str) -> Any:
        async with self._session().get(url, timeout=self._timeout, allow_redirects=False) as response:
            response.raise_for_status()
            body = await response.content.read(_MAX_DOCUMENT_BYTES + 1)
            if len(body) > _MAX_DOCUMENT_BYTES:
                raise ValueError(f"document at {url} is too large")
            try:
                return json.loads(body)
            except ValueError:
                raise ValueError(f"document at {url} is not JSON") from None


def _is_usable(key: dict[str, Any]) -> bool:
    """A signature key of a type and curve we verify with, whose members make a key (RFC 7517 §4,
    RFC 7518 §6). Checked when the set is fetched, so that a malformed entry can neither displace
    good keys nor fail later, per request, in ways the token endpoint cannot name."""
    kty, crv, kid, alg = key.get("kty"), key.get("crv"), key.get("kid"), key.get("alg")
    if key.get("use", "sig") != "sig" or not isinstance(kid, str | None) or not isinstance(alg, str | None):
        return False
    if kty == "RSA":
        default_alg = "RS256"
    elif kty == "EC" and isinstance(crv, str) and crv in _ALG_FOR_CURVE:
        default_alg = _ALG_FOR_CURVE[crv]
    else:
        return False
    if alg is not None and _KTY_FOR_ALG.get(alg[:2]) != kty:
        return False
    try:
        jwk.construct(key, alg or default_alg)
    except Exception:  # python-jose raises assorted types (KeyError, TypeError, ...) on malformed members
        return False
    return True


class StaticKeySet:
    """Keys given in the configuration (a client's inline ``jwks``): nothing to fetch or refresh."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self._keys = keys

    async def get_key(self, kid: str | None, alg: str) -> Key:
        found = select_jwk(self._keys, kid, alg)
        if found is None:
            raise KeyUnavailable(f"no key {kid!r} for {alg}", unreachable=False)
        return construct_key(found, kid, alg)


def select_jwk(keys: list[dict[str, Any]], kid: str | None, alg: str) -> dict[str, Any] | None:
    """The JWK verifying a JWS with this ``kid`` and ``alg``: of the algorithm's key type, for
    signatures, not bound to another algorithm. Without a ``kid`` only an unambiguous single match."""
    kty = _KTY_FOR_ALG.get(alg[:2])
    candidates = [
        k
        for k in keys
        if k.get("kty") == kty
        and k.get("use", "sig") == "sig"
        and k.get("alg", alg) == alg
        and (kid is None or k.get("kid") == kid)
    ]
    if kid is None and len(candidates) != 1:
        return None
    return candidates[0] if candidates else None


def construct_key(found: dict[str, Any], kid: str | None, alg: str) -> Key:
    try:
        return jwk.construct(found, alg)
    except (JWKError, ValueError, TypeError) as exc:
        raise KeyUnavailable(f"unusable key {kid!r}: {exc}", unreachable=False) from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status} from {exc.request_info.real_url}"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


class KeyRing:
    """All trusted IdPs' key sets, by issuer."""

    def __init__(
        self,
        idps: tuple[IdentityProviderConfig, ...],
        session: Callable[[], aiohttp.ClientSession],
        *,
        min_refresh_seconds: float = 30,
        previous: KeyRing | None = None,
        on_fetch: Callable[[JwksFetchResult], None] | None = None,
    ) -> None:
        """``previous``: the ring before a config reload; key sets of unchanged IdPs are kept, with
        their cached keys, so a reload does not cost a JWKS fetch or a readiness dip."""
        kept = previous.sets if previous is not None else {}
        self.sets = {
            idp.issuer: kept[idp.issuer]
            if idp.issuer in kept and kept[idp.issuer].idp == idp
            else IdpKeySet(idp, session, min_refresh_seconds=min_refresh_seconds, on_fetch=on_fetch)
            for idp in idps
        }

    def for_issuer(self, issuer: str) -> IdpKeySet | None:
        return self.sets.get(issuer)

    async def prefetch(self) -> list[JwksFetchResult]:
        return await asyncio.gather(*(s.refresh(force=True) for s in self.sets.values()))

    async def prefetch_missing(self) -> list[JwksFetchResult]:
        """After a reload: fetch keys only for IdPs that have none yet (new or never reachable)."""
        return await asyncio.gather(*(s.refresh(force=True) for s in self.sets.values() if not s.has_keys))

    @property
    def ready(self) -> bool:
        return all(s.has_keys for s in self.sets.values())
