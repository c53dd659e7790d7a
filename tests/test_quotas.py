"""Quota counters (in memory and in a real ``redis-server`` on 127.0.0.1) and the ``routes[].quotas`` config.

Time is moved with the ``now`` argument, never by sleeping. Timestamps are built on ``T0``, an exact
multiple of one day, so window boundaries and ``retry_after_seconds`` are known in advance.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from gateway.config import ConfigError
from gateway.oauth.identity import SubjectIdentity
from gateway.quotas import (
    KEY_GRACE_SECONDS,
    REDIS_KEY_PREFIX,
    Charge,
    MemoryQuotaStore,
    QuotaRule,
    QuotaStore,
    QuotaStoreUnavailable,
    RedisQuotaStore,
    open_quota_store,
    parse_quotas,
)
from tests.support.loopback import free_port
from tests.support.redis_server import RedisServer, running_redis

REDIS_PASSWORD = "quota-test-password-51e0c2aa"
T0 = 1_800_000_000.0 - 1_800_000_000.0 % 86400
HOUR = 3600


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


def unique_prefix() -> str:
    """Tests sharing the server must not see each other's counters."""
    return f"test:{uuid.uuid4().hex}:"


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[QuotaStore]:
    """Each store behaviour is checked on both stores."""
    if request.param == "memory":
        quota_store: QuotaStore = MemoryQuotaStore()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        quota_store = RedisQuotaStore.from_url(server.url, prefix=unique_prefix())
    yield quota_store
    await quota_store.close()


# -- counting, on both stores ---------------------------------------------------------------------


async def test_calls_are_refused_once_the_limit_is_reached(store: QuotaStore) -> None:
    now = T0 + 100.25
    for used in (1, 2, 3):
        outcome = await store.consume("alice", 1, 3, HOUR, now=now)
        assert (outcome.allowed, outcome.used, outcome.limit) == (True, used, 3)
    refused = await store.consume("alice", 1, 3, HOUR, now=now)
    assert (refused.allowed, refused.used) == (False, 3)
    # The window started at T0 and ends at T0 + 3600: 3499.75 s from now, rounded up.
    assert refused.retry_after_seconds == 3500


async def test_costs_above_one_are_counted(store: QuotaStore) -> None:
    now = T0 + 5
    assert (await store.consume("refunds", 4, 10, HOUR, now=now)).used == 4
    assert (await store.consume("refunds", 4, 10, HOUR, now=now)).used == 8
    last = await store.consume("refunds", 2, 10, HOUR, now=now)
    assert (last.allowed, last.used) == (True, 10)
    assert (await store.consume("refunds", 1, 10, HOUR, now=now)).allowed is False


async def test_a_cost_above_what_remains_is_refused_and_consumes_nothing(store: QuotaStore) -> None:
    now = T0 + 5
    assert (await store.consume("refunds", 7, 10, HOUR, now=now)).allowed
    refused = await store.consume("refunds", 4, 10, HOUR, now=now)
    assert (refused.allowed, refused.used) == (False, 7)
    fits = await store.consume("refunds", 3, 10, HOUR, now=now)
    assert (fits.allowed, fits.used) == (True, 10)


async def test_a_cost_above_the_limit_never_fits_and_consumes_nothing(store: QuotaStore) -> None:
    now = T0 + 5
    refused = await store.consume("refunds", 11, 10, HOUR, now=now)
    assert (refused.allowed, refused.used) == (False, 0)
    assert (await store.consume("refunds", 10, 10, HOUR, now=now)).allowed


async def test_decimal_costs_fill_the_limit_exactly(store: QuotaStore) -> None:
    """0.1 + 0.2 + 0.3 is 0.6000000000000001 in binary floats; it must still fit a limit of 0.6."""
    now = T0 + 5
    for cost in (0.1, 0.2, 0.3):
        assert (await store.consume("euros", cost, 0.6, HOUR, now=now)).allowed
    assert (await store.consume("euros", 0.01, 0.6, HOUR, now=now)).allowed is False


