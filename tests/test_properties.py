"""Property-based tests (hypothesis) of the gateway's two hostile-input surfaces: tokens and JSON-RPC bodies.

Properties, for every generated input:

* bearer tokens (random strings, and real access tokens mutated: characters, segments, a forged
  header or payload) at a route, and token requests (mutated ID-JAGs, random client credentials and
  parameters) at the token endpoint: the answer comes within a bounded time, is never a 500, and no
  log record and no audit line contains the token, the assertion or the client secret;
* JSON-RPC bodies (random JSON values, JSON-RPC-shaped messages and batches, mutated real requests,
  random bytes, with random ``Content-Type``/``Content-Encoding``/mirror headers) POSTed to a route in
  front of the lenient upstream (tests/support/lenient_server.py, which executes whatever it can read):
  never a 500, always a JSON answer (or an empty 202), never a denied tool executed, never a denied
  tool listed.

Runs are derandomized (the same examples every run) and bounded (``max_examples``); a failure prints
the ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.devidp import DevIdentityProvider
from tests.support.harness import CLIENT_ID, CLIENT_SECRET, JWT_BEARER, GatewayHarness, running_gateway
from tests.support.upstreams import RunningUpstream, start_lenient

DENIED = ("secret_tool", "delete_everything")  # never run: one denied, one needing an approval nobody gives
TOOL_RULES = [
    {"groups": ["*"], "allow": ["echo"], "deny": ["secret_tool"]},
    {"groups": ["*"], "allow": ["delete_everything"], "require_approval": True},
]
ANSWER_SECONDS = 10.0  # "never a hang": every answer, however hostile the input, within this
MAX_ANSWER_BYTES = 1024 * 1024
SETTINGS = settings(
    max_examples=200,
    deadline=2000,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
# Any character a client can actually send in a form (lone surrogates cannot be encoded at all).
FORM_TEXT = st.characters(exclude_categories=["Cs"])


# -- observing logs and the audit trail ------------------------------------------------------------


class LogTap(logging.Handler):
    """Every log record emitted while it is attached, formatted with its exception text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)


@pytest.fixture(scope="module")
def log_tap() -> Iterator[LogTap]:
    """All gateway and aiohttp logging at DEBUG for the module, captured."""
    tap = LogTap()
    loggers = [logging.getLogger(name) for name in ("gateway", "aiohttp")]
    levels = [logger.level for logger in loggers]
    root = logging.getLogger()
    root.addHandler(tap)
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    try:
        yield tap
    finally:
        root.removeHandler(tap)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class Secrets:
    """Texts that must never be written to a log or the audit trail, and where to look for them.

    Checked incrementally (new texts against everything written, everything new against all texts),
    so a long run stays linear. A plain class: hypothesis prints dataclass fixtures field by field."""

    def __init__(self, audit_file: Path, tap: LogTap) -> None:
        self.audit_file = audit_file
        self.tap = tap
        self.texts: set[str] = set()
        self._new_texts: set[str] = set()
        self._lines_seen = 0
        self._audit_seen = 0
        self._written: list[str] = []

    def __repr__(self) -> str:
        return f"<Secrets: {len(self.texts) + len(self._new_texts)} texts watched>"

    def add(self, *texts: str) -> None:
        # Short strings appear in logs by coincidence ("a", "Bearer"); real tokens and secrets are long.
        self._new_texts.update(t.strip() for t in texts if len(t.strip()) >= 24)

    def leaks(self) -> list[str]:
        fresh = self.tap.lines[self._lines_seen :]
        self._lines_seen += len(fresh)
        if self.audit_file.exists():
            with self.audit_file.open("rb") as audit:
                audit.seek(self._audit_seen)
                tail = audit.read()
            self._audit_seen += len(tail)
            fresh.append(tail.decode(errors="replace"))
        fresh_text = "\n".join(fresh)
        self._written.append(fresh_text)
        found = {t for t in self.texts if t in fresh_text}
        everything = "\n".join(self._written)
        found.update(t for t in self._new_texts if t in everything)
        self.texts |= self._new_texts
        self._new_texts = set()
        return sorted(found)


# -- the gateway -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lenient() -> Iterator[RunningUpstream]:
    with start_lenient() as server:
        yield server


