"""The text of an audit line (README "Audit log"), as a log pipeline parses it: one compact ASCII JSON object,
``ts`` and ``event`` first, then the fields in their documented order whatever order the caller named them
in; sets and tuples as arrays; absent (None) and unknown fields left out; ``ts`` the UTC time truncated to the
millisecond."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.audit import AuditLog, _Timestamps

WRITTEN = (
    '"event":"tool.called","request_id":"r-1","route":"json","sub":"al\\"ice \\u00e5","client_id":"agent",'
    '"idp":"https://idp.example","groups":["eng"],"method":"tools/call","target":"echo","decision":"allow",'
    '"rule":"r1","status":200,"latency_ms":0.5,"approver_groups":["ops"]}'
)


def iso_millis(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def test_a_line_is_compact_ascii_json_in_field_order(tmp_path: Path) -> None:
    sink = tmp_path / "audit.jsonl"
    audit = AuditLog(str(sink))
    await audit.start()
    before = datetime.now(UTC)
    audit.emit(
        "tool.called",
        approver_groups=frozenset({"ops"}),
        latency_ms=0.5,
        status=200,
        rule="r1",
        reason=None,
        decision="allow",
        target="echo",
        method="tools/call",
        groups=("eng",),
        tenant=None,
        idp="https://idp.example",
        client_id="agent",
        sub='al"ice \u00e5',
        route="json",
        request_id="r-1",
        not_a_field="dropped",
    )
    after = datetime.now(UTC)
    await audit.close()
    line = sink.read_text(encoding="utf-8")
    assert line.startswith('{"ts":"') and line.endswith("," + WRITTEN + "\n"), line
    ts = line[len('{"ts":"') :].split('"', 1)[0]
    assert iso_millis(before) <= ts <= iso_millis(after)
    assert ts == iso_millis(datetime.fromisoformat(ts.replace("Z", "+00:00")))


def test_timestamps_match_datetime_across_seconds() -> None:
    """The date and time of day are formatted once per second; the milliseconds every time."""
    start = 1_767_225_599 * 1_000_000_000  # 2025-12-31T23:59:59Z: the next second is a new day, month and year
    samples = [start, start + 1, start + 999_999, start + 998_999_999, start + 10**9, start + 10**9 + 1_500_000]
    samples += [start + 86_400 * 10**9 + 123_456_789, start + 7]  # a day later, then back (a clock step)
    clock = iter(samples)
    timestamps = _Timestamps(lambda: next(clock))
    for ns in samples:
        seconds, rest = divmod(ns, 10**9)
        expected = datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=rest // 1000)
        assert timestamps() == iso_millis(expected), ns
