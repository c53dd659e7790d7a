"""Differential test: one attack corpus, sent through the gateway to four kinds of real upstream.

The gateway decides on its own reading of a request body; whatever it forwards, the upstream reads
again, its own way. Every request below is built so that the two readings may differ: charsets
(utf-16/32, utf-7, latin-1), content codings (one and two layers), invalid and overlong UTF-8, a BOM,
duplicate keys, batches holding non-objects, deep nesting, ids that do not survive a round trip
(``1.0``, ``1e0``, integers beyond 2**53), method case, mirror headers (``Mcp-Method``/``Mcp-Name``,
and their CGI twins ``Mcp_Method``/``Mcp_Name``), ``NaN``, trailing garbage, concatenated documents.

The route's policy allows ``echo`` and denies each upstream's dangerous tool. For every case and
upstream the test asserts what the gateway promises whatever the body: the denied tool never ran
(witnessed at the upstream), no ``tools/list`` result that reaches the client names it, and the
gateway never answers 500.

The upstreams, and how each one witnesses an execution:

* ``python-sdk``: the official Python SDK server (tests/support/upstream_server.py); its recorder
  lists every JSON-RPC message that reached it, so a denied ``tools/call`` that *reached* it counts.
* ``everything``: ``@modelcontextprotocol/server-everything``; its denied tool ``get-env`` returns the
  server's environment, which holds ``EXIT_ON_STDIN_EOF`` (set by the launcher): seeing that name in
  an answer means the tool ran.
* ``ts-express``: the TypeScript SDK's Streamable HTTP server on Express (tests/node/ts_express_server.mjs),
  which records executions.
* ``lenient``: tests/support/lenient_server.py, which honours everything strict servers refuse and
  records executions.

``test_detectors_see_a_denied_call_sent_directly`` shows that each witness does see the denied call
when the gateway is bypassed, so a passing case is not a blind witness.

The rest of the module covers what the corpus cannot: list results on streams where the gateway
tracks no request (a GET stream, a stream resumed with ``Last-Event-ID``, the legacy transport with a
repeated ``session_id``), resource URIs that a server resolves to a denied one (dot segments, encoded
``.`` and ``/``, ``\\``, ``..;``), and attacker-sized names kept out of the audit trail.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import subprocess
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.devidp import DevIdentityProvider
from tests.support.harness import GatewayHarness, running_gateway
from tests.support.mcp_http import (
    ACCEPT,
    INITIALIZED,
    MAX_EVENTS,
    PROTOCOL,
    WAIT,
    initialize_request,
    legacy_handshake,
    open_legacy_stream,
    read_event,
    response_message,
)
from tests.support.node import EverythingServer, TsExpressServer, node_bin, start_ts_express
from tests.support.upstreams import RunningUpstream, start_lenient

DENIED_TOOLS = ["secret_tool", "delete_everything", "get-env"]
TOOL_RULES = [{"groups": ["*"], "allow": ["echo"], "deny": DENIED_TOOLS}]
RESOURCE_RULES = [{"groups": ["*"], "allow": ["file:///public/*"]}]
DENIED_RESOURCE = "file:///secret/payroll.txt"
ATTACKER_SIZED = 64 * 1024
MAX_AUDIT_LINE = 4096
EVERYTHING_MARKER = b"EXIT_ON_STDIN_EOF"
MAX_ANSWER_BYTES = 4 * 1024 * 1024
DEEP = 5000  # beyond any recursion limit a Python or Node parser has by default


@dataclass(frozen=True)
class Target:
    """One upstream kind behind its own gateway route."""

    name: str
    route: str
    denied: str
    echo_arguments: dict[str, Any]


TARGETS = [
    Target("python-sdk", "py", "delete_everything", {"text": "hi"}),
    Target("everything", "everything", "get-env", {"message": "hi"}),
    Target("ts-express", "ts", "secret_tool", {"text": "hi"}),
    Target("lenient", "lenient", "secret_tool", {"text": "hi"}),
]


@dataclass(frozen=True)
class Attack:
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str | None = "application/json"


# -- building blocks -----------------------------------------------------------------------------


def js(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def in_charset(value: Any, encoding: str) -> bytes:
    """``value`` as JSON text with non-ASCII characters left unescaped, encoded in ``encoding``."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode(encoding)


