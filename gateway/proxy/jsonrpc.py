"""JSON-RPC inspection of MCP messages passing through the proxy.

The gateway sometimes has to change a *result* in flight: it adds its extension capability to
``initialize`` / ``server/discover`` results (MCP enterprise-managed authorization extension), tracked
by request id; and runtime policy filters every list-shaped result. Responses arrive as one JSON body
or as one SSE event among many; everything not rewritten passes verbatim.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from gateway.mcp_methods import LIST_RESULT_KEYS
from gateway.proxy.sse import parse_event

ResultRewrite = Callable[[dict[str, Any]], dict[str, Any]]
EMA_EXTENSION = "io.modelcontextprotocol/enterprise-managed-authorization"
_LIST_MARKERS = tuple(f'"{key}"'.encode() for key in LIST_RESULT_KEYS)
# MCP 2025-11-25 "List Changed Notification" for the lists conditions are type-checked against.
LIST_CHANGED = frozenset({"notifications/tools/list_changed", "notifications/prompts/list_changed"})


def _id_key(value: Any) -> str:
    # An upstream may spell a tracked id 1 as 1.0 (a JavaScript number): both name the same request.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True)


def may_hold_list(raw: bytes) -> bool:
    """Cheap pre-check before parsing: a list result names its list key, possibly \\u-escaped."""
    return b"\\u" in raw or any(marker in raw for marker in _LIST_MARKERS)


def announces_list_changed(raw: bytes) -> bool:
    """Whether an SSE event carries a tools or prompts ``list_changed`` notification (alone or in a batch).
    Events without the bytes ``list_changed`` are not parsed."""
    if b"list_changed" not in raw:
        return False
    event = parse_event(raw)
    try:
        data = json.loads(event.data) if event.event == "message" and event.data else None
    except (ValueError, RecursionError):
        return False
    messages = data if isinstance(data, list) else [data]
    return any(isinstance(m, dict) and m.get("method") in LIST_CHANGED and "id" not in m for m in messages)


class ResultRewriter:
    """Rewrites the results of selected request ids, and filters every list-shaped result.

    ``list_filter`` applies to *every* result on the stream, tracked or not: list filtering must not
    depend on recognising the request that asked for the list (an id spelled differently, a
    resumed stream, a server-initiated replay), only on the result's shape.
    """

    def __init__(self, list_filter: ResultRewrite | None = None) -> None:
        self._pending: dict[str, ResultRewrite] = {}
        self._filter = list_filter

    def expect(self, request_id: Any, rewrite: ResultRewrite) -> None:
        self._pending[_id_key(request_id)] = rewrite

    def __bool__(self) -> bool:
        return bool(self._pending) or self._filter is not None

    def absorb(self, other: ResultRewriter) -> None:
        """Take over ``other``'s expectations (their responses arrive on this rewriter's stream)."""
        self._pending.update(other._pending)
        other._pending.clear()

    def _skip(self, raw: bytes) -> bool:
        return not self._pending and (self._filter is None or not may_hold_list(raw))

    def rewrite_json(self, body: bytes) -> bytes:
        if self._skip(body):
            return body
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return body
        new = self._rewrite_value(data)
        return body if new is data else json.dumps(new, separators=(",", ":")).encode()

    def rewrite_event(self, raw: bytes) -> bytes:
        if b"data" not in raw or self._skip(raw):
            return raw
        event = parse_event(raw)
        if event.event != "message" or not event.data:
            return raw
        try:
            data = json.loads(event.data)
        except (ValueError, RecursionError):
            return raw
        new = self._rewrite_value(data)
        if new is data:
            return raw
        event.data = json.dumps(new, separators=(",", ":"))
        return event.encode()

    def _rewrite_value(self, data: Any) -> Any:
        if isinstance(data, list):  # a batch of responses
            changed = [self._rewrite_message(m) for m in data]
            return data if all(new is old for new, old in zip(changed, data, strict=True)) else changed
        return self._rewrite_message(data)

    def _rewrite_message(self, message: Any) -> Any:
        if not isinstance(message, dict) or not isinstance(message.get("result"), dict):
            return message
        result = message["result"]
        if self._pending and "id" in message:
            rewrite = self._pending.pop(_id_key(message["id"]), None)
            if rewrite is not None:
                result = rewrite(result)
        if self._filter is not None:
            result = self._filter(result)
        return message if result is message["result"] else {**message, "result": result}


def advertise_ema_extension(result: dict[str, Any]) -> dict[str, Any]:
    """MCP enterprise-managed authorization extension: declare it in ``capabilities.extensions``."""
    capabilities = result.get("capabilities")
    if not isinstance(capabilities, dict):
        return result
    extensions = capabilities.get("extensions")
    extensions = dict(extensions) if isinstance(extensions, dict) else {}
    extensions.setdefault(EMA_EXTENSION, {})
    return {**result, "capabilities": {**capabilities, "extensions": extensions}}
