"""Runtime policy applied to one client request's JSON-RPC messages, before anything is forwarded.

The decision is made on the JSON body, never on the 2026-07-28 ``Mcp-Method`` / ``Mcp-Name`` mirror
headers alone (MCP 2026-07-28 Streamable HTTP: intermediaries that enforce policy on mirrored
headers must validate them against the body); a request whose headers and body disagree is refused,
because an upstream that routes on headers while we authorize on the body would otherwise execute
something we never checked.
Batches are decided element by element: permitted elements are forwarded, denied ones are answered
by the gateway and never reach the upstream. A named call is decided even when it has no ``id`` (a
notification): the SDK servers ignore such a message, but a server that runs it anyway must not run
something the gateway never checked. The body was already read strictly once
(:mod:`gateway.proxy.request_body`); what is forwarded is the canonical JSON of the kept messages.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from multidict import MultiMapping

from gateway.mcp_methods import CALL_METHODS, COMPLETION_REFS, HANDSHAKE_METHODS, NOUNS
from gateway.policy import Decision, RoutePolicy, target_problem
from gateway.proxy.jsonrpc import ResultRewriter, advertise_ema_extension
from gateway.proxy.request_body import RpcBody, RpcMessage, canonical_json

# JSON-RPC codes the gateway answers with (implementation-defined server errors, JSON-RPC 2.0 §5.1;
# -32020 is MCP 2026-07-28's HeaderMismatch).
FORBIDDEN = -32003
HEADER_MISMATCH = -32020
AUDIT_TARGET_CHARS = 256


@dataclass(frozen=True)
class CallRecord:
    """One JSON-RPC request as decided, for the audit trail."""

    method: str
    kind: str | None
    target: str | None
    allowed: bool
    reason: str
    args_sha256: str | None = None


@dataclass
class Plan:
    forward_body: bytes | None
    local_responses: list[dict[str, Any]] = field(default_factory=list)
    rewriter: ResultRewriter = field(default_factory=ResultRewriter)
    calls: list[CallRecord] = field(default_factory=list)
    batch: bool = False
    missing_scopes: tuple[str, ...] = ()
    mismatch: str | None = None
    request_id: Any = None  # the first request's id, for gateway-made error bodies


def _decode_header(value: str) -> str:
    """MCP 2026-07-28 mirrors non-ASCII values as ``=?base64?...?=``."""
    if value.startswith("=?base64?") and value.endswith("?="):
        try:
            return base64.b64decode(value[9:-2], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return value
    return value


def _target(message: RpcMessage) -> tuple[str | None, str | None]:
    if message.method == "completion/complete":
        # Completions reveal a prompt's or resource template's arguments: same rule as using it.
        ref = (message.params or {}).get("ref")
        if isinstance(ref, dict) and ref.get("type") in COMPLETION_REFS:
            kind, key = COMPLETION_REFS[ref["type"]]
            value = ref.get(key)
            return kind, value if isinstance(value, str) else None
        return None, None
    spec = CALL_METHODS.get(message.method or "")
    if spec is None:
        return None, None
    kind, key = spec
    value = (message.params or {}).get(key)
    return kind, value if isinstance(value, str) else None


def list_filter_for(policy: RoutePolicy, groups: frozenset[str]) -> ResultRewriter:
    """A rewriter that filters every list-shaped result for ``groups`` (none needed on open routes)."""
    return ResultRewriter(partial(policy.filter_lists, groups=groups) if policy.restricts_lists else None)


def stream_plan(policy: RoutePolicy, groups: frozenset[str]) -> Plan:
    """GET and DELETE: nothing to decide or forward, but whatever the stream carries is filtered."""
    return Plan(forward_body=None, rewriter=list_filter_for(policy, groups))


def plan_request(
    rpc: RpcBody,
    headers: Mapping[str, str],
    policy: RoutePolicy,
    groups: frozenset[str],
    scopes: tuple[str, ...],
    *,
    route_name: str,
    digest_arguments: Callable[[Any], str] | None = None,
) -> Plan:
    """Decide every message of one request; ``forward_body`` is the canonical JSON of the messages
    allowed through (None when none is), so the upstream reads exactly what was decided."""
    messages, batch = rpc.messages, rpc.batch
    plan = Plan(
        forward_body=None,
        batch=batch,
        rewriter=list_filter_for(policy, groups),
        request_id=next((m.id for m in messages if m.is_request), None),
    )
    plan.mismatch = _header_mismatch(messages, headers, batch)
    if plan.mismatch:
        return plan
    missing: list[str] = []
    kept: list[dict[str, Any]] = []
    for message in messages:
        if message.method is None or not (message.is_request or message.method in CALL_METHODS):
            kept.append(message.raw)
            continue
        missing.extend(s for s in policy.missing_scopes(message.method, scopes) if s not in missing)
        kind, target = _target(message)
        if kind is not None:
            decision = _decide(policy, kind, target, groups)
            digest = None
            if digest_arguments is not None and message.method == "tools/call":
                digest = digest_arguments((message.params or {}).get("arguments"))
            record = CallRecord(message.method, kind, _for_audit(target), decision.allowed, decision.reason, digest)
            plan.calls.append(record)
            if not decision.allowed:
                plan.local_responses.append(_forbidden(message, kind, target, route_name))
                continue
        else:
            plan.calls.append(CallRecord(message.method, kind, target, True, "not a named call"))
        if message.is_request and message.method in HANDSHAKE_METHODS:
            plan.rewriter.expect(message.id, advertise_ema_extension)
        kept.append(message.raw)
    plan.missing_scopes = tuple(missing)
    if kept:
        plan.forward_body = canonical_json(kept if batch else kept[0])
    return plan


def _decide(policy: RoutePolicy, kind: str, target: str | None, groups: frozenset[str]) -> Decision:
    rules = policy.rules_for(kind)
    if rules.unrestricted:
        return Decision(True, "no rules")
    if target is None:
        # No string name to match (missing, a list, a number): a restricted kind refuses it rather
        # than let the upstream interpret (or coerce) what the gateway could not check.
        return Decision(False, "no name to check")
    problem = target_problem(kind, target)
    if problem is not None:
        return Decision(False, problem)
    return rules.decide(groups, target)


def _for_audit(target: str | None) -> str | None:
    """Audit lines carry at most a bounded prefix of a client-chosen name."""
    if target is None or len(target) <= AUDIT_TARGET_CHARS:
        return target
    return target[:AUDIT_TARGET_CHARS] + "..."


def _header_values(headers: Mapping[str, str], name: str) -> list[str]:
    if isinstance(headers, MultiMapping):
        return headers.getall(name, [])
    value = headers.get(name)
    return [] if value is None else [value]


def _header_mismatch(messages: list[RpcMessage], headers: Mapping[str, str], batch: bool) -> str | None:
    methods = _header_values(headers, "Mcp-Method")
    names = _header_values(headers, "Mcp-Name")
    if not methods and not names:
        return None
    if batch:
        return "Mcp-Method/Mcp-Name headers cannot describe a batch"
    if len(methods) > 1 or len(names) > 1:
        # Servers differ on which copy they read (first, last, or both joined): only one is checked.
        return "Mcp-Method/Mcp-Name headers must not be repeated"
    header_method = methods[0] if methods else None
    header_name = names[0] if names else None
    message = messages[0]
    if header_method is not None and _decode_header(header_method) != message.method:
        return "Mcp-Method header does not match the body"
    if header_name is not None:
        _, target = _target(message)
        if _decode_header(header_name) != target:
            return "Mcp-Name header does not match the body"
    return None


def _forbidden(message: RpcMessage, kind: str, target: str | None, route_name: str) -> dict[str, Any]:
    noun = NOUNS[kind]
    what = f"{noun} '{_for_audit(target)}'" if target is not None else f"{noun} without a string name"
    return {
        "jsonrpc": "2.0",
        "id": message.id,
        "error": {
            "code": FORBIDDEN,
            "message": f"Forbidden: {what} is not permitted for you on route '{route_name}'",
            "data": {"reason": "policy", "method": message.method},
        },
    }
