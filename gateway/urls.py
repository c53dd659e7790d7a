"""URL canonicalisation shared by the resource and authorization servers.

RFC 8707 §2 and RFC 9728 §3.3 compare resource identifiers as strings, but clients differ in how they
spell the same URL (the MCP Python SDK lowercases scheme and host; others keep a default port or a
trailing slash). Comparing canonical forms keeps a legitimate client from being refused without
letting two different resources compare equal: the syntax-based normalisation of RFC 3986 §6.2.2
(which never changes what a URL identifies), the scheme-based default port of §6.2.3, and one
deliberate leniency, a single trailing '/' (an IdP such as xaa.dev appends one).
"""

from __future__ import annotations

import re
import string
from urllib.parse import urlsplit, urlunsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")  # RFC 3986 §2.3
_PERCENT_ENCODED = re.compile(r"%([0-9A-Fa-f]{2})")


def canonical_url(url: str) -> str:
    """The RFC 3986 §6.2.2 normal form, a default port dropped (§6.2.3), without the fragment and
    without one trailing slash."""
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
    path = remove_dot_segments(_normalise_percent_encoding(parts.path)).removesuffix("/")
    return urlunsplit((scheme, netloc, path, _normalise_percent_encoding(parts.query), ""))


def _normalise_percent_encoding(component: str) -> str:
    """RFC 3986 §6.2.2.1 and §6.2.2.2: percent-encodings of unreserved characters are decoded, all
    others are written in upper case. A reserved character ('%2F') stays encoded: decoding it would
    change what the URL identifies."""

    def normalise(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else "%" + match.group(1).upper()

    return _PERCENT_ENCODED.sub(normalise, component)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 (used by §6.2.2.3) for an absolute path: '.' and '..' segments resolved, so
    ``/eng/../json/mcp`` is ``/json/mcp``; a path ending in one keeps its trailing '/'."""
    if not path.startswith("/"):
        return path
    segments = path.split("/")[1:]
    output: list[str] = []
    for segment in segments:
        if segment == "..":
            if output:
                output.pop()
        elif segment != ".":
            output.append(segment)
    if segments[-1] in (".", ".."):
        output.append("")
    return "/" + "/".join(output)


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
