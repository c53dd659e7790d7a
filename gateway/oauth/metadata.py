"""Discovery documents: RFC 8414 authorization-server metadata and RFC 9728 protected-resource
metadata, plus the gateway's JWKS and the (refusing) authorization endpoint.

MCP authorization requires RFC 9728 on the resource side and RFC 8414 or OpenID Connect Discovery on
the AS side. The gateway publishes RFC 8414 only: it is not an OpenID provider (it issues no ID
tokens), and RFC 8414 §5 reserves ``/.well-known/openid-configuration`` for OpenID provider metadata.
Both official SDK clients ask ``/.well-known/oauth-authorization-server`` first and fall back to the
OpenID location only when that is not found.

``authorization_endpoint``, ``response_types_supported`` and ``code_challenge_methods_supported`` are
published although no authorization-code flow exists: RFC 8414 §2 makes the first two REQUIRED (the
first "unless no grant types are supported that use the authorization endpoint", which both SDKs'
metadata parsers ignore), and MCP clients refuse an AS without PKCE S256.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from gateway.config import ASYMMETRIC_ALGORITHMS, GatewayConfig, RouteConfig
from gateway.oauth import dpop
from gateway.oauth.keys import SigningKey
from gateway.oauth.token_endpoint import JWT_BEARER, TOKEN_EXCHANGE

ID_JAG_PROFILE = "urn:ietf:params:oauth:grant-profile:id-jag"
TOKEN_PATH = "/oauth2/token"
REVOKE_PATH = "/oauth2/revoke"
INTROSPECT_PATH = "/oauth2/introspect"
CLIENT_AUTH_METHODS = ["private_key_jwt", "client_secret_basic", "client_secret_post"]
AUTHORIZE_PATH = "/oauth2/authorize"
JWKS_PATH = "/oauth2/jwks"
PRM_PREFIX = "/.well-known/oauth-protected-resource"
# CORS for discovery (browser-based MCP clients fetch these cross-origin; they carry no secrets).
DISCOVERY_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, OPTIONS",
    "Access-Control-Allow-Headers": "MCP-Protocol-Version, Content-Type",
}


def authorization_server_metadata(config: GatewayConfig) -> dict[str, Any]:
    base = config.public_url
    scopes = sorted({s for r in config.routes for s in r.scopes})
    return {
        "issuer": config.authorization.issuer,
        "authorization_endpoint": base + AUTHORIZE_PATH,
        "token_endpoint": base + TOKEN_PATH,
        "jwks_uri": base + JWKS_PATH,
        "scopes_supported": scopes,
        "response_types_supported": ["code"],
        # RFC 8693 token exchange only for the ID-token bridge (gateway/oauth/id_token_bridge.py).
        "grant_types_supported": [JWT_BEARER]
        + ([TOKEN_EXCHANGE] if any(i.accept_id_tokens for i in config.authorization.identity_providers) else []),
        "token_endpoint_auth_methods_supported": CLIENT_AUTH_METHODS,
        # RFC 8414 §2: required when private_key_jwt is listed.
        "token_endpoint_auth_signing_alg_values_supported": list(ASYMMETRIC_ALGORITHMS),
        # RFC 7009 and RFC 7662, with client authentication as at the token endpoint (RFC 8414 §2).
        "revocation_endpoint": base + REVOKE_PATH,
        "revocation_endpoint_auth_methods_supported": CLIENT_AUTH_METHODS,
        "revocation_endpoint_auth_signing_alg_values_supported": list(ASYMMETRIC_ALGORITHMS),
        "introspection_endpoint": base + INTROSPECT_PATH,
        "introspection_endpoint_auth_methods_supported": CLIENT_AUTH_METHODS,
        "introspection_endpoint_auth_signing_alg_values_supported": list(ASYMMETRIC_ALGORITHMS),
        # RFC 9449 §5.1: DPoP proofs are accepted at the token endpoint (and bind the token).
        "dpop_signing_alg_values_supported": list(dpop.ALGORITHMS),
        "code_challenge_methods_supported": ["S256"],
        "authorization_grant_profiles_supported": [ID_JAG_PROFILE],
    }


def metadata_path(issuer: str) -> str:
    """RFC 8414 §3.1: the well-known suffix inserted between the issuer's host and its path."""
    return f"/.well-known/oauth-authorization-server{urlsplit(issuer).path.rstrip('/')}"


def protected_resource_metadata(route: RouteConfig, issuer: str) -> dict[str, Any]:
    """RFC 9728 §2; zero-valued parameters are omitted (§3.2), so ``dpop_bound_access_tokens_required``
    appears only on a ``require_dpop`` route. Every route accepts DPoP-bound tokens (RFC 9449 §7)."""
    document = {
        "resource": route.resource,
        "authorization_servers": [issuer],
        "scopes_supported": list(route.scopes),
        "bearer_methods_supported": ["header"],
        "resource_name": route.name,
        "dpop_signing_alg_values_supported": list(dpop.ALGORITHMS),
    }
    if route.require_dpop:
        document["dpop_bound_access_tokens_required"] = True
    return document


def prm_url(config: GatewayConfig, route: RouteConfig) -> str:
    return config.public_url + PRM_PREFIX + route.path


def jwks_document(keys: list[SigningKey]) -> dict[str, Any]:
    return {"keys": [k.public_jwk for k in keys]}


async def authorize_refusal(request: web.Request) -> web.Response:
    """There is no browser flow: enterprise-managed clients "do not redirect the user to the MCP
    Authorization Server's authorization endpoint" (MCP EMA extension); RFC 6749 §4.1.2.1 error."""
    return web.json_response(
        {
            "error": "unsupported_response_type",
            "error_description": "this authorization server accepts only the ID-JAG jwt-bearer grant "
            "(urn:ietf:params:oauth:grant-type:jwt-bearer) at its token endpoint",
        },
        status=400,
        headers={"Cache-Control": "no-store"},
    )
