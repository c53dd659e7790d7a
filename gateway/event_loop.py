"""The event loop ``serve`` runs on: uvloop when the optional ``uvloop`` extra is installed
(``pip install 'mcp-auth-gateway[uvloop]'``), asyncio's own loop otherwise.

uvloop is a drop-in implementation of the asyncio event loop on libuv (sockets, transports, timers in
C); what it saves per proxied request is measured in docs/benchmarks.md. Nothing in the gateway depends
on which loop runs it. ``MCP_GATEWAY_EVENT_LOOP`` overrides the choice: ``asyncio`` (e.g. to rule the loop out
while debugging, or to measure it), ``uvloop`` (fail unless it is installed) or ``auto`` (the default).
"""

from __future__ import annotations

import asyncio
import os

from gateway.config import ConfigError

ENVIRONMENT_VARIABLE = "MCP_GATEWAY_EVENT_LOOP"
CHOICES = ("auto", "asyncio", "uvloop")


def use_fastest() -> str:
    """Make the chosen loop that of every later ``asyncio.run``; returns its name.

    Not logged here: ``serve`` switches the log to the config's format only later, and a text line
    before it would break a JSON log."""
    choice = os.environ.get(ENVIRONMENT_VARIABLE, "auto")
    if choice not in CHOICES:
        raise ConfigError("environment", ENVIRONMENT_VARIABLE, f"must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "environment", ENVIRONMENT_VARIABLE, "uvloop is not installed (pip install 'mcp-auth-gateway[uvloop]')"
            ) from None
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
