"""The server the official MCP conformance suite (npm ``@modelcontextprotocol/conformance``) runs against.

Built with the official ``mcp`` Python SDK (``MCPServer``). The suite's server scenarios call tools,
resources and prompts by fixed names (``test_simple_text``, ``test://static-text``,
``test_prompt_with_arguments``, ...); the names and the contents checked here are the ones the installed
package's scenarios expect (``tests/conformance/node_modules/conformance-*/dist/index.js``). One server
serves both protocol generations: the SDK answers 2025-11-25 sessions (``initialize``) and 2026-07-28
stateless requests (``server/discover``, per-request ``_meta``, ``InputRequiredResult`` rounds,
``subscriptions/listen``) on the same ``/mcp`` endpoint.

Run as a subprocess exactly like :mod:`tests.support.upstream_server` (same command line, same
``LISTENING http://HOST:PORT`` line), so :func:`tests.support.upstreams.start_upstream` launches it with
``module="tests.support.conformance_server"``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import warnings
from typing import Annotated, Any

from mcp.server import ServerRequestContext
from mcp.server.caching import CacheHint
from mcp.server.mcpserver import Context, MCPServer, RequestStateSecurity
from mcp.server.mcpserver.prompts.base import Prompt, UserMessage
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp.types import (
    MISSING_REQUIRED_CLIENT_CAPABILITY,
    AudioContent,
    Completion,
    CompletionArgument,
    CompletionContext,
    CreateMessageRequest,
    CreateMessageRequestParams,
    CreateMessageResult,
    ElicitRequest,
    ElicitRequestFormParams,
    ElicitResult,
    EmbeddedResource,
    EmptyResult,
    ImageContent,
    InputRequest,
    InputRequiredResult,
    JSONRPCMessage,
    ListRootsRequest,
    ListRootsResult,
    PromptReference,
    ResourceTemplateReference,
    SamplingMessage,
    SetLevelRequestParams,
    SubscribeRequestParams,
    TextContent,
    TextResourceContents,
    UnsubscribeRequestParams,
)
from pydantic import BaseModel, Field

from tests.support.upstream_server import serve_until_stopped

MCP_PATH = "/mcp"
# A 1x1 PNG and a minimal WAV: the suite checks the content type and that data is base64.
PNG_1X1 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
WAV_SILENCE = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA="
# SEP-2322 requestState must be integrity-protected by the server; a fixed test key (>= 32 bytes).
REQUEST_STATE_KEY = b"conformance-fixture-request-state-key-0123456789"
# SEP-2549: every cacheable list/read result carries ttlMs and cacheScope.
CACHE_HINTS = {
    method: CacheHint(ttl_ms=60_000, scope="private")
    for method in ("tools/list", "prompts/list", "resources/list", "resources/templates/list", "resources/read")
}
STEP_PAUSE_SECONDS = 0.05  # between the log / progress notifications of one call, so they arrive as a stream
RECONNECT_PAUSE_SECONDS = 0.2  # test_reconnection: time for the client to reopen the stream it was cut from
MAX_STORED_EVENTS = 10_000


class MemoryEventStore(EventStore):
    """Keeps SSE events in memory so a client can resume a cut stream with ``Last-Event-ID`` (SEP-1699)."""

    def __init__(self) -> None:
        self._events: list[tuple[str, str, JSONRPCMessage | None]] = []

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        event_id = str(len(self._events) + 1)
        self._events.append((stream_id, event_id, message))
        del self._events[:-MAX_STORED_EVENTS]
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        stream = next((s for s, e, _ in self._events if e == last_event_id), None)
        if stream is None:
            return None
        for stream_id, event_id, message in self._events:
            if stream_id == stream and int(event_id) > int(last_event_id) and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream


def _text(text: str) -> TextContent:
    return TextContent(type="text", text=text)


def _ask(message: str, field_name: str = "name", field_type: str = "string") -> ElicitRequest:
    schema = {"type": "object", "properties": {field_name: {"type": field_type}}, "required": [field_name]}
    return ElicitRequest(params=ElicitRequestFormParams(message=message, requested_schema=schema))


def _sample(prompt: str, max_tokens: int = 100) -> CreateMessageRequest:
    messages = [SamplingMessage(role="user", content=_text(prompt))]
    return CreateMessageRequest(params=CreateMessageRequestParams(messages=messages, max_tokens=max_tokens))


def _answer_field(answer: Any, name: str) -> Any:
    return answer.content.get(name) if isinstance(answer, ElicitResult) and answer.content else None


class Sep1034Defaults(BaseModel):
    """Elicitation schema with a default for every primitive type (SEP-1034)."""

    name: str = Field(default="John Doe", description="User name")
    age: int = Field(default=30, description="User age")
    score: float = Field(default=95.5, description="User score")
    status: str = Field(
        default="active", description="User status", json_schema_extra={"enum": ["active", "inactive", "pending"]}
    )
    verified: bool = Field(default=True, description="Verification status")


def _titled(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"const": const, "title": title} for const, title in pairs]


class Sep1330Enums(BaseModel):
    """Elicitation schema with each enum shape of SEP-1330."""

    untitledSingle: str = Field(
        description="Simple enum", json_schema_extra={"enum": ["active", "inactive", "pending"]}
    )
    titledSingle: str = Field(
        description="Titled enum",
        json_schema_extra={
            "oneOf": _titled(("low", "Low Priority"), ("medium", "Medium Priority"), ("high", "High Priority"))
        },
    )
    untitledMulti: list[str] = Field(
        description="Multi-select",
        json_schema_extra={"items": {"type": "string", "enum": ["read", "write", "execute"]}},
    )
    titledMulti: list[str] = Field(
        description="Titled multi-select",
        json_schema_extra={
            "items": {"anyOf": _titled(("feature", "New Feature"), ("bug", "Bug Fix"), ("docs", "Documentation"))}
        },
    )
    legacyEnum: str = Field(
        description="Legacy enum",
        json_schema_extra={
            "enum": ["small", "medium", "large"],
            "enumNames": ["Small Size", "Medium Size", "Large Size"],
        },
    )


class UserAnswer(BaseModel):
    response: str = Field(description="The user's answer")


# The JSON Schema 2020-12 keywords the json-schema-2020-12 scenario expects tools/list to carry unchanged.
SCHEMA_2020_12: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "address": {
            "$anchor": "addressDef",
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        }
    },
    "properties": {
        "name": {"type": "string"},
        "address": {"$ref": "#/$defs/address"},
        "contactMethod": {"type": "string", "enum": ["phone", "email"]},
        "phone": {"type": "string"},
        "email": {"type": "string"},
    },
    "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
    "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
    "then": {"required": ["phone"]},
    "else": {"required": ["email"]},
    "additionalProperties": False,
}


def build_server() -> MCPServer:
    mcp = MCPServer(
        name="mcp-auth-gateway-conformance-fixture",
        version="0.1.0",
        request_state_security=RequestStateSecurity(keys=[REQUEST_STATE_KEY]),
        cache_hints=CACHE_HINTS,
    )

    @mcp.tool()
    def test_simple_text() -> str:
        """Simple text content."""
        return "This is a simple text response for testing."

    @mcp.tool()
    def test_image_content() -> list[ImageContent]:
        """Image content."""
        return [ImageContent(type="image", data=PNG_1X1, mime_type="image/png")]

    @mcp.tool()
    def test_audio_content() -> list[AudioContent]:
        """Audio content."""
        return [AudioContent(type="audio", data=WAV_SILENCE, mime_type="audio/wav")]

    @mcp.tool()
    def test_embedded_resource() -> list[EmbeddedResource]:
        """Embedded resource content."""
        contents = TextResourceContents(
            uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content."
        )
        return [EmbeddedResource(type="resource", resource=contents)]

    @mcp.tool()
    def test_multiple_content_types() -> list[TextContent | ImageContent | EmbeddedResource]:
        """Text, image and resource in one result."""
        contents = TextResourceContents(
            uri="test://mixed-content-resource", mime_type="application/json", text='{"test": "data", "value": 123}'
        )
        return [
            _text("Multiple content types test:"),
            ImageContent(type="image", data=PNG_1X1, mime_type="image/png"),
            EmbeddedResource(type="resource", resource=contents),
        ]

    @mcp.tool()
    async def test_tool_with_logging(ctx: Context) -> str:
        """Sends log notifications while it runs."""
        for message in ("Tool execution started", "Tool processing data", "Tool execution completed"):
            await ctx.info(message)
            await asyncio.sleep(STEP_PAUSE_SECONDS)
        return "Tool with logging executed successfully"

    @mcp.tool()
    async def test_tool_with_progress(ctx: Context) -> str:
        """Sends progress notifications while it runs."""
        for step in (0, 50, 100):
            await ctx.report_progress(progress=step, total=100, message=f"Completed step {step} of 100")
            await asyncio.sleep(STEP_PAUSE_SECONDS)
        meta = ctx.request_context.meta if ctx.request_context else None
        return str(meta.get("progress_token") if meta else 0)

    @mcp.tool()
    async def test_sampling(prompt: str, ctx: Context) -> str:
        """Asks the client's model (sampling/createMessage) on the call's own stream."""
        result = await ctx.session.create_message(
            messages=[SamplingMessage(role="user", content=_text(prompt))],
            max_tokens=100,
            related_request_id=ctx.request_id,
        )
        return f"LLM response: {result.content.text if result.content.type == 'text' else 'No response'}"

    async def _elicit(ctx: Context, message: str, schema: type[BaseModel], label: str) -> str:
        result = await ctx.elicit(message=message, schema=schema)
        content = result.data.model_dump_json() if result.action == "accept" else "{}"
        return f"{label}: action={result.action}, content={content}"

    @mcp.tool()
    async def test_elicitation(message: str, ctx: Context) -> str:
        """Asks the user (elicitation/create)."""
        return await _elicit(ctx, message, UserAnswer, "User response")

    @mcp.tool()
    async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
        """Elicitation whose schema has defaults."""
        return await _elicit(ctx, "Please provide user information", Sep1034Defaults, "Elicitation result")

    @mcp.tool()
    async def test_elicitation_sep1330_enums(ctx: Context) -> str:
        """Elicitation with every enum shape."""
        return await _elicit(ctx, "Please select values", Sep1330Enums, "Elicitation completed")

    @mcp.tool()
    def test_error_handling() -> str:
        """Always fails (a tool error, isError: true)."""
        raise RuntimeError("This tool intentionally returns an error for testing")

    @mcp.tool()
    def test_x_mcp_header(
        region: Annotated[
            str, Field(description="Mirrored in Mcp-Param-Region", json_schema_extra={"x-mcp-header": "Region"})
        ] = "",
    ) -> str:
        """A parameter mirrored in an HTTP header (SEP-2243): arms http-custom-header-server-validation."""
        return f"region={region}"

    @mcp.tool()
    async def test_missing_capability(ctx: Context) -> str:
        """A JSON-RPC error naming the client capability the tool needs (sampling)."""
        capabilities = ctx.session.client_capabilities
        if capabilities is None or capabilities.sampling is None:
            raise MCPError(
                code=MISSING_REQUIRED_CLIENT_CAPABILITY,
                message="This tool requires the client 'sampling' capability",
                data={"requiredCapabilities": {"sampling": {}}},
            )
        return "sampling declared"

    @mcp.tool()
    async def test_input_required_result_elicitation(ctx: Context) -> str | InputRequiredResult:
        """SEP-2322: one elicitation round."""
        responses = ctx.input_responses or {}
        if "user_name" in responses:
            return f"Hello, {_answer_field(responses['user_name'], 'name') or 'stranger'}!"
        return InputRequiredResult(input_requests={"user_name": _ask("What is your name?")})

    @mcp.tool()
    async def test_input_required_result_sampling(ctx: Context) -> str | InputRequiredResult:
        """SEP-2322: one sampling round."""
        responses = ctx.input_responses or {}
        if "capital_question" in responses:
            answer = responses["capital_question"]
            ok = isinstance(answer, CreateMessageResult) and answer.content.type == "text"
            return f"Model said: {answer.content.text if ok else '?'}"
        return InputRequiredResult(input_requests={"capital_question": _sample("What is the capital of France?")})

    @mcp.tool()
    async def test_input_required_result_list_roots(ctx: Context) -> str | InputRequiredResult:
        """SEP-2322: one roots/list round."""
        responses = ctx.input_responses or {}
        if "client_roots" in responses:
            answer = responses["client_roots"]
            return f"Client exposed {len(answer.roots) if isinstance(answer, ListRootsResult) else 0} root(s)."
        return InputRequiredResult(input_requests={"client_roots": ListRootsRequest()})

    @mcp.tool()
    async def test_input_required_result_request_state(ctx: Context) -> str | InputRequiredResult:
        """SEP-2322: requestState comes back with the answer."""
        if "confirm" in (ctx.input_responses or {}) and ctx.request_state == "request-state-nonce":
            return "state-ok: confirmation received"
        confirm = _ask("Please confirm", "ok", "boolean")
        return InputRequiredResult(input_requests={"confirm": confirm}, request_state="request-state-nonce")

    @mcp.tool()
    async def test_input_required_result_multiple_inputs(ctx: Context) -> str | InputRequiredResult:
        """SEP-2322: elicitation, sampling and roots in one round."""
        if {"user_name", "greeting", "client_roots"} <= (ctx.input_responses or {}).keys():
            return "All inputs received."
        requests: dict[str, InputRequest] = {
            "user_name": _ask("What is your name?"),
            "greeting": _sample("Generate a greeting", 50),
            "client_roots": ListRootsRequest(),
        }
        return InputRequiredResult(input_requests=requests, request_state="multiple-inputs")

    @mcp.tool()
    async def test_input_required_result_multi_round(ctx: Context) -> str | InputRequiredResult:
        """SEP-2322: three rounds, the requestState carrying what earlier rounds learned."""
        state = json.loads(ctx.request_state) if ctx.request_state else {"round": 0}
        responses = ctx.input_responses or {}
        if state["round"] == 1 and "step1" in responses:
            name = _answer_field(responses["step1"], "name")
            step2 = _ask("Step 2: What is your favorite color?", "color")
            return InputRequiredResult(
                input_requests={"step2": step2}, request_state=json.dumps({"round": 2, "name": name})
            )
        if state["round"] == 2 and "step2" in responses:
            return f"{state.get('name')} likes {_answer_field(responses['step2'], 'color')}."
        return InputRequiredResult(
            input_requests={"step1": _ask("Step 1: What is your name?")}, request_state=json.dumps({"round": 1})
        )

    @mcp.tool()
    async def test_input_required_result_tampered_state(ctx: Context) -> str | InputRequiredResult:
        """SEP-2322: a tampered requestState is refused by the SDK before this handler runs."""
        if ctx.request_state is None:
            confirm = _ask("Please confirm", "ok", "boolean")
            return InputRequiredResult(input_requests={"confirm": confirm}, request_state="round-1")
        return f"state-ok: {ctx.request_state}"

    @mcp.tool()
    async def test_input_required_result_capabilities(ctx: Context) -> InputRequiredResult:
        """SEP-2322: asks only for what the client declared it can answer."""
        caps = ctx.client_capabilities
        requests: dict[str, InputRequest] = {}
        if caps is None or caps.sampling is not None:
            requests["sample"] = _sample("Say hello", 50)
        if caps is None or caps.elicitation is not None:
            requests["ask"] = _ask("What is your name?")
        return InputRequiredResult(input_requests=requests, request_state="capability-gated")

    @mcp.tool(name="json_schema_2020_12_tool")
    def json_schema_2020_12_tool() -> str:
        """Carries a JSON Schema 2020-12 inputSchema (set below)."""
        return "json_schema_2020_12_tool"

    # MCPServer derives inputSchema from the signature and has no public override for a literal schema.
    mcp._tool_manager._tools["json_schema_2020_12_tool"].parameters = SCHEMA_2020_12

    @mcp.tool()
    async def test_reconnection(ctx: Context) -> str:
        """Closes its own SSE stream mid-call; the client resumes with Last-Event-ID (SEP-1699)."""
        await ctx.info("Before disconnect")
        await ctx.close_sse_stream()
        await asyncio.sleep(RECONNECT_PAUSE_SECONDS)
        await ctx.info("After reconnect")
        return "Reconnection test completed"

    def dynamic() -> str:
        """Added and removed again by the trigger tools."""
        return "dynamic"

    @mcp.tool()
    async def test_trigger_tool_change(ctx: Context) -> str:
        """Changes the tool list and tells subscriptions/listen streams (SEP-2575)."""
        mcp.add_tool(dynamic, name="test_dynamic_tool")
        mcp.remove_tool("test_dynamic_tool")
        await ctx.notify_tools_changed()
        return "tool list changed"

    @mcp.tool()
    async def test_trigger_prompt_change(ctx: Context) -> str:
        """Changes the prompt list and tells subscriptions/listen streams (SEP-2575)."""
        mcp.add_prompt(Prompt.from_function(dynamic, name="test_dynamic_prompt", description="dynamic"))
        mcp.remove_prompt("test_dynamic_prompt")
        await ctx.notify_prompts_changed()
        return "prompt list changed"

    @mcp.resource("test://static-text")
    def static_text() -> str:
        """Static text."""
        return "This is the content of the static text resource."

    @mcp.resource("test://static-binary")
    def static_binary() -> bytes:
        """Static binary (a PNG)."""
        return base64.b64decode(PNG_1X1)

    @mcp.resource("test://template/{id}/data")
    def template(id: str) -> str:
        """A template with one parameter."""
        return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})

    @mcp.resource("test://watched-resource")
    def watched() -> str:
        """A resource clients subscribe to."""
        return "Watched resource content"

    @mcp.prompt()
    def test_simple_prompt() -> list[UserMessage]:
        """No arguments."""
        return [UserMessage(role="user", content=_text("This is a simple prompt for testing."))]

    @mcp.prompt()
    def test_prompt_with_arguments(arg1: str, arg2: str) -> list[UserMessage]:
        """Two required arguments."""
        return [UserMessage(role="user", content=_text(f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"))]

    @mcp.prompt()
    def test_prompt_with_embedded_resource(resourceUri: str) -> list[UserMessage]:
        """An embedded resource."""
        contents = TextResourceContents(
            uri=resourceUri, mime_type="text/plain", text="Embedded resource content for testing."
        )
        return [
            UserMessage(role="user", content=EmbeddedResource(type="resource", resource=contents)),
            UserMessage(role="user", content=_text("Please process the embedded resource above.")),
        ]

    @mcp.prompt()
    def test_prompt_with_image() -> list[UserMessage]:
        """An image."""
        return [
            UserMessage(role="user", content=ImageContent(type="image", data=PNG_1X1, mime_type="image/png")),
            UserMessage(role="user", content=_text("Please analyze the image above.")),
        ]

    @mcp.prompt()
    async def test_input_required_result_prompt(ctx: Context) -> list[UserMessage] | InputRequiredResult:
        """SEP-2322 on prompts/get."""
        responses = ctx.input_responses or {}
        if "user_context" in responses:
            context = _answer_field(responses["user_context"], "context") or "?"
            return [UserMessage(role="user", content=_text(f"Use the following context: {context}"))]
        ask = _ask("What context should the prompt use?", "context")
        return InputRequiredResult(input_requests={"user_context": ask})

    async def set_level(ctx: ServerRequestContext, params: SetLevelRequestParams) -> EmptyResult:
        return EmptyResult()

    async def subscribe(ctx: ServerRequestContext, params: SubscribeRequestParams) -> EmptyResult:
        return EmptyResult()

    async def unsubscribe(ctx: ServerRequestContext, params: UnsubscribeRequestParams) -> EmptyResult:
        return EmptyResult()

    # MCPServer has no public registration for these three; the low-level server does.
    lowlevel = mcp._lowlevel_server
    lowlevel.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)
    lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)

    @mcp.completion()
    async def complete(
        ref: PromptReference | ResourceTemplateReference,
        argument: CompletionArgument,
        context: CompletionContext | None,
    ) -> Completion:
        return Completion(values=[], total=0, has_more=False)

    return mcp


async def _serve(args: argparse.Namespace) -> None:
    app = build_server().streamable_http_app(
        streamable_http_path=MCP_PATH,
        event_store=MemoryEventStore(),
        retry_interval=100,  # ms: the SSE polling scenario waits for the client to come back this soon
        host=args.host,
    )
    await serve_until_stopped(app, args)


def main(argv: list[str] | None = None) -> None:
    """Same command line as tests.support.upstream_server (only the streamable SSE transport)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=["streamable-sse"], default="streamable-sse")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--exit-on-stdin-eof", action="store_true")
    args = parser.parse_args(argv)
    # ctx.info / ctx.session.create_message are the 2025-11-25 paths the old scenarios exercise.
    warnings.simplefilter("ignore", MCPDeprecationWarning)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
