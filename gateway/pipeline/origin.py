"""Stage: the browser ``Origin`` check and CORS, before anything else is looked at.

MCP Streamable HTTP §Security: servers "MUST validate the Origin header" (DNS rebinding). A CORS
preflight is answered here; methods MCP does not use are refused (not audited: nothing was decided).
"""

from __future__ import annotations

from gateway.pipeline.context import FORBIDDEN, INVALID_REQUEST, Answer, RequestContext, rpc_refusal

FORWARDED_METHODS = frozenset({"GET", "POST", "DELETE"})


async def check_origin(ctx: RequestContext) -> Answer | None:
    origins = ctx.runtime.origins
    origin = ctx.request.headers.get("Origin")
    if not origins.is_allowed(origin):
        raise rpc_refusal(403, FORBIDDEN, "Origin not allowed", "origin")
    ctx.cors = origins.cors_headers(origin)
    method = ctx.request.method
    if method == "OPTIONS" and origin is not None:
        return Answer(204, origins.preflight_headers(origin))
    if method not in FORWARDED_METHODS:
        raise rpc_refusal(
            405, INVALID_REQUEST, "method not allowed", "method", headers={"Allow": "GET, POST, DELETE"}, audited=False
        )
    return None
