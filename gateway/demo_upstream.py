"""A deliberately naive MCP server for ``mcp-gateway demo``: the "legacy server with no authorization".

It speaks Streamable HTTP at protocol revision 2025-11-25 (answering every request with
``application/json``) on a single ``/mcp`` endpoint and trusts whoever reaches it — exactly the kind of
server the gateway exists to protect.  It is written with aiohttp only so the gateway package never
depends on the ``mcp`` SDK at runtime.

Behaviour worth knowing when reading gateway logs:

* ``initialize`` mints an ``Mcp-Session-Id``; every later message must carry a known one (400 without,
  404 for an unknown or ended session); ``DELETE /mcp`` ends a session; ``GET /mcp`` is 405 because this
  server never pushes server-initiated messages.
* A request for a method this server does not implement is answered with JSON-RPC ``-32601`` *before*
  any session check.  2026-07-28 clients (e.g. the ``mcp`` 2.x Python SDK in its default ``auto`` mode)
  open with a session-less ``server/discover`` probe and fall back to ``initialize`` on that error.
* The ``whoami`` tool reports which headers arrived, so the demo can show that the gateway strips the
  client's ``Authorization`` and adds ``X-Forwarded-*``.  It never echoes credential values.
* There is no ``Origin`` check: the demo binds loopback behind the gateway, which is where browser-facing
  checks belong.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = [
    "LATEST_PROTOCOL_VERSION",
    "SUPPORTED_PROTOCOL_VERSIONS",
    "describe_headers",
    "make_demo_upstream_app",
    "start_demo_upstream",
]

MCP_PATH = "/mcp"
LATEST_PROTOCOL_VERSION = "2025-11-25"
SUPPORTED_PROTOCOL_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26")
SERVER_INFO = {"name": "mcp-gateway-demo-upstream", "version": "1.0.0"}
MAX_SESSIONS = 1024  # oldest sessions are forgotten first, so a long-running demo cannot grow unbounded

SESSION_HEADER = "Mcp-Session-Id"
PROTOCOL_VERSION_HEADER = "MCP-Protocol-Version"

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602

# Header values whoami must never reveal, only report as present/absent.
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_FORWARDING_HEADERS = (
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-prefix",
)

JsonObject = dict[str, Any]
RequestId = str | int


@dataclass
class _Session:
    """What the server remembers per session: only the negotiated version (it has no per-user state)."""

    protocol_version: str


_SESSIONS_KEY = web.AppKey("demo_upstream_sessions", dict[str, _Session])


class _RpcError(Exception):
    """A JSON-RPC error to send back for the current request."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_TOOLS: list[JsonObject] = [
    {
        "name": "echo",
        "title": "Echo",
        "description": "Return the given text unchanged.",
        "inputSchema": {
            "type": "object",
            "properties": {"text": {"type": "string", "description": "Text to echo back"}},
            "required": ["text"],
            "additionalProperties": False,
        },
    },
    {
        "name": "add",
        "title": "Add",
        "description": "Add two numbers.",
        "inputSchema": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
    {
        "name": "whoami",
        "title": "Who am I",
        "description": (
            "Report which HTTP headers reached this server: whether an Authorization header arrived "
            "(never its value) and the X-Forwarded-* headers a gateway added."
        ),
        "inputSchema": {"type": "object", "properties": {}, "additionalProperties": False},
    },
]


def _text_result(text: str, structured: JsonObject | None = None) -> JsonObject:
    result: JsonObject = {"content": [{"type": "text", "text": text}], "isError": False}
    if structured is not None:
        result["structuredContent"] = structured
    return result


def _tool_error(text: str) -> JsonObject:
    """Argument problems are tool-execution errors (2025-11-25), so the model can see and correct them."""
    return {"content": [{"type": "text", "text": text}], "isError": True}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _call_echo(arguments: JsonObject, _request: web.Request) -> JsonObject:
    text = arguments.get("text")
    if not isinstance(text, str):
        return _tool_error("echo: 'text' must be a string")
    return _text_result(text)


