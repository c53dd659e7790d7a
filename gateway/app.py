"""Assembles the gateway: authorization server, resource server and proxy in one aiohttp app.

A proxied request reads top to bottom in ``Gateway.handle_route``: route lookup -> Origin check ->
bearer token (and revocation) -> body limit -> runtime policy and scopes -> session binding ->
forward -> audit. Everything the gateway answers itself (discovery, token, health) is registered
before the catch-all route. All config-derived state lives in one ``Runtime`` that reloads swap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import socket
import time
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.audit import AuditLog, elapsed_ms
from gateway.bearer import BearerChallenge, BearerGuard, challenge_response
from gateway.config import ConfigError, GatewayConfig, RouteConfig, load_config
from gateway.enforce import HEADER_MISMATCH, Plan, plan_request, stream_plan
from gateway.http import BodyTooLarge, BodyTooSlow, read_limited
from gateway.listener import ConnectionCounter, GuardedSite
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import NO_ROUTE, Metrics, method_class
from gateway.oauth import metadata
from gateway.oauth.access_token import AccessTokenService, Principal
from gateway.oauth.errors import MethodNotAllowed, OriginRefused
from gateway.oauth.jwks import KeyRing
from gateway.oauth.keys import SigningKey, SigningKeyError
from gateway.oauth.replay import ReplayStore, open_replay_store
from gateway.oauth.token_endpoint import GrantOutcome
from gateway.proxy.forward import (
    ForwardRequest,
    LegacyStream,
    StreamLimitReached,
    jsonrpc_error,
    session_param_names,
    upstream_path_remainder,
    wrap_session_params,
)
from gateway.proxy.headers import SESSION_HEADER
from gateway.proxy.jsonrpc import ResultRewriter
from gateway.proxy.request_body import PARSE_ERROR, BodyRefused, check_encoding, read_rpc_body
from gateway.routes import RouteTable
from gateway.runtime import ReloadRefused, Runtime
from gateway.sessions import SessionCheck, principal_key

log = logging.getLogger("gateway")

REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", object)
METHOD_CLASS = web.RequestKey("method_class", str)

FORWARDED_METHODS = frozenset({"GET", "POST", "DELETE"})
INVALID_REQUEST = -32600
FORBIDDEN = -32003
SESSION_NOT_FOUND = -32001
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that closed the connection before the answer
_JWKS_RETRY_SECONDS = 10.0
_CALL_EVENTS = {
    "tools": ("tool.called", "tool.denied"),
    "resources": ("resource.accessed", "resource.denied"),
    "prompts": ("prompt.got", "prompt.denied"),
}


class _Refusal(Exception):
    """A request the gateway answers itself, with the audit reason to record."""

    def __init__(self, response: web.Response, reason: str, event: str = "request.denied") -> None:
        super().__init__(reason)
        self.response = response
        self.reason = reason
        self.event = event


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        signing_key: SigningKey | None = None,
        replay_store: ReplayStore | None = None,
        jwks_min_refresh_seconds: float = 30,
        config_path: str | None = None,
    ) -> None:
        # The gateway closes only a store it opened itself (tests and embedders may share theirs).
        self._owns_replay_store = replay_store is None
        self.replay_store = replay_store if replay_store is not None else open_replay_store(config.replay_store)
        self.audit = AuditLog(config.audit_sink)
        self.config_path = config_path
        self._jwks_min_refresh = jwks_min_refresh_seconds
        self._idp_session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._config_digest: bytes | None = None
        self.draining = False
        self._retrying_jwks = False
        # Legacy HTTP+SSE: upstream session id -> the rewriter of its live GET stream. Weak values:
        # an entry disappears with its stream.
        self._legacy_streams: weakref.WeakValueDictionary[str, LegacyStream] = weakref.WeakValueDictionary()
        self.metrics = Metrics(lambda: dict(self.runtime.keys.sets))
        self._metrics_runner: web.AppRunner | None = None
        self.runtime = Runtime.build(
            config,
            replay_store=self.replay_store,
            idp_session=self.idp_session,
            on_grant=self._audit_grant,
            jwks_min_refresh_seconds=jwks_min_refresh_seconds,
            metrics=self.metrics,
            signing_key=signing_key,
        )

    # Convenience views of the current runtime (tests, benchmarks, the demo).
    @property
    def config(self) -> GatewayConfig:
        return self.runtime.config

    @property
    def routes(self) -> RouteTable:
        return self.runtime.routes

    @property
    def tokens(self) -> AccessTokenService:
        return self.runtime.tokens

    @property
    def guard(self) -> BearerGuard:
        return self.runtime.guard

    @property
    def keys(self) -> KeyRing:
        return self.runtime.keys

    @property
    def signing_key(self) -> SigningKey:
        return self.runtime.signing_key

    def idp_session(self) -> aiohttp.ClientSession:
        if self._idp_session is None or self._idp_session.closed:
            self._idp_session = aiohttp.ClientSession(headers={"User-Agent": "mcp-auth-gateway"})
        return self._idp_session

    # -- lifecycle -------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._request_id_and_errors], client_max_size=1024**2)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        self._add_routes(app)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        await self.audit.start()
        if self.config.metrics_listen is not None:
            # A separate port that carries no auth and is not exposed publicly (scraped in-cluster).
            metrics_app = web.Application()
            metrics_app.router.add_get("/metrics", self.metrics_endpoint)
            self._metrics_runner = web.AppRunner(metrics_app, access_log=None)
            await self._metrics_runner.setup()
            host, port = self.config.metrics_listen
            await web.TCPSite(self._metrics_runner, host, port).start()
        await self.runtime.keys.prefetch()
        if not self.runtime.keys.ready:
            self._spawn(self._retry_jwks())
        if self.config_path and self.config.reload_watch_seconds > 0:
            self._config_digest = await asyncio.to_thread(_digest, self.config_path)
            self._spawn(self._watch_config())

    async def _retry_jwks(self) -> None:
        """Keep trying IdPs whose keys could not be fetched (at startup or after a reload added
        them), so /readyz turns green without waiting for a token request that an unready pod
        behind a load balancer would never get."""
        self._retrying_jwks = True
        try:
            while not self.runtime.keys.ready:
                await asyncio.sleep(_JWKS_RETRY_SECONDS)
                keys = self.runtime.keys
                await asyncio.gather(*(s.refresh(force=True) for s in keys.sets.values() if not s.has_keys))
        finally:
            self._retrying_jwks = False

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def drain(self) -> int:
        """Start a graceful shutdown: /readyz turns 503 and listening (GET) event streams are ended
        cleanly, so clients reconnect elsewhere; requests in flight, including POSTs answered with
        an event stream (a tool call's result), get the grace period to finish. Returns the streams
        ended."""
        self.draining = True
        return sum(upstream.end_streams(listening_only=True) for upstream in self.runtime.upstreams.values())

    async def _on_shutdown(self, app: web.Application) -> None:
        self.drain()

    async def _on_cleanup(self, app: web.Application) -> None:
        for task in list(self._background):
            task.cancel()
        for upstream in self.runtime.upstreams.values():
            await upstream.close()
        if self._idp_session is not None:
            await self._idp_session.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self._owns_replay_store:
            await self.replay_store.close()
        await self.audit.close()

    # -- reload ----------------------------------------------------------------------------

    async def reload(self, config: GatewayConfig | None = None) -> bool:
        """Validate, then swap atomically. On any problem the running config stays and the
        problem is logged; returns whether the new config is now active."""
        try:
            if config is None:
                if not self.config_path:
                    raise ReloadRefused("no config file to reload from")
                config = await asyncio.to_thread(load_config, self.config_path)
            new = Runtime.build(
                config,
                replay_store=self.replay_store,
                idp_session=self.idp_session,
                on_grant=self._audit_grant,
                jwks_min_refresh_seconds=self._jwks_min_refresh,
                metrics=self.metrics,
                previous=self.runtime,
            )
        except (ConfigError, SigningKeyError, ReloadRefused) as exc:
            self.metrics.reloads.labels("failure").inc()
            log.error("config reload refused, keeping the running config: %s", exc)
            self.audit.emit("config.reload", decision="deny", reason=str(exc))
            return False
        old, self.runtime = self.runtime, new
        for upstream in old.retired_upstreams(new):
            self._spawn(upstream.retire())  # ends its streams now, closes once its requests finish
        await new.keys.prefetch_missing()
        if not new.keys.ready and not self._retrying_jwks:
            self._spawn(self._retry_jwks())
        self.metrics.reloads.labels("success").inc()
        log.info("config reloaded: %d routes", len(new.config.routes))
        self.audit.emit("config.reload", decision="allow", reason=f"{len(new.config.routes)} routes")
        return True

    async def _watch_config(self) -> None:
        """Kubernetes updates a mounted ConfigMap by swapping a symlink: poll the content."""
        assert self.config_path is not None
        while True:
            await asyncio.sleep(self.config.reload_watch_seconds)
            digest = await asyncio.to_thread(_digest, self.config_path)
            if digest is not None and digest != self._config_digest:
                self._config_digest = digest
                await self.reload()

    def _add_routes(self, app: web.Application) -> None:
        router = app.router
        router.add_get("/healthz", self.healthz)
        router.add_get("/readyz", self.readyz)
        as_metadata_path = metadata.metadata_path(self.config.authorization.issuer)
        router.add_get(as_metadata_path, self.authorization_server_metadata)
        router.add_route("OPTIONS", as_metadata_path, self.discovery_preflight)
        router.add_get(metadata.PRM_PREFIX + "{tail:(/.*)?}", self.protected_resource_metadata)
        router.add_route("OPTIONS", metadata.PRM_PREFIX + "{tail:(/.*)?}", self.discovery_preflight)
        router.add_get(metadata.JWKS_PATH, self.jwks)
        router.add_get(metadata.AUTHORIZE_PATH, metadata.authorize_refusal)
        router.add_route("*", metadata.TOKEN_PATH, self.token)
        if self.config.metrics_listen is None:
            router.add_get("/metrics", self.metrics_endpoint)
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
            log.info("%s %s cancelled by client after %.3fs", request.method, request.path, time.monotonic() - started)
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
        """Ready once config is loaded and every trusted IdP's keys were fetched at least once;
        not ready while draining, so load balancers stop sending new requests."""
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        keys = self.runtime.keys
        if not keys.ready:
            missing = [issuer for issuer, s in keys.sets.items() if not s.has_keys]
            return web.json_response({"status": "not ready", "idp_keys_missing": missing}, status=503)
        return web.json_response({"status": "ready"})

    async def authorization_server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(metadata.authorization_server_metadata(self.config), headers=metadata.DISCOVERY_CORS)

    async def protected_resource_metadata(self, request: web.Request) -> web.Response:
        """RFC 9728 §3.1 path insertion: /.well-known/oauth-protected-resource<route path>. Paths
        under a route (e.g. a legacy ``/sse`` endpoint) resolve to that route's document; the root
        document exists only when there is a single route."""
        runtime = self.runtime
        tail = request.match_info["tail"]
        match = runtime.routes.match_path(tail) if tail else None
        if match is None and not tail and len(runtime.routes) == 1:
            route = next(iter(runtime.routes))
        elif match is not None:
            route = match[0]
        else:
            return web.json_response({"error": "not_found"}, status=404, headers=metadata.DISCOVERY_CORS)
        document = metadata.protected_resource_metadata(route, runtime.config.authorization.issuer)
        return web.json_response(document, headers=metadata.DISCOVERY_CORS)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        self.metrics.audit_dropped.set(self.audit.dropped)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def discovery_preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=metadata.DISCOVERY_CORS)

    async def jwks(self, request: web.Request) -> web.Response:
        keys = self.runtime.tokens.trusted_keys()
        return web.json_response(metadata.jwks_document(keys), headers={"Cache-Control": "public, max-age=300"})

    async def token(self, request: web.Request) -> web.Response:
        """Every answer, refusals before the endpoint proper included, is RFC 6749 §5.2 JSON with
        ``Cache-Control: no-store``."""
        runtime = self.runtime
        if request.method != "POST":
            return MethodNotAllowed(request.method).to_response()
        if not runtime.origins.is_allowed(request.headers.get("Origin")):
            return OriginRefused().to_response()
        return await runtime.token_endpoint.handle(request)

    def _audit_grant(self, outcome: GrantOutcome) -> None:
        grant = outcome.grant
        if grant is not None:
            self.metrics.grants.labels("issued", "ok").inc()
            self.audit.emit(
                "token.issued",
                route=grant.route.name,
                sub=grant.subject,
                client_id=grant.client_id,
                idp=grant.idp_issuer,
                groups=grant.groups,
                decision="allow",
                reason="scope " + " ".join(grant.scopes),
            )
        elif outcome.error is not None:
            self.metrics.grants.labels(outcome.error.error, outcome.error.reason).inc()
            self.audit.emit(
                "token.denied",
                client_id=outcome.client_id,
                decision="deny",
                reason=f"{outcome.error.error}:{outcome.error.reason}",
                status=outcome.error.status,
            )

    # -- the proxied path --------------------------------------------------------------------

    async def handle_route(self, request: web.Request) -> web.StreamResponse:
        runtime = self.runtime  # one consistent config for the whole request, even across a reload
        started = time.monotonic()
        match = runtime.routes.match_path(request.path)
        rest = upstream_path_remainder(request.rel_url.raw_path, match[0].path) if match else None
        if match is None or rest is None:
            self.metrics.requests.labels(NO_ROUTE, "other", "404").inc()
            return _plain_error(404, "no route for this path")
        route = match[0]
        request[METHOD_CLASS] = method_class(request.method, None)
        in_flight = self.metrics.in_flight.labels(route.name)
        in_flight.inc()
        status = 500
        try:
            response = await self._handle_route(runtime, request, route, rest, started)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = CLIENT_CLOSED_REQUEST  # the client went away (how MCP clients cancel): not a 5xx
            raise
        finally:
            in_flight.dec()
            self.metrics.requests.labels(route.name, request[METHOD_CLASS], str(status)).inc()
            self.metrics.request_duration.labels(route.name).observe(time.monotonic() - started)

    async def _handle_route(
        self, runtime: Runtime, request: web.Request, route: RouteConfig, rest: str, started: float
    ) -> web.StreamResponse:
        request_id = request[REQUEST_ID]
        origin = request.headers.get("Origin")
        if not runtime.origins.is_allowed(origin):
            self.audit.emit("request.denied", request_id=request_id, route=route.name, decision="deny", reason="origin")
            return jsonrpc_error(403, FORBIDDEN, "Origin not allowed")
        cors = runtime.origins.cors_headers(origin)
        if request.method == "OPTIONS" and origin is not None:
            return web.Response(status=204, headers=runtime.origins.preflight_headers(origin))
        if request.method not in FORWARDED_METHODS:
            return jsonrpc_error(405, INVALID_REQUEST, "method not allowed", Allow="GET, POST, DELETE", **cors)
        principal: Principal | None = None
        try:
            principal = self._authenticate(runtime, request, route)
            request[PRINCIPAL] = principal
            body = await self._read_body(runtime, request)
            plan = self._plan(runtime, request, route, principal, body)
            fwd = self._forward_request(runtime, request, route, rest, principal, body, plan, cors)
        except _Refusal as refusal:
            refusal.response.headers.update(cors)
            self.audit.emit(
                refusal.event,
                request_id=request_id,
                **_who(principal),
                route=route.name,
                method=request.method,
                decision="deny",
                reason=refusal.reason,
                status=refusal.response.status,
            )
            return refusal.response
        # Audited the moment the decision is made: a call whose stream never ends, or that the client
        # cancels, is in the trail all the same; how the request ended follows in ``request.completed``.
        self._audit_decisions(plan, request_id, route, principal, request.method)
        status = CLIENT_CLOSED_REQUEST
        try:
            response = await self._answer(runtime, request, route, principal, plan, fwd, cors)
            status = response.status
            return response
        finally:
            self.audit.emit(
                "request.completed",
                request_id=request_id,
                route=route.name,
                **_who(principal),
                method=request.method,
                status=status,
                latency_ms=elapsed_ms(started),
            )

    async def _answer(
        self,
        runtime: Runtime,
        request: web.Request,
        route: RouteConfig,
        principal: Principal,
        plan: Plan,
        fwd: ForwardRequest | None,
        cors: dict[str, str],
    ) -> web.StreamResponse:
        request_id = request[REQUEST_ID]
        if fwd is not None and fwd.legacy_stream is not None and plan.local_responses:
            # Legacy HTTP+SSE: the client expects every response on its GET stream, so the gateway's
            # own answers (denied calls) go there too; the POST gets the usual 202.
            for message in plan.local_responses:
                await fwd.legacy_stream.send(message)
            if plan.forward_body is None:
                return web.Response(status=202, headers={**cors, "X-Request-Id": request_id})
            fwd = dataclasses.replace(fwd, injected=())
        if fwd is None:  # every message was answered by the gateway (denied calls)
            single = plan.local_responses[0] if not plan.batch else plan.local_responses
            return web.json_response(single, headers={**cors, "X-Request-Id": request_id})
        try:
            response = await runtime.upstreams[route.name].forward(request, fwd)
        except StreamLimitReached as refused:
            refused.response.headers.update(cors)
            self.audit.emit(
                "request.denied", request_id=request_id, **_who(principal), route=route.name, method=request.method,
                decision="deny", reason="stream_limit", status=refused.response.status,
            )  # fmt: skip
            return refused.response
        if not response.prepared:
            response.headers.update(cors)
        return response

    def _authenticate(self, runtime: Runtime, request: web.Request, route: RouteConfig) -> Principal:
        prm_url = metadata.prm_url(runtime.config, route)
        try:
            principal = runtime.guard.authenticate(request, route, prm_url)
        except BearerChallenge as challenge:
            reason = "no_token" if "error=" not in challenge.response.headers.get("WWW-Authenticate", "") else "token"
            raise _Refusal(challenge.response, reason) from None
        if runtime.is_revoked(principal.identity, principal.client_id):
            response = challenge_response(401, prm_url, route.scopes, "invalid_token", "access has been revoked")
            raise _Refusal(response, "revoked")
        return principal

    async def _read_body(self, runtime: Runtime, request: web.Request) -> bytes | None:
        if request.method != "POST":
            return None
        try:
            check_encoding(request.headers.get("Content-Type"), request.headers.getall("Content-Encoding", []))
        except BodyRefused as refused:
            raise _Refusal(jsonrpc_error(refused.status, refused.code, refused.message), "malformed_body") from None
        limits = runtime.config.limits
        try:
            return await read_limited(request, limits.max_request_bytes, limits.request_body_timeout_seconds)
        except BodyTooLarge:
            raise _Refusal(jsonrpc_error(413, INVALID_REQUEST, "request body too large"), "body_too_large") from None
        except BodyTooSlow:
            raise _Refusal(jsonrpc_error(408, INVALID_REQUEST, "request body too slow"), "body_too_slow") from None
        except aiohttp.ContentEncodingError:
            # The one layer the server undoes was not what it claimed (corrupt gzip, say).
            response = jsonrpc_error(400, PARSE_ERROR, "Parse error: the body could not be decoded")
            raise _Refusal(response, "malformed_body") from None

    def _plan(
        self, runtime: Runtime, request: web.Request, route: RouteConfig, principal: Principal, body: bytes | None
    ) -> Plan:
        groups = frozenset(principal.groups)
        if body is None:  # GET (a listening stream) and DELETE carry no messages; their results are filtered
            return stream_plan(route.policy, groups)
        try:
            rpc = read_rpc_body(body)
        except BodyRefused as refused:
            response = jsonrpc_error(refused.status, refused.code, refused.message, refused.request_id)
            raise _Refusal(response, "malformed_body") from None
        request[METHOD_CLASS] = method_class(request.method, [m.method for m in rpc.messages])
        plan = plan_request(
            rpc,
            request.headers,
            route.policy,
            groups,
            principal.scopes,
            route_name=route.name,
            digest_arguments=runtime.argument_digest,
        )
        if plan.mismatch:
            response = jsonrpc_error(400, HEADER_MISMATCH, plan.mismatch, plan.request_id)
            raise _Refusal(response, "header_mismatch")
        if plan.missing_scopes:
            # RFC 6750 §3.1 + MCP "Scope Challenge Handling": one challenge naming every scope needed,
            # so SDK clients can step up (re-run the grant with the union of scopes).
            needed = tuple(dict.fromkeys((*principal.scopes, *plan.missing_scopes)))
            response = challenge_response(
                403,
                metadata.prm_url(runtime.config, route),
                needed,
                "insufficient_scope",
                f"this request needs scope {' '.join(plan.missing_scopes)}",
            )
            raise _Refusal(response, "insufficient_scope:" + " ".join(plan.missing_scopes))
        return plan

    def _forward_request(
        self,
        runtime: Runtime,
        request: web.Request,
        route: RouteConfig,
        rest: str,
        principal: Principal,
        body: bytes | None,
        plan: Plan,
        cors: dict[str, str],
    ) -> ForwardRequest | None:
        owner = principal_key(principal.idp_issuer, principal.subject, principal.client_id)
        binder = runtime.sessions
        upstream_session = None
        presented = request.headers.get(SESSION_HEADER)
        if presented is not None:
            upstream_session = self._check_session(binder, route, owner, presented)
        query = None
        rewriter = plan.rewriter
        wrap = functools.partial(binder.wrap, route.name, owner)
        raw_query = request.rel_url.raw_query_string
        legacy: LegacyStream | None = None
        if route.transport == "sse":
            rewriter, wrap, query, legacy = self._legacy_session(binder, route, owner, raw_query, plan, request.method)
        if request.method == "POST" and plan.forward_body is None and legacy is None:
            return None
        return ForwardRequest(
            route=route,
            rest=rest,
            body=plan.forward_body,
            rewriter=rewriter,
            request_id=plan.request_id,
            extra_headers=(*cors.items(), ("X-Request-Id", request[REQUEST_ID])),
            injected=tuple(plan.local_responses),
            upstream_session_id=upstream_session,
            query=query,
            wrap_session=wrap,
            legacy_stream=legacy,
            owner=owner,
        )

    def _legacy_session(
        self, binder: Any, route: RouteConfig, owner: str, raw_query: str, plan: Plan, method: str
    ) -> tuple[ResultRewriter, Callable[[str], str], str | None, LegacyStream | None]:
        """HTTP+SSE (2024-11-05) answers POSTed requests on the long-lived GET stream, not in the POST
        response. So the GET stream owns the rewriter (list filtering, capability advertisement), and
        each POST of that session hands its expectations to it, found by the upstream session id."""
        if method == "GET":
            stream = LegacyStream(plan.rewriter)

            def wrap_and_register(upstream_id: str) -> str:
                self._legacy_streams[upstream_id] = stream
                return binder.wrap(route.name, owner, upstream_id)

            return stream.rewriter, wrap_and_register, None, stream
        if len(session_param_names(raw_query)) > 1:
            # Which copy an upstream reads (first, last, joined) is its own choice; we check only one.
            response = jsonrpc_error(400, INVALID_REQUEST, "the session id parameter must not be repeated")
            raise _Refusal(response, "repeated_session_parameter")
        seen: list[str] = []

        def check(presented: str) -> str:
            upstream_id = self._check_session(binder, route, owner, presented)
            seen.append(upstream_id)
            return upstream_id

        query = wrap_session_params(raw_query, check) if raw_query else None
        found = next((s for s in map(self._legacy_streams.get, seen) if s is not None), None)
        if found is not None:
            found.rewriter.absorb(plan.rewriter)
        return plan.rewriter, functools.partial(binder.wrap, route.name, owner), query, found

    def _check_session(self, binder: Any, route: RouteConfig, owner: str, presented: str) -> str:
        status, upstream_id = binder.unwrap(route.name, owner, presented)
        if status is SessionCheck.OK:
            assert upstream_id is not None
            return upstream_id
        if status is SessionCheck.FOREIGN:
            # Session theft across principals: refused and audited (SPEC §5.1, MCP session hijacking).
            response = jsonrpc_error(403, FORBIDDEN, "this session belongs to another user or client")
            raise _Refusal(response, "session belongs to another principal", event="session.mismatch")
        # Unknown (or from before a key change): 404 makes MCP clients start a new session.
        raise _Refusal(jsonrpc_error(404, SESSION_NOT_FOUND, "session not found"), "unknown session")

    def _audit_decisions(
        self, plan: Plan, request_id: str, route: RouteConfig, principal: Principal | None, method: str
    ) -> None:
        who = _who(principal)
        if not plan.calls:
            self.audit.emit(
                "request.allowed", request_id=request_id, route=route.name, **who, method=method, decision="allow"
            )
            return
        for call in plan.calls:
            if call.kind is not None:
                decision = "allow" if call.allowed else "deny"
                self.metrics.policy_decisions.labels(route.name, call.kind, decision).inc()
            allowed_event, denied_event = _CALL_EVENTS.get(call.kind or "", ("request.allowed", "request.denied"))
            self.audit.emit(
                allowed_event if call.allowed else denied_event,
                request_id=request_id,
                route=route.name,
                **who,
                method=call.method,
                target=call.target,
                decision="allow" if call.allowed else "deny",
                reason=call.reason,
                args_sha256=call.args_sha256,
            )


def _who(principal: Principal | None) -> dict[str, Any]:
    if principal is None:
        return {}
    return {
        "sub": principal.subject,
        "client_id": principal.client_id,
        "idp": principal.idp_issuer,
        "groups": principal.groups,
    }


def _digest(path: str) -> bytes | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).digest()
    except OSError:
        return None


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
    """Start serving on ``sock`` (or bind ``listen`` from the config); returns the runner and base URL.
    Client connections are guarded (gateway/listener.py): request-header deadline, connection cap."""
    if sock is None:
        sock = bind_socket(gateway.config.listen_host, gateway.config.listen_port)
    runner = web.AppRunner(
        gateway.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    await GuardedSite(runner, sock, ConnectionCounter(lambda: gateway.config.limits)).start()
    host, port = sock.getsockname()[:2]
    return runner, f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
