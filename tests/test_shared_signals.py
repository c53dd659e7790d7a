"""Shared Signals receiver (OpenID SSF 1.0; CAEP, RISC; RFC 8417 SETs, RFC 8935 push, RFC 8936 poll).

A transmitter of our own (tests/support/ssf_transmitter.py) signs real SETs; real gateways receive them
(in process here for the checks of each SET, as ``serve`` processes sharing Redis for what replicas do),
in front of real MCP upstreams.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, parse_config
from gateway.devidp import DevIdentityProvider
from gateway.oauth.identity import SubjectIdentity
from gateway.signals.events import subject_keys
from gateway.signals.revocations import RETENTION_SECONDS, SubjectRevocations
from tests.support.harness import GatewayHarness, running_gateway
from tests.support.loopback import free_port
from tests.support.mcp_http import McpHttp, initialize_request, open_session, tool_call
from tests.support.redis_server import RedisServer, running_redis
from tests.support.scrape import scrape
from tests.support.serve import ServedGateway, config_document, served
from tests.support.ssf_transmitter import ACCOUNT_DISABLED, CAEP, SESSION_REVOKED, TestTransmitter
from tests.support.upstreams import RunningUpstream

PUSH_AUTHORIZATION = "Bearer ssf-push-credential-0123456789"
SIGNALS = "mcp_gateway_shared_signals_total"
CUTOFFS = "mcp_gateway_signal_cutoffs_total"


@pytest.fixture
async def transmitter() -> AsyncIterator[TestTransmitter]:
    sender = TestTransmitter()
    await sender.start()
    try:
        yield sender
    finally:
        await sender.stop()


def iss_sub(idp: DevIdentityProvider, user: str) -> dict[str, str]:
    return {"format": "iss_sub", "iss": idp.issuer, "sub": user}


def push_config(transmitter: TestTransmitter, tmp_path: Path, **options: Any) -> dict[str, Any]:
    secret = tmp_path / "ssf-push"
    secret.write_text(PUSH_AUTHORIZATION + "\n")
    entry = {"issuer": transmitter.issuer, "delivery": "push", "push_authorization_file": str(secret), **options}
    return {"transmitters": [entry]}


async def listening_stream(client: McpHttp) -> aiohttp.ClientResponse:
    """The session's GET event stream (MCP Streamable HTTP "Listening for Messages from the Server")."""
    stream = await client.http.get(client.url, headers=client.headers(Accept="text/event-stream"))
    assert (stream.status, stream.content_type) == (200, "text/event-stream"), await stream.text()
    return stream


async def call_status(client: McpHttp, request_id: int = 7) -> tuple[int, Any]:
    async with client.post(tool_call(request_id, "echo", {"text": "hi"})) as response:
        if response.status != 200:
            return response.status, await response.json()
        return 200, None


async def ended_within(stream: aiohttp.ClientResponse, seconds: float) -> None:
    """The stream ends (EOF) within ``seconds``; whatever it still carried before is read past."""
    async with asyncio.timeout(seconds):
        while await stream.content.readany():
            pass
    stream.release()


async def token_after_cutoff(gw: GatewayHarness, http: aiohttp.ClientSession, client: McpHttp) -> str:
    """A token from a new ID-JAG for alice that the resource accepts. Token times are whole seconds and
    one issued in the cut-off's own second is refused too, so for up to a second new ones still are."""
    deadline = time.monotonic() + 3
    while True:
        status, body, _ = await gw.token_request(gw.id_jag("sse", user="alice", iat=int(time.time()) + 1))
        assert status == 200, body
        probe = McpHttp(http, client.url, body["access_token"])
        async with probe.post(initialize_request()) as response:
            if response.status != 401:
                return body["access_token"]
        assert time.monotonic() < deadline, "new tokens still refused"
        await asyncio.sleep(0.05)


# -- push, in process ------------------------------------------------------------------------------


