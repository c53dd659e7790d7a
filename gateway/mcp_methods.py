"""The MCP methods the gateway knows, in one table: what each names, which list it returns.

Policy, message inspection, result rewriting and metrics all read this table, so a method added here
(say a new list in a future protocol revision) is named, filtered and counted the same everywhere.
Sources: MCP 2025-11-25 "Server features" (tools, resources, prompts, completion) and the 2026-07-28
revision (``server/discover``, ``subscriptions/listen``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

KINDS = ("tools", "resources", "prompts")


@dataclass(frozen=True)
class McpMethod:
    name: str
    # tools / resources / prompts when the method names one item or lists items of that kind.
    kind: str | None = None
    # Calls: the params member naming the item (a tool name, a resource URI, a prompt name).
    target_param: str | None = None
    # Lists: the result member holding the list, and the member of each entry naming it.
    list_key: str | None = None
    item_key: str | None = None
    # Handshakes: the result advertises the server's capabilities (the gateway adds its extension).
    handshake: bool = False


METHODS: Mapping[str, McpMethod] = {
    m.name: m
    for m in (
        McpMethod("initialize", handshake=True),
        McpMethod("server/discover", handshake=True),
        McpMethod("ping"),
        McpMethod("tools/list", "tools", list_key="tools", item_key="name"),
        McpMethod("tools/call", "tools", target_param="name"),
        McpMethod("resources/list", "resources", list_key="resources", item_key="uri"),
        McpMethod("resources/templates/list", "resources", list_key="resourceTemplates", item_key="uriTemplate"),
        McpMethod("resources/read", "resources", target_param="uri"),
        McpMethod("resources/subscribe", "resources", target_param="uri"),
        McpMethod("resources/unsubscribe", "resources", target_param="uri"),
        McpMethod("prompts/list", "prompts", list_key="prompts", item_key="name"),
        McpMethod("prompts/get", "prompts", target_param="name"),
        McpMethod("completion/complete"),
        McpMethod("logging/setLevel"),
        McpMethod("subscriptions/listen"),
    )
}
# Requests that act on one named item: method -> (kind, params key holding the name).
CALL_METHODS: Mapping[str, tuple[str, str]] = {
    m.name: (m.kind, m.target_param) for m in METHODS.values() if m.kind and m.target_param
}
# List results: method -> (kind, result key, item key holding the name).
LIST_METHODS: Mapping[str, tuple[str, str, str]] = {
    m.name: (m.kind, m.list_key, m.item_key) for m in METHODS.values() if m.kind and m.list_key and m.item_key
}
# The same lists read from the result side: result key -> (kind, item key).
LIST_RESULT_KEYS: Mapping[str, tuple[str, str]] = {key: (kind, item) for kind, key, item in LIST_METHODS.values()}
HANDSHAKE_METHODS = frozenset(m.name for m in METHODS.values() if m.handshake)
# completion/complete names a prompt or resource template through ``params.ref``: ref type -> (kind, key).
COMPLETION_REFS: Mapping[str, tuple[str, str]] = {
    "ref/prompt": ("prompts", "name"),
    "ref/resource": ("resources", "uri"),
}
NOUNS = {"tools": "tool", "resources": "resource", "prompts": "prompt"}
