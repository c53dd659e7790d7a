"""The shared (Redis) ID-JAG replay store: EMA §7.4.2 replay detection across gateway replicas.

What the issue promises, against a real ``redis-server`` started here on 127.0.0.1: a ``jti``
redeemed at one gateway process is refused by a second one sharing the store; an outage of the
store refuses grants with a retryable 503 ``temporarily_unavailable`` (fail closed), never a 500 and
never an accepted replay; ``replay_store`` is validated with its key path and its password never
shown. Waiting is bounded polling against a deadline, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config import ConfigError, describe, parse_config
from gateway.devidp import DevIdentityProvider
from gateway.oauth.replay import (
    MAX_RETENTION_SECONDS,
    REDIS_KEY_PREFIX,
    MemoryReplayStore,
    RedisReplayStore,
    ReplayStoreUnavailable,
    open_replay_store,
)
from tests.support.harness import CLIENT_ID, CLIENT_SECRET, JWT_BEARER
from tests.support.loopback import free_port
from tests.support.redis_server import RedisServer, running_redis

REPO = Path(__file__).resolve().parent.parent
REDIS_PASSWORD = "redis-test-password-7c1d94e2"
# Replicas sit behind one public origin: the same issuer, so the same ID-JAG is valid at each.
PUBLIC_URL = "https://mcp.example.com"
RESOURCE = PUBLIC_URL + "/json/mcp"
START_SECONDS = 15.0
STOP_SECONDS = 10.0
POLL_SECONDS = 0.05


async def eventually(check: Any, what: str, within: float = 5.0) -> None:
    """Poll the async predicate ``check`` until true, or fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {within}s")
        await asyncio.sleep(POLL_SECONDS)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One password-protected Redis shared by the tests that do not stop it."""
    with running_redis(tmp_path_factory.mktemp("redis"), password=REDIS_PASSWORD) as server:
        yield server


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    """A client to look at what the store wrote, independent of the store's own connections."""
    client = redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=2, socket_connect_timeout=2)
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisReplayStore]:
    """A store with a prefix of its own, so tests sharing the server cannot see each other's keys."""
    replay = RedisReplayStore.from_url(redis_server.url, prefix=f"test:{uuid.uuid4().hex}:")
    yield replay
    await replay.close()


# -- (a) the store on its own -------------------------------------------------------------------


async def test_first_use_is_accepted_and_the_second_refused(store: RedisReplayStore) -> None:
    expires_at = time.time() + 60
    assert await store.first_use("https://idp.example\x00jti-1", expires_at) is True
    assert await store.first_use("https://idp.example\x00jti-1", expires_at) is False


async def test_different_keys_are_independent(store: RedisReplayStore) -> None:
    expires_at = time.time() + 60
    assert await store.first_use("https://idp.example\x00jti-a", expires_at) is True
    assert await store.first_use("https://idp.example\x00jti-b", expires_at) is True
    assert await store.first_use("https://other.example\x00jti-a", expires_at) is True


async def test_two_clients_share_one_record(redis_server: RedisServer) -> None:
    """Two stores with their own connection pools stand in for two replicas."""
    prefix = f"test:{uuid.uuid4().hex}:"
    first = RedisReplayStore.from_url(redis_server.url, prefix=prefix)
    second = RedisReplayStore.from_url(redis_server.url, prefix=prefix)
    try:
        assert await first.first_use("iss\x00shared", time.time() + 60) is True
        assert await second.first_use("iss\x00shared", time.time() + 60) is False
    finally:
        await first.close()
        await second.close()


async def test_racing_replicas_have_exactly_one_winner(redis_server: RedisServer) -> None:
    """SET NX is atomic: concurrent redemptions of one jti cannot both succeed."""
    prefix = f"test:{uuid.uuid4().hex}:"
    stores = [RedisReplayStore.from_url(redis_server.url, prefix=prefix) for _ in range(2)]
    try:
        expires_at = time.time() + 60
        results = await asyncio.gather(*(s.first_use("iss\x00raced", expires_at) for s in stores for _ in range(10)))
        assert results.count(True) == 1
    finally:
        for replay in stores:
            await replay.close()


