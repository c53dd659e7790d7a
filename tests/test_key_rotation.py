"""Signing-key rotation (current + previous key): live tokens survive the switch, new tokens use the
new key, and both keys are published so other verifiers keep working."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jose import jwt

from gateway.config import GatewayConfig
from gateway.devidp import DevIdentityProvider
from gateway.metrics import Metrics
from gateway.oauth.access_token import AccessTokenService, InvalidToken
from gateway.oauth.idjag import Grant
from gateway.oauth.keys import SigningKey
from gateway.oauth.replay import MemoryReplayStore
from gateway.runtime import Runtime
from tests.support.harness import make_config, start_harness
from tests.support.upstreams import RunningUpstream

PUBLIC_URL = "https://mcp.example.com"
TTL, SKEW = 300, 60


def write_key(path: Path) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(path)


async def jwks_kids(url: str) -> set[str]:
    async with aiohttp.ClientSession() as http, http.get(url + "/oauth2/jwks") as response:
        return {key["kid"] for key in (await response.json())["keys"]}


async def ping_status(url: str, token: str) -> int:
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {token}"}
        async with http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers=headers) as response:
            return response.status


async def test_rotation_keeps_live_tokens_valid_and_publishes_both_keys(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    old_key, new_key = write_key(tmp_path / "old.pem"), write_key(tmp_path / "new.pem")
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    h = await start_harness(idp, routes, authorization={"signing_key_file": old_key})
    try:
        old_kid, new_kid = SigningKey.from_file(old_key).kid, SigningKey.from_file(new_key).kid
        live = await h.access_token("json")
        assert jwt.get_unverified_header(live)["kid"] == old_kid
        assert await jwks_kids(h.url) == {old_kid}

        rotated = make_config(
            h.url,
            [idp],
            routes,
            authorization={"signing_key_file": new_key, "previous_signing_key_files": [old_key]},
        )
        assert await h.gateway.reload(rotated)

        assert await jwks_kids(h.url) == {old_kid, new_kid}
        fresh = await h.access_token("json")
        assert jwt.get_unverified_header(fresh)["kid"] == new_kid
        # Both pass the gateway (the upstream then answers 400: no MCP session), neither is a 401.
        assert await ping_status(h.route_url("json"), live) == 400
        assert await ping_status(h.route_url("json"), fresh) == 400

        retired = make_config(h.url, [idp], routes, authorization={"signing_key_file": new_key})
        assert await h.gateway.reload(retired)
        assert await ping_status(h.route_url("json"), fresh) == 400
        # Once the old key is dropped (after its tokens' lifetime), its tokens are refused.
        assert await ping_status(h.route_url("json"), live) == 401
        assert await jwks_kids(h.url) == {new_kid}
    finally:
        await h.runner.cleanup()


# -- retirement: a key that stopped signing verifies only until its longest token has expired -------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def build_runtime(config: GatewayConfig, clock: Clock, previous: Runtime | None = None) -> Runtime:
    """What Gateway.reload builds, with a clock the test moves."""

    def no_idp_session() -> aiohttp.ClientSession:
        raise AssertionError("building a runtime must not contact an IdP")

    return Runtime.build(
        config,
        replay_store=MemoryReplayStore(),
        idp_session=no_idp_session,
        on_grant=lambda outcome: None,
        jwks_min_refresh_seconds=30,
        metrics=Metrics(lambda: {}),
        previous=previous,
        clock=clock,
    )


def rotation_config(idp: DevIdentityProvider, signing: str, *previous: str, ttl: int = TTL) -> GatewayConfig:
    routes = [{"name": "json", "path": "/json/mcp", "upstream": "http://127.0.0.1:9/mcp"}]
    authorization = {
        "signing_key_file": signing,
        "previous_signing_key_files": list(previous),
        "access_token_ttl_seconds": ttl,
        "clock_skew_seconds": SKEW,
    }
    return make_config(PUBLIC_URL, [idp], routes, authorization=authorization)


def sign_at(key: SigningKey, clock: Clock, runtime: Runtime) -> str:
    """A token signed by ``key`` at the clock's time: by another replica, or by whoever holds the key."""
    route = runtime.routes.by_name("json")
    assert route is not None
    grant = Grant("alice", "https://idp.example", "test-agent", route, ("mcp",), (), "jti")
    return AccessTokenService(key, PUBLIC_URL, TTL, clock=clock).issue(grant).access_token


