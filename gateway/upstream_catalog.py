"""What a route's upstream offers: its tools with their ``inputSchema`` and its prompts with their arguments.

Fetched the way any MCP client would, so that conditions can be type-checked against them
(gateway/condition_health.py): ``initialize``, ``notifications/initialized``, then ``tools/list`` and
``prompts/list``, following ``nextCursor`` (MCP 2025-11-25 "Lifecycle" and "Pagination"). The official
SDK client is only a test dependency, so this is a small client of our own on aiohttp, for the two
transports the gateway proxies:

- Streamable HTTP (MCP 2025-11-25 "Transports"): each message is POSTed to the endpoint; a request is
  answered with one JSON body or an SSE stream carrying the response; the session is ``Mcp-Session-Id``
  and is ended with DELETE;
- the deprecated HTTP+SSE transport (2024-11-05): GET ``<upstream>/sse`` opens a stream whose first
  ``endpoint`` event names where to POST; every response arrives on that stream.

Every wait is bounded by the route's limits (connect timeout, upstream timeout per answer), and so is
everything read (response size, events skipped, pages, items). Failures are one-line ``CatalogError``s.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import aiohttp

from gateway import __version__
from gateway.config import LimitsConfig, RouteConfig
from gateway.proxy.sse import EventSplitter, EventTooLarge, parse_event
from gateway.urls import origin_of

PROTOCOL_VERSION = "2025-11-25"
MAX_PAGES = 100
MAX_ITEMS = 10_000
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
# Messages on a stream before the answer (server notifications, requests we do not serve).
MAX_EVENTS = 1_000
METHOD_NOT_FOUND = -32601  # JSON-RPC 2.0 §5.1
_ACCEPT = "application/json, text/event-stream"


class CatalogError(Exception):
    """The upstream could not be listed; the message is one line, without secrets."""


class _MethodNotFound(CatalogError):
    pass


@dataclass(frozen=True)
class Catalog:
    tools: Mapping[str, Mapping[str, Any]]  # tool name -> its inputSchema
    prompts: Mapping[str, Mapping[str, Any]]  # prompt name -> a JSON Schema of its arguments
    # The tools as listed (the first of each name), for ``mcp-gateway pin`` (gateway/tool_pins.py).
    definitions: tuple[Mapping[str, Any], ...] = ()


def prompt_schema(arguments: Any) -> dict[str, Any]:
    """MCP prompt arguments are strings (2025-11-25 "Prompts": ``prompts/get`` takes a string map), so a
    prompt's arguments type-check as an object of string properties."""
    names = [a["name"] for a in arguments if isinstance(a, dict) and isinstance(a.get("name"), str)]
    return {"type": "object", "properties": {name: {"type": "string"} for name in names}}


