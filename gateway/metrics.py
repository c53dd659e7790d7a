"""Prometheus metrics (prometheus-client), one registry per gateway instance.

Naming follows Prometheus conventions: the ``mcp_gateway_`` prefix, base units (seconds), ``_total``
counters. Every label value comes from a bounded set: route names, quota ids and IdP issuers from the config,
JSON-RPC methods from the fixed list below (anything else is ``other``), OAuth error reasons from the
gateway's own codes. Nothing a client sends becomes a label value unchecked, so a client cannot
blow up the time-series count. docs/metrics.md lists every metric with example queries.

Series whose label values are known in advance (routes, issuers, outcomes) are created at zero
(``precreate``): ``increase(x[5m]) > 0`` cannot see a counter's first increment when the series only
appears with the value 1, so an alert on the first failure would never fire. The registry also
carries prometheus-client's standard ``process_*`` (open fds, RSS, CPU) and ``python_*`` collectors:
a proxy holding thousands of long-lived streams runs out of file descriptors or memory first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.config import GatewayConfig
from gateway.mcp_methods import METHODS
from gateway.signals.events import CUT_OFF_EVENTS, short_name

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NO_ROUTE = "none"
# JSON-RPC methods kept as label values; others are counted as "other".
KNOWN_METHODS = frozenset(METHODS) | {"notification", "response", "batch"}
# HTTP methods without a JSON-RPC body get their own classes.
HTTP_CLASSES = {"GET": "stream", "DELETE": "session_delete"}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LONG_BUCKETS = (120, 300, 600, 1800, 3600, 7200, 21600, 43200, 86400)
# Token endpoint outcomes (result = the OAuth error code of RFC 6749 §5.2 / RFC 8707, reason = the
# gateway's own code); docs/metrics.md explains each.
_INVALID_GRANT_REASONS = (
    "malformed typ algorithm issuer signature audience client_id subject tenant expired issued_at not_before "
    "lifetime jti replay cnf resource group scope revoked hosted_domain group_overage id_token_chained_route"
).split()
GRANT_OUTCOMES = (
    ("issued", "ok"),
    ("invalid_request", "invalid_request"),
    ("unsupported_grant_type", "unsupported_grant_type"),
    ("invalid_client", "client_auth_missing"),
    ("invalid_client", "client_auth_failed"),
    *(("invalid_grant", reason) for reason in _INVALID_GRANT_REASONS),
    ("invalid_scope", "scope"),
    ("invalid_target", "resource"),
    ("temporarily_unavailable", "jwks_unavailable"),
    ("temporarily_unavailable", "replay_store_unavailable"),
    ("invalid_dpop_proof", "dpop"),
    ("use_dpop_nonce", "dpop_nonce"),
)
POLICY_KINDS = ("tools", "resources", "prompts")
QUOTA_RESULTS = ("charged", "exhausted", "unavailable")
# The approval events (gateway/approvals/): asked, answered (granted, declined, cancelled), expired,
# refused (a state or answer that was not this call's), used (a granted approval let its call through).
APPROVAL_EVENTS = ("asked", "granted", "declined", "cancelled", "expired", "refused", "used")
# Per-user upstream credentials of chained ID-JAG routes (gateway/oauth/chain.py): a cache hit, a new
# exchange, or a failure at one step of the chain.
UPSTREAM_CREDENTIAL_RESULTS = (
    "cached",
    "exchanged",
    "failed_assertion",
    "failed_idp",
    "failed_metadata",
    "failed_upstream_as",
)


def upstream_buckets(timeout_seconds: float) -> tuple[float, ...]:
    """Latency buckets up to the upstream timeout, so a request that hit the timeout lands in a bucket
    of its own instead of only in +Inf with everything else slower than a minute."""
    below = tuple(b for b in (*LATENCY_BUCKETS, *_LONG_BUCKETS) if b < timeout_seconds)
    return (*below, timeout_seconds)


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


class _IdpKeysCollector(Collector):
    """Computed at scrape time from each IdP's key set: whether it holds keys (an IdP without keys
    fails its own grants with 503; readiness does not depend on it) and their age (staleness)."""

    def __init__(self, key_sets: Callable[[], dict[str, object]]) -> None:
        self._key_sets = key_sets

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "mcp_gateway_idp_keys_available",
                "1 when the IdP's signing keys have been fetched (its grants can be verified), else 0",
                labels=["issuer"],
            ),
            GaugeMetricFamily(
                "mcp_gateway_jwks_age_seconds",
                "Seconds since the IdP's signing keys were last fetched",
                labels=["issuer"],
            ),
        )

    def describe(self) -> Iterable[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        available, age = self._families()
        now = time.monotonic()
        for issuer, key_set in self._key_sets().items():
            fetched_at = getattr(key_set, "fetched_at", None)
            available.add_metric([issuer], 0 if fetched_at is None else 1)
            if fetched_at is not None:
                age.add_metric([issuer], now - fetched_at)
        yield available
        yield age


class _CallbackCollector(Collector):
    """Values the gateway keeps anyway (audit drops, pool usage), read at scrape time."""

    def __init__(
        self, audit_dropped: Callable[[], int], pools: Callable[[], dict[str, tuple[int, int | None]]]
    ) -> None:
        self._audit_dropped = audit_dropped
        self._pools = pools

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            CounterMetricFamily(
                "mcp_gateway_audit_dropped_lines", "Audit lines dropped because the sink could not keep up"
            ),
            GaugeMetricFamily(
                "mcp_gateway_upstream_pool_in_use",
                "Requests using or waiting for one of the route's upstream connections",
                labels=["route"],
            ),
            GaugeMetricFamily(
                "mcp_gateway_upstream_pool_limit",
                "Connections the route's upstream pool may open (absent until the first request)",
                labels=["route"],
            ),
        )

    def describe(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        dropped, in_use, limit = self._families()
        dropped.add_metric([], self._audit_dropped())
        for route, (using, most) in self._pools().items():
            in_use.add_metric([route], using)
            if most is not None:
                limit.add_metric([route], most)
        yield dropped
        yield in_use
        yield limit


_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


class Children(Generic[_Metric]):
    """``metric.labels(*values)``, remembered: the proxied path updates a few series per request, and a dict
    lookup costs a sixth of prometheus-client's ``labels`` (which checks and converts the values each
    time). The remembered child is the registry's own, so scrapes see the same series; label values come
    from bounded sets (see above), so this holds no more entries than the metric has series. Only for
    metrics whose series are never ``remove``d: a removed series would live on here, detached."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: _Metric) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], _Metric] = {}

    def __call__(self, *values: str) -> _Metric:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    def __init__(
        self,
        key_sets: Callable[[], dict[str, object]],
        *,
        audit_dropped: Callable[[], int] = lambda: 0,
        pools: Callable[[], dict[str, tuple[int, int | None]]] = dict,
        upstream_timeout_seconds: float = 300.0,
    ) -> None:
        """``upstream_timeout_seconds`` shapes the upstream histogram's buckets (fixed at start)."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
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
            "Time until the upstream's response headers arrived, or until the attempt failed or timed out",
            ["route"],
            buckets=upstream_buckets(upstream_timeout_seconds),
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
        self.quota_decisions = Counter(
            "mcp_gateway_quota_decisions_total",
            "Quota checks of tool calls by route, quota id and result (charged, exhausted, unavailable)",
            ["route", "quota", "result"],
            registry=r,
        )
        self.reloads = Counter("mcp_gateway_config_reloads_total", "Config reloads by result", ["result"], registry=r)
        self.condition_invalid = Gauge(
            "mcp_gateway_condition_invalid",
            "Tools or prompts whose calls are refused because the rule's condition (or the quota's cost) does "
            "not type-check against the upstream's schema",
            ["route", "rule"],
            registry=r,
        )
        self.condition_checks = Counter(
            "mcp_gateway_condition_checks_total",
            "Type-checks of a route's conditions against its upstream's tools/list, by result",
            ["route", "result"],
            registry=r,
        )
        self.tool_drift = Counter(
            "mcp_gateway_tool_drift_total",
            "Tools whose listed definition differs from the route's tool_pins, once per change, by change and action",
            ["route", "change", "action"],
            registry=r,
        )
        self.approvals = Counter(
            "mcp_gateway_approvals_total",
            "Approvals of calls a require_approval rule lets through, by route and event",
            ["route", "event"],
            registry=r,
        )
        self.signals = Counter(
            "mcp_gateway_shared_signals_total",
            "Security Event Tokens received from Shared Signals transmitters, by delivery and result",
            ["transmitter", "delivery", "result"],
            registry=r,
        )
        self.signal_cutoffs = Counter(
            "mcp_gateway_signal_cutoffs_total",
            "Subjects cut off by a Shared Signals event, by event type",
            ["event"],
            registry=r,
        )
        self.upstream_credentials = Counter(
            "mcp_gateway_upstream_credentials_total",
            "Per-user upstream tokens of routes with upstream_authorization, by route and result",
            ["route", "result"],
            registry=r,
        )
        # The series the proxied path updates on every request (the routes' series stay after a reload
        # removes the route, as in the metrics themselves).
        self.requests_of = Children(self.requests)
        self.request_duration_of = Children(self.request_duration)
        self.in_flight_of = Children(self.in_flight)
        self.policy_decisions_of = Children(self.policy_decisions)
        self.upstream_duration_of = Children(self.upstream_duration)
        self.open_streams_of = Children(self.open_streams)
        r.register(_IdpKeysCollector(key_sets))
        r.register(_CallbackCollector(audit_dropped, pools))

    def precreate(self, config: GatewayConfig) -> None:
        """Create at zero every series whose labels the config and the code already determine (at
        start and after each reload, for added routes and IdPs)."""
        for result in ("success", "failure"):
            self.reloads.labels(result)
        for result, reason in GRANT_OUTCOMES:
            self.grants.labels(result, reason)
        for transmitter in config.transmitters:
            for result in ("accepted", "refused"):
                self.signals.labels(transmitter.issuer, transmitter.delivery, result)
        if config.transmitters:
            for event in sorted(CUT_OFF_EVENTS):
                self.signal_cutoffs.labels(short_name(event))
        for idp in config.authorization.identity_providers:
            for result in ("ok", "error"):
                self.jwks_fetches.labels(idp.issuer, result)
        for route in config.routes:
            for metric in (self.request_duration, self.upstream_duration, self.in_flight, self.open_streams):
                metric.labels(route.name)
            for kind in POLICY_KINDS:
                for decision in ("allow", "deny"):
                    self.policy_decisions.labels(route.name, kind, decision)
            for quota in route.quotas:
                for result in QUOTA_RESULTS:
                    self.quota_decisions.labels(route.name, quota.id, result)
            if route.tool_pins is not None:
                for change in ("changed", "unpinned"):
                    for action in ("refused", "logged"):
                        self.tool_drift.labels(route.name, change, action)
            if any(rule.approval is not None for rule in route.policy.tools.rules or ()):
                for event in APPROVAL_EVENTS:
                    self.approvals.labels(route.name, event)
            if route.upstream_authorization is not None:
                for result in UPSTREAM_CREDENTIAL_RESULTS:
                    self.upstream_credentials.labels(route.name, result)

    def render(self) -> bytes:
        return generate_latest(self.registry)
