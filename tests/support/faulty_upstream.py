"""An upstream that misbehaves on demand, run as its own process, for the fault tests.

    python -m tests.support.faulty_upstream [--host 127.0.0.1]

A real MCP server cannot be made to cut a stream in the middle, so this small aiohttp server answers
any JSON-RPC POST the way a failing server would; the fault is chosen by the path:

* ``/sse/<fault>/G``: a ``text/event-stream`` answer with two notifications, then it waits for
  ``POST /_test/release/G`` and does ``<fault>``: ``reset`` (TCP RST: ``SO_LINGER`` 0, then close),
  ``close`` (half an event, then FIN without the chunked body's last chunk) or ``end`` (a proper end
  of the stream, without the response to the request);
* ``/json/<fault>/G``: an ``application/json`` answer with a ``Content-Length`` and half the
  body, then ``reset`` after the release, or ``stall`` (nothing more, ever).

Waiting on the gate first makes the order certain: a test reads the first events through the gateway,
and only then lets the upstream fail. ``GET /_test/closed/G`` answers once the request of gate G has
ended on this side, or was cut off by its client (``{"closed": true, "cancelled": bool}``), or after
10 s (``{"closed": false}``): it shows whether the gateway dropped its upstream request.

It prints ``LISTENING http://HOST:PORT`` once it accepts connections, like tests/support/upstream_server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.processes import read_so_far, stop_process
from tests.support.upstreams import REPO_ROOT, STARTUP_TIMEOUT_SECONDS, STOP_TIMEOUT_SECONDS

WAIT_SECONDS = 10.0
_LISTENING = "LISTENING "


@dataclass
class _Gates:
    released: dict[str, asyncio.Event] = field(default_factory=dict)
    closed: dict[str, asyncio.Event] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)

    def release(self, gate: str) -> asyncio.Event:
        return self.released.setdefault(gate, asyncio.Event())

    def close(self, gate: str) -> asyncio.Event:
        return self.closed.setdefault(gate, asyncio.Event())


def _notification(text: str) -> bytes:
    message = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": text}}
    return b"event: message\ndata: " + json.dumps(message).encode() + b"\n\n"


def _reset(request: web.Request) -> None:
    """Close the connection with a TCP RST instead of a FIN (SO_LINGER with a zero timeout)."""
    assert request.transport is not None
    sock = request.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    request.transport.abort()


def build_app() -> web.Application:
    gates = _Gates()

    async def misbehave(request: web.Request) -> web.StreamResponse:
        kind, fault = request.match_info["kind"], request.match_info["fault"]
        gate = request.match_info["gate"]
        message = await request.json()
        try:
            if kind == "sse":
                return await _sse(request, fault, gates.release(gate))
            return await _json(request, fault, message.get("id"), gates.release(gate))
        except asyncio.CancelledError:
            gates.cancelled.add(gate)
            raise
        finally:
            gates.close(gate).set()

    async def release(request: web.Request) -> web.Response:
        gates.release(request.match_info["gate"]).set()
        return web.Response(status=204)

    async def closed(request: web.Request) -> web.Response:
        gate = request.match_info["gate"]
        try:
            await asyncio.wait_for(gates.close(gate).wait(), WAIT_SECONDS)
        except TimeoutError:
            return web.json_response({"closed": False})
        return web.json_response({"closed": True, "cancelled": gate in gates.cancelled})

    app = web.Application()
    app.router.add_post("/{kind:sse|json}/{fault}/{gate}", misbehave)
    app.router.add_post("/_test/release/{gate}", release)
    app.router.add_get("/_test/closed/{gate}", closed)
    return app


async def _sse(request: web.Request, fault: str, release: asyncio.Event) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(_notification("event 1") + _notification("event 2"))
    await asyncio.wait_for(release.wait(), WAIT_SECONDS)
    if fault == "reset":
        _reset(request)
    elif fault == "close":
        await response.write(b'event: message\ndata: {"jsonrpc":')
        assert request.transport is not None
        request.transport.close()
    else:
        await response.write_eof()
    return response


async def _json(request: web.Request, fault: str, request_id: Any, release: asyncio.Event) -> web.StreamResponse:
    body = json.dumps({"jsonrpc": "2.0", "id": request_id, "result": {"content": [], "padding": "x" * 200}}).encode()
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    if fault == "stall":
        await asyncio.Event().wait()  # until the gateway gives up and closes the connection
    await asyncio.wait_for(release.wait(), WAIT_SECONDS)
    _reset(request)
    return response


async def _serve(host: str) -> None:
    runner = web.AppRunner(build_app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = runner.addresses[0][1]
    sys.stdout.write(f"{_LISTENING}http://{host}:{port}\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    # Exit when the parent goes away (our stdin pipe closes), so a crashed test run leaves no orphan.
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass
    await runner.cleanup()


@dataclass
class FaultyUpstream:
    """The running process's URLs and test hooks (asynchronous, so that a gateway in the test's event
    loop keeps running while the test waits on the upstream)."""

    base_url: str

    def url(self, kind: str, fault: str, gate: str) -> str:
        return f"{self.base_url}/{kind}/{fault}/{gate}"

    async def release(self, gate: str) -> None:
        """Let the request waiting on ``gate`` go on to its fault."""
        async with aiohttp.ClientSession() as http, http.post(f"{self.base_url}/_test/release/{gate}") as response:
            assert response.status == 204

    async def closed(self, gate: str) -> dict[str, bool]:
        """Wait (at most 10 s) until the request of ``gate`` has ended on the upstream's side."""
        timeout = aiohttp.ClientTimeout(total=WAIT_SECONDS + 5)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(f"{self.base_url}/_test/closed/{gate}") as response:
                return await response.json()


@contextmanager
def faulty_upstream(host: str = "127.0.0.1") -> Iterator[FaultyUpstream]:
    """Start ``python -m tests.support.faulty_upstream`` and wait for its ``LISTENING`` line (bounded)."""
    stderr = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.faulty_upstream", "--host", host],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        try:
            base_url = _announced_url(process)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- stderr ---\n{read_so_far(stderr).decode(errors='replace')}") from None
        yield FaultyUpstream(base_url)
    finally:
        stop_process(process, STOP_TIMEOUT_SECONDS)
        stderr.close()


def _announced_url(process: subprocess.Popen[str]) -> str:
    """The URL of the ``LISTENING`` line; the error carries the child's stderr when there is none."""
    stdout = process.stdout
    assert stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=STARTUP_TIMEOUT_SECONDS)
    except queue.Empty:
        line = ""
    if not line.startswith(_LISTENING):
        raise RuntimeError(f"faulty upstream did not announce its URL within {STARTUP_TIMEOUT_SECONDS} s")
    return line[len(_LISTENING) :].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    asyncio.run(_serve(parser.parse_args().host))


if __name__ == "__main__":
    main()
