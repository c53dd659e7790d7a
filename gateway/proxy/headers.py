"""Header rules for forwarding between MCP clients and upstream servers.

- Hop-by-hop headers (RFC 9110 §7.6.1) and any header named in ``Connection`` are never forwarded.
- ``Authorization`` is removed: MCP authorization "Token Handling" forbids passing the client's token
  upstream (token passthrough), and upstream servers must never see gateway credentials.
- ``Cookie`` and ``Origin`` are removed: the gateway has already validated ``Origin`` (MCP transports
  §Security), and upstreams such as the Python SDK reject foreign origins and hosts on loopback.
- ``Host`` becomes the upstream's own (the client library sets it from the URL).
- ``Accept-Encoding: identity`` keeps SSE uncompressed so events are never held back by a compressor.
- Headers claiming a client address or an identity (config ``strip_request_headers``: ``X-Real-IP``,
  ``X-Remote-User``, ``X-Auth-*``...) are removed: the gateway is the upstream's only client, so an
  upstream (or a framework in front of it) that trusts such headers would take an attacker's word for
  who is calling. ``X-Forwarded-*``, ``Forwarded`` and ``X-Real-IP`` are always removed, whatever the
  list says; the gateway then states the facts itself (de-facto ``X-Forwarded-*`` convention, the
  standard form being RFC 7239): ``X-Forwarded-For`` is the peer address of the connection only, and
  ``X-Forwarded-Host``/``-Proto`` come from ``public_url``, never from the client's ``Host``.
- A route's identity header (``routes[].identity_header.name``) is removed whatever
  ``strip_request_headers`` says: only the gateway's signed one may arrive (gateway/proxy/identity_header.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import ALWAYS_STRIPPED_REQUEST_HEADERS, RouteConfig
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
}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "www-authenticate"}
SESSION_HEADER = "Mcp-Session-Id"


class RequestHeaderRules:
    """Which client headers never reach an upstream (names, or prefixes written with a trailing '*',
    matched case-insensitively) and the public origin the gateway reports in ``X-Forwarded-*``."""

    def __init__(self, strip: Iterable[str], public_url: str) -> None:
        patterns = [p.lower() for p in (*ALWAYS_STRIPPED_REQUEST_HEADERS, *strip)]
        self._names = frozenset(p for p in patterns if not p.endswith("*"))
        self._prefixes = tuple(p[:-1] for p in patterns if p.endswith("*"))
        public = urlsplit(public_url)
        self.public_proto = public.scheme
        self.public_host = public.netloc

    def strips(self, name: str) -> bool:
        lowered = name.lower()
        return lowered in self._names or lowered.startswith(self._prefixes)


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    return {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",") if t.strip()}


def upstream_request_headers(request: web.Request, route: RouteConfig, rules: RequestHeaderRules) -> CIMultiDict[str]:
    drop = _REQUEST_DROP | _connection_tokens(request.headers)
    if route.identity_header is not None:
        drop = drop | {route.identity_header.name.lower()}
    # Names with "_" are dropped, as nginx does by default: CGI/WSGI-style servers read "Mcp_Name" as
    # "Mcp-Name" (both become HTTP_MCP_NAME), a header the gateway checked only in its "-" spelling.
    headers = CIMultiDict(
        (k, v) for k, v in request.headers.items() if k.lower() not in drop and "_" not in k and not rules.strips(k)
    )
    headers["X-Forwarded-For"] = client_ip(request)
    headers["X-Forwarded-Proto"] = rules.public_proto
    headers["X-Forwarded-Host"] = rules.public_host
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
