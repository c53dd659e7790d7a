"""Signing-key rotation (current + previous key): live tokens survive the switch, new tokens use the
new key, and both keys are published so other verifiers keep working."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jose import jwt

from gateway.devidp import DevIdentityProvider
from gateway.oauth.keys import SigningKey
from tests.support.harness import make_config, start_harness
from tests.support.upstreams import RunningUpstream


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