async def test_pushed_session_revoked_ends_streams_refuses_tokens_and_id_jags_of_that_user_only(
    tmp_path: Path, idp: DevIdentityProvider, upstream_sse: RunningUpstream, transmitter: TestTransmitter
) -> None:
    routes = [{"name": "sse", "path": "/sse/mcp", "upstream": upstream_sse.mcp_url}]
    audit = tmp_path / "audit.log"
    options = {"shared_signals": push_config(transmitter, tmp_path), "audit": {"sink": str(audit)}}
    async with running_gateway(idp, routes, **options) as gw, aiohttp.ClientSession() as http:
        alice = await open_session(gw, http, "sse", user="alice")
        bob = await open_session(gw, http, "sse", user="bob")
        old_id_jag = gw.id_jag("sse", user="alice")
        alice_stream, bob_stream = await listening_stream(alice), await listening_stream(bob)

        started = time.monotonic()
        token = transmitter.set_for(gw.url, SESSION_REVOKED, iss_sub(idp, "alice"))
        assert await transmitter.push(http, gw.url + "/ssf/events", token, authorization=PUSH_AUTHORIZATION) == (
            202,
            None,
        )
        await ended_within(alice_stream, 1.0)
        status, body = await call_status(alice)
        assert time.monotonic() - started < 1.0
        assert (status, body["error"]) == (401, "invalid_token")
        assert "revoked" in body["error_description"]

        # Bob's stream and calls are untouched.
        assert not bob_stream.content.at_eof()
        assert await call_status(bob) == (200, None)
        bob_stream.release()
        # An ID-JAG alice's IdP issued before the event is refused; one issued after it is redeemed.
        status, body, _ = await gw.token_request(old_id_jag)
        assert (status, body["error"]) == (400, "invalid_grant")
        assert "revoked" in body["error_description"]
        later = int(time.time()) + 1  # after the cut-off (whole seconds), within the allowed clock skew
        status, body, _ = await gw.token_request(gw.id_jag("sse", user="alice", iat=later))
        assert status == 200, body

        # Signed in again: her session from before the event is over (404: start a new one), a new one works.
        fresh = await token_after_cutoff(gw, http, alice)
        old_session = McpHttp(http, alice.url, fresh)
        old_session.session_id = alice.session_id
        status, body = await call_status(old_session)
        assert (status, body["error"]["message"]) == (404, "session not found")
        new_session = McpHttp(http, alice.url, fresh)
        await new_session.initialize()
        assert await call_status(new_session) == (200, None)

        metrics = await scrape(http, gw.url + "/metrics")
        assert metrics.value(SIGNALS, transmitter=transmitter.issuer, delivery="push", result="accepted") == 1
        assert metrics.value(CUTOFFS, event="caep/session-revoked") == 1
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    (received,) = [line for line in lines if line["event"] == "signal.received"]
    assert (received["target"], received["decision"]) == (SESSION_REVOKED, "cut_off")
    (revoked,) = [line for line in lines if line["event"] == "token.revoked"]
    assert revoked["idp"] == transmitter.issuer and "1 streams ended" in revoked["reason"]
    denied = [line for line in lines if line["event"] == "request.denied" and line.get("reason") == "signal"]
    assert denied and {line["sub"] for line in denied} == {"alice"}
    ended = [line for line in lines if line.get("reason") == "session ended by the identity provider"]
    assert [line["sub"] for line in ended] == ["alice"]


