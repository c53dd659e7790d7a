"""Stage: read a POST body within its limits and parse it once, strictly (gateway/proxy/request_body.py).

The size limit answers 413 and the deadline 408 (a client trickling bytes must not hold a handler);
a body the gateway cannot read exactly as the upstream would is refused before any decision.
"""

from __future__ import annotations

from aiohttp import web

from gateway.http import BodyTooLarge, BodyTooSlow, read_limited
from gateway.metrics import method_class
from gateway.pipeline.context import INVALID_REQUEST, METHOD_CLASS, RequestContext, rpc_refusal
from gateway.proxy.request_body import PARSE_ERROR, BodyRefused, check_encoding, read_rpc_body


async def read_body(ctx: RequestContext) -> None:
    request = ctx.request
    if request.method != "POST":
        return
    try:
        check_encoding(request.headers.get("Content-Type"), request.headers.getall("Content-Encoding", []))
    except BodyRefused as refused:
        raise rpc_refusal(refused.status, refused.code, refused.message, "malformed_body") from None
    limits = ctx.runtime.config.limits
    try:
        ctx.body = await read_limited(request, limits.max_request_bytes, limits.request_body_timeout_seconds)
    except BodyTooLarge:
        raise rpc_refusal(413, INVALID_REQUEST, "request body too large", "body_too_large") from None
    except BodyTooSlow:
        raise rpc_refusal(408, INVALID_REQUEST, "request body too slow", "body_too_slow") from None
    except web.RequestPayloadError:
        # The one layer the server undoes was not what it claimed (corrupt gzip, say).
        raise rpc_refusal(400, PARSE_ERROR, "Parse error: the body could not be decoded", "malformed_body") from None
    try:
        ctx.rpc = read_rpc_body(ctx.body)
    except BodyRefused as refused:
        raise rpc_refusal(refused.status, refused.code, refused.message, "malformed_body", refused.request_id) from None
    request[METHOD_CLASS] = method_class(request.method, [m.method for m in ctx.rpc.messages])
