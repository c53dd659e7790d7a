"""RFC 7009 revocation and RFC 7662 introspection of the gateway's own access tokens.

Both endpoints authenticate the client as the token endpoint does. A revoked token is refused at once,
even though the resource server had cached it as valid, and on another replica sharing the Redis
replay store (a real ``redis-server``); introspection answers ``active: false`` for anything the caller
may not know about, another client's token included.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.devidp import DevIdentityProvider
from gateway.oauth.keys import SigningKey
from gateway.oauth.replay import MemoryReplayStore, RedisReplayStore
from gateway.signals.events import principal_keys
from tests.support.audit import audit_events
from tests.support.harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    OTHER_CLIENT_ID,
    OTHER_CLIENT_SECRET,
    GatewayHarness,
    running_gateway,
)
from tests.support.mcp_http import ACCEPT, initialize_request, open_session
from tests.support.redis_server import RedisServer, running_redis
from tests.support.upstreams import RunningUpstream

OWN = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
OTHER = {"client_id": OTHER_CLIENT_ID, "client_secret": OTHER_CLIENT_SECRET}


async def post(http: aiohttp.ClientSession, url: str, form: Any, **options: Any) -> tuple[int, Any, dict[str, str]]:
    """POST ``form`` (a dict or a list of pairs, or None) and return the status, JSON body or None, headers."""
    async with http.post(url, data=form, **options) as response:
        text = await response.text()
        body = await response.json(content_type=None) if text else None
        return response.status, body, dict(response.headers)


async def revoke(http: aiohttp.ClientSession, gw: GatewayHarness, token: str, client: dict[str, str] = OWN) -> Any:
    return await post(http, gw.url + "/oauth2/revoke", {"token": token, **client})


async def introspect(
    http: aiohttp.ClientSession, gw: GatewayHarness, token: str, client: dict[str, str] = OWN
) -> dict[str, Any]:
    status, body, headers = await post(http, gw.url + "/oauth2/introspect", {"token": token, **client})
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    return body


async def use(http: aiohttp.ClientSession, gw: GatewayHarness, token: str) -> tuple[int, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
    async with http.post(gw.route_url("json"), json=initialize_request(), headers=headers) as response:
        return response.status, dict(response.headers)


# -- revocation --------------------------------------------------------------------------------------


async def test_a_revoked_token_is_refused_although_it_was_cached(
    gw: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    token = await gw.access_token("json")
    assert (await use(http, gw, token))[0] == 200  # validated once, so now in the validation cache
    status, body, headers = await revoke(http, gw, token)
    assert (status, body) == (200, None)
    assert headers["Cache-Control"] == "no-store"
    status, headers = await use(http, gw, token)
    assert status == 401
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert "revoked" in headers["WWW-Authenticate"]
    # Other tokens of the same user and client are unaffected: revocation is per token.
    assert (await use(http, gw, await gw.access_token("json")))[0] == 200


async def test_revoking_a_token_ends_the_streams_opened_with_it(
    gw: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    """A listening stream lives as long as the client keeps it; a revoked token must not keep it alive."""
    revoked_client = await open_session(gw, http, "sse")
    other_client = await open_session(gw, http, "sse")  # the same user, another token
    headers = {"Accept": "text/event-stream"}
    revoked_stream = await http.get(revoked_client.url, headers=revoked_client.headers(**headers))
    other_stream = await http.get(other_client.url, headers=other_client.headers(**headers))
    assert revoked_stream.status == other_stream.status == 200
    assert (await revoke(http, gw, revoked_client.token))[0] == 200
    async with asyncio.timeout(5):
        while await revoked_stream.content.readany():
            pass
    assert not other_stream.content.at_eof()
    revoked_stream.release()
    other_stream.release()


async def test_revoking_twice_or_an_unknown_token_is_answered_200(
    gw: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    """RFC 7009 §2.2: invalid tokens "do not cause an error response"."""
    token = await gw.access_token("json")
    assert (await revoke(http, gw, token))[0] == 200
    assert (await revoke(http, gw, token))[0] == 200
    for garbage in ("not-a-token", gw.id_jag("json"), token[:-4] + "AAAA"):
        assert (await revoke(http, gw, garbage))[0] == 200
    status, _, _ = await post(
        http,
        gw.url + "/oauth2/revoke",
        {"token": await gw.access_token("json"), "token_type_hint": "refresh_token", **OWN},
    )
    assert status == 200  # the hint is only a hint (§2.1)


async def test_a_client_cannot_revoke_another_clients_token(gw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    token = await gw.access_token("json")
    status, body, _ = await revoke(http, gw, token, OTHER)
    assert (status, body["error"]) == (400, "unauthorized_client"), body
    assert (await use(http, gw, token))[0] == 200


@pytest.mark.parametrize("path", ["/oauth2/revoke", "/oauth2/introspect"])
async def test_client_authentication_and_request_errors(
    gw: GatewayHarness, http: aiohttp.ClientSession, path: str
) -> None:
    url = gw.url + path
    token = await gw.access_token("json")
    status, body, headers = await post(http, url, {"token": token})
    assert (status, body["error"]) == (401, "invalid_client"), body
    assert "WWW-Authenticate" in headers
    status, body, _ = await post(
        http, url, {"token": token, "client_id": CLIENT_ID, "client_secret": "wrong-secret-0123"}
    )
    assert (status, body["error"]) == (401, "invalid_client"), body
    status, body, _ = await post(http, url, {**OWN})
    assert (status, body["error"]) == (400, "invalid_request"), body
    status, body, _ = await post(http, url, [("token", token), ("token", token), *OWN.items()])
    assert (status, body["error"]) == (400, "invalid_request"), body
    status, body, _ = await post(http, url, None, json={"token": token, **OWN})
    assert (status, body["error"]) == (400, "invalid_request"), body
    async with http.get(url) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
    # client_secret_basic works as at the token endpoint.
    basic = {"Authorization": aiohttp.encode_basic_auth(CLIENT_ID, CLIENT_SECRET)}
    status, _, _ = await post(http, url, {"token": token}, headers=basic)
    assert status == 200


# -- introspection -----------------------------------------------------------------------------------


async def test_introspection_of_an_active_token(gw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    token = await gw.access_token("eng", scope="mcp mcp:admin")
    body = await introspect(http, gw, token)
    assert body["active"] is True
    assert body["client_id"] == CLIENT_ID
    assert body["scope"] == "mcp mcp:admin"
    assert body["aud"] == gw.resource("eng")
    assert body["iss"] == gw.issuer
    assert body["token_type"] == "Bearer"
    assert body["exp"] > body["iat"]
    assert "cnf" not in body


async def test_introspection_says_inactive_for_revoked_foreign_and_invalid_tokens(
    gw: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    token = await gw.access_token("json")
    # RFC 7662 §2.2 and §4: another client learns nothing about the token (no token scanning).
    assert await introspect(http, gw, token, OTHER) == {"active": False}
    assert (await introspect(http, gw, token))["active"] is True
    assert (await revoke(http, gw, token))[0] == 200
    assert await introspect(http, gw, token) == {"active": False}
    for garbage in ("not-a-token", gw.id_jag("json"), token[:-4] + "AAAA"):
        assert await introspect(http, gw, garbage) == {"active": False}


async def test_introspection_says_inactive_after_a_shared_signals_cut_off(
    gw: GatewayHarness, http: aiohttp.ClientSession
) -> None:
    """The token's holder is refused on every route, so the token is not active (README "Instant cut-off")."""
    subject = f"leaver-{uuid.uuid4().hex}"  # nobody else's: the cut-off must not touch other tests
    token = await gw.access_token("json", sub=subject)
    assert (await introspect(http, gw, token))["active"] is True
    assert gw.gateway.services.revocations.apply(principal_keys(gw.idp.issuer, subject, None)[0], time.time())
    assert await introspect(http, gw, token) == {"active": False}


