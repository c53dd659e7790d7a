"""A user is issuer + (tenant) + subject, never ``sub`` alone (RFC 7519 §4.1.2; ID-JAG draft §3.1, §6.3).

Two real loopback IdPs (ES256 and RS256) both vouch for an "alice"; a multi-tenant IdP vouches for an
"alice" in two tenants. Each is a different person to the access token, to revocation and to ``check``.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from jose import jwt

from gateway.config import ConfigError, describe, parse_config
from gateway.devidp import DevIdentityProvider
from gateway.oauth.identity import SubjectIdentity
from gateway.sessions import principal_key
from tests.support.harness import GatewayHarness, make_config, running_gateway
from tests.support.mcp_http import McpHttp, tool_call

PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}


async def token(h: GatewayHarness, idp: DevIdentityProvider, **claims: Any) -> dict[str, Any]:
    status, body, _ = await h.token_request(idp.sign(h.id_jag_claims("json", iss=idp.issuer, **claims)))
    return {"status": status, **body}


async def accepted(h: GatewayHarness, access_token: str) -> bool:
    """Whether the resource server lets the token past (the upstream then answers: no session yet)."""
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {access_token}"}
        async with http.post(h.route_url("json"), json=PING, headers=headers) as response:
            return response.status != 401


@pytest.fixture
async def two_idps(idp: DevIdentityProvider, idp_rsa: DevIdentityProvider, upstream_json) -> Any:
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    async with running_gateway(idp, routes, extra_idps=[idp_rsa]) as h:
        yield h


async def test_rfc7519_s4_1_2_access_token_sub_is_unique_across_idps(
    two_idps: GatewayHarness, idp: DevIdentityProvider, idp_rsa: DevIdentityProvider
) -> None:
    first, second = await token(two_idps, idp), await token(two_idps, idp_rsa)
    claims = [jwt.get_unverified_claims(t["access_token"]) for t in (first, second)]
    assert [c["idp_sub"] for c in claims] == ["alice", "alice"]
    assert [c["idp"] for c in claims] == [idp.issuer, idp_rsa.issuer]
    assert claims[0]["sub"] != claims[1]["sub"]
    assert json.loads(claims[0]["sub"]) == [idp.issuer, None, "alice"]


async def test_draft_s6_3_revoking_a_user_of_one_idp_leaves_the_same_sub_of_another(
    two_idps: GatewayHarness, idp: DevIdentityProvider, idp_rsa: DevIdentityProvider
) -> None:
    h = two_idps
    es_alice, rs_alice = (await token(h, idp))["access_token"], (await token(h, idp_rsa))["access_token"]
    revoked = {"subjects": [{"issuer": idp_rsa.issuer, "sub": "alice"}]}
    routes = [{"name": "json", "path": "/json/mcp", "upstream": h.config.routes[0].upstream}]
    assert await h.gateway.reload(make_config(h.url, [idp, idp_rsa], routes, revoked=revoked))
    assert not await accepted(h, rs_alice)
    assert (await token(h, idp_rsa))["error"] == "invalid_grant"
    assert await accepted(h, es_alice)
    assert (await token(h, idp))["status"] == 200


async def test_draft_s6_3_tenant_is_part_of_the_user(idp: DevIdentityProvider, upstream_json) -> None:
    """A multi-tenant IdP without a configured tenant: alice of acme is not alice of globex."""
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    async with running_gateway(idp, routes) as h:
        acme, globex = (await token(h, idp, tenant="acme")), (await token(h, idp, tenant="globex"))
        subs = [jwt.get_unverified_claims(t["access_token"])["sub"] for t in (acme, globex)]
        assert json.loads(subs[0]) == [idp.issuer, "acme", "alice"] and subs[0] != subs[1]
        assert jwt.get_unverified_claims(acme["access_token"])["tenant"] == "acme"

        one_tenant = {"subjects": [{"issuer": idp.issuer, "tenant": "acme", "sub": "alice"}]}
        assert await h.gateway.reload(make_config(h.url, [idp], routes, revoked=one_tenant))
        assert not await accepted(h, acme["access_token"])
        assert await accepted(h, globex["access_token"])

        every_tenant = {"subjects": [{"issuer": idp.issuer, "sub": "alice"}]}
        assert await h.gateway.reload(make_config(h.url, [idp], routes, revoked=every_tenant))
        assert not await accepted(h, globex["access_token"])
        assert (await token(h, idp, tenant="initech"))["error"] == "invalid_grant"
        assert (await token(h, idp, tenant="initech", sub="bob"))["status"] == 200

        assert (await token(h, idp, tenant=42))["error"] == "invalid_grant"  # malformed, not a 500


def config_with(revoked: dict[str, Any], issuers: list[str]) -> dict[str, Any]:
    return {
        "public_url": "https://mcp.example.com",
        "authorization": {
            "clients": [{"client_id": "agent", "client_secret": "agent-secret-0123456789"}],
            "identity_providers": [{"issuer": issuer} for issuer in issuers],
        },
        "routes": [{"name": "r", "path": "/r/mcp", "upstream": "http://upstream:3000/mcp"}],
        "revoked": revoked,
    }


def test_draft_s6_3_bare_revoked_sub_is_refused_with_two_idps() -> None:
    data = config_with({"subjects": ["alice"]}, ["https://a.example.com", "https://b.example.com"])
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source="gw.yaml")
    assert str(caught.value).startswith("gw.yaml: revoked.subjects[0]: a bare subject is ambiguous")


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"issuer": "https://c.example.com", "sub": "alice"}, "revoked.subjects[0].issuer: 'https://c.example.com'"),
        ({"issuer": "https://a.example.com"}, "revoked.subjects[0].sub: is required"),
        ({"issuer": "https://a.example.com", "sub": "x", "tenat": "t"}, "revoked.subjects[0].tenat: unknown key"),
        (42, "revoked.subjects[0]: must be a mapping, got int"),
    ],
)
def test_revoked_subject_entries_are_validated(entry: Any, problem: str) -> None:
    data = config_with({"subjects": [entry]}, ["https://a.example.com", "https://b.example.com"])
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source="gw.yaml")
    assert str(caught.value).startswith(f"gw.yaml: {problem}")


def test_draft_s6_3_bare_revoked_sub_with_one_idp_is_named_in_check() -> None:
    config = parse_config(
        config_with(
            {"subjects": ["alice", {"issuer": "https://A.example.com", "sub": "bob"}]}, ["https://a.example.com"]
        )
    )
    assert {(s.issuer, s.subject, s.bare) for s in config.revoked_subjects} == {
        ("https://a.example.com", "alice", True),
        ("https://a.example.com", "bob", False),
    }
    lines: list[str] = []
    describe(config, emit=lines.append)
    bare = [line for line in lines if "bare" in line]
    assert bare and "'alice'" in bare[0] and "'bob'" not in bare[0]
    assert "https://a.example.com, the only identity provider" in bare[0]


async def test_draft_s6_3_a_session_of_alice_at_one_idp_is_not_alices_at_another(
    idp: DevIdentityProvider, idp_rsa: DevIdentityProvider, upstream_json, http
) -> None:
    """Session binding keys on issuer + tenant + sub: the same ``sub`` from another IdP is another
    person and gets 403 ``session.mismatch``, not the first one's session."""
    routes = [{"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url}]
    async with running_gateway(idp, routes, extra_idps=[idp_rsa]) as h:
        first = McpHttp(http, h.route_url("json"), await h.access_token("json"))
        await first.initialize()
        claims = h.id_jag_claims("json", iss=idp_rsa.issuer)
        status, body, _ = await h.token_request(idp_rsa.sign(claims))
        assert status == 200, body
        other = McpHttp(http, first.url, body["access_token"])
        other.session_id = first.session_id
        async with other.post(tool_call(2, "echo", {"text": "x"})) as response:
            assert response.status == 403
        assert (await first.call(tool_call(3, "echo", {"text": "mine"})))["result"]


@pytest.mark.parametrize(
    ("issuer", "tenant", "subject", "client_id"),
    [
        ("https://idp.example.com", None, "alice", "agent"),
        ("https://idp.example.com/t", "tenant-1", 'al"ice\\', "agent,1"),
        ("https://idp.example.com", "t\u00e9nant", "\u00e5lice \U0001f600", "\x00\n\t\u2028"),
        ("https://idp.example.com", None, "lone \ud800 surrogate", ""),
    ],
)
def test_principal_key_is_the_json_array_of_identity_key_and_client(
    issuer: str, tenant: str | None, subject: str, client_id: str
) -> None:
    """Session ids and approval bindings embed the key: its text must never change (ASCII JSON, compact)."""
    identity = SubjectIdentity(issuer, tenant, subject)
    key = principal_key(identity, client_id)
    assert key == json.dumps([identity.key, client_id], separators=(",", ":"))
    assert key.isascii()
    assert json.loads(key) == [identity.key, client_id]


def test_principal_key_text_is_pinned() -> None:
    key = principal_key(SubjectIdentity("https://idp", None, "alice"), "agent")
    assert key == '["[\\"https://idp\\",null,\\"alice\\"]","agent"]'


async def test_user_email_from_the_id_jag_reaches_conditions(idp: DevIdentityProvider, upstream_json, http) -> None:
    routes = [
        {
            "name": "json",
            "path": "/json/mcp",
            "upstream": upstream_json.mcp_url,
            "tools": [
                {"groups": ["*"], "allow": ["echo"], "when": "has(user.email) && user.email.endsWith('@example.com')"}
            ],
        }
    ]
    async with running_gateway(idp, routes) as h:
        with_email = McpHttp(http, h.route_url("json"), await h.access_token("json", email="alice@example.com"))
        await with_email.initialize()
        assert "result" in await with_email.call(tool_call(1, "echo", {"text": "x"}))
        other = McpHttp(http, h.route_url("json"), await h.access_token("json", email="alice@elsewhere.example"))
        await other.initialize()
        assert (await other.call(tool_call(2, "echo", {"text": "x"})))["error"]["data"]["reason"] == "condition"
        # No email asserted: the condition does not hold, and the call is refused.
        without = McpHttp(http, h.route_url("json"), await h.access_token("json"))
        await without.initialize()
        error = (await without.call(tool_call(3, "echo", {"text": "x"})))["error"]
        assert (error["code"], error["data"]["rule"]) == (-32003, "tools[0]")
