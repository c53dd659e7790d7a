"""JSON-RPC inspection of MCP messages passing through the proxy.

The gateway sometimes has to change a *result* in flight (it adds its extension capability to
``initialize`` / ``server/discover`` results, SPEC §9.7; runtime policy filters list results). It
tracks the ids of the requests it wants to rewrite and touches only the responses carrying those ids,
whether they arrive as one JSON body or as one SSE event among many; everything else passes verbatim.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.proxy.sse import parse_event

ResultRewrite = Callable[[dict[str, Any]], dict[str, Any]]
EMA_EXTENSION = "io.modelcontextprotocol/enterprise-managed-authorization"


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


def parse_body(body: bytes) -> list[RpcMessage] | None:
    """The messages in a POST body, or None when it is not JSON-RPC (forwarded untouched: the
    upstream owns the JSON-RPC error for a malformed body)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: a deeply nested body ('[[[[...') exhausts the decoder's stack; it is still
        # the upstream's to reject, and must never become a gateway 500.
        return None
    items = data if isinstance(data, list) else [data]
    messages = []
    for item in items:
        if not isinstance(item, dict):
            return None
        method = item.get("method") if isinstance(item.get("method"), str) else None
        params = item.get("params") if isinstance(item.get("params"), dict) else None
        messages.append(RpcMessage(method, item.get("id"), params, item))
    return messages


def _id_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


class ResultRewriter:
    """Rewrites the results of selected request ids; a no-op (and never consulted) when empty."""

    def __init__(self) -> None:
        self._pending: dict[str, ResultRewrite] = {}

    def expect(self, request_id: Any, rewrite: ResultRewrite) -> None:
        self._pending[_id_key(request_id)] = rewrite

    def __bool__(self) -> bool:
        return bool(self._pending)

    def absorb(self, other: ResultRewriter) -> None:
        """Take over ``other``'s expectations (their responses arrive on this rewriter's stream)."""
        self._pending.update(other._pending)
        other._pending.clear()

    def rewrite_json(self, body: bytes) -> bytes:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return body
        if isinstance(data, list):
            changed = [self._rewrite_message(m) for m in data]
            if all(new is old for new, old in zip(changed, data, strict=True)):
                return body
            return json.dumps(changed, separators=(",", ":")).encode()
        new = self._rewrite_message(data)
        return body if new is data else json.dumps(new, separators=(",", ":")).encode()

    def rewrite_event(self, raw: bytes) -> bytes:
        if b"data" not in raw:
            return raw
        event = parse_event(raw)
        if event.event != "message" or not event.data:
            return raw
        try:
            data = json.loads(event.data)
        except (ValueError, RecursionError):
            return raw
        new = self._rewrite_message(data)
        if new is data:
            return raw
        event.data = json.dumps(new, separators=(",", ":"))
        return event.encode()

    def _rewrite_message(self, message: Any) -> Any:
        if not isinstance(message, dict) or "id" not in message or not isinstance(message.get("result"), dict):
            return message
        rewrite = self._pending.pop(_id_key(message["id"]), None)
        if rewrite is None:
            return message
        return {**message, "result": rewrite(message["result"])}


def advertise_ema_extension(result: dict[str, Any]) -> dict[str, Any]:
    """SPEC §9.7 / ext-auth: declare enterprise-managed authorization in ``capabilities.extensions``."""
    capabilities = result.get("capabilities")
    if not isinstance(capabilities, dict):
        return result
    extensions = capabilities.get("extensions")
    extensions = dict(extensions) if isinstance(extensions, dict) else {}
    extensions.setdefault(EMA_EXTENSION, {})
    return {**result, "capabilities": {**capabilities, "extensions": extensions}}


HANDSHAKE_METHODS = frozenset({"initialize", "server/discover"})