async def test_refused_sets_get_the_rfc_8935_error_and_change_nothing(
    tmp_path: Path, idp: DevIdentityProvider, upstream_sse: RunningUpstream, transmitter: TestTransmitter
) -> None:
    routes = [{"name": "sse", "path": "/sse/mcp", "upstream": upstream_sse.mcp_url}]
    async with running_gateway(idp, routes, shared_signals=push_config(transmitter, tmp_path)) as gw:
        async with aiohttp.ClientSession() as http:
            alice = await open_session(gw, http, "sse", user="alice")
            endpoint = gw.url + "/ssf/events"
            subject = iss_sub(idp, "alice")
            forger = TestTransmitter(kid=transmitter.kid)  # same kid, another key
            forger.issuer = transmitter.issuer
            replayed = transmitter.set_for(gw.url, SESSION_REVOKED, subject, events={CAEP + "unknown-event": {}})
            cases = {
                "forged": (forger.set_for(gw.url, SESSION_REVOKED, subject), "invalid_key"),
                "wrong audience": (
                    transmitter.set_for("https://elsewhere.example", SESSION_REVOKED, subject),
                    "invalid_audience",
                ),
                "wrong issuer": (
                    transmitter.set_for(gw.url, SESSION_REVOKED, subject, iss="https://idp.example"),
                    "invalid_issuer",
                ),
                "not a SET": (
                    transmitter.sign(transmitter.claims_for(gw.url, SESSION_REVOKED, subject), typ="JWT"),
                    "invalid_request",
                ),
                "no jti": (transmitter.set_for(gw.url, SESSION_REVOKED, subject, jti=None), "invalid_request"),
                "no iat": (transmitter.set_for(gw.url, SESSION_REVOKED, subject, iat=None), "invalid_request"),
                "future iat": (
                    transmitter.set_for(gw.url, SESSION_REVOKED, subject, iat=int(time.time()) + 3600),
                    "invalid_request",
                ),
                "not a JWT": ("not-a-jwt", "invalid_request"),
            }
            assert await transmitter.push(http, endpoint, replayed, authorization=PUSH_AUTHORIZATION) == (202, None)
            cases["replayed"] = (replayed, "invalid_request")
            for name, (token, err) in cases.items():
                status, body = await transmitter.push(http, endpoint, token, authorization=PUSH_AUTHORIZATION)
                assert (status, body["err"]) == (400, err), name
                assert body["description"], name
            valid = transmitter.set_for(gw.url, SESSION_REVOKED, subject)
            for authorization in (None, "Bearer wrong-credential-0123456789"):
                status, body = await transmitter.push(http, endpoint, valid, authorization=authorization)
                assert (status, body["err"]) == (400, "authentication_failed")
            async with http.post(endpoint, data=valid, headers={"Content-Type": "application/jwt"}) as response:
                assert (response.status, (await response.json())["err"]) == (400, "invalid_request")

            assert await call_status(alice) == (200, None)
            metrics = await scrape(http, gw.url + "/metrics")
            refused = metrics.value(SIGNALS, transmitter=transmitter.issuer, delivery="push", result="refused")
            # Each SET naming the configured issuer, refused before or after its signature was checked.
            assert refused == len(cases) - 2 + 2  # not the unknown issuer nor the non-JWT; the two bad credentials
            assert metrics.value(CUTOFFS, event="caep/session-revoked") == 0
            # The valid SET was never accepted: it still is, and cuts alice off.
            assert await transmitter.push(http, endpoint, valid, authorization=PUSH_AUTHORIZATION) == (202, None)
            assert (await call_status(alice))[0] == 401


async def test_a_rotated_transmitter_key_is_fetched_on_its_first_set(
    tmp_path: Path, idp: DevIdentityProvider, upstream_sse: RunningUpstream, transmitter: TestTransmitter
) -> None:
    routes = [{"name": "sse", "path": "/sse/mcp", "upstream": upstream_sse.mcp_url}]
    options = {"shared_signals": push_config(transmitter, tmp_path), "jwks_min_refresh_seconds": 0}
    async with running_gateway(idp, routes, **options) as gw, aiohttp.ClientSession() as http:
        endpoint = gw.url + "/ssf/events"
        subject = {"format": "opaque", "id": "nobody"}
        for kid in ("ssf-key-1", "ssf-key-2"):
            if kid != transmitter.kid:
                transmitter.rotate(kid)
            token = transmitter.set_for(gw.url, SESSION_REVOKED, subject)
            assert await transmitter.push(http, endpoint, token, authorization=PUSH_AUTHORIZATION) == (202, None)
        assert transmitter.jwks_fetches == 2