async def test_redis_key_is_a_hash_under_the_prefix(
    redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    """Bounded key length and no issuer or user-chosen jti text in Redis."""
    replay = open_replay_store(redis_server.url)
    jti = f"user-chosen-jti-{uuid.uuid4().hex}"
    try:
        assert await replay.first_use(f"https://idp.example\x00{jti}", time.time() + 60)
    finally:
        await replay.close()
    name = REDIS_KEY_PREFIX + hashlib.sha256(f"https://idp.example\x00{jti}".encode()).hexdigest()
    assert await redis_client.exists(name) == 1
    assert not [key async for key in redis_client.scan_iter(match=f"*{jti}*")]
    await redis_client.delete(name)


async def test_ttl_follows_the_expiry(store: RedisReplayStore, redis_client: redis.asyncio.Redis) -> None:
    assert await store.first_use("iss\x00ttl", time.time() + 120)
    ttl_ms = await redis_client.pttl(store.key_for("iss\x00ttl"))
    assert 110_000 < ttl_ms <= 120_000


async def test_an_expired_record_is_forgotten(store: RedisReplayStore, redis_client: redis.asyncio.Redis) -> None:
    """Once the assertion's lifetime is over it cannot be redeemed anyway, so Redis may drop the key."""
    key = "iss\x00short-lived"
    assert await store.first_use(key, time.time() + 0.3)
    assert await store.first_use(key, time.time() + 0.3) is False

    async def gone() -> bool:
        return await redis_client.exists(store.key_for(key)) == 0

    await eventually(gone, "expiry of the replay record")
    assert await store.first_use(key, time.time() + 60) is True


async def test_an_expiry_in_the_past_is_still_recorded_once(
    store: RedisReplayStore, redis_client: redis.asyncio.Redis
) -> None:
    """Redis refuses PX 0 or less; the store must not turn that into an error (or an acceptance)."""
    key = "iss\x00already-expired"
    assert await store.first_use(key, time.time() - 5) is True

    async def gone() -> bool:
        return await redis_client.exists(store.key_for(key)) == 0

    await eventually(gone, "expiry of a record whose expiry was already past")


# -- (a2) one bad entry never poisons the store, memory or Redis --------------------------------------

# Expiries no validated assertion has, but a caller bug or a future code path might pass.
ABSURD_EXPIRIES: list[Any] = [math.nan, math.inf, -math.inf, 1e300, 10**400, None, True, "soon"]


@pytest.fixture(params=["memory", "redis"])
async def any_store(request: pytest.FixtureRequest) -> AsyncIterator[MemoryReplayStore | RedisReplayStore]:
    if request.param == "memory":
        yield MemoryReplayStore()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    replay = RedisReplayStore.from_url(server.url, prefix=f"test:{uuid.uuid4().hex}:")
    yield replay
    await replay.close()


async def test_a_key_that_is_not_a_string_is_never_a_first_use(
    any_store: MemoryReplayStore | RedisReplayStore,
) -> None:
    expires_at = time.time() + 60
    for bad in (5, None, b"iss\x00jti", ("iss", "jti"), 1.5):
        assert await any_store.first_use(bad, expires_at) is False  # type: ignore[arg-type]
    # Entries with the same expiry next to them still work (the memory heap once compared keys).
    assert await any_store.first_use("iss\x00after-bad-keys", expires_at) is True
    assert await any_store.first_use("iss\x00after-bad-keys", expires_at) is False


async def test_an_absurd_expiry_is_recorded_once_without_raising(
    any_store: MemoryReplayStore | RedisReplayStore,
) -> None:
    for i, expires_at in enumerate(ABSURD_EXPIRIES):
        key = f"iss\x00absurd-{i}"
        assert await any_store.first_use(key, expires_at) is True, expires_at
        assert await any_store.first_use(key, time.time() + 60) is False, expires_at
    assert await any_store.first_use("iss\x00after-absurd", time.time() + 60) is True


async def test_redis_never_keeps_a_key_longer_than_the_maximum_retention(
    store: RedisReplayStore, redis_client: redis.asyncio.Redis
) -> None:
    for i, expires_at in enumerate(ABSURD_EXPIRIES):
        key = f"iss\x00bounded-{i}"
        assert await store.first_use(key, expires_at) is True
        ttl_ms = await redis_client.pttl(store.key_for(key))
        assert MAX_RETENTION_SECONDS * 1000 - 60_000 < ttl_ms <= MAX_RETENTION_SECONDS * 1000, expires_at


async def test_memory_store_forgets_absurd_expiries_and_still_evicts_the_others() -> None:
    now = [1_000_000.0]
    replay = MemoryReplayStore(clock=lambda: now[0])
    for i, expires_at in enumerate(ABSURD_EXPIRIES):
        assert await replay.first_use(f"absurd-{i}", expires_at)
    assert await replay.first_use("short", now[0] + 10)
    # A NaN at the top of the expiry heap once stopped every later eviction.
    now[0] += 11
    assert await replay.first_use("probe", now[0] + 10)
    assert await replay.first_use("short", now[0] + 10) is True
    assert len(replay) == len(ABSURD_EXPIRIES) + 2
    now[0] += MAX_RETENTION_SECONDS
    assert await replay.first_use("probe-2", now[0] + 10)
    assert len(replay) == 1
    for i in range(len(ABSURD_EXPIRIES)):
        assert await replay.first_use(f"absurd-{i}", now[0] + 10) is True


async def test_a_redis_restart_does_not_refuse_the_next_grant(tmp_path: Path) -> None:
    """Pooled connections die with the server; the store must reconnect rather than answer 503."""
    with running_redis(tmp_path) as server:
        replay = RedisReplayStore.from_url(server.url)
        try:
            assert await replay.first_use("iss\x00before", time.time() + 60)
            server.stop()
            server.start()
            assert await replay.first_use("iss\x00after", time.time() + 60) is True
        finally:
            await replay.close()


class LosesTheFirstReply:
    """A client whose first SET reaches Redis but whose reply is lost with the connection."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self.lost = False

    async def set(self, *args: Any, **kwargs: Any) -> Any:
        result = await self._client.set(*args, **kwargs)
        if not self.lost:
            self.lost = True
            raise redis.ConnectionError("Connection closed by server.")
        return result

    async def get(self, name: str) -> Any:
        return await self._client.get(name)


async def test_a_lost_reply_is_not_mistaken_for_a_replay(redis_client: redis.asyncio.Redis) -> None:
    """The retry after a dead connection must recognise the store's own earlier write."""
    flaky = LosesTheFirstReply(redis_client)
    replay = RedisReplayStore(flaky, prefix=f"test:{uuid.uuid4().hex}:")  # type: ignore[arg-type]
    assert await replay.first_use("iss\x00lost-reply", time.time() + 60) is True
    assert flaky.lost
    assert await replay.first_use("iss\x00lost-reply", time.time() + 60) is False


async def test_unreachable_redis_fails_closed_quickly() -> None:
    replay = RedisReplayStore.from_url(f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    try:
        with pytest.raises(ReplayStoreUnavailable):
            await replay.first_use("iss\x00jti", time.time() + 60)
    finally:
        await replay.close()
    assert time.monotonic() - started < 2.5


async def test_silent_redis_fails_closed_within_the_timeout() -> None:
    """A Redis that accepts connections but never answers (overloaded, half-open) must not hang grants."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    replay = RedisReplayStore.from_url(f"redis://127.0.0.1:{port}/0", timeout=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(ReplayStoreUnavailable):
            await replay.first_use("iss\x00jti", time.time() + 60)
        assert time.monotonic() - started < 2.0
    finally:
        await replay.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_wrong_password_fails_closed(redis_server: RedisServer) -> None:
    replay = RedisReplayStore.from_url(f"redis://:not-the-password@127.0.0.1:{redis_server.port}/0")
    try:
        with pytest.raises(ReplayStoreUnavailable):
            await replay.first_use("iss\x00jti", time.time() + 60)
    finally:
        await replay.close()


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        (None, MemoryReplayStore),
        ("memory", MemoryReplayStore),
        ("redis://127.0.0.1:6379/0", RedisReplayStore),
        ("rediss://:pw@redis.example:6380/1", RedisReplayStore),
        ("unix:///run/redis/redis.sock", RedisReplayStore),
    ],
)
async def test_open_replay_store_picks_the_store(url: str | None, kind: type) -> None:
    replay = open_replay_store(url)
    try:
        assert isinstance(replay, kind)
    finally:
        await replay.close()


def test_open_replay_store_refuses_other_urls() -> None:
    with pytest.raises(ValueError, match="must be 'memory' or a redis"):
        open_replay_store("http://127.0.0.1:6379")


# -- (b) and (c): real gateway processes ------------------------------------------------------------


@pytest.fixture(scope="module")
def signing_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One access-token signing key for every replica, as a real deployment shares it."""
    path = tmp_path_factory.mktemp("keys") / "signing-key.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def gateway_config(
    tmp_path: Path, name: str, port: int, idp: DevIdentityProvider, replay_store: str, key: Path
) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"""\
listen: "127.0.0.1:{port}"
public_url: "{PUBLIC_URL}"
replay_store: "{replay_store}"
authorization:
  signing_key_file: {key}
  clients:
    - client_id: {CLIENT_ID}
      client_secret: "{CLIENT_SECRET}"
  identity_providers:
    - issuer: "{idp.issuer}"
routes:
  - name: json
    path: /json/mcp
    upstream: "http://127.0.0.1:9/mcp"
"""
    )
    return path


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    base: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def wait_ready(self, http: aiohttp.ClientSession) -> None:
        """Poll /readyz (asynchronously: the IdP serving its JWKS runs in this event loop)."""
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                async with http.get(self.base + "/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if self.process.poll() is not None:
                pytest.fail(f"gateway exited with status {self.process.returncode}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.base} not ready within {START_SECONDS}s:\n{self.stderr()}")
            await asyncio.sleep(POLL_SECONDS)

    async def token(self, http: aiohttp.ClientSession, assertion: str) -> tuple[int, dict[str, Any], Any]:
        form = {
            "grant_type": JWT_BEARER,
            "assertion": assertion,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        }
        async with http.post(self.base + "/oauth2/token", data=form) as response:
            return response.status, await response.json(content_type=None), response.headers

    async def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, STOP_SECONDS)


