"""Forwarding one client request to its route's upstream and streaming the answer back.

Streaming rules (MCP Streamable HTTP transport): ``text/event-stream`` responses are relayed event by
event as they arrive, with no total timeout; idle streams get SSE comment keep-alives so load
balancers do not cut them, and an optional idle limit. JSON responses are relayed as they arrive too,
except when the gateway must rewrite a result (then the bounded JSON body is read whole). A client
that disconnects cancels the handler (aiohttp ``handler_cancellation``), which closes the upstream
connection, so the upstream sees the cancellation the 2026-07-28 transport requires.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, unquote_plus, urljoin, urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.config import LimitsConfig, RouteConfig
from gateway.metrics import Metrics
from gateway.proxy.headers import (
    SESSION_HEADER,
    RequestHeaderRules,
    client_response_headers,
    upstream_request_headers,
)
from gateway.proxy.jsonrpc import ResultRewriter, announces_list_changed
from gateway.proxy.request_body import CANONICAL_CONTENT_TYPE
from gateway.proxy.sse import EventSplitter, EventTooLarge, parse_event
from gateway.proxy.upstream_http import ConnectionPool, UpstreamHTTPError, UpstreamResponse
from gateway.urls import origin_of

if TYPE_CHECKING:
    from gateway.oauth.access_token import Principal

log = logging.getLogger(__name__)

# A response of the upstream, from the gateway's own client or (through an egress proxy) aiohttp's: both
# offer status, headers, content_length, content.readany / read_nowait / at_eof and close.
UpstreamAnswer = UpstreamResponse | aiohttp.ClientResponse

KEEPALIVE = b": keep-alive\n\n"
_MAX_REWRITE_BYTES = 16 * 1024 * 1024
# JSON-RPC implementation-defined server errors (JSON-RPC 2.0 §5.1, -32000..-32099).
UPSTREAM_UNAVAILABLE = -32010
UPSTREAM_TIMEOUT = -32011
UPSTREAM_PROTOCOL = -32012
TOO_MANY_STREAMS = -32013
RETRY_AFTER_SECONDS = 5


def upstream_path_remainder(raw_path: str, route_path: str) -> str | None:
    """The part of a request's raw (still percent-encoded) path below ``route_path``, or None when
    the request must not be forwarded (answered 404 like an unknown path).

    The remainder is forwarded exactly as the client sent it. Decoding it first and
    letting the HTTP client re-encode it would resolve dot segments after the join (RFC 3986 §5.2.4;
    yarl also decodes '%2E' to '.'): '/json/mcp/..%2F..%2Fadmin' or '/json/mcp/%2E%2E/%2E%2E/admin'
    would reach '/admin' on the upstream host, outside the prefix the route and its token cover. So
    a '.' or '..' segment, raw or percent-encoded, is refused (backslashes count as separators
    because some servers treat them so), and so is a request that percent-encodes the route prefix
    itself. A segment counts as a dot segment whatever path parameters follow it: RFC 2396 §3.3
    allowed ``segment = *pchar *( ";" param )``, and Servlet containers (Tomcat, Jetty) still strip
    the parameters before resolving dot segments, so '..;' or '..;x=y' is '..' to them.
    """
    if raw_path != route_path and not raw_path.startswith(route_path + "/"):
        return None
    rest = raw_path[len(route_path) :]
    for form in (rest, unquote(rest)):
        if any(_is_dot_segment(segment) for segment in form.replace("\\", "/").split("/")):
            return None
    return rest


def _is_dot_segment(segment: str) -> bool:
    return segment.partition(";")[0] in (".", "..")


def jsonrpc_error(status: int, code: int, message: str, request_id: Any = None, **headers: str) -> web.Response:
    body = {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


class LegacyStream:
    """A live legacy HTTP+SSE GET stream: where the responses to that session's POSTs are delivered,
    so the gateway rewrites them there and writes its own answers (denied calls) into it."""

    def __init__(self, rewriter: ResultRewriter) -> None:
        self.rewriter = rewriter
        self.response: web.StreamResponse | None = None

    async def send(self, message: dict[str, Any]) -> None:
        if self.response is not None:
            # One write per event: aiohttp writes it as one chunk, never interleaved with the relay's.
            await self.response.write(sse_event(message))


def _json_message(body: bytes) -> Any:
    """A JSON-RPC answer body as a value, or None when it is no JSON object or array."""
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return message if isinstance(message, dict | list) else None


def sse_event(message: Any) -> bytes:
    """One JSON-RPC message (or batch) as one SSE event, in a single write."""
    return b"event: message\ndata: " + json.dumps(message, separators=(",", ":")).encode() + b"\n\n"


@dataclass(frozen=True)
class ForwardRequest:
    route: RouteConfig
    rest: str
    body: bytes | None
    rewriter: ResultRewriter
    request_id: Any = None
    extra_headers: tuple[tuple[str, str], ...] = ()
    # JSON-RPC responses the gateway itself produced for denied batch elements, merged into the answer.
    injected: tuple[dict[str, Any], ...] = ()
    # Session binding (gateway/sessions.py): the upstream's own session id to send, the raw query to
    # send instead of the client's (legacy transport), and how to wrap ids the upstream hands out.
    upstream_session_id: str | None = None
    query: str | None = None
    wrap_session: Callable[[str], str] | None = None
    legacy_stream: LegacyStream | None = None
    # The principal (gateway/sessions.py principal_key) whose open requests count against
    # limits.max_streams_per_principal.
    owner: str | None = None
    # Who sent it (and when their token was issued): streams of a user the IdP cut off are ended.
    principal: Principal | None = None
    # Headers the gateway itself sends upstream for this request (the signed identity header), set
    # after the client's headers are filtered, so a client can never supply them.
    added_headers: tuple[tuple[str, str], ...] = ()
    # W3C Trace Context of the gateway's upstream span (gateway/telemetry.py), replacing the client's.
    trace_headers: tuple[tuple[str, str], ...] = ()
    # The SSE response already open to the client (the gateway asked it for an approval there first,
    # gateway/approvals/session.py): the upstream's answer is written into it as events.
    into: web.StreamResponse | None = None


class StreamLimitReached(Exception):
    """The principal already has ``limits.max_streams_per_principal`` requests open on the route:
    answered 429 without forwarding, and audited as a refusal."""

    code = TOO_MANY_STREAMS
    retry_after_seconds = RETRY_AFTER_SECONDS

    def __init__(self, message: str, request_id: Any) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


def env_proxy_for(url: str) -> str | None:
    """The egress proxy for ``url`` from ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` (curl's and
    Python's convention, as aiohttp's ``trust_env`` reads them), or None for a direct connection."""
    parts = urlsplit(url)
    if urllib.request.proxy_bypass_environment(parts.hostname or ""):
        return None
    return urllib.request.getproxies_environment().get(parts.scheme)


class _Pool:
    """The connections of one route's upstream, of which at most ``size`` requests hold one at once. A
    request waits at most ``limits.upstream_pool_timeout_seconds`` for one (then 503), never the
    upstream timeout. Direct connections use the gateway's own HTTP/1.1 client (upstream_http.py);
    through an egress proxy, aiohttp's."""

    def __init__(self, upstream: str, size: int, limits: LimitsConfig, proxy: str | None = None) -> None:
        self.size = size
        encoded = urlsplit(str(URL(upstream)))
        self._origin = f"{encoded.scheme}://{encoded.netloc}"
        self._limits = limits
        self._proxy = proxy
        self.permits = asyncio.Semaphore(size)
        self._direct = None if proxy else ConnectionPool(upstream, limits.upstream_connect_timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def request(self, method: str, target: str, headers: CIMultiDict[str], body: bytes | None) -> UpstreamAnswer:
        """Send one request (``target``: raw path and query, sent as they are) and return its response
        once its headers are in."""
        if self._direct is not None:
            return await self._direct.request(method, target, headers, body)
        url = URL(self._origin + target, encoded=True)
        return await self._proxied().request(method, url, headers=headers, data=body, allow_redirects=False)

    def _proxied(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # The permits are the limit; the connector's matches it, so it never makes a request wait.
                connector=aiohttp.TCPConnector(limit=self.size, ttl_dns_cache=60),
                auto_decompress=False,
                # Streams have no total timeout; the header wait and body reads are bounded below.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._limits.upstream_connect_timeout_seconds),
                cookie_jar=aiohttp.DummyCookieJar(),
                # The egress proxy, resolved once from the environment (env_proxy_for): aiohttp's own
                # trust_env looks it up, and reads ~/.netrc, on every request (~0.35 ms per hop).
                proxy=self._proxy,
            )
        return self._session

    async def close(self) -> None:
        if self._direct is not None:
            await self._direct.close()
        if self._session is not None:
            await self._session.close()


class Upstream:
    """The connection pools of one route (keep-alive connections are reused across requests).

    Listening GET streams (the Streamable HTTP GET stream, the legacy HTTP+SSE stream) live for as
    long as the client keeps them, so they get a pool of their own: however many are open, calls
    (POST, DELETE) still find a connection. Each pool has ``routes[].max_connections``. One principal
    holds at most ``limits.max_streams_per_principal`` requests open on the route (event streams, and
    calls still waiting for their answer), so one user's idle streams cannot take a pool from others.
    """

    def __init__(
        self, route: RouteConfig, limits: LimitsConfig, header_rules: RequestHeaderRules, metrics: Metrics | None = None
    ) -> None:
        self.route = route
        self._metrics = metrics
        self._base_path = urlsplit(str(URL(route.upstream))).path  # encoded, ready for raw path joins
        self._limits = limits
        self._header_rules = header_rules
        proxy = env_proxy_for(route.upstream)
        self._calls = _Pool(route.upstream, route.max_connections, limits, proxy)
        self._listening = _Pool(route.upstream, route.max_connections, limits, proxy)
        self._open_by_owner: dict[str, int] = {}
        # Live event streams -> whether it is a listening (GET) stream, so a drain (shutdown) or a
        # route removal can end them cleanly.
        self.streams: dict[UpstreamAnswer, bool] = {}
        self._ended: set[UpstreamAnswer] = set()
        self._stream_requests: dict[UpstreamAnswer, ForwardRequest] = {}
        self._in_flight = 0
        self._retired = False
        # Called with the route name when a relayed event announces that the upstream's tools or prompts
        # changed (gateway/condition_monitor.py re-checks conditions); None when nothing listens.
        self.on_list_changed: Callable[[str], None] | None = None

    @property
    def pool_usage(self) -> tuple[int, int | None]:
        """Requests using or waiting for one of this route's upstream connections, and the limit of its
        two pools together (calls and listening streams): the per-route pool metrics."""
        return self._in_flight, self._calls.size + self._listening.size

    def end_streams(self, *, listening_only: bool = False) -> int:
        """Close every live upstream event stream; each relay then ends its client response with a
        proper end of stream (clients reconnect, e.g. to another replica)."""
        streams = [s for s, listening in self.streams.items() if listening or not listening_only]
        for stream in streams:
            self._ended.add(stream)  # a deliberate end, not an upstream failure
            stream.close()
        return len(streams)

    def end_streams_where(self, match: Callable[[ForwardRequest], bool]) -> int:
        """End the live event streams whose request ``match``es (a user's, when the IdP cut them off)."""
        streams = [s for s, fwd in self._stream_requests.items() if match(fwd)]
        for stream in streams:
            self._ended.add(stream)
            stream.close()
        return len(streams)

    async def retire(self) -> None:
        """A reload replaced this pool: end its live streams now, let requests in flight finish,
        then close it (closing at once would cut them with a 502)."""
        self._retired = True
        self.end_streams()
        if self._in_flight == 0:
            await self.close()

    async def close(self) -> None:
        self.end_streams()
        await self._calls.close()
        await self._listening.close()

    async def forward(self, request: web.Request, fwd: ForwardRequest) -> web.StreamResponse:
        """Raises StreamLimitReached when ``fwd.owner`` has too many requests open on this route."""
        owner = fwd.owner
        if owner is not None:
            if self._open_by_owner.get(owner, 0) >= self._limits.max_streams_per_principal:
                cap = self._limits.max_streams_per_principal
                message = f"too many open streams on route '{fwd.route.name}' (at most {cap} per user); close one"
                raise StreamLimitReached(message, fwd.request_id)
            self._open_by_owner[owner] = self._open_by_owner.get(owner, 0) + 1
        self._in_flight += 1
        try:
            pool = self._listening if request.method == "GET" else self._calls
            if pool.permits.locked():  # all in use: wait for one, within the pool timeout
                try:
                    async with asyncio.timeout(self._limits.upstream_pool_timeout_seconds):
                        await pool.permits.acquire()
                except TimeoutError:
                    return self._pool_exhausted(fwd, pool)
            else:
                await pool.permits.acquire()  # free: taken at once, no timer to arm
            try:
                return await self._forward(request, fwd, pool)
            finally:
                pool.permits.release()
        finally:
            self._in_flight -= 1
            if owner is not None:
                left = self._open_by_owner.pop(owner) - 1
                if left:
                    self._open_by_owner[owner] = left
            if self._retired and self._in_flight == 0:
                await self.close()

    def _pool_exhausted(self, fwd: ForwardRequest, pool: _Pool) -> web.Response:
        kind = "stream" if pool is self._listening else "call"
        wait = self._limits.upstream_pool_timeout_seconds
        log.warning("route %s: no free %s connection within %ss (max_connections %d)", fwd.route.name, kind, wait,
                    pool.size)  # fmt: skip
        message = f"upstream of route '{fwd.route.name}' is busy: no free {kind} connection within {wait:g}s"
        return jsonrpc_error(
            503, UPSTREAM_UNAVAILABLE, message, fwd.request_id, **{"Retry-After": str(RETRY_AFTER_SECONDS)}
        )

    async def _forward(self, request: web.Request, fwd: ForwardRequest, pool: _Pool) -> web.StreamResponse:
        route = fwd.route
        # Raw path remainder and raw query, sent without re-encoding (encoded=True): aiohttp's
        # ``query_string`` is partly decoded ('%23' becomes '#', '%25' becomes '%'), which would cut
        # or change what the upstream receives (a proxy forwards path and query byte for byte).
        query = fwd.query if fwd.query is not None else request.rel_url.raw_query_string
        target = self._base_path + fwd.rest + (f"?{query}" if query else "")
        headers = upstream_request_headers(request, route, self._header_rules)
        # The body, if any, is the gateway's canonical JSON (gateway/proxy/request_body.py), never the
        # client's bytes: describe it as such, whatever the client said about its own.
        headers.popall("Content-Encoding", None)
        headers.popall("Content-Type", None)
        if fwd.body is not None:
            headers["Content-Type"] = CANONICAL_CONTENT_TYPE
        if fwd.upstream_session_id is not None:
            headers[SESSION_HEADER] = fwd.upstream_session_id
        for name, value in fwd.added_headers:
            headers[name] = value
        if fwd.trace_headers:
            headers.popall("tracestate", None)
            headers.update(fwd.trace_headers)
        limits = self._limits
        started = time.monotonic()
        try:
            # asyncio.timeout, not wait_for, on every per-request await here: on Python 3.11 wait_for
            # wraps the awaitable in a task of its own (one more task, and its callbacks, per call).
            async with asyncio.timeout(limits.upstream_timeout_seconds):
                upstream = await pool.request(request.method, target, headers, fwd.body)
        except TimeoutError:
            log.warning("route %s: upstream did not answer within %ss", route.name, limits.upstream_timeout_seconds)
            return jsonrpc_error(504, UPSTREAM_TIMEOUT, f"upstream of route '{route.name}' timed out", fwd.request_id)
        except UpstreamHTTPError as exc:
            log.warning("route %s: upstream broke HTTP: %s", route.name, exc)
            text = f"upstream of route '{route.name}' answered with a malformed response"
            return jsonrpc_error(502, UPSTREAM_PROTOCOL, text, fwd.request_id)
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("route %s: upstream unreachable: %s", route.name, type(exc).__name__)
            return jsonrpc_error(
                502, UPSTREAM_UNAVAILABLE, f"upstream of route '{route.name}' is unreachable", fwd.request_id
            )
        finally:
            # Failures and timeouts too: a latency histogram without them looks best when things are worst.
            if self._metrics is not None:
                self._metrics.upstream_duration_of(route.name).observe(time.monotonic() - started)
        try:
            content_type = upstream.headers.get("Content-Type", "")
            if content_type.startswith("text/event-stream"):
                return await self._relay_events(request, upstream, fwd)
            return await self._relay_body(request, upstream, fwd)
        finally:
            upstream.close()

    async def _relay_body(
        self, request: web.Request, upstream: UpstreamAnswer, fwd: ForwardRequest
    ) -> web.StreamResponse:
        timeout = self._limits.upstream_timeout_seconds
        is_json = upstream.headers.get("Content-Type", "").startswith("application/json")
        if fwd.into is not None:
            return await self._relay_body_as_event(upstream, fwd, fwd.into, is_json)
        if (fwd.rewriter and is_json) or fwd.injected:
            try:
                body = await self._read_whole(upstream)
            except (TimeoutError, aiohttp.ClientError) as exc:
                return self._broken(fwd, exc)
            if len(body) > _MAX_REWRITE_BYTES:
                # Too large to inspect: relaying it unread could pass an unfiltered list result, and
                # what was read so far is not the whole body. Refused rather than truncated.
                log.warning("route %s: JSON response over %d bytes refused", fwd.route.name, _MAX_REWRITE_BYTES)
                return jsonrpc_error(
                    502, UPSTREAM_PROTOCOL, f"upstream of route '{fwd.route.name}' answered too much", fwd.request_id
                )
            if fwd.rewriter and is_json:
                body = fwd.rewriter.rewrite_json(body)
            headers = self._response_headers(upstream, fwd)
            if fwd.injected:
                return _merge_injected(upstream.status, body, fwd.injected, headers)
            return web.Response(status=upstream.status, body=body, headers=headers)
        response = web.StreamResponse(status=upstream.status, headers=self._response_headers(upstream, fwd))
        if upstream.content_length is not None and "Content-Encoding" not in upstream.headers:
            response.content_length = upstream.content_length
        await response.prepare(request)
        try:
            while True:
                async with asyncio.timeout(timeout):
                    chunk = await upstream.content.readany()
                if not chunk:
                    break
                await response.write(chunk)
            # Inside the try: a client that leaves after the last chunk makes write_eof raise
            # ClientConnectionResetError, which must end the response, not become a 500.
            await response.write_eof()
        except (TimeoutError, aiohttp.ClientError) as exc:
            # Headers are already sent, so only the connection can tell the client: closed before the
            # body is complete, the message is incomplete (RFC 9112 §8). Ending the response normally
            # would leave a client waiting for the rest of a Content-Length body, or hand it a
            # truncated chunked body as if it were whole.
            log.warning("route %s: body relay ended mid-response: %s", fwd.route.name, type(exc).__name__)
            if request.transport is not None:
                request.transport.close()
        return response

    async def _read_whole(self, upstream: UpstreamAnswer) -> bytes:
        """The upstream's body, read up to one byte past the rewrite limit (the caller checks it).
        What is already buffered is taken without waiting: a small JSON answer usually is, whole."""
        timeout = self._limits.upstream_timeout_seconds
        content = upstream.content
        chunks: list[bytes] = []
        size = 0
        while size <= _MAX_REWRITE_BYTES:
            chunk = content.read_nowait()
            if not chunk:
                if content.at_eof():
                    break
                async with asyncio.timeout(timeout):
                    chunk = await content.readany()
                if not chunk:
                    break
            chunks.append(chunk)
            size += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _relay_body_as_event(
        self, upstream: UpstreamAnswer, fwd: ForwardRequest, response: web.StreamResponse, is_json: bool
    ) -> web.StreamResponse:
        """A JSON answer to a call whose client already reads an SSE response: one event, then the end.
        A failure is returned as the gateway's own error response, which the caller writes as an event."""
        try:
            body = await self._read_whole(upstream)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return self._broken(fwd, exc)
        message = _json_message(fwd.rewriter.rewrite_json(body)) if is_json else None
        if len(body) > _MAX_REWRITE_BYTES or (message is None and body.strip()):
            log.warning("route %s: answer to an approved call is not JSON-RPC (or too large)", fwd.route.name)
            text = f"upstream of route '{fwd.route.name}' answered with no JSON-RPC message"
            return jsonrpc_error(502, UPSTREAM_PROTOCOL, text, fwd.request_id)
        try:
            if message is not None:
                await response.write(sse_event(message))
            await response.write_eof()
        except aiohttp.ClientError:
            log.info("route %s: client left before the answer of an approved call", fwd.route.name)
        return response

    async def _relay_events(
        self, request: web.Request, upstream: UpstreamAnswer, fwd: ForwardRequest
    ) -> web.StreamResponse:
        if fwd.into is not None:
            response = fwd.into  # already open: the upstream's headers come too late to matter
        else:
            headers = self._response_headers(upstream, fwd)
            headers["X-Accel-Buffering"] = "no"
            response = web.StreamResponse(status=upstream.status, headers=headers)
            response.headers.setdefault("Cache-Control", "no-cache")
            await response.prepare(request)
        if fwd.legacy_stream is not None and request.method == "GET":
            fwd.legacy_stream.response = response
        for message in fwd.injected:
            await response.write(sse_event(message))
        self.streams[upstream] = request.method == "GET"
        self._stream_requests[upstream] = fwd
        gauge = self._metrics.open_streams_of(fwd.route.name) if self._metrics is not None else None
        if gauge is not None:
            gauge.inc()
        try:
            return await self._relay_event_loop(request, upstream, fwd, response)
        finally:
            self.streams.pop(upstream, None)
            self._stream_requests.pop(upstream, None)
            if gauge is not None:
                gauge.dec()

    async def _relay_event_loop(
        self,
        request: web.Request,
        upstream: UpstreamAnswer,
        fwd: ForwardRequest,
        response: web.StreamResponse,
    ) -> web.StreamResponse:
        splitter = EventSplitter()
        rewrite_endpoint = fwd.route.transport == "sse"
        keepalive = self._limits.stream_keepalive_seconds or None
        idle_limit = self._limits.stream_idle_timeout_seconds or None
        wait = min(t for t in (keepalive, idle_limit) if t) if (keepalive or idle_limit) else None
        idle = 0.0
        try:
            while True:
                try:
                    async with asyncio.timeout(wait):
                        chunk = await upstream.content.readany()
                except TimeoutError:
                    assert wait is not None
                    idle += wait
                    if idle_limit and idle >= idle_limit:
                        log.info("route %s: closing stream idle for %.0fs", fwd.route.name, idle)
                        break
                    if keepalive:
                        await response.write(KEEPALIVE)
                    continue
                if not chunk:
                    break
                idle = 0.0
                for event in splitter.feed(chunk):
                    if self.on_list_changed is not None and announces_list_changed(event):
                        self.on_list_changed(fwd.route.name)
                    if rewrite_endpoint:
                        event = self._rewrite_endpoint(event, request, fwd)
                    if fwd.rewriter:
                        event = fwd.rewriter.rewrite_event(event)
                    await response.write(event)
            rest = splitter.rest()
            if rest:
                await response.write(rest)
            await response.write_eof()  # inside the try for the same reason as in _relay_body
        except (aiohttp.ClientError, EventTooLarge) as exc:
            if upstream in self._ended:
                self._ended.discard(upstream)
                log.info("route %s: event stream ended by the gateway (drain or reload)", fwd.route.name)
            else:
                log.warning("route %s: event stream ended abnormally: %s", fwd.route.name, type(exc).__name__)
        return response

    def _rewrite_endpoint(self, raw: bytes, request: web.Request, fwd: ForwardRequest) -> bytes:
        """HTTP+SSE (2024-11-05): the ``endpoint`` event tells the client where to POST. The
        upstream names its own URL; the client must post back through the gateway instead."""
        if b"endpoint" not in raw:
            return raw
        event = parse_event(raw)
        if event.event != "endpoint":
            return raw
        upstream_sse_url = fwd.route.upstream + fwd.rest
        target = urljoin(upstream_sse_url, event.data.strip())
        base = fwd.route.upstream
        base_path = urlsplit(base).path
        parts = urlsplit(target)
        if origin_of(target) != origin_of(base) or not (
            parts.path == base_path or parts.path.startswith(base_path.rstrip("/") + "/") or not base_path
        ):
            log.warning("route %s: endpoint event points outside the upstream; passed unchanged", fwd.route.name)
            return raw
        rest = parts.path[len(base_path.rstrip("/")) :]
        query = parts.query
        if fwd.wrap_session is not None and query:
            query = wrap_session_params(query, fwd.wrap_session)
        event.data = fwd.route.path + rest + (f"?{query}" if query else "")
        return event.encode()

    def _response_headers(self, upstream: UpstreamAnswer, fwd: ForwardRequest) -> CIMultiDict[str]:
        headers = client_response_headers(upstream.headers, fwd.extra_headers)
        if fwd.wrap_session is not None and SESSION_HEADER in headers:
            headers[SESSION_HEADER] = fwd.wrap_session(headers[SESSION_HEADER])
        return headers

    def _broken(self, fwd: ForwardRequest, exc: BaseException) -> web.Response:
        if isinstance(exc, TimeoutError):
            return jsonrpc_error(
                504, UPSTREAM_TIMEOUT, f"upstream of route '{fwd.route.name}' timed out", fwd.request_id
            )
        return jsonrpc_error(
            502,
            UPSTREAM_PROTOCOL,
            f"upstream of route '{fwd.route.name}' failed mid-response",
            fwd.request_id,
        )


# Query parameters carrying the legacy HTTP+SSE session id (Python SDK: session_id; TS SDK: sessionId).
SESSION_PARAMS = frozenset({"session_id", "sessionid"})


def _param_name(pair: str) -> str:
    # Decoded as the upstream's framework decodes it: ``session%5Fid`` is ``session_id`` there.
    return unquote_plus(pair.partition("=")[0]).lower()


def session_param_names(query: str) -> list[str]:
    """The (decoded) names of the session-id parameters in a raw query string."""
    return [name for name in map(_param_name, query.split("&")) if name in SESSION_PARAMS]


def wrap_session_params(query: str, transform: Callable[[str], str]) -> str:
    """Apply ``transform`` to the session-id parameters of a raw query string, keeping the rest."""
    out = []
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if _param_name(pair) in SESSION_PARAMS:
            pair = f"{name}={quote(transform(unquote(value)), safe='')}"
        out.append(pair)
    return "&".join(out)


def _merge_injected(
    status: int, body: bytes, injected: tuple[dict[str, Any], ...], headers: CIMultiDict[str]
) -> web.Response:
    """Answer a partly denied batch: the upstream's responses plus the gateway's own errors. An
    upstream 202 (it had only notifications left) becomes 200 with just the gateway's responses."""
    try:
        upstream_messages = json.loads(body) if body.strip() else []
    except (ValueError, RecursionError):
        upstream_messages = []
    if isinstance(upstream_messages, dict):
        upstream_messages = [upstream_messages]
    merged = [*upstream_messages, *injected] if isinstance(upstream_messages, list) else list(injected)
    headers.pop("Content-Type", None)
    return web.Response(
        status=200 if status in (200, 202) else status,
        text=json.dumps(merged, separators=(",", ":")),
        content_type="application/json",
        headers=headers,
    )
