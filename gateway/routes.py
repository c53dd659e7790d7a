"""The route table: which upstream serves a request path, and which route a resource names.

A route's resource identifier (RFC 9728 §1.2, RFC 8707 §2) is ``public_url + path``; the same table
answers both the proxy's question (path -> route) and the authorization server's (resource -> route).
"""

from __future__ import annotations

from collections.abc import Iterator

from gateway.config import RouteConfig
from gateway.urls import canonical_url

# The legacy HTTP+SSE transport's MCP endpoint relative to the route path: clients connect to path/sse.
LEGACY_SSE_ENDPOINT = "/sse"


class RouteTable:
    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        # Longest path first, so the most specific route wins (paths never overlap today, but
        # ordering makes the lookup correct regardless).
        self._routes = tuple(sorted(routes, key=lambda r: len(r.path), reverse=True))
        self._by_name = {r.name: r for r in routes}
        # Path lookup per request: one dict probe per distinct route path length (longest first)
        # instead of a scan of every route, so a table of dozens of routes costs what one does.
        self._by_path = {r.path: r for r in routes}
        self._path_lengths = tuple(sorted({len(r.path) for r in routes}, reverse=True))

    def __iter__(self) -> Iterator[RouteConfig]:
        return iter(self._routes)

    def __len__(self) -> int:
        return len(self._routes)

    def by_name(self, name: str) -> RouteConfig | None:
        return self._by_name.get(name)

    def match_path(self, path: str) -> tuple[RouteConfig, str] | None:
        """The route serving ``path`` and the remainder after its prefix ('' or '/...')."""
        for length in self._path_lengths:
            if len(path) == length or path[length : length + 1] == "/":
                route = self._by_path.get(path[:length])
                if route is not None:
                    return route, path[length:]
        return None

    def for_resource(self, resource: str) -> RouteConfig | None:
        """The route that ``resource`` identifies exactly (compared in canonical form), or None.

        A URL *below* a route names no route: an access token is audience-restricted to what the
        ID-JAG named (EMA §5.1), and the gateway cannot restrict a token to part of an upstream."""
        canonical = canonical_url(resource)
        for route in self._routes:
            if canonical in resource_identifiers(route):
                return route
        return None


def resource_identifiers(route: RouteConfig) -> tuple[str, ...]:
    """The canonical resource identifiers (RFC 8707 §2) that name ``route``: its resource, and for a
    legacy HTTP+SSE route also its SSE endpoint, which is that transport's MCP server URL (clients
    such as the Python SDK derive the resource from the URL they connect to). Both name the same
    MCP server, so a token for either is a token for the route."""
    if route.transport == "sse":
        return (route.resource, route.resource + LEGACY_SSE_ENDPOINT)
    return (route.resource,)