@asynccontextmanager
async def gateway_process(
    tmp_path: Path, name: str, idp: DevIdentityProvider, replay_store: str, key: Path
) -> AsyncIterator[GatewayProcess]:
    """``python -m gateway serve`` as operators run it, with REDIS_PASSWORD in its environment."""
    port = free_port()
    config = gateway_config(tmp_path, name, port, idp, replay_store, key)
    stderr_path = tmp_path / f"{name}.stderr"
    env = {**os.environ, "REDIS_PASSWORD": REDIS_PASSWORD}
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            cwd=REPO,
        )
    try:
        yield GatewayProcess(process, f"http://127.0.0.1:{port}", stderr_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_SECONDS)


def id_jag(idp: DevIdentityProvider) -> str:
    now = int(time.time())
    return idp.sign(
        {
            "iss": idp.issuer,
            "sub": "alice",
            "aud": PUBLIC_URL,
            "client_id": CLIENT_ID,
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + 300,
            "scope": "mcp",
            "resource": RESOURCE,
        }
    )


def assert_clean_exit(gateway: GatewayProcess, status: int) -> None:
    stderr = gateway.stderr()
    assert status == 0, stderr
    assert "Traceback" not in stderr
    assert REDIS_PASSWORD not in stderr


async def test_a_jti_redeemed_at_one_replica_is_refused_at_another(
    tmp_path: Path, idp: DevIdentityProvider, redis_server: RedisServer, signing_key_file: Path
) -> None:
    shared = f"redis://:${{REDIS_PASSWORD}}@127.0.0.1:{redis_server.port}/0"
    async with (
        aiohttp.ClientSession() as http,
        gateway_process(tmp_path, "replica-1", idp, shared, signing_key_file) as one,
        gateway_process(tmp_path, "replica-2", idp, shared, signing_key_file) as two,
    ):
        await asyncio.gather(one.wait_ready(http), two.wait_ready(http))

        assertion = id_jag(idp)
        status, body, _ = await one.token(http, assertion)
        assert status == 200, body
        assert body["token_type"] == "Bearer"
        status, body, _ = await two.token(http, assertion)
        assert (status, body["error"]) == (400, "invalid_grant"), body
        assert "already been used" in body["error_description"]

        fresh = id_jag(idp)
        status, body, _ = await two.token(http, fresh)
        assert status == 200, body
        status, body, _ = await one.token(http, fresh)
        assert (status, body["error"]) == (400, "invalid_grant"), body

        status_one, status_two = await asyncio.gather(one.stop(), two.stop())
    assert_clean_exit(one, status_one)
    assert_clean_exit(two, status_two)


