"""Unit tests of the proxy's SSE framing (gateway/proxy/sse.py) and result rewriting (gateway/proxy/jsonrpc.py).

Table-driven. The properties that matter to the proxy: an event is released as soon as its blank line
has arrived (never later, never merged), wherever the upstream's chunks happen to be cut; bytes that
are not rewritten are forwarded verbatim; only the response carrying a tracked request id changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.proxy.jsonrpc import (
    EMA_EXTENSION,
    ResultRewriter,
    advertise_ema_extension,
)
from gateway.proxy.request_body import BodyRefused, read_rpc_body
from gateway.proxy.sse import Event, EventSplitter, EventTooLarge, parse_event
from tests.support.planning import plan_body

# -- EventSplitter ------------------------------------------------------------------------------

PRIMING = "id: 7f3a{nl}data:{nl}{nl}"
NOTIFICATION = 'event: message{nl}data: {{"jsonrpc":"2.0","method":"notifications/message"}}{nl}{nl}'
KEEPALIVE = ": keep-alive{nl}{nl}"
RETRY = "retry: 3000{nl}id:42{nl}data: first line{nl}data: second line{nl}{nl}"
ENDPOINT = "event: endpoint{nl}data: /messages/?session_id=abc{nl}{nl}"
RESULT = 'id: 43{nl}data: {{"jsonrpc":"2.0","id":2,"result":{{}}}}{nl}{nl}'
EVENTS = [PRIMING, NOTIFICATION, KEEPALIVE, RETRY, ENDPOINT, RESULT]
LINE_ENDINGS = {"LF": "\n", "CRLF": "\r\n", "CR": "\r"}


def stream_events(nl: str) -> list[bytes]:
    return [template.format(nl=nl).encode() for template in EVENTS]


def split_all(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    splitter = EventSplitter()
    events = [event for chunk in chunks for event in splitter.feed(chunk)]
    return events, splitter.rest()


@pytest.mark.parametrize("nl", LINE_ENDINGS.values(), ids=LINE_ENDINGS.keys())
def test_whole_stream_splits_into_its_events(nl: str) -> None:
    expected = stream_events(nl)
    assert split_all([b"".join(expected)]) == (expected, b"")


@pytest.mark.parametrize("nl", LINE_ENDINGS.values(), ids=LINE_ENDINGS.keys())
def test_stream_cut_at_every_byte_offset_yields_the_same_events(nl: str) -> None:
    expected = stream_events(nl)
    stream = b"".join(expected)
    for offset in range(len(stream) + 1):
        assert split_all([stream[:offset], stream[offset:]]) == (expected, b""), f"cut at byte {offset}"


@pytest.mark.parametrize("nl", LINE_ENDINGS.values(), ids=LINE_ENDINGS.keys())
def test_each_event_is_released_by_its_last_byte(nl: str) -> None:
    """Fed one byte at a time, every event comes out exactly when its terminating blank line is
    complete: not before (a CRLF cut between CR and LF must not end it) and not after."""
    expected = stream_events(nl)
    stream = b"".join(expected)
    ends = {sum(len(e) for e in expected[: i + 1]) for i in range(len(expected))}
    splitter = EventSplitter()
    released: list[bytes] = []
    for position in range(len(stream)):
        out = list(splitter.feed(stream[position : position + 1]))
        if position + 1 in ends:
            assert len(out) == 1, f"event ending at byte {position + 1} was held back"
            released.extend(out)
        else:
            assert out == [], f"event released early at byte {position + 1}: {out!r}"
    assert released == expected


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        pytest.param(b"data: a\n\rdata: b\n\n", [b"data: a\n\r", b"data: b\n\n"], id="LF line, CR blank line"),
        pytest.param(b"data: a\r\n\rdata: b\n\n", [b"data: a\r\n\r", b"data: b\n\n"], id="CRLF line, CR blank line"),
        pytest.param(b"data: a\n\r\ndata: b\r\r", [b"data: a\n\r\n", b"data: b\r\r"], id="LF line, CRLF blank line"),
        pytest.param(b"data: a\r\n\ndata: b\r\n\r\n", [b"data: a\r\n\n", b"data: b\r\n\r\n"], id="CRLF line, LF blank"),
    ],
)
def test_mixed_line_endings_end_events(stream: bytes, expected: list[bytes]) -> None:
    """WHATWG HTML §9.2.5: any of CRLF, LF, CR ends a line, mixed freely within one stream."""
    for offset in range(len(stream) + 1):
        assert split_all([stream[:offset], stream[offset:]]) == (expected, b""), f"cut at byte {offset}"


def test_incomplete_tail_is_kept_for_rest() -> None:
    splitter = EventSplitter()
    assert list(splitter.feed(b"data: done\n\ndata: half")) == [b"data: done\n\n"]
    assert splitter.rest() == b"data: half"
    assert splitter.rest() == b""


def test_event_without_end_beyond_limit_is_refused() -> None:
    splitter = EventSplitter(max_event_bytes=64)
    assert list(splitter.feed(b"data: " + b"x" * 50)) == []
    with pytest.raises(EventTooLarge):
        list(splitter.feed(b"x" * 20))


def test_many_small_events_in_one_chunk_are_not_limited() -> None:
    events = [b"data: %d\n\n" % i for i in range(100)]
    splitter = EventSplitter(max_event_bytes=64)
    assert list(splitter.feed(b"".join(events))) == events


# -- parse_event / Event.encode -----------------------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: str | None = None
    comments: tuple[str, ...] = ()


PARSE_CASES: list[tuple[str, bytes, Parsed]] = [
    ("data only", b"data: hello\n\n", Parsed(data="hello")),
    ("no space after colon", b"data:hello\n\n", Parsed(data="hello")),
    ("only one leading space is syntax", b"data:  two spaces\n\n", Parsed(data=" two spaces")),
    ("multi-line data joined with LF", b"data: a\ndata: b\ndata:\n\n", Parsed(data="a\nb\n")),
    ("field name without colon", b"data\n\n", Parsed(data="")),
    ("named event", b"event: endpoint\ndata: /m?s=1\n\n", Parsed(event="endpoint", data="/m?s=1")),
    ("empty event name means message", b"event:\ndata: x\n\n", Parsed(data="x")),
    ("id and retry kept as text", b"id: a-1\nretry: 2500\ndata: x\n\n", Parsed(data="x", id="a-1", retry="2500")),
    ("empty id", b"id:\ndata: x\n\n", Parsed(data="x", id="")),
    ("comments", b": keep-alive\n:x\ndata: y\n\n", Parsed(data="y", comments=(" keep-alive", "x"))),
    ("unknown fields ignored", b"foo: bar\ndata: y\n\n", Parsed(data="y")),
    ("CRLF endings", b"event: endpoint\r\nid: 9\r\ndata: a\r\ndata: b\r\n\r\n", Parsed("endpoint", "a\nb", "9")),
    ("CR endings", b"id: 9\rdata: a\rdata: b\r\r", Parsed(data="a\nb", id="9")),
    ("colon inside value", b'data: {"a": 1}\n\n', Parsed(data='{"a": 1}')),
]


@pytest.mark.parametrize(("raw", "expected"), [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES])
def test_parse_event(raw: bytes, expected: Parsed) -> None:
    event = parse_event(raw)
    assert Parsed(event.event, event.data, event.id, event.retry, tuple(event.comments)) == expected


@pytest.mark.parametrize(("raw", "expected"), [c[1:] for c in PARSE_CASES], ids=[c[0] for c in PARSE_CASES])
def test_encode_round_trips_every_field(raw: bytes, expected: Parsed) -> None:
    """A rewritten event keeps its id, retry, type, comments and data lines (re-encoded with LF)."""
    event = parse_event(parse_event(raw).encode())
    assert Parsed(event.event, event.data, event.id, event.retry, tuple(event.comments)) == expected


def test_encode_ends_with_one_blank_line() -> None:
    encoded = Event(event="endpoint", data="/x", id="1", retry="10").encode()
    assert encoded == b"id: 1\nevent: endpoint\nretry: 10\ndata: /x\n\n"
    assert list(EventSplitter().feed(encoded)) == [encoded]


# -- ResultRewriter -----------------------------------------------------------------------------


def mark(result: dict[str, Any]) -> dict[str, Any]:
    return {**result, "rewritten": True}


def rewriter(*ids: Any) -> ResultRewriter:
    tracked = ResultRewriter()
    for request_id in ids:
        tracked.expect(request_id, mark)
    return tracked


def rpc(request_id: Any, **body: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, **body}


JSON_CASES: list[tuple[str, tuple[Any, ...], Any, Any]] = [
    # (case, tracked ids, upstream body, expected body or None for "bytes unchanged")
    ("tracked result", (1,), rpc(1, result={"a": 1}), rpc(1, result={"a": 1, "rewritten": True})),
    ("string id", ("abc",), rpc("abc", result={}), rpc("abc", result={"rewritten": True})),
    ("other id", (1,), rpc(2, result={"a": 1}), None),
    ("int and string ids differ", (1,), rpc("1", result={}), None),
    ("error with tracked id", (1,), rpc(1, error={"code": -32601, "message": "no"}), None),
    ("non-object result", (1,), rpc(1, result=[1, 2]), None),
    ("notification", (1,), {"jsonrpc": "2.0", "method": "notifications/message"}, None),
    (
        "batch: only the tracked response",
        (2,),
        [rpc(1, result={"x": 1}), rpc(2, result={"y": 2}), rpc(3, error={"code": 1, "message": "e"})],
        [
            rpc(1, result={"x": 1}),
            rpc(2, result={"y": 2, "rewritten": True}),
            rpc(3, error={"code": 1, "message": "e"}),
        ],
    ),
    ("batch without tracked ids", (9,), [rpc(1, result={}), rpc(2, result={})], None),
    ("nothing tracked", (), rpc(1, result={}), None),
]


@pytest.mark.parametrize(("tracked", "body", "expected"), [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES])
def test_rewrite_json(tracked: tuple[Any, ...], body: Any, expected: Any) -> None:
    # Upstream spacing, so "unchanged" really means the same bytes, not an equivalent re-encoding.
    raw = json.dumps(body, indent=1).encode()
    out = rewriter(*tracked).rewrite_json(raw)
    if expected is None:
        assert out == raw
    else:
        assert json.loads(out) == expected


@pytest.mark.parametrize("raw", [b"not json", b"", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000])
def test_rewrite_json_passes_non_json_unchanged(raw: bytes) -> None:
    assert rewriter(1).rewrite_json(raw) == raw


def test_each_tracked_id_is_rewritten_once() -> None:
    """Ids are reused across a session; only the response to the tracked request changes."""
    tracked = rewriter(1)
    first = tracked.rewrite_json(json.dumps(rpc(1, result={})).encode())
    later = json.dumps(rpc(1, result={})).encode()
    assert json.loads(first)["result"] == {"rewritten": True}
    assert tracked.rewrite_json(later) == later
    assert not tracked


EVENT_CASES: list[tuple[str, bytes, bool]] = [
    # (case, raw upstream event, whether the tracked rewrite applies)
    ("tracked id", b'data: {"jsonrpc":"2.0","id":1,"result":{}}\n\n', True),
    ("tracked id, CRLF", b'event: message\r\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\r\n\r\n', True),
    ("tracked id, CR", b'data: {"jsonrpc":"2.0","id":1,"result":{}}\r\r', True),
    ("other id", b'data: {"jsonrpc":"2.0","id":2,"result":{}}\n\n', False),
    ("notification", b'data: {"jsonrpc":"2.0","method":"notifications/message","params":{}}\n\n', False),
    ("request from server", b'data: {"jsonrpc":"2.0","id":1,"method":"sampling/createMessage"}\n\n', False),
    ("named event", b'event: other\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\n\n', False),
    ("priming event", b"id: 5\ndata:\n\n", False),
    ("keep-alive", b": keep-alive\n\n", False),
    ("not JSON", b"data: {oops\n\n", False),
]


@pytest.mark.parametrize(("raw", "applies"), [c[1:] for c in EVENT_CASES], ids=[c[0] for c in EVENT_CASES])
def test_rewrite_event(raw: bytes, applies: bool) -> None:
    out = rewriter(1).rewrite_event(raw)
    if not applies:
        assert out == raw
        return
    assert json.loads(parse_event(out).data) == rpc(1, result={"rewritten": True})
    assert list(EventSplitter().feed(out)) == [out]


def test_rewritten_event_keeps_id_retry_and_comments() -> None:
    raw = b': note\nid: evt-9\nretry: 1500\ndata: {"jsonrpc":"2.0","id":1,"result":{"a":1}}\n\n'
    event = parse_event(rewriter(1).rewrite_event(raw))
    assert (event.id, event.retry, event.comments, event.event) == ("evt-9", "1500", [" note"], "message")
    assert json.loads(event.data)["result"] == {"a": 1, "rewritten": True}


def test_only_the_tracked_event_of_a_stream_changes() -> None:
    stream = [*stream_events("\r\n"), b'id: 44\r\ndata: {"jsonrpc":"2.0","id":"init","result":{}}\r\n\r\n']
    tracked = rewriter("init")
    out = [tracked.rewrite_event(event) for event in stream]
    assert out[:-1] == stream[:-1]
    assert out[-1] != stream[-1]
    assert parse_event(out[-1]).id == "44"


# -- what the gateway tracks ---------------------------------------------------------------------


async def test_rewriter_tracks_handshake_requests_only() -> None:
    body = json.dumps(
        [
            rpc(1, method="initialize", params={}),
            rpc(2, method="tools/list"),
            {"jsonrpc": "2.0", "method": "server/discover"},
            rpc("d", method="server/discover", params={}),
        ]
    ).encode()
    plan = await plan_body(body)
    tracked = plan.rewriter
    responses = [rpc(i, result={"capabilities": {}}) for i in (1, 2, "d")]
    out = json.loads(tracked.rewrite_json(json.dumps(responses).encode()))
    assert [EMA_EXTENSION in r["result"]["capabilities"].get("extensions", {}) for r in out] == [True, False, True]


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[1, 2]", b'"text"', b"\xff", b"[" * 100_000 + b"]" * 100_000],
    ids=["empty", "not json", "batch of non-objects", "string", "bad utf-8", "nested too deep"],
)
def test_read_rpc_body_refuses_non_jsonrpc(body: bytes) -> None:
    with pytest.raises(BodyRefused) as refused:
        read_rpc_body(body)
    assert refused.value.status == 400


def test_read_rpc_body_reads_batches_and_ids() -> None:
    body = json.dumps([rpc(1, method="initialize", params={"x": 1}), {"jsonrpc": "2.0", "method": "n"}]).encode()
    rpc_body = read_rpc_body(body)
    assert rpc_body.batch
    assert [(m.method, m.id, m.is_request) for m in rpc_body.messages] == [("initialize", 1, True), ("n", None, False)]


@pytest.mark.parametrize(
    ("result", "expected_extensions"),
    [
        ({"capabilities": {}}, {EMA_EXTENSION: {}}),
        ({"capabilities": {"extensions": {"other/x": {"a": 1}}}}, {"other/x": {"a": 1}, EMA_EXTENSION: {}}),
        ({"capabilities": {"extensions": {EMA_EXTENSION: {"kept": True}}}}, {EMA_EXTENSION: {"kept": True}}),
    ],
)
def test_advertise_ema_extension(result: dict[str, Any], expected_extensions: dict[str, Any]) -> None:
    assert advertise_ema_extension(result)["capabilities"]["extensions"] == expected_extensions


def test_advertise_ema_extension_leaves_results_without_capabilities() -> None:
    assert advertise_ema_extension({"tools": []}) == {"tools": []}
