"""Pytest-side launcher for the real MCP upstream in :mod:`tests.support.upstream_server`.

Usage (a plain, synchronous context manager — works from sync or async tests and fixtures)::

    with start_upstream("streamable-sse") as upstream:
        upstream.mcp_url        # http://127.0.0.1:PORT/mcp  (or .../sse for the legacy transport)
        upstream.reset(); upstream.recorded(); upstream.release("gate-1")

``start_upstream`` launches the process and returns once it is listening; leaving the ``with`` block (or
calling :meth:`RunningUpstream.stop`) terminates it.  For a session-scoped fixture, ``yield`` inside the
``with``.

Why synchronous: the upstream lives in another process, so the short blocking HTTP calls made by the
helpers cannot deadlock an event loop that hosts the gateway or the MCP client.  Startup blocks for the
time the child needs to print its ``LISTENING`` line (well under a second normally, 20 s at most).
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import quote

import aiohttp

from tests.support.processes import read_so_far, stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 5.0
HTTP_TIMEOUT_SECONDS = 10.0
_LISTENING = "LISTENING "
# Loopback test hooks must never go through an environment-configured HTTP proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class UpstreamStartError(RuntimeError):
    """The upstream process exited or stayed silent instead of announcing its URL."""


class RunningUpstream:
    """A started upstream MCP server process and helpers for its ``/_test`` hooks.

    Also a context manager: ``__exit__`` stops the process.
    """

    def __init__(
        self,
        transport: str,
        process: subprocess.Popen[str],
        base_url: str,
        stderr_file: IO[bytes],
        stdout_drain: threading.Thread,
    ) -> None:
        self.transport = transport
        self.process = process
        self.base_url = base_url
        self._stderr_file = stderr_file
        self._stdout_drain = stdout_drain

    @property
    def mcp_url(self) -> str:
        """The URL an MCP client connects to: ``/mcp`` for Streamable HTTP, ``/sse`` for legacy SSE."""
        return self.base_url + ("/sse" if self.transport == "sse" else "/mcp")

    @property
    def host_port(self) -> str:
        """``host:port`` as the upstream expects to see it in the ``Host`` header."""
        return self.base_url.split("://", 1)[1]

    def recorded(self) -> list[dict[str, Any]]:
        """Every JSON-RPC message the MCP endpoints received since the last reset, in arrival order.

        Each entry is ``{"method": str | None, "name": str | None, "kind": "request" | "notification" |
        "response" | "unparseable", "path": str, "id": Any, "arguments": Any}``; ``name`` is the tool/prompt
        name or the resource URI, ``arguments`` the call's arguments (tools/call, prompts/get), ``id`` the
        JSON-RPC id (None for a notification). An unparseable body has neither ``id`` nor ``arguments``.
        """
        result = self._request("GET", "/_test/recorded")
        assert isinstance(result, list)
        return result

    def recorded_methods(self) -> list[str]:
        """Shorthand: just the method names of :meth:`recorded` (responses omitted)."""
        return [entry["method"] for entry in self.recorded() if entry["method"] is not None]

    def executed(self) -> list[str]:
        """Names of the tools that ran since the last reset (servers that record executions:
        :mod:`tests.support.lenient_server`)."""
        result = self._request("GET", "/_test/executed")
        assert isinstance(result, list)
        return result

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self._request("POST", "/_test/reset")

    def release(self, gate: str) -> None:
        """Let a ``gated_stream(gate=...)`` call finish (safe before the call starts waiting)."""
        self._request("POST", "/_test/release/" + quote(gate, safe=""))

    async def disconnects(self, count: int = 1) -> list[dict[str, str]]:
        """The MCP requests whose client (the gateway) closed the connection before the answer ended,
        as ``{"method", "path"}``, returned as soon as there are ``count`` (or after 10 s with fewer).

        Asynchronous, unlike the other hooks: the wait lasts until the gateway acts, and the gateway
        may run in the caller's event loop."""
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS + 5)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(f"{self.base_url}/_test/disconnects", params={"count": str(count)}) as response:
                return await response.json()

    def set_input_schema(self, tool: str, schema: dict[str, Any] | None) -> int:
        """Make ``tools/list`` advertise ``schema`` as ``tool``'s inputSchema (None: the tool's own again).
        The upstream sends notifications/tools/list_changed to every session that has listed tools, on
        its GET stream, and this returns how many it told. Blocking: call it from a thread in async tests."""
        path = "/_test/input_schema/" + quote(tool, safe="")
        if schema is None:
            result = self._request("DELETE", path)
        else:
            result = self._request("PUT", path, json.dumps(schema).encode())
        return result["notified"]

    def override_tool(self, tool: str, members: dict[str, Any] | None) -> int:
        """Make ``tools/list`` advertise ``tool`` with ``members`` (e.g. a new description) replaced (None:
        the tool's own again); announced like :meth:`set_input_schema`, whose return value this shares."""
        path = "/_test/tool_override/" + quote(tool, safe="")
        if members is None:
            result = self._request("DELETE", path)
        else:
            result = self._request("PUT", path, json.dumps(members).encode())
        return result["notified"]

    def stderr_text(self) -> str:
        """What the upstream has logged so far — for assertion messages."""
        return read_so_far(self._stderr_file).decode(errors="replace")

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after a bounded wait); idempotent."""
        stop_process(self.process, STOP_TIMEOUT_SECONDS)
        self._stdout_drain.join(timeout=STOP_TIMEOUT_SECONDS)
        self._stderr_file.close()

    def __enter__(self) -> RunningUpstream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _request(self, method: str, path: str, body: bytes | None = None) -> Any:
        data = body if body is not None else (b"" if method == "POST" else None)
        request = urllib.request.Request(self.base_url + path, method=method, data=data)
        with _OPENER.open(request, timeout=HTTP_TIMEOUT_SECONDS) as response:
            body = response.read()
        return json.loads(body) if body else None


def start_upstream(
    transport: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    stateless: bool = False,
    startup_timeout: float = STARTUP_TIMEOUT_SECONDS,
    module: str = "tests.support.upstream_server",
) -> RunningUpstream:
    """Launch ``python -m <module>`` (the SDK server by default) and wait until it announces its URL.

    ``port`` 0 (the default) lets the OS pick one; a given port restarts an upstream where a route
    already points. Raises :class:`UpstreamStartError` (with the child's stderr) if it exits or does
    not announce within ``startup_timeout`` seconds; the child is killed in that case.
    """
    command = [
        sys.executable,
        "-m",
        module,
        "--transport",
        transport,
        "--host",
        host,
        "--port",
        str(port),
    ]
    command.append("--exit-on-stdin-eof")
    if stateless:
        command.append("--stateless")
    # stderr goes to a file, not a pipe: nobody reads it while tests run, and a full pipe would block
    # the upstream mid-request.
    stderr_file = tempfile.TemporaryFile()
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,  # closed by us (or by the OS if we die) -> the child exits
        stdout=subprocess.PIPE,
        stderr=stderr_file,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    assert process.stdout is not None
    drain = threading.Thread(target=_drain_lines, args=(process.stdout, lines), daemon=True)
    drain.start()
    try:
        base_url = _wait_for_announcement(process, lines, stderr_file, startup_timeout)
    except BaseException:
        stop_process(process, STOP_TIMEOUT_SECONDS)
        drain.join(timeout=STOP_TIMEOUT_SECONDS)
        stderr_file.close()
        raise
    return RunningUpstream(transport, process, base_url, stderr_file, drain)


def start_lenient() -> RunningUpstream:
    """The deliberately lenient JSON-RPC server (:mod:`tests.support.lenient_server`) at ``/mcp``."""
    return start_upstream("streamable-json", module="tests.support.lenient_server")


def _wait_for_announcement(
    process: subprocess.Popen[str], lines: queue.Queue[str | None], stderr_file: IO[bytes], timeout: float
) -> str:
    """Return the URL from the child's ``LISTENING`` line, failing on exit, EOF or deadline."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UpstreamStartError(
                _describe(process, f"printed no LISTENING line within {timeout} s", seen, stderr_file)
            )
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue  # the deadline check above reports it
        if line is None:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
            raise UpstreamStartError(_describe(process, f"exited with status {process.returncode}", seen, stderr_file))
        if line.startswith(_LISTENING):
            return line[len(_LISTENING) :].strip()
        seen.append(line)


def _drain_lines(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    """Forward stdout lines to the queue for the whole life of the child, then signal EOF with None.

    Draining after the announcement too keeps a chatty child from ever blocking on a full pipe.
    """
    for line in stream:
        lines.put(line)
    lines.put(None)
    stream.close()


def _describe(process: subprocess.Popen[str], what: str, stdout_lines: list[str], stderr_file: IO[bytes]) -> str:
    stderr = read_so_far(stderr_file).decode(errors="replace")
    return (
        f"upstream {' '.join(map(str, process.args))!r} {what}\n"
        f"--- stdout ---\n{''.join(stdout_lines)}--- stderr ---\n{stderr}"
    )