def denied_call(t: Target, request_id: Any = 1, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": t.denied, **params}}


def echo_call(t: Target, request_id: Any = 2) -> dict[str, Any]:
    params = {"name": "echo", "arguments": t.echo_arguments}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


def listing(request_id: Any = 3, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/list", "params": params}


def raw_id(message: dict[str, Any], literal: str) -> bytes:
    """``message`` with its id written as ``literal`` (a JSON number as typed: ``1.0``, ``1e0``)."""
    return js({**message, "id": "@ID@"}).replace(b'"@ID@"', literal.encode())


def with_bytes(message: dict[str, Any], placeholder: str, raw: bytes) -> bytes:
    """``message`` serialised, with the string ``placeholder`` replaced by raw (possibly invalid) bytes."""
    return js(message).replace(placeholder.encode(), raw)


def deep_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def with_deep_arguments(message: dict[str, Any], nested: str) -> bytes:
    return js({**message, "params": {**message["params"], "arguments": "@DEEP@"}}).replace(
        b'"@DEEP@"', b'{"x":' + nested.encode() + b"}"
    )


def charset(name: str) -> str:
    return f"application/json; charset={name}"


def overlong(char: str) -> bytes:
    """A 2-byte overlong UTF-8 encoding of an ASCII character (RFC 3629 §3 forbids it)."""
    code = ord(char)
    return bytes([0xC0 | (code >> 6), 0x80 | (code & 0x3F)])


def utf7_key(key: str) -> str:
    """``key`` written in UTF-7's base64 form: plain ASCII to a UTF-8 reader, ``key`` to a UTF-7 one."""
    encoded = base64.b64encode(key.encode("utf-16-be")).decode().rstrip("=")
    return f"+{encoded}-"


def brotli(data: bytes) -> bytes:
    """Brotli-compress with Node's zlib (the Python venv has no brotli module; Express decodes ``br``)."""
    script = "process.stdout.write(require('zlib').brotliCompressSync(require('fs').readFileSync(0)))"
    return subprocess.run([node_bin(), "-e", script], input=data, capture_output=True, check=True, timeout=30).stdout


def encoded(coding: str, data: bytes) -> Attack:
    return Attack(data, [("Content-Encoding", coding)])


# -- the corpus ----------------------------------------------------------------------------------

Builder = Callable[[Target], Attack]
CASES: dict[str, Builder] = {
    # Charsets: the gateway reads UTF-8 (json.loads also sniffs UTF-16/32); a server may honour the label.
    "charset-utf-16le": lambda t: Attack(in_charset(denied_call(t), "utf-16-le"), [], charset("utf-16le")),
    "charset-utf-16-bom": lambda t: Attack(in_charset(denied_call(t), "utf-16"), [], charset("utf-16")),
    "charset-utf-16be": lambda t: Attack(in_charset(denied_call(t), "utf-16-be"), [], charset("utf-16be")),
    "charset-utf-32": lambda t: Attack(in_charset(denied_call(t), "utf-32"), [], charset("utf-32")),
    # Valid UTF-8 JSON whose params hold "name": "echo" and an odd ASCII key; read as UTF-7 that key is
    # "name" again, and the last duplicate wins: the denied tool.
    "charset-utf-7-polyglot": lambda t: Attack(
        js({**echo_call(t), "params": {**echo_call(t)["params"], utf7_key("name"): t.denied}}), [], charset("utf-7")
    ),
    "charset-latin-1": lambda t: Attack(
        in_charset(denied_call(t, arguments={"text": "caf\u00e9"}), "latin-1"), [], charset("iso-8859-1")
    ),
    "charset-unknown-label": lambda t: Attack(js(denied_call(t)), [], charset("x-no-such-charset")),
    "content-type-text-plain": lambda t: Attack(js(denied_call(t)), [], "text/plain"),
    "content-type-missing": lambda t: Attack(js(denied_call(t)), [], None),
    # Content codings: the server stack under the gateway undoes one gzip/deflate layer.
    "gzip": lambda t: encoded("gzip", gzip.compress(js(denied_call(t)))),
    "deflate": lambda t: encoded("deflate", zlib.compress(js(denied_call(t)))),
    "br": lambda t: encoded("br", brotli(js(denied_call(t)))),
    "identity": lambda t: encoded("identity", js(denied_call(t))),
    "gzip-twice-declared-once": lambda t: encoded("gzip", gzip.compress(gzip.compress(js(denied_call(t))))),
    "gzip-twice-declared-twice": lambda t: encoded("gzip, gzip", gzip.compress(gzip.compress(js(denied_call(t))))),
    "deflate-then-gzip": lambda t: encoded("deflate, gzip", gzip.compress(zlib.compress(js(denied_call(t))))),
    "x-gzip": lambda t: encoded("x-gzip", gzip.compress(js(denied_call(t)))),
    "gzip-declared-body-plain": lambda t: encoded("gzip", js(denied_call(t))),
    "deflate-declared-body-gzip": lambda t: encoded("deflate", gzip.compress(js(denied_call(t)))),
    # UTF-8 that is not UTF-8 (RFC 3629): decoders that replace instead of refusing read on.
    "invalid-utf8-in-arguments": lambda t: Attack(
        with_bytes(denied_call(t, arguments={"text": "@BAD@"}), "@BAD@", b"\xff\xfe")
    ),
    "invalid-utf8-in-name": lambda t: Attack(with_bytes(denied_call(t), t.denied, t.denied.encode() + b"\xff")),
    "invalid-utf8-in-extra-key": lambda t: Attack(with_bytes({**denied_call(t), "@BAD@": 1}, "@BAD@", b"x\x80")),
    "overlong-utf8-in-arguments": lambda t: Attack(
        with_bytes(denied_call(t, arguments={"text": "@BAD@"}), "@BAD@", overlong("/"))
    ),
    "overlong-utf8-in-name": lambda t: Attack(
        with_bytes(denied_call(t), t.denied, overlong(t.denied[0]) + t.denied[1:].encode())
    ),
    "utf8-encoded-surrogate-in-arguments": lambda t: Attack(
        with_bytes(denied_call(t, arguments={"text": "@BAD@"}), "@BAD@", b"\xed\xa0\x80")
    ),
    "utf8-bom": lambda t: Attack(b"\xef\xbb\xbf" + js(denied_call(t))),
    "utf8-bom-batch": lambda t: Attack(b"\xef\xbb\xbf" + js([echo_call(t), denied_call(t)])),
    "unicode-escape-in-name": lambda t: Attack(
        with_bytes(denied_call(t), t.denied, f"\\u{ord(t.denied[0]):04x}".encode() + t.denied[1:].encode())
    ),
    "unicode-escape-in-method": lambda t: Attack(with_bytes(denied_call(t), "tools/call", b"tools\\u002fcall")),
    # Duplicate keys (JSON.parse and Python keep the last; other parsers keep the first).
    "duplicate-name-denied-last": lambda t: Attack(
        js(echo_call(t)).replace(b'"name":"echo"', b'"name":"echo","name":"' + t.denied.encode() + b'"')
    ),
    "duplicate-name-denied-first": lambda t: Attack(
        js(echo_call(t)).replace(b'"name":"echo"', b'"name":"' + t.denied.encode() + b'","name":"echo"')
    ),
    "duplicate-method": lambda t: Attack(
        js(denied_call(t)).replace(b'"method":"tools/call"', b'"method":"tools/list","method":"tools/call"')
    ),
    "duplicate-params": lambda t: Attack(js(denied_call(t))[:-1] + b',"params":' + js(denied_call(t)["params"]) + b"}"),
    # Batches.
    "batch-echo-and-denied": lambda t: Attack(js([echo_call(t), denied_call(t)])),
    "batch-number-element": lambda t: Attack(js([1, denied_call(t)])),
    "batch-null-element": lambda t: Attack(js([None, denied_call(t)])),
    "batch-string-element": lambda t: Attack(js(["x", denied_call(t)])),
    "batch-nested-array": lambda t: Attack(js([[denied_call(t)]])),
    "batch-empty-array-element": lambda t: Attack(js([[], denied_call(t)])),
    # Nesting.
    "deep-nesting-150": lambda t: Attack(with_deep_arguments(denied_call(t), deep_array(150))),
    "deep-nesting-arrays": lambda t: Attack(with_deep_arguments(denied_call(t), deep_array(DEEP))),
    "deep-nesting-objects": lambda t: Attack(with_deep_arguments(denied_call(t), deep_object(DEEP))),
    # Ids.
    "id-1.0": lambda t: Attack(raw_id(denied_call(t), "1.0")),
    "id-1e0": lambda t: Attack(raw_id(denied_call(t), "1e0")),
    "id-beyond-2^64": lambda t: Attack(raw_id(denied_call(t), str(2**64 + 1))),
    "id-5000-digits": lambda t: Attack(raw_id(denied_call(t), "9" * 5000)),
    "id-object": lambda t: Attack(js(denied_call(t, request_id={"a": 1}))),
    "id-array": lambda t: Attack(js(denied_call(t, request_id=[1]))),
    "id-true": lambda t: Attack(js(denied_call(t, request_id=True))),
    "id-null": lambda t: Attack(js(denied_call(t, request_id=None))),
    "id-missing": lambda t: Attack(js({k: v for k, v in denied_call(t).items() if k != "id"})),
    "id-nan": lambda t: Attack(raw_id(denied_call(t), "NaN")),
    # Methods and names.
    "method-upper-case": lambda t: Attack(js({**denied_call(t), "method": "TOOLS/CALL"})),
    "method-mixed-case": lambda t: Attack(js({**denied_call(t), "method": "Tools/Call"})),
    "method-padded": lambda t: Attack(js({**denied_call(t), "method": " tools/call "})),
    "name-padded": lambda t: Attack(js(denied_call(t, name=f" {t.denied} "))),
    "name-as-list": lambda t: Attack(js(denied_call(t, name=[t.denied]))),
    "name-as-number": lambda t: Attack(js(denied_call(t, name=1))),
    # Mirror headers (MCP 2026-07-28 Mcp-Method / Mcp-Name) and their CGI-style twins.
    "mcp-name-header-disagrees": lambda t: Attack(
        js(echo_call(t)), [("Mcp-Method", "tools/call"), ("Mcp-Name", t.denied)]
    ),
    "mcp-method-header-disagrees": lambda t: Attack(
        js(listing(name=t.denied)), [("Mcp-Method", "tools/call"), ("Mcp-Name", t.denied)]
    ),
    "mcp-name-header-repeated": lambda t: Attack(
        js(echo_call(t)), [("Mcp-Method", "tools/call"), ("Mcp-Name", "echo"), ("Mcp-Name", t.denied)]
    ),
    "mcp-name-header-base64": lambda t: Attack(
        js(echo_call(t)),
        [("Mcp-Method", "tools/call"), ("Mcp-Name", "=?base64?" + base64.b64encode(t.denied.encode()).decode() + "?=")],
    ),
    "mcp-name-underscore-header": lambda t: Attack(js(echo_call(t)), [("Mcp_Name", t.denied)]),
    "mcp-method-underscore-header": lambda t: Attack(js(listing(name=t.denied)), [("Mcp_Method", "tools/call")]),
    # Literals and framing.
    "nan-in-arguments": lambda t: Attack(with_bytes(denied_call(t, arguments={"x": "@N@"}), '"@N@"', b"NaN")),
    "infinity-in-arguments": lambda t: Attack(
        with_bytes(denied_call(t, arguments={"x": "@N@"}), '"@N@"', b"-Infinity")
    ),
    "trailing-garbage": lambda t: Attack(js(denied_call(t)) + b" garbage"),
    "trailing-nul": lambda t: Attack(js(denied_call(t)) + b"\x00"),
    "two-documents": lambda t: Attack(js(echo_call(t)) + js(denied_call(t))),
    "two-documents-ndjson": lambda t: Attack(js(echo_call(t)) + b"\n" + js(denied_call(t)) + b"\n"),
    "leading-nbsp": lambda t: Attack("\u00a0".encode() + js(denied_call(t))),
    "leading-vertical-tab": lambda t: Attack(b"\x0b" + js(denied_call(t))),
    "empty-body": lambda t: Attack(b""),
    "json-null-body": lambda t: Attack(b"null"),
    "json-string-body": lambda t: Attack(js(js(denied_call(t)).decode())),
    # tools/list results that must be filtered however the request was spelled.
    "list-plain": lambda t: Attack(js(listing())),
    "list-id-1.0": lambda t: Attack(raw_id(listing(), "1.0")),
    "list-id-1e0": lambda t: Attack(raw_id(listing(), "1e0")),
    "list-id-beyond-2^53": lambda t: Attack(raw_id(listing(), str(2**53 + 1))),
    "list-id-5000-digits": lambda t: Attack(raw_id(listing(), "9" * 5000)),
    "list-id-null": lambda t: Attack(js(listing(request_id=None))),
    "list-method-case": lambda t: Attack(js({**listing(), "method": "Tools/List"})),
    "list-invalid-utf8": lambda t: Attack(with_bytes(listing(_meta={"x": "@BAD@"}), "@BAD@", b"\xff")),
    "list-deep-nesting": lambda t: Attack(
        js(listing(_meta={"x": "@DEEP@"})).replace(b'"@DEEP@"', deep_array(DEEP).encode())
    ),
    "list-duplicate-id-in-batch": lambda t: Attack(js([listing(7), listing(7)])),
    "list-batch-with-number": lambda t: Attack(js([1, listing()])),
    "list-trailing-garbage": lambda t: Attack(js(listing()) + b" x"),
    "list-gzip-twice": lambda t: encoded("gzip", gzip.compress(gzip.compress(js(listing())))),
    "list-charset-latin-1": lambda t: Attack(
        in_charset(listing(_meta={"x": "caf\u00e9"}), "latin-1"), [], charset("latin-1")
    ),
}


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ts_express() -> Iterator[TsExpressServer]:
    with start_ts_express() as server:
        yield server


@pytest.fixture(scope="module")
def lenient() -> Iterator[RunningUpstream]:
    with start_lenient() as server:
        yield server


@pytest.fixture(scope="module")
def audit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("differential") / "audit.log"


@pytest.fixture(scope="module")
async def gateway(
    idp: DevIdentityProvider,
    upstream_json: RunningUpstream,
    upstream_legacy: RunningUpstream,
    everything: EverythingServer,
    ts_express: TsExpressServer,
    lenient: RunningUpstream,
    audit_file: Path,
) -> AsyncIterator[GatewayHarness]:
    upstreams = {"py": upstream_json, "everything": everything, "ts": ts_express, "lenient": lenient}
    rules = {"tools": TOOL_RULES, "resources": RESOURCE_RULES}
    routes = [
        {"name": route, "path": f"/{route}/mcp", "upstream": server.mcp_url, **rules}
        for route, server in upstreams.items()
    ]
    routes.append(
        {"name": "legacy", "path": "/legacy", "upstream": upstream_legacy.base_url, "transport": "sse", **rules}
    )
    async with running_gateway(idp, routes, audit={"sink": str(audit_file)}) as harness:
        yield harness


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@dataclass
class Session:
    """An initialized MCP session with one upstream: through the gateway, or straight to it."""

    url: str
    headers: dict[str, str]


async def open_mcp_session(http: aiohttp.ClientSession, url: str, token: str | None = None) -> Session:
    headers = {"Accept": ACCEPT}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with asyncio.timeout(WAIT):
        async with http.post(url, json=initialize_request(), headers=headers) as response:
            assert response.status == 200, await response.text()
            headers |= {"Mcp-Session-Id": response.headers["Mcp-Session-Id"], "MCP-Protocol-Version": PROTOCOL}
            await response.read()
        async with http.post(url, json=INITIALIZED, headers=headers) as response:
            assert response.status == 202, await response.text()
    return Session(url, headers)


@pytest.fixture(scope="module")
async def sessions(gateway: GatewayHarness, http: aiohttp.ClientSession) -> dict[str, Session]:
    """One session per upstream through the gateway, with one access token per route."""
    result = {}
    for target in TARGETS:
        token = await gateway.access_token(target.route)
        result[target.name] = await open_mcp_session(http, gateway.route_url(target.route), token)
    return result


@dataclass(frozen=True)
class Witness:
    """How one upstream kind shows that the denied tool ran: ``ran(target, raw answer bytes)``."""

    reset: Callable[[], None]
    ran: Callable[[Target, bytes], bool]


@pytest.fixture(scope="module")
def witnesses(
    upstream_json: RunningUpstream, ts_express: TsExpressServer, lenient: RunningUpstream
) -> dict[str, Witness]:
    return {
        "python-sdk": Witness(upstream_json.reset, lambda t, _: _reached_sdk(upstream_json, t.denied)),
        "everything": Witness(lambda: None, lambda _, answer: EVERYTHING_MARKER in answer),
        "ts-express": Witness(ts_express.reset, lambda t, _: t.denied in ts_express.executed()),
        "lenient": Witness(lenient.reset, lambda t, _: t.denied in lenient.executed()),
    }


def _reached_sdk(upstream: RunningUpstream, tool: str) -> bool:
    return any(e["method"] == "tools/call" and e["name"] == tool for e in upstream.recorded())


# -- sending and reading -------------------------------------------------------------------------


async def send(
    http: aiohttp.ClientSession, session: Session, attack: Attack, method: str = "POST"
) -> tuple[int, str, bytes]:
    """Send ``attack`` on ``session``; the status, content type and whole answer (bounded in time and size)."""
    headers = list(session.headers.items()) + attack.headers
    skip = ()
    if attack.content_type is None:
        skip = ("Content-Type",)
    else:
        headers.append(("Content-Type", attack.content_type))
    async with asyncio.timeout(WAIT):
        async with http.request(
            method, session.url, data=attack.body, headers=headers, skip_auto_headers=skip
        ) as response:
            answer = await response.content.read(MAX_ANSWER_BYTES)
            return response.status, response.headers.get("Content-Type", ""), answer


def messages_in(content_type: str, answer: bytes) -> list[dict[str, Any]]:
    """The JSON-RPC messages in an answer, JSON or SSE (written independently of the gateway's parser)."""
    if content_type.startswith("text/event-stream"):
        documents = []
        for block in answer.decode(errors="replace").replace("\r\n", "\n").split("\n\n"):
            data = [line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:")]
            if data:
                documents.append("\n".join(data))
    elif content_type.startswith("application/json"):
        documents = [answer.decode(errors="replace")]
    else:
        return []
    messages: list[dict[str, Any]] = []
    for document in documents:
        try:
            # Integers of any length (Python refuses to convert more than 4300 digits by default).
            parsed = json.loads(document, parse_int=lambda digits: digits if len(digits) > 4000 else int(digits))
        except ValueError:
            continue
        messages.extend(m for m in (parsed if isinstance(parsed, list) else [parsed]) if isinstance(m, dict))
    return messages


def listed_tools(messages: list[dict[str, Any]]) -> set[str]:
    names = set()
    for message in messages:
        result = message.get("result")
        tools = result.get("tools") if isinstance(result, dict) else None
        if isinstance(tools, list):
            names.update(t["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str))
    return names


# -- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
@pytest.mark.parametrize("case", list(CASES))
async def test_attack_never_runs_or_lists_a_denied_tool(
    case: str,
    target: Target,
    sessions: dict[str, Session],
    witnesses: dict[str, Witness],
    http: aiohttp.ClientSession,
) -> None:
    attack = CASES[case](target)
    witness = witnesses[target.name]
    witness.reset()
    status, content_type, answer = await send(http, sessions[target.name], attack)
    shown = answer[:600]
    assert status != 500, f"{case} on {target.name}: 500 ({content_type}): {shown!r}"
    assert not witness.ran(target, answer), f"{case}: denied {target.denied} ran on {target.name}: {status} {shown!r}"
    listed = listed_tools(messages_in(content_type, answer))
    assert target.denied not in listed, f"{case}: {target.name} listed {target.denied} to the client: {shown!r}"


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
async def test_echo_still_runs_through_the_gateway(
    target: Target, sessions: dict[str, Session], http: aiohttp.ClientSession
) -> None:
    """The control: a plain permitted call works on every upstream, so a silent one is not a dead one."""
    status, content_type, answer = await send(http, sessions[target.name], Attack(js(echo_call(target, 9))))
    assert status == 200, answer
    (message,) = [m for m in messages_in(content_type, answer) if m.get("id") == 9]
    assert "hi" in message["result"]["content"][0]["text"]
    status, content_type, answer = await send(http, sessions[target.name], Attack(js(listing(10))))
    tools = listed_tools(messages_in(content_type, answer))
    assert "echo" in tools
    assert target.denied not in tools


PERMITTED_VARIANTS: dict[str, Builder] = {
    "gzip": lambda t: encoded("gzip", gzip.compress(js(echo_call(t, 12)))),
    "deflate": lambda t: encoded("deflate", zlib.compress(js(echo_call(t, 12)))),
}


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
@pytest.mark.parametrize("variant", list(PERMITTED_VARIANTS))
async def test_permitted_call_in_an_accepted_encoding_still_runs(
    variant: str, target: Target, sessions: dict[str, Session], http: aiohttp.ClientSession
) -> None:
    """What the gateway accepts it forwards in one plain form (the content coding its server stack
    undid is gone), so every upstream runs the permitted call."""
    status, content_type, answer = await send(http, sessions[target.name], PERMITTED_VARIANTS[variant](target))
    assert status == 200, answer[:600]
    results = [m for m in messages_in(content_type, answer) if m.get("id") == 12 and "result" in m]
    assert results, answer[:600]
    assert "hi" in results[0]["result"]["content"][0]["text"]


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
async def test_detectors_see_a_denied_call_sent_directly(
    target: Target,
    upstream_json: RunningUpstream,
    everything: EverythingServer,
    ts_express: TsExpressServer,
    lenient: RunningUpstream,
    witnesses: dict[str, Witness],
    http: aiohttp.ClientSession,
) -> None:
    """Bypassing the gateway, the denied call runs and its witness says so (the witnesses are not blind)."""
    url = {"python-sdk": upstream_json, "everything": everything, "ts-express": ts_express, "lenient": lenient}
    session = await open_mcp_session(http, url[target.name].mcp_url)
    witness = witnesses[target.name]
    witness.reset()
    _, _, answer = await send(http, session, Attack(js(denied_call(target))))
    assert witness.ran(target, answer), answer[:600]


# -- resource URIs -------------------------------------------------------------------------------

URI_TRICKS = {
    "plain": DENIED_RESOURCE,
    "dot-segments": "file:///public/../secret/payroll.txt",
    "deeper-dot-segments": "file:///public/x/../../secret/payroll.txt",
    "encoded-dots": "file:///public/%2e%2e/secret/payroll.txt",
    "encoded-dots-upper": "file:///public/%2E%2E/secret/payroll.txt",
    "encoded-slash": "file:///public/..%2fsecret/payroll.txt",
    "all-encoded": "file:///public/%2e%2e%2fsecret%2fpayroll.txt",
    "backslash": "file:///public/..\\secret/payroll.txt",
    "dot-dot-semicolon": "file:///public/..;/secret/payroll.txt",
    "dot-semicolon": "file:///public/.;/../secret/payroll.txt",
}


@pytest.mark.parametrize("uri", list(URI_TRICKS.values()), ids=list(URI_TRICKS))
async def test_resource_uri_tricks_never_read_a_denied_resource(
    uri: str, sessions: dict[str, Session], lenient: RunningUpstream, http: aiohttp.ClientSession
) -> None:
    """Only ``file:///public/*`` is allowed; the lenient upstream resolves dot segments, decodes
    ``%2e``/``%2f``, reads ``\\`` as ``/`` and drops ``;params`` before it looks a URI up."""
    lenient.reset()
    message = {"jsonrpc": "2.0", "id": 13, "method": "resources/read", "params": {"uri": uri}}
    status, _, answer = await send(http, sessions["lenient"], Attack(js(message)))
    assert status != 500, answer[:600]
    assert DENIED_RESOURCE not in lenient.executed(), f"{uri} read {DENIED_RESOURCE}: {answer[:600]!r}"


async def audit_lines_of(audit_file: Path, request_id: str) -> list[str]:
    """Every audit line so far, once the line of ``request_id`` is on disk (written asynchronously)."""
    async with asyncio.timeout(WAIT):
        while True:
            lines = audit_file.read_text(errors="replace").splitlines() if audit_file.exists() else []
            if any(request_id in line for line in lines):
                return lines
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("kind", ["tool-name", "resource-uri"])
async def test_attacker_sized_names_stay_out_of_the_audit_trail(
    kind: str, sessions: dict[str, Session], audit_file: Path, http: aiohttp.ClientSession
) -> None:
    """Names and URIs far over any sane size are refused before a decision: never a 500, and never
    copied into an audit line (or a decision cache)."""
    if kind == "tool-name":
        message = {
            "jsonrpc": "2.0",
            "id": 14,
            "method": "tools/call",
            "params": {"name": "echo" + "x" * ATTACKER_SIZED},
        }
    else:
        uri = "file:///public/" + "a" * ATTACKER_SIZED
        message = {"jsonrpc": "2.0", "id": 14, "method": "resources/read", "params": {"uri": uri}}
    session = sessions["lenient"]
    async with asyncio.timeout(WAIT):
        headers = {**session.headers, "Content-Type": "application/json"}
        async with http.post(session.url, data=js(message), headers=headers) as response:
            assert response.status != 500, await response.text()
            request_id = response.headers["X-Request-Id"]
            answer = await response.read()
    assert b"error" in answer, answer[:600]
    lines = await audit_lines_of(audit_file, request_id)
    longest = max(len(line) for line in lines)
    assert longest <= MAX_AUDIT_LINE, f"an audit line of {longest} bytes"


# -- list results the gateway never asked for ----------------------------------------------------


async def first_result(content: aiohttp.StreamReader) -> list[dict[str, Any]]:
    """Messages of an event stream up to and including the first JSON-RPC result."""
    messages: list[dict[str, Any]] = []
    for _ in range(MAX_EVENTS):
        event = await read_event(content)
        if event is None:
            break
        if event.data:
            messages.append(json.loads(event.data))
            if "result" in messages[-1]:
                break
    return messages


async def test_list_result_pushed_on_a_get_stream_is_filtered(
    sessions: dict[str, Session], http: aiohttp.ClientSession
) -> None:
    """The lenient upstream sends a ``tools/list`` result on its GET stream, where the gateway tracks
    no request: a list result is filtered for the stream's principal wherever it appears."""
    session = sessions["lenient"]
    async with asyncio.timeout(WAIT):
        async with http.get(session.url, headers={**session.headers, "Accept": "text/event-stream"}) as response:
            assert response.status == 200, await response.text()
            messages = await first_result(response.content)
    assert listed_tools(messages), messages  # the list result did arrive
    assert "secret_tool" not in listed_tools(messages), messages


RESUMABLE = [t for t in TARGETS if t.name in ("everything", "ts-express", "lenient")]


@pytest.mark.parametrize("target", RESUMABLE, ids=[t.name for t in RESUMABLE])
async def test_list_result_replayed_on_resumption_is_filtered(
    target: Target, sessions: dict[str, Session], http: aiohttp.ClientSession
) -> None:
    """A client resumes a ``tools/list`` POST stream with ``Last-Event-ID`` (Streamable HTTP
    resumability): the upstream replays the list result on a GET stream, long after the gateway
    stopped tracking that request id. It must still be filtered."""
    session = sessions[target.name]
    _, content_type, answer = await send(http, session, Attack(js(listing(21))))
    assert target.denied not in listed_tools(messages_in(content_type, answer))
    ids = [line[3:].strip() for line in answer.decode().splitlines() if line.startswith("id:")]
    last_event_id = ids[0] if ids else "1"  # the priming event, before the result (lenient: any id)
    headers = {**session.headers, "Accept": "text/event-stream", "Last-Event-ID": last_event_id}
    async with asyncio.timeout(WAIT):
        async with http.get(session.url, headers=headers) as response:
            assert response.status == 200, await response.text()
            messages = await first_result(response.content)
    assert listed_tools(messages), messages  # the replayed list result did arrive
    assert target.denied not in listed_tools(messages), messages


async def test_repeated_legacy_session_parameter_is_refused(
    gateway: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    """HTTP+SSE: a POST naming two of the caller's sessions (``?session_id=A&session_id=B``). The
    gateway would track the request on one stream while the upstream (Starlette: the last value)
    answers on the other, unfiltered; a repeated session parameter is refused."""
    token = await gateway.access_token("legacy")
    headers = {"Authorization": f"Bearer {token}"}
    first, first_endpoint = await open_legacy_stream(http, gateway.route_url("legacy") + "/sse", token)
    second, second_endpoint = await open_legacy_stream(http, gateway.route_url("legacy") + "/sse", token)
    try:
        await legacy_handshake(http, first, gateway.url + first_endpoint, headers)
        await legacy_handshake(http, second, gateway.url + second_endpoint, headers)
        second_param = second_endpoint.partition("?")[2]
        async with http.post(
            gateway.url + first_endpoint + "&" + second_param,
            data=js(listing(31)),
            headers={**headers, "Content-Type": "application/json"},
        ) as posted:
            status = posted.status
        if status == 202:
            async with asyncio.timeout(WAIT):
                answer = await response_message(second.content, 31)
            pytest.fail(f"accepted (202); the second stream got {sorted(listed_tools([answer]))}")
        assert status == 400
    finally:
        first.close()
        second.close()