async def fetch_catalog(route: RouteConfig, limits: LimitsConfig, *, prompts: bool = True) -> Catalog:
    """Connect to ``route``'s upstream and list its tools (and prompts); raises CatalogError."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=limits.upstream_connect_timeout_seconds)
    headers = {"User-Agent": f"mcp-auth-gateway/{__version__}", **{k: v.value for k, v in route.upstream_headers}}
    try:
        async with aiohttp.ClientSession(
            timeout=timeout, headers=headers, cookie_jar=aiohttp.DummyCookieJar(), trust_env=True
        ) as http:
            client: _Client = (
                _LegacySse(http, route, limits) if route.transport == "sse" else _StreamableHttp(http, route, limits)
            )
            try:
                capabilities = await client.start()
                tools = await _list(client, "tools/list", "tools") if "tools" in capabilities else []
                listed_prompts = (
                    await _list(client, "prompts/list", "prompts") if prompts and "prompts" in capabilities else []
                )
            finally:
                await client.close()
    except aiohttp.ConnectionTimeoutError:
        raise CatalogError(f"cannot connect within {limits.upstream_connect_timeout_seconds:g}s") from None
    except TimeoutError:
        raise CatalogError(f"no answer within {limits.upstream_timeout_seconds:g}s") from None
    except aiohttp.ClientConnectorError as exc:
        errno = exc.os_error.errno
        raise CatalogError(f"cannot connect: {os.strerror(errno) if errno else exc.os_error}") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise CatalogError(f"connection failed: {type(exc).__name__}") from None
    except EventTooLarge:
        raise CatalogError("an event on the stream is too large") from None
    named = _named(tools, lambda tool: tool.get("inputSchema"))
    definitions = {t["name"]: t for t in reversed(tools) if isinstance(t, dict) and isinstance(t.get("name"), str)}
    return Catalog(named, _named(listed_prompts, _prompt_arguments), tuple(definitions[name] for name in named))


def _prompt_arguments(prompt: dict[str, Any]) -> dict[str, Any]:
    arguments = prompt.get("arguments")
    return prompt_schema(arguments if isinstance(arguments, list) else [])


def _named(items: list[Any], schema_of: Any) -> dict[str, Mapping[str, Any]]:
    named: dict[str, Mapping[str, Any]] = {}
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"] not in named:
            schema = schema_of(item)
            # A missing or non-object schema declares no arguments: every args.NAME is then reported.
            named[item["name"]] = schema if isinstance(schema, dict) else {}
    return named


async def _list(client: _Client, method: str, key: str) -> list[Any]:
    items: list[Any] = []
    cursor: str | None = None
    seen: set[str] = set()
    for _ in range(MAX_PAGES):
        try:
            result = await client.request(method, {"cursor": cursor} if cursor is not None else {})
        except _MethodNotFound:
            if cursor is None:  # the capability is declared but the list is not served: nothing listed
                return []
            raise
        page = result.get(key)
        if not isinstance(page, list):
            raise CatalogError(f"{method}: the result has no '{key}' list")
        items.extend(page)
        if len(items) > MAX_ITEMS:
            raise CatalogError(f"{method}: more than {MAX_ITEMS} items")
        cursor = result.get("nextCursor")
        if not isinstance(cursor, str):
            return items
        if cursor in seen:
            raise CatalogError(f"{method}: the upstream repeats a cursor")
        seen.add(cursor)
    raise CatalogError(f"{method}: more than {MAX_PAGES} pages")


class _Client:
    def __init__(self, http: aiohttp.ClientSession, route: RouteConfig, limits: LimitsConfig) -> None:
        self._http = http
        self._route = route
        self._limits = limits
        self._next_id = 0

    async def start(self) -> Mapping[str, Any]:
        """The handshake; returns the server's capabilities."""
        params = {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "mcp-auth-gateway", "version": __version__},
        }
        result = await self.request("initialize", params)
        capabilities = result.get("capabilities")
        await self.notify("notifications/initialized")
        return capabilities if isinstance(capabilities, dict) else {}

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._next_id += 1
        message = {"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": params}
        async with asyncio.timeout(self._limits.upstream_timeout_seconds):
            answer = await self._exchange(message)
        if "error" in answer:
            error = answer["error"] if isinstance(answer["error"], dict) else {}
            if error.get("code") == METHOD_NOT_FOUND:
                raise _MethodNotFound(f"{method}: the upstream does not serve it")
            raise CatalogError(f"{method}: the upstream answered with error {error.get('code')}: {_text(error)}")
        result = answer.get("result")
        if not isinstance(result, dict):
            raise CatalogError(f"{method}: the answer has no result object")
        return result

    async def notify(self, method: str) -> None:
        async with asyncio.timeout(self._limits.upstream_timeout_seconds):
            await self._send({"jsonrpc": "2.0", "method": method})

    async def _exchange(self, message: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    async def _send(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def _check_status(self, response: aiohttp.ClientResponse, method: str, expected: tuple[int, ...]) -> None:
        if response.status in expected:
            return
        hint = " (does the route need upstream_headers?)" if response.status in (401, 403) else ""
        raise CatalogError(f"{method}: HTTP {response.status} from {self._route.upstream}{hint}")


class _StreamableHttp(_Client):
    def __init__(self, http: aiohttp.ClientSession, route: RouteConfig, limits: LimitsConfig) -> None:
        super().__init__(http, route, limits)
        self._session_id: str | None = None
        self._protocol: str | None = None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": _ACCEPT, "Content-Type": "application/json"}
        if self._session_id is not None:
            headers["Mcp-Session-Id"] = self._session_id
        if self._protocol is not None:
            headers["MCP-Protocol-Version"] = self._protocol
        return headers

    async def _exchange(self, message: dict[str, Any]) -> dict[str, Any]:
        method = message["method"]
        async with self._http.post(self._route.upstream, json=message, headers=self._headers()) as response:
            self._check_status(response, method, (200,))
            if method == "initialize":
                self._session_id = response.headers.get("Mcp-Session-Id")
            if response.content_type == "text/event-stream":
                answer = await _answer(_messages(response), message["id"], method)
            elif response.content_type == "application/json":
                answer = _json(await _read(response), method)
            else:
                raise CatalogError(f"{method}: unexpected Content-Type {response.content_type!r}")
        if not isinstance(answer, dict) or answer.get("id") != message["id"]:
            raise CatalogError(f"{method}: the answer is not the response to the request")
        if method == "initialize" and isinstance(answer.get("result"), dict):
            version = answer["result"].get("protocolVersion")
            self._protocol = version if isinstance(version, str) else None
        return answer

    async def _send(self, message: dict[str, Any]) -> None:
        async with self._http.post(self._route.upstream, json=message, headers=self._headers()) as response:
            self._check_status(response, message["method"], (200, 202, 204))

    async def close(self) -> None:
        if self._session_id is None:
            return
        # Best effort (MCP 2025-11-25 "Session Management": clients SHOULD end sessions they no longer need).
        try:
            async with asyncio.timeout(self._limits.upstream_connect_timeout_seconds):
                async with self._http.delete(self._route.upstream, headers=self._headers()):
                    pass
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass


class _LegacySse(_Client):
    def __init__(self, http: aiohttp.ClientSession, route: RouteConfig, limits: LimitsConfig) -> None:
        super().__init__(http, route, limits)
        self._stream: aiohttp.ClientResponse | None = None
        self._messages: AsyncIterator[Any] | None = None
        self._endpoint: str | None = None

    async def start(self) -> Mapping[str, Any]:
        sse_url = self._route.upstream + "/sse"
        async with asyncio.timeout(self._limits.upstream_timeout_seconds):
            self._stream = await self._http.get(sse_url, headers={"Accept": "text/event-stream"})
            self._check_status(self._stream, "GET /sse", (200,))
            events = _events(self._stream)
            async for event in events:
                if event.event == "endpoint":
                    self._endpoint = urljoin(sse_url, event.data.strip())
                    break
            else:
                raise CatalogError("GET /sse: the stream ended without an endpoint event")
            self._messages = _event_messages(events)
        if origin_of(self._endpoint) != origin_of(self._route.upstream):
            # The route's upstream_headers may carry credentials: they go nowhere else.
            raise CatalogError("GET /sse: the endpoint event points to another origin")
        return await super().start()

    async def _exchange(self, message: dict[str, Any]) -> dict[str, Any]:
        await self._send(message)
        assert self._messages is not None
        return await _answer(self._messages, message["id"], message["method"])

    async def _send(self, message: dict[str, Any]) -> None:
        assert self._endpoint is not None
        async with self._http.post(self._endpoint, json=message, headers={"Content-Type": "application/json"}) as r:
            self._check_status(r, message["method"], (200, 202, 204))

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.close()


async def _read(response: aiohttp.ClientResponse) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > MAX_RESPONSE_BYTES:
            raise CatalogError(f"a response is larger than {MAX_RESPONSE_BYTES} bytes")
    return bytes(body)


def _text(error: dict[str, Any]) -> str:
    """An upstream's error message for a log line: bounded, control characters (line breaks) removed."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", " ", str(error.get("message", "")))[:200]


def _json(raw: bytes | str, method: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise CatalogError(f"{method}: the answer is not JSON") from None


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[Any]:
    splitter = EventSplitter()
    async for chunk in response.content.iter_any():
        for raw in splitter.feed(chunk):
            yield parse_event(raw)


async def _event_messages(events: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for event in events:
        if event.event == "message" and event.data:
            yield event.data


async def _messages(response: aiohttp.ClientResponse) -> AsyncIterator[Any]:
    async for data in _event_messages(_events(response)):
        yield data


async def _answer(messages: AsyncIterator[Any], request_id: int, method: str) -> dict[str, Any]:
    """The response to ``request_id`` among the messages of a stream (notifications and server requests,
    which a client without capabilities need not answer, are skipped)."""
    seen = 0
    async for data in messages:
        message = _json(data, method)
        if isinstance(message, dict) and message.get("id") == request_id and message.keys() & {"result", "error"}:
            return message
        seen += 1
        if seen >= MAX_EVENTS:
            raise CatalogError(f"{method}: no answer among the first {MAX_EVENTS} messages")
    raise CatalogError(f"{method}: the stream ended without an answer")
