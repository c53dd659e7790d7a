"""The process log of ``mcp-gateway serve``, read as a log pipeline reads it.

``logging.format: json`` turns every stderr line into one JSON object with level, logger, message and
(while a request is handled) its request id; a well-formed incoming ``X-Request-Id`` is that id, so the
ingress log, the gateway log and the audit trail join on it; probes and scrapes stay out of the INFO
log; ``--log-level`` is accepted after ``serve`` (where container args and the chart's ``extraArgs``
put it).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.devidp import DevIdentityProvider
from gateway.logs import TEXT_FORMAT, TextFormatter
from tests.support.loopback import free_port
from tests.support.mcp_http import tool_call, tool_text
from tests.support.serve import config_document, served
from tests.support.upstreams import RunningUpstream

INGRESS_ID = "ingress-4bf92f3577b34da6a3ce929d0e0e4736"


def log_lines(stderr: str) -> list[dict[str, Any]]:
    """Every line must be one JSON object (a traceback or a plain-text line would fail here)."""
    entries = [json.loads(line) for line in stderr.splitlines()]
    assert all(isinstance(entry, dict) for entry in entries)
    return entries


async def test_json_log_lines_carry_the_incoming_request_id_and_skip_probes(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    audit = tmp_path / "audit.jsonl"
    document = config_document(
        free_port(), idp, {"json": upstream_json.mcp_url}, logging={"format": "json"}, audit={"sink": str(audit)}
    )
    async with served(tmp_path, idp, document, args=["--log-level", "info"]) as gw:
        for path in ("/healthz", "/readyz", "/metrics"):
            async with gw.http.get(gw.base + path) as response:
                assert response.status == 200
        client = await gw.client("json")
        assert tool_text(await client.call(tool_call(2, "echo", {"text": "joined"}), **{"X-Request-Id": INGRESS_ID}))
        async with client.post(tool_call(3, "echo", {"text": "x"}), **{"X-Request-Id": INGRESS_ID}) as response:
            assert response.headers["X-Request-Id"] == INGRESS_ID
        # Not well-formed (a space; too long): replaced by a fresh id, never echoed.
        for bad in ("two words", "a" * 129, "<script>"):
            async with client.post(tool_call(4, "echo", {"text": "x"}), **{"X-Request-Id": bad}) as response:
                assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-Id"])
        async with gw.http.post(gw.base + "/json/mcp", json={}, headers={"X-Request-Id": "no-token-1"}) as response:
            assert (response.status, response.headers["X-Request-Id"]) == (401, "no-token-1")
        await gw.eventually(lambda: _audited(audit, "no-token-1"), True, "the refusal's audit line")
        entries = log_lines(gw.stderr())

    assert entries, "the gateway logged nothing"
    for entry in entries:
        assert {"ts", "level", "logger", "message"} <= entry.keys(), entry
        assert entry["level"] in {"INFO", "WARNING", "ERROR"}  # --log-level info: nothing at DEBUG
    requests = [e for e in entries if e.get("request_id") == INGRESS_ID]
    # One access line per request; lines other modules write while handling it carry the id too.
    access = [e["message"] for e in requests if e["logger"] == "gateway"]
    assert len(access) == 2 and all("POST /json/mcp -> 200" in line for line in access), access
    assert all(e["logger"].startswith("gateway") for e in requests)
    assert [e for e in entries if e.get("request_id") == "no-token-1"]
    messages = " ".join(e["message"] for e in entries)
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert probe not in messages
    assert "listening on" in messages  # lines outside any request have no request_id
    assert all("request_id" not in e for e in entries if "listening on" in e["message"])
    audited = [json.loads(line) for line in audit.read_text().splitlines()]
    assert INGRESS_ID in {line.get("request_id") for line in audited if line["event"] == "tool.called"}


async def _audited(audit: Path, request_id: str) -> bool:
    """Whether a complete audit line (the writer may be mid-line) carries ``request_id``."""
    complete = audit.read_text().rpartition("\n")[0] if audit.exists() else ""
    return any(json.loads(line).get("request_id") == request_id for line in complete.splitlines())


async def test_audit_file_survives_copytruncate_rotation(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    """Outside Kubernetes a file sink is rotated by logrotate's ``copytruncate``: the gateway keeps its
    file open in append mode, so after the truncation its next line starts the file (no hole of NUL
    bytes up to the old offset, no lost or torn line)."""
    audit = tmp_path / "audit.jsonl"
    document = config_document(free_port(), idp, {"json": upstream_json.mcp_url}, audit={"sink": str(audit)})
    async with served(tmp_path, idp, document) as gw:
        for request_id in ("before-rotation-1", "before-rotation-2"):
            async with gw.http.post(gw.base + "/json/mcp", json={}, headers={"X-Request-Id": request_id}) as response:
                assert response.status == 401
        await gw.eventually(lambda: _audited(audit, "before-rotation-2"), True, "the audit lines before rotation")
        rotated = audit.read_bytes()
        audit.write_bytes(b"")  # what copytruncate does after copying the file away
        async with gw.http.post(gw.base + "/json/mcp", json={}, headers={"X-Request-Id": "after-rotation"}) as response:
            assert response.status == 401
        await gw.eventually(lambda: _audited(audit, "after-rotation"), True, "the audit line after rotation")
        content = audit.read_bytes()
    assert len(rotated.splitlines()) == 2
    assert b"\x00" not in content
    (line,) = content.splitlines()
    assert json.loads(line)["request_id"] == "after-rotation"


@pytest.mark.parametrize("fmt", [TEXT_FORMAT, TEXT_FORMAT.replace("%(name)s", "worker 3 %(name)s")])
def test_text_lines_are_logging_s_own_text(fmt: str) -> None:
    """The text formatter formats the date and time once per second; every line reads as the standard
    formatter's, within a second, across seconds and days, and back after a clock step."""
    start = datetime(2025, 12, 31, 23, 59, 58).timestamp()
    ours, standard = TextFormatter(fmt), logging.Formatter(fmt)
    for offset in (0.0, 0.001, 0.5, 0.9995, 1.0, 1.25, 2.0, 86_400.123, 0.75):
        record = logging.LogRecord("gateway", logging.INFO, __file__, 1, "%s -> %d", ("POST /x", 200), None)
        record.created = start + offset
        record.msecs = (record.created - int(record.created)) * 1000
        assert ours.format(record) == standard.format(record), offset
