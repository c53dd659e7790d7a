"""``mcp-gateway serve`` as operators run it: a subprocess with a config file, signals and its stderr.

``served`` starts ``python -m gateway serve --config FILE`` on a 127.0.0.1 port and waits until
``/readyz`` answers 200; the yielded ``ServedGateway`` obtains tokens from it (RFC 7523 jwt-bearer with
an ID-JAG a real ``DevIdentityProvider`` signed), opens MCP sessions, scrapes its metrics, rewrites its
config and signals it. Every wait is bounded; polling against a deadline is the only synchronisation.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.devidp import DevIdentityProvider
from tests.support.mcp_http import McpHttp
from tests.support.scrape import Scrape, scrape

REPO = Path(__file__).resolve().parent.parent.parent
CLIENT_ID = "ops-agent"
CLIENT_SECRET = "ops-agent-secret-0123456789"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
START = 15.0  # for the process to start
WAIT = 10.0  # for anything else; tests finish far sooner
POLL = 0.02
RELOADS = "mcp_gateway_config_reloads_total"


def config_document(
    port: int, idps: DevIdentityProvider | Sequence[DevIdentityProvider], routes: dict[str, str], **extra: Any
) -> dict[str, Any]:
    """A gateway config; route ``name`` is served at ``/<name>/mcp``. The file watcher is off unless
    ``reload`` is given, so a test that signals is not raced by a reload of the same change."""
    trusted = [idps] if isinstance(idps, DevIdentityProvider) else list(idps)
    return {
        "listen": f"127.0.0.1:{port}",
        "public_url": f"http://127.0.0.1:{port}",
        "authorization": {
            "clients": [{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}],
            "identity_providers": [{"issuer": idp.issuer} for idp in trusted],
        },
        "routes": [{"name": name, "path": f"/{name}/mcp", "upstream": url} for name, url in routes.items()],
        "reload": {"watch_interval_seconds": 0},
        **extra,
    }


@dataclass
class ServedGateway:
    """A running ``mcp-gateway serve`` process and what a test does with it."""

    process: asyncio.subprocess.Process
    config_path: Path
    stderr_path: Path
    base: str  # where this process listens
    public_url: str  # the issuer and the base of every resource (several processes may share it)
    idp: DevIdentityProvider
    http: aiohttp.ClientSession

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def write_config(self, document: dict[str, Any]) -> None:
        """Replace the file in one rename, as Kubernetes swaps a mounted ConfigMap."""
        staged = self.config_path.with_suffix(".staged")
        staged.write_text(yaml.safe_dump(document))
        os.replace(staged, self.config_path)

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    async def eventually(self, probe: Callable[[], Awaitable[Any]], expected: Any, what: str) -> None:
        """Poll ``probe`` until it returns ``expected``; fail after WAIT seconds or if the process died."""
        deadline = time.monotonic() + WAIT
        while (got := await probe()) != expected:
            if self.process.returncode is not None or time.monotonic() > deadline:
                pytest.fail(f"{what}: got {got!r}, expected {expected!r}\n--- gateway stderr ---\n{self.stderr()}")
            await asyncio.sleep(POLL)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + START
        while True:
            try:
                async with self.http.get(self.base + "/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            if self.process.returncode is not None or time.monotonic() > deadline:
                pytest.fail(f"gateway not ready within {START}s\n--- gateway stderr ---\n{self.stderr()}")
            await asyncio.sleep(POLL)

    async def status(self, path: str) -> int:
        """Status of an unauthenticated POST: 404 while no route serves ``path``, 401 once one does."""
        async with self.http.post(self.base + path, json={}) as response:
            return response.status

    async def grant(
        self,
        route: str,
        idp: DevIdentityProvider | None = None,
        *,
        user: str = "alice",
        groups: Sequence[str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """RFC 7523 jwt-bearer grant with an ID-JAG that ``idp`` (default: the test's IdP) signed for
        ``route``, ``user`` and, when given, ``groups``; returns the status and the JSON body."""
        signer = idp or self.idp
        now = int(time.time())
        claims = {
            "iss": signer.issuer,
            "sub": user,
            "aud": self.public_url,
            "client_id": CLIENT_ID,
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + 300,
            "scope": "mcp",
            "resource": f"{self.public_url}/{route}/mcp",
            **({"groups": list(groups)} if groups is not None else {}),
        }
        form = {
            "grant_type": JWT_BEARER,
            "assertion": signer.sign(claims),
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        }
        async with self.http.post(self.base + "/oauth2/token", data=form) as response:
            return response.status, await response.json()

    async def token(self, route: str, *, user: str = "alice", groups: Sequence[str] | None = None) -> str:
        status, body = await self.grant(route, user=user, groups=groups)
        assert status == 200, body
        return body["access_token"]

    async def client(
        self, route: str, token: str | None = None, *, user: str = "alice", groups: Sequence[str] | None = None
    ) -> McpHttp:
        client = McpHttp(
            self.http, f"{self.base}/{route}/mcp", token or await self.token(route, user=user, groups=groups)
        )
        await client.initialize()
        return client

    async def metrics(self) -> Scrape:
        return await scrape(self.http, self.base + "/metrics")

    async def reloads(self, result: str) -> float:
        return (await self.metrics()).value(RELOADS, result=result)

    async def exit_code(self, within: float) -> int:
        try:
            async with asyncio.timeout(within):
                return await self.process.wait()
        except TimeoutError:
            pytest.fail(f"gateway still running {within}s after being told to stop\n{self.stderr()}")


@asynccontextmanager
async def served(
    tmp_path: Path,
    idp: DevIdentityProvider,
    document: dict[str, Any],
    *,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    name: str = "gateway",
) -> AsyncIterator[ServedGateway]:
    """``mcp-gateway serve --config <tmp_path>/<name>.yaml [args]`` for the block. ``env`` is added to
    this process's environment; ``name`` tells apart several processes of one test."""
    config_path = tmp_path / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(document))
    stderr_path = tmp_path / f"{name}.stderr"
    with stderr_path.open("w") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(config_path),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
    base = "http://" + document["listen"]
    try:
        async with aiohttp.ClientSession() as http:
            running = ServedGateway(process, config_path, stderr_path, base, document["public_url"], idp, http)
            await running.wait_ready()
            yield running
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "Traceback" not in stderr_path.read_text()
