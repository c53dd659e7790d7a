"""What the stages of the proxied path share: one request context and the framework-neutral refusal.

A stage reads the context, adds what it established (the principal, the parsed messages, the plan,
the forward request) and either returns nothing (go on), returns an :class:`Answer` (the gateway
answers without refusing, e.g. a CORS preflight), or raises a :class:`Refusal`. Only the adapter in
``gateway/app.py`` turns answers and refusals into HTTP responses, so stages are testable without a
server and a new concern (quota, approval, DPoP proof) is a new stage, not another method.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.approvals.session import PendingAsks
from gateway.audit import AuditLog
from gateway.config import RouteConfig
from gateway.metrics import Metrics
from gateway.oauth.access_token import Principal
from gateway.signals.revocations import SubjectRevocations
from gateway.telemetry import NO_TRACE, RequestTrace, Tracing
from gateway.tool_pins import DriftState

if TYPE_CHECKING:
    from gateway.approvals.store import ApprovalStore
    from gateway.enforce import Plan
    from gateway.oauth.chain import UpstreamCredentials
    from gateway.proxy.forward import ForwardRequest, LegacyStream
    from gateway.proxy.request_body import RpcBody
    from gateway.runtime import Runtime

# The metrics label of what a request carries (gateway/metrics.py method_class), set once it is known.
METHOD_CLASS = web.RequestKey("method_class", str)
# JSON-RPC codes the gateway answers with (JSON-RPC 2.0 §5.1 implementation-defined server errors).
FORBIDDEN = -32003
SESSION_NOT_FOUND = -32001
INVALID_REQUEST = -32600


@dataclass
class Services:
    """Gateway-lifetime collaborators the stages use (not reloaded with the config)."""

    audit: AuditLog
    metrics: Metrics
    # Legacy HTTP+SSE: upstream session id -> its live GET stream. Weak values: an entry goes with it.
    legacy_streams: weakref.WeakValueDictionary[str, LegacyStream] = field(default_factory=weakref.WeakValueDictionary)
    # Users the IdP cut off through Shared Signals (gateway/signals/), shared with every replica.
    revocations: SubjectRevocations = field(default_factory=SubjectRevocations)
    # Per-user upstream tokens of routes with upstream_authorization (gateway/oauth/chain.py).
    credentials: UpstreamCredentials | None = None
    tracing: Tracing | None = None  # OpenTelemetry traces (telemetry.otlp_endpoint); None: off
    # What the latest tools/list results showed on routes with tool_pins (gateway/tool_pins.py).
    tool_drift: DriftState = field(default_factory=DriftState)
    approvals: ApprovalStore | None = None  # calls parked for approver_groups (gateway/approvals/store.py)
    # Approvals asked on a POST's SSE response, waiting for the client's answer (gateway/approvals/session.py).
    asks: PendingAsks = field(default_factory=PendingAsks)


@dataclass
class RequestContext:
    request: web.Request
    runtime: Runtime  # one consistent config for the whole request, even across a reload
    services: Services
    route: RouteConfig
    rest: str  # the raw path below the route's prefix
    request_id: str
    started: float
    cors: dict[str, str] = field(default_factory=dict)
    principal: Principal | None = None
    body: bytes | None = None  # POST only
    rpc: RpcBody | None = None  # POST only: the messages, read once
    plan: Plan | None = None
    forward: ForwardRequest | None = None  # None after planning: answered by the gateway alone
    upstream_token: str | None = field(default=None, repr=False)  # the per-user upstream token sent, if any
    trace: RequestTrace = NO_TRACE


@dataclass
class Answer:
    """A response the gateway gives without refusing anything (a CORS preflight)."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Any = None  # a JSON value, or None for no body


class Refusal(Exception):
    """The request stops here: ``status`` with a JSON ``body``, audited as ``event`` / ``reason``."""

    def __init__(
        self,
        status: int,
        body: Any,
        reason: str,
        *,
        headers: Mapping[str, str] | None = None,
        event: str = "request.denied",
        audited: bool = True,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.body = body
        self.reason = reason
        self.headers = dict(headers or {})
        self.event = event
        self.audited = audited


def rpc_error(code: int, message: str, request_id: Any = None, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def rpc_refusal(status: int, code: int, message: str, reason: str, request_id: Any = None, **options: Any) -> Refusal:
    return Refusal(status, rpc_error(code, message, request_id), reason, **options)
