"""A deliberately lenient JSON-RPC (MCP Streamable HTTP) server: everything strict servers refuse, it honours.

Run as a subprocess (launched by :func:`tests.support.upstreams.start_lenient`)::

    python -m tests.support.lenient_server --transport streamable-json [--host 127.0.0.1]

It prints ``LISTENING http://HOST:PORT`` once it accepts connections, like
:mod:`tests.support.upstream_server`.

Why it exists: the gateway decides on its own reading of a request. Real servers read bodies in many
ways (Express's ``express.json()`` honours ``Content-Type`` charsets and ``Content-Encoding``; Node's
``TextDecoder`` replaces invalid UTF-8; JavaScript's ``JSON.parse`` keeps the last of duplicate keys
and turns ``1.0`` into ``1``; CGI-style servers merge ``Mcp_Name`` into ``Mcp-Name``). This server does
all of that at once, so a differential test can show whether any of those readings reaches a tool the
gateway denied. Every way it bends is listed here, because each one is an attack surface:

* ``Content-Encoding``: every listed layer is undone (gzip, x-gzip, deflate raw or zlib-wrapped); the
  server's own HTTP stack does not decompress (``auto_decompress=False``).
* ``Content-Type`` charset: any codec Python knows (utf-16, utf-32, utf-7, latin-1, ...); bytes that
  do not decode are replaced (U+FFFD), as ``TextDecoder`` does; a BOM is dropped.
* Leading and trailing Unicode whitespace (NBSP included) is ignored; several JSON documents in one
  body are all processed (NDJSON style); garbage after the first document is ignored.
* ``NaN``/``Infinity`` literals, integers of any length, nesting of any depth (parsed on a thread with
  a large stack and a high recursion limit - this is a separate process, so the gateway's own limits
  are untouched).
* Duplicate keys: the last wins (``JSON.parse``). Batches: non-object elements are skipped, nested
  arrays are flattened.
* Resource URIs are normalised before lookup: ``\\`` read as ``/``, percent-decoding, ``;params``
  dropped from segments (``..;``), dot segments resolved.
* Methods are matched case-insensitively and without surrounding spaces; ``Mcp-Method``/``Mcp-Name``
  headers (with ``_`` read as ``-``, as CGI does) override the body; a list as a tool name means its
  first element.
* Ids are echoed the way JavaScript would re-serialise them (``1.0`` -> ``1``, non-finite -> ``null``).
* Calls without an id (notifications) and with ``"id": null`` are executed too.
* ``GET /mcp`` opens an event stream that replays a ``tools/list`` result (as a resumed stream would:
  with ``Last-Event-ID`` it replays the last list result it answered on a POST) and then ends.

Test hooks: ``GET /_test/executed`` (names of the tools that ran and URIs of the resources read, in
order) and ``POST /_test/reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import concurrent.futures
import gzip
import json
import math
import posixpath
import sys
import threading
import zlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

from aiohttp import web

TOOLS = [
    {"name": "echo", "description": "Return the text", "inputSchema": {"type": "object"}},
    {"name": "secret_tool", "description": "Denied by the gateway's policy", "inputSchema": {"type": "object"}},
    {"name": "delete_everything", "description": "Denied by the gateway's policy", "inputSchema": {"type": "object"}},
]
TOOL_NAMES = frozenset(tool["name"] for tool in TOOLS)
RESOURCES = [
    {"uri": "file:///public/readme.txt", "name": "readme"},
    {"uri": "file:///secret/payroll.txt", "name": "payroll"},
]
SESSION_ID = "lenient-session"
MAX_FLATTEN_DEPTH = 64
MAX_DECODED_BYTES = 16 * 1024 * 1024
PARSE_STACK_BYTES = 256 * 1024 * 1024
PARSE_RECURSION_LIMIT = 100_000
GET_STREAM_END = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "end"}}

EXECUTED = web.AppKey("executed", list)
LAST_LIST = web.AppKey("last_list", dict)
PARSER = web.AppKey("parser", concurrent.futures.ThreadPoolExecutor)


def undo_encodings(body: bytes, header: str) -> bytes:
    """Undo every ``Content-Encoding`` layer, last applied first (RFC 9110 §8.4)."""
    for coding in reversed([c.strip().lower() for c in header.split(",") if c.strip()]):
        if coding in ("gzip", "x-gzip"):
            body = gzip.decompress(body)
        elif coding == "deflate":
            try:
                body = zlib.decompress(body)
            except zlib.error:
                body = zlib.decompress(body, -zlib.MAX_WBITS)
        elif coding != "identity":
            raise ValueError(f"unknown content-coding {coding!r}")
        if len(body) > MAX_DECODED_BYTES:
            raise ValueError("decoded body too large")
    return body


def charset_of(content_type: str) -> str:
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"') or "utf-8"
    return "utf-8"


def decode_text(body: bytes, charset: str) -> str:
    try:
        codec = codecs.lookup(charset).name
    except LookupError:
        codec = "utf-8"
    if codec == "utf-8":
        codec = "utf-8-sig"
    return body.decode(codec, errors="replace").lstrip("\ufeff")


def parse_documents(text: str) -> list[Any]:
    """Every JSON document in ``text``; stops quietly at the first thing that is not one."""
    decoder = json.JSONDecoder()
    documents: list[Any] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            return documents
        try:
            document, index = decoder.raw_decode(text, index)
        except ValueError:
            if documents:
                return documents
            raise
        documents.append(document)


def flatten(value: Any, depth: int = 0) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
    elif isinstance(value, list) and depth < MAX_FLATTEN_DEPTH:
        for item in value:
            yield from flatten(item, depth + 1)


def js_id(value: Any) -> Any:
    """The id as JavaScript's JSON.parse + JSON.stringify would send it back."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value.is_integer():
            return int(value)
    return value


