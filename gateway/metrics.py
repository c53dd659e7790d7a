"""Prometheus metrics (prometheus-client), one registry per gateway instance.

Naming follows Prometheus conventions: the ``mcp_gateway_`` prefix, base units (seconds), ``_total``
counters. Every label value comes from a bounded set: route names and IdP issuers from the config,
JSON-RPC methods from the fixed list below (anything else is ``other``), OAuth error reasons from the
gateway's own codes. Nothing a client sends becomes a label value unchecked, so a client cannot
blow up the time-series count. docs/metrics.md lists every metric with example queries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.mcp_methods import METHODS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NO_ROUTE = "none"
# JSON-RPC methods kept as label values; others are counted as "other".
KNOWN_METHODS = frozenset(METHODS) | {"notification", "response", "batch"}
# HTTP methods without a JSON-RPC body get their own classes.
HTTP_CLASSES = {"GET": "stream", "DELETE": "session_delete"}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def method_class(http_method: str, jsonrpc_methods: Iterable[str | None] | None) -> str:
    if http_method in HTTP_CLASSES:
        return HTTP_CLASSES[http_method]
    methods = list(jsonrpc_methods or ())
    if len(methods) > 1:
        return "batch"
    if not methods:
        return "other"
    method = methods[0] or "response"
    return method if method in KNOWN_METHODS else ("notification" if method.startswith("notifications/") else "other")


class _JwksAgeCollector(Collector):
    """Computed at scrape time: the age of each IdP's cached keys (staleness alerting)."""

    def __init__(self, key_sets: Callable[[], dict[str, object]]) -> None:
        self._key_sets = key_sets

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "mcp_gateway_jwks_age_seconds", "Seconds since the IdP's signing keys were last fetched", labels=["issuer"]
        )

    def describe(self) -> Iterable[GaugeMetricFamily]:
        yield self._family()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = self._family()
        now = time.monotonic()
        for issuer, key_set in self._key_sets().items():
            fetched_at = getattr(key_set, "fetched_at", None)
            if fetched_at is not None:
                family.add_metric([issuer], now - fetched_at)
        yield family


class Metrics:
    def __init__(self, key_sets: Callable[[], dict[str, object]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = Gauge("mcp_gateway_build_info", "Gateway build information", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self.requests = Counter(
            "mcp_gateway_requests_total",
            "Proxied MCP requests by route, JSON-RPC method class and HTTP status",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "mcp_gateway_request_duration_seconds",
            "Time to answer a proxied request (to the end of the response, streams included)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "mcp_gateway_upstream_duration_seconds",
            "Time until the upstream's response headers arrived",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("mcp_gateway_in_flight_requests", "Proxied requests in progress", ["route"], registry=r)
        self.open_streams = Gauge("mcp_gateway_open_streams", "Open SSE streams relayed", ["route"], registry=r)
        self.grants = Counter(
            "mcp_gateway_token_grants_total",
            "Token endpoint outcomes (reason is a bounded code)",
            ["result", "reason"],
            registry=r,
        )
        self.jwks_fetches = Counter(
            "mcp_gateway_jwks_fetches_total", "IdP JWKS fetches by issuer and result", ["issuer", "result"], registry=r
        )
        self.policy_decisions = Counter(
            "mcp_gateway_policy_decisions_total",
            "Runtime policy decisions by route, kind and decision",
            ["route", "kind", "decision"],
            registry=r,
        )
        self.reloads = Counter("mcp_gateway_config_reloads_total", "Config reloads by result", ["result"], registry=r)
        self.audit_dropped = Gauge(
            "mcp_gateway_audit_dropped_lines", "Audit lines dropped because the sink could not keep up", registry=r
        )
        r.register(_JwksAgeCollector(key_sets))

    def render(self) -> bytes:
        return generate_latest(self.registry)
