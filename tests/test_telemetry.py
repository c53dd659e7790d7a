"""OpenTelemetry (``telemetry.otlp_endpoint``): one trace shows the client's call, the gateway's
authentication, decision and upstream call, and the upstream's request, whose ``traceparent`` header is the
gateway's upstream span; with ``audit.sink: otlp`` the audit lines arrive as log records. Exported over
OTLP/HTTP to a real receiver on loopback, decoded with the official ``opentelemetry-proto`` messages."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from gateway.config import ConfigError, parse_config
from gateway.devidp import DevIdentityProvider
from tests.support.harness import running_gateway
from tests.support.mcp_http import open_session, tool_call, tool_text
from tests.support.upstreams import RunningUpstream

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
META_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
META_SPAN_ID = "b7ad6b7169203331"
RULES = {"tools": [{"id": "support-read", "groups": ["support"], "allow": ["headers_seen", "echo"]}]}


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint (protobuf encoding, OTLP specification §OTLP/HTTP) that keeps every
    span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.logs: list[LogRecord] = []

    async def export(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    async def export_logs(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportLogsServiceRequest()
        message.ParseFromString(await request.read())
        for resource_logs in message.resource_logs:
            for scope_logs in resource_logs.scope_logs:
                self.logs.extend(scope_logs.log_records)
        body = ExportLogsServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    def trace(self, trace_id: str) -> dict[str, Span]:
        """The spans of one trace by name (each name occurs once per request in these tests)."""
        return {span.name: span for span in self.spans if span.trace_id.hex() == trace_id}


@pytest.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[OtlpReceiver, str]]:
    # The exporter uses requests, which honours proxy variables: loopback must never go through one.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    otlp = OtlpReceiver()
    app = web.Application()
    app.router.add_post("/v1/traces", otlp.export)
    app.router.add_post("/v1/logs", otlp.export_logs)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield otlp, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def attributes(span: Span) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in span.attributes:
        kind = item.value.WhichOneof("value")
        values[item.key] = getattr(item.value, kind) if kind else None
    return values


def plain(value: AnyValue) -> Any:
    """An OTLP AnyValue as a Python value (kvlist -> dict, array -> list)."""
    kind = value.WhichOneof("value")
    if kind == "kvlist_value":
        return {item.key: plain(item.value) for item in value.kvlist_value.values}
    if kind == "array_value":
        return [plain(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


def headers_seen(answer: dict[str, Any]) -> dict[str, str]:
    return json.loads(tool_text(answer))


async def test_one_trace_from_the_client_through_the_gateway_to_the_upstream(
    idp: DevIdentityProvider, upstream_json: RunningUpstream, receiver: tuple[OtlpReceiver, str]
) -> None:
    otlp, endpoint = receiver
    routes = [{"name": "traced", "path": "/traced/mcp", "upstream": upstream_json.mcp_url, **RULES}]
    traceparent = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
    async with running_gateway(idp, routes, telemetry={"otlp_endpoint": endpoint}) as gw:
        async with aiohttp.ClientSession() as http:
            client = await open_session(gw, http, "traced")
            seen = headers_seen(await client.call(tool_call(7, "headers_seen"), traceparent=traceparent))
            assert tool_text(await client.call(tool_call(8, "echo", {"text": "s3cr3t-argument"}))) == "s3cr3t-argument"
            token = client.token
    # The gateway's cleanup exports what its batch processor still holds.
    spans = otlp.trace(CLIENT_TRACE_ID)
    assert set(spans) == {"POST /traced/mcp", "authenticate", "decide", "upstream"}, [s.name for s in otlp.spans]
    root, upstream = spans["POST /traced/mcp"], spans["upstream"]
    assert root.parent_span_id.hex() == CLIENT_SPAN_ID  # continues the client's trace
    assert root.kind == Span.SPAN_KIND_SERVER and upstream.kind == Span.SPAN_KIND_CLIENT
    for child in ("authenticate", "decide", "upstream"):
        assert spans[child].parent_span_id == root.span_id, child
    assert root.start_time_unix_nano <= spans["authenticate"].start_time_unix_nano
    # The upstream saw the gateway's upstream span as its parent, in the same trace.
    assert seen["traceparent"] == f"00-{CLIENT_TRACE_ID}-{upstream.span_id.hex()}-01"
    assert attributes(root) | {"url.path": None} == {
        "http.request.method": "POST",
        "http.route": "/traced/mcp",
        "url.path": None,
        "url.scheme": "http",
        "mcp_gateway.route": "traced",
        "http.response.status_code": 200,
        "mcp.method.name": "tools/call",
        "jsonrpc.request.id": "7",
        "gen_ai.tool.name": "headers_seen",
    }
    decide = attributes(spans["decide"])
    assert decide["mcp_gateway.decision"] == "allow" and decide["mcp_gateway.rule"] == "support-read"
    # Never arguments or tokens, in any span of any request.
    exported = repr([attributes(span) for span in otlp.spans])
    assert "s3cr3t-argument" not in exported and token not in exported


async def test_meta_traceparent_is_continued_and_a_denial_is_in_the_decide_span(
    idp: DevIdentityProvider, upstream_json: RunningUpstream, receiver: tuple[OtlpReceiver, str]
) -> None:
    otlp, endpoint = receiver
    routes = [{"name": "traced", "path": "/traced/mcp", "upstream": upstream_json.mcp_url, **RULES}]
    call = tool_call(9, "add", {"a": 1, "b": 2})
    call["params"]["_meta"] = {"traceparent": f"00-{META_TRACE_ID}-{META_SPAN_ID}-01"}
    async with running_gateway(idp, routes, telemetry={"otlp_endpoint": endpoint}) as gw:
        async with aiohttp.ClientSession() as http:
            client = await open_session(gw, http, "traced", user="bob")
            answer = await client.call(call)
    assert answer["error"]["code"] == -32003, answer
    spans = otlp.trace(META_TRACE_ID)
    assert set(spans) == {"POST /traced/mcp", "authenticate", "decide"}  # refused: no upstream call
    assert spans["POST /traced/mcp"].parent_span_id.hex() == META_SPAN_ID
    decide = attributes(spans["decide"])
    assert decide["mcp_gateway.decision"] == "deny"
    assert attributes(spans["POST /traced/mcp"])["gen_ai.tool.name"] == "add"


async def test_refused_token_is_traced_with_its_reason(
    idp: DevIdentityProvider, upstream_json: RunningUpstream, receiver: tuple[OtlpReceiver, str]
) -> None:
    otlp, endpoint = receiver
    routes = [{"name": "traced", "path": "/traced/mcp", "upstream": upstream_json.mcp_url}]
    traceparent = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
    async with running_gateway(idp, routes, telemetry={"otlp_endpoint": endpoint}) as gw:
        async with aiohttp.ClientSession() as http:
            async with http.post(gw.route_url("traced"), json={}, headers={"traceparent": traceparent}) as response:
                assert response.status == 401
    spans = otlp.trace(CLIENT_TRACE_ID)
    assert set(spans) == {"POST /traced/mcp", "authenticate"}
    assert attributes(spans["authenticate"])["mcp_gateway.reason"] == "no_token"
    assert spans["authenticate"].status.code == spans["authenticate"].status.STATUS_CODE_ERROR
    assert attributes(spans["POST /traced/mcp"])["http.response.status_code"] == 401


async def test_without_telemetry_the_clients_traceparent_reaches_the_upstream_unchanged(
    idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    routes = [{"name": "plain", "path": "/plain/mcp", "upstream": upstream_json.mcp_url}]
    traceparent = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
    async with running_gateway(idp, routes) as gw:
        async with aiohttp.ClientSession() as http:
            client = await open_session(gw, http, "plain")
            seen = headers_seen(await client.call(tool_call(3, "headers_seen"), traceparent=traceparent))
    assert seen["traceparent"] == traceparent


async def test_audit_lines_as_otlp_log_records(
    idp: DevIdentityProvider, upstream_json: RunningUpstream, receiver: tuple[OtlpReceiver, str]
) -> None:
    otlp, endpoint = receiver
    routes = [{"name": "audited", "path": "/audited/mcp", "upstream": upstream_json.mcp_url, **RULES}]
    options = {"telemetry": {"otlp_endpoint": endpoint}, "audit": {"sink": "otlp"}}
    async with running_gateway(idp, routes, **options) as gw:
        async with aiohttp.ClientSession() as http:
            client = await open_session(gw, http, "audited", user="bob")
            assert tool_text(await client.call(tool_call(4, "echo", {"text": "s3cr3t-argument"}))) == "s3cr3t-argument"
            denied = await client.call(tool_call(5, "add", {"a": 1, "b": 2}))
            assert denied["error"]["code"] == -32003
    records = [(record.event_name, plain(record.body)) for record in otlp.logs]
    calls = {body["target"]: (event, body) for event, body in records if body.get("target")}
    event, called = calls["echo"]
    assert event == "tool.called" and called["decision"] == "allow" and called["rule"] == "support-read"
    assert called["route"] == "audited" and called["sub"] == "bob" and called["groups"] == ["support"]
    event, refused = calls["add"]
    assert event == "tool.denied" and refused["decision"] == "deny"
    assert {"token.issued", "request.completed"} <= {event for event, _ in records}
    assert all(record.time_unix_nano > 0 and record.severity_text == "INFO" for record in otlp.logs)
    assert "s3cr3t-argument" not in repr(records)


def _config(**extra: Any) -> dict[str, Any]:
    return {
        "public_url": "http://127.0.0.1:8080",
        "authorization": {
            "identity_providers": [{"issuer": "http://127.0.0.1:9000"}],
            "clients": [{"client_id": "agent", "client_secret": "agent-secret-0123456789"}],
        },
        "routes": [{"name": "r", "path": "/r/mcp", "upstream": "http://127.0.0.1:9001/mcp"}],
        **extra,
    }


def test_audit_sink_otlp_needs_the_endpoint() -> None:
    with pytest.raises(ConfigError, match=r"^gw\.yaml: audit\.sink: otlp sends audit lines to telemetry\."):
        parse_config(_config(audit={"sink": "otlp"}), source="gw.yaml")


def test_otlp_endpoint_must_be_a_url() -> None:
    with pytest.raises(ConfigError, match=r"^gw\.yaml: telemetry\.otlp_endpoint: must be an absolute http\(s\) URL"):
        parse_config(_config(telemetry={"otlp_endpoint": "collector:4318"}), source="gw.yaml")
