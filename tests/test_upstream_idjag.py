"""Per-user credentials at an EMA upstream by ID-JAG chaining (``routes[].upstream_authorization``).

End to end on loopback: the development IdP does the chained exchange; gateway A (the one under test)
fronts a route whose upstream is gateway B, a second instance of our own gateway acting as the
EMA-enabled resource; B forwards to the real SDK upstream with its signed identity header, so the user's
identity is visible at the end of the chain. B accepts only its own tokens, so a call that arrives at
all arrived with the per-user token A obtained for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from jose import jwt

from gateway.app import Gateway, bind_socket, start_gateway
from gateway.config import ConfigError, describe, load_config, parse_config
from gateway.devidp import DevClient, DevIdentityProvider
from gateway.oauth.access_token import Principal
from gateway.oauth.chain import ChainFailure, RetainedAssertions, UpstreamCredentials
from gateway.oauth.identity import SubjectIdentity
from tests.support.harness import CLIENT_ID, IDP_CLIENTS, GatewayHarness, start_harness
from tests.support.mcp_http import ACCEPT, McpHttp, connect, read_response, tool_call, tool_text
from tests.support.upstreams import RunningUpstream

GATEWAY_AT_IDP = "gateway-at-idp"
GATEWAY_AT_IDP_SECRET = "gateway-at-idp-secret-0123"
GATEWAY_AT_SAAS = "gateway-at-saas"
GATEWAY_AT_SAAS_SECRET = "gateway-at-saas-secret-0123"
WAIT = 10.0


@dataclass
class Chain:
    idp: DevIdentityProvider
    a: GatewayHarness
    b: GatewayHarness
    audit: Path

    def count(self, result: str) -> float:
        labels = {"route": "saas", "result": result}
        return self.a.gateway.metrics.registry.get_sample_value("mcp_gateway_upstream_credentials_total", labels) or 0


def chained_route(name: str, b: GatewayHarness, idp: DevIdentityProvider, secrets: Path, **overrides: Any) -> dict:
    (secrets / "idp").write_text(GATEWAY_AT_IDP_SECRET + "\n")
    (secrets / "saas").write_text(GATEWAY_AT_SAAS_SECRET)
    authorization = {
        "type": "id-jag",
        "idp_token_endpoint": idp.token_endpoint,
        "client_id": GATEWAY_AT_IDP,
        "client_secret_file": str(secrets / "idp"),
        "upstream_issuer": b.issuer,
        "upstream_client_id": GATEWAY_AT_SAAS,
        "upstream_client_secret_file": str(secrets / "saas"),
        **overrides,
    }
    return {
        "name": name,
        "path": f"/{name}/mcp",
        "upstream": b.route_url("saas"),
        "upstream_authorization": authorization,
    }


@pytest.fixture
async def chain(tmp_path: Path, upstream_json: RunningUpstream) -> AsyncIterator[Chain]:
    sock_a, sock_b = bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0)
    a_url, b_url = (f"http://127.0.0.1:{s.getsockname()[1]}" for s in (sock_a, sock_b))
    gateway_client = DevClient(
        GATEWAY_AT_IDP,
        GATEWAY_AT_IDP_SECRET,
        resource_client_id=GATEWAY_AT_SAAS,
        gateway_issuers=(a_url,),
        gateway_audiences=(b_url,),
    )
    idp = DevIdentityProvider(clients=(*IDP_CLIENTS, gateway_client))
    await idp.start()
    b_route = {"name": "saas", "path": "/saas/mcp", "upstream": upstream_json.mcp_url, "identity_header": {}}
    b_clients = {"clients": [{"client_id": GATEWAY_AT_SAAS, "client_secret": GATEWAY_AT_SAAS_SECRET}]}
    b = await start_harness(idp, [b_route], sock=sock_b, authorization=b_clients)
    (tmp_path / "wrong").write_text("not-the-secret-0123456789")
    routes = [
        chained_route("saas", b, idp, tmp_path),
        # The IdP's policy lets this gateway client front B only.
        chained_route("denied", b, idp, tmp_path, upstream_issuer="http://127.0.0.1:9"),
        # B does not know this secret: the chained ID-JAG is fine, its redemption is refused.
        chained_route("badsecret", b, idp, tmp_path, upstream_client_secret_file=str(tmp_path / "wrong")),
    ]
    audit = tmp_path / "audit.log"
    a = await start_harness(idp, routes, sock=sock_a, audit={"sink": str(audit)})
    try:
        yield Chain(idp, a, b, audit)
    finally:
        await a.runner.cleanup()
        await b.runner.cleanup()
        await idp.stop()


async def call(client: McpHttp, name: str = "headers_seen") -> tuple[int, dict[str, Any], str]:
    async with client.post(tool_call(7, name)) as response:
        status, request_id = response.status, response.headers["X-Request-Id"]
        body = await read_response(response, 7) if status == 200 else await response.json()
    return status, body, request_id


async def audit_lines(path: Path, request_id: str, event: str) -> list[dict[str, Any]]:
    """The audit lines of ``request_id`` once ``event`` is among them (written by a background task)."""
    deadline = time.monotonic() + WAIT
    while True:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        lines = [json.loads(line) for line in text.splitlines()]
        mine = [line for line in lines if line.get("request_id") == request_id]
        if any(line["event"] == event for line in mine):
            return mine
        assert time.monotonic() < deadline, f"no {event} for {request_id} after {WAIT}s: {text}"
        await asyncio.sleep(0.02)


async def test_the_chain_runs_end_to_end_and_the_user_arrives_at_the_upstream(
    chain: Chain, http: aiohttp.ClientSession
) -> None:
    client = await connect(chain.a, http, "saas", email="alice@example.com")
    await client.initialize()
    status, body, request_id = await call(client)
    assert status == 200, body
    seen = json.loads(tool_text(body))
    # B's signed identity header: the user A's client acted for, with A as B's client.
    claims = jwt.decode(
        seen["x-mcp-identity"],
        (await (await http.get(chain.b.url + "/oauth2/jwks")).json()),
        algorithms=["ES256"],
        audience=jwt.get_unverified_claims(seen["x-mcp-identity"])["aud"],
        issuer=chain.b.issuer,
    )
    assert claims["sub"] == SubjectIdentity(chain.idp.issuer, None, "alice").key
    assert (claims["email"], claims["client_id"]) == ("alice@example.com", GATEWAY_AT_SAAS)
    assert "authorization" not in seen  # B forwards no token either
    # Both calls of the session used one exchange: the token is cached per user, client and route.
    status, body, _ = await call(client)
    assert status == 200, body
    assert (chain.count("exchanged"), chain.count("cached")) == (1, 3)  # initialize, initialized, 2 calls
    # The first request of the session (initialize) ran the chain, audited once, without any token.
    await audit_lines(chain.audit, request_id, "request.completed")
    exchanges = [json.loads(line) for line in chain.audit.read_text().splitlines() if "upstream.credential" in line]
    assert [(e["sub"], e["target"], e["route"], e["decision"]) for e in exchanges] == [
        ("alice", chain.b.issuer, "saas", "allow")
    ]
    ttl = chain.b.config.authorization.access_token_ttl_seconds
    assert exchanges[0]["reason"] in {f"upstream token obtained, valid {s}s" for s in range(ttl - 5, ttl + 1)}
    text = chain.audit.read_text()
    assert client.token not in text and "Bearer" not in text
    # Another user gets a token of their own.
    bob = await connect(chain.a, http, "saas", user="bob")
    await bob.initialize()
    status, body, _ = await call(bob)
    assert json.loads(tool_text(body))["x-mcp-identity"] != seen["x-mcp-identity"]
    assert chain.count("exchanged") == 2


@pytest.mark.parametrize(
    ("route", "status", "message", "reason"),
    [
        ("denied", 403, "the identity provider refused (invalid_target)", "upstream_credential:idp:invalid_target"),
        (
            "badsecret",
            403,
            "the upstream's authorization server refused (invalid_client)",
            "upstream_credential:upstream_as:invalid_client",
        ),
    ],
)
async def test_a_refusal_in_the_chain_is_a_clear_json_rpc_error_and_nothing_is_forwarded(
    chain: Chain, http: aiohttp.ClientSession, route: str, status: int, message: str, reason: str
) -> None:
    client = await connect(chain.a, http, route)
    async with client.post(tool_call(1, "echo", {"text": "x"})) as response:
        assert response.status == status
        body, request_id = await response.json(), response.headers["X-Request-Id"]
    assert body == {
        "jsonrpc": "2.0",
        "id": 1,
        "error": {
            "code": -32014,
            "message": f"no credential for this user at the upstream of route '{route}': {message}",
        },
    }
    lines = await audit_lines(chain.audit, request_id, "upstream.credential_failed")
    assert [(line["event"], line["reason"]) for line in lines] == [("upstream.credential_failed", reason)]
    result = reason.split(":")[1]
    labels = {"route": route, "result": f"failed_{result}"}
    assert chain.a.gateway.metrics.registry.get_sample_value("mcp_gateway_upstream_credentials_total", labels) == 1


async def test_a_replica_that_does_not_hold_the_id_jag_asks_for_a_new_token(
    chain: Chain, http: aiohttp.ClientSession
) -> None:
    """The ID-JAG stays with the gateway process that redeemed it: another replica (same key, same config)
    accepts the access token but cannot chain, and answers 401 so the client obtains a new one."""
    sock = bind_socket("127.0.0.1", 0)
    replica = Gateway(chain.a.config, signing_key=chain.a.gateway.signing_key)
    runner, _ = await start_gateway(replica, sock=sock, shutdown_timeout=1.0)
    try:
        token = await chain.a.access_token("saas")
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/saas/mcp"
        headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
        async with http.post(url, json=tool_call(1, "echo", {"text": "x"}), headers=headers) as response:
            assert response.status == 401
            challenge = response.headers["WWW-Authenticate"]
            body = await response.json()
    finally:
        await runner.cleanup()
    assert 'error="invalid_token"' in challenge and "resource_metadata=" in challenge
    assert "obtain a new access token" in body["error_description"]


async def test_an_expired_id_jag_is_neither_kept_nor_accepted_by_the_idp(chain: Chain) -> None:
    """The retained ID-JAG goes when its access token expires; an expired one presented anyway (a clock
    that lags) is refused by the IdP, and the failure names that step."""
    route = chain.a.gateway.routes.by_name("saas")
    assert route is not None
    now = time.time()
    claims = chain.a.id_jag_claims("saas", iat=int(now) - 120, exp=int(now) - 60)
    expired = chain.idp.sign(claims)
    principal = Principal(
        subject="alice", client_id=CLIENT_ID, idp_issuer=chain.idp.issuer, audience=route.resource,
        scopes=("mcp",), groups=(), expires_at=now - 60, token_id="t1",
    )  # fmt: skip
    retained = RetainedAssertions()
    retained.keep("t1", expired, now - 60)
    with pytest.raises(ChainFailure) as held:
        await UpstreamCredentials(chain.a.gateway.idp_session, retained).token(route, principal)
    assert held.value.step == "assertion"
    lagging = RetainedAssertions(clock=lambda: now - 3600)
    lagging.keep("t1", expired, now - 60)
    with pytest.raises(ChainFailure) as refused:
        await UpstreamCredentials(chain.a.gateway.idp_session, lagging).token(route, principal)
    assert (refused.value.step, refused.value.error) == ("idp", "invalid_grant")


async def test_tokens_are_replaced_by_a_new_exchange_shortly_before_they_expire(chain: Chain) -> None:
    route = chain.a.gateway.routes.by_name("saas")
    assert route is not None
    token = await chain.a.access_token("saas")
    principal = chain.a.gateway.tokens.verify(token, route.resource)
    clock = [time.time()]
    credentials = UpstreamCredentials(chain.a.gateway.idp_session, chain.a.gateway.retained_assertions,
                                      clock=lambda: clock[0])  # fmt: skip
    first = await credentials.token(route, principal)
    assert first.fresh
    lifetime = first.expires_at - clock[0]
    clock[0] += lifetime - 31
    again = await credentials.token(route, principal)
    assert (again.fresh, again.value) == (False, first.value)
    clock[0] += 2  # now within 30 s of expiry
    renewed = await credentials.token(route, principal)
    assert renewed.fresh and renewed.value != first.value
    # Each user, client and route has its own: bob's principal never gets alice's token.
    bob = chain.a.gateway.tokens.verify(await chain.a.access_token("saas", user="bob"), route.resource)
    assert (await credentials.token(route, bob)).value not in (first.value, renewed.value)


async def exchange(chain: Chain, http: aiohttp.ClientSession, subject: str) -> tuple[int, dict[str, Any]]:
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "requested_token_type": "urn:ietf:params:oauth:token-type:id-jag",
        "subject_token": subject,
        "subject_token_type": "urn:ietf:params:oauth:token-type:id-jag",
        "audience": chain.b.issuer,
        "resource": chain.b.resource("saas"),
    }
    auth = aiohttp.encode_basic_auth(GATEWAY_AT_IDP, GATEWAY_AT_IDP_SECRET)
    async with http.post(chain.idp.token_endpoint, data=form, headers={"Authorization": auth}) as response:
        return response.status, await response.json()


async def test_the_development_idp_chains_as_the_gateways_draft_says(chain: Chain, http: aiohttp.ClientSession) -> None:
    subject_claims = chain.a.id_jag_claims("saas")
    subject = chain.idp.sign(subject_claims)
    status, body = await exchange(chain, http, subject)
    assert status == 200, body
    assert (body["issued_token_type"], body["token_type"], "refresh_token" in body) == (
        "urn:ietf:params:oauth:token-type:id-jag",
        "N_A",
        False,
    )
    chained = jwt.get_unverified_claims(body["access_token"])
    assert jwt.get_unverified_header(body["access_token"])["typ"] == "oauth-id-jag+jwt"
    assert (chained["sub"], chained["aud"], chained["client_id"]) == ("alice", chain.b.issuer, GATEWAY_AT_SAAS)
    assert chained["act"] == {"sub": GATEWAY_AT_IDP, "act": {"sub": CLIENT_ID}}
    assert chained["resource"] == chain.b.resource("saas")
    assert chained["exp"] <= subject_claims["exp"]
    # Not single use: the same subject ID-JAG may be presented again within its validity.
    assert (await exchange(chain, http, subject))[0] == 200
    # Refused: an ID-JAG issued to another party (here: the chained one, whose aud is B), one already
    # chained (act), and an expired one.
    for claims in (
        {**subject_claims, "aud": chain.b.issuer},
        {**subject_claims, "act": {"sub": "another-gateway"}},
        {**subject_claims, "iat": int(time.time()) - 120, "exp": int(time.time()) - 60},
    ):
        status, body = await exchange(chain, http, chain.idp.sign(claims))
        assert (status, body["error"]) == (400, "invalid_grant"), claims


def chained_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    (tmp_path / "idp").write_text(GATEWAY_AT_IDP_SECRET)
    (tmp_path / "saas").write_text(GATEWAY_AT_SAAS_SECRET)
    authorization = {
        "type": "id-jag",
        "idp_token_endpoint": "https://idp.example.com/oauth2/token",
        "client_id": GATEWAY_AT_IDP,
        "client_secret_file": "idp",
        "upstream_issuer": "https://auth.saas.example.com",
        "upstream_client_id": GATEWAY_AT_SAAS,
        "upstream_client_secret_file": "saas",
    }
    for key, value in overrides.items():
        if value is None:
            authorization.pop(key)
        else:
            authorization[key] = value
    return {
        "public_url": "https://mcp.example.com",
        "authorization": {
            "clients": [{"client_id": "agent", "client_secret": "agent-secret-0123456789"}],
            "identity_providers": [{"issuer": "https://idp.example.com"}],
        },
        "routes": [
            {
                "name": "saas",
                "path": "/saas/mcp",
                "upstream": "https://mcp.saas.example.com/mcp",
                "upstream_authorization": authorization,
            }
        ],
    }


def test_config_reads_the_secrets_from_files_and_check_shows_no_secret(tmp_path: Path) -> None:
    config = parse_config(chained_config(tmp_path), source="gw.yaml", base_dir=tmp_path)
    chained = config.routes[0].upstream_authorization
    assert chained is not None
    assert (chained.client_secret.value, chained.upstream_client_secret.value) == (
        GATEWAY_AT_IDP_SECRET,
        GATEWAY_AT_SAAS_SECRET,
    )
    lines: list[str] = []
    describe(config, emit=lines.append)
    text = "\n".join(lines)
    assert "upstream_authorization=id-jag(as=https://auth.saas.example.com," in text
    assert GATEWAY_AT_IDP_SECRET not in text and GATEWAY_AT_SAAS_SECRET not in text


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"type": "static"}, "upstream_authorization.type: must be one of id-jag, got 'static'"),
        ({"type": None}, "upstream_authorization.type: is required"),
        ({"idp_token_endpoint": "http://idp.example.com/token"}, "idp_token_endpoint: must be an https URL"),
        ({"upstream_issuer": "https://mcp.example.com"}, "upstream_issuer: must not be this gateway's own issuer"),
        ({"upstream_client_id": None}, "upstream_authorization.upstream_client_id: is required"),
        ({"client_secret_file": "missing"}, "client_secret_file: cannot read: No such file or directory"),
        ({"client_secret": "inline-secret-0123456789"}, "upstream_authorization.client_secret: unknown key"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(tmp_path: Path, overrides: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(chained_config(tmp_path, **overrides), source="gw.yaml", base_dir=tmp_path)
    assert str(caught.value).startswith("gw.yaml: routes[0].") and problem in str(caught.value), str(caught.value)


def test_an_empty_secret_file_is_refused(tmp_path: Path) -> None:
    data = chained_config(tmp_path)
    (tmp_path / "saas").write_text("\n")
    with pytest.raises(ConfigError, match=r"upstream_client_secret_file: is empty"):
        parse_config(data, source="gw.yaml", base_dir=tmp_path)


def test_the_config_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_CLIENT_SECRET", "example-secret-0123456789")
    example = Path(__file__).resolve().parents[1] / "config" / "upstream-idjag.yaml"
    (tmp_path / "upstream-idjag.yaml").write_text(example.read_text())
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "idp-client").write_text("idp-secret\n")
    (tmp_path / "secrets" / "saas-client").write_text("saas-secret\n")
    (route,) = load_config(tmp_path / "upstream-idjag.yaml").routes
    chained = route.upstream_authorization
    assert chained is not None
    assert (chained.upstream_issuer, chained.client_secret.value) == ("https://auth.saas.example.com", "idp-secret")


async def test_a_token_the_upstream_rejects_is_not_used_again(chain: Chain, http: aiohttp.ClientSession) -> None:
    client = await connect(chain.a, http, "saas")
    await client.initialize()
    assert (await call(client, "echo"))[0] == 200
    # B revokes the gateway's client: its live token is refused (401), and so is a new grant.
    reloaded = await chain.b.gateway.reload(
        dataclasses.replace(chain.b.config, revoked_clients=frozenset({GATEWAY_AT_SAAS}))
    )
    assert reloaded
    status, _, _ = await call(client, "echo")
    assert status == 401
    status, body, _ = await call(client, "echo")
    assert status == 403, body
    assert body["error"]["message"].endswith("the upstream's authorization server refused (invalid_grant)")
    assert chain.count("exchanged") == 1 and chain.count("failed_upstream_as") == 1
