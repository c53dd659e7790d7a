"""OpenTelemetry traces of the proxied path (optional: ``pip install 'mcp-auth-gateway[otel]'``).

Off unless ``telemetry.otlp_endpoint`` is set; then each proxied request is one SERVER span with child
spans for authentication, the policy decision and the upstream call, exported over OTLP/HTTP.

Trace context (W3C Trace Context): the request span continues the client's trace from the HTTP
``traceparent`` header or, when there is none, from ``params._meta.traceparent`` of the (first) JSON-RPC
message (MCP's trace context in ``_meta``, as the official SDKs send it). The upstream call carries the
upstream span's ``traceparent`` header, so the server's work joins the same trace; ``_meta`` is forwarded
unchanged.

Attributes follow the HTTP and MCP semantic conventions (``http.request.method``, ``http.route``,
``http.response.status_code``, ``mcp.method.name``, ``gen_ai.tool.name``, ``jsonrpc.request.id``) plus the
gateway's own (``mcp_gateway.*``: route, decision, rule, reason). Never arguments, tokens or session ids.

The request span's parent may only be known once the body is read (``_meta``), after authentication:
the authentication span is therefore recorded with its own start and end times and exported as a child
of the request span once that exists.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from gateway.pipeline.context import RequestContext

SERVICE_NAME = "mcp-auth-gateway"
TRACES_PATH = "/v1/traces"  # OTLP/HTTP: each signal's path below the receiver's base URL
LOGS_PATH = "/v1/logs"
EXPORT_TIMEOUT_SECONDS = 10.0
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# Stages (gateway/pipeline) that get a span of their own, by function name -> span name.
TRACED_STAGES = {"authenticate": "authenticate", "decide": "decide", "forward": "upstream"}
# The named target of a call, by method (MCP semantic conventions).
TARGET_ATTRIBUTES = {"tools/call": "gen_ai.tool.name", "prompts/get": "gen_ai.prompt.name"}


class RequestTrace:
    """What one request records. This base records nothing: tracing is off."""

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def upstream_headers(self) -> tuple[tuple[str, str], ...]:
        return ()

    def finish(self, status: int) -> None:
        return None


NO_TRACE = RequestTrace()


class Tracing:
    """The tracer provider of one gateway (its own, not the process-global one) and its exporter."""

    def __init__(self, otlp_endpoint: str | None = None, *, exporter: SpanExporter | None = None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            assert otlp_endpoint is not None
            exporter = OTLPSpanExporter(
                endpoint=otlp_endpoint.rstrip("/") + TRACES_PATH, timeout=EXPORT_TIMEOUT_SECONDS
            )
        # Resource.create also reads OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, as operators expect.
        self.provider: TracerProvider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer: Tracer = self.provider.get_tracer("gateway")

    def start(self, ctx: RequestContext) -> RequestTrace:
        return _OtelRequestTrace(self.tracer, ctx)

    def shutdown(self) -> None:
        """Export what is still buffered, then stop (blocking, bounded by the exporter's timeout)."""
        self.provider.shutdown()


class AuditRecords:
    """``audit.sink: otlp``: audit lines as OpenTelemetry log records (OTLP/HTTP), so a SIEM receives
    them from a collector instead of scraping stdout. Each record's body is the audit line's JSON object
    (the same fields and values as on stdout), its ``event_name`` the line's ``event``, its timestamp the
    line's ``ts``. Called from the audit writer's thread."""

    def __init__(self, otlp_endpoint: str) -> None:
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
        from opentelemetry.sdk.resources import Resource

        exporter = OTLPLogExporter(endpoint=otlp_endpoint.rstrip("/") + LOGS_PATH, timeout=EXPORT_TIMEOUT_SECONDS)
        self._provider = LoggerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
        self._provider.add_log_record_processor(BatchLogRecordProcessor(exporter))
        self._logger = self._provider.get_logger("gateway.audit")

    def emit(self, records: list[dict[str, Any]]) -> None:
        from datetime import datetime

        from opentelemetry._logs import SeverityNumber

        for record in records:
            timestamp = int(datetime.fromisoformat(record["ts"]).timestamp() * 1_000_000_000)
            self._logger.emit(
                timestamp=timestamp,
                severity_number=SeverityNumber.INFO,
                severity_text="INFO",
                body=record,
                event_name=record["event"],
            )

    def shutdown(self) -> None:
        """Export what is still buffered, then stop (blocking, bounded by the exporter's timeout)."""
        self._provider.shutdown()


@dataclass
class _Recorded:
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    error: str | None


class _OtelRequestTrace(RequestTrace):
    def __init__(self, tracer: Tracer, ctx: RequestContext) -> None:
        self._tracer = tracer
        self._ctx = ctx
        self._started_ns = time.time_ns()
        self._root: Span | None = None
        self._upstream: Span | None = None
        self._recorded: list[_Recorded] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        span_name = TRACED_STAGES.get(name)
        if span_name is None or (name == "forward" and self._ctx.forward is None):  # answered by the gateway
            yield
            return
        if self._root is None and name == "authenticate":
            yield from self._record(span_name)
            return
        from opentelemetry.trace import SpanKind, set_span_in_context

        kind = SpanKind.CLIENT if name == "forward" else SpanKind.INTERNAL
        span = self._tracer.start_span(span_name, context=set_span_in_context(self._ensure_root()), kind=kind)
        if name == "forward":
            self._upstream = span
            span.set_attributes(_upstream_attributes(self._ctx))
        try:
            yield
        except Exception as refusal:  # a stage's Refusal (or a bug): the span says why it ended
            _refused(span, refusal)
            raise
        finally:
            if name == "decide":
                span.set_attributes(_decision_attributes(self._ctx))
            span.end()

    def _record(self, span_name: str) -> Iterator[None]:
        start = time.time_ns()
        error = None
        try:
            yield
        except Exception as refusal:
            error = _reason(refusal)
            raise
        finally:
            attributes = {"mcp_gateway.reason": error} if error else {}
            self._recorded.append(_Recorded(span_name, start, time.time_ns(), attributes, error))

    def upstream_headers(self) -> tuple[tuple[str, str], ...]:
        if self._upstream is None:
            return ()
        from opentelemetry.trace import set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(self._upstream))
        return tuple(carrier.items())

    def finish(self, status: int) -> None:
        from opentelemetry.trace import StatusCode

        root = self._ensure_root()
        root.set_attributes({"http.response.status_code": status, **_mcp_attributes(self._ctx)})
        if status >= 500:
            root.set_status(StatusCode.ERROR)
        root.end()

    def _ensure_root(self) -> Span:
        if self._root is not None:
            return self._root
        from opentelemetry.trace import SpanKind, StatusCode, set_span_in_context

        request, route = self._ctx.request, self._ctx.route
        self._root = self._tracer.start_span(
            f"{request.method} {route.path}",
            context=_parent_context(self._ctx),
            kind=SpanKind.SERVER,
            start_time=self._started_ns,
            attributes={
                "http.request.method": request.method,
                "http.route": route.path,
                "url.path": request.path,
                "url.scheme": request.scheme,
                "mcp_gateway.route": route.name,
            },
        )
        parent = set_span_in_context(self._root)
        for recorded in self._recorded:
            span = self._tracer.start_span(
                recorded.name, context=parent, start_time=recorded.start_ns, attributes=recorded.attributes
            )
            if recorded.error is not None:
                span.set_status(StatusCode.ERROR, recorded.error)
            span.end(end_time=recorded.end_ns)
        self._recorded.clear()
        return self._root