def _call_add(arguments: JsonObject, _request: web.Request) -> JsonObject:
    a, b = arguments.get("a"), arguments.get("b")
    if not (_is_number(a) and _is_number(b)):
        return _tool_error("add: 'a' and 'b' must be numbers")
    total = a + b
    return _text_result(str(total), {"result": total})


def _call_whoami(_arguments: JsonObject, request: web.Request) -> JsonObject:
    report = describe_headers(request.headers)
    lines = [f"Authorization header: {report['authorization']}"]
    lines += [f"{name}: {value}" for name, value in report["forwarded"].items()] or ["no X-Forwarded-* headers"]
    return _text_result("\n".join(lines), report)


def describe_headers(headers: Mapping[str, str]) -> JsonObject:
    """Summarise request headers without leaking credentials.

    Returns ``{"authorization": "present" | "absent", "forwarded": {...}, "header_names": [...]}``.
    """
    names = sorted({name.lower() for name in headers})
    return {
        "authorization": "present" if "authorization" in names else "absent",
        "forwarded": {name: headers[name] for name in _FORWARDING_HEADERS if name in headers},
        "header_names": names,
        "redacted": [name for name in names if name in _SECRET_HEADERS],
    }


_TOOL_IMPLS: dict[str, Callable[[JsonObject, web.Request], JsonObject]] = {
    "echo": _call_echo,
    "add": _call_add,
    "whoami": _call_whoami,
}


def _handle_ping(_params: JsonObject, _request: web.Request) -> JsonObject:
    return {}


def _handle_tools_list(_params: JsonObject, _request: web.Request) -> JsonObject:
    return {"tools": _TOOLS}


def _handle_tools_call(params: JsonObject, request: web.Request) -> JsonObject:
    name = params.get("name")
    arguments = params.get("arguments", {})
    if not isinstance(name, str) or not isinstance(arguments, dict):
        raise _RpcError(INVALID_PARAMS, "tools/call needs a string 'name' and an object 'arguments'")
    impl = _TOOL_IMPLS.get(name)
    if impl is None:
        raise _RpcError(INVALID_PARAMS, f"Unknown tool: {name}")
    return impl(arguments, request)


# Methods valid inside a session (initialize is handled separately because it creates one).
_METHODS: dict[str, Callable[[JsonObject, web.Request], JsonObject]] = {
    "ping": _handle_ping,
    "tools/list": _handle_tools_list,
    "tools/call": _handle_tools_call,
}


def _rpc_error(request_id: RequestId | None, code: int, message: str, *, status: int = 200) -> web.Response:
    body = {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
    return web.json_response(body, status=status)


def _rpc_result(request_id: RequestId, result: JsonObject, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"jsonrpc": "2.0", "id": request_id, "result": result}, headers=headers)


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _initialize(app: web.Application, request_id: RequestId, params: JsonObject) -> web.Response:
    requested = params.get("protocolVersion")
    version = requested if requested in SUPPORTED_PROTOCOL_VERSIONS else LATEST_PROTOCOL_VERSION
    sessions = app[_SESSIONS_KEY]
    while len(sessions) >= MAX_SESSIONS:
        del sessions[next(iter(sessions))]
    session_id = secrets.token_hex(16)  # visible ASCII, unguessable
    sessions[session_id] = _Session(protocol_version=version)
    result = {
        "protocolVersion": version,
        "capabilities": {"tools": {}},
        "serverInfo": SERVER_INFO,
        "instructions": "Demo MCP server without any authorization of its own; reach it through the gateway.",
    }
    return _rpc_result(request_id, result, headers={SESSION_HEADER: session_id})


