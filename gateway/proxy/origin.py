"""Origin validation (MCP Streamable HTTP "Security Warning"; 2025-11-25 transports §2.0.1).

"Servers MUST validate the Origin header on all incoming connections to prevent DNS rebinding
attacks. If the Origin header is present and invalid, servers MUST respond with HTTP 403 Forbidden."
Requests without ``Origin`` (non-browser clients) pass; browsers always send it cross-origin.
"""

from __future__ import annotations

from gateway.urls import origin_of

# DPoP and DPoP-Nonce: RFC 9449 proofs and server nonces (gateway/oauth/dpop.py) from browser clients.
CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, Accept, MCP-Protocol-Version, Mcp-Session-Id, Last-Event-ID, Mcp-Method, Mcp-Name, "
    "DPoP"
)
CORS_EXPOSE_HEADERS = "Mcp-Session-Id, MCP-Protocol-Version, WWW-Authenticate, X-Request-Id, DPoP-Nonce"


class OriginPolicy:
    def __init__(self, allowed: tuple[str, ...]) -> None:
        self._allowed = frozenset(allowed)

    def is_allowed(self, origin: str | None) -> bool:
        if origin is None:
            return True
        if origin == "null":
            return False
        try:
            return origin_of(origin) in self._allowed
        except ValueError:
            return False

    def cors_headers(self, origin: str | None) -> dict[str, str]:
        if origin is None or not self.is_allowed(origin):
            return {}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": CORS_EXPOSE_HEADERS,
            "Vary": "Origin",
        }

    def preflight_headers(self, origin: str) -> dict[str, str]:
        return {
            **self.cors_headers(origin),
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
            "Access-Control-Max-Age": "600",
        }