def retire_times(runtime: Runtime) -> list[tuple[str, float]]:
    return [(p.key.kid, p.retire_at) for p in runtime.previous_keys]


def accepts(runtime: Runtime, token: str) -> bool:
    try:
        runtime.tokens.verify(token, PUBLIC_URL + "/json/mcp")
    except InvalidToken:
        return False
    return True


def test_key_replaced_by_reload_retires_after_ttl_and_skew(tmp_path: Path, idp: DevIdentityProvider) -> None:
    old_file, new_file = write_key(tmp_path / "old.pem"), write_key(tmp_path / "new.pem")
    old = SigningKey.from_file(old_file)
    clock = Clock(1_000_000.0)
    first = build_runtime(rotation_config(idp, old_file), clock)
    clock.now += 1000
    rotated = build_runtime(rotation_config(idp, new_file), clock, previous=first)
    assert retire_times(rotated) == [(old.kid, clock.now + TTL + SKEW)]

    clock.now += TTL + SKEW - 1
    # Signed by the old key just now (a leaked key, or a replica that never rotated): still trusted,
    # and cached; one second later neither it nor a new one is, and the key is no longer published.
    late = sign_at(old, clock, rotated)
    assert accepts(rotated, late)
    assert old.kid in {k.kid for k in rotated.tokens.trusted_keys()}
    clock.now += 1
    assert not accepts(rotated, late)
    assert not accepts(rotated, sign_at(old, clock, rotated))
    assert accepts(rotated, sign_at(rotated.signing_key, clock, rotated))
    assert [k.kid for k in rotated.tokens.trusted_keys()] == [rotated.signing_key.kid]


def test_configured_previous_key_keeps_its_retire_time_across_reloads(tmp_path: Path, idp: DevIdentityProvider) -> None:
    old_file, new_file = write_key(tmp_path / "old.pem"), write_key(tmp_path / "new.pem")
    old = SigningKey.from_file(old_file)
    clock = Clock(1_000_000.0)
    started = build_runtime(rotation_config(idp, new_file, old_file), clock)
    assert retire_times(started) == [(old.kid, clock.now + TTL + SKEW)]
    retire_at = clock.now + TTL + SKEW
    clock.now += 200
    # An unrelated reload (here a longer TTL) must not give the old key a new lease.
    reloaded = build_runtime(rotation_config(idp, new_file, old_file, ttl=600), clock, previous=started)
    assert retire_times(reloaded) == [(old.kid, retire_at)]
    clock.now = retire_at
    assert not accepts(reloaded, sign_at(old, clock, reloaded))


async def test_reload_publishes_the_replaced_key_until_it_retires(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    """The real reload path: the retire time is measured on the gateway's clock at the reload."""
    old_key, new_key = write_key(tmp_path / "old.pem"), write_key(tmp_path / "new.pem")
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    h = await start_harness(idp, routes, authorization={"signing_key_file": old_key})
    try:
        live = await h.access_token("json")
        before = time.time()
        assert await h.gateway.reload(make_config(h.url, [idp], routes, authorization={"signing_key_file": new_key}))
        after = time.time()
        (replaced,) = h.gateway.runtime.previous_keys
        auth = h.config.authorization
        window = auth.access_token_ttl_seconds + auth.clock_skew_seconds
        assert replaced.key.kid == SigningKey.from_file(old_key).kid
        assert before + window <= replaced.retire_at <= after + window
        assert await jwks_kids(h.url) == {replaced.key.kid, SigningKey.from_file(new_key).kid}
        assert await ping_status(h.route_url("json"), live) == 400
    finally:
        await h.runner.cleanup()
