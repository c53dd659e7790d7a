"""Reading a gateway's audit file in tests: the log is written by a background task, so a reader waits
(bounded) until the lines it expects are there."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

WAIT_SECONDS = 10.0


async def audit_events(path: Path, *events: str, count: int = 1) -> list[dict[str, Any]]:
    """The audit lines whose ``event`` is one of ``events``, once each of them has appeared and there
    are at least ``count`` of them."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        found = [line for line in map(json.loads, text.splitlines()) if line["event"] in events]
        if set(events) <= {line["event"] for line in found} and len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"not {count} of {events} audit lines in: {text}"
        await asyncio.sleep(0.02)
