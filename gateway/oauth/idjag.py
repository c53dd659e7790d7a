"""Validation of Identity Assertion JWT Authorization Grants (ID-JAGs) at the resource AS.

Sources: draft-ietf-oauth-identity-assertion-authz-grant ("the draft") §4.4.1 "Processing Rules"
(which applies RFC 7521 §5.2 and RFC 7523 §3) and §3.1 "ID-JAG Claims", and the MCP Enterprise-Managed
Authorization extension (EMA §5.1, §7.2.1, §7.4, §7.6.2). Each rule is one method named after it, so
"where is the jti checked?" is answered by searching ``_check_jti``.
Every assertion failure is ``invalid_grant`` (RFC 7523 §3.1); a bad ``resource`` *parameter* is
``invalid_target`` (RFC 8707 §2) and an unsatisfiable ``scope`` parameter ``invalid_scope``.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jose import jws
from jose.exceptions import JOSEError

from gateway.config import ASYMMETRIC_ALGORITHMS, AuthorizationConfig, IdentityProviderConfig, RouteConfig
from gateway.oauth import jose_json
from gateway.oauth.errors import InvalidDpopProof, InvalidGrant, InvalidScope, InvalidTarget, TemporarilyUnavailable
from gateway.oauth.identity import SubjectIdentity
from gateway.oauth.jwks import KeyRing, KeyUnavailable
from gateway.oauth.replay import ReplayStore, ReplayStoreUnavailable
from gateway.oauth.subject_id import iss_sub_pairs, subject_identifier_problem
from gateway.routes import RouteTable
from gateway.urls import canonical_url, resource_problem

ID_JAG_TYP = "oauth-id-jag+jwt"
_MAX_ASSERTION_BYTES = 16 * 1024
_MAX_JTI_LENGTH = 256


@dataclass(frozen=True)
class Grant:
    """What a valid ID-JAG entitles its client to: one route, some scopes, as one user."""

    subject: str
    idp_issuer: str
    client_id: str
    route: RouteConfig
    scopes: tuple[str, ...]
    groups: tuple[str, ...]
    assertion_jti: str
    email: str | None = None
    # The ``resource`` values to return in the token response (``IdJagValidator._check_resource``).
    resources: tuple[str, ...] = ()
    # The ID-JAG's ``exp``: no access token issued for it may expire later.
    assertion_expires_at: float = math.inf
    # The ``tenant`` claim of a multi-tenant IdP: part of who the subject is.
    tenant: str | None = None
    # The ID-JAG's ``iat``: a Shared Signals cut-off refuses ID-JAGs issued before it.
    assertion_issued_at: float = 0.0

    @property
    def identity(self) -> SubjectIdentity:
        return SubjectIdentity(self.idp_issuer, self.tenant, self.subject)


class IdJagValidator:
    def __init__(
        self,
        config: AuthorizationConfig,
        routes: RouteTable,
        keys: KeyRing,
        replay: ReplayStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._routes = routes
        self._keys = keys
        self._replay = replay
        self._clock = clock
        self._idps = {idp.issuer: idp for idp in config.identity_providers}
        self.max_lifetime_seconds = config.max_assertion_lifetime_seconds

    async def validate(
        self,
        assertion: str,
        *,
        client_id: str,
        resources: tuple[str, ...],
        scope: str | None,
        dpop_jkt: str | None = None,
    ) -> Grant:
        """``dpop_jkt``: the thumbprint of the key that signed the request's valid DPoP proof, if any."""
        header = self._parse_header(assertion)
        self._check_typ(header)
        alg = self._check_algorithm(header, ASYMMETRIC_ALGORITHMS)
        idp = self._check_trusted_issuer(self._unverified_claims(assertion))
        self._check_algorithm(header, idp.algorithms)
        claims = await self._check_signature(assertion, header, alg, idp)
        now = self._clock()
        self._check_audience(claims)
        self._check_client_id(claims, client_id)
        subject = self._check_subject(claims)
        self._check_sub_id(claims, subject)
        self._check_audience_subject(claims)
        self._check_times(claims, now)
        jti = self._check_jti(claims)
        self._check_confirmation(claims, dpop_jkt)
        self._check_no_authorization_details(claims)
        tenant = self._check_tenant(claims, idp)
        route, granted_resources = self._check_resource(claims, resources)
        self._check_dpop_route(route, dpop_jkt)
        groups = self._groups(claims, idp)
        self._check_groups(route, groups)
        scopes = self._check_scope(claims, route, scope)
        # Last: an assertion that fails any other rule must not consume its jti.
        await self._check_replay(idp, jti, float(claims["exp"]))
        return self._grant(claims, subject, idp, client_id, route, scopes, groups, jti, granted_resources, tenant)

    def _grant(
        self,
        claims: dict[str, Any],
        subject: str,
        idp: IdentityProviderConfig,
        client_id: str,
        route: RouteConfig,
        scopes: tuple[str, ...],
        groups: tuple[str, ...],
        replay_key: str,
        resources: tuple[str, ...],
        tenant: str | None,
    ) -> Grant:
        """What a validated assertion (an ID-JAG, or an ID token through the bridge) entitles to."""
        email = claims.get("email") if isinstance(claims.get("email"), str) else None
        return Grant(
            subject,
            idp.issuer,
            client_id,
            route,
            scopes,
            groups,
            replay_key,
            email,
            resources=resources,
            assertion_expires_at=claims["exp"],
            assertion_issued_at=claims["iat"],
            tenant=tenant,
        )

    # -- structure ------------------------------------------------------------------------

    def _parse_header(self, assertion: str) -> dict[str, Any]:
        """RFC 7523 §2.1: exactly one JWT. A JWE (5 parts) is refused: we hold no decryption key
        (EMA §7.4.3 allows encryption only *to* the AS, which we do not configure)."""
        if len(assertion) > _MAX_ASSERTION_BYTES:
            raise InvalidGrant("assertion is too large", reason="malformed")
        parts = assertion.count(".")
        if parts == 4:
            raise InvalidGrant("encrypted assertions (JWE) are not supported", reason="malformed")
        if parts != 2:
            raise InvalidGrant("assertion is not a compact JWS", reason="malformed")
        try:
            header = jose_json.unverified_header(assertion)
        except jose_json.JoseJSONError as exc:
            raise InvalidGrant(f"assertion header is malformed: {exc}", reason="malformed") from None
        except ValueError:
            raise InvalidGrant("assertion header is malformed", reason="malformed") from None
        if "crit" in header:
            # RFC 7515 §4.1.11: unknown critical extensions must make the JWS invalid.
            raise InvalidGrant("critical header extensions are not supported", reason="malformed")
        return header

    def _unverified_claims(self, assertion: str) -> dict[str, Any]:
        try:
            claims = jose_json.loads(jws.get_unverified_claims(assertion))
        except jose_json.JoseJSONError as exc:
            raise InvalidGrant(f"assertion claims are malformed: {exc}", reason="malformed") from None
        except (JOSEError, ValueError, TypeError):
            raise InvalidGrant("assertion claims are not a JSON object", reason="malformed") from None
        if not isinstance(claims, dict):
            raise InvalidGrant("assertion claims are not a JSON object", reason="malformed")
        return claims

    def _check_typ(self, header: dict[str, Any]) -> None:
        """Draft §4.4.1 + RFC 8725 §3.11: explicit typing stops an ID token or an access token from
        being replayed as an ID-JAG. Compared as a media type (RFC 7515 §4.1.9)."""
        if not jose_json.typ_is(header.get("typ"), ID_JAG_TYP):
            raise InvalidGrant(f"assertion typ must be {ID_JAG_TYP}", reason="typ")

    def _check_algorithm(self, header: dict[str, Any], allowed: tuple[str, ...]) -> str:
        """EMA §7.4.1: an explicit allow-list, never ``none``; HMAC is never in it (RFC 8725 §3.1)."""
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in allowed:
            raise InvalidGrant("assertion algorithm is not allowed", reason="algorithm")
        return alg

    # -- issuer and signature --------------------------------------------------------------

    def _check_trusted_issuer(self, claims: dict[str, Any]) -> IdentityProviderConfig:
        """Draft §4.2: the AS "MUST be configured to recognize" each trusted issuer."""
        iss = claims.get("iss")
        idp = self._idps.get(iss) if isinstance(iss, str) else None
        if idp is None:
            raise InvalidGrant("assertion issuer is not a trusted identity provider", reason="issuer")
        return idp

    async def _check_signature(
        self, assertion: str, header: dict[str, Any], alg: str, idp: IdentityProviderConfig
    ) -> dict[str, Any]:
        """EMA §7.4.1: verify with a trusted key of the issuing IdP, found by ``kid``."""
        key_set = self._keys.for_issuer(idp.issuer)
        assert key_set is not None
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidGrant("assertion kid is malformed", reason="malformed")
        try:
            key = await key_set.get_key(kid, alg)
        except KeyUnavailable as exc:
            if exc.unreachable:
                raise TemporarilyUnavailable(
                    "the identity provider's keys are unavailable; retry later", reason="jwks_unavailable"
                ) from None
            raise InvalidGrant("assertion is signed with an unknown key", reason="signature") from None
        try:
            payload = jws.verify(assertion, key, algorithms=[alg])
        except JOSEError:
            raise InvalidGrant("assertion signature is invalid", reason="signature") from None
        # The same bytes _unverified_claims already parsed strictly, so this cannot fail.
        claims = jose_json.loads(payload)
        if claims.get("iss") != idp.issuer:
            raise InvalidGrant("assertion issuer is not a trusted identity provider", reason="issuer")
        return claims

    # -- claims ----------------------------------------------------------------------------

    def _check_audience(self, claims: dict[str, Any]) -> None:
        """Draft §4.4.1: ``aud`` is our issuer, as a string or a one-element array; EMA §7.6.2. One
        trailing slash is tolerated for interop (our decision, README "Decisions"; the conformance
        suite's reference AS tolerates it too)."""
        aud = claims.get("aud")
        if isinstance(aud, list):
            if len(aud) != 1:
                raise InvalidGrant("assertion aud must name exactly one audience", reason="audience")
            aud = aud[0]
        issuer = self._config.issuer
        if not isinstance(aud, str) or aud not in (issuer, issuer + "/"):
            raise InvalidGrant("assertion aud is not this authorization server", reason="audience")

    def _check_client_id(self, claims: dict[str, Any], client_id: str) -> None:
        """Draft §4.4.1: the ``client_id`` claim must equal the authenticated client, else invalid_grant."""
        if claims.get("client_id") != client_id:
            raise InvalidGrant("assertion client_id does not match the authenticated client", reason="client_id")

    def _check_subject(self, claims: dict[str, Any]) -> str:
        """RFC 7523 §3 item 2; EMA §7.4.1."""
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise InvalidGrant("assertion has no subject", reason="subject")
        return sub

    def _check_sub_id(self, claims: dict[str, Any], subject: str) -> None:
        """``sub_id`` (RFC 9493 §4), which an IdP adds for a resource application it federates by SAML,
        where the NameID, not ``sub``, is what that application knows the user by: when present it must
        be a well-formed Subject Identifier (RFC 9493 §3). It does not replace ``sub``, which the draft
        (§3.1) and RFC 7523 §3 still require and which stays who the user is (``Grant.identity``), so
        the principal, its revocations and its audit trail are the same with or without ``sub_id``.
        RFC 9493 §4: ``sub`` and ``sub_id`` must identify the same subject, so an ``iss_sub`` identifier
        of this very issuer naming another ``sub`` contradicts the assertion and is refused."""
        sub_id = claims.get("sub_id")
        if sub_id is None:
            return
        if problem := subject_identifier_problem(sub_id):
            raise InvalidGrant(f"assertion sub_id {problem} (RFC 9493 subject identifier)", reason="subject")
        for iss, sub in iss_sub_pairs(sub_id):
            if iss == claims["iss"] and sub != subject:
                raise InvalidGrant("assertion sub_id names another subject than sub", reason="subject")

    def _check_audience_subject(self, claims: dict[str, Any]) -> None:
        """Draft §3.1: ``aud_sub`` is the user's identifier at the resource AS and ``aud_tenant`` the
        resource AS's tenant it is scoped to, both JSON strings. They help an AS that keeps its own user
        accounts find (or provision) the account; the gateway keeps none, so the user stays the IdP's
        ``iss`` + ``tenant`` + ``sub`` (draft §6.3) and these claims only have to be well-formed. A
        single-tenant AS has no tenants for ``aud_tenant`` to choose between, so no value is refused."""
        for name in ("aud_sub", "aud_tenant"):
            value = claims.get(name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidGrant(f"assertion {name} claim must be a non-empty string", reason=name)

    def _check_times(self, claims: dict[str, Any], now: float) -> None:
        """EMA §7.4.2 validity window with minimal skew (for ``iat`` and ``nbf``); RFC 7523 §3 items
        4-6; ID-JAGs "MUST be short-lived", so a lifetime above ``max_assertion_lifetime_seconds`` is
        refused. Times must be integer NumericDates (``jose_json.numeric_date``), so no comparison
        below meets a NaN."""
        skew = self._config.clock_skew_seconds
        exp, iat = jose_json.numeric_date(claims.get("exp")), jose_json.numeric_date(claims.get("iat"))
        if exp is None:
            raise InvalidGrant("assertion has no valid exp (an integer NumericDate)", reason="expired")
        if iat is None:
            raise InvalidGrant("assertion has no valid iat (an integer NumericDate)", reason="issued_at")
        nbf = claims.get("nbf")
        if nbf is not None and jose_json.numeric_date(nbf) is None:
            raise InvalidGrant("assertion has no valid nbf (an integer NumericDate)", reason="not_before")
        if now >= exp:
            # No skew here: the access token may not outlive the ID-JAG (AccessTokenService.issue), so
            # one issued for an assertion already past its exp would be dead on arrival.
            raise InvalidGrant("assertion has expired", reason="expired")
        if iat > now + skew:
            raise InvalidGrant("assertion is issued in the future", reason="issued_at")
        if nbf is not None and nbf > now + skew:
            raise InvalidGrant("assertion is not yet valid", reason="not_before")
        if exp - iat > self.max_lifetime_seconds:
            raise InvalidGrant("assertion lifetime exceeds the allowed maximum", reason="lifetime")

    def _check_jti(self, claims: dict[str, Any]) -> str:
        """The draft makes ``jti`` REQUIRED and EMA §7.4.2 requires replay detection on it."""
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > _MAX_JTI_LENGTH:
            raise InvalidGrant("assertion has no valid jti", reason="jti")
        return jti

    def _check_confirmation(self, claims: dict[str, Any], dpop_jkt: str | None) -> None:
        """Draft §8.6 "Sender Constraining Tokens": an IdP may bind the ID-JAG to the client's DPoP key
        (``cnf.jkt``, RFC 9449 §6.1); then it is redeemed only with a proof signed by that key, so a
        stolen ID-JAG is useless without the key. Other confirmation methods (mTLS ``x5t#S256``) are
        refused, never ignored: ignoring ``cnf`` would unbind the assertion."""
        cnf = claims.get("cnf")
        if cnf is None:
            return
        jkt = cnf.get("jkt") if isinstance(cnf, dict) and set(cnf) == {"jkt"} else None
        if not isinstance(jkt, str) or not jkt:
            raise InvalidGrant("only DPoP key confirmation (cnf.jkt) is supported", reason="cnf")
        if dpop_jkt is None:
            raise InvalidGrant("the assertion is bound to a DPoP key (cnf.jkt): send a DPoP proof", reason="cnf")
        if not hmac.compare_digest(jkt.encode(), dpop_jkt.encode()):
            raise InvalidGrant("the DPoP proof is not signed by the key the assertion is bound to", reason="cnf")

    def _check_dpop_route(self, route: RouteConfig, dpop_jkt: str | None) -> None:
        """A ``require_dpop`` route accepts DPoP-bound tokens only (RFC 9449 §7.1): refuse to issue a
        bearer token for it before the assertion is spent, so the client can retry with a proof."""
        if route.require_dpop and dpop_jkt is None:
            raise InvalidDpopProof("this resource requires DPoP-bound access tokens: send a DPoP proof", reason="dpop")

    def _check_no_authorization_details(self, claims: dict[str, Any]) -> None:
        """Draft §4.4.1: the Resource AS "MUST parse" ``authorization_details`` and grant only what its
        policy allows of each detail (RFC 9396 §2). The gateway has no RAR types, so it cannot honour
        them; granting the route's scopes instead would widen what an IdP restricted through RAR."""
        if "authorization_details" in claims:
            raise InvalidGrant(
                "assertions with authorization_details (RFC 9396) are not supported here; "
                "ask the identity provider for scopes instead",
                reason="authorization_details",
            )

    def _check_tenant(self, claims: dict[str, Any], idp: IdentityProviderConfig) -> str | None:
        """Draft §6: for a multi-tenant IdP the ``tenant`` claim is part of who the subject is (§6.3),
        so it is returned for the principal's identity; a configured ``tenant`` must match it."""
        tenant = claims.get("tenant")
        if tenant is not None and (not isinstance(tenant, str) or not tenant):
            raise InvalidGrant("assertion tenant claim is malformed", reason="tenant")
        if idp.tenant is not None and tenant != idp.tenant:
            raise InvalidGrant("assertion tenant is not the configured tenant", reason="tenant")
        return tenant

    def _check_resource(
        self, claims: dict[str, Any], requested: tuple[str, ...]
    ) -> tuple[RouteConfig, tuple[str, ...]]:
        """The route the token is for, and the ``resource`` values to return for it.

        EMA §7.6.2: a ``resource`` claim must name a resource served here; draft §4.4.1 processes it by
        RFC 8707 §2, so the ``resource`` parameters (several are allowed) must be among its values,
        else ``invalid_target``. Only a route's exact resource identifier names it
        (``RouteTable.for_resource``), compared in RFC 3986 §6.2.2 normal form. Values with a fragment
        or userinfo are refused as sent, before the normal form could hide either. Without a claim, the
        parameters choose the route, or else the only route does (our binding decision, README).

        The returned values are spelled as the claim spelled them (else as the client sent them): draft
        §4.4.2 has clients check that the returned ``resource`` set is a subset of the claim."""
        raw = claims.get("resource")
        if raw is None:
            resources: list[str] = []
        elif isinstance(raw, str):
            resources = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(r, str) for r in raw):
            resources = raw
        else:
            raise InvalidGrant("assertion resource claim is malformed", reason="resource")
        for value in resources:
            if problem := resource_problem(value):
                raise InvalidGrant(f"assertion resource claim {problem}", reason="resource")
        for value in requested:
            if problem := resource_problem(value):
                raise InvalidTarget(f"the resource parameter {problem}", reason="resource")
        claimed = [self._routes.for_resource(r) for r in resources]
        if any(r is None for r in claimed):
            raise InvalidGrant(
                "assertion names a resource this gateway does not serve (only a route's exact resource "
                "identifier names it)",
                reason="resource",
            )
        if requested:
            return self._requested_route(resources, requested)
        distinct = {r.name: r for r in claimed if r is not None}
        if len(distinct) == 1:
            return next(iter(distinct.values())), tuple(dict.fromkeys(resources))
        if not resources and len(self._routes) == 1:
            route = next(iter(self._routes))
            return route, (route.resource,)
        raise InvalidTarget("specify the resource parameter: the target route is ambiguous", reason="resource")

    def _requested_route(self, resources: list[str], requested: tuple[str, ...]) -> tuple[RouteConfig, tuple[str, ...]]:
        """RFC 8707 §2: several ``resource`` parameters are served when they name one route."""
        routes = {}
        for value in requested:
            route = self._routes.for_resource(value)
            if route is None:
                raise InvalidTarget("the requested resource is not served here", reason="resource")
            routes[route.name] = route
        if len(routes) > 1:
            raise InvalidTarget("the resource parameters name more than one route", reason="resource")
        (route,) = routes.values()
        if not resources:
            return route, tuple(dict.fromkeys(requested))
        wanted = {canonical_url(r) for r in requested}
        granted = tuple(dict.fromkeys(r for r in resources if canonical_url(r) in wanted))
        if {canonical_url(r) for r in granted} != wanted:
            raise InvalidTarget("the requested resource is not granted by the assertion", reason="resource")
        return route, granted

    def _groups(self, claims: dict[str, Any], idp: IdentityProviderConfig) -> tuple[str, ...]:
        value: Any = claims
        for name in idp.groups_location:
            value = value.get(name) if isinstance(value, dict) else None
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list):
            return tuple(g for g in value if isinstance(g, str))
        return ()

    def _check_groups(self, route: RouteConfig, groups: tuple[str, ...]) -> None:
        """Route ``allow_groups``: access follows IdP group membership (no consent screen)."""
        if route.allow_groups is not None and not set(route.allow_groups) & set(groups):
            raise InvalidGrant("the user is not in a group allowed on this resource", reason="group")

    def _check_scope(self, claims: dict[str, Any], route: RouteConfig, requested: str | None) -> tuple[str, ...]:
        """Granted = the ID-JAG's scopes (the route's ``default_scopes`` if it has no ``scope`` claim)
        ∩ the route's scopes ∩ the requested scopes, when a ``scope`` parameter is sent.

        Never more than the ID-JAG (EMA §7.2.1): an IdP that named no scope authorised no particular
        scope, so it gets the route's least-privileged default rather than every scope of the route.
        A ``scope`` claim granting nothing here is a mismatch (EMA §7.6.2, ``invalid_grant``); a
        request leaving nothing is ``invalid_scope`` (RFC 6749 §5.2)."""
        raw = claims.get("scope")
        if raw is None:
            base = route.default_scopes
        elif isinstance(raw, str):
            granted_by_idp = set(raw.split())
            base = tuple(s for s in route.scopes if s in granted_by_idp)
            if not base:
                raise InvalidGrant("assertion scope grants nothing on this resource", reason="scope")
        else:
            raise InvalidGrant("assertion scope claim is malformed", reason="scope")
        if requested is None or not requested.strip():
            return base
        wanted = set(requested.split())
        narrowed = tuple(s for s in base if s in wanted)
        if not narrowed:
            raise InvalidScope("none of the requested scopes can be granted", reason="scope")
        return narrowed

    async def _check_replay(self, idp: IdentityProviderConfig, jti: str, exp: float) -> None:
        """EMA §7.4.2: single use until exp (+ skew), keyed by (iss, jti). The draft's §4.4.3 lets a
        client re-submit an ID-JAG; the MCP profile's replay rule wins (README "Decisions")."""
        try:
            first_use = await self._replay.first_use(f"{idp.issuer}\x00{jti}", exp + self._config.clock_skew_seconds)
        except ReplayStoreUnavailable:
            # Fail closed: a store that cannot answer must not turn a replay into a grant. 503 (not
            # invalid_grant) because the assertion is fine and the client may retry it.
            raise TemporarilyUnavailable(
                "replay protection is unavailable; retry later", reason="replay_store_unavailable"
            ) from None
        if not first_use:
            raise InvalidGrant("assertion has already been used", reason="replay")
