"""Signing-key rotation (current + previous key): live tokens survive the switch, new tokens use the
new key, and both keys are published so other verifiers keep working. The three-phase rotation is
walked across two ``serve`` processes rolled one after the other, as a Deployment's pods are."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
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
from tests.support.loopback import free_port
from tests.support.mcp_http import McpHttp, read_response, tool_call, tool_text
from tests.support.serve import ServedGateway, config_document, served
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


def test_configured_previous_key_is_accepted_while_configured(tmp_path: Path, idp: DevIdentityProvider) -> None:
    """Phase 1 of a rotation lists the *next* key, which no replica signs with yet, and may last longer
    than a token lifetime (verifiers' JWKS caches): a configured key must not retire on its own."""
    old_file, new_file = write_key(tmp_path / "old.pem"), write_key(tmp_path / "new.pem")
    new = SigningKey.from_file(new_file)
    clock = Clock(1_000_000.0)
    phase1 = build_runtime(rotation_config(idp, old_file, new_file), clock)
    clock.now += 10 * (TTL + SKEW)
    assert accepts(phase1, sign_at(new, clock, phase1))
    # Phase 3 removes it from the config: from that reload on it is refused.
    dropped = build_runtime(rotation_config(idp, old_file), clock, previous=phase1)
    assert not accepts(dropped, sign_at(new, clock, dropped))


def test_replaced_key_keeps_its_retire_time_across_reloads(tmp_path: Path, idp: DevIdentityProvider) -> None:
    old_file, new_file = write_key(tmp_path / "old.pem"), write_key(tmp_path / "new.pem")
    old = SigningKey.from_file(old_file)
    clock = Clock(1_000_000.0)
    first = build_runtime(rotation_config(idp, old_file), clock)
    rotated = build_runtime(rotation_config(idp, new_file), clock, previous=first)
    retire_at = clock.now + TTL + SKEW
    clock.now += 200
    # An unrelated reload (here a longer TTL) neither forgets the old key nor gives it a new lease.
    reloaded = build_runtime(rotation_config(idp, new_file, ttl=600), clock, previous=rotated)
    assert retire_times(reloaded) == [(old.kid, retire_at)]
    assert accepts(reloaded, sign_at(old, clock, reloaded))
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


# -- the three-phase rotation across replicas, as a rolling update does it --------------------------------


class Replica:
    """One pod of a Deployment: a ``serve`` process that ``roll`` replaces by one with a new config."""

    def __init__(self, tmp_path: Path, idp: DevIdentityProvider, name: str, public_url: str, routes: dict[str, str]):
        self.tmp_path, self.idp, self.name, self.public_url, self.routes = tmp_path, idp, name, public_url, routes
        self.port = free_port()
        self.rolls = 0
        self._stack: AsyncExitStack | None = None
        self.gw: ServedGateway | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/json/mcp"

    async def roll(self, sign: str, *accept: str) -> ServedGateway:
        """Stop this replica (if running) and start it again signing with ``sign`` and also accepting
        (and publishing) ``accept``: ``authorization.previous_signing_key_files``."""
        await self.stop()
        document = config_document(self.port, self.idp, self.routes)
        document["public_url"] = self.public_url  # every replica serves the same issuer and resources
        document["authorization"]["signing_key_file"] = sign
        if accept:
            document["authorization"]["previous_signing_key_files"] = list(accept)
        self.rolls += 1
        self._stack = AsyncExitStack()
        self.gw = await self._stack.enter_async_context(
            served(self.tmp_path, self.idp, document, name=f"{self.name}-{self.rolls}")
        )
        return self.gw

    async def stop(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None


def at(replica: Replica, session: McpHttp, token: str | None = None) -> McpHttp:
    """The same MCP session (and token, unless another is given), sent to ``replica``."""
    moved = McpHttp(session.http, replica.url, token or session.token)
    moved.session_id = session.session_id
    return moved


async def echo_status(client: McpHttp, text: str) -> int:
    async with client.post(tool_call(9, "echo", {"text": text})) as response:
        if response.status == 200:
            assert tool_text(await read_response(response, 9)) == text
        return response.status


async def test_three_phase_rotation_across_two_replicas_rejects_no_token_and_loses_no_session(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    """Phase 1 publishes and accepts the new key everywhere while every pod still signs with the old
    one; phase 2 switches signing to the new key, keeping the old one accepted; phase 3 drops the old
    key. Between phases the replicas run different phases, as during a rolling update, and every
    token and session stays valid on both. Session ids are MAC-bound with a key derived from the
    signing key, so they must be verified with the accepted keys too."""
    old_key, new_key = write_key(tmp_path / "old.pem"), write_key(tmp_path / "new.pem")
    old_kid, new_kid = SigningKey.from_file(old_key).kid, SigningKey.from_file(new_key).kid
    routes = {"json": upstream_json.mcp_url}
    public_url = f"http://127.0.0.1:{free_port()}"
    a, b = Replica(tmp_path, idp, "a", public_url, routes), Replica(tmp_path, idp, "b", public_url, routes)
    try:
        async with aiohttp.ClientSession() as http:

            async def session_via(replica: Replica, kid: str) -> McpHttp:
                assert replica.gw is not None
                client = McpHttp(http, replica.url, await replica.gw.token("json"))
                assert jwt.get_unverified_header(client.token)["kid"] == kid
                await client.initialize()
                return client

            # Phase 0: both sign with the old key.
            await a.roll(old_key)
            await b.roll(old_key)
            before = await session_via(a, old_kid)
            assert await echo_status(at(b, before), "phase 0") == 200

            # Phase 1: publish and accept the new key, still signing with the old one.
            for replica in (a, b):
                await replica.roll(old_key, new_key)
                assert await jwks_kids(f"http://127.0.0.1:{replica.port}") == {old_kid, new_kid}
            during = await session_via(b, old_kid)

            # Phase 2, half rolled: A signs with the new key, B still runs phase 1.
            await a.roll(new_key, old_key)
            after = await session_via(a, new_kid)
            for replica in (a, b):
                for client in (before, during, after):
                    assert await echo_status(at(replica, client), f"phase 2 rolling, {replica.name}") == 200
            await b.roll(new_key, old_key)
            for replica in (a, b):
                for client in (before, during, after):
                    assert await echo_status(at(replica, client), f"phase 2, {replica.name}") == 200
                assert await jwks_kids(f"http://127.0.0.1:{replica.port}") == {old_kid, new_kid}

            # Phase 3 (once the old key's tokens, and the sessions that must survive, are done): drop it.
            for replica in (a, b):
                await replica.roll(new_key)
                assert await jwks_kids(f"http://127.0.0.1:{replica.port}") == {new_kid}
                assert await echo_status(at(replica, after), f"phase 3, {replica.name}") == 200
                assert await echo_status(at(replica, before), "old token") == 401
                # A session started before phase 2 ends with the old key (404: the client re-initializes).
                assert await echo_status(at(replica, before, after.token), "old session") == 404
    finally:
        await a.stop()
        await b.stop()