def normalise_uri(uri: str) -> str:
    """``file:`` URIs the way a careless file server resolves them (RFC 3986 §5.2.4 after decoding)."""
    scheme, sep, rest = uri.replace("\\", "/").partition("://")
    if not sep:
        return uri
    host, _, path = rest.partition("/")
    segments = [segment.split(";", 1)[0] for segment in unquote(path).split("/")]
    resolved = posixpath.normpath("/" + "/".join(segments))
    return f"{scheme.lower()}://{host}{resolved}"


def header_view(request: web.Request) -> dict[str, str]:
    """Headers as a CGI gateway sees them: case-insensitive, '_' and '-' alike, the last copy wins."""
    return {name.lower().replace("_", "-"): value for name, value in request.headers.items()}


def dispatch(app: web.Application, message: dict[str, Any], headers: dict[str, str]) -> dict[str, Any] | None:
    method = headers.get("mcp-method", message.get("method"))
    if not isinstance(method, str):
        return None  # a response or garbage: nothing to answer
    method = method.strip().lower()
    has_id = "id" in message
    request_id = js_id(message.get("id"))
    params = message.get("params") if isinstance(message.get("params"), dict) else {}
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    if method == "initialize":
        version = params.get("protocolVersion", "2025-11-25")
        result = {
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": False}},
            "serverInfo": {"name": "lenient-test-upstream", "version": "1.0.0"},
        }
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method == "tools/call":
        name: Any = headers.get("mcp-name", params.get("name"))
        if isinstance(name, list) and name:
            name = name[0]
        name = str(name).strip() if name is not None else ""
        if name in TOOL_NAMES:
            app[EXECUTED].append(name)
            arguments = params.get("arguments") if isinstance(params.get("arguments"), dict) else {}
            text = str(arguments.get("text", "")) if name == "echo" else f"{name} executed"
            result = {"content": [{"type": "text", "text": text}]}
        else:
            error = {"code": -32602, "message": f"unknown tool {name!r}"}
    elif method == "resources/list":
        result = {"resources": RESOURCES}
    elif method == "resources/read":
        uri = normalise_uri(str(headers.get("mcp-name", params.get("uri", ""))))
        if any(resource["uri"] == uri for resource in RESOURCES):
            app[EXECUTED].append(uri)
            result = {"contents": [{"uri": uri, "text": f"contents of {uri}"}]}
        else:
            error = {"code": -32002, "message": f"unknown resource {uri!r}"}
    elif method.startswith("notifications/"):
        return None
    else:
        error = {"code": -32601, "message": f"method {method!r} not found"}
    if not has_id:
        return None
    answer: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id}
    if result is not None:
        answer["result"] = result
        if method == "tools/list":
            app[LAST_LIST] = answer
    else:
        answer["error"] = error
    return answer