async def test_metadata_advertises_both_endpoints(gw: GatewayHarness, http: aiohttp.ClientSession) -> None:
    async with http.get(gw.url + "/.well-known/oauth-authorization-server") as response:
        document = await response.json()
    methods = {"private_key_jwt", "client_secret_basic", "client_secret_post"}
    for name, path in (("revocation", "/oauth2/revoke"), ("introspection", "/oauth2/introspect")):
        assert document[f"{name}_endpoint"] == gw.url + path
        assert set(document[f"{name}_endpoint_auth_methods_supported"]) == methods
        assert "ES256" in document[f"{name}_endpoint_auth_signing_alg_values_supported"]


# -- replicas sharing Redis --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis-revocation")) as server:
        yield server


@pytest.fixture
async def replicas(
    idp: DevIdentityProvider, upstream_json: RunningUpstream, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[tuple[GatewayHarness, GatewayHarness]]:
    """Two gateways of one deployment: one public URL, one signing key, one Redis."""
    key = SigningKey.generate()
    prefix = f"test:{uuid.uuid4().hex}:"
    stores = [RedisReplayStore.from_url(redis_server.url, prefix=prefix) for _ in range(2)]
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    options = {"public_url": "https://mcp.example.com", "signing_key": key}
    try:
        audit = {"sink": str(tmp_path / "audit.log")}
        async with running_gateway(idp, routes, store=stores[0], audit=audit, **options) as first:
            async with running_gateway(idp, routes, store=stores[1], **options) as second:
                yield first, second
    finally:
        for store in stores:
            await store.close()


async def test_a_token_revoked_at_one_replica_is_refused_by_the_other(
    replicas: tuple[GatewayHarness, GatewayHarness], http: aiohttp.ClientSession
) -> None:
    first, second = replicas
    token = await first.access_token("json")
    assert (await use(http, second, token))[0] == 200  # the other replica accepts (and caches) it
    assert (await revoke(http, first, token))[0] == 200
    assert (await use(http, second, token))[0] == 401
    assert (await use(http, first, token))[0] == 401
    assert await introspect(http, second, token) == {"active": False}
    (line,) = await audit_events(Path(first.config.audit_sink), "token.revoked")
    assert (line["client_id"], line["sub"], line["route"], line["decision"]) == (CLIENT_ID, "alice", "json", "deny")


async def test_a_store_outage_refuses_revocations_and_keeps_known_ones(
    replicas: tuple[GatewayHarness, GatewayHarness], http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    """Revoking needs the store (503, the client must assume the token valid, RFC 7009 §2.2.1); calls go
    on through the outage, and tokens a replica already knows to be revoked stay refused there."""
    first, second = replicas
    revoked, live = await first.access_token("json"), await first.access_token("json")
    assert (await revoke(http, first, revoked))[0] == 200
    assert (await use(http, second, revoked))[0] == 401  # seen revoked by the other replica too
    redis_server.stop()
    try:
        status, body, headers = await revoke(http, first, live)
        assert (status, body["error"]) == (503, "temporarily_unavailable"), body
        assert headers["Retry-After"]
        status, body, _ = await post(http, first.url + "/oauth2/introspect", {"token": live, **OWN})
        assert (status, body["error"]) == (503, "temporarily_unavailable"), body
        assert (await use(http, first, live))[0] == 200
        assert (await use(http, first, revoked))[0] == 401
        assert (await use(http, second, revoked))[0] == 401
    finally:
        redis_server.start()
    assert (await revoke(http, first, live))[0] == 200
    assert (await use(http, second, live))[0] == 401


async def test_the_memory_store_remembers_a_revocation_until_the_token_expires() -> None:
    now = [1_000_000.0]
    store = MemoryReplayStore(clock=lambda: now[0])
    assert await store.first_use("access_token_revoked\x00jti-1", now[0] + 60)
    now[0] += 59
    assert await store.is_recorded("access_token_revoked\x00jti-1")
    assert not await store.is_recorded("access_token_revoked\x00jti-2")
    now[0] += 2
    assert not await store.is_recorded("access_token_revoked\x00jti-1")


async def test_a_token_revoked_at_one_replica_ends_its_streams_at_the_other(
    replicas: tuple[GatewayHarness, GatewayHarness], http: aiohttp.ClientSession
) -> None:
    first, second = replicas
    bus = second.gateway.revoked_tokens
    assert bus is not None
    async with asyncio.timeout(5):
        await bus.subscribed.wait()
    client = await open_session(second, http, "json")
    kept = await open_session(second, http, "json")  # the same user, another token
    stream = await http.get(client.url, headers=client.headers(Accept="text/event-stream"))
    other = await http.get(kept.url, headers=kept.headers(Accept="text/event-stream"))
    assert stream.status == other.status == 200
    assert (await revoke(http, first, client.token))[0] == 200
    async with asyncio.timeout(5):
        while await stream.content.readany():
            pass
    assert not other.content.at_eof()
    stream.release()
    other.release()
