"""A real gateway on loopback, configured for tests, plus helpers to obtain tokens from it.

The gateway runs in the pytest event loop on a pre-bound 127.0.0.1 socket; the IdPs are real
``DevIdentityProvider`` HTTP servers minting real signed JWTs; upstreams are real MCP servers.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.app import Gateway, bind_socket, start_gateway
from gateway.config import GatewayConfig, parse_config
from gateway.devidp import DevClient, DevIdentityProvider
from gateway.oauth.keys import SigningKey
from gateway.oauth.replay import ReplayStore

CLIENT_ID = "test-agent"
CLIENT_SECRET = "test-agent-secret-0123456789"
OTHER_CLIENT_ID = "other-agent"
OTHER_CLIENT_SECRET = "other-agent-secret-0123456789"
IDP_CLIENT_ID = "test-idp-client"
IDP_CLIENT_SECRET = "test-idp-client-secret"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"

# At the IdP the client has its own id; the ID-JAG carries its id at the gateway (draft
# "Cross-Domain Client ID Handling").
IDP_CLIENTS = (DevClient(IDP_CLIENT_ID, IDP_CLIENT_SECRET, resource_client_id=CLIENT_ID),)


@dataclass
class GatewayHarness:
    gateway: Gateway
    runner: web.AppRunner
    url: str
    idp: DevIdentityProvider
    extra_idps: list[DevIdentityProvider] = field(default_factory=list)

    @property
    def config(self) -> GatewayConfig:
        return self.gateway.config

    @property
    def issuer(self) -> str:
        return self.config.authorization.issuer

    @property
    def token_endpoint(self) -> str:
        return self.url + "/oauth2/token"

    def route_url(self, name: str) -> str:
        route = self.gateway.routes.by_name(name)
        assert route is not None, name
        return self.url + route.path

    def resource(self, name: str) -> str:
        route = self.gateway.routes.by_name(name)
        assert route is not None, name
        return route.resource

    def id_jag_claims(self, route: str | None = "json", *, user: str = "alice", **overrides: Any) -> dict[str, Any]:
        """Valid ID-JAG claims for ``route``; ``overrides`` replace claims (value None removes one)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.idp.issuer,
            "sub": user,
            "aud": self.issuer,
            "client_id": CLIENT_ID,
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + 300,
            "scope": "mcp",
            "groups": {"alice": ["engineering", "support"], "bob": ["support"], "carol": ["contractors"]}[user],
        }
        if route is not None:
            claims["resource"] = self.resource(route)
        for key, value in overrides.items():
            if value is None:
                claims.pop(key, None)
            else:
                claims[key] = value
        return claims

    def id_jag(self, route: str | None = "json", **overrides: Any) -> str:
        return self.idp.sign(self.id_jag_claims(route, **overrides))

    async def token_request(
        self,
        assertion: str | None,
        *,
        client_id: str = CLIENT_ID,
        client_secret: str | None = CLIENT_SECRET,
        basic: bool = False,
        extra: dict[str, str] | None = None,
        extra_pairs: Sequence[tuple[str, str]] = (),
        grant_type: str = JWT_BEARER,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """POST a jwt-bearer grant; ``extra`` adds or replaces parameters, ``extra_pairs`` appends them
        (a parameter may repeat, as RFC 8707 ``resource`` does); ``headers`` adds request headers."""
        form: dict[str, str] = {"grant_type": grant_type}
        if assertion is not None:
            form["assertion"] = assertion
        headers = dict(headers or {})
        if basic:
            headers["Authorization"] = aiohttp.encode_basic_auth(client_id, client_secret or "")
        else:
            form["client_id"] = client_id
            if client_secret is not None:
                form["client_secret"] = client_secret
        form.update(extra or {})
        async with aiohttp.ClientSession() as http:
            data = [*form.items(), *extra_pairs]
            async with http.post(self.token_endpoint, data=data, headers=headers) as response:
                return response.status, await response.json(content_type=None), dict(response.headers)

    async def access_token(self, route: str = "json", **overrides: Any) -> str:
        status, body, _ = await self.token_request(self.id_jag(route, **overrides))
        assert status == 200, body
        return body["access_token"]


def make_config(public_url: str, idps: list[DevIdentityProvider], routes: list[dict[str, Any]], **extra: Any):
    authorization = {
        "clients": [
            {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
            {"client_id": OTHER_CLIENT_ID, "client_secret": OTHER_CLIENT_SECRET},
        ],
        "identity_providers": [{"issuer": idp.issuer} for idp in idps],
        # Tests share gateways and ask for far more tokens than one client would: the limiter runs but
        # never refuses (tests/test_token_rate_limit.py tests real limits and the defaults).
        "token_rate_limit": {"requests_per_minute": 1_000_000, "burst": 1_000_000},
        **extra.pop("authorization", {}),
    }
    return parse_config(
        {"public_url": public_url, "authorization": authorization, "routes": routes, **extra}, source="<test>"
    )


async def start_harness(
    idp: DevIdentityProvider,
    routes: list[dict[str, Any]],
    *,
    extra_idps: list[DevIdentityProvider] = (),
    jwks_min_refresh_seconds: float = 30,
    public_url: str | None = None,
    signing_key: SigningKey | None = None,
    store: ReplayStore | None = None,
    sock: socket.socket | None = None,
    **extra: Any,
) -> GatewayHarness:
    """``public_url``: the URL clients are told (as behind a TLS-terminating ingress), when it is not
    the loopback address the gateway listens on; ``signing_key`` and ``store`` (a replay store object,
    where the ``replay_store`` option is the config value) let several gateways act as replicas of one
    deployment; ``sock``: a socket bound beforehand, when the gateway's URL must be known before it
    starts."""
    sock = sock if sock is not None else bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = make_config(public_url or url, [idp, *extra_idps], routes, **extra)
    gateway = Gateway(
        config, jwks_min_refresh_seconds=jwks_min_refresh_seconds, signing_key=signing_key, replay_store=store
    )
    runner, _ = await start_gateway(gateway, sock=sock, shutdown_timeout=1.0)
    return GatewayHarness(gateway, runner, url, idp, list(extra_idps))


@asynccontextmanager
async def running_gateway(
    idp: DevIdentityProvider, routes: list[dict[str, Any]], **options: Any
) -> AsyncIterator[GatewayHarness]:
    """:func:`start_harness` for the block (``options`` as there: limits, origins, audit, extra IdPs);
    the gateway is stopped afterwards."""
    harness = await start_harness(idp, routes, **options)
    try:
        yield harness
    finally:
        await harness.runner.cleanup()
