"""``serve``: keep conditions type-checked, and pinned tools compared, against what the upstreams offer
now, in the background.

Each route with conditions (``when`` on tools or prompts rules, a quota ``cost``) has a watcher task that
lists its upstream's tools (and prompts) with gateway/upstream_catalog.py and checks every condition
against them (gateway/condition_health.py). It runs at start, after every config reload, and when the
upstream announces ``notifications/tools/list_changed`` or ``notifications/prompts/list_changed`` (MCP
2025-11-25 "List Changed Notification") on a stream the gateway relays; notifications are debounced,
because every connected client's stream carries its own copy.

Routes with ``tool_pins`` are watched the same way: each listing is compared with the pins
(gateway/tool_pins.py ``DriftState``), so after a start or a reload a changed tool is hidden and its
calls refused before any client lists the tools through the gateway.

Nothing waits for it: readiness and requests go on while an upstream is slow or down. An upstream that
cannot be listed is logged and retried with backoff; meanwhile its conditions keep the last result
(none before the first), and every call still evaluates them, so a missing argument or one of the wrong
type refuses the call (``condition_error``). Conditions found not to type-check refuse the calls they
would decide (``condition_invalid``) until a check passes; each is logged once when found and once
when fixed, and ``mcp_gateway_condition_invalid`` counts them per rule.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.condition_health import ConditionHealth, ConditionProblem, checks, has_conditions, needs_prompts
from gateway.config import GatewayConfig, LimitsConfig, RouteConfig
from gateway.metrics import Metrics
from gateway.proxy.forward import Upstream
from gateway.tool_pins import DriftState
from gateway.upstream_catalog import CatalogError, fetch_catalog

log = logging.getLogger(__name__)

DEBOUNCE_SECONDS = 0.5
RETRY_SECONDS = 10.0
MAX_RETRY_SECONDS = 300.0


@dataclass
class _Watch:
    route: RouteConfig
    index: int
    limits: LimitsConfig
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    gauge_labels: set[str] = field(default_factory=set)  # rule and quota ids with a gauge series


def _upstream_identity(route: RouteConfig) -> tuple[object, ...]:
    return (route.upstream, route.transport, route.upstream_headers)


def _watched(route: RouteConfig) -> bool:
    return has_conditions(route) or route.tool_pins is not None


class ConditionMonitor:
    def __init__(self, health: ConditionHealth, metrics: Metrics, drift: DriftState | None = None) -> None:
        self.health = health
        self._metrics = metrics
        self._drift = drift
        self._watches: dict[str, _Watch] = {}

    def configure(self, config: GatewayConfig, upstreams: Mapping[str, Upstream]) -> None:
        """Watch the routes of ``config`` that have conditions or pinned tools and check them all again (at
        start and after each reload; runs on the event loop, returns at once)."""
        watched = set()
        for index, route in enumerate(config.routes):
            upstream = upstreams.get(route.name)
            if not _watched(route):
                if upstream is not None:
                    upstream.on_list_changed = None
                continue
            watched.add(route.name)
            watch = self._watches.get(route.name)
            if watch is None:
                watch = self._watches[route.name] = _Watch(route, index, config.limits)
                watch.task = asyncio.get_running_loop().create_task(self._run(watch))
            elif _upstream_identity(watch.route) != _upstream_identity(route):
                self.health.drop(route.name)  # found on another server: says nothing about this one
            watch.route, watch.index, watch.limits = route, index, config.limits
            if has_conditions(route):
                for kind in ("ok", "invalid", "unreachable"):
                    self._metrics.condition_checks.labels(route.name, kind)
            if upstream is not None:
                upstream.on_list_changed = self.list_changed
            watch.wake.set()
        for name in set(self._watches) - watched:
            self._stop(self._watches.pop(name))

    def list_changed(self, route: str) -> None:
        """An upstream announced that its tools or prompts changed (called by the relay, per event)."""
        watch = self._watches.get(route)
        if watch is not None:
            watch.wake.set()

    async def close(self) -> None:
        tasks = [w.task for w in self._watches.values() if w.task is not None]
        for watch in list(self._watches.values()):
            self._stop(watch)
        self._watches.clear()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _stop(self, watch: _Watch) -> None:
        if watch.task is not None:
            watch.task.cancel()
        self.health.drop(watch.route.name)
        for label in watch.gauge_labels:
            self._metrics.condition_invalid.remove(watch.route.name, label)

    async def _run(self, watch: _Watch) -> None:
        failures = 0
        while True:
            backoff = None if failures == 0 else min(RETRY_SECONDS * 2 ** (failures - 1), MAX_RETRY_SECONDS)
            try:
                async with asyncio.timeout(backoff):
                    await watch.wake.wait()
            except TimeoutError:
                pass
            # A burst of notifications (one per relayed stream) or of reloads makes one check.
            await asyncio.sleep(DEBOUNCE_SECONDS)
            watch.wake.clear()
            try:
                checked = await self._check(watch)
            except Exception:  # a bug: logged with its traceback, and the watcher lives on
                log.exception("route %s: type-checking conditions failed", watch.route.name)
                checked = False
            failures = 0 if checked else failures + 1

    async def _check(self, watch: _Watch) -> bool:
        """One complete check of ``watch``'s route; False when its upstream could not be listed."""
        route, index = watch.route, watch.index
        conditions = has_conditions(route)
        try:
            catalog = await fetch_catalog(route, watch.limits, prompts=needs_prompts(route))
        except CatalogError as exc:
            if conditions:
                self._metrics.condition_checks.labels(route.name, "unreachable").inc()
            why = "type-check conditions" if conditions else "compare them with the pins"
            log.warning("route %s: cannot list the upstream's tools to %s: %s; retrying", route.name, why, exc)
            return False
        if route.tool_pins is not None and self._drift is not None and watch.route is route:
            # As a tools/list result through the gateway would be: drift audited and counted once per change.
            self._drift.check_list(
                route.name, route.tool_pins, route.on_tool_drift, {"tools": list(catalog.definitions)}
            )
        if not conditions:
            return True
        problems: list[ConditionProblem] = []
        for problem in checks(route, index, catalog):
            if problem is not None:
                problems.append(problem)
            await asyncio.sleep(0)  # a check compiles CEL (up to a millisecond): let requests through
        if watch.route is not route:
            return True  # reconfigured meanwhile; the wake already set checks the new config
        self._publish(watch, problems)
        return True

    def _publish(self, watch: _Watch, problems: list[ConditionProblem]) -> None:
        name = watch.route.name
        before = set(self.health.problems(name))
        self.health.set_route(name, problems)
        for problem in problems:
            if problem not in before:
                for line in problem.lines():
                    log.warning("route %s: %s; its calls are refused (condition_invalid) until fixed", name, line)
        for problem in before - set(problems):
            log.info("route %s: %s type-checks against %s again", name, problem.key, problem.target)
        counts = dict.fromkeys(_owner_ids(watch.route), 0)
        for problem in problems:
            counts[problem.owner_id] = counts.get(problem.owner_id, 0) + 1
        for label in watch.gauge_labels - set(counts):
            self._metrics.condition_invalid.remove(name, label)
        for label, count in counts.items():
            self._metrics.condition_invalid.labels(name, label).set(count)
        watch.gauge_labels = set(counts)
        self._metrics.condition_checks.labels(name, "invalid" if problems else "ok").inc()


def _owner_ids(route: RouteConfig) -> list[str]:
    ids = [
        rule.id
        for kind in ("tools", "prompts")
        for rule in route.policy.rules_for(kind).rules or ()
        if rule.when is not None
    ]
    return ids + [quota.id for quota in route.quotas if quota.cost is not None]
