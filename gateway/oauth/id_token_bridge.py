"""The ID-token bridge: access tokens for identity providers that do not issue ID-JAGs yet.

Entra ID, Google Workspace and Keycloak issue OpenID Connect ID tokens, not ID-JAGs. For an IdP marked
``accept_id_tokens: true`` the token endpoint accepts an RFC 8693 token exchange whose ``subject_token`` is
such an ID token (``subject_token_type=urn:ietf:params:oauth:token-type:id_token``, the type RFC 8693
§3 registers), and issues the same access token an ID-JAG would have got.

An ID token says who the user is, not that the IdP authorised this client for this resource: that
decision, which the IdP takes when it issues an ID-JAG, is taken here instead, by the route and scope
policy alone (``allow_groups``, ``default_scopes``). So the checks are those of an ID-JAG where they
apply (OpenID Connect Core §3.1.3.7 and the ID-JAG draft's processing rules):

- signature by a key of the configured IdP, with an allowed asymmetric algorithm, ``iss`` exact;
- ``aud`` (a string or an array) names one of ``id_token_audiences``, the AI clients' ids at the IdP;
- ``exp`` not passed, ``iat`` not in the future (``nbf`` too); ID tokens typically live an hour, so the
  ID-JAG lifetime bound is replaced by one hour, and the access token never outlives the ID token; a
  Shared Signals cut-off refuses ID tokens issued before it, as it does ID-JAGs;
- single use: its ``jti``, or the SHA-256 of the token when it has none (Entra and Google put none),
  is recorded until ``exp`` in the replay store, as an ID-JAG's ``jti`` is;
- ``nonce`` is not required (there is no authorization request of ours for it to answer);
- Entra: a configured ``tenant`` must equal ``tid``; groups overage (``_claim_names`` naming groups, or
  ``hasgroups``) is refused, since the groups would have to be fetched from Microsoft Graph;
- Google: with ``hosted_domain`` set, ``hd`` must equal it (accounts outside Workspace have none);
- explicit typing (RFC 8725 §3.11) the other way round: an ID-JAG or an access token is not an ID token.
"""

from __future__ import annotations

import hashlib
from typing import Any

from gateway.config import ASYMMETRIC_ALGORITHMS, IdentityProviderConfig
from gateway.oauth import jose_json
from gateway.oauth.errors import InvalidGrant
from gateway.oauth.idjag import ID_JAG_TYP, Grant, IdJagValidator

ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
# ID tokens of Entra and Google live an hour by default (Keycloak's less); longer ones are refused, which
# also keeps every ID token shorter-lived than a Shared Signals cut-off is remembered (gateway/signals/).
MAX_ID_TOKEN_LIFETIME_SECONDS = 3600
_NOT_ID_TOKENS = (ID_JAG_TYP, "at+jwt", "application/at+jwt")


class IdTokenBridge(IdJagValidator):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_lifetime_seconds = MAX_ID_TOKEN_LIFETIME_SECONDS

    @property
    def enabled(self) -> bool:
        return any(idp.accept_id_tokens for idp in self._idps.values())

    async def validate(self, assertion: str, *, client_id: str, resources: tuple[str, ...], scope: str | None) -> Grant:
        header = self._parse_header(assertion)
        typ = header.get("typ")
        if any(jose_json.typ_is(typ, other) for other in _NOT_ID_TOKENS):
            raise InvalidGrant("the subject token is not an ID token", reason="typ")
        alg = self._check_algorithm(header, ASYMMETRIC_ALGORITHMS)
        idp = self._check_trusted_issuer(self._unverified_claims(assertion))
        if not idp.accept_id_tokens:
            raise InvalidGrant(
                "this identity provider is not configured to accept ID tokens (accept_id_tokens)", reason="issuer"
            )
        self._check_algorithm(header, idp.algorithms)
        claims = await self._check_signature(assertion, header, alg, idp)
        self._check_id_token_audience(claims, idp)
        subject = self._check_subject(claims)
        self._check_times(claims, self._clock())
        tenant = self._check_entra_tenant(claims, idp)
        self._check_hosted_domain(claims, idp)
        self._check_no_group_overage(claims)
        # An ID token names no resource or scope: the route comes from the request, scopes from its defaults.
        route, granted_resources = self._check_resource({}, resources)
        if route.upstream_authorization is not None:
            raise InvalidGrant(
                "this route obtains per-user upstream tokens by chaining an ID-JAG; an ID token cannot be chained",
                reason="id_token_chained_route",
            )
        groups = self._groups(claims, idp)
        self._check_groups(route, groups)
        scopes = self._check_scope({}, route, scope)
        jti = claims.get("jti")
        replay_key = jti if isinstance(jti, str) and jti else "sha256:" + hashlib.sha256(assertion.encode()).hexdigest()
        await self._check_replay(idp, replay_key, float(claims["exp"]))
        return self._grant(
            claims, subject, idp, client_id, route, scopes, groups, replay_key, granted_resources, tenant
        )

    def _check_id_token_audience(self, claims: dict[str, Any], idp: IdentityProviderConfig) -> None:
        """OpenID Connect Core §3.1.3.7 item 3: ``aud`` contains a client id we expect."""
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if not any(isinstance(a, str) and a in idp.id_token_audiences for a in audiences):
            raise InvalidGrant("ID token aud is not one of id_token_audiences", reason="audience")

    def _check_entra_tenant(self, claims: dict[str, Any], idp: IdentityProviderConfig) -> str | None:
        """Entra's tenant is ``tid``; other IdPs may say ``tenant``. Part of who the subject is."""
        tenant = claims.get("tid", claims.get("tenant"))
        if tenant is not None and (not isinstance(tenant, str) or not tenant):
            raise InvalidGrant("ID token tenant (tid) is malformed", reason="tenant")
        if idp.tenant is not None and tenant != idp.tenant:
            raise InvalidGrant("ID token tenant (tid) is not the configured tenant", reason="tenant")
        return tenant

    def _check_hosted_domain(self, claims: dict[str, Any], idp: IdentityProviderConfig) -> None:
        if idp.hosted_domain is not None and claims.get("hd") != idp.hosted_domain:
            raise InvalidGrant(
                f"ID token hd is not {idp.hosted_domain} (an account outside the Workspace domain)",
                reason="hosted_domain",
            )

    def _check_no_group_overage(self, claims: dict[str, Any]) -> None:
        """Entra leaves ``groups`` out when a user has too many (200 in a JWT) and points at Microsoft
        Graph instead (``_claim_names``, or ``hasgroups`` in the implicit flow). Deciding without them
        could let a user past a group rule, so the token is refused with the fix."""
        names = claims.get("_claim_names")
        if (isinstance(names, dict) and "groups" in names) or claims.get("hasgroups") is True:
            raise InvalidGrant(
                "the ID token has a group overage (groups left out, _claim_names or hasgroups): configure the "
                "app registration to emit only the groups assigned to the application, or app roles "
                "(groups_claim: roles)",
                reason="group_overage",
            )
