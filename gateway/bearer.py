"""The resource-server side: a valid gateway access token on every proxied request.

MCP authorization "Token Handling": authorization "MUST be included in every HTTP request", tokens
"MUST NOT" come in the query string, invalid or expired tokens get 401; RFC 6750 §3 defines the
challenge, and RFC 9728 §5.1 adds ``resource_metadata`` so clients discover the authorization server
from the 401 alone.
"""

from __future__ import annotations

from gateway.config import RouteConfig
from gateway.oauth.access_token import AccessTokenService, InvalidToken, Principal


class BearerChallenge(Exception):
    """A 401/400 the gateway answers itself, with its ``WWW-Authenticate`` challenge (RFC 6750 §3.1
    error codes; ``error`` None when the request simply carried no token, §3)."""

    def __init__(self, status: int, error: str | None, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def challenge_header(
    prm_url: str, scopes: tuple[str, ...], error: str | None = None, description: str | None = None
) -> str:
    params = []
    if error:
        params.append(f"error={_quote(error)}")
    if description:
        params.append(f"error_description={_quote(description)}")
    params.append(f"resource_metadata={_quote(prm_url)}")
    if scopes:
        params.append(f"scope={_quote(' '.join(scopes))}")
    return "Bearer " + ", ".join(params)


def challenge_body(error: str | None, description: str) -> dict[str, str]:
    return {"error": error or "unauthorized", "error_description": description}


def challenge_headers(prm_url: str, scopes: tuple[str, ...], error: str | None, description: str) -> dict[str, str]:
    return {
        "WWW-Authenticate": challenge_header(prm_url, scopes, error, description if error else None),
        "Cache-Control": "no-store",
    }


class BearerGuard:
    def __init__(self, tokens: AccessTokenService) -> None:
        self._tokens = tokens

    def authenticate(self, authorization: list[str], route: RouteConfig) -> Principal:
        """``authorization``: every Authorization header value of the request."""
        values = authorization
        if len(values) > 1:
            raise BearerChallenge(400, "invalid_request", "multiple Authorization headers")
        scheme, _, token = values[0].partition(" ") if values else ("", "", "")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise BearerChallenge(401, None, "a bearer token is required")
        try:
            return self._tokens.verify(token, route.resource)
        except InvalidToken as exc:
            raise BearerChallenge(401, "invalid_token", str(exc)) from None
