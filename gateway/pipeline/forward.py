"""Stage: answer the request: the gateway's own answers for refused calls, or the upstream's, streamed.

Legacy HTTP+SSE clients expect every response on their GET stream, so the gateway's own answers
(refused calls) are written there too and the POST gets the usual 202.
"""

from __future__ import annotations

import dataclasses

from aiohttp import web

from gateway.pipeline.context import RequestContext, rpc_refusal
from gateway.proxy.forward import StreamLimitReached


async def forward(ctx: RequestContext) -> web.StreamResponse:
    plan, fwd, cors = ctx.plan, ctx.forward, ctx.cors
    assert plan is not None
    local_headers = {**cors, "X-Request-Id": ctx.request_id}
    if fwd is not None and fwd.legacy_stream is not None and plan.local_responses:
        for message in plan.local_responses:
            await fwd.legacy_stream.send(message)
        if plan.forward_body is None:
            return web.Response(status=202, headers=local_headers)
        fwd = dataclasses.replace(fwd, injected=())
    if fwd is None:  # every message was answered by the gateway (refused calls)
        single = plan.local_responses[0] if not plan.batch else plan.local_responses
        return web.json_response(single, headers=local_headers)
    trace_headers = ctx.trace.upstream_headers()
    if trace_headers:
        fwd = dataclasses.replace(fwd, trace_headers=trace_headers)
    try:
        response = await ctx.runtime.upstreams[ctx.route.name].forward(ctx.request, fwd)
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
