"""URL canonicalisation shared by the resource and authorization servers.

RFC 8707 §2 and RFC 9728 §3.3 compare resource identifiers as strings, but clients differ in how they
spell the same URL (the MCP Python SDK lowercases scheme and host; others keep a default port or a
trailing slash). Comparing canonical forms keeps a legitimate client from being refused without
letting two different resources compare equal.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_url(url: str) -> str:
    """Lowercase scheme and host, drop a default port, the fragment and a trailing slash."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"
    path = parts.path.rstrip("/")
    return urlunsplit((scheme, netloc, path, parts.query, ""))


def resource_problem(value: str) -> str | None:
    """Why ``value`` cannot be a resource indicator, or None. Checked on the string as sent, before
    ``canonical_url``, which drops a fragment and ignores userinfo: RFC 8707 §2 says the value "MUST
    NOT include a fragment component", and userinfo would let ``https://mcp.example.com@evil/`` or
    ``https://user@mcp.example.com/`` stand for a route it does not spell."""
    if "#" in value:
        return "must not include a fragment (RFC 8707 §2)"
    try:
        netloc = urlsplit(value).netloc
    except ValueError:
        return "is not a valid URL"
    if "@" in netloc:
        return "must not include userinfo (user@)"
    return None


def origin_of(url: str) -> str:
    """The RFC 6454 origin (scheme://host[:port]) of a URL, in canonical form."""
    parts = urlsplit(canonical_url(url))
    return f"{parts.scheme}://{parts.netloc}"


def is_same_or_below(candidate: str, base: str) -> bool:
    """True when ``candidate`` names ``base`` itself or a path beneath it (both canonical)."""
    return candidate == base or candidate.startswith(base + "/")