def _error(status: int, code: int, message: str) -> web.Response:
    body = {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}
    return web.json_response(body, status=status)


def answer_body(app: web.Application, text: str, headers: dict[str, str]) -> tuple[int, bytes | None]:
    """Parse, execute and serialise one POST body (on the parser thread: any depth is fine there)."""
    try:
        documents = parse_documents(text.strip())
    except (ValueError, RecursionError):
        return 400, json.dumps(
            {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}}
        ).encode()
    messages = [m for document in documents for m in flatten(document)]
    answers = [a for a in (dispatch(app, m, headers) for m in messages) if a is not None]
    if not answers:
        return 202, None
    single = len(documents) == 1 and isinstance(documents[0], dict)
    return 200, json.dumps(answers[0] if single and len(answers) == 1 else answers).encode()


async def post_mcp(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    try:
        body = undo_encodings(raw, request.headers.get("Content-Encoding", ""))
    except (OSError, ValueError, zlib.error, EOFError) as exc:
        return _error(400, -32700, f"cannot undo content-encoding: {exc}")
    text = decode_text(body, charset_of(request.headers.get("Content-Type", "")))
    loop = asyncio.get_running_loop()
    status, payload = await loop.run_in_executor(
        request.app[PARSER], answer_body, request.app, text, header_view(request)
    )
    headers = {"Mcp-Session-Id": SESSION_ID}
    if payload is None:
        return web.Response(status=status, headers=headers)
    return web.Response(status=status, body=payload, content_type="application/json", headers=headers)


async def get_mcp(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    replay = request.app[LAST_LIST] if request.headers.get("Last-Event-ID") else None
    pushed = replay or {"jsonrpc": "2.0", "id": "server-push", "result": {"tools": TOOLS}}
    for number, message in enumerate((pushed, GET_STREAM_END), start=1):
        await response.write(f"id: {number}\ndata: {json.dumps(message)}\n\n".encode())
    await response.write_eof()
    return response


async def delete_mcp(request: web.Request) -> web.Response:
    return web.Response(status=204)


async def executed(request: web.Request) -> web.Response:
    return web.json_response(request.app[EXECUTED])


async def reset(request: web.Request) -> web.Response:
    request.app[EXECUTED].clear()
    return web.Response(status=204)


def build_app() -> web.Application:
    app = web.Application(client_max_size=MAX_DECODED_BYTES)
    app[EXECUTED] = []
    app[LAST_LIST] = {"jsonrpc": "2.0", "id": "nothing-listed-yet", "result": {"tools": TOOLS}}
    app[PARSER] = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    app.router.add_post("/mcp", post_mcp)
    app.router.add_get("/mcp", get_mcp)
    app.router.add_delete("/mcp", delete_mcp)
    app.router.add_get("/_test/executed", executed)
    app.router.add_post("/_test/reset", reset)
    return app


async def _exit_when_stdin_closes(stopped: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass
    stopped.set()


async def _serve(args: argparse.Namespace) -> None:
    runner = web.AppRunner(build_app(), access_log=None, auto_decompress=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = runner.addresses[0][1]
    sys.stdout.write(f"LISTENING http://{args.host}:{port}\n")
    sys.stdout.flush()
    stopped = asyncio.Event()
    watchdog = asyncio.create_task(_exit_when_stdin_closes(stopped)) if args.exit_on_stdin_eof else None
    try:
        await stopped.wait()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=["streamable-json"], default="streamable-json")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--exit-on-stdin-eof", action="store_true")
    args = parser.parse_args(argv)
    # Arbitrarily deep nesting and long integers, like JavaScript's JSON.parse; the parser thread is
    # created after this, so it gets the large stack.
    sys.setrecursionlimit(PARSE_RECURSION_LIMIT)
    sys.set_int_max_str_digits(0)
    threading.stack_size(PARSE_STACK_BYTES)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
