"""Pinned tool definitions: a server must not change a reviewed tool under the agents that use it.

``mcp-gateway pin`` records, per tool, the SHA-256 of the canonical JSON of its definition (the members
of an MCP 2025-11-25 "Tools" ``Tool`` that describe what it does to a model: name, title, description,
inputSchema, outputSchema, annotations; sorted keys, no whitespace). A changed description or schema is
how a "rug pull" or tool poisoning reaches a model, so at run time every ``tools/list``-shaped result on
a route with ``tool_pins`` is compared with the lock file (:meth:`DriftState.check_list`) and the route's
``on_tool_drift`` applies:

- ``hide``: a changed or unpinned tool is removed from the list and its calls are refused;
- ``deny``: the same for changed tools only (new tools pass);
- ``log``: nothing is removed or refused.

A call is decided from what the latest list showed (:meth:`DriftState.refuses`, asked by the decision
engine), and under ``hide`` a tool that is not pinned is refused whether or not it was listed.
Each drift is reported once per change (``on_drift``: the audit line and the metric), not per request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DRIFT_MODES = ("hide", "deny", "log")
DEFINITION_MEMBERS = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")
MAX_PIN_FILE_BYTES = 16 * 1024 * 1024
# Unpinned tool names remembered per route so each is reported once; an upstream inventing names
# without end cannot grow memory past this (further new names are still hidden, only not reported).
MAX_REPORTED_PER_ROUTE = 10_000
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

# Told (route, tool, pinned hash or None for an unpinned tool, observed hash, action) once per change.
DriftObserver = Callable[[str, str, str | None, str, str], None]


class PinFileError(Exception):
    """The lock file cannot be used; the message is one line."""


@dataclass(frozen=True)
class ToolPins:
    """A route's lock file as loaded: tool name -> SHA-256 (hex) of its pinned definition."""

    path: str
    tools: Mapping[str, str]


def definition_hash(tool: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of a tool's definition; absent members are left out."""
    definition = {key: tool[key] for key in DEFINITION_MEMBERS if key in tool}
    canonical = json.dumps(definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def load_pins(path: Path) -> ToolPins:
    """Read a lock file written by :func:`write_pins`; raises PinFileError."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_PIN_FILE_BYTES + 1)
    except OSError as exc:
        raise PinFileError(f"cannot read {path}: {exc.strerror or exc} (run mcp-gateway pin)") from None
    if len(raw) > MAX_PIN_FILE_BYTES:
        raise PinFileError(f"{path} is larger than {MAX_PIN_FILE_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise PinFileError(f"{path} is not JSON") from None
    tools = data.get("tools") if isinstance(data, dict) else None
    if not isinstance(tools, dict):
        raise PinFileError(f"{path} has no 'tools' object")
    for name, digest in tools.items():
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
            raise PinFileError(f"{path}: tools.{name} must be a SHA-256 in lowercase hex")
    return ToolPins(str(path), dict(tools))


def write_pins(path: Path, route: str, upstream: str, tools: list[Mapping[str, Any]]) -> dict[str, str]:
    """Write the lock file for ``tools`` (atomically: a gateway reloading meanwhile reads the old or the
    new file, never half of one); returns what was pinned."""
    pinned = {tool["name"]: definition_hash(tool) for tool in tools}
    document = {"route": route, "upstream": upstream, "tools": dict(sorted(pinned.items()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(document, file, indent=2, ensure_ascii=False)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return pinned


class _RouteDrift:
    def __init__(self) -> None:
        self.observed: dict[str, str] = {}  # pinned tool -> the hash of its definition in the latest list
        self.reported: dict[str, str] = {}  # drifted tool -> the hash last reported for it


class DriftState:
    """What the latest ``tools/list`` results showed, per route; held for the gateway's lifetime (a
    reload that changes the pins is compared with the same observations)."""

    def __init__(self, on_drift: DriftObserver | None = None) -> None:
        self._routes: dict[str, _RouteDrift] = {}
        self._on_drift = on_drift

    def _route(self, name: str) -> _RouteDrift:
        state = self._routes.get(name)
        if state is None:
            state = self._routes[name] = _RouteDrift()
        return state

    def check_list(self, route: str, pins: ToolPins, mode: str, result: dict[str, Any]) -> dict[str, Any]:
        """Compare a list-shaped result's ``tools`` with the pins; returns it without the tools ``mode``
        hides. Pages of a paginated list are checked one by one, each as it passes."""
        tools = result.get("tools")
        if not isinstance(tools, list):
            return result
        state = self._route(route)
        kept = []
        for tool in tools:
            name = tool.get("name") if isinstance(tool, dict) else None
            if not isinstance(name, str):
                if mode != "hide":  # nothing a client could call by name: only hide removes it
                    kept.append(tool)
                continue
            observed = definition_hash(tool)
            pinned = pins.tools.get(name)
            if pinned is not None:
                state.observed[name] = observed
            if observed == pinned:
                state.reported.pop(name, None)
                kept.append(tool)
                continue
            self._report(route, state, name, pinned, observed, mode)
            if mode == "log" or (mode == "deny" and pinned is None):
                kept.append(tool)
        return result if len(kept) == len(tools) else {**result, "tools": kept}

    def _report(self, route: str, state: _RouteDrift, name: str, pinned: str | None, observed: str, mode: str) -> None:
        if state.reported.get(name) == observed:
            return
        if name not in state.reported and len(state.reported) >= MAX_REPORTED_PER_ROUTE:
            return
        state.reported[name] = observed
        action = "logged" if mode == "log" or (mode == "deny" and pinned is None) else "refused"
        what = "is not pinned" if pinned is None else "changed since it was pinned"
        log.warning("route %s: tool %r %s (sha256 %s); %s", route, name, what, observed, action)
        if self._on_drift is not None:
            self._on_drift(route, name, pinned, observed, action)

    def refuses(self, route: str, pins: ToolPins, mode: str, tool: str | None) -> str | None:
        """Why a call of ``tool`` is refused (None: it is not): under ``hide`` and ``deny``, a pinned
        tool whose latest listed definition differs from its pin; under ``hide``, any tool not pinned."""
        if mode == "log":
            return None
        pinned = pins.tools.get(tool) if tool is not None else None
        if pinned is None:
            return "the tool is not pinned" if mode == "hide" else None
        state = self._routes.get(route)
        observed = state.observed.get(tool) if state is not None and tool is not None else None
        if observed is not None and observed != pinned:
            return "the tool's definition changed since it was pinned"
        return None
