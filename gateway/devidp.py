"""Development identity provider (enterprise IdP) for demos and tests — NOT FOR PRODUCTION.

.. warning::
   **NOT FOR PRODUCTION.** This module ships hard-coded users and passwords, a resource-owner *password*
   grant (removed from OAuth 2.1 precisely because it exposes user credentials to clients), an in-memory
   signing key that changes on every start, plain-HTTP loopback issuers and no rate limiting. It exists so
   that ``mcp-gateway demo``, ``mcp-gateway dev-idp`` and the test suite can exercise the *real* protocol
   with *real* signed JWTs without an external IdP. Point a production gateway at your enterprise IdP.

Which role this plays: the "IdP Authorization Server" of SEP-990 / Enterprise-Managed Authorization
([EMA] §2; draft-ietf-oauth-identity-assertion-authz-grant "Roles"). It implements the two IdP legs of the
flow the EMA extension describes:

* **Leg 1 (SSO)** — stood in for by ``grant_type=password`` (RFC 6749 §4.3), which returns an OpenID Connect
  ID Token whose ``aud`` is the authenticated IdP client, exactly what a browser login would produce. There
  is deliberately no interactive ``/authorize`` login.
* **Leg 2 (Token Exchange)** — RFC 8693 token exchange of that ID Token for an Identity Assertion JWT
  Authorization Grant (ID-JAG), following the draft's "Token Exchange", "Processing Rules" and "Response"
  sections and the claim set of its "Identity Assertion JWT Authorization Grant" section.
* **Chained exchange** — a gateway presents an ID-JAG issued to it as the ``subject_token`` and gets one for
  an upstream authorization server (draft-parecki-oauth-identity-assertion-gateways, "Chained Identity
  Assertion Request"), with the ``act`` claim naming the gateway and, nested, the original client.

Discovery is published both as OpenID Connect Discovery 1.0 and RFC 8414 metadata because MCP clients may
use either ([AUTHZ26] "MCP authorization servers MUST provide at least one of ...").

All JWS work (signing and verification) is done by python-jose; key generation by ``cryptography``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jwt
from jose.utils import base64url_encode

__all__ = [
    "DEFAULT_CLIENTS",
    "DEFAULT_USERS",
    "GRANT_TYPE_PASSWORD",
    "GRANT_TYPE_TOKEN_EXCHANGE",
    "ID_JAG_JWT_TYPE",
    "TOKEN_TYPE_ID_JAG",
    "TOKEN_TYPE_ID_TOKEN",
    "DevClient",
    "DevIdentityProvider",
    "DevUser",
]

logger = logging.getLogger(__name__)

GRANT_TYPE_PASSWORD = "password"
GRANT_TYPE_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_ID_JAG = "urn:ietf:params:oauth:token-type:id-jag"
TOKEN_TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
#: JWT ``typ`` header of an ID-JAG (draft "Identity Assertion JWT Authorization Grant"; RFC 8725 §3.11).
ID_JAG_JWT_TYPE = "oauth-id-jag+jwt"
#: ``typ`` of the ID Tokens we issue; keeps them distinguishable from ID-JAGs (RFC 8725 §3.11).
ID_TOKEN_JWT_TYPE = "JWT"

SUPPORTED_ALGORITHMS: tuple[str, ...] = ("ES256", "RS256")
#: Token requests are a handful of short parameters plus one JWT; anything larger is abuse.
MAX_REQUEST_BODY_BYTES = 64 * 1024
#: Bound on form fields so a pathological body cannot make parsing expensive.
_MAX_FORM_FIELDS = 64
_FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN_RE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")
# RFC 6749 §2.3.1 / RFC 7617: the Basic realm we advertise on 401 responses.
_BASIC_CHALLENGE = 'Basic realm="dev-idp", charset="UTF-8"'
# Token responses MUST NOT be cached (RFC 6749 §5.1, RFC 8693 §2.2.1).
_NO_STORE_HEADERS = {"Cache-Control": "no-store", "Pragma": "no-cache"}


@dataclass(frozen=True)
class DevUser:
    """A hard-coded end user of the development IdP.

    ``sub`` defaults to ``username``: the draft says ``sub`` "should be an opaque ID", but readable subjects
    make demo logs and gateway policies (which key on ``iss`` + ``sub``, RFC 7519 §4.1.2) easy to follow.
    """

    username: str
    password: str
    groups: tuple[str, ...] = ()
    email: str | None = None
    sub: str | None = None

    @property
    def subject(self) -> str:
        """The ``sub`` claim used in both ID Tokens and ID-JAGs (the draft requires them to agree)."""
        return self.sub if self.sub is not None else self.username


@dataclass(frozen=True)
class DevClient:
    """A confidential client registered at the development IdP.

    ``resource_client_id`` models the draft's "Cross-Domain Client ID Handling": the client's id at the
    *Resource* Authorization Server may differ from its id at the IdP, and the IdP must put the former into
    the ID-JAG ``client_id`` claim so the Resource AS can match it against its own client authentication.
    """

    client_id: str
    client_secret: str
    resource_client_id: str | None = None
    # A gateway (draft-parecki-oauth-identity-assertion-gateways): the issuers of the authorization servers
    # it operates (an ID-JAG addressed to one of them may be chained), and the upstream authorization
    # servers it may obtain chained ID-JAGs for (the IdP administrator's policy).
    gateway_issuers: tuple[str, ...] = ()
    gateway_audiences: tuple[str, ...] = ()

    @property
    def id_jag_client_id(self) -> str:
        """Value of the ``client_id`` claim in ID-JAGs issued to this client."""
        return self.resource_client_id if self.resource_client_id is not None else self.client_id


DEFAULT_USERS: tuple[DevUser, ...] = (
    DevUser("alice", "alice-password", groups=("engineering", "support"), email="alice@example.com"),
    DevUser("bob", "bob-password", groups=("support",), email="bob@example.com"),
    DevUser("carol", "carol-password", groups=("contractors",), email="carol@example.com"),
)

DEFAULT_CLIENTS: tuple[DevClient, ...] = (DevClient("demo-agent", "demo-agent-secret"),)


class _OAuthError(Exception):
    """An RFC 6749 §5.2 error response, raised inside handlers and rendered by ``_error_response``."""

    def __init__(self, error: str, description: str, *, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status


def _invalid_client(description: str) -> _OAuthError:
    """RFC 6749 §5.2 ``invalid_client``.

    Always 401: the RFC requires 401 + ``WWW-Authenticate`` when the client used the Authorization header,
    and allows it otherwise; RFC 9110 §15.5.2 requires ``WWW-Authenticate`` on every 401, so one shape
    (401 + Basic challenge) is both correct and simplest for clients to handle.
    """
    return _OAuthError("invalid_client", description, status=401)


def _error_response(err: _OAuthError) -> web.Response:
    """Render an OAuth error as JSON (RFC 6749 §5.2) with ``no-store`` caching."""
    headers = dict(_NO_STORE_HEADERS)
    if err.status == 401:
        headers["WWW-Authenticate"] = _BASIC_CHALLENGE
    return web.json_response(
        {"error": err.error, "error_description": err.description}, status=err.status, headers=headers
    )


def _jwk_thumbprint(public_jwk: Mapping[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url) — a stable, collision-resistant ``kid``.

    §3.2: only the required members, lexicographically ordered, no whitespace.
    """
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}[public_jwk["kty"]]
    canonical = json.dumps({k: public_jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return base64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest()).decode("ascii")


def _is_absolute_uri_without_fragment(value: str) -> bool:
    """RFC 8707 §2: a ``resource`` MUST be an absolute URI and MUST NOT include a fragment."""
    try:
        parsed = urllib.parse.urlsplit(value)
    except ValueError:
        return False
    return bool(parsed.scheme) and bool(parsed.netloc or parsed.path) and "#" not in value


class DevIdentityProvider:
    """A self-contained enterprise IdP for demos and tests — NOT FOR PRODUCTION (see module docstring).

    It is both an in-process token factory (``issue_id_token``, ``issue_id_jag``, ``sign``) and, once
    ``start()``-ed, a real loopback HTTP server with discovery, JWKS and a token endpoint, so tests exercise
    the same network paths (JWKS fetch, token exchange) as a deployment against a real IdP.
    """

    def __init__(
        self,
        *,
        issuer: str | None = None,
        algorithm: str = "ES256",
        users: Iterable[DevUser] = DEFAULT_USERS,
        clients: Iterable[DevClient] = DEFAULT_CLIENTS,
        id_jag_ttl_seconds: int = 300,
        id_token_ttl_seconds: int = 600,
        allowed_audiences: Iterable[str] | None = None,
    ) -> None:
        if algorithm not in SUPPORTED_ALGORITHMS:
            raise ValueError(f"algorithm must be one of {SUPPORTED_ALGORITHMS}, got {algorithm!r}")
        if id_jag_ttl_seconds <= 0 or id_token_ttl_seconds <= 0:
            raise ValueError("token lifetimes must be positive")
        if issuer is not None and (not issuer or "?" in issuer or "#" in issuer):
            # RFC 8414 §2: the issuer is a URL "that has no query or fragment components".
            raise ValueError(f"invalid issuer {issuer!r}")

        self._issuer = issuer
        self._algorithm = algorithm
        self._id_jag_ttl = id_jag_ttl_seconds
        self._id_token_ttl = id_token_ttl_seconds
        self._allowed_audiences = frozenset(allowed_audiences) if allowed_audiences is not None else None

        self._users_by_name: dict[str, DevUser] = {}
        self._users_by_sub: dict[str, DevUser] = {}
        for user in users:
            if user.username in self._users_by_name or user.subject in self._users_by_sub:
                raise ValueError(f"duplicate dev user {user.username!r}")
            self._users_by_name[user.username] = user
            self._users_by_sub[user.subject] = user
        self._clients: dict[str, DevClient] = {}
        for client in clients:
            if client.client_id in self._clients:
                raise ValueError(f"duplicate dev client {client.client_id!r}")
            self._clients[client.client_id] = client

        # A fresh key per instance: nothing signed by a previous run (or another test's IdP) verifies.
        if algorithm == "ES256":
            private_key: Any = ec.generate_private_key(ec.SECP256R1())
        else:
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._signing_key = jwk.construct(private_key, algorithm)
        public = self._signing_key.public_key().to_dict()
        self._kid = _jwk_thumbprint(public)
        self._public_jwk: dict[str, Any] = {**public, "kid": self._kid, "alg": algorithm, "use": "sig"}

        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ properties

    @property
    def issuer(self) -> str:
        """The issuer identifier (RFC 8414 §2); ``http://<host>:<port>`` after ``start()`` if not given."""
        if self._issuer is None:
            raise RuntimeError("issuer is not known until start() has bound a port")
        return self._issuer

    @property
    def token_endpoint(self) -> str:
        """Token endpoint URL (issuer + ``/token``)."""
        return self._endpoint("/token")

    @property
    def jwks_uri(self) -> str:
        """JWKS URL (issuer + ``/jwks``)."""
        return self._endpoint("/jwks")

    @property
    def kid(self) -> str:
        """Key id of the signing key: its RFC 7638 thumbprint."""
        return self._kid

    @property
    def algorithm(self) -> str:
        """JWS ``alg`` of every token this IdP signs."""
        return self._algorithm

    def _endpoint(self, path: str) -> str:
        return self.issuer.rstrip("/") + path

    # ------------------------------------------------------------------ tokens

    def public_jwks(self) -> dict[str, Any]:
        """The JWK Set published at ``jwks_uri`` — public members only (RFC 7517 §5)."""
        return {"keys": [dict(self._public_jwk)]}

    def sign(
        self,
        claims: Mapping[str, Any],
        *,
        typ: str | None = ID_JAG_JWT_TYPE,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """Sign *arbitrary* claims with the IdP's real key and return a JWS compact serialization.

        Tests use this to mint deliberately invalid ID-JAGs (wrong ``typ``, expired, missing ``jti`` …) that
        are nevertheless correctly signed, so the gateway's *claim* checks are exercised rather than its
        signature check. ``typ=None`` omits the ``typ`` header entirely (RFC 8725 §3.11 makes its absence a
        distinct failure mode). ``headers`` override or add header parameters; an overridden ``alg`` is
        written as given but the signature is always made with the key's real algorithm, which is useful to
        test that a verifier rejects a header that lies about its algorithm.

        python-jose's ``jws.sign`` always injects ``typ: JWT``, so the header is serialized here (RFC 7515
        §7.1 compact serialization) and the signature itself is computed by python-jose's key object.
        """
        header: dict[str, Any] = {"alg": self._algorithm, "kid": self._kid}
        if typ is not None:
            header["typ"] = typ
        if headers:
            header.update(headers)
        signing_input = b".".join(
            (
                base64url_encode(json.dumps(header, separators=(",", ":")).encode("utf-8")),
                base64url_encode(json.dumps(dict(claims), separators=(",", ":")).encode("utf-8")),
            )
        )
        signature = base64url_encode(self._signing_key.sign(signing_input))
        return (signing_input + b"." + signature).decode("ascii")

    def _user(self, username: str) -> DevUser:
        try:
            return self._users_by_name[username]
        except KeyError:
            raise KeyError(f"unknown dev user {username!r}") from None

    def issue_id_token(self, username: str, client_id: str) -> str:
        """Issue an OpenID Connect ID Token (OIDC Core §2) for ``username`` with ``aud`` = ``client_id``.

        ``client_id`` is not checked against the registered clients so tests can mint ID Tokens for *other*
        clients and check that token exchange enforces the draft's audience rule ("Processing Rules").
        """
        user = self._user(username)
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": user.subject,
            "aud": client_id,
            "iat": now,
            "exp": now + self._id_token_ttl,
            "auth_time": now,
            "jti": secrets.token_urlsafe(16),
            "preferred_username": user.username,
            "groups": list(user.groups),
        }
        if user.email is not None:
            claims["email"] = user.email
        return self.sign(claims, typ=ID_TOKEN_JWT_TYPE)

    def issue_id_jag(
        self,
        *,
        username: str,
        audience: str,
        client_id: str,
        resource: str | list[str] | None = None,
        scope: str | None = None,
        ttl_seconds: int | None = None,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        """Issue an ID-JAG (draft-ietf-oauth-identity-assertion-authz-grant, its claim set).

        ``client_id`` is the *claim* value, i.e. the client's id at the Resource Authorization Server.
        ``extra_claims`` are applied last and may override standard claims (tests use this for ``cnf``,
        ``tenant``, or a deliberately wrong ``iss``). ``groups`` is always present (possibly empty) so
        group-based gateway policies never have to guess; ``email`` is included when known, as the draft's
        implementation notes recommend for account linking.
        """
        user = self._user(username)
        now = int(time.time())
        ttl = self._id_jag_ttl if ttl_seconds is None else ttl_seconds
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": user.subject,
            "aud": audience,
            "client_id": client_id,
            "jti": secrets.token_urlsafe(16),
            "iat": now,
            "exp": now + ttl,
            "auth_time": now,
            "groups": list(user.groups),
        }
        if resource is not None:
            claims["resource"] = list(resource) if isinstance(resource, list) else resource
        if scope is not None:
            claims["scope"] = scope
        if user.email is not None:
            claims["email"] = user.email
        if extra_claims:
            claims.update(extra_claims)
        return self.sign(claims, typ=ID_JAG_JWT_TYPE)

    # ------------------------------------------------------------------ HTTP app

    def make_app(self) -> web.Application:
        """Build the aiohttp application (discovery, JWKS, token endpoint).

        If the issuer is already known and has a path, routes are mounted under it, and the RFC 8414 §3.1
        metadata URL inserts the well-known segment *before* that path while OIDC Discovery §4 appends it.
        """
        app = web.Application(client_max_size=MAX_REQUEST_BODY_BYTES, middlewares=[self._middleware])
        prefix = urllib.parse.urlsplit(self._issuer).path.rstrip("/") if self._issuer else ""
        app.router.add_get(f"{prefix}/.well-known/openid-configuration", self._handle_metadata)
        app.router.add_get(f"/.well-known/oauth-authorization-server{prefix}", self._handle_metadata)
        app.router.add_get(f"{prefix}/jwks", self._handle_jwks)
        app.router.add_post(f"{prefix}/token", self._handle_token)
        app.router.add_route("*", f"{prefix}/authorize", self._handle_authorize)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Bind and serve; returns the issuer. ``port=0`` picks an ephemeral port (tests, demo)."""
        if self._runner is not None:
            raise RuntimeError("DevIdentityProvider is already started")
        # aiohttp's default access log prints the request line including the query string, where a
        # misbehaving client could put a token; our middleware logs a token-free line instead.
        runner = web.AppRunner(self.make_app(), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if self._issuer is None:
            bound_port = runner.addresses[0][1]
            # An unspecified bind address is not a usable URL host; the loopback address is.
            url_host = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
            if ":" in url_host:
                url_host = f"[{url_host}]"
            self._issuer = f"http://{url_host}:{bound_port}"
        logger.warning(
            "DEVELOPMENT IDENTITY PROVIDER — NOT FOR PRODUCTION: hard-coded users/passwords, password grant, "
            "ephemeral keys. issuer=%s alg=%s kid=%s",
            self._issuer,
            self._algorithm,
            self._kid,
        )
        return self._issuer

    async def stop(self) -> None:
        """Stop serving (idempotent). The issuer stays set so already-issued tokens keep their meaning."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """JSON errors for everything and a token-free request log ([EMA] §7.4.2: never log ID-JAGs).

        Only method, path (no query string) and status are logged here; the token handler adds grant
        type, client id, subject, audience and ``jti`` — never a token, secret, password or header value.
        """
        try:
            response = await handler(request)
        except _OAuthError as err:
            response = _error_response(err)
        except web.HTTPRequestEntityTooLarge:
            response = _error_response(_OAuthError("invalid_request", "request body too large", status=413))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _error_response(_OAuthError("invalid_request", exc.reason, status=exc.status))
        except Exception:
            # Never leak a traceback to the caller; the log gets the stack (no token values are in it,
            # since tokens are only ever held in local variables, not exception messages we build).
            logger.exception("dev-idp: unexpected error handling %s %s", request.method, request.rel_url.raw_path)
            response = _error_response(_OAuthError("server_error", "internal error", status=500))
        # The raw (still percent-encoded) path cannot carry control characters to forge log lines.
        logger.info("dev-idp %s %s -> %d", request.method, request.rel_url.raw_path, response.status)
        return response

    async def _handle_metadata(self, request: web.Request) -> web.Response:
        """OIDC Discovery 1.0 §3 / RFC 8414 §2 metadata (one document serves both).

        The TypeScript MCP SDK's OIDC schema requires ``jwks_uri``, ``subject_types_supported`` and
        ``id_token_signing_alg_values_supported``; both SDKs require ``authorization_endpoint`` and
        ``response_types_supported``. ``["code"]`` is what the enterprise IdPs this stands in for
        advertise (and what SDK validators expect); ``/authorize`` itself only answers with an error.
        ``identity_chaining_requested_token_types_supported`` advertises ID-JAG support as the draft's
        "Authorization Server (IdP) Metadata" section recommends.
        """
        return web.json_response(
            {
                "issuer": self.issuer,
                "authorization_endpoint": self._endpoint("/authorize"),
                "token_endpoint": self.token_endpoint,
                "jwks_uri": self.jwks_uri,
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": [self._algorithm],
                "grant_types_supported": [GRANT_TYPE_PASSWORD, GRANT_TYPE_TOKEN_EXCHANGE],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
                "scopes_supported": ["openid", "email", "groups"],
                "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "email", "groups"],
                "identity_chaining_requested_token_types_supported": [TOKEN_TYPE_ID_JAG],
            }
        )

    async def _handle_jwks(self, request: web.Request) -> web.Response:
        """Publish the verification key (RFC 7517 §5)."""
        return web.json_response(self.public_jwks())

    async def _handle_authorize(self, request: web.Request) -> web.Response:
        """No interactive login here: callers must use the password grant (dev) at the token endpoint."""
        raise _OAuthError(
            "unsupported_response_type",
            "the development IdP has no browser login; use grant_type=password at the token endpoint",
        )

    # ------------------------------------------------------------------ token endpoint

    async def _handle_token(self, request: web.Request) -> web.Response:
        """RFC 6749 §3.2 token endpoint: form parsing, client authentication, then grant dispatch."""
        form = await self._read_form(request)
        client = self._authenticate_client(request, form)
        grant_type = form.get("grant_type")
        try:
            if grant_type is None:
                raise _OAuthError("invalid_request", "missing grant_type")
            if grant_type == GRANT_TYPE_PASSWORD:
                body = self._password_grant(client, form)
            elif grant_type == GRANT_TYPE_TOKEN_EXCHANGE:
                body = self._token_exchange(client, form)
            else:
                raise _OAuthError("unsupported_grant_type", "supported: password, token-exchange")
        except _OAuthError as err:
            # grant_type is client-chosen text: log it with %r so it cannot forge log lines.
            logger.info(
                "dev-idp token request rejected: client_id=%s grant_type=%r error=%s",
                client.client_id,
                grant_type,
                err.error,
            )
            raise
        return web.json_response(body, headers=_NO_STORE_HEADERS)

    @staticmethod
    async def _read_form(request: web.Request) -> dict[str, str]:
        """Parse an ``application/x-www-form-urlencoded`` body strictly.

        RFC 6749 §3.2 mandates this content type, says parameters without a value are treated as omitted,
        and that parameters "MUST NOT be included more than once" — so duplicates are
        ``invalid_request`` rather than "last one wins", which would let an attacker smuggle values past a
        proxy that looks at the first one.
        """
        if request.content_type != _FORM_CONTENT_TYPE:
            raise _OAuthError("invalid_request", f"content type must be {_FORM_CONTENT_TYPE}")
        raw = await request.read()  # aiohttp enforces client_max_size here (-> 413)
        try:
            pairs = urllib.parse.parse_qsl(
                raw.decode("utf-8"),
                keep_blank_values=True,
                errors="strict",
                max_num_fields=_MAX_FORM_FIELDS,
            )
        except (UnicodeDecodeError, ValueError):
            raise _OAuthError("invalid_request", "malformed form body") from None
        form: dict[str, str] = {}
        seen: set[str] = set()
        for name, value in pairs:
            if name in seen:
                raise _OAuthError("invalid_request", f"parameter {name!r} repeated")
            seen.add(name)
            if value != "":
                form[name] = value
        return form

    def _authenticate_client(self, request: web.Request, form: dict[str, str]) -> DevClient:
        """Authenticate the client with ``client_secret_basic`` or ``client_secret_post`` (RFC 6749 §2.3.1).

        Client authentication is mandatory: [EMA] §7.7 — without it "a compromised subject token" could be
        exchanged by anyone. Using both methods at once is rejected (§2.3: "MUST NOT use more than one
        authentication method in each request"). Secrets are compared in constant time, and an unknown
        client costs the same comparison as a known one, so timing reveals neither.
        """
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            if "client_secret" in form:
                raise _OAuthError("invalid_request", "use exactly one client authentication method")
            scheme, _, credentials = authorization.partition(" ")
            if scheme.lower() != "basic":
                raise _invalid_client("unsupported client authentication scheme")
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
            except (binascii.Error, ValueError):
                raise _invalid_client("malformed Basic credentials") from None
            raw_id, sep, raw_secret = decoded.partition(":")
            if not sep:
                raise _invalid_client("malformed Basic credentials")
            # §2.3.1: id and secret are form-urlencoded before Basic encoding.
            client_id = urllib.parse.unquote_plus(raw_id)
            secret = urllib.parse.unquote_plus(raw_secret)
            if "client_id" in form and form["client_id"] != client_id:
                raise _OAuthError("invalid_request", "client_id parameter does not match Basic credentials")
        elif "client_secret" in form and "client_id" in form:
            client_id, secret = form["client_id"], form["client_secret"]
        else:
            raise _invalid_client("client authentication required")

        client = self._clients.get(client_id)
        expected = client.client_secret if client is not None else secrets.token_urlsafe(24)
        if not hmac.compare_digest(secret.encode("utf-8"), expected.encode("utf-8")) or client is None:
            raise _invalid_client("client authentication failed")
        return client

    def _password_grant(self, client: DevClient, form: dict[str, str]) -> dict[str, Any]:
        """RFC 6749 §4.3 (dev only): stands in for SSO and returns an ID Token with ``aud`` = this client.

        ``access_token`` is a random opaque value accepted nowhere (RFC 6749 §5.1 makes the member
        REQUIRED; this IdP protects no resources). The ID Token is the useful output.
        """
        username, password = form.get("username"), form.get("password")
        if username is None or password is None:
            raise _OAuthError("invalid_request", "username and password are required")
        user = self._users_by_name.get(username)
        expected = user.password if user is not None else secrets.token_urlsafe(24)
        if not hmac.compare_digest(password.encode("utf-8"), expected.encode("utf-8")) or user is None:
            raise _OAuthError("invalid_grant", "invalid username or password")
        id_token = self.issue_id_token(user.username, client.client_id)
        logger.info("dev-idp issued ID Token: client_id=%s sub=%s", client.client_id, user.subject)
        return {
            "id_token": id_token,
            "access_token": secrets.token_urlsafe(32),
            "token_type": "Bearer",
            "expires_in": self._id_token_ttl,
            "scope": "openid",
        }

    def _token_exchange(self, client: DevClient, form: dict[str, str]) -> dict[str, Any]:
        """RFC 8693 §2.1 token exchange of an ID Token for an ID-JAG (draft "Token Exchange").

        Error codes: malformed/unsupported request shapes are ``invalid_request`` (RFC 8693 §2.2.2); an
        unacceptable subject token is ``invalid_grant``, as in the draft's error example ("Audience
        validation failed"); an unacceptable ``audience``/``resource`` is ``invalid_target`` (RFC 8693
        §2.2.2, RFC 8707 §2).
        """
        requested = form.get("requested_token_type")
        if requested != TOKEN_TYPE_ID_JAG:
            raise _OAuthError("invalid_request", f"requested_token_type must be {TOKEN_TYPE_ID_JAG}")
        subject_token = form.get("subject_token")
        if subject_token is None:
            raise _OAuthError("invalid_request", "missing subject_token")
        subject_token_type = form.get("subject_token_type")
        if subject_token_type not in (TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_ID_JAG):
            raise _OAuthError(
                "invalid_request", f"subject_token_type must be {TOKEN_TYPE_ID_TOKEN} or {TOKEN_TYPE_ID_JAG}"
            )
        if "actor_token" in form or "actor_token_type" in form:
            # The draft: actor_token/actor_token_type "are not used in this specification".
            raise _OAuthError("invalid_request", "actor tokens are not supported")
        if "authorization_details" in form:
            raise _OAuthError("invalid_request", "authorization_details is not supported by the dev IdP")

        audience = form.get("audience")
        if audience is None:
            raise _OAuthError("invalid_request", "missing audience")
        if audience == self.issuer:
            # Draft "Cross-Domain Use": the IdP must not be the consumer of its own ID-JAGs.
            raise _OAuthError("invalid_target", "audience must be another authorization server")
        if self._allowed_audiences is not None and audience not in self._allowed_audiences:
            raise _OAuthError("invalid_target", "audience is not an allowed authorization server")

        resource = form.get("resource")
        if resource is not None and not _is_absolute_uri_without_fragment(resource):
            raise _OAuthError("invalid_target", "resource must be an absolute URI without a fragment")

        scope = form.get("scope")
        if scope is not None and not all(_SCOPE_TOKEN_RE.match(tok) for tok in scope.split(" ")):
            raise _OAuthError("invalid_scope", "malformed scope")

        if subject_token_type == TOKEN_TYPE_ID_JAG:
            user, ttl, act = self._verify_chained_subject(subject_token, client, audience)
        else:
            user, ttl, act = self._verify_subject_token(subject_token, client), None, None
        id_jag = self.issue_id_jag(
            username=user.username,
            audience=audience,
            client_id=client.id_jag_client_id,
            resource=resource,
            scope=scope,
            ttl_seconds=ttl,
            extra_claims={"act": act} if act is not None else None,
        )
        # Log identifiers only; the jti lets an operator correlate with the gateway's replay cache.
        logger.info(
            "dev-idp issued ID-JAG: client_id=%s sub=%s aud=%r jti=%s",
            client.client_id,
            user.subject,
            audience,
            jwt.get_unverified_claims(id_jag)["jti"],
        )
        body: dict[str, Any] = {
            "issued_token_type": TOKEN_TYPE_ID_JAG,
            "access_token": id_jag,
            "token_type": "N_A",
            "expires_in": ttl if ttl is not None else self._id_jag_ttl,
        }
        if scope is not None:
            body["scope"] = scope
        return body

    def _verify_chained_subject(
        self, token: str, client: DevClient, audience: str
    ) -> tuple[DevUser, int, dict[str, Any]]:
        """The checks of the gateways draft's "Identity Provider Processing" for an ID-JAG presented as the
        subject token; returns its user, the lifetime left to it (a chained ID-JAG never outlives the one
        it came from) and the ``act`` claim (RFC 8693 §4.1): the gateway, and within it the original client.

        The subject ID-JAG is not single use here: the draft lets a gateway present it again, for other
        audiences, within its validity."""
        try:
            header = jwt.get_unverified_header(token)
            if str(header.get("typ", "")).lower() != ID_JAG_JWT_TYPE:
                raise ValueError("subject token is not an ID-JAG")
            claims = jwt.decode(
                token,
                self._public_jwk,
                algorithms=[self._algorithm],
                issuer=self.issuer,
                options={"verify_aud": False, "require_exp": True, "require_sub": True, "leeway": 0},
            )
        except Exception:
            raise _OAuthError("invalid_grant", "subject token is not a valid, unexpired ID-JAG of this IdP") from None
        # Step 3: issued to an authorization server this client operates, never to anyone else.
        if claims.get("aud") not in client.gateway_issuers:
            raise _OAuthError(
                "invalid_grant", "the subject ID-JAG was not issued to this client's authorization server"
            )
        # Step 6 (chain depth): one gateway hop only.
        if "act" in claims:
            raise _OAuthError("invalid_grant", "the subject ID-JAG is already chained")
        # Steps 4 and 5: policy, and no chaining to the gateway itself. One error for both, so the answer
        # does not enumerate audiences.
        if audience not in client.gateway_audiences or audience in client.gateway_issuers:
            raise _OAuthError("invalid_target", "this client may not obtain ID-JAGs for that audience")
        user = self._users_by_sub.get(claims["sub"]) if isinstance(claims["sub"], str) else None
        if user is None:
            raise _OAuthError("invalid_grant", "subject is not a known user")
        remaining = int(claims["exp"]) - int(time.time())
        if remaining <= 0:
            raise _OAuthError("invalid_grant", "subject token has expired")
        act: dict[str, Any] = {"sub": client.client_id}
        if isinstance(claims.get("client_id"), str):
            act["act"] = {"sub": claims["client_id"]}
        return user, min(self._id_jag_ttl, remaining), act

    def _verify_subject_token(self, token: str, client: DevClient) -> DevUser:
        """Validate the subject ID Token (draft "Processing Rules") and return its user.

        Checks: our signature and algorithm only (no ``alg`` from the token is trusted), ``iss`` is us,
        ``exp``/``iat``/``sub``/``aud`` present and ``exp`` not passed, ``typ`` is not an ID-JAG's (so an
        ID-JAG cannot be re-exchanged, RFC 8725 §3.11), and ``aud`` is exactly the authenticated
        ``client_id`` — the draft: the IdP "MUST validate that the audience of the Subject Token ...
        matches the client_id of the client authentication of the request".
        """
        try:
            header = jwt.get_unverified_header(token)
            typ = header.get("typ")
            if typ is not None and str(typ).lower() != ID_TOKEN_JWT_TYPE.lower():
                raise ValueError("subject token is not an ID Token")
            claims = jwt.decode(
                token,
                self._public_jwk,
                algorithms=[self._algorithm],
                audience=client.client_id,
                issuer=self.issuer,
                options={
                    "require_aud": True,
                    "require_exp": True,
                    "require_iat": True,
                    "require_iss": True,
                    "require_sub": True,
                    "leeway": 0,
                },
            )
        except Exception:
            # Any failure to parse or validate attacker-supplied input (python-jose can raise JOSEError,
            # but also TypeError/ValueError on odd claim types) is an invalid grant, never a 500.
            raise _OAuthError(
                "invalid_grant", "subject token is invalid, expired or not issued to this client"
            ) from None
        aud = claims["aud"]
        if aud != client.client_id and aud != [client.client_id]:
            raise _OAuthError("invalid_grant", "subject token audience does not match the authenticated client")
        user = self._users_by_sub.get(claims["sub"]) if isinstance(claims["sub"], str) else None
        if user is None:
            raise _OAuthError("invalid_grant", "subject is not a known user")
        return user