@pytest.fixture(scope="module")
async def gateway(
    idp: DevIdentityProvider, lenient: RunningUpstream, log_tap: LogTap, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[GatewayHarness, Secrets]]:
    audit_file = tmp_path_factory.mktemp("properties") / "audit.log"
    routes = [{"name": "lenient", "path": "/lenient/mcp", "upstream": lenient.mcp_url, "tools": TOOL_RULES}]
    secrets = Secrets(audit_file, log_tap)
    secrets.add(CLIENT_SECRET)
    async with running_gateway(idp, routes, audit={"sink": str(audit_file)}) as harness:
        yield harness, secrets
    # The audit writer flushes on shutdown: only now is every line of the module on disk.
    assert not secrets.leaks(), "a token or secret was written to a log or the audit trail"


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(scope="module")
async def access_token(gateway: tuple[GatewayHarness, Secrets]) -> str:
    harness, secrets = gateway
    token = await harness.access_token("lenient")
    secrets.add(token)
    return token


async def exchange(http: aiohttp.ClientSession, method: str, url: str, **options: Any) -> tuple[int, str, bytes]:
    """One request; its status, content type and body, all within ``ANSWER_SECONDS``."""
    async with asyncio.timeout(ANSWER_SECONDS):
        async with http.request(method, url, **options) as response:
            return response.status, response.content_type, await response.content.read(MAX_ANSWER_BYTES)


def is_json(body: bytes) -> bool:
    try:
        json.loads(body, parse_int=lambda digits: digits)
    except ValueError:
        return False
    return True


async def test_log_tap_sees_the_gateway_log(
    gateway: tuple[GatewayHarness, Secrets], http: aiohttp.ClientSession
) -> None:
    """The witness of the leak checks is not blind: a refused token request is logged with its client."""
    harness, secrets = gateway
    form = {"grant_type": JWT_BEARER, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "assertion": "probe"}
    status, _, _ = await exchange(http, "POST", harness.token_endpoint, data=form)
    assert status == 400
    assert any("token request refused" in line and CLIENT_ID in line for line in secrets.tap.lines)


# -- tokens ----------------------------------------------------------------------------------------


def b64url(value: Any) -> str:
    raw = json.dumps(value).encode() if not isinstance(value, bytes) else value
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


JSON_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)
JOSE_HEADERS = st.dictionaries(
    st.sampled_from(["alg", "typ", "kid", "jku", "x5u", "crit", "b64", "cty", "zip"]),
    st.sampled_from(["none", "HS256", "ES256", "RS256", "at+jwt", "JWT", "../../etc/passwd", ""]) | JSON_VALUES,
    max_size=5,
)
CLAIMS = st.dictionaries(
    st.sampled_from(["iss", "sub", "aud", "exp", "iat", "nbf", "jti", "client_id", "scope", "resource", "groups"]),
    JSON_VALUES,
    max_size=8,
)


@st.composite
def token_mutations(draw: st.DrawFn) -> dict[str, Any]:
    """A recipe applied to a real token at test time (strategies cannot see fixtures)."""
    return {
        "header": draw(st.none() | JOSE_HEADERS),
        "claims": draw(st.none() | CLAIMS),
        "edits": draw(
            st.lists(
                st.tuples(
                    st.sampled_from(["replace", "insert", "delete", "truncate", "drop-segment", "dup-segment"]),
                    st.floats(min_value=0, max_value=1),
                    st.text(B64URL + ".=+/ ~", min_size=1, max_size=6),
                ),
                max_size=4,
            )
        ),
    }


def mutate(token: str, recipe: dict[str, Any]) -> str:
    segments = token.split(".")
    if recipe["header"] is not None:
        segments[0] = b64url(recipe["header"])
    if recipe["claims"] is not None and len(segments) > 1:
        segments[1] = b64url(recipe["claims"])
    text = ".".join(segments)
    for op, where, chars in recipe["edits"]:
        at = int(where * len(text))
        if op == "replace":
            text = text[:at] + chars + text[at + len(chars) :]
        elif op == "insert":
            text = text[:at] + chars + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + len(chars) :]
        elif op == "truncate":
            text = text[:at]
        else:
            parts = text.split(".")
            index = int(where * (len(parts) - 1))
            parts = parts[:index] + parts[index + 1 :] if op == "drop-segment" else [*parts, parts[index]]
            text = ".".join(parts)
    return text