async def test_unknown_kids_refetch_the_transmitter_jwks_at_most_once_per_interval(
    tmp_path: Path, idp: DevIdentityProvider, upstream_sse: RunningUpstream, transmitter: TestTransmitter
) -> None:
    routes = [{"name": "sse", "path": "/sse/mcp", "upstream": upstream_sse.mcp_url}]
    async with running_gateway(idp, routes, shared_signals=push_config(transmitter, tmp_path)) as gw:
        async with aiohttp.ClientSession() as http:
            endpoint = gw.url + "/ssf/events"
            subject = {"format": "email", "email": "nobody@example.com"}
            first = transmitter.set_for(gw.url, SESSION_REVOKED, subject)
            assert await transmitter.push(http, endpoint, first, authorization=PUSH_AUTHORIZATION) == (202, None)
            assert transmitter.jwks_fetches == 1  # at start
            for i in range(5):
                forged = transmitter.sign(transmitter.claims_for(gw.url, SESSION_REVOKED, subject), kid=f"made-up-{i}")
                status, body = await transmitter.push(http, endpoint, forged, authorization=PUSH_AUTHORIZATION)
                assert (status, body["err"]) == (400, "invalid_key")
            assert transmitter.jwks_fetches == 1  # within min_refresh_seconds: one refetch at most, and it is spent


async def test_every_listed_event_and_subject_format_cuts_off_exactly_the_named_users(
    tmp_path: Path,
    idp: DevIdentityProvider,
    idp_rsa: DevIdentityProvider,
    upstream_json: RunningUpstream,
    transmitter: TestTransmitter,
) -> None:
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    options = {"shared_signals": push_config(transmitter, tmp_path), "extra_idps": [idp_rsa]}
    async with running_gateway(idp, routes, **options) as gw, aiohttp.ClientSession() as http:

        async def token(signer: DevIdentityProvider, user: str, **claims: Any) -> str:
            status, body, _ = await gw.token_request(
                signer.sign(gw.id_jag_claims(user=user, iss=signer.issuer, **claims))
            )
            assert status == 200, body
            return body["access_token"]

        async def accepted(access_token: str) -> bool:
            client = McpHttp(http, gw.route_url("json"), access_token)
            async with client.post(initialize_request()) as response:
                assert response.status in (200, 401), await response.text()
                return response.status == 200

        tokens = {
            ("es", "alice"): await token(idp, "alice"),
            ("es", "bob"): await token(idp, "bob", email="bob@example.com"),
            ("es", "carol"): await token(idp, "carol"),
            ("rsa", "alice"): await token(idp_rsa, "alice"),
            ("rsa", "bob"): await token(idp_rsa, "bob"),
            ("rsa", "carol"): await token(idp_rsa, "carol"),
        }
        risc = "https://schemas.openid.net/secevent/risc/event-type/"
        sets = [
            # An event type not acted on, about everyone: nothing happens.
            (CAEP + "device-compliance-change", {"format": "opaque", "id": "alice"}, None),
            (SESSION_REVOKED, iss_sub(idp, "alice"), None),
            (CAEP + "credential-change", {"format": "email", "email": "BOB@example.com"}, None),
            (CAEP + "token-claims-change", {"format": "complex", "user": iss_sub(idp, "carol")}, None),
            # Before SSF 1.0 the subject was the event's own "subject" member.
            (ACCOUNT_DISABLED, None, iss_sub(idp_rsa, "alice")),
            (risc + "account-purged", {"format": "opaque", "id": "bob"}, None),  # bob of every issuer
            (risc + "sessions-revoked", iss_sub(idp_rsa, "carol"), None),
        ]
        expected_cut: list[tuple[str, str]] = []
        for event, sub_id, subject in sets:
            payload = {"subject": subject} if subject is not None else {}
            token_ = transmitter.set_for(gw.url, event, sub_id, events={event: payload})
            status = await transmitter.push(http, gw.url + "/ssf/events", token_, authorization=PUSH_AUTHORIZATION)
            assert status == (202, None), event
            expected_cut += {
                SESSION_REVOKED: [("es", "alice")],
                CAEP + "credential-change": [("es", "bob")],
                CAEP + "token-claims-change": [("es", "carol")],
                ACCOUNT_DISABLED: [("rsa", "alice")],
                risc + "account-purged": [("rsa", "bob")],
                risc + "sessions-revoked": [("rsa", "carol")],
            }.get(event, [])
            still = {who for who, access_token in tokens.items() if await accepted(access_token)}
            assert still == set(tokens) - set(expected_cut), event
        metrics = await scrape(http, gw.url + "/metrics")
        for name in ("caep/session-revoked", "caep/credential-change", "caep/token-claims-change"):
            assert metrics.value(CUTOFFS, event=name) == 1, name
        for name in ("risc/account-disabled", "risc/account-purged", "risc/sessions-revoked"):
            assert metrics.value(CUTOFFS, event=name) == 1, name


