"""The signed identity header: who is calling, told to the upstream in a form it can verify.

An upstream behind the gateway cannot trust a plain ``X-User`` header (anyone who reaches it, or a
client whose header slipped through, could write one). With ``routes[].identity_header`` every forwarded
request carries a short-lived JWT (RFC 7519) signed with the gateway's own key, verifiable with the keys
published at ``/oauth2/jwks``; a client-sent header of the same name is always stripped first
(gateway/proxy/headers.py).

Claims: ``iss`` (the gateway's issuer), ``aud`` (the upstream, by default its origin), ``sub``,
``idp_sub``, ``idp``, ``tenant``, ``email``, ``groups``, ``client_id``, ``route``, ``request_id`` (the
gateway's ``X-Request-Id``, to join both sides' logs), ``iat``, ``exp``, ``jti``.

``sub`` is the namespaced identity (gateway/oauth/identity.py), exactly as in the gateway's access
tokens: RFC 7519 §4.1.2 requires ``sub`` to be unique for its issuer, and this issuer vouches for users
of several IdPs (and tenants), where a bare IdP ``sub`` such as "alice" names different people. The
IdP's own subject is ``idp_sub`` beside ``idp`` and ``tenant``.

Explicit typing (RFC 8725 §3.11): the header ``typ`` is ``mcp-identity+jwt``, so the gateway, which
checks ``at+jwt`` on its access tokens, never accepts one of these as a bearer token, and an upstream
can refuse an access token presented in its place. Each request gets a fresh token (its own ``jti`` and
request id); signing is one ECDSA or RSA signature, small beside the proxied call.
"""

from __future__ import annotations

import json
import secrets

from jose import jws

from gateway.config import IdentityHeaderConfig
from gateway.oauth.access_token import Principal
from gateway.oauth.keys import SigningKey

IDENTITY_TYP = "mcp-identity+jwt"


def identity_token(
    config: IdentityHeaderConfig,
    *,
    key: SigningKey,
    issuer: str,
    route: str,
    principal: Principal,
    request_id: str,
    now: float,
) -> str:
    issued_at = int(now)
    claims = {
        "iss": issuer,
        "aud": config.audience,
        "sub": principal.identity.key,
        "idp_sub": principal.subject,
        "idp": principal.idp_issuer,
        **({"tenant": principal.tenant} if principal.tenant is not None else {}),
        **({"email": principal.email} if principal.email is not None else {}),
        "groups": list(principal.groups),
        "client_id": principal.client_id,
        "route": route,
        "request_id": request_id,
        "iat": issued_at,
        "exp": issued_at + config.ttl_seconds,
        "jti": secrets.token_urlsafe(16),
    }
    return jws.sign(
        json.dumps(claims, separators=(",", ":")).encode(),
        key.private,
        headers={"kid": key.kid, "typ": IDENTITY_TYP},
        algorithm=key.algorithm,
    )
