"""The upstream hop's own HTTP/1.1 client: keep-alive connections carrying one request at a time, the
request written by the gateway byte for byte, the response parsed by llhttp (``httptools``).

Why not aiohttp's client, which the gateway used before: the gateway sends exactly one request it has
already decided (method, raw target, the headers it chose, its canonical JSON body) and relays one
response. aiohttp's client does much more per request (request and response objects with cookie,
redirect and auth handling, a task per body write, timers) and that was ~60 µs of the ~400 µs of CPU a
proxied call cost (issue 13 profile); this hop costs a third of that. It also makes "the gateway
forwards only what it decided" literal: no library adds a byte to what goes upstream (aiohttp adds
``User-Agent``, ``Accept`` and ``Accept-Encoding`` defaults to requests that lack them).

What the parser enforces is llhttp's strict mode: an invalid or repeated ``Content-Length``, or one
next to ``Transfer-Encoding``, is a malformed response, never a guess at where the body ends (RFC 9112
§6.3: the response-splitting and desync cases). An upstream that answers 101 is refused: the gateway
never asks for a protocol upgrade. Interim 1xx answers (RFC 9110 §15.2) are skipped. Bytes an
upstream sends with no request outstanding end the connection: they could only be read as the answer
to the next request.

Connections to an egress proxy (``HTTP_PROXY``/``HTTPS_PROXY``) still go through aiohttp's client
(gateway/proxy/forward.py ``_Pool``): HTTPS through a proxy needs ``CONNECT`` tunnelling, which is
aiohttp's job, and such routes are rare.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections import deque
from typing import cast

import aiohappyeyeballs
import aiohttp
import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# A connection idle longer than this is not reused: common servers close idle keep-alive connections
# after 5 s (uvicorn, which serves the Python MCP SDK, and Node's http server), and a request written
# just as the server closes is lost (RFC 9112 §9.3.1 allows no automatic retry of a POST).
IDLE_SECONDS = 4.0
MAX_HEAD_BYTES = 64 * 1024  # status line and headers of one response (aiohttp's limit is per line: 8190)
_HIGH_WATER = 256 * 1024  # unread body bytes at which reading from the upstream pauses (back-pressure)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.1 field-name
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HAPPY_EYEBALLS_DELAY = 0.25  # RFC 8305 §5's recommended connection attempt delay


class UpstreamHTTPError(aiohttp.ClientError):
    """The upstream broke HTTP (malformed, truncated, or out-of-turn response) or the connection failed
    mid-response. An aiohttp.ClientError, so the relay treats it like any other failed upstream."""


class UpstreamResponse:
    """One response: status and headers once they are complete, then the body as it arrives.

    ``content`` is the response itself, so the relay reads it like an aiohttp ``ClientResponse``
    (``readany``, ``read_nowait``, ``at_eof``); ``close`` hands a fully read response's connection back
    to its pool, or closes it."""

    def __init__(self, connection: _Connection, status: int, headers: CIMultiDictProxy[str]) -> None:
        self._connection = connection
        self.status = status
        self.headers = headers
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._complete = False  # the message ended (llhttp on_message_complete, or EOF-delimited end)
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def content(self) -> UpstreamResponse:
        return self

    def at_eof(self) -> bool:
        return self._complete and not self._chunks

    def read_nowait(self) -> bytes:
        """Whatever body is buffered now (b"" when none); raises the connection's failure once the
        buffered bytes are consumed."""
        if not self._chunks:
            if self._error is not None:
                raise self._error
            return b""
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        if self._buffered >= _HIGH_WATER:
            self._connection.resume()
        self._buffered = 0
        return data

    async def readany(self) -> bytes:
        """The next body bytes available, waiting for some; b"" at the end of the body."""
        while not self._chunks and not self._complete and self._error is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.read_nowait()

    def close(self) -> None:
        """Done with this response: a keep-alive connection whose response was read to the end goes
        back to the pool; any other is closed (an unread rest cannot be skipped safely)."""
        if self._closed:
            return
        self._closed = True
        if self._error is None and not self._complete:
            self._fail(UpstreamHTTPError("response closed by the gateway"))
        self._connection.finished(self, reusable=self.at_eof() and self._error is None)

    # -- fed by the connection -------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= _HIGH_WATER:
            self._connection.pause()
        self._wake()

    def _end(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._complete:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an upstream, one request at a time (no pipelining)."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._head: asyncio.Future[UpstreamResponse] | None = None  # waiting for status and headers
        self._response: UpstreamResponse | None = None  # headers done, body in progress or unclaimed
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._field_bytes = 0  # names and values of the head's fields (a head can end mid-read)
        self._since_body = 0  # bytes read after the head since the last read with body bytes in it
        self._in_message = False
        self._skip_body = False
        self._keep_alive = False
        self._paused = False

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        if self._head is None and (self._response is None or self._response._complete):
            self._broken(UpstreamHTTPError("upstream sent bytes with no request outstanding"))
            return
        if self._head is None:
            self._since_body += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken(UpstreamHTTPError("upstream switched protocols, which the gateway never asks for"))
            return
        except httptools.HttpParserCallbackError as exc:
            self._broken(exc.__context__ if isinstance(exc.__context__, UpstreamHTTPError) else UpstreamHTTPError(
                "malformed response from upstream"))  # fmt: skip
            return
        except httptools.HttpParserError:
            self._broken(UpstreamHTTPError("malformed response from upstream"))
            return
        if self._head is not None:  # still in the status line and headers
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._broken(UpstreamHTTPError(f"upstream response head over {MAX_HEAD_BYTES} bytes"))
        elif self._in_message and self._since_body > MAX_HEAD_BYTES:
            # Trailer fields (RFC 9112 §7.1.2) and chunk extensions (§7.1.1) have no end of their own: the
            # same limit as the head, counted from the read with the last body byte (httptools holds a
            # field until it ends).
            self._broken(UpstreamHTTPError(f"upstream sent over {MAX_HEAD_BYTES} bytes of chunk framing or trailers"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self._response
        if response is not None and not response._complete:
            if exc is None and self._in_message and self._until_close(response):
                # A body delimited by the end of the connection (RFC 9112 §6.3 item 8): its orderly end
                # only; a reset (exc) aborts the connection, and what came before may be partial.
                response._end()
            else:
                response._fail(UpstreamHTTPError("upstream closed the connection mid-response"))
        self._fail_head(aiohttp.ServerDisconnectedError())
        self._pool.discard(self)

    # -- llhttp callbacks --------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._head is None:
            raise UpstreamHTTPError("upstream sent a second response to one request")
        self._in_message = True
        self._raw_headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head is not None:  # not a trailer field (RFC 9112 §7.1.2): the gateway relays none
            self._field_bytes += len(name) + len(value)
            self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._field_bytes > MAX_HEAD_BYTES:
            raise UpstreamHTTPError(f"upstream response head over {MAX_HEAD_BYTES} bytes")
        status = self._parser.get_status_code()
        if not 100 <= status <= 599:  # llhttp takes any three digits; RFC 9110 §15 allows 100 to 599
            raise UpstreamHTTPError(f"upstream answered with status {status}, not an HTTP status code")
        if 100 <= status < 200:
            self._raw_headers = []  # interim answer (103 Early Hints, say): the real one follows
            return
        headers = CIMultiDictProxy(
            CIMultiDict(
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
                for name, value in self._raw_headers
            )
        )
        self._raw_headers = []
        codings = [c.strip().lower() for v in headers.getall("Transfer-Encoding", ()) for c in v.split(",")]
        if codings and codings != ["chunked"]:
            # Plain ``chunked`` is the only transfer coding the gateway undoes (RFC 9112 §7); any other would
            # reach the client still applied, with the header that names it dropped as hop-by-hop. And only
            # that exact list is sure to be framed by llhttp as this code assumes (empty list elements,
            # which RFC 9110 §5.6.1 says to ignore, make llhttp read the body to the close instead).
            raise UpstreamHTTPError("upstream used a transfer coding other than chunked")
        self._keep_alive = self._parser.should_keep_alive()
        response = UpstreamResponse(self, status, headers)
        self._response = response
        head, self._head = self._head, None
        if self._skip_body:  # a HEAD answer has no body, whatever its Content-Length says
            self._keep_alive = False
            self._in_message = False
            response._end()
        if head is not None and not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        self._since_body = 0
        if self._response is not None and not self._skip_body:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        if self._head is not None:  # an interim 1xx answer ended; keep waiting for the real one
            return
        self._in_message = False
        if self._response is not None:
            self._response._end()

    # -- used by the pool and the response ---------------------------------------------------------

    async def exchange(self, head: bytes, body: bytes | None, skip_body: bool) -> UpstreamResponse:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._head = loop.create_future()
        self._response = None
        self._head_bytes = 0
        self._field_bytes = 0
        self._since_body = 0
        self._skip_body = skip_body
        self.transport.write(head + body if body else head)
        try:
            return await self._head
        except BaseException:
            self._head = None
            self.close()  # an answer may still come: this connection can never carry another request
            raise

    def finished(self, response: UpstreamResponse, *, reusable: bool) -> None:
        if response is not self._response:
            return
        self._response = None
        if reusable and self._keep_alive and not self.closed and not self._paused:
            self.idle_since = time.monotonic()
            self._pool.release(self)
        else:
            self.close()

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _until_close(self, response: UpstreamResponse) -> bool:
        """Whether the body runs to the end of the connection (RFC 9112 §6.3): no Content-Length and no
        chunked framing (the only transfer coding let through) on a status that has a body."""
        return response.status not in (204, 304) and not (
            "Content-Length" in response.headers or "Transfer-Encoding" in response.headers
        )

    def _fail_head(self, error: BaseException) -> None:
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(error)

    def _broken(self, error: BaseException) -> None:
        self._fail_head(error)
        if self._response is not None:
            self._response._fail(error)
        self.close()


class ConnectionPool:
    """The keep-alive connections to one upstream origin. How many requests use it at once is bounded
    by the caller (forward.py ``_Pool.permits``); the pool keeps at most that many connections."""

    def __init__(self, upstream: str, connect_timeout: float) -> None:
        url = URL(upstream)
        self._host = url.raw_host or ""  # ASCII: an internationalised name in its IDNA (xn--) form
        self._port = url.port or _DEFAULT_PORTS[url.scheme]
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if url.scheme == "https" else None
        # RFC 9112 §3.2: the authority in ASCII, brackets around an IPv6 address, no default port (what
        # aiohttp's client sent, and what servers checking Host against a list of names expect).
        self._host_header = url.host_port_subcomponent
        self._connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._closed = False

    async def request(
        self, method: str, target: str, headers: CIMultiDict[str], body: bytes | None
    ) -> UpstreamResponse:
        """Send one request (``target``: the raw, already encoded path and query) and return its
        response once the status line and headers are in. ``headers`` must not carry Host,
        Content-Length or Transfer-Encoding: this writes its own."""
        head = self._head(method, target, headers, body)
        connection = self._take_idle() or await self._connect()
        return await connection.exchange(head, body, skip_body=method == "HEAD")

    def release(self, connection: _Connection) -> None:
        self._idle.append(connection)

    def discard(self, connection: _Connection) -> None:
        self._all.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)

    async def close(self) -> None:
        self._closed = True
        for connection in list(self._all):
            connection.close()
        self._idle.clear()

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the least likely to be timing out
            closing = connection.closed or connection.transport is None or connection.transport.is_closing()
            if not closing and now - connection.idle_since < IDLE_SECONDS:
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            addresses = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
            # Happy Eyeballs (RFC 8305), as aiohttp's client did: a name with an unreachable IPv6 address
            # falls back to IPv4 after 250 ms instead of spending the whole connect timeout on it.
            sock = await aiohappyeyeballs.start_connection(addresses, happy_eyeballs_delay=_HAPPY_EYEBALLS_DELAY)
            _, connection = await loop.create_connection(
                lambda: _Connection(self),
                sock=sock,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
            )
        if self._closed:  # the pool closed (a reload, shutdown) while this connection was being opened
            connection.close()
            raise UpstreamHTTPError("the upstream's connection pool was closed")
        self._all.add(connection)
        return connection

    def _head(self, method: str, target: str, headers: CIMultiDict[str], body: bytes | None) -> bytes:
        # Origin-form (RFC 9112 §3.2.1): an upstream at the root with a query gets '/?query', not '?query'.
        path = target if target.startswith("/") else "/" + target
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host_header}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        elif method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: 0")
        text = "\r\n".join(lines)
        # Header values come from the client's request as aiohttp parsed it (no CR or LF can survive
        # that) and from the gateway's config; this is the last line of defence against a value that
        # would split the request on the wire (header injection, RFC 9112 §5).
        breaks = len(lines) - 1
        if text.count("\n") != breaks or text.count("\r") != breaks or "\x00" in text:
            raise UpstreamHTTPError("refusing to send a header containing CR, LF or NUL")
        if not all(_TOKEN.fullmatch(name) for name in headers):
            raise UpstreamHTTPError("refusing to send a header whose name is not an HTTP token")
        return (text + "\r\n\r\n").encode("utf-8", "surrogateescape")
