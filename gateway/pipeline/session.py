"""Stage: session binding, and what exactly will be sent upstream.

MCP security best practices (Session Hijacking): a session id belongs to the principal that created
it (gateway/sessions.py binds it statelessly). A session presented by another principal is refused
with 403 and audited as ``session.mismatch``; an unknown one gets 404, so clients start a new session.
So does one created before the IdP cut its user off (Shared Signals, gateway/signals/): the session ends
with the sign-in it belonged to, even for a new token of the same user.

The legacy HTTP+SSE transport (2024-11-05) answers POSTed requests on the long-lived GET stream, not in
the POST response: the GET stream owns the rewriter (list filtering, capability advertisement), and
each POST of that session hands its expectations to it, found by the upstream session id.

A POST carrying a client's answer to the gateway's own question (an approval asked on an SSE response,
gateway/approvals/session.py) is consumed here, after the session check, and never forwarded.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from gateway.approvals.desk import supports_form_elicitation
from gateway.approvals.session import Delivery, is_gateway_id, shared_asks
from gateway.pipeline.context import (
    FORBIDDEN,
    INVALID_REQUEST,
    SESSION_NOT_FOUND,
    Answer,
    Refusal,
    RequestContext,
    rpc_error,
    rpc_refusal,
)
from gateway.proxy.forward import ForwardRequest, LegacyStream, session_param_names, wrap_session_params
from gateway.proxy.headers import SESSION_HEADER
from gateway.proxy.identity_header import identity_token
from gateway.proxy.jsonrpc import ResultRewriter
from gateway.proxy.request_body import RpcBody
from gateway.sessions import SessionBinder, SessionCheck, principal_key

INTERNAL_ERROR = -32603  # JSON-RPC 2.0 §5.1


async def bind_session(ctx: RequestContext) -> Answer | None:
    principal, plan, route, request = ctx.principal, ctx.plan, ctx.route, ctx.request
    assert principal is not None and plan is not None
    owner = principal_key(principal.identity, principal.client_id)
    binder = ctx.runtime.sessions
    upstream_session = None
    presented = request.headers.get(SESSION_HEADER)
    ended = functools.partial(ctx.services.revocations.refuses, principal.identity, principal.email)
    if presented is not None:
        upstream_session = _check(binder, route.name, owner, presented, ended)
    # Only routes that ask can have questions waiting (the hot path of the others checks nothing).
    if (
        route.policy.tools.asks
        and ctx.rpc is not None
        and any(m.method is None and is_gateway_id(m.id) for m in ctx.rpc.messages)
    ):
        return await _take_answer(ctx, ctx.rpc, owner, presented)
    query = None
    rewriter = plan.rewriter
    wrap: Callable[[str], str] = functools.partial(
        binder.wrap, route.name, owner, elicitation=_declares_elicitation(ctx.rpc)
    )
    if upstream_session is not None:
        wrap = functools.partial(_same_or_wrap, presented, upstream_session, wrap)
    legacy: LegacyStream | None = None
    if route.transport == "sse":
        rewriter, wrap, query, legacy = _legacy_session(ctx, binder, owner, ended)
    if request.method == "POST" and plan.forward_body is None and plan.ask is None and legacy is None:
        ctx.forward = None  # every message was answered by the gateway
        return
    ctx.forward = ForwardRequest(
        route=route,
        rest=ctx.rest,
        body=plan.forward_body,
        rewriter=rewriter,
        request_id=plan.request_id,
        extra_headers=(*ctx.cors.items(), ("X-Request-Id", ctx.request_id)),
        injected=tuple(plan.local_responses),
        upstream_session_id=upstream_session,
        query=query,
        wrap_session=wrap,
        legacy_stream=legacy,
        owner=owner,
        principal=principal,
        added_headers=_identity_header(ctx),
    )
    return None


def _same_or_wrap(presented: str, upstream_id: str, wrap: Callable[[str], str], echoed: str) -> str:
    """An upstream echoing the session this request named: the client keeps the id it presented (same
    creation second, same capabilities, no new MAC per response); any other id is wrapped anew."""
    return presented if echoed == upstream_id else wrap(echoed)


def _declares_elicitation(rpc: RpcBody | None) -> bool:
    """An ``initialize`` whose client can show forms: the session id the upstream hands out for it
    says so (gateway/sessions.py), so later calls of the session can be asked about."""
    if rpc is None or rpc.batch or rpc.messages[0].method != "initialize":
        return False
    return supports_form_elicitation((rpc.messages[0].params or {}).get("capabilities"))


async def _take_answer(ctx: RequestContext, rpc: RpcBody, owner: str, session: str | None) -> Answer:
    """A client's answer to the gateway's own question: 202 once delivered, never forwarded."""
    if len(rpc.messages) > 1:
        raise rpc_refusal(
            400, INVALID_REQUEST, "an answer to the gateway must be sent on its own", "gateway answer in a batch"
        )
    message = rpc.messages[0]
    delivery = await ctx.services.asks.deliver(message.raw, owner, session, shared_asks(ctx.runtime.replay))
    if delivery is Delivery.FOREIGN:
        raise rpc_refusal(
            403, FORBIDDEN, "this question was asked of another user, client or session", "approval answer foreign"
        )
    if delivery is Delivery.UNAVAILABLE:
        raise rpc_refusal(
            503, INTERNAL_ERROR, "approvals are unavailable right now; send the answer again", "approvals unavailable"
        )
    if delivery is Delivery.UNKNOWN:
        # Answered already, timed out, or (replay_store: memory) asked by another gateway process.
        body = rpc_error(INVALID_REQUEST, "no question of this id is waiting for an answer here", message.id)
        raise Refusal(404, body, "approval answer unknown")
    return Answer(202, {**ctx.cors, "X-Request-Id": ctx.request_id})


def _identity_header(ctx: RequestContext) -> tuple[tuple[str, str], ...]:
    config, principal = ctx.route.identity_header, ctx.principal
    if config is None or principal is None:
        return ()
    token = identity_token(
        config,
        key=ctx.runtime.signing_key,
        issuer=ctx.runtime.config.authorization.issuer,
        route=ctx.route.name,
        principal=principal,
        request_id=ctx.request_id,
        now=time.time(),
    )
    return ((config.name, token),)


def _legacy_session(
    ctx: RequestContext, binder: SessionBinder, owner: str, ended: Callable[[int], bool]
) -> tuple[ResultRewriter, Callable[[str], str], str | None, LegacyStream | None]:
    route, plan, streams = ctx.route, ctx.plan, ctx.services.legacy_streams
    assert plan is not None
    raw_query = ctx.request.rel_url.raw_query_string
    if ctx.request.method == "GET":
        stream = LegacyStream(plan.rewriter)

        def wrap_and_register(upstream_id: str) -> str:
            streams[upstream_id] = stream
            return binder.wrap(route.name, owner, upstream_id)

        return stream.rewriter, wrap_and_register, None, stream
    if len(session_param_names(raw_query)) > 1:
        # Which copy an upstream reads (first, last, joined) is its own choice; we check only one.
        raise rpc_refusal(
            400, INVALID_REQUEST, "the session id parameter must not be repeated", "repeated_session_parameter"
        )
    seen: list[str] = []

    def check(presented: str) -> str:
        upstream_id = _check(binder, route.name, owner, presented, ended)
        seen.append(upstream_id)
        return upstream_id

    query = wrap_session_params(raw_query, check) if raw_query else None
    found = next((s for s in map(streams.get, seen) if s is not None), None)
    if found is not None:
        found.rewriter.absorb(plan.rewriter)
    return plan.rewriter, functools.partial(binder.wrap, route.name, owner), query, found


def _check(binder: SessionBinder, route_name: str, owner: str, presented: str, ended: Callable[[int], bool]) -> str:
    """``ended``: whether a session created at that second was ended by a Shared Signals cut-off."""
    status, upstream_id = binder.unwrap(route_name, owner, presented)
    if status is SessionCheck.OK and ended(SessionBinder.created_at(presented)):
        raise rpc_refusal(404, SESSION_NOT_FOUND, "session not found", "session ended by the identity provider")
    if status is SessionCheck.OK:
        assert upstream_id is not None
        return upstream_id
    if status is SessionCheck.FOREIGN:
        # Session theft across principals: refused and audited (MCP security best practices).
        raise rpc_refusal(
            403,
            FORBIDDEN,
            "this session belongs to another user or client",
            "session belongs to another principal",
            event="session.mismatch",
        )
    # Unknown (or from before a key change): 404 makes MCP clients start a new session.
    raise rpc_refusal(404, SESSION_NOT_FOUND, "session not found", "unknown session")