async def test_the_window_resets_at_its_aligned_boundary(store: QuotaStore) -> None:
    assert (await store.consume("alice", 2, 2, 60, now=T0 + 30)).allowed
    late = await store.consume("alice", 1, 2, 60, now=T0 + 59.5)
    assert (late.allowed, late.retry_after_seconds) == (False, 1)
    fresh = await store.consume("alice", 1, 2, 60, now=T0 + 60)
    assert (fresh.allowed, fresh.used, fresh.retry_after_seconds) == (True, 1, 60)


async def test_counters_are_independent(store: QuotaStore) -> None:
    now = T0 + 5
    assert (await store.consume("alice", 1, 1, HOUR, now=now)).allowed
    assert (await store.consume("alice", 1, 1, HOUR, now=now)).allowed is False
    assert (await store.consume("bob", 1, 1, HOUR, now=now)).allowed


async def test_a_claim_with_a_lone_surrogate_is_its_own_counter(store: QuotaStore) -> None:
    """JSON lets a ``sub`` or group hold "\\ud800", which ``str.encode()`` refuses: no crash, no shared counter."""
    now = T0 + 5
    assert (await store.consume("alice\ud800", 1, 1, HOUR, now=now)).allowed
    assert (await store.consume("alice\ud800", 1, 1, HOUR, now=now)).allowed is False
    assert (await store.consume("alice\udc00", 1, 1, HOUR, now=now)).allowed
    assert (await store.consume("alice", 1, 1, HOUR, now=now)).allowed


async def test_several_counters_are_charged_all_or_none(store: QuotaStore) -> None:
    now = T0 + 5
    charges = [Charge("per-user", 1, 5, HOUR), Charge("per-route", 1, 2, 60)]
    for _ in range(2):
        assert all(o.allowed for o in await store.consume_all(charges, now=now))
    user, route = await store.consume_all(charges, now=now)
    assert (user.allowed, user.used) == (True, 2)
    assert (route.allowed, route.used, route.retry_after_seconds) == (False, 2, 55)
    # The refused call did not charge the counter that had room.
    assert (await store.consume("per-user", 3, 5, HOUR, now=now)).used == 5