def _parent_context(ctx: RequestContext) -> Any:
    """The client's trace context: the HTTP header, else ``_meta`` of the first JSON-RPC message."""
    from opentelemetry.trace import get_current_span
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    headers = ctx.request.headers
    if TRACEPARENT in headers:
        carrier = {name: headers[name] for name in (TRACEPARENT, TRACESTATE) if name in headers}
        context = propagator.extract(carrier)
        if get_current_span(context).get_span_context().is_valid:
            return context
    meta = _first_params(ctx).get("_meta")
    if isinstance(meta, dict) and isinstance(meta.get(TRACEPARENT), str):
        carrier = {name: meta[name] for name in (TRACEPARENT, TRACESTATE) if isinstance(meta.get(name), str)}
        return propagator.extract(carrier)
    return None


def _first_params(ctx: RequestContext) -> dict[str, Any]:
    if ctx.rpc is None or not ctx.rpc.messages:
        return {}
    params = ctx.rpc.messages[0].params
    return params if isinstance(params, dict) else {}


def _mcp_attributes(ctx: RequestContext) -> dict[str, Any]:
    if ctx.rpc is None or not ctx.rpc.messages:
        return {}
    message = ctx.rpc.messages[0]
    attributes: dict[str, Any] = {}
    if message.method is not None:
        attributes["mcp.method.name"] = message.method
    if message.id is not None:
        attributes["jsonrpc.request.id"] = str(message.id)
    name = _first_params(ctx).get("name")
    target_attribute = TARGET_ATTRIBUTES.get(message.method or "")
    if target_attribute is not None and isinstance(name, str):
        attributes[target_attribute] = name
    if ctx.rpc.batch:
        attributes["mcp_gateway.batch_size"] = len(ctx.rpc.messages)
    return attributes


def _decision_attributes(ctx: RequestContext) -> dict[str, Any]:
    plan = ctx.plan
    if plan is None:
        return {}
    if not plan.calls:
        return {"mcp_gateway.decision": "allow"}
    call = plan.calls[0]
    attributes: dict[str, Any] = {
        "mcp_gateway.decision": "allow" if all(c.allowed for c in plan.calls) else "deny",
        "mcp_gateway.reason": call.reason,
    }
    if call.rule is not None:
        attributes["mcp_gateway.rule"] = call.rule
    return attributes


def _upstream_attributes(ctx: RequestContext) -> dict[str, Any]:
    parts = urlsplit(ctx.route.upstream)
    attributes: dict[str, Any] = {"http.request.method": ctx.request.method, "server.address": parts.hostname or ""}
    if parts.port is not None:
        attributes["server.port"] = parts.port
    return attributes


def _reason(exc: Exception) -> str:
    """A Refusal's audit reason (``no_token``, ``header_mismatch``, ...), else the exception's type."""
    reason = getattr(exc, "reason", None)
    return reason if isinstance(reason, str) else type(exc).__name__


def _refused(span: Span, exc: Exception) -> None:
    from opentelemetry.trace import StatusCode

    reason = _reason(exc)
    span.set_attribute("mcp_gateway.reason", reason)
    span.set_status(StatusCode.ERROR, reason)
