"""The resource-server side: a valid gateway access token on every proxied request.

MCP authorization "Token Handling": authorization "MUST be included in every HTTP request", tokens
"MUST NOT" come in the query string, invalid or expired tokens get 401; RFC 6750 §3 defines the
challenge, and RFC 9728 §5.1 adds ``resource_metadata`` so clients discover the authorization server
from the 401 alone.
"""

from __future__ import annotations

import json

from aiohttp import web

from gateway.config import RouteConfig
from gateway.oauth.access_token import AccessTokenService, InvalidToken, Principal


class BearerChallenge(Exception):
    """A 401/400 the gateway answers itself, with its ``WWW-Authenticate`` challenge."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


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


def challenge_response(
    status: int, prm_url: str, scopes: tuple[str, ...], error: str | None, description: str
) -> web.Response:
    body = {"error": error or "unauthorized", "error_description": description}
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/json",
        headers={
            "WWW-Authenticate": challenge_header(prm_url, scopes, error, description if error else None),
            "Cache-Control": "no-store",
        },
    )


class BearerGuard:
    def __init__(self, tokens: AccessTokenService) -> None:
        self._tokens = tokens

    def authenticate(self, request: web.Request, route: RouteConfig, prm_url: str) -> Principal:
        values = request.headers.getall("Authorization", [])
        if len(values) > 1:
            raise BearerChallenge(
                challenge_response(400, prm_url, route.scopes, "invalid_request", "multiple Authorization headers")
            )
        scheme, _, token = values[0].partition(" ") if values else ("", "", "")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise BearerChallenge(challenge_response(401, prm_url, route.scopes, None, "a bearer token is required"))
        try:
            return self._tokens.verify(token, route.resource)
        except InvalidToken as exc:
            raise BearerChallenge(challenge_response(401, prm_url, route.scopes, "invalid_token", str(exc))) from None
