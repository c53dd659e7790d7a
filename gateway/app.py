"""Assembles the gateway: authorization server, resource server and proxy in one aiohttp app.

A proxied request reads top to bottom in ``Gateway.handle_route``: route lookup -> Origin check ->
bearer token -> body limit -> forward. Everything the gateway answers itself (discovery, token,
health) is registered before the catch-all route.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from gateway.bearer import BearerChallenge, BearerGuard
from gateway.config import GatewayConfig
from gateway.http import BodyTooLarge, read_limited
from gateway.oauth import metadata
from gateway.oauth.access_token import AccessTokenService
from gateway.oauth.client_auth import ClientAuthenticator
from gateway.oauth.idjag import IdJagValidator
from gateway.oauth.jwks import KeyRing
from gateway.oauth.keys import SigningKey, load_signing_key
from gateway.oauth.replay import MemoryReplayStore, ReplayStore
from gateway.oauth.token_endpoint import TokenEndpoint
from gateway.proxy.forward import ForwardRequest, Upstream, jsonrpc_error, upstream_path_remainder
from gateway.proxy.jsonrpc import parse_body, rewriter_for
from gateway.proxy.origin import OriginPolicy
from gateway.routes import RouteTable

log = logging.getLogger("gateway")

REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", object)

FORWARDED_METHODS = frozenset({"GET", "POST", "DELETE"})
INVALID_REQUEST = -32600
FORBIDDEN = -32003
_JWKS_RETRY_SECONDS = 10.0


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        signing_key: SigningKey | None = None,
        replay_store: ReplayStore | None = None,
        jwks_min_refresh_seconds: float = 30,
    ) -> None:
        self.config = config
        self._jwks_min_refresh = jwks_min_refresh_seconds
        self.routes = RouteTable(config.routes)
        self.signing_key = signing_key or load_signing_key(config.authorization.signing_key_file)
        self.replay_store = replay_store or MemoryReplayStore()
        self.tokens = AccessTokenService(
            self.signing_key, config.authorization.issuer, config.authorization.access_token_ttl_seconds
        )
        self.guard = BearerGuard(self.tokens)
        self.origins = OriginPolicy(config.allowed_origins)
        public_scheme = urlsplit(config.public_url).scheme
        self.upstreams = {r.name: Upstream(r, config.limits, public_scheme) for r in config.routes}
        self.keys: KeyRing | None = None
        self.token_endpoint: TokenEndpoint | None = None
        self._idp_session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # -- lifecycle -------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._request_id_and_errors], client_max_size=1024**2)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        self._add_routes(app)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._idp_session = aiohttp.ClientSession(headers={"User-Agent": "mcp-auth-gateway"})
        self.keys = KeyRing(
            self.config.authorization.identity_providers,
            self._idp_session,
            min_refresh_seconds=self._jwks_min_refresh,
        )
        validator = IdJagValidator(self.config.authorization, self.routes, self.keys, self.replay_store)
        self.token_endpoint = TokenEndpoint(
            ClientAuthenticator(self.config.authorization.clients), validator, self.tokens
        )
        await self.keys.prefetch()
        if not self.keys.ready:
            self._spawn(self._retry_jwks())

    async def _retry_jwks(self) -> None:
        """Keep trying IdPs whose keys could not be fetched at startup, so /readyz turns green."""
        assert self.keys is not None
        while not self.keys.ready:
            await asyncio.sleep(_JWKS_RETRY_SECONDS)
            await asyncio.gather(*(s.refresh() for s in self.keys.sets.values() if not s.has_keys))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _on_cleanup(self, app: web.Application) -> None:
        for task in list(self._background):
            task.cancel()
        for upstream in self.upstreams.values():
            await upstream.close()
        if self._idp_session is not None:
            await self._idp_session.close()

    def _add_routes(self, app: web.Application) -> None:
        router = app.router
        router.add_get("/healthz", self.healthz)
        router.add_get("/readyz", self.readyz)
        as_metadata = self.authorization_server_metadata
        for path in metadata.metadata_paths(self.config.authorization.issuer):
            router.add_get(path, as_metadata)
            router.add_route("OPTIONS", path, self.discovery_preflight)
        router.add_get(metadata.PRM_PREFIX + "{tail:(/.*)?}", self.protected_resource_metadata)
        router.add_route("OPTIONS", metadata.PRM_PREFIX + "{tail:(/.*)?}", self.discovery_preflight)
        router.add_get(metadata.JWKS_PATH, self.jwks)
        router.add_get(metadata.AUTHORIZE_PATH, metadata.authorize_refusal)
        router.add_post(metadata.TOKEN_PATH, self.token)
        router.add_route("*", "/{tail:.*}", self.handle_route)

    @web.middleware
    async def _request_id_and_errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every response carries X-Request-Id; no exception ever reaches a client as a traceback."""
        request_id = uuid.uuid4().hex
        request[REQUEST_ID] = request_id
        started = time.monotonic()
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = _plain_error(exc.status, exc.reason)
        except asyncio.CancelledError:
            log.info(
                "%s %s cancelled by client after %.3fs",
                request.method,
                request.path,
                time.monotonic() - started,
            )
            raise
        except Exception:
            log.exception("unhandled error on %s %s (request %s)", request.method, request.path, request_id)
            response = _plain_error(500, "internal error")
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
        log.info(
            "%s %s -> %d in %.3fs (request %s)",
            request.method,
            request.path,
            response.status,
            time.monotonic() - started,
            request_id,
        )
        return response

    # -- endpoints the gateway answers itself ----------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready once config is loaded and every trusted IdP's keys were fetched at least once."""
        if self.keys is None or not self.keys.ready:
            missing = [i for i, s in (self.keys.sets.items() if self.keys else []) if not s.has_keys]
            return web.json_response({"status": "not ready", "idp_keys_missing": missing}, status=503)
        return web.json_response({"status": "ready"})

    async def authorization_server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(metadata.authorization_server_metadata(self.config), headers=metadata.DISCOVERY_CORS)

    async def protected_resource_metadata(self, request: web.Request) -> web.Response:
        """RFC 9728 §3.1 path insertion: /.well-known/oauth-protected-resource<route path>. Paths
        under a route (e.g. a legacy ``/sse`` endpoint) resolve to that route's document; the root
        document exists only when there is a single route."""
        tail = request.match_info["tail"]
        match = self.routes.match_path(tail) if tail else None
        if match is None and not tail and len(self.routes) == 1:
            route = next(iter(self.routes))
        elif match is not None:
            route = match[0]
        else:
            return web.json_response({"error": "not_found"}, status=404, headers=metadata.DISCOVERY_CORS)
        document = metadata.protected_resource_metadata(route, self.config.authorization.issuer)
        return web.json_response(document, headers=metadata.DISCOVERY_CORS)

    async def discovery_preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=metadata.DISCOVERY_CORS)

    async def jwks(self, request: web.Request) -> web.Response:
        return web.json_response(
            metadata.jwks_document([self.signing_key]), headers={"Cache-Control": "public, max-age=300"}
        )

    async def token(self, request: web.Request) -> web.Response:
        assert self.token_endpoint is not None
        origin = request.headers.get("Origin")
        if not self.origins.is_allowed(origin):
            return _plain_error(403, "origin not allowed")
        return await self.token_endpoint.handle(request)

    # -- the proxied path --------------------------------------------------------------------

    async def handle_route(self, request: web.Request) -> web.StreamResponse:
        match = self.routes.match_path(request.path)
        rest = upstream_path_remainder(request.rel_url.raw_path, match[0].path) if match else None
        if match is None or rest is None:
            return _plain_error(404, "no route for this path")
        route = match[0]
        origin = request.headers.get("Origin")
        if not self.origins.is_allowed(origin):
            return jsonrpc_error(403, FORBIDDEN, "Origin not allowed")
        cors = self.origins.cors_headers(origin)
        if request.method == "OPTIONS" and origin is not None:
            return web.Response(status=204, headers=self.origins.preflight_headers(origin))
        if request.method not in FORWARDED_METHODS:
            return jsonrpc_error(405, INVALID_REQUEST, "method not allowed", Allow="GET, POST, DELETE", **cors)
        prm_url = metadata.prm_url(self.config, route)
        try:
            principal = self.guard.authenticate(request, route, prm_url)
        except BearerChallenge as challenge:
            challenge.response.headers.update(cors)
            return challenge.response
        body: bytes | None = None
        if request.method == "POST":
            try:
                body = await read_limited(request, self.config.limits.max_request_bytes)
            except BodyTooLarge:
                return jsonrpc_error(413, INVALID_REQUEST, "request body too large", **cors)
        messages = parse_body(body) if body else None
        request_id = next((m.id for m in messages or () if m.is_request), None)
        request[PRINCIPAL] = principal
        fwd = ForwardRequest(
            route=route,
            rest=rest,
            body=body,
            rewriter=rewriter_for(messages),
            request_id=request_id,
            extra_headers=(*cors.items(), ("X-Request-Id", request[REQUEST_ID])),
        )
        response = await self.upstreams[route.name].forward(request, fwd)
        if not response.prepared:
            response.headers.update(cors)
        return response


def _plain_error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=json.dumps({"error": message}), content_type="application/json")


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before building the config, so a port-0 (ephemeral) gateway knows its own public URL."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def start_gateway(
    gateway: Gateway, *, sock: socket.socket | None = None, shutdown_timeout: float = 10.0
) -> tuple[web.AppRunner, str]:
    """Start serving on ``sock`` (or bind ``listen`` from the config); returns the runner and base URL."""
    if sock is None:
        sock = bind_socket(gateway.config.listen_host, gateway.config.listen_port)
    runner = web.AppRunner(
        gateway.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    await web.SockSite(runner, sock).start()
    host, port = sock.getsockname()[:2]
    return runner, f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
