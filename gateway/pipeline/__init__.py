"""The proxied path as a sequence of stages, one module each, passing one request context.

    origin -> authenticate (bearer + revocation) -> body -> decide (engine) -> session
        -> upstream credential (chained ID-JAG routes only) -> forward

and the audit trail around them (decisions when made, completion when the response ends). Each stage
either lets the request go on, answers it (:class:`Answer`), or refuses it (:class:`Refusal`);
``run`` is the only place that turns those into HTTP responses.

Bookkeeping stays off the path a caller waits on (issue 13: the p50 of a proxied call): the decision
lines are written at the next turn of the event loop, once the upstream request is on the wire, and a
forwarded answer is sent to the client before the completion line, the metrics and the access log.
Neither changes what the trail says, or its order: a call cancelled at once still gets its decision
lines, always before its completion line.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.pipeline.audit import audit_completion, audit_decisions, audit_refusal
from gateway.pipeline.authenticate import authenticate
from gateway.pipeline.body import read_body
from gateway.pipeline.context import Answer, Refusal, RequestContext, Services
from gateway.pipeline.credential import upstream_credential
from gateway.pipeline.decide import decide
from gateway.pipeline.forward import forward
from gateway.pipeline.origin import check_origin
from gateway.pipeline.session import bind_session

__all__ = ["STAGES", "Answer", "Refusal", "RequestContext", "Services", "run"]

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that closed the connection before the answer

Stage = Callable[[RequestContext], Awaitable[Answer | None]]
STAGES: tuple[Stage, ...] = (check_origin, authenticate, read_body, decide, bind_session, upstream_credential)


async def run(ctx: RequestContext, stages: tuple[Stage, ...] = STAGES) -> web.StreamResponse:
    try:
        for stage in stages:
            with ctx.trace.stage(stage.__name__):
                answer = await stage(ctx)
            if answer is not None:
                return _answer_response(answer)
    except Refusal as refusal:
        audit_refusal(ctx, refusal)
        return refusal_response(refusal, ctx.cors)
    decisions = _Once(audit_decisions, ctx)
    asyncio.get_running_loop().call_soon(decisions)
    status = CLIENT_CLOSED_REQUEST
    try:
        try:
            with ctx.trace.stage(forward.__name__):
                response = await forward(ctx)
        except Refusal as refusal:
            audit_refusal(ctx, refusal)
            response = refusal_response(refusal, ctx.cors)
        status = response.status
        await _send(ctx, response)
        return response
    finally:
        decisions()  # already written, unless the request ended before the loop came round
        audit_completion(ctx, status)


class _Once:
    """``audit_decisions(ctx)`` the first time it is called, nothing after."""

    __slots__ = ("_ctx", "_write")

    def __init__(self, write: Callable[[RequestContext], None], ctx: RequestContext) -> None:
        self._write: Callable[[RequestContext], None] | None = write
        self._ctx = ctx

    def __call__(self) -> None:
        write, self._write = self._write, None
        if write is not None:
            write(self._ctx)


async def _send(ctx: RequestContext, response: web.StreamResponse) -> None:
    """Send a complete answer now, not after the handler's bookkeeping (aiohttp would send it once the
    handler returns; it then finds it sent). Streamed answers were sent as they came."""
    if response.prepared:
        return
    try:
        await response.prepare(ctx.request)
        await response.write_eof()
    except ConnectionError:
        log.info("route %s: the client left before the answer was sent", ctx.route.name)


def refusal_response(refusal: Refusal, cors: dict[str, str]) -> web.Response:
    return web.Response(
        status=refusal.status,
        text=json.dumps(refusal.body),
        content_type="application/json",
        headers={**refusal.headers, **cors},
    )


def _answer_response(answer: Answer) -> web.Response:
    if answer.body is None:
        return web.Response(status=answer.status, headers=dict(answer.headers))
    return web.Response(
        status=answer.status,
        text=json.dumps(answer.body),
        content_type="application/json",
        headers=dict(answer.headers),
    )