BEARER_TOKENS = token_mutations() | st.text(B64URL + ".", min_size=24, max_size=600)
SCHEMES = st.sampled_from(["Bearer ", "bearer ", "BEARER ", "Bearer  ", "Basic ", "", "Bearer\t"])


@SETTINGS
@given(candidate=BEARER_TOKENS, scheme=SCHEMES)
async def test_bearer_check_answers_every_token_without_500_or_leak(
    candidate: dict[str, Any] | str,
    scheme: str,
    gateway: tuple[GatewayHarness, Secrets],
    access_token: str,
    http: aiohttp.ClientSession,
) -> None:
    harness, secrets = gateway
    token = candidate if isinstance(candidate, str) else mutate(access_token, candidate)
    secrets.add(token)
    headers = {"Authorization": scheme + token, "Accept": "application/json, text/event-stream"}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    status, _, answer = await exchange(http, "POST", harness.route_url("lenient"), json=body, headers=headers)
    assert status in (200, 400, 401), (status, answer[:300])
    assert is_json(answer), answer[:300]
    assert not secrets.leaks()


GRANT_TYPES = st.sampled_from([JWT_BEARER, "authorization_code", "client_credentials", "", JWT_BEARER.upper()])


@st.composite
def token_requests(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "assertion": draw(st.none() | token_mutations() | st.text(FORM_TEXT, max_size=300)),
        "grant_type": draw(GRANT_TYPES | st.text(FORM_TEXT, max_size=40)),
        "client_id": draw(st.sampled_from([CLIENT_ID]) | st.text(FORM_TEXT, max_size=40)),
        "client_secret": draw(st.none() | st.just(CLIENT_SECRET) | st.text(FORM_TEXT, min_size=24, max_size=60)),
        "basic": draw(st.booleans()),
        "extra": draw(
            st.dictionaries(st.sampled_from(["resource", "scope", "assertion", "audience", "requested_token_type"]),
                            st.text(FORM_TEXT, max_size=60), max_size=3)
        ),
    }  # fmt: skip


@SETTINGS
@given(spec=token_requests())
async def test_token_endpoint_answers_every_request_without_500_or_leak(
    spec: dict[str, Any], gateway: tuple[GatewayHarness, Secrets], http: aiohttp.ClientSession
) -> None:
    harness, secrets = gateway
    assertion = spec["assertion"]
    if isinstance(assertion, dict):
        assertion = mutate(harness.id_jag("lenient"), assertion)
    form: dict[str, str] = {"grant_type": spec["grant_type"], **spec["extra"]}
    if assertion is not None:
        form["assertion"] = assertion
        secrets.add(assertion)
    headers = {}
    secret = spec["client_secret"]
    if secret is not None:
        secrets.add(secret)
    if spec["basic"]:
        # Written by hand: aiohttp's helper refuses a ':' in the client id, an attacker does not.
        credentials = f"{spec['client_id']}:{secret or ''}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
    else:
        form["client_id"] = spec["client_id"]
        if secret is not None:
            form["client_secret"] = secret
    status, _, answer = await exchange(http, "POST", harness.token_endpoint, data=form, headers=headers)
    assert status in (200, 400, 401, 429), (status, answer[:300])
    assert is_json(answer), answer[:300]
    if status == 200:
        secrets.add(json.loads(answer)["access_token"])
    assert not secrets.leaks()


# -- JSON-RPC bodies -------------------------------------------------------------------------------