@pytest.mark.parametrize(
    ("charges", "problem"),
    [
        (lambda: [Charge("k", -1, 10, 60)], "cost must be a finite number >= 0"),
        (lambda: [Charge("k", math.nan, 10, 60)], "cost must be a finite number >= 0"),
        (lambda: [Charge("k", math.inf, 10, 60)], "cost must be a finite number >= 0"),
        (lambda: [Charge("k", True, 10, 60)], "cost must be a finite number >= 0"),
        (lambda: [Charge("k", 1, 0, 60)], "limit must be a finite number > 0"),
        (lambda: [Charge("k", 1, 10, 0)], "window must be a finite number of seconds > 0"),
        (lambda: [Charge("k", 1, 10, 60), Charge("k", 1, 10, 60)], "each counter may be charged once"),
        (lambda: [], "at least one charge"),
    ],
)
async def test_invalid_charges_are_refused_before_counting(store: QuotaStore, charges: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        await store.consume_all(charges(), now=T0)
    assert (await store.consume("k", 10, 10, 60, now=T0)).allowed


async def test_concurrent_calls_never_exceed_the_limit(store: QuotaStore) -> None:
    outcomes = await asyncio.gather(*(store.consume("burst", 1, 37, HOUR) for _ in range(80)))
    assert sum(o.allowed for o in outcomes) == 37
    assert max(o.used for o in outcomes) == 37


# -- Redis: shared, atomic, fail closed -------------------------------------------------------------


async def test_two_replicas_share_one_counter(redis_server: RedisServer) -> None:
    """Two stores with their own connection pools stand in for two gateway replicas."""
    prefix = unique_prefix()
    one = RedisQuotaStore.from_url(redis_server.url, prefix=prefix)
    two = RedisQuotaStore.from_url(redis_server.url, prefix=prefix)
    try:
        now = T0 + 5
        assert (await one.consume("alice", 2, 3, HOUR, now=now)).used == 2
        assert (await two.consume("alice", 1, 3, HOUR, now=now)).used == 3
        refused = await one.consume("alice", 1, 3, HOUR, now=now)
        assert (refused.allowed, refused.used) == (False, 3)
    finally:
        await one.close()
        await two.close()


async def test_racing_replicas_never_exceed_the_limit(
    redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    """Check and charge are one script: replicas racing for the last units cannot both get them."""
    prefix = unique_prefix()
    stores = [RedisQuotaStore.from_url(redis_server.url, prefix=prefix) for _ in range(2)]
    try:
        now = T0 + 5
        calls = [s.consume("raced", cost, 25, HOUR, now=now) for s in stores for cost in (1, 2) * 20]
        outcomes = await asyncio.gather(*calls)
        charged = sum(cost for cost, o in zip((1, 2) * 40, outcomes, strict=True) if o.allowed)
        assert charged == float(await redis_client.get(stores[0].key_for("raced", int(now // HOUR))))
        assert 24 <= charged <= 25
    finally:
        for quota_store in stores:
            await quota_store.close()


async def test_the_redis_key_hashes_the_counter_and_expires_after_its_window(
    redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    """Bounded key length, no user name in Redis, and Redis forgets a counter once its window is over."""
    quota_store = open_quota_store(redis_server.url)
    user = f"user-{uuid.uuid4().hex}"
    now = T0 + 100.25
    try:
        assert (await quota_store.consume(user, 1.5, 3, HOUR, now=now)).allowed
    finally:
        await quota_store.close()
    name = f"{REDIS_KEY_PREFIX}{hashlib.sha256(user.encode()).hexdigest()}:{int(T0 // HOUR)}"
    assert await redis_client.get(name) == b"1.5"
    ttl_ms = await redis_client.pttl(name)
    assert (HOUR - 100.25 + KEY_GRACE_SECONDS) * 1000 - 5000 < ttl_ms <= (HOUR - 100.25 + KEY_GRACE_SECONDS) * 1000
    assert not [key async for key in redis_client.scan_iter(match=f"*{user}*")]
    await redis_client.delete(name)


async def test_the_script_is_loaded_again_when_redis_forgot_it(
    redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    """EVALSHA is answered NOSCRIPT after a restart or failover; the store must send the script again."""
    quota_store = RedisQuotaStore.from_url(redis_server.url, prefix=unique_prefix())
    try:
        assert (await quota_store.consume("alice", 1, 2, HOUR, now=T0)).used == 1
        await redis_client.script_flush()
        assert (await quota_store.consume("alice", 1, 2, HOUR, now=T0)).used == 2
    finally:
        await quota_store.close()


async def test_redis_down_fails_closed_and_the_store_recovers(tmp_path: Path) -> None:
    with running_redis(tmp_path) as server:
        quota_store = RedisQuotaStore.from_url(server.url)
        try:
            assert (await quota_store.consume("alice", 1, 5, HOUR, now=T0)).allowed
            server.stop()
            for _ in range(2):
                started = time.monotonic()
                with pytest.raises(QuotaStoreUnavailable, match=r"the quota store \(Redis\) did not answer"):
                    await quota_store.consume("alice", 1, 5, HOUR, now=T0)
                assert time.monotonic() - started < 2.5
            server.start()
            assert (await quota_store.consume("alice", 1, 5, HOUR, now=T0)).allowed
        finally:
            await quota_store.close()


async def test_a_redis_restart_between_calls_is_not_an_outage(tmp_path: Path) -> None:
    """Pooled connections die with the server; the next call must reconnect rather than fail."""
    with running_redis(tmp_path) as server:
        quota_store = RedisQuotaStore.from_url(server.url)
        try:
            assert (await quota_store.consume("alice", 1, 5, HOUR, now=T0)).allowed
            server.stop()
            server.start()
            assert (await quota_store.consume("alice", 1, 5, HOUR, now=T0)).allowed
        finally:
            await quota_store.close()


async def test_unreachable_redis_fails_closed_quickly() -> None:
    quota_store = RedisQuotaStore.from_url(f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    try:
        with pytest.raises(QuotaStoreUnavailable):
            await quota_store.consume("alice", 1, 5, HOUR)
    finally:
        await quota_store.close()
    assert time.monotonic() - started < 2.5


async def test_silent_redis_fails_closed_after_two_seconds() -> None:
    """A Redis that accepts connections but never answers (overloaded, half-open) must not hang calls."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    quota_store = open_quota_store(f"redis://127.0.0.1:{port}/0")
    started = time.monotonic()
    try:
        with pytest.raises(QuotaStoreUnavailable):
            await quota_store.consume("alice", 1, 5, HOUR)
        assert 1.9 <= time.monotonic() - started < 3.0
    finally:
        await quota_store.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_wrong_password_fails_closed(redis_server: RedisServer) -> None:
    quota_store = RedisQuotaStore.from_url(f"redis://:not-the-password@127.0.0.1:{redis_server.port}/0")
    try:
        with pytest.raises(QuotaStoreUnavailable):
            await quota_store.consume("alice", 1, 5, HOUR)
    finally:
        await quota_store.close()


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        (None, MemoryQuotaStore),
        ("memory", MemoryQuotaStore),
        ("redis://127.0.0.1:6379/0", RedisQuotaStore),
        ("rediss://:pw@redis.example:6380/1", RedisQuotaStore),
        ("unix:///run/redis/redis.sock", RedisQuotaStore),
    ],
)
async def test_open_quota_store_follows_the_replay_store_setting(url: str | None, kind: type) -> None:
    quota_store = open_quota_store(url)
    try:
        assert isinstance(quota_store, kind)
    finally:
        await quota_store.close()


def test_open_quota_store_refuses_other_urls() -> None:
    with pytest.raises(ValueError, match="must be 'memory' or a redis"):
        open_quota_store("http://127.0.0.1:6379")


# -- memory: bounded ------------------------------------------------------------------------------


async def test_counters_of_ended_windows_are_evicted_from_memory() -> None:
    quota_store = MemoryQuotaStore()
    for user in ("alice", "bob", "carol"):
        await quota_store.consume(user, 1, 5, 60, now=T0 + 10)
    await quota_store.consume("dave", 1, 5, HOUR, now=T0 + 10)
    assert len(quota_store) == 4
    await quota_store.consume("alice", 1, 5, 60, now=T0 + 60)
    assert len(quota_store) == 2  # dave's hour goes on, alice starts a new minute


async def test_a_full_memory_store_refuses_new_counters_but_keeps_counting_existing_ones() -> None:
    quota_store = MemoryQuotaStore(max_counters=2)
    await quota_store.consume("alice", 1, 5, 60, now=T0)
    await quota_store.consume("bob", 1, 5, 60, now=T0)
    with pytest.raises(QuotaStoreUnavailable, match="in-memory quota store is full"):
        await quota_store.consume("carol", 1, 5, 60, now=T0)
    assert (await quota_store.consume("alice", 1, 5, 60, now=T0)).used == 2
    # A refused call creates no counter, so it is answered even when full.
    assert (await quota_store.consume("carol", 9, 5, 60, now=T0)).allowed is False
    assert len(quota_store) == 2
    assert (await quota_store.consume("carol", 1, 5, 60, now=T0 + 60)).allowed


# -- routes[].quotas ------------------------------------------------------------------------------


def config_error(key: str, problem: str) -> ConfigError:
    return ConfigError("gw.yaml", key, problem)


def quota(**fields: Any) -> dict[str, Any]:
    return {"id": "refunds-per-user", "per": "user", "tools": ["refund"], "limit": 10, "window": "1h", **fields}


def test_the_issue_example_is_read() -> None:
    (rule,) = parse_quotas([quota(cost="args.amount")], "routes[0].quotas", config_error)
    assert (rule.id, rule.per, rule.tools, rule.limit, rule.window_seconds, rule.cost_source) == (
        "refunds-per-user",
        "user",
        ("refund",),
        10,
        3600,
        "args.amount",
    )


def test_without_cost_each_call_costs_one_and_no_quotas_is_empty() -> None:
    (rule,) = parse_quotas([quota()], "routes[0].quotas", config_error)
    assert rule.cost_source is None
    assert parse_quotas(None, "routes[0].quotas", config_error) == ()
    assert parse_quotas([], "routes[0].quotas", config_error) == ()


@pytest.mark.parametrize(
    ("window", "seconds"),
    [("30s", 30), ("15m", 900), ("1h", 3600), ("1d", 86400), ("366d", 366 * 86400), (45, 45), (1, 1)],
)
def test_window_durations(window: Any, seconds: int) -> None:
    (rule,) = parse_quotas([quota(window=window)], "routes[0].quotas", config_error)
    assert rule.window_seconds == seconds


@pytest.mark.parametrize(
    ("value", "key", "problem"),
    [
        ({"id": "q"}, "routes[0].quotas", "must be a list of quotas"),
        (["q"], "routes[0].quotas[0]", "must be a mapping with id, per, tools, limit, window"),
        ([quota(), quota(id="b", limt=5)], "routes[0].quotas[1].limt", "unknown key (expected id, per, tools"),
        ([quota(id=None)], "routes[0].quotas[0].id", "is required"),
        ([quota(id="refunds per user")], "routes[0].quotas[0].id", "must be 1-64 letters, digits"),
        ([quota(id=7)], "routes[0].quotas[0].id", "must be 1-64 letters, digits"),
        ([quota(id="x" * 65)], "routes[0].quotas[0].id", "must be 1-64 letters, digits"),
        ([quota(), quota(per="route")], "routes[0].quotas[1].id", "duplicate quota id 'refunds-per-user'"),
        ([quota(per=None)], "routes[0].quotas[0].per", "is required (user, client, group, route)"),
        ([quota(per="session")], "routes[0].quotas[0].per", "must be one of user, client, group, route"),
        ([quota(per=["user"])], "routes[0].quotas[0].per", "must be one of user, client, group, route"),
        ([quota(tools=None)], "routes[0].quotas[0].tools", "must be a non-empty list of tool name globs"),
        ([quota(tools=[])], "routes[0].quotas[0].tools", "must be a non-empty list of tool name globs"),
        ([quota(tools="refund")], "routes[0].quotas[0].tools", "must be a non-empty list of tool name globs"),
        ([quota(tools=["refund", ""])], "routes[0].quotas[0].tools", "must be a non-empty list of tool name globs"),
        ([quota(limit=None)], "routes[0].quotas[0].limit", "is required (units per window)"),
        ([quota(limit=0)], "routes[0].quotas[0].limit", "must be a positive number up to 1e+15, got 0"),
        ([quota(limit=-3)], "routes[0].quotas[0].limit", "must be a positive number up to 1e+15, got -3"),
        ([quota(limit=math.nan)], "routes[0].quotas[0].limit", "must be a positive number up to"),
        ([quota(limit=math.inf)], "routes[0].quotas[0].limit", "must be a positive number up to"),
        ([quota(limit=2e15)], "routes[0].quotas[0].limit", "must be a positive number up to"),
        ([quota(limit="10")], "routes[0].quotas[0].limit", "must be a positive number, got str"),
        ([quota(limit=True)], "routes[0].quotas[0].limit", "must be a positive number, got bool"),
        ([quota(window=None)], "routes[0].quotas[0].window", "is required (a duration such as 30s"),
        ([quota(window="1w")], "routes[0].quotas[0].window", "must be a duration such as 30s, 15m, 1h or 1d"),
        ([quota(window="1h30m")], "routes[0].quotas[0].window", "must be a duration such as 30s"),
        ([quota(window="0s")], "routes[0].quotas[0].window", "must be a duration such as 30s"),
        ([quota(window="3600")], "routes[0].quotas[0].window", "must be a duration such as 30s"),
        ([quota(window=" 1h")], "routes[0].quotas[0].window", "must be a duration such as 30s"),
        ([quota(window=1.5)], "routes[0].quotas[0].window", "must be a duration such as 30s"),
        ([quota(window=True)], "routes[0].quotas[0].window", "must be a duration such as 30s"),
        ([quota(window=0)], "routes[0].quotas[0].window", "must be between 1s and 366d, got 0"),
        ([quota(window="367d")], "routes[0].quotas[0].window", "must be between 1s and 366d, got '367d'"),
        ([quota(cost="")], "routes[0].quotas[0].cost", "must be a CEL expression (a non-empty string), got str"),
        ([quota(cost=5)], "routes[0].quotas[0].cost", "must be a CEL expression (a non-empty string), got int"),
    ],
)
def test_bad_quotas_are_reported_with_their_key_path(value: Any, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_quotas(value, "routes[0].quotas", config_error)
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"gw.yaml: {key}: ")


def test_quota_tools_are_case_sensitive_globs() -> None:
    (rule,) = parse_quotas([quota(tools=["refund", "payments_*"])], "routes[0].quotas", config_error)
    assert rule.applies_to("refund")
    assert rule.applies_to("payments_create")
    assert not rule.applies_to("Refund")
    assert not rule.applies_to("refund_all")
    assert not rule.applies_to("list_payments_create")


def rule_per(per: str, quota_id: str = "q") -> QuotaRule:
    (rule,) = parse_quotas([quota(id=quota_id, per=per)], "routes[0].quotas", config_error)
    return rule


ALICE = SubjectIdentity("https://idp.example", None, "alice").key


def test_per_user_counts_the_user_across_clients_and_issuers_apart() -> None:
    rule = rule_per("user")
    keys = rule.subject_key("payments", ALICE, "agent-1", ["support"])
    assert len(keys) == 1
    assert rule.subject_key("payments", ALICE, "agent-2", ["other"]) == keys
    assert (
        rule.subject_key("payments", SubjectIdentity("https://other.example", None, "alice").key, "agent-1", []) != keys
    )
    assert rule.subject_key("billing", ALICE, "agent-1", ["support"]) != keys
    assert rule_per("user", "q2").subject_key("payments", ALICE, "agent-1", ["support"]) != keys


def test_per_client_and_per_route_count_every_user_together() -> None:
    client = rule_per("client")
    bob = SubjectIdentity("https://idp.example", None, "bob").key
    assert client.subject_key("payments", ALICE, "agent-1", []) == client.subject_key("payments", bob, "agent-1", [])
    assert client.subject_key("payments", ALICE, "agent-1", []) != client.subject_key("payments", ALICE, "agent-2", [])
    route = rule_per("route")
    assert route.subject_key("payments", ALICE, "agent-1", ["a"]) == route.subject_key("payments", bob, "x", ["b"])
    assert route.subject_key("payments", ALICE, "agent-1", []) != route.subject_key("billing", ALICE, "agent-1", [])


def test_per_group_keeps_one_counter_per_group_and_one_for_users_without_groups() -> None:
    rule = rule_per("group")
    keys = rule.subject_key("payments", ALICE, "agent-1", ["support", "finance", "support"])
    assert len(keys) == 2
    bob = SubjectIdentity("https://idp.example", None, "bob").key
    assert rule.subject_key("payments", bob, "agent-2", ["finance"]) == [k for k in keys if k.endswith("finance")]
    none = rule.subject_key("payments", ALICE, "agent-1", [])
    assert len(none) == 1
    assert none == rule.subject_key("payments", bob, "agent-2", ())
    assert none[0] not in keys
    assert none != rule.subject_key("payments", ALICE, "agent-1", [""])


async def test_a_per_group_quota_refuses_when_any_of_the_users_groups_is_spent() -> None:
    rule = rule_per("group")
    quota_store = MemoryQuotaStore()
    bob = SubjectIdentity("https://idp.example", None, "bob").key

    async def call(user: str, groups: list[str]) -> bool:
        keys = rule.subject_key("payments", user, "agent", groups)
        outcomes = await quota_store.consume_all([Charge(k, 1, rule.limit, rule.window_seconds) for k in keys], now=T0)
        return all(o.allowed for o in outcomes)

    for _ in range(10):
        assert await call(bob, ["finance"])
    assert await call(ALICE, ["support", "finance"]) is False
    assert await call(ALICE, ["support"])
