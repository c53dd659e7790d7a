"""Header rules for forwarding between MCP clients and upstream servers.

- Hop-by-hop headers (RFC 9110 §7.6.1) and any header named in ``Connection`` are never forwarded.
- ``Authorization`` is removed: MCP authorization "Token Handling" forbids passing the client's token
  upstream (token passthrough), and upstream servers must never see gateway credentials.
- ``Cookie`` and ``Origin`` are removed: the gateway has already validated ``Origin`` (MCP transports
  §Security), and upstreams such as the Python SDK reject foreign origins and hosts on loopback.
- ``Host`` becomes the upstream's own (the client library sets it from the URL).
- ``Accept-Encoding: identity`` keeps SSE uncompressed so events are never held back by a compressor.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import RouteConfig
from gateway.http import client_ip

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "authorization",
    "cookie",
    "origin",
    "content-length",
    "accept-encoding",
    "expect",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "www-authenticate"}
SESSION_HEADER = "Mcp-Session-Id"


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    return {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",") if t.strip()}


def upstream_request_headers(request: web.Request, route: RouteConfig, public_scheme: str) -> CIMultiDict[str]:
    drop = _REQUEST_DROP | _connection_tokens(request.headers)
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in drop)
    previous = request.headers.get("X-Forwarded-For")
    ip = client_ip(request)
    headers["X-Forwarded-For"] = f"{previous}, {ip}" if previous else ip
    headers["X-Forwarded-Proto"] = public_scheme
    headers["X-Forwarded-Host"] = request.host
    headers["Accept-Encoding"] = "identity"
    for name, secret in route.upstream_headers:
        headers[name] = secret.value
    return headers


def client_response_headers(upstream: CIMultiDictProxy[str], extra: Iterable[tuple[str, str]] = ()) -> CIMultiDict[str]:
    # An upstream's own WWW-Authenticate would point clients at an authorization server that is
    # not ours; the gateway is the only authority clients should see.
    drop = _RESPONSE_DROP | _connection_tokens(upstream)
    headers = CIMultiDict((k, v) for k, v in upstream.items() if k.lower() not in drop)
    for name, value in extra:
        headers[name] = value
    return headers
