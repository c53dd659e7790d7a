"""Everything derived from one configuration, built together and swapped in one assignment.

A config reload (SIGHUP or a changed file) builds a complete new ``Runtime`` first; only if that
succeeds does the gateway switch to it, so an invalid config never half-applies. Requests take one
snapshot (``runtime = gateway.runtime``) and use it throughout, so a request in flight during a
reload finishes with a consistent view. Parts whose settings did not change are carried over: the
upstream connection pools (live streams keep flowing), the IdP key sets (no refetch), the signing
keys (tokens stay valid). A signing key that a reload replaces keeps verifying only until it retires
(``PreviousKey``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.approvals.stateless import StateSigner, derive_state_key
from gateway.audit import argument_digester
from gateway.bearer import BearerGuard
from gateway.condition_health import ConditionHealth
from gateway.config import AuthorizationConfig, GatewayConfig, RouteConfig
from gateway.engine import DecisionEngine
from gateway.metrics import Metrics
from gateway.oauth.access_token import AccessTokenService, IssuedToken, PreviousKey, Principal
from gateway.oauth.client_auth import ClientAuthenticator
from gateway.oauth.dpop import DpopVerifier, NonceIssuer, derive_nonce_key
from gateway.oauth.id_token_bridge import IdTokenBridge
from gateway.oauth.identity import SubjectIdentity
from gateway.oauth.idjag import Grant, IdJagValidator
from gateway.oauth.introspection import IntrospectionEndpoint
from gateway.oauth.jwks import KeyRing
from gateway.oauth.keys import SigningKey, load_signing_key
from gateway.oauth.metadata import TOKEN_PATH
from gateway.oauth.rate_limit import ClientRateLimiter
from gateway.oauth.replay import ReplayStore
from gateway.oauth.revocation import RevocationEndpoint, TokenRevocations
from gateway.oauth.token_endpoint import GrantOutcome, TokenEndpoint
from gateway.proxy.forward import Upstream
from gateway.proxy.headers import RequestHeaderRules
from gateway.proxy.origin import OriginPolicy
from gateway.quotas import QuotaStore
from gateway.routes import RouteTable
from gateway.sessions import SessionBinder, derive_session_key
from gateway.signals.revocations import SubjectRevocations
from gateway.tool_pins import DriftState

log = logging.getLogger(__name__)


class ReloadRefused(Exception):
    """A new config changes something that needs a restart (listen address, public URL, issuer)."""


def _upstream_key(route: RouteConfig, config: GatewayConfig) -> tuple[object, ...]:
    return (
        route.name,
        route.upstream,
        route.transport,
        route.upstream_headers,
        route.max_connections,
        config.limits,
        config.public_url,
        config.strip_request_headers,
    )


@dataclass
class Runtime:
    config: GatewayConfig
    routes: RouteTable
    origins: OriginPolicy
    signing_key: SigningKey
    previous_keys: tuple[PreviousKey, ...]
    tokens: AccessTokenService
    guard: BearerGuard
    keys: KeyRing
    token_endpoint: TokenEndpoint
    upstreams: dict[str, Upstream]
    sessions: SessionBinder
    # audit.argument_hashes: the keyed digest of tool arguments written to audit lines, or None.
    argument_digest: Callable[[Any], str] | None = None
    engine: DecisionEngine = field(default_factory=DecisionEngine)
    # Signs the stateless approval rounds of MCP 2026-07-28 clients (gateway/approvals/stateless.py).
    approval_states: StateSigner = None  # type: ignore[assignment]  # set by build
    replay: ReplayStore = None  # type: ignore[assignment]  # set by build: single-use of approvals too
    # revoked.subjects as (issuer, tenant or None for every tenant, subject).
    revoked_users: frozenset[tuple[str, str | None, str]] = frozenset()
    # RFC 7009 revoked access tokens (in the shared replay store) and the endpoints of RFC 7009 / 7662.
    token_revocations: TokenRevocations = None  # type: ignore[assignment]  # set by build
    revocation_endpoint: RevocationEndpoint = None  # type: ignore[assignment]
    introspection_endpoint: IntrospectionEndpoint = None  # type: ignore[assignment]
    # Users the IdP cut off through Shared Signals (gateway/signals/), shared with the proxied path.
    subject_revocations: SubjectRevocations | None = None

    def refuses_holder(self, principal: Principal) -> bool:
        """Whether a valid token's holder is refused anyway: revoked by the config, or cut off by the IdP
        (Shared Signals) after the token was issued. RFC 7009 revocation of the token itself is
        ``token_revocations`` (it needs the replay store)."""
        cut_off = self.subject_revocations
        return self.is_revoked(principal.identity, principal.client_id) or (
            cut_off is not None and cut_off.refuses(principal.identity, principal.email, principal.issued_at)
        )

    def is_revoked(self, user: SubjectIdentity, client_id: str) -> bool:
        """Revocation from config (``revoked``): applied to new grants and to live tokens at once. A
        user is named by issuer, tenant and subject (gateway/oauth/identity.py); an entry without a
        tenant covers every tenant of its IdP."""
        return (
            client_id in self.config.revoked_clients
            or (user.issuer, user.tenant, user.subject) in self.revoked_users
            or (user.issuer, None, user.subject) in self.revoked_users
        )

    @classmethod
    def build(
        cls,
        config: GatewayConfig,
        *,
        replay_store: ReplayStore,
        quota_store: QuotaStore | None = None,
        idp_session: Callable[[], aiohttp.ClientSession],
        on_grant: Callable[[GrantOutcome], None],
        on_revoked: Callable[[Principal], None] | None = None,
        jwks_min_refresh_seconds: float,
        metrics: Metrics,
        signing_key: SigningKey | None = None,
        previous: Runtime | None = None,
        condition_health: ConditionHealth | None = None,
        clock: Callable[[], float] = time.time,
        revocations: SubjectRevocations | None = None,
        retain: Callable[[Grant, IssuedToken, str], None] | None = None,
        tool_drift: DriftState | None = None,
    ) -> Runtime:
        """Raises ConfigError / SigningKeyError / ReloadRefused without touching ``previous``."""
        if previous is not None:
            _check_reloadable(previous.config, config)
        auth = config.authorization
        if config.allow_insecure_http:
            log.warning(
                "allow_insecure_http is set: public_url, issuers or JWKS URLs may use plain http, so tokens, "
                "assertions and keys can travel without TLS. Use this for test setups only."
            )
        if signing_key is None:
            if previous is not None and previous.config.authorization.signing_key_file == auth.signing_key_file:
                signing_key = previous.signing_key
            else:
                signing_key = load_signing_key(auth.signing_key_file)
        previous_keys = _previous_keys(auth, signing_key, previous, clock())
        routes = RouteTable(config.routes)
        tokens = AccessTokenService(
            signing_key, auth.issuer, auth.access_token_ttl_seconds, previous_keys=previous_keys, clock=clock
        )
        keys = KeyRing(
            auth.identity_providers,
            idp_session,
            min_refresh_seconds=jwks_min_refresh_seconds,
            previous=previous.keys if previous is not None else None,
            on_fetch=lambda result: metrics.jwks_fetches.labels(result.issuer, "ok" if result.ok else "error").inc(),
        )
        dpop = DpopVerifier(
            replay_store,
            NonceIssuer(derive_nonce_key(signing_key.secret_material), clock=clock),
            require_nonce=auth.dpop_require_nonce,
            clock_skew_seconds=auth.clock_skew_seconds,
            clock=clock,
        )
        runtime = cls(
            config=config,
            routes=routes,
            origins=OriginPolicy(config.allowed_origins),
            signing_key=signing_key,
            previous_keys=previous_keys,
            tokens=tokens,
            guard=BearerGuard(tokens, dpop, config.public_url),
            keys=keys,
            token_endpoint=None,  # type: ignore[arg-type]  # set below: it needs is_revoked
            upstreams=_carry_upstreams(config, previous, metrics),
            sessions=SessionBinder(
                derive_session_key(signing_key.secret_material),
                [derive_session_key(k.key.secret_material) for k in previous_keys],
            ),
            argument_digest=argument_digester(signing_key.secret_material) if config.audit_argument_hashes else None,
            engine=DecisionEngine(
                quota_store,
                condition_health,
                on_quota=lambda route, quota, result: metrics.quota_decisions.labels(route, quota, result).inc(),
                tool_drift=tool_drift,
            ),
            revoked_users=frozenset((s.issuer, s.tenant, s.subject) for s in config.revoked_subjects),
            approval_states=StateSigner(derive_state_key(signing_key.secret_material)),
            replay=replay_store,
        )
        clients = ClientAuthenticator(
            auth,
            token_endpoint=config.public_url + TOKEN_PATH,
            replay=replay_store,
            session=idp_session,
            clock=clock,
        )
        # Kept across reloads: what this replica knows to be revoked (the replay store cannot change).
        runtime.subject_revocations = revocations
        runtime.token_revocations = (
            previous.token_revocations if previous is not None else TokenRevocations(replay_store)
        )
        runtime.revocation_endpoint = RevocationEndpoint(
            clients, tokens, runtime.token_revocations, on_revoked=on_revoked
        )
        runtime.introspection_endpoint = IntrospectionEndpoint(
            clients,
            tokens,
            runtime.token_revocations,
            issuer=auth.issuer,
            is_refused=runtime.refuses_holder,
        )
        runtime.token_endpoint = TokenEndpoint(
            clients,
            IdJagValidator(auth, routes, keys, replay_store),
            tokens,
            on_outcome=on_grant,
            is_revoked=runtime.is_revoked,
            rate_limiter=(
                ClientRateLimiter(auth.token_rate_limit, (c.client_id for c in auth.clients))
                if auth.token_rate_limit.requests_per_minute
                else None
            ),
            dpop=dpop,
            url=config.public_url + TOKEN_PATH,
            cut_off=(
                (lambda g: revocations.refuses(g.identity, g.email, g.assertion_issued_at))
                if revocations is not None
                else None
            ),
            retain=retain,
            bridge=IdTokenBridge(auth, routes, keys, replay_store),
        )
        return runtime

    def retired_upstreams(self, newer: Runtime) -> list[Upstream]:
        kept = {id(u) for u in newer.upstreams.values()}
        return [u for u in self.upstreams.values() if id(u) not in kept]


def _previous_keys(
    auth: AuthorizationConfig, signing_key: SigningKey, previous: Runtime | None, now: float
) -> tuple[PreviousKey, ...]:
    """The keys that verify but no longer sign, each with its retire time (see ``PreviousKey``).

    A key in ``previous_signing_key_files`` is accepted for as long as it is configured: the operator
    lists it on purpose, as the next key (phase 1 of a rotation, before any replica signs with it) or
    the old one (phase 2), and removes it in phase 3. A key that a reload replaced without listing it
    stopped signing now, after issuing tokens of the old TTL: it verifies only until the longest of
    those has expired (TTL + clock skew), and keeps that retire time across later reloads."""
    skew = auth.clock_skew_seconds
    known = {p.key.kid: p for p in previous.previous_keys} if previous is not None else {}
    keys: dict[str, PreviousKey] = {}
    for path in auth.previous_signing_key_files:
        key = SigningKey.from_file(path)
        if key.kid != signing_key.kid:
            keys[key.kid] = PreviousKey(key, math.inf)
    replaced: list[PreviousKey] = []
    if previous is not None and previous.signing_key.kid != signing_key.kid:
        old_ttl = previous.config.authorization.access_token_ttl_seconds
        replaced.append(PreviousKey(previous.signing_key, now + old_ttl + skew))
    # Keys an earlier reload replaced keep their retire time until it passes.
    replaced.extend(p for p in known.values() if p.retire_at != math.inf and p.retire_at > now)
    for entry in replaced:
        if entry.key.kid in keys or entry.key.kid == signing_key.kid:
            continue
        keys[entry.key.kid] = entry
        if entry.key.kid not in known:
            log.info(
                "signing key %s no longer signs; it verifies access tokens until %s",
                entry.key.kid,
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.retire_at)),
            )
    return tuple(keys.values())


def _carry_upstreams(config: GatewayConfig, previous: Runtime | None, metrics: Metrics) -> dict[str, Upstream]:
    old = {}
    if previous is not None:
        old = {_upstream_key(u.route, previous.config): u for u in previous.upstreams.values()}
    rules = RequestHeaderRules(config.strip_request_headers, config.public_url)
    return {
        r.name: old.get(_upstream_key(r, config)) or Upstream(r, config.limits, rules, metrics) for r in config.routes
    }


def _check_reloadable(old: GatewayConfig, new: GatewayConfig) -> None:
    for name, before, after in (
        ("listen", (old.listen_host, old.listen_port), (new.listen_host, new.listen_port)),
        ("metrics_listen", old.metrics_listen, new.metrics_listen),
        ("public_url", old.public_url, new.public_url),
        ("authorization.issuer", old.authorization.issuer, new.authorization.issuer),
        ("audit", (old.audit_sink, old.audit_argument_hashes), (new.audit_sink, new.audit_argument_hashes)),
        ("replay_store", old.replay_store, new.replay_store),
        ("logging", old.logging_format, new.logging_format),
        ("shared_signals", old.transmitters, new.transmitters),
        ("telemetry", old.telemetry_otlp_endpoint, new.telemetry_otlp_endpoint),
    ):
        if before != after:
            raise ReloadRefused(f"{name} changed; restart the gateway to apply it")
