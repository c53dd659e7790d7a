"""Small servers and ports on 127.0.0.1 for tests: a free port, and an aiohttp app served for a block."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from gateway.app import bind_socket


def free_port() -> int:
    """A loopback port nothing listens on right now (bound, then released): for a config whose
    ``listen`` must be a real port, or for a connection that must be refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def serve_app(app: web.Application, **runner_options: Any) -> AsyncIterator[str]:
    """Serve ``app`` on an OS-assigned 127.0.0.1 port for the block; yields its base URL.

    ``runner_options`` go to ``web.AppRunner`` (for example ``handler_cancellation=True``); by
    default there is no access log and shutdown waits at most a second for open connections.
    """
    runner = web.AppRunner(app, **{"access_log": None, "shutdown_timeout": 1.0, **runner_options})
    await runner.setup()
    try:
        sock = bind_socket("127.0.0.1", 0)
        await web.SockSite(runner, sock).start()
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()
