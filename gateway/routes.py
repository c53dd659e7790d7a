"""The route table: which upstream serves a request path, and which route a resource names.

A route's resource identifier (RFC 9728 §1.2, RFC 8707 §2) is ``public_url + path``; the same table
answers both the proxy's question (path -> route) and the authorization server's (resource -> route).
"""

from __future__ import annotations

from collections.abc import Iterator

from gateway.config import RouteConfig
from gateway.urls import canonical_url, is_same_or_below


class RouteTable:
    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        # Longest path first, so the most specific route wins (paths never overlap today, but
        # ordering makes the lookup correct regardless).
        self._routes = tuple(sorted(routes, key=lambda r: len(r.path), reverse=True))
        self._by_name = {r.name: r for r in routes}

    def __iter__(self) -> Iterator[RouteConfig]:
        return iter(self._routes)

    def __len__(self) -> int:
        return len(self._routes)

    def by_name(self, name: str) -> RouteConfig | None:
        return self._by_name.get(name)

    def match_path(self, path: str) -> tuple[RouteConfig, str] | None:
        """The route serving ``path`` and the remainder after its prefix ('' or '/...')."""
        for route in self._routes:
            if path == route.path or path.startswith(route.path + "/"):
                return route, path[len(route.path) :]
        return None

    def for_resource(self, resource: str) -> RouteConfig | None:
        """The route whose resource identifier is ``resource`` or a prefix of it (a URL under it)."""
        canonical = canonical_url(resource)
        for route in self._routes:
            if is_same_or_below(canonical, route.resource):
                return route
        return None
