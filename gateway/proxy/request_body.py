"""One reading of a client's POST body: parsed strictly once, decided, then re-serialised.

The gateway authorizes what it reads, so the upstream must read exactly the same thing. Forwarding
the client's own bytes lets the two disagree: a ``charset=utf-16`` body, a second ``Content-Encoding``
layer, invalid UTF-8, a duplicate ``"name"`` key (Python keeps the last, some parsers the first),
``1e400`` or ``NaN`` literals, or a batch with a non-object element all fail or differ in our parser
while a lenient upstream executes them. So a body is accepted only as strict JSON-RPC 2.0 in UTF-8
(RFC 8259 §8.1: JSON exchanged between systems MUST be UTF-8; JSON-RPC 2.0 §4-§6 for the message
shapes), and what is forwarded is the canonical serialisation of the messages that were decided
(ASCII-only JSON, one copy of every key), never the client's bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.mcp_methods import METHODS

# JSON-RPC 2.0 §5.1 error codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
# Nesting beyond this is refused: MCP messages and tool arguments are shallow, and deep nesting is
# where parsers differ (recursion limits, stack exhaustion).
MAX_DEPTH = 64
# An id must survive a round trip through every JSON parser unchanged: JavaScript reads numbers as
# IEEE 754 doubles, exact only up to 2**53 - 1 (RFC 7493 §2.2, I-JSON).
MAX_SAFE_INTEGER = 2**53 - 1
# The one Content-Encoding layer aiohttp's server undoes itself (aiohttp.http_parser: a single
# ASCII token among these, matched case-insensitively).
SERVER_DECODED_ENCODINGS = frozenset({"gzip", "deflate", "br", "zstd"})
_FOLDED_METHODS = frozenset(name.casefold() for name in METHODS)
JSON_MEDIA_TYPE = "application/json"
CANONICAL_CONTENT_TYPE = "application/json"


class BodyRefused(Exception):
    """A body the gateway will not forward: answered with ``status`` and a JSON-RPC error."""

    def __init__(self, status: int, code: int, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True)
class RpcMessage:
    """One JSON-RPC message from a client body (a batch yields several)."""

    method: str | None
    id: Any
    params: dict[str, Any] | None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_request(self) -> bool:
        return self.method is not None and self.id is not None


@dataclass(frozen=True)
class RpcBody:
    messages: list[RpcMessage]
    batch: bool


def check_encoding(content_type: str | None, content_encodings: Iterable[str]) -> None:
    """Refuse bodies whose bytes the upstream could decode differently from us.

    ``Content-Encoding``: the server stack has undone at most one known layer; anything else
    (``gzip, gzip``, an unknown coding, the header repeated) would reach us still encoded while an
    upstream that decodes it would read a body we never decided. ``Content-Type``: JSON has no
    charset parameter (RFC 8259 §11); one other than UTF-8 means the client meant another encoding.
    """
    codings = [c.strip().lower() for c in content_encodings]
    codings = [c for c in codings if c not in ("", "identity")]
    if len(codings) > 1 or (codings and codings[0] not in SERVER_DECODED_ENCODINGS):
        raise BodyRefused(400, PARSE_ERROR, "Parse error: unsupported Content-Encoding (send identity or one gzip)")
    if content_type is None:
        raise BodyRefused(415, INVALID_REQUEST, "Content-Type must be application/json")
    media_type, _, parameters = content_type.partition(";")
    if media_type.strip().lower() != JSON_MEDIA_TYPE:
        raise BodyRefused(415, INVALID_REQUEST, "Content-Type must be application/json")
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise BodyRefused(400, PARSE_ERROR, "Parse error: the body must be UTF-8 JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf, which has no JSON spelling to forward
        raise ValueError("number out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity, -Infinity: Python-only extensions


def _too_deep(data: Any, body: bytes) -> bool:
    if body.count(b"[") + body.count(b"{") <= MAX_DEPTH:
        return False  # cannot nest deeper than it has brackets: skips the walk for ordinary bodies
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, dict | list))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, dict | list))
    return False


def valid_id(value: Any) -> bool:
    """MCP: request ids MUST be a string or integer (not null); we also require a safe integer."""
    if isinstance(value, str):
        return True
    return isinstance(value, int) and not isinstance(value, bool) and -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER


def _message(item: Any) -> RpcMessage:
    if not isinstance(item, dict):
        raise BodyRefused(400, INVALID_REQUEST, "Invalid Request: every message must be a JSON object")
    request_id = item.get("id")
    reply_id = request_id if valid_id(request_id) else None
    if item.get("jsonrpc") != "2.0":
        raise BodyRefused(400, INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"', reply_id)
    if "id" in item and not valid_id(request_id):
        raise BodyRefused(400, INVALID_REQUEST, "Invalid Request: id must be a string or a safe integer")
    params = item.get("params")
    if "params" in item and not isinstance(params, dict | list):
        raise BodyRefused(400, INVALID_REQUEST, "Invalid Request: params must be an object", reply_id)
    if "method" in item:
        method = item["method"]
        if not isinstance(method, str) or "result" in item or "error" in item:
            raise BodyRefused(400, INVALID_REQUEST, "Invalid Request: method must be a string", reply_id)
        if method != method.strip() or (method not in METHODS and method.casefold() in _FOLDED_METHODS):
            # "TOOLS/CALL" or " tools/call" is no MCP method to us, but a server that folds case or trims
            # would run it: a near-spelling of a known method is refused, not forwarded undecided.
            raise BodyRefused(400, INVALID_REQUEST, "Invalid Request: method must be spelled exactly", reply_id)
        return RpcMessage(method, request_id, params if isinstance(params, dict) else None, item)
    # A response to a request the server sent the client (sampling, elicitation, roots).
    if "id" not in item or ("result" in item) == ("error" in item):
        raise BodyRefused(400, INVALID_REQUEST, "Invalid Request: neither a request nor a response", reply_id)
    return RpcMessage(None, request_id, None, item)


def read_rpc_body(body: bytes) -> RpcBody:
    """Parse ``body`` as strict UTF-8 JSON-RPC, or raise :class:`BodyRefused` (never forwarded)."""
    try:
        text = body.decode("utf-8")  # strict: invalid or overlong sequences and lone surrogates fail
    except UnicodeDecodeError:
        raise BodyRefused(400, PARSE_ERROR, "Parse error: the body is not valid UTF-8") from None
    try:
        # A str (not bytes): json.loads would otherwise guess UTF-16/32 from the first bytes. A
        # leading BOM fails here too (RFC 8259 §8.1: senders MUST NOT add one).
        data = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise BodyRefused(400, PARSE_ERROR, "Parse error: the body is not JSON") from None
    if _too_deep(data, body):
        raise BodyRefused(400, INVALID_REQUEST, f"Invalid Request: nested deeper than {MAX_DEPTH} levels")
    if isinstance(data, list):
        if not data:
            raise BodyRefused(400, INVALID_REQUEST, "Invalid Request: empty batch")
        return RpcBody([_message(item) for item in data], batch=True)
    return RpcBody([_message(data)], batch=False)


def canonical_json(value: Any) -> bytes:
    """The bytes the upstream receives: ASCII-only (no encoding to disagree on), no NaN."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
