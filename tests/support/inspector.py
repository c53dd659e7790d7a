"""Run the MCP Inspector in CLI mode (npm ``@modelcontextprotocol/inspector``, ``inspector --cli``) against a
server URL, as an asyncio subprocess so a gateway in the same event loop keeps serving.

Installed with the conformance suite by ``npm ci --prefix tests/conformance``.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from tests.support.conformance import CONFORMANCE_DIR, NODE, ConformanceSetupError

INSPECTOR = CONFORMANCE_DIR / "node_modules" / "@modelcontextprotocol" / "inspector"
INSPECTOR_BIN = INSPECTOR / "clients" / "launcher" / "build" / "index.js"  # package.json "bin": inspector
TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class InspectorRun:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """The result the CLI printed (one JSON document on stdout)."""
        assert self.returncode == 0, self.stderr
        return json.loads(self.stdout)


async def run_inspector(url: str, *args: str, headers: dict[str, str] | None = None) -> InspectorRun:
    """``inspector --cli URL --transport http ARGS...`` with each of ``headers`` as ``--header "Name: value"``."""
    for path in (NODE, INSPECTOR_BIN):
        if not path.is_file():
            raise ConformanceSetupError(f"{path} is missing: run `npm ci --prefix tests/conformance` first")
    command = [str(NODE), str(INSPECTOR_BIN), "--cli", url, "--transport", "http", *args]
    for name, value in (headers or {}).items():
        command += ["--header", f"{name}: {value}"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("NODE_")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    with tempfile.TemporaryDirectory(prefix="inspector-home-") as home:
        env["HOME"] = home  # the Inspector keeps a server catalog and OAuth state under ~/.mcp-inspector
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=CONFORMANCE_DIR,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), TIMEOUT_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
    assert process.returncode is not None
    return InspectorRun(process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"))
