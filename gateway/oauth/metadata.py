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
from gateway.oauth.keys import SigningKey
from gateway.oauth.token_endpoint import JWT_BEARER, TOKEN_EXCHANGE

ID_JAG_PROFILE = "urn:ietf:params:oauth:grant-profile:id-jag"
TOKEN_PATH = "/oauth2/token"
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
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic", "client_secret_post"],
        # RFC 8414 §2: required when private_key_jwt is listed.
        "token_endpoint_auth_signing_alg_values_supported": list(ASYMMETRIC_ALGORITHMS),
        "code_challenge_methods_supported": ["S256"],
        "authorization_grant_profiles_supported": [ID_JAG_PROFILE],
    }


def metadata_path(issuer: str) -> str:
    """RFC 8414 §3.1: the well-known suffix inserted between the issuer's host and its path."""
    return f"/.well-known/oauth-authorization-server{urlsplit(issuer).path.rstrip('/')}"


def protected_resource_metadata(route: RouteConfig, issuer: str) -> dict[str, Any]:
    """RFC 9728 §2; zero-valued parameters are omitted (§3.2)."""
    return {
        "resource": route.resource,
        "authorization_servers": [issuer],
        "scopes_supported": list(route.scopes),
        "bearer_methods_supported": ["header"],
        "resource_name": route.name,
    }


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