# -- subjects --------------------------------------------------------------------------------------


def test_subject_formats_name_the_users_they_should_and_no_others() -> None:
    revocations = SubjectRevocations()
    alice = SubjectIdentity("https://idp.example", "t1", "alice")
    alice_elsewhere = SubjectIdentity("https://other.example", None, "alice")
    for subject in (
        {"format": "iss_sub", "iss": "https://idp.example", "sub": "alice"},
        {"format": "email", "email": "Alice@Example.com"},
        {"format": "opaque", "id": "alice"},
        {"format": "complex", "user": {"format": "iss_sub", "iss": "https://idp.example/", "sub": "alice"}},
    ):
        assert subject_keys(subject), subject
    for subject in (
        {"format": "iss_sub", "iss": "https://idp.example"},
        {"format": "phone_number", "phone_number": "+12065550100"},
        {"format": "complex", "session": {"format": "opaque", "id": "s1"}},
        "alice",
        None,
    ):
        assert subject_keys(subject) == (), subject

    (name,) = subject_keys({"format": "iss_sub", "iss": "https://idp.example", "sub": "alice"})
    assert revocations.apply(name, 1000.0) is False  # far older than the retention: nothing to refuse
    now = time.time()
    assert revocations.apply(name, now)
    assert revocations.refuses(alice, None, now - 10) and revocations.refuses(alice, None, int(now))
    assert not revocations.refuses(alice, None, now + 1)
    assert not revocations.refuses(alice_elsewhere, None, now - 10)  # another IdP's alice
    (by_email,) = subject_keys({"format": "email", "email": "Bob@Example.com"})
    assert revocations.apply(by_email, now)
    bob = SubjectIdentity("https://idp.example", None, "bob")
    assert revocations.refuses(bob, "bob@example.com", now - 10)
    assert not revocations.refuses(bob, None, now - 10)  # a token without the email claim is not named
    assert RETENTION_SECONDS > 3600 + 300


# -- configuration ---------------------------------------------------------------------------------


def base_config(shared_signals: Any, routes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "public_url": "https://mcp.example.com",
        "authorization": {
            "clients": [{"client_id": "c", "client_secret": "0123456789abcdef"}],
            "identity_providers": [{"issuer": "https://idp.example.com"}],
        },
        "routes": routes or [{"name": "r", "path": "/r/mcp", "upstream": "http://127.0.0.1:9/mcp"}],
        "shared_signals": shared_signals,
    }


