"""Assembles the gateway: authorization server, resource server and proxy in one aiohttp app.

``Gateway.handle_route`` finds the route of a proxied request and hands it to the stages of
gateway/pipeline/ (origin -> authenticate -> body -> decide -> session -> forward, audited around);
everything the gateway answers itself (discovery, token, health, metrics) is registered before that
catch-all route. All config-derived state lives in one ``Runtime`` that reloads swap.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway import logs, pipeline
from gateway.approvals import http as approval_http
from gateway.approvals.store import ApprovalStore, open_approval_store
from gateway.audit import AuditLog
from gateway.bearer import BearerGuard
from gateway.condition_health import ConditionHealth
from gateway.condition_monitor import ConditionMonitor
from gateway.config import SSF_PUSH_PATH, ConfigError, GatewayConfig, load_config
from gateway.listener import ConnectionCounter, GuardedSite
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import NO_ROUTE, Metrics, method_class
from gateway.oauth import metadata
from gateway.oauth.access_token import AccessTokenService, IssuedToken, Principal
from gateway.oauth.chain import RetainedAssertions, UpstreamCredentials
from gateway.oauth.errors import MethodNotAllowed, OriginRefused
from gateway.oauth.idjag import Grant
from gateway.oauth.jwks import KeyRing
from gateway.oauth.keys import SigningKey, SigningKeyError
from gateway.oauth.replay import ReplayStore, open_replay_store
from gateway.oauth.revocation_bus import revocation_bus
from gateway.oauth.token_endpoint import GrantOutcome
from gateway.pipeline.context import METHOD_CLASS, RequestContext, Services
from gateway.proxy.forward import ForwardRequest, upstream_path_remainder
from gateway.quotas import QuotaStore, open_quota_store
from gateway.routes import RouteTable
from gateway.runtime import ReloadRefused, Runtime
from gateway.signals.receiver import SignalReceiver
from gateway.telemetry import Tracing
from gateway.tool_pins import DriftState

log = logging.getLogger("gateway")

REQUEST_ID = web.RequestKey("request_id", str)
_JWKS_RETRY_SECONDS = 10.0
# Incoming X-Request-Id values kept as they are: short, and only characters that are safe in a log line,
# a header and a JSON string (UUIDs, hex, base64, ULIDs, "Root=1-..." trace ids).
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+/=-]{0,127}")
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        signing_key: SigningKey | None = None,
        replay_store: ReplayStore | None = None,
        quota_store: QuotaStore | None = None,
        jwks_min_refresh_seconds: float = 30,
        config_path: str | None = None,
        metrics_port_offset: int = 0,
        config_check: Callable[[GatewayConfig], None] | None = None,
    ) -> None:
        """``metrics_port_offset`` and ``config_check`` are for ``serve --workers`` (gateway/workers.py):
        worker i serves /metrics on ``metrics_listen``'s port + i, and a reload must pass the same check
        as the config the workers started with (``config_check`` raises ``ConfigError``)."""
        # The gateway closes only a store it opened itself (tests and embedders may share theirs).
        self._owns_replay_store = replay_store is None
        self.replay_store = replay_store if replay_store is not None else open_replay_store(config.replay_store)
        self.audit = AuditLog(config.audit_sink, otlp_endpoint=config.telemetry_otlp_endpoint)
        self.config_path = config_path
        self._metrics_port_offset = metrics_port_offset
        self._config_check = config_check
        self._jwks_min_refresh = jwks_min_refresh_seconds
        self._idp_session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._config_digest: bytes | None = None
        self.draining = False
        self._retrying_jwks = False
        self.metrics = Metrics(
            lambda: dict(self.runtime.keys.sets),
            audit_dropped=lambda: self.audit.dropped,
            pools=lambda: {name: u.pool_usage for name, u in self.runtime.upstreams.items()},
            upstream_timeout_seconds=config.limits.upstream_timeout_seconds,
        )
        self.metrics.precreate(config)
        # Quota counters live beside the replay cache (memory, or the same Redis for every replica).
        self._owns_quota_store = quota_store is None
        self.quota_store = quota_store if quota_store is not None else open_quota_store(config.replay_store)
        # Replicas sharing a Redis replay store end each other's streams of a revoked token.
        self.revoked_tokens = revocation_bus(self.replay_store)
        # So do calls parked for approver_groups (gateway/approvals/).
        self.approval_store: ApprovalStore = open_approval_store(config.replay_store)
        # Chained ID-JAG routes (gateway/oauth/chain.py): kept across reloads, like the upstream pools.
        self.retained_assertions = RetainedAssertions()
        tracing = Tracing(config.telemetry_otlp_endpoint) if config.telemetry_otlp_endpoint else None
        self.services = Services(
            self.audit,
            self.metrics,
            credentials=UpstreamCredentials(self.idp_session, self.retained_assertions),
            tracing=tracing,
            tool_drift=DriftState(on_drift=self._audit_drift),
            approvals=self.approval_store,
        )
        self.approval_pages = approval_http.ApprovalPages(
            self.approval_store,
            lambda: self.runtime,
            self.audit,
            count=lambda route, event: self.metrics.approvals.labels(route, event).inc(),
        )
        # Shared Signals (gateway/signals/): built once; its transmitters need a restart to change.
        self.signals = (
            SignalReceiver(
                config,
                replay=self.replay_store,
                revocations=self.services.revocations,
                session=self.idp_session,
                audit=self.audit,
                metrics=self.metrics,
                upstreams=lambda: self.runtime.upstreams.values(),
                jwks_min_refresh_seconds=jwks_min_refresh_seconds,
            )
            if config.transmitters
            else None
        )
        self._metrics_runner: web.AppRunner | None = None
        # Conditions that do not type-check against the upstreams' schemas, and pinned tools that drifted,
        # kept current in the background.
        self.condition_health = ConditionHealth()
        self.conditions = ConditionMonitor(self.condition_health, self.metrics, self.services.tool_drift)
        self.runtime = Runtime.build(
            config,
            replay_store=self.replay_store,
            quota_store=self.quota_store,
            idp_session=self.idp_session,
            on_grant=self._audit_grant,
            on_revoked=self._audit_revocation,
            jwks_min_refresh_seconds=jwks_min_refresh_seconds,
            metrics=self.metrics,
            signing_key=signing_key,
            condition_health=self.condition_health,
            revocations=self.services.revocations,
            retain=self._retain_assertion,
            tool_drift=self.services.tool_drift,
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

    def _retain_assertion(self, grant: Grant, issued: IssuedToken, assertion: str) -> None:
        self.retained_assertions.keep(issued.token_id, assertion, time.time() + issued.expires_in)

    def idp_session(self) -> aiohttp.ClientSession:
        if self._idp_session is None or self._idp_session.closed:
            # trust_env: HTTPS_PROXY / HTTP_PROXY / NO_PROXY, so clusters with an egress proxy reach their IdP.
            self._idp_session = aiohttp.ClientSession(headers={"User-Agent": "mcp-auth-gateway"}, trust_env=True)
        return self._idp_session

    # -- lifecycle -------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._request_id_and_errors], client_max_size=1024**2)
        app.on_response_prepare.append(_server_header)
        app.on_response_prepare.append(_request_id_header)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        self._add_routes(app)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        await self.audit.start()
        self.conditions.configure(self.config, self.runtime.upstreams)
        if self.config.metrics_listen is not None:
            # A separate port that carries no auth and is not exposed publicly (scraped in-cluster).
            metrics_app = web.Application()
            metrics_app.on_response_prepare.append(_server_header)
            metrics_app.router.add_get("/metrics", self.metrics_endpoint)
            self._metrics_runner = web.AppRunner(metrics_app, access_log=None)
            await self._metrics_runner.setup()
            host, port = self.config.metrics_listen
            await web.TCPSite(self._metrics_runner, host, port + self._metrics_port_offset).start()
        if self.signals is not None:
            self.signals.start()
            await self.signals.prefetch_keys()
        if self.revoked_tokens is not None:
            self._spawn(self.revoked_tokens.listen(self._revoked_elsewhere))
        await self.runtime.keys.prefetch()
        if not self.runtime.keys.ready:
            self._spawn(self._retry_jwks())
        if self.config_path and self.config.reload_watch_seconds > 0:
            self._config_digest = await asyncio.to_thread(_digest, self.config_path)
            self._spawn(self._watch_config())

    async def _retry_jwks(self) -> None:
        """Keep trying IdPs whose keys could not be fetched (at startup or after a reload added
        them), so their grants work again as soon as the IdP answers, not only after a token request
        happens to arrive outside the refetch rate limit."""
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
        await self.conditions.close()
        if self.signals is not None:
            await self.signals.close()
        for upstream in self.runtime.upstreams.values():
            await upstream.close()
        if self._idp_session is not None:
            await self._idp_session.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self._owns_replay_store:
            await self.replay_store.close()
        if self._owns_quota_store:
            await self.quota_store.close()
        await self.approval_store.close()
        await self.audit.close()
        if self.services.tracing is not None:
            await asyncio.to_thread(self.services.tracing.shutdown)  # exports what is still buffered

    # -- reload ----------------------------------------------------------------------------

    async def reload(self, config: GatewayConfig | None = None) -> bool:
        """Validate, then swap atomically. On any problem the running config stays and the
        problem is logged; returns whether the new config is now active."""
        try:
            if config is None:
                if not self.config_path:
                    raise ReloadRefused("no config file to reload from")
                config = await asyncio.to_thread(load_config, self.config_path)
            if self._config_check is not None:
                self._config_check(config)
            new = Runtime.build(
                config,
                replay_store=self.replay_store,
                quota_store=self.quota_store,
                idp_session=self.idp_session,
                on_grant=self._audit_grant,
                on_revoked=self._audit_revocation,
                jwks_min_refresh_seconds=self._jwks_min_refresh,
                metrics=self.metrics,
                previous=self.runtime,
                condition_health=self.condition_health,
                revocations=self.services.revocations,
                retain=self._retain_assertion,
                tool_drift=self.services.tool_drift,
            )
        except (ConfigError, SigningKeyError, ReloadRefused) as exc:
            self.metrics.reloads.labels("failure").inc()
            log.error("config reload refused, keeping the running config: %s", exc)
            self.audit.emit("config.reload", decision="deny", reason=str(exc))
            return False
        old, self.runtime = self.runtime, new
        self.metrics.precreate(new.config)
        self.conditions.configure(new.config, new.upstreams)
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
        router.add_route("*", metadata.REVOKE_PATH, self.revoke)
        router.add_route("*", metadata.INTROSPECT_PATH, self.introspect)
        if self.signals is not None and self.signals.pushes:
            router.add_route("*", SSF_PUSH_PATH, self.signals.push)
        if self.config.metrics_listen is None:
            router.add_get("/metrics", self.metrics_endpoint)
        router.add_route("*", approval_http.ROUTE, self.approval_pages.handle)
        router.add_route("*", "/{tail:.*}", self.handle_route)

    @web.middleware
    async def _request_id_and_errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every response carries X-Request-Id; no exception ever reaches a client as a traceback.

        A well-formed incoming X-Request-Id (from the ingress or the client) is kept, so ingress logs,
        gateway logs and audit lines join on it; anything else gets a fresh id. It only correlates:
        nothing trusts it. A fresh id is 32 lowercase hex digits from ``os.urandom`` (a fifth of the cost of
        ``uuid.uuid4().hex``); the header is set as the response is prepared (``_request_id_header``).
        Probes and scrapes are logged at DEBUG, not INFO, so they do not drown the log (a readiness probe
        every 5 s per pod)."""
        incoming = request.headers.get("X-Request-Id", "")
        request_id = incoming if _REQUEST_ID.fullmatch(incoming) else os.urandom(16).hex()
        request[REQUEST_ID] = request_id
        context = logs.REQUEST_ID.set(request_id)  # reset below: requests of one connection share a task
        try:
            return await self._answer_and_log(request, handler, request_id)
        finally:
            logs.REQUEST_ID.reset(context)

    async def _answer_and_log(self, request: web.Request, handler: Any, request_id: str) -> web.StreamResponse:
        started = time.monotonic()
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = _plain_error(exc.status, exc.reason)
        except asyncio.CancelledError:
            path = approval_http.loggable_path(request.path)
            log.info("%s %s cancelled by client after %.3fs", request.method, path, time.monotonic() - started)
            raise
        except Exception:
            path = approval_http.loggable_path(request.path)
            log.exception("unhandled error on %s %s (request %s)", request.method, path, request_id)
            response = _plain_error(500, "internal error")
        level = logging.DEBUG if request.path in _QUIET_PATHS else logging.INFO
        if log.isEnabledFor(level):  # the access line: its arguments only when it is written
            log.log(
                level,
                "%s %s -> %d in %.3fs (request %s)",
                request.method,
                approval_http.loggable_path(request.path),
                response.status,
                time.monotonic() - started,
                request_id,
            )
        return response

    # -- endpoints the gateway answers itself ----------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready once the config is loaded; not ready while draining, so load balancers stop sending
        new requests. IdP keys do not count: an IdP without keys fails only its own grants (503
        ``temporarily_unavailable``) and shows in ``mcp_gateway_idp_keys_available``. Gating readiness on
        them would keep new pods out through any IdP outage, and a reload adding one unreachable IdP
        would take every route of every pod down at once. The body names such IdPs, for people."""
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        missing = [issuer for issuer, s in self.runtime.keys.sets.items() if not s.has_keys]
        body: dict[str, Any] = {"status": "ready"}
        if missing:
            body["idp_keys_missing"] = missing
        return web.json_response(body)

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
        return web.Response(body=self.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def discovery_preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=metadata.DISCOVERY_CORS)

    async def jwks(self, request: web.Request) -> web.Response:
        keys = self.runtime.tokens.trusted_keys()
        return web.json_response(metadata.jwks_document(keys), headers={"Cache-Control": "public, max-age=300"})

    async def token(self, request: web.Request) -> web.Response:
        """Every answer, refusals before the endpoint proper included, is RFC 6749 §5.2 JSON with
        ``Cache-Control: no-store``."""
        refusal = self._oauth_refusal(request)
        return refusal or await self.runtime.token_endpoint.handle(request)

    async def revoke(self, request: web.Request) -> web.Response:
        """RFC 7009 §2.1: POST, answered like the token endpoint (origin check, RFC 6749 §5.2 errors)."""
        refusal = self._oauth_refusal(request)
        return refusal or await self.runtime.revocation_endpoint.handle(request)

    async def introspect(self, request: web.Request) -> web.Response:
        """RFC 7662 §2.1: POST, answered like the token endpoint."""
        refusal = self._oauth_refusal(request)
        return refusal or await self.runtime.introspection_endpoint.handle(request)

    def _oauth_refusal(self, request: web.Request) -> web.Response | None:
        if request.method != "POST":
            return MethodNotAllowed(request.method).to_response()
        if not self.runtime.origins.is_allowed(request.headers.get("Origin")):
            return OriginRefused().to_response()
        return None

    def _audit_drift(self, route: str, tool: str, pinned: str | None, observed: str, action: str) -> None:
        """One audit line and one count per change of a tool's definition away from its pin."""
        change = "unpinned" if pinned is None else "changed"
        self.metrics.tool_drift.labels(route, change, action).inc()
        self.audit.emit(
            "tool.drift",
            route=route,
            method="tools/list",
            target=tool,
            decision="deny" if action == "refused" else "allow",
            reason=f"tool_drift: {change}",
            old_sha256=pinned,
            new_sha256=observed,
        )

    def _end_streams_of_token(self, token_id: str) -> int:
        """End the streams opened with one access token (a revoked token must not keep a listening
        stream alive for hours); returns how many."""

        def opened_with_it(fwd: ForwardRequest) -> bool:
            return fwd.principal is not None and fwd.principal.token_id == token_id

        return sum(upstream.end_streams_where(opened_with_it) for upstream in self.runtime.upstreams.values())

    def _revoked_elsewhere(self, token_id: str) -> None:
        ended = self._end_streams_of_token(token_id)
        if ended:
            log.info("access token revoked at another replica: ended %d streams here", ended)

    def _audit_revocation(self, principal: Principal) -> None:
        """An access token revoked at the RFC 7009 endpoint: later requests with it are refused, and the
        streams open with it end now, here and (through the revoked-token bus) on the other replicas."""
        route = self.runtime.routes.for_resource(principal.audience)
        ended = self._end_streams_of_token(principal.token_id)
        if self.revoked_tokens is not None:
            self._spawn(self.revoked_tokens.publish(principal.token_id))
        self.audit.emit(
            "token.revoked",
            route=route.name if route is not None else None,
            sub=principal.subject,
            tenant=principal.tenant,
            client_id=principal.client_id,
            idp=principal.idp_issuer,
            decision="deny",
            reason=f"revoked by the client (RFC 7009); {ended} streams ended here",
        )

    def _audit_grant(self, outcome: GrantOutcome) -> None:
        grant = outcome.grant
        if grant is not None:
            self.metrics.grants.labels("issued", "ok").inc()
            self.audit.emit(
                "token.issued",
                route=grant.route.name,
                sub=grant.subject,
                tenant=grant.tenant,
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
            self.metrics.requests_of(NO_ROUTE, "other", "404").inc()
            return _plain_error(404, "no route for this path")
        route = match[0]
        request[METHOD_CLASS] = method_class(request.method, None)
        in_flight = self.metrics.in_flight_of(route.name)
        in_flight.inc()
        status = 500
        ctx = RequestContext(request, runtime, self.services, route, rest, request[REQUEST_ID], started)
        if self.services.tracing is not None:
            ctx.trace = self.services.tracing.start(ctx)
        try:
            response = await pipeline.run(ctx)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = pipeline.CLIENT_CLOSED_REQUEST  # the client went away (how MCP clients cancel): not a 5xx
            raise
        finally:
            ctx.trace.finish(status)
            in_flight.dec()
            self.metrics.requests_of(route.name, request[METHOD_CLASS], str(status)).inc()
            self.metrics.request_duration_of(route.name).observe(time.monotonic() - started)


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp announces ``Python/3.x aiohttp/3.y`` (and a proxied upstream its own software): versions
    tell only an attacker which advisories apply, so every answer names just the product."""
    response.headers["Server"] = "mcp-gateway"


async def _request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """X-Request-Id on every answer, set as its headers are sent: a handler that prepares and writes
    its response itself (a stream, a relayed body) carries it just like one the middleware returns."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id


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
