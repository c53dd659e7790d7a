"""The resource-server side: a valid gateway access token on every proxied request.

MCP authorization "Token Handling": authorization "MUST be included in every HTTP request", tokens
"MUST NOT" come in the query string, invalid or expired tokens get 401; RFC 6750 §3 defines the
challenge, and RFC 9728 §5.1 adds ``resource_metadata`` so clients discover the authorization server
from the 401 alone.

DPoP (RFC 9449 §7): a DPoP-bound token (``cnf.jkt``) comes as ``Authorization: DPoP <token>`` with a
``DPoP`` proof signed by the bound key for this request; it is never accepted as a bearer token
(§7.2: that would make the binding pointless). A ``require_dpop`` route accepts nothing else. DPoP
refusals use the ``DPoP`` challenge scheme with ``algs`` (§7.1) and, for ``use_dpop_nonce``, a
``DPoP-Nonce`` header (§9).
"""

from __future__ import annotations

import hmac

from aiohttp import web

from gateway.config import RouteConfig
from gateway.oauth.access_token import AccessTokenService, InvalidToken, Principal
from gateway.oauth.dpop import ALGORITHMS, DpopVerifier, ProofError


class BearerChallenge(Exception):
    """A 401/400 the gateway answers itself, with its ``WWW-Authenticate`` challenge (RFC 6750 §3.1
    error codes; ``error`` None when the request simply carried no token, §3). ``dpop``: challenge
    with the DPoP scheme (RFC 9449 §7.1); ``nonce``: a fresh ``DPoP-Nonce`` to send (§9); ``reason``:
    the audit reason, when more precise than the error."""

    def __init__(
        self,
        status: int,
        error: str | None,
        description: str,
        *,
        dpop: bool = False,
        nonce: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(description)
        self.reason = reason
        self.status = status
        self.error = error
        self.description = description
        self.dpop = dpop
        self.nonce = nonce


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def challenge_header(
    prm_url: str,
    scopes: tuple[str, ...],
    error: str | None = None,
    description: str | None = None,
    *,
    dpop: bool = False,
) -> str:
    params = []
    if error:
        params.append(f"error={_quote(error)}")
    if description:
        params.append(f"error_description={_quote(description)}")
    params.append(f"resource_metadata={_quote(prm_url)}")
    if scopes:
        params.append(f"scope={_quote(' '.join(scopes))}")
    if dpop:
        params.append(f"algs={_quote(' '.join(ALGORITHMS))}")
    return ("DPoP " if dpop else "Bearer ") + ", ".join(params)


def challenge_body(error: str | None, description: str) -> dict[str, str]:
    return {"error": error or "unauthorized", "error_description": description}


def challenge_headers(
    prm_url: str,
    scopes: tuple[str, ...],
    error: str | None,
    description: str,
    *,
    dpop: bool = False,
    nonce: str | None = None,
) -> dict[str, str]:
    headers = {
        "WWW-Authenticate": challenge_header(prm_url, scopes, error, description if error else None, dpop=dpop),
        "Cache-Control": "no-store",
    }
    if nonce is not None:
        headers["DPoP-Nonce"] = nonce
    return headers


class BearerGuard:
    def __init__(self, tokens: AccessTokenService, dpop: DpopVerifier, public_url: str) -> None:
        self._tokens = tokens
        self._dpop = dpop
        self._public_url = public_url

    async def authenticate(self, request: web.Request, route: RouteConfig) -> Principal:
        values = request.headers.getall("Authorization", [])
        if len(values) > 1:
            raise BearerChallenge(400, "invalid_request", "multiple Authorization headers", dpop=route.require_dpop)
        scheme, _, token = values[0].partition(" ") if values else ("", "", "")
        scheme, token = scheme.lower(), token.strip()
        if scheme == "dpop" and token:
            return await self._dpop_bound(request, token, route)
        if scheme != "bearer" or not token:
            required = "a DPoP-bound access token" if route.require_dpop else "a bearer token"
            raise BearerChallenge(401, None, f"{required} is required", dpop=route.require_dpop)
        if route.require_dpop:
            raise BearerChallenge(
                401, "invalid_token", "this resource requires a DPoP-bound access token and a DPoP proof", dpop=True
            )
        principal = self._verify(token, route, dpop=False)
        if principal.jkt is not None:
            raise BearerChallenge(
                401, "invalid_token", "a DPoP-bound token must be sent as Authorization: DPoP with a proof", dpop=True
            )
        return principal

    async def _dpop_bound(self, request: web.Request, token: str, route: RouteConfig) -> Principal:
        """RFC 9449 §7.1: a valid token bound to a key, and a valid proof by that key for this request,
        its URL as the client addressed it (``public_url`` + path, not the internal address)."""
        principal = self._verify(token, route, dpop=True)
        if principal.jkt is None:
            raise BearerChallenge(401, "invalid_token", "the access token is not DPoP-bound", dpop=True)
        url = self._public_url + request.rel_url.raw_path
        try:
            jkt = await self._dpop.verify(
                request.headers.getall("DPoP", []), method=request.method, url=url, access_token=token
            )
        except ProofError as exc:
            error = "use_dpop_nonce" if exc.nonce is not None else "invalid_dpop_proof"
            raise BearerChallenge(401, error, exc.description, dpop=True, nonce=exc.nonce, reason="dpop") from None
        if not hmac.compare_digest(jkt.encode(), principal.jkt.encode()):
            raise BearerChallenge(
                401,
                "invalid_dpop_proof",
                "the DPoP proof is not signed by the key the token is bound to",
                dpop=True,
                reason="dpop",
            )
        return principal

    def _verify(self, token: str, route: RouteConfig, *, dpop: bool) -> Principal:
        try:
            return self._tokens.verify(token, route.resource)
        except InvalidToken as exc:
            raise BearerChallenge(401, "invalid_token", str(exc), dpop=dpop or route.require_dpop) from None