def test_config_defaults_and_errors(tmp_path: Path) -> None:
    config = parse_config(base_config({"transmitters": [{"issuer": "https://idp.example.com"}]}))
    (transmitter,) = config.transmitters
    assert (transmitter.audience, transmitter.delivery, transmitter.poll_interval_seconds) == (
        "https://mcp.example.com",
        "push",
        10.0,
    )
    short = tmp_path / "short"
    short.write_text("Bearer x")
    problems = {
        "shared_signals.transmitters[0].delivery: must be one of push, poll, got 'webhook'": {"delivery": "webhook"},
        "shared_signals.transmitters[0].poll_endpoint: is required with delivery: poll": {"delivery": "poll"},
        "shared_signals.transmitters[0].poll_interval_seconds: applies only to delivery: poll": {
            "poll_interval_seconds": 5
        },
        "shared_signals.transmitters[0].push_authorization_file: cannot read": {
            "push_authorization_file": str(tmp_path / "missing")
        },
        "shared_signals.transmitters[0].push_authorization_file: must hold one line": {
            "push_authorization_file": str(short)
        },
        "shared_signals.transmitters[0].issuer: must be an https URL": {"issuer": "http://idp.example.com"},
        "shared_signals.transmitters[0].colour: unknown key": {"colour": "red"},
    }
    for expected, fields in problems.items():
        entry = {"issuer": "https://idp.example.com", **fields}
        with pytest.raises(ConfigError) as refused:
            parse_config(base_config({"transmitters": [entry]}))
        assert expected in str(refused.value), (expected, str(refused.value))
    colliding = [{"name": "s", "path": "/ssf", "upstream": "http://127.0.0.1:9/mcp"}]
    with pytest.raises(ConfigError, match=r"routes\[0\].path: collides with the Shared Signals push endpoint"):
        parse_config(base_config({"transmitters": [{"issuer": "https://idp.example.com"}]}, colliding))
    # Without a pushing transmitter the path is free, as it was before.
    assert parse_config(base_config(None, colliding)).routes[0].path == "/ssf"


# -- replicas: two serve processes sharing Redis -----------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


async def replicas(
    stack: AsyncExitStack,
    tmp_path: Path,
    idp: DevIdentityProvider,
    upstream: RunningUpstream,
    redis_server: RedisServer,
    transmitter_entry: dict[str, Any],
) -> list[ServedGateway]:
    started = []
    for name in ("a", "b"):
        document = config_document(free_port(), idp, {"sse": upstream.mcp_url}, replay_store=redis_server.url)
        document["shared_signals"] = {"transmitters": [transmitter_entry]}
        started.append(await stack.enter_async_context(served(tmp_path, idp, document, name=name)))
    return started


async def cut_off_everywhere(replicas_: list[ServedGateway], deliver: Any, event: str) -> None:
    """Alice and Bob each hold a session with a listening stream on both replicas; ``deliver()`` hands
    the transmitter's SET about alice to the gateways. Within one second alice's streams have ended and
    her next call is refused on both; bob's are untouched."""
    alice = [await r.client("sse", user="alice") for r in replicas_]
    bob = [await r.client("sse", user="bob") for r in replicas_]
    alice_streams = [await listening_stream(c) for c in alice]
    bob_streams = [await listening_stream(c) for c in bob]
    started = time.monotonic()
    await deliver()
    for stream in alice_streams:
        await ended_within(stream, 1.0 - (time.monotonic() - started))
    statuses = [await call_status(c) for c in alice]
    elapsed = time.monotonic() - started
    assert [(s, b["error"]) for s, b in statuses] == [(401, "invalid_token")] * 2
    assert elapsed < 1.0, f"{event}: took {elapsed:.3f}s"
    for client, stream in zip(bob, bob_streams, strict=True):
        assert not stream.content.at_eof()
        assert await call_status(client) == (200, None)
        stream.release()


async def test_pushed_caep_session_revoked_acts_on_both_replicas_within_a_second(
    tmp_path: Path,
    idp: DevIdentityProvider,
    upstream_sse: RunningUpstream,
    redis_server: RedisServer,
    transmitter: TestTransmitter,
) -> None:
    audience = "https://mcp.example.com"
    entry = {**push_config(transmitter, tmp_path)["transmitters"][0], "audience": audience}
    async with AsyncExitStack() as stack:
        a, b = await replicas(stack, tmp_path, idp, upstream_sse, redis_server, entry)

        async def push_to_a() -> None:
            token = transmitter.set_for(audience, SESSION_REVOKED, iss_sub(idp, "alice"))
            assert await transmitter.push(a.http, a.base + "/ssf/events", token, authorization=PUSH_AUTHORIZATION) == (
                202,
                None,
            )

        await cut_off_everywhere([a, b], push_to_a, "push")
        # Replayed to the other replica: the jti is in the shared replay store.
        assert (await a.metrics()).value(
            SIGNALS, transmitter=transmitter.issuer, delivery="push", result="accepted"
        ) == 1


