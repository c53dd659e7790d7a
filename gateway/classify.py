"""Pure inspection of client JSON-RPC messages: what each one asks for, before anything is decided.

No policy here: a message becomes a :class:`Call` naming its method, the kind and target it acts on
(through the one method table, gateway/mcp_methods.py) and its arguments. Deciding is the engine's
job (gateway/engine.py) and applying the decisions is gateway/enforce.py's.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from multidict import MultiMapping

from gateway.mcp_methods import CALL_METHODS, COMPLETION_REFS
from gateway.proxy.request_body import RpcMessage

# SEP-2243 (MCP 2026-07-28 Streamable HTTP): every request mirrors its method in Mcp-Method, and these
# methods their target (name or URI) in Mcp-Name.
MIRROR_HEADERS_SINCE = "2026-07-28"
# MCP 2026-07-28: stateless requests, multi-round-trip requests instead of server-to-client requests.
STATELESS_SINCE = "2026-07-28"
NAMED_METHODS = frozenset({"tools/call", "resources/read", "prompts/get"})
PROTOCOL_VERSION_META = "io.modelcontextprotocol/protocolVersion"
_DATE_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True)
class Call:
    message: RpcMessage
    method: str
    kind: str | None  # tools / resources / prompts when the message names one item
    target: str | None  # the item's name or URI, None when it is missing or not a string
    arguments: Any  # tools/call and prompts/get ``arguments`` (None when absent)

    @property
    def names_an_item(self) -> bool:
        return self.kind is not None


def decidable(message: RpcMessage) -> bool:
    """Requests, and notifications spelled like calls (a lenient server might run them), are decided;
    responses to server requests and ordinary notifications pass."""
    return message.method is not None and (message.is_request or message.method in CALL_METHODS)


def classify(message: RpcMessage) -> Call:
    assert message.method is not None
    params = message.params or {}
    kind, target = _target(message.method, params)
    arguments = params.get("arguments") if message.method in ("tools/call", "prompts/get") else None
    return Call(message, message.method, kind, target, arguments)


def _target(method: str, params: dict[str, Any]) -> tuple[str | None, str | None]:
    if method == "completion/complete":
        # Completions reveal a prompt's or resource template's arguments: same rule as using it.
        ref = params.get("ref")
        if isinstance(ref, dict) and ref.get("type") in COMPLETION_REFS:
            kind, key = COMPLETION_REFS[ref["type"]]
            value = ref.get(key)
            return kind, value if isinstance(value, str) else None
        return None, None
    spec = CALL_METHODS.get(method)
    if spec is None:
        return None, None
    kind, key = spec
    value = params.get(key)
    return kind, value if isinstance(value, str) else None


def _missing_mirror_header(
    message: RpcMessage, headers: Mapping[str, str], methods: list[str], names: list[str]
) -> str | None:
    if not message.is_request or not _mirror_headers_required(message, headers):
        return None
    if not methods:
        return f"Mcp-Method header is required from protocol version {MIRROR_HEADERS_SINCE}"
    if not names and message.method in NAMED_METHODS:
        return f"Mcp-Name header is required for {message.method} from protocol version {MIRROR_HEADERS_SINCE}"
    return None


def request_protocol_version(message: RpcMessage, headers: Mapping[str, str]) -> str | None:
    """The request's protocol version: its ``_meta`` (2026-07-28 requests carry it), else the
    ``MCP-Protocol-Version`` header; None unless it is a date. Versions are dates: they compare as strings."""
    meta = (message.params or {}).get("_meta")
    version = meta.get(PROTOCOL_VERSION_META) if isinstance(meta, dict) else None
    if not isinstance(version, str):
        version = headers.get("MCP-Protocol-Version")
    return version if isinstance(version, str) and _DATE_VERSION.fullmatch(version) is not None else None


def _mirror_headers_required(message: RpcMessage, headers: Mapping[str, str]) -> bool:
    version = request_protocol_version(message, headers)
    return version is not None and version >= MIRROR_HEADERS_SINCE


def _decode_header(value: str) -> str:
    """MCP 2026-07-28 mirrors non-ASCII values as ``=?base64?...?=``."""
    if value.startswith("=?base64?") and value.endswith("?="):
        try:
            return base64.b64decode(value[9:-2], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return value
    return value


def _header_values(headers: Mapping[str, str], name: str) -> list[str]:
    if isinstance(headers, MultiMapping):
        return headers.getall(name, [])
    value = headers.get(name)
    return [] if value is None else [value]


def header_mismatch(
    messages: list[RpcMessage], headers: Mapping[str, str], batch: bool, *, required: bool = True
) -> str | None:
    """MCP 2026-07-28 Streamable HTTP: the ``Mcp-Method`` / ``Mcp-Name`` mirror headers must match
    the body, or the request is refused (an upstream routing on headers would run something else).
    With ``required`` (Streamable HTTP), a request of that version or later must carry them (SEP-2243),
    as the SDK servers require."""
    methods = _header_values(headers, "Mcp-Method")
    names = _header_values(headers, "Mcp-Name")
    if required and not batch and (missing := _missing_mirror_header(messages[0], headers, methods, names)):
        return missing
    if not methods and not names:
        return None
    if batch:
        return "Mcp-Method/Mcp-Name headers cannot describe a batch"
    if len(methods) > 1 or len(names) > 1:
        # Servers differ on which copy they read (first, last, or both joined): only one is checked.
        return "Mcp-Method/Mcp-Name headers must not be repeated"
    message = messages[0]
    if methods and _decode_header(methods[0]) != message.method:
        return "Mcp-Method header does not match the body"
    if names:
        _, target = _target(message.method or "", message.params or {})
        if _decode_header(names[0]) != target:
            return "Mcp-Name header does not match the body"
    return None
