"""The public listener: how long a client may take to send its request headers, and how many
connections one process holds open.

aiohttp's server bounds neither. A client that opens a connection and sends a request line a byte at a
time (slowloris) holds a socket and a handler until aiohttp's keep-alive timer (an hour by default)
fires, and nothing caps how many such connections pile up. So every connection gets a deadline for
its request headers (``limits.request_header_timeout_seconds``): armed when the connection opens, and
again when the first byte of a further request arrives on a kept-alive connection; cancelled once
the headers are parsed (the body has its own limit, ``limits.request_body_timeout_seconds``). Idle
kept-alive connections stay governed by aiohttp's keep-alive timer. A connection past the deadline is
closed without a response (RFC 9110 §15.5.9 allows a 408, but the client is not reading one).

Connections beyond ``limits.max_client_connections`` are closed as soon as they are accepted, after a
best-effort ``503`` with ``Connection: close``: refusing quickly keeps the process responsive for the
connections it holds, where letting them queue would let one client's flood exhaust file descriptors.
Limits are read from the running config when a connection opens, so a reload applies to new ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from yarl import URL

from gateway.config import LimitsConfig
from gateway.pipeline.context import INVALID_REQUEST, rpc_error
from gateway.proxy.request_body import PARSE_ERROR

log = logging.getLogger(__name__)

BACKLOG = 1024
_REFUSAL_BODY = b'{"error":"too many connections"}'
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n\r\n" + _REFUSAL_BODY
)
_WARN_EVERY_SECONDS = 10.0


class ConnectionCounter:
    """Open client connections of this process, against the configured cap."""

    def __init__(self, limits: Callable[[], LimitsConfig]) -> None:
        self.limits = limits
        self.open = 0
        self.refused = 0
        self._warned_at = -_WARN_EVERY_SECONDS

    def admit(self) -> bool:
        cap = self.limits().max_client_connections
        if self.open < cap:
            self.open += 1
            return True
        self.refused += 1
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_SECONDS:  # a flood must not flood the log too
            self._warned_at = now
            log.warning("refusing client connections: %d open (limits.max_client_connections); %d refused so far",
                        self.open, self.refused)  # fmt: skip
        return False

    def release(self) -> None:
        self.open -= 1


class _GuardedRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, plus the connection cap and the request-header deadline.

    Reads two of aiohttp's internals, both covered by tests/test_slow_clients.py: ``_request_count``
    (requests parsed on this connection, so a change means a request's headers are complete) and
    ``_waiter`` (pending while the connection sits between requests, so data then starts a new one).
    """

    def __init__(self, manager: web.Server, *, counter: ConnectionCounter, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._counter = counter
        self._admitted = False
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._counter.admit():
            assert isinstance(transport, asyncio.Transport)
            transport.write(_REFUSAL)
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return  # refused in connection_made: aiohttp never saw this connection
        self._admitted = False
        self._counter.release()
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count
        between_requests = self._waiter is not None and not self._waiter.done()
        super().data_received(data)
        if self._request_count != parsed:
            self._cancel_header_deadline()
        elif data and between_requests and self._header_deadline is None:
            self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        timeout = self._counter.limits().request_header_timeout_seconds
        self._header_deadline = asyncio.get_running_loop().call_later(timeout, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """Requests aiohttp refuses before any handler runs (a malformed request, a ``Content-Encoding``
        it cannot undo such as ``br`` without Brotli) get the error format of the endpoint they were
        sent to, JSON-RPC on MCP routes and RFC 6749 §5.2 JSON on ``/oauth2``, never a text page."""
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        log.debug("refused a malformed request: %s", type(exc).__name__ if exc else status)
        body: dict[str, Any]
        if request.path.startswith("/oauth2/"):
            body = {"error": "invalid_request", "error_description": "malformed HTTP request"}
        elif isinstance(exc, ContentEncodingError):
            body = rpc_error(PARSE_ERROR, "Parse error: unsupported Content-Encoding (send identity or one gzip)")
        else:
            body = rpc_error(INVALID_REQUEST, "Invalid Request: malformed HTTP request")
        response = web.Response(status=status, text=json.dumps(body), content_type="application/json")
        response.force_close()
        return response

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        log.debug("closing a connection that did not send its request headers in time")
        self.force_close()


class GuardedSite(web.BaseSite):
    """Serves a runner's application on a bound socket, like ``web.SockSite``, with every connection
    under the guards above."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, counter: ConnectionCounter) -> None:
        super().__init__(runner, backlog=BACKLOG)
        self._sock = sock
        self.counter = counter
        host, port = sock.getsockname()[:2]
        self._name = str(URL.build(scheme="http", host=host, port=port))

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        manager = self._runner.server
        assert manager is not None
        loop = asyncio.get_running_loop()

        def protocol() -> web.RequestHandler:
            # The same arguments start_gateway gives its runner (aiohttp hands those only to its own
            # RequestHandler): no access log, the gateway logs every request itself.
            return _GuardedRequestHandler(manager, counter=self.counter, loop=loop, access_log=None)

        self._server = await loop.create_server(protocol, sock=self._sock, backlog=self._backlog)
