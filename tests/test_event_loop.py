"""Which event loop ``serve`` runs on (gateway/event_loop.py): uvloop when installed, asyncio's own on
request, and a clear one-line error for a choice that cannot be honoured."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from gateway import event_loop
from gateway.config import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def policy() -> Iterator[None]:
    """The test changes the process's event loop policy; the default comes back afterwards."""
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(None)


def test_auto_picks_uvloop_and_asyncio_keeps_the_default(policy: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENVIRONMENT_VARIABLE, "asyncio")
    assert event_loop.use_fastest() == "asyncio"
    assert not isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)
    monkeypatch.delenv(event_loop.ENVIRONMENT_VARIABLE)
    assert event_loop.use_fastest() == "uvloop"
    assert isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)
    assert type(asyncio.new_event_loop()).__module__.startswith("uvloop")


def test_unknown_choice_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENVIRONMENT_VARIABLE, "trio")
    with pytest.raises(ConfigError, match="MCP_GATEWAY_EVENT_LOOP: must be one of auto, asyncio, uvloop, got 'trio'"):
        event_loop.use_fastest()


def test_serve_refuses_an_unknown_choice_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "unused.yaml"
    env = {"PATH": "/usr/bin:/bin", event_loop.ENVIRONMENT_VARIABLE: "libuv"}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "mcp-gateway: environment: MCP_GATEWAY_EVENT_LOOP: must be one of auto, asyncio, uvloop, got 'libuv'"
    ]