async def test_polled_risc_account_disabled_acts_on_both_replicas_within_a_second(
    tmp_path: Path,
    idp: DevIdentityProvider,
    upstream_sse: RunningUpstream,
    redis_server: RedisServer,
    transmitter: TestTransmitter,
) -> None:
    audience = "https://mcp.example.com"
    credential = tmp_path / "ssf-poll"
    credential.write_text("Bearer ssf-poll-credential-0123456789")
    entry = {
        "issuer": transmitter.issuer,
        "audience": audience,
        "delivery": "poll",
        "poll_endpoint": transmitter.poll_endpoint,
        "poll_interval_seconds": 1,
        "poll_authorization_file": str(credential),
    }
    async with AsyncExitStack() as stack:
        replicas_ = await replicas(stack, tmp_path, idp, upstream_sse, redis_server, entry)
        claims = transmitter.claims_for(
            audience, ACCOUNT_DISABLED, {"format": "complex", "user": iss_sub(idp, "alice")}
        )

        async def queue() -> None:
            transmitter.queue(transmitter.sign(claims), claims["jti"])

        await cut_off_everywhere(replicas_, queue, "poll")
        await replicas_[0].eventually(lambda: _acked(transmitter), [claims["jti"]], "the SET acknowledged")
        assert set(transmitter.poll_authorizations) == {"Bearer ssf-poll-credential-0123456789"}
        assert transmitter.set_errors == {}
        # A bad SET in a poll answer is reported back with its RFC 8935 error code (RFC 8936 §2.4).
        forged = TestTransmitter(kid=transmitter.kid)
        forged.issuer = transmitter.issuer
        bad = forged.claims_for(audience, ACCOUNT_DISABLED, iss_sub(idp, "bob"))
        transmitter.queue(forged.sign(bad), bad["jti"])
        await replicas_[0].eventually(lambda: _errors(transmitter), {bad["jti"]: "invalid_key"}, "the error reported")


async def _acked(transmitter: TestTransmitter) -> list[str]:
    return transmitter.acks


async def _errors(transmitter: TestTransmitter) -> dict[str, str]:
    return {jti: error["err"] for jti, error in transmitter.set_errors.items()}


async def test_a_replica_that_lost_redis_learns_the_cut_offs_it_missed_once_redis_is_back(
    tmp_path: Path,
    idp: DevIdentityProvider,
    upstream_json: RunningUpstream,
    redis_server: RedisServer,
    transmitter: TestTransmitter,
) -> None:
    """While Redis is down a pushed SET cannot be checked for replay: 503, and the transmitter retries.
    Once Redis is back (empty: no persistence) the other replica resubscribes and rereads the set."""
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    audience = "https://mcp.example.com"
    entry = {**push_config(transmitter, tmp_path)["transmitters"][0], "audience": audience}
    options = {"shared_signals": {"transmitters": [entry]}, "replay_store": redis_server.url}
    async with (
        running_gateway(idp, routes, **options) as a,
        running_gateway(idp, routes, **options) as b,
        aiohttp.ClientSession() as http,
    ):
        alice_at_b = await b.access_token("json", user="alice")

        async def refused_at_b() -> bool:
            client = McpHttp(http, b.route_url("json"), alice_at_b)
            async with client.post(initialize_request()) as response:
                return response.status == 401

        token = transmitter.set_for(audience, SESSION_REVOKED, iss_sub(idp, "alice"))
        redis_server.stop()
        status, body = await transmitter.push(http, a.url + "/ssf/events", token, authorization=PUSH_AUTHORIZATION)
        assert (status, body["err"]) == (503, "temporarily_unavailable")
        redis_server.start()
        assert await transmitter.push(http, a.url + "/ssf/events", token, authorization=PUSH_AUTHORIZATION) == (
            202,
            None,
        )
        deadline = time.monotonic() + 10
        while not await refused_at_b():
            assert time.monotonic() < deadline, "replica b never learned the cut-off"
            await asyncio.sleep(0.05)
