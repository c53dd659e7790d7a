"""Stage: answer the request: the gateway's own answers for refused calls, or the upstream's, streamed.

Legacy HTTP+SSE clients expect every response on their GET stream, so the gateway's own answers
(refused calls) are written there too and the POST gets the usual 202.

A call to ask the caller about (``plan.ask``, MCP up to 2025-11-25) gets an SSE response at once: the
question first (gateway/approvals/session.py), then, once approved, the upstream's answer in the same
stream; otherwise one ``-32003`` error event. A client that leaves while asked cancels this handler
(aiohttp ``handler_cancellation``): nothing is forwarded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging

import aiohttp
from aiohttp import web

from gateway.approvals.desk import Answered, Ask, refusal
from gateway.approvals.session import TIMEOUT, UNAVAILABLE, ask_caller, shared_asks
from gateway.enforce import decide_approved
from gateway.pipeline.audit import audit_approval, audit_call
from gateway.pipeline.context import RequestContext, rpc_error, rpc_refusal
from gateway.proxy.forward import KEEPALIVE, ForwardRequest, StreamLimitReached, sse_event
from gateway.proxy.headers import SESSION_HEADER
from gateway.proxy.request_body import canonical_json

log = logging.getLogger(__name__)


async def forward(ctx: RequestContext) -> web.StreamResponse:
    plan, fwd, cors = ctx.plan, ctx.forward, ctx.cors
    assert plan is not None
    local_headers = {**cors, "X-Request-Id": ctx.request_id}
    if plan.ask is not None and fwd is not None:
        return await _ask_then_forward(ctx, fwd, plan.ask, local_headers)
    if fwd is not None and fwd.legacy_stream is not None and plan.local_responses:
        for message in plan.local_responses:
            await fwd.legacy_stream.send(message)
        if plan.forward_body is None:
            return web.Response(status=202, headers=local_headers)
        fwd = dataclasses.replace(fwd, injected=())
    if fwd is None:  # every message was answered by the gateway (refused calls)
        single = plan.local_responses[0] if not plan.batch else plan.local_responses
        return web.json_response(single, headers=local_headers)
    try:
        response = await ctx.runtime.upstreams[ctx.route.name].forward(ctx.request, _traced(ctx, fwd))
    except StreamLimitReached as refused:
        retry = {"Retry-After": str(refused.retry_after_seconds)}
        raise rpc_refusal(
            429, refused.code, refused.message, "stream_limit", refused.request_id, headers=retry
        ) from None
    if not response.prepared:
        response.headers.update(cors)
    if response.status == 401 and ctx.upstream_token is not None and ctx.services.credentials is not None:
        assert ctx.principal is not None
        ctx.services.credentials.rejected(ctx.route, ctx.principal, ctx.upstream_token)
    return response


async def _ask_then_forward(
    ctx: RequestContext, fwd: ForwardRequest, ask: Ask, headers: dict[str, str]
) -> web.StreamResponse:
    stream_headers = {**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    response = web.StreamResponse(status=200, headers={**stream_headers, "X-Accel-Buffering": "no"})
    await response.prepare(ctx.request)
    try:
        await _ask_and_answer(ctx, fwd, ask, response)
    except (aiohttp.ClientError, ConnectionError) as exc:  # the client left (a write failed): nothing to forward
        log.info("route %s: client left while asked for an approval: %s", ctx.route.name, type(exc).__name__)
    return response


async def _ask_and_answer(ctx: RequestContext, fwd: ForwardRequest, ask: Ask, response: web.StreamResponse) -> None:
    principal = ctx.principal
    assert principal is not None and fwd.owner is not None

    async def send(message: object) -> None:
        await response.write(sse_event(message))

    async def keep_alive() -> None:
        await response.write(KEEPALIVE)

    outcome = await ask_caller(
        ask,
        ctx.services.asks,
        owner=fwd.owner,
        session=ctx.request.headers.get(SESSION_HEADER, ""),
        owner_limit=ctx.runtime.config.limits.max_streams_per_principal,
        approver=principal.subject,
        send=send,
        keep_alive=keep_alive,
        keepalive_seconds=ctx.runtime.config.limits.stream_keepalive_seconds or None,
        observe=functools.partial(audit_approval, ctx),
        shared=shared_asks(ctx.runtime.replay),
    )
    if outcome != "approved":
        await send(_not_approved(ask, outcome).response)
        await response.write_eof()
        return
    record, refused = await decide_approved(ctx.runtime.engine, principal, ctx.route, ask, ctx.runtime.argument_digest)
    audit_call(ctx, record)  # the call as finally decided: tool.called, or tool.denied (e.g. a quota)
    if refused is not None:
        await send(refused)
        await response.write_eof()
        return
    fwd = dataclasses.replace(fwd, body=canonical_json(ask.message.raw), into=response)
    try:
        answered = await ctx.runtime.upstreams[ctx.route.name].forward(ctx.request, _traced(ctx, fwd))
    except StreamLimitReached as limited:
        answered = web.json_response(rpc_error(limited.code, limited.message, limited.request_id))
    if answered is not response:  # the gateway's own error (pool busy, upstream unreachable or slow)
        assert isinstance(answered, web.Response) and isinstance(answered.body, bytes)
        await send(json.loads(answered.body))
        await response.write_eof()


def _traced(ctx: RequestContext, fwd: ForwardRequest) -> ForwardRequest:
    """The W3C Trace Context of the gateway's upstream span, when traces are on (gateway/telemetry.py)."""
    trace_headers = ctx.trace.upstream_headers()
    return dataclasses.replace(fwd, trace_headers=trace_headers) if trace_headers else fwd


def _not_approved(ask: Ask, outcome: str) -> Answered:
    tool = ask.binding.tool
    if outcome == UNAVAILABLE:
        return refusal(ask.message, "approval_unavailable", "Approvals are unavailable right now; try again")
    if outcome == TIMEOUT:
        text = f"The call of tool '{tool}' was not approved within {ask.spec.timeout_seconds} seconds"
        return refusal(ask.message, "approval_timeout", text)
    return refusal(ask.message, f"approval_{outcome}", f"The call of tool '{tool}' was not approved")