async def _handle_post(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _rpc_error(None, PARSE_ERROR, "Parse error: body is not valid JSON", status=400)
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        # Batches were removed in 2025-06-18; this server never accepted them.
        return _rpc_error(None, INVALID_REQUEST, "Invalid Request: expected one JSON-RPC 2.0 object", status=400)

    method = message.get("method")
    has_id = "id" in message
    if isinstance(method, str):
        is_request = has_id
        if is_request and not _valid_id(message["id"]):
            return _rpc_error(None, INVALID_REQUEST, "Invalid Request: id must be a string or integer", status=400)
    elif has_id and ("result" in message or "error" in message):
        is_request = False  # a response to a server request (this server sends none, but accept it)
    else:
        return _rpc_error(
            None, INVALID_REQUEST, "Invalid Request: neither request, notification nor response", status=400
        )
    request_id: RequestId | None = message["id"] if is_request else None
    params = message.get("params", {})
    if not isinstance(params, dict):
        return _rpc_error(request_id, INVALID_PARAMS, "params must be an object", status=400 if not is_request else 200)

    if is_request and method == "initialize":
        assert request_id is not None
        return _initialize(request.app, request_id, params)

    session_id = request.headers.get(SESSION_HEADER)
    if session_id is None:
        if is_request and method not in _METHODS:
            # Unknown to this server, so it cannot depend on a session: say so plainly.  This is what makes
            # a 2026-07-28 client's session-less `server/discover` probe fall back to `initialize`.
            return _rpc_error(request_id, METHOD_NOT_FOUND, f"Method not found: {method}")
        return _rpc_error(None, INVALID_REQUEST, f"Bad Request: missing {SESSION_HEADER} header", status=400)
    if session_id not in request.app[_SESSIONS_KEY]:
        return _rpc_error(None, INVALID_REQUEST, "Not Found: unknown or terminated session", status=404)

    version = request.headers.get(PROTOCOL_VERSION_HEADER)
    if version is not None and version not in SUPPORTED_PROTOCOL_VERSIONS:
        return _rpc_error(None, INVALID_REQUEST, f"Bad Request: unsupported protocol version {version}", status=400)

    if not is_request:
        return web.Response(status=202)  # notifications and responses: accepted, no body
    assert request_id is not None
    handler = _METHODS.get(method) if isinstance(method, str) else None
    if handler is None:
        return _rpc_error(request_id, METHOD_NOT_FOUND, f"Method not found: {method}")
    try:
        return _rpc_result(request_id, handler(params, request))
    except _RpcError as error:
        return _rpc_error(request_id, error.code, error.message)


async def _handle_delete(request: web.Request) -> web.Response:
    session_id = request.headers.get(SESSION_HEADER)
    if session_id is None:
        return _rpc_error(None, INVALID_REQUEST, f"Bad Request: missing {SESSION_HEADER} header", status=400)
    if request.app[_SESSIONS_KEY].pop(session_id, None) is None:
        return _rpc_error(None, INVALID_REQUEST, "Not Found: unknown or terminated session", status=404)
    return web.Response(status=204)


async def _handle_get(_request: web.Request) -> web.Response:
    # No server-initiated messages, hence no GET stream (the spec allows 405 here).
    raise web.HTTPMethodNotAllowed("GET", ["POST", "DELETE"])


def make_demo_upstream_app() -> web.Application:
    """Build the demo MCP server as an aiohttp application (sessions live in the app)."""
    app = web.Application()
    app[_SESSIONS_KEY] = {}
    routes: list[tuple[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("POST", _handle_post),
        ("DELETE", _handle_delete),
        ("GET", _handle_get),
    ]
    for method, handler in routes:
        app.router.add_route(method, MCP_PATH, handler)
    return app


async def start_demo_upstream(host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve the demo app on ``host:port`` (0 = ephemeral) and return the runner and the MCP URL.

    The caller owns the runner: ``await runner.cleanup()`` stops the server.
    """
    runner = web.AppRunner(make_demo_upstream_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    url_host = f"[{host}]" if ":" in host else host
    return runner, f"http://{url_host}:{bound_port}{MCP_PATH}"
