"""The event loop ``serve`` runs on: uvloop when the optional ``uvloop`` extra is installed
(``pip install 'mcp-auth-gateway[uvloop]'``), asyncio's own loop otherwise.

uvloop is a drop-in implementation of the asyncio event loop on libuv; its sockets, transports and
timers cost the gateway less CPU per proxied request (docs/benchmarks.md). Nothing in the gateway
depends on which loop runs it, so the extra is a deployment choice, not a feature.
"""

from __future__ import annotations

import asyncio


def use_fastest() -> str:
    """Make uvloop the loop of every later ``asyncio.run`` if it is installed; the loop's name.

    Not logged here: ``serve`` switches the log to the config's format only later, and a text line
    before it would break a JSON log."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