async def test_grants_are_refused_with_503_while_redis_is_down(
    tmp_path: Path, idp: DevIdentityProvider, signing_key_file: Path
) -> None:
    """Fail closed: without its store the gateway cannot tell a replay from a first use."""
    with running_redis(tmp_path / "redis") as server:
        async with (
            aiohttp.ClientSession() as http,
            gateway_process(tmp_path, "gateway", idp, server.url, signing_key_file) as gateway,
        ):
            await gateway.wait_ready(http)
            used = id_jag(idp)
            status, body, _ = await gateway.token(http, used)
            assert status == 200, body

            server.stop()
            fresh = id_jag(idp)
            for assertion in (used, fresh):
                status, body, headers = await gateway.token(http, assertion)
                assert (status, body["error"]) == (503, "temporarily_unavailable"), body
                assert headers["Retry-After"]
                assert "access_token" not in body

            # The refusal did not consume the jti, and the gateway reconnects by itself.
            server.start()
            status, body, _ = await gateway.token(http, fresh)
            assert status == 200, body

            exit_status = await gateway.stop()
    assert_clean_exit(gateway, exit_status)
    assert "replay store unavailable" in gateway.stderr()


# -- (d) configuration ---------------------------------------------------------------------------


def config_data(**extra: Any) -> dict[str, Any]:
    return {
        "public_url": PUBLIC_URL,
        "authorization": {
            "clients": [{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}],
            "identity_providers": [{"issuer": "https://acme.okta.com"}],
        },
        "routes": [{"name": "json", "path": "/json/mcp", "upstream": "http://json-mcp:3000/mcp"}],
        **extra,
    }


