"""Planning one request body without a server: the decision engine and enforcement on their own."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.config import RouteConfig
from gateway.enforce import Plan, plan_request
from gateway.engine import DecisionEngine
from gateway.oauth.access_token import Principal
from gateway.policy import RoutePolicy
from gateway.proxy.request_body import read_rpc_body


def principal(groups: tuple[str, ...] = (), scopes: tuple[str, ...] = ("mcp",)) -> Principal:
    return Principal("alice", "agent", "https://idp.example", "https://gw.example/r", scopes, groups, 0.0, "t")


def route(policy: RoutePolicy | None = None) -> RouteConfig:
    return RouteConfig(
        "r", "/r", "http://127.0.0.1:9/mcp", "https://gw.example/r", policy=policy or RoutePolicy.unrestricted()
    )


async def plan_body(
    body: bytes,
    policy: RoutePolicy | None = None,
    *,
    groups: tuple[str, ...] = (),
    headers: Mapping[str, str] | None = None,
) -> Plan:
    return await plan_request(read_rpc_body(body), headers or {}, DecisionEngine(), principal(groups), route(policy))