NAMES = st.sampled_from(["echo", *DENIED, "Secret_Tool", " secret_tool", "secret_tool\x00"]) | st.text(max_size=12)
METHODS = st.sampled_from(
    ["tools/call", "tools/list", "initialize", "TOOLS/CALL", "Tools/List", "resources/read", "notifications/x"]
) | st.text(max_size=12)
IDS = st.none() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8) | JSON_VALUES
# The gateway's own approval state (gateway/approvals/stateless.py), forged: a prefix, then anything.
REQUEST_STATES = st.builds(lambda tail: "mcpgw1." + tail, st.text(max_size=60)) | JSON_VALUES
MODERN_META = st.just(
    {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"elicitation": {"form": {}, "url": {}}},
    }
)
PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "name": NAMES | JSON_VALUES,
        "arguments": JSON_VALUES,
        "_meta": MODERN_META | JSON_VALUES,
        "requestState": REQUEST_STATES,
        "inputResponses": JSON_VALUES,
    },
)
MESSAGES = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "1.0"])}, optional={"id": IDS, "method": METHODS, "params": PARAMS}
)
SEEDS = [
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"secret_tool","arguments":{}}}',
    b'{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"delete_everything","requestState":'
    b'"mcpgw1.eyJyIjoibGVuaWVudCJ9.AAAA","inputResponses":{"mcp_gateway_approval":{"action":"accept",'
    b'"content":{"approve":true}}},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}',
    b'[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"}}},'
    b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_everything"}}]',
    b'{"jsonrpc":"2.0","id":3,"method":"tools/list"}',
]


@st.composite
def mutated_seeds(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        at = draw(st.integers(min_value=0, max_value=len(data)))
        op = draw(st.sampled_from(["replace", "insert", "delete", "duplicate"]))
        chunk = draw(st.binary(min_size=1, max_size=4))
        if op == "replace":
            data[at : at + len(chunk)] = chunk
        elif op == "insert":
            data[at:at] = chunk
        elif op == "delete":
            del data[at : at + len(chunk)]
        else:
            data[at:at] = data[at : at + 16]
    return bytes(data)


def dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


BODIES = st.one_of(
    JSON_VALUES.map(dumps),
    MESSAGES.map(dumps),
    st.lists(MESSAGES | JSON_VALUES, max_size=4).map(dumps),
    mutated_seeds(),
    st.binary(max_size=200),
)
BODY_HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "Content-Type": st.sampled_from(
            ["application/json", "application/json; charset=utf-16", "application/json; charset=utf-7",
             "application/json; charset=latin-1", "text/plain", "application/json; charset=utf-8"]
        ),
        "Content-Encoding": st.sampled_from(["identity", "gzip", "deflate", "x-gzip", "gzip, gzip", "br"]),
        "Mcp-Method": METHODS.filter(str.isprintable) | HEADER_TEXT,
        "Mcp-Name": NAMES.filter(str.isprintable) | HEADER_TEXT,
        "Mcp_Name": st.sampled_from(DENIED),
    },
)  # fmt: skip


def tools_listed(body: bytes) -> set[str]:
    try:
        parsed = json.loads(body, parse_int=lambda digits: digits)
    except ValueError:
        return set()
    names = set()
    for message in parsed if isinstance(parsed, list) else [parsed]:
        result = message.get("result") if isinstance(message, dict) else None
        tools = result.get("tools") if isinstance(result, dict) else None
        if isinstance(tools, list):
            names.update(str(t.get("name")) for t in tools if isinstance(t, dict))
    return names


@SETTINGS
@given(body=BODIES, headers=BODY_HEADERS)
async def test_every_body_gets_a_json_answer_and_never_runs_a_denied_tool(
    body: bytes,
    headers: dict[str, str],
    gateway: tuple[GatewayHarness, Secrets],
    access_token: str,
    lenient: RunningUpstream,
    http: aiohttp.ClientSession,
) -> None:
    harness, _ = gateway
    headers = {
        "Content-Type": "application/json",
        **{k: v.encode("utf-8", "surrogateescape").decode("latin-1") for k, v in headers.items()},
        "Authorization": f"Bearer {access_token}",
        "Accept": "application/json, text/event-stream",
    }
    lenient.reset()
    status, content_type, answer = await exchange(
        http, "POST", harness.route_url("lenient"), data=body, headers=headers
    )
    assert status != 500, answer[:300]
    if status == 202:
        assert answer == b"", answer[:300]
    else:
        assert content_type == "application/json" and is_json(answer), (status, content_type, answer[:300])
    ran = [name for name in lenient.executed() if name in DENIED]
    assert not ran, f"denied {ran} executed upstream: {status} {answer[:300]!r}"
    assert "secret_tool" not in tools_listed(answer), answer[:300]
