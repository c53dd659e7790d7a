"""OAuth 2.0 error responses (RFC 6749 §5.2), one class per registered error code.

Every refusal at the token endpoint is one of these; ``reason`` is a short, bounded code (never
attacker-controlled text) used for metrics and the audit trail, while ``description`` is the
human-readable ``error_description`` returned to the authenticated client.
"""

from __future__ import annotations

import json

from aiohttp import web

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class OAuthError(Exception):
    error = "invalid_request"
    status = 400

    def __init__(self, description: str, *, reason: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(description)
        self.description = description
        self.reason = reason or self.error
        self.headers = headers or {}

    def to_response(self) -> web.Response:
        body = {"error": self.error, "error_description": self.description}
        return web.Response(
            status=self.status,
            text=json.dumps(body),
            content_type="application/json",
            headers={**NO_STORE, **self.headers},
        )


class InvalidRequest(OAuthError):
    error = "invalid_request"


class MethodNotAllowed(OAuthError):
    """RFC 6749 §3.2: the client "MUST use the HTTP POST method" at the token endpoint; 405 with
    ``Allow`` (RFC 9110 §15.5.6), and the usual error body."""

    status = 405

    def __init__(self, method: str) -> None:
        super().__init__(f"{method} is not allowed: use POST", reason="method", headers={"Allow": "POST"})


class OriginRefused(OAuthError):
    """A browser ``Origin`` that is not in ``allowed_origins``: 403, as on the MCP routes (DNS
    rebinding), with the RFC 6749 §5.2 body every token endpoint answer has."""

    status = 403

    def __init__(self) -> None:
        super().__init__("this Origin is not allowed", reason="origin")


class InvalidClient(OAuthError):
    """RFC 6749 §5.2: 401, with ``WWW-Authenticate`` naming the scheme the client used (or Basic)."""

    error = "invalid_client"
    status = 401

    def __init__(self, description: str, *, reason: str | None = None) -> None:
        super().__init__(description, reason=reason, headers={"WWW-Authenticate": 'Basic realm="token"'})


class InvalidGrant(OAuthError):
    error = "invalid_grant"


class UnauthorizedClient(OAuthError):
    error = "unauthorized_client"


class UnsupportedGrantType(OAuthError):
    error = "unsupported_grant_type"


class InvalidScope(OAuthError):
    error = "invalid_scope"


class InvalidTarget(OAuthError):
    """RFC 8707 §2: the requested resource is unknown or not allowed for this grant."""

    error = "invalid_target"


class TemporarilyUnavailable(OAuthError):
    """A dependency (the IdP's keys, the replay store) cannot answer right now; 503 tells clients
    the assertion may be fine and to retry rather than give up."""

    error = "temporarily_unavailable"
    status = 503

    def __init__(self, description: str, *, reason: str | None = None) -> None:
        super().__init__(description, reason=reason, headers={"Retry-After": "5"})


class RateLimited(OAuthError):
    """EMA §7.5.1: "Token endpoints SHOULD apply rate limiting". 429 (RFC 6585 §4) with an integer
    ``Retry-After``. RFC 6749 §5.2 registers no code for it; ``temporarily_unavailable`` (RFC 6749
    §4.1.2.1) is the registered one that tells a client to come back later (``slow_down`` belongs to
    the device flow, RFC 8628 §3.5)."""

    error = "temporarily_unavailable"
    status = 429

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            f"too many token requests; retry in {retry_after} s",
            reason="rate_limited",
            headers={"Retry-After": str(retry_after)},
        )


class InvalidDpopProof(OAuthError):
    """RFC 9449 §5: the ``DPoP`` proof at the token endpoint is missing, malformed or invalid."""

    error = "invalid_dpop_proof"


class UseDpopNonce(OAuthError):
    """RFC 9449 §8: the proof lacks the server's current nonce; ``DPoP-Nonce`` carries a fresh one."""

    error = "use_dpop_nonce"

    def __init__(self, description: str, nonce: str) -> None:
        super().__init__(description, reason="dpop_nonce", headers={"DPoP-Nonce": nonce})