def test_replay_store_defaults_to_memory() -> None:
    assert parse_config(config_data()).replay_store == "memory"


@pytest.mark.parametrize(
    "value",
    [
        "memory",
        "redis://127.0.0.1:6379/0",
        "redis://redis.internal",
        "rediss://:secret@redis.internal:6380/2",
        "redis://replay-user:secret@redis.internal:6379/",
        "unix:///run/redis/redis.sock?db=1",
    ],
)
def test_valid_replay_store(value: str) -> None:
    assert parse_config(config_data(replay_store=value)).replay_store == value


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("memcached://127.0.0.1:11211", "must be 'memory' or a redis://, rediss:// or unix:// URL"),
        ("127.0.0.1:6379", "must be 'memory' or a redis://"),
        ("Memory", "must be 'memory' or a redis://"),
        ("redis://", "must be 'memory' or a redis://"),
        ("redis://redis.internal:99999", "must be 'memory' or a redis://"),
        ("redis://redis.internal/replay", "path must be a database number such as /0"),
        ("unix://redis.sock", "must be 'memory' or a redis://"),
        ("redis://:hun#ter2@redis.internal", "percent-encode"),
        (6379, "must be a non-empty string, got int"),
    ],
)
def test_invalid_replay_store_names_the_key(value: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_data(replay_store=value), source="gw.yaml")
    assert caught.value.key == "replay_store"
    assert problem in caught.value.problem
    assert "ter2" not in str(caught.value)


def test_replay_store_password_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_PASSWORD", REDIS_PASSWORD)
    config = parse_config(config_data(replay_store="redis://:${REDIS_PASSWORD}@redis.internal:6379/0"))
    assert config.replay_store == f"redis://:{REDIS_PASSWORD}@redis.internal:6379/0"
    lines: list[str] = []
    describe(config, emit=lines.append)
    assert "replay store: redis://:***@redis.internal:6379/0" in lines
    assert REDIS_PASSWORD not in "\n".join(lines) + repr(config)


def test_check_redacts_the_redis_password(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"""\
public_url: "{PUBLIC_URL}"
replay_store: "redis://replay:${{REDIS_PASSWORD}}@redis.internal:6379/0"
authorization:
  clients:
    - client_id: {CLIENT_ID}
      client_secret: "{CLIENT_SECRET}"
  identity_providers:
    - issuer: "https://acme.okta.com"
routes:
  - name: json
    path: /json/mcp
    upstream: "http://json-mcp:3000/mcp"
"""
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "REDIS_PASSWORD": REDIS_PASSWORD},
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "replay store: redis://replay:***@redis.internal:6379/0" in result.stdout.splitlines()
    assert REDIS_PASSWORD not in result.stdout + result.stderr
