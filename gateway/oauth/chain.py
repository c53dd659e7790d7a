"""Per-user credentials at an upstream that is itself an EMA resource: the chained ID-JAG.

draft-parecki-oauth-identity-assertion-gateways: a gateway in front of an upstream that accepts
enterprise-managed authorization must not share one static key for every user. Its authorization server
presents the ID-JAG the client redeemed here as the ``subject_token`` (type
``urn:ietf:params:oauth:token-type:id-jag``) in an RFC 8693 token exchange at the IdP ("Chained Identity
Assertion Request"), gets an ID-JAG whose audience is the upstream's authorization server, and redeems it
there with the RFC 7523 jwt-bearer grant, exactly as any client would. The client's own token is never
forwarded (MCP authorization "Token Handling").

Lifetimes, per the draft's "Retaining the Identity Assertion": the ID-JAG is kept only beside the access
token issued for it and for no longer than that token lives (``RetainedAssertions``); access tokens never
outlive their ID-JAG (gateway/oauth/access_token.py). The chain runs on first use, not at grant time (the
draft's "Reuse of the assertion": the gateway does not know which upstreams a client will reach). Upstream
tokens are cached per user, client and route ("Subject binding of cached tokens") until shortly before they
expire, then obtained again by a new exchange: nobody issues refresh tokens in this flow ("No refresh
tokens"). The retained assertions and the cache live in this process: with several replicas, a client
whose calls reach a replica that did not grant its token is asked (401) for a new one.

Tokens and assertions are never logged; failures name the step and the OAuth error code only.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_plus, urlsplit

import aiohttp
from cachetools import TTLCache

from gateway.config import RouteConfig, UpstreamAuthorizationConfig
from gateway.oauth.access_token import Principal

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ID_JAG_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id-jag"
# A cached upstream token is replaced this long before it expires (or at half its life, if shorter), so a
# request never leaves with a token that expires on the way.
REFRESH_MARGIN_SECONDS = 30.0
# Upstream tokens whose response names no lifetime (RFC 6749 §5.1 makes expires_in RECOMMENDED only).
DEFAULT_LIFETIME_SECONDS = 60.0
MAX_CACHE_SECONDS = 3600.0
_MAX_ENTRIES = 50_000
_MAX_DOCUMENT_BYTES = 64 * 1024
_TIMEOUT = aiohttp.ClientTimeout(total=10)


class ChainFailure(Exception):
    """The per-user credential could not be obtained. ``step``: ``assertion`` (no ID-JAG held for the
    access token), ``idp`` (the chained exchange), ``metadata`` or ``upstream_as`` (the redemption).
    ``error``: the OAuth error code the other side answered, or None when it did not answer usably."""

    def __init__(self, step: str, message: str, error: str | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.message = message
        self.error = error


@dataclass(frozen=True)
class UpstreamToken:
    value: str = field(repr=False)
    expires_at: float
    # True when this request ran the chain (audited); False for a cached token.
    fresh: bool = False


class RetainedAssertions:
    """The ID-JAG behind each access token issued for a chained route, by the token's ``jti``, until the
    access token expires (the draft's "Retaining the Identity Assertion": associate it with the access
    token; do not retain it beyond that token's lifetime). Bounded: the oldest go first."""

    def __init__(self, *, clock: Callable[[], float] = time.time, maxsize: int = _MAX_ENTRIES) -> None:
        self._clock = clock
        self._entries: TTLCache[str, tuple[str, float]] = TTLCache(maxsize=maxsize, ttl=MAX_CACHE_SECONDS)

    def keep(self, token_id: str, assertion: str, expires_at: float) -> None:
        self._entries[token_id] = (assertion, expires_at)

    def get(self, token_id: str) -> str | None:
        entry = self._entries.get(token_id)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            self._entries.pop(token_id, None)
            return None
        return entry[0]


class UpstreamCredentials:
    def __init__(
        self,
        session: Callable[[], aiohttp.ClientSession],
        retained: RetainedAssertions,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._session = session
        self._retained = retained
        self._clock = clock
        # key -> (token, when to replace it)
        self._cache: TTLCache[tuple[Any, ...], tuple[UpstreamToken, float]] = TTLCache(
            maxsize=_MAX_ENTRIES, ttl=MAX_CACHE_SECONDS
        )
        # One chain at a time per cache entry: concurrent first calls of one user wait for one exchange.
        self._locks: weakref.WeakValueDictionary[tuple[Any, ...], asyncio.Lock] = weakref.WeakValueDictionary()
        self._token_endpoints: dict[str, str] = {}

    async def token(self, route: RouteConfig, principal: Principal) -> UpstreamToken:
        key = _cache_key(route, principal)
        cached = self._usable(key)
        if cached is not None:
            return cached
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:
            cached = self._usable(key)
            if cached is not None:
                return cached
            config = route.upstream_authorization
            assert config is not None
            assertion = self._retained.get(principal.token_id)
            if assertion is None:
                raise ChainFailure(
                    "assertion",
                    "the ID-JAG behind this access token is no longer held here (expired, or the token was "
                    "issued before a restart or by another replica): obtain a new access token",
                )
            chained = await self._exchange(config, route, assertion)
            value, lifetime = await self._redeem(config, route, chained)
            now = self._clock()
            expires_at = now + lifetime
            self._cache[key] = (
                UpstreamToken(value, expires_at),
                expires_at - min(REFRESH_MARGIN_SECONDS, lifetime / 2),
            )
            return UpstreamToken(value, expires_at, fresh=True)

    def rejected(self, route: RouteConfig, principal: Principal, token: str) -> None:
        """The upstream answered 401 to ``token``: it was revoked or has expired early there, so the next
        request obtains a new one instead of using it until it expires (if it is still the cached one)."""
        key = _cache_key(route, principal)
        cached = self._cache.get(key)
        if cached is not None and hmac.compare_digest(cached[0].value.encode(), token.encode()):
            self._cache.pop(key, None)

    def _usable(self, key: tuple[Any, ...]) -> UpstreamToken | None:
        cached = self._cache.get(key)
        if cached is None:
            return None
        token, replace_at = cached
        if self._clock() < replace_at:
            return token
        self._cache.pop(key, None)
        return None

    async def _exchange(self, config: UpstreamAuthorizationConfig, route: RouteConfig, assertion: str) -> str:
        """The draft's Chained Identity Assertion Request; the gateway authenticates as its own client at
        the IdP (``actor_token`` is not used: the acting party is the authenticated client)."""
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "requested_token_type": ID_JAG_TOKEN_TYPE,
            "subject_token": assertion,
            "subject_token_type": ID_JAG_TOKEN_TYPE,
            "audience": config.upstream_issuer,
            "resource": route.upstream,
        }
        auth = _basic(config.client_id, config.client_secret.value)
        body = await self._post("idp", "the identity provider", config.idp_token_endpoint, form, auth)
        if body.get("issued_token_type") != ID_JAG_TOKEN_TYPE or not isinstance(body.get("access_token"), str):
            raise ChainFailure("idp", "the identity provider did not return an ID-JAG")
        return body["access_token"]

    async def _redeem(self, config: UpstreamAuthorizationConfig, route: RouteConfig, chained: str) -> tuple[str, float]:
        """RFC 7523 §2.1 jwt-bearer grant at the upstream's authorization server, unchanged from the
        ID-JAG draft: the upstream sees an ordinary client."""
        endpoint = await self._token_endpoint(config.upstream_issuer)
        form = {"grant_type": JWT_BEARER, "assertion": chained, "resource": route.upstream}
        auth = _basic(config.upstream_client_id, config.upstream_client_secret.value)
        try:
            body = await self._post("upstream_as", "the upstream's authorization server", endpoint, form, auth)
        except ChainFailure as failure:
            if failure.error is None:
                self._token_endpoints.pop(config.upstream_issuer, None)  # rediscover next time
            raise
        token, token_type = body.get("access_token"), body.get("token_type")
        if not isinstance(token, str) or not token or not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise ChainFailure("upstream_as", "the upstream's authorization server returned no bearer token")
        expires_in = body.get("expires_in", DEFAULT_LIFETIME_SECONDS)
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
            raise ChainFailure("upstream_as", "the upstream's authorization server returned an invalid expires_in")
        return token, min(float(expires_in), MAX_CACHE_SECONDS)

    async def _token_endpoint(self, issuer: str) -> str:
        """RFC 8414 §3: the metadata at the well-known URI (inserted before the issuer's path, §3.1),
        whose ``issuer`` must be identical to the configured one (§3.3)."""
        known = self._token_endpoints.get(issuer)
        if known is not None:
            return known
        parts = urlsplit(issuer)
        url = f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{parts.path.rstrip('/')}"
        try:
            async with self._session().get(url, timeout=_TIMEOUT, allow_redirects=False) as response:
                raw = await response.content.read(_MAX_DOCUMENT_BYTES + 1)
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError):
            raise ChainFailure("metadata", "the upstream's authorization server metadata is unreachable") from None
        document = _json_object(raw) if status == 200 and len(raw) <= _MAX_DOCUMENT_BYTES else None
        endpoint = document.get("token_endpoint") if document is not None else None
        if document is None or document.get("issuer") != issuer or not isinstance(endpoint, str):
            raise ChainFailure("metadata", "the upstream's authorization server metadata is unusable")
        allowed = ("https://",) if issuer.startswith("https://") else ("https://", "http://")
        if not endpoint.startswith(allowed):
            raise ChainFailure("metadata", "the upstream's token endpoint is not an https URL")
        self._token_endpoints[issuer] = endpoint
        return endpoint

    async def _post(self, step: str, who: str, url: str, form: dict[str, str], auth: str) -> dict[str, Any]:
        headers = {"Authorization": auth, "Accept": "application/json"}
        try:
            async with self._session().post(
                url, data=form, headers=headers, timeout=_TIMEOUT, allow_redirects=False
            ) as response:
                raw = await response.content.read(_MAX_DOCUMENT_BYTES + 1)
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError):
            raise ChainFailure(step, f"{who} is unreachable") from None
        body = _json_object(raw) if len(raw) <= _MAX_DOCUMENT_BYTES else None
        if status != 200:
            error = body.get("error") if body is not None else None
            # Only a short code from the other side's answer travels on (RFC 6749 §5.2 error values are
            # ASCII tokens); its free-text description might echo a token.
            code = error if isinstance(error, str) and error.isascii() and len(error) <= 64 else None
            raise ChainFailure(step, f"{who} refused ({code or f'HTTP {status}'})", code)
        if body is None:
            raise ChainFailure(step, f"{who} answered with something other than a JSON object")
        return body


def _cache_key(route: RouteConfig, principal: Principal) -> tuple[Any, ...]:
    """Bound to the user (issuer, tenant, subject) and client that produced it (the draft's "Subject
    binding of cached tokens"), and to the route's current settings: a reload that changes them starts
    afresh."""
    return (route.name, route.upstream, route.upstream_authorization, principal.identity.key, principal.client_id)


def _basic(client_id: str, secret: str) -> str:
    """``client_secret_basic``: RFC 6749 §2.3.1 form-encodes both parts before the Basic encoding."""
    return aiohttp.encode_basic_auth(quote_plus(client_id), quote_plus(secret))


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
