"""Coverage-guided fuzzing (atheris, libFuzzer) of the gateway's request-body decision.

Not part of the test suite: run for a bounded time, by hand or in a scheduled job (docs/fuzz.md)::

    pip install -e '.[fuzz]'
    PYTHONPATH=. python -m tests.support.fuzz_body -max_total_time=300 -print_final_stats=1

Target: the gateway's parse-and-decide entry point, ``gateway.proxy.request_body.read_rpc_body``
then ``gateway.enforce.plan_request`` (the decision engine without quotas), for a route whose policy
allows ``echo`` and denies ``secret_tool``. Each input is one POST body. Two oracles:

* no exception may escape, except :class:`BodyRefused` (a 400 with a JSON-RPC error): in the
  gateway anything else would be a 500;
* differential: what the plan would forward, read the way a Node server reads it (UTF-8 decoded
  with replacement as ``TextDecoder`` does, BOM dropped, ``JSON.parse``: last duplicate key wins, no
  ``NaN``), must not contain a ``tools/call`` with a string name the plan did not allow.

Violations do not stop the run: each distinct kind is recorded once, with the first input that
showed it, printed when found and (re)written as JSON to ``$FUZZ_FINDINGS`` (default
``fuzz-findings.json``), so a bounded run reports every kind it met. Without a corpus argument the
run starts from three seed requests and a dictionary of JSON-RPC and encoding tokens, written
under ``$FUZZ_WORKDIR`` (default ``fuzz-work``); the corpus grows there.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

import atheris

with atheris.instrument_imports():
    from gateway.config import RouteConfig, parse_config
    from gateway.enforce import plan_request
    from gateway.engine import DecisionEngine
    from gateway.oauth.access_token import Principal
    from gateway.proxy.request_body import BodyRefused, RpcBody, read_rpc_body

RULES = [{"groups": ["*"], "allow": ["echo"], "deny": ["secret_tool"]}]
SEEDS = (
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"secret_tool","arguments":{}}}',
    b'[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"}}}]',
    b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}',
)
MAX_EXAMPLE_BYTES = 400
# libFuzzer dictionary entries: JSON-RPC and encoding tokens the mutator splices into inputs.
TOKENS = (
    b'"tools/call"', b'"secret_tool"', b'"echo"', b'"name"', b'"method"', b'"params"', b'"id"', b"\\u0073",
    b"NaN", b"1.0", b"1e0", b"null", b"[", b"]", b"{", b"}", b",", b"\xef\xbb\xbf", b"\xff", b"\xc0\xaf",
    b"\xed\xa0\x80", b"\x00", b"\xc2\xa0",
)  # fmt: skip


def _route() -> RouteConfig:
    config = parse_config(
        {
            "public_url": "http://gateway.test",
            "authorization": {
                "clients": [{"client_id": "fuzz", "client_secret": "fuzz-secret-0123456789abcdef"}],
                "identity_providers": [{"issuer": "http://idp.test"}],
            },
            "routes": [{"name": "fuzz", "path": "/fuzz/mcp", "upstream": "http://127.0.0.1:9/mcp", "tools": RULES}],
        },
        source="<fuzz>",
    )
    return config.routes[0]


ROUTE = _route()
PRINCIPAL = Principal("alice", "fuzz", "http://idp.test", ROUTE.resource, ("mcp",), ("engineering",), 2e9, "jti")
ENGINE = DecisionEngine()
findings: dict[str, str] = {}


def _record(kind: str, data: bytes) -> None:
    if kind not in findings:
        findings[kind] = data[:MAX_EXAMPLE_BYTES].decode("latin-1")
        print(f"\nFINDING {kind}: {data[:120]!r}", file=sys.stderr, flush=True)
        _write_findings()


def _node_reading(body: bytes) -> Any:
    """The body as a Node server reads it (TextDecoder with replacement, then JSON.parse), or None."""
    text = body.decode("utf-8", errors="replace").removeprefix("\ufeff")

    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        return json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError):
        return None


def _calls_in(value: Any) -> list[Any]:
    items = value if isinstance(value, list) else [value]
    return [
        item["params"].get("name")
        for item in items
        if isinstance(item, dict) and item.get("method") == "tools/call" and isinstance(item.get("params"), dict)
    ]


def _plan(rpc: RpcBody) -> Any:
    """Run ``plan_request`` to completion: without quotas the engine never waits, so the coroutine
    finishes on its first step (no event loop per input)."""
    coroutine = plan_request(rpc, {}, ENGINE, PRINCIPAL, ROUTE)
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("plan_request waited on something")


def one_input(data: bytes) -> None:
    try:
        plan = _plan(read_rpc_body(data))
    except BodyRefused:
        return  # refused with a 400 and a JSON-RPC error: nothing reaches the upstream
    except Exception as exc:  # the oracle: anything else escaping here is a 500 in the gateway
        where = traceback.extract_tb(exc.__traceback__)[-1]
        _record(f"exception {type(exc).__name__} at {os.path.basename(where.filename)}:{where.lineno}", data)
        return
    if plan.forward_body is None:
        return
    allowed = {call.target for call in plan.calls if call.method == "tools/call" and call.allowed}
    for name in _calls_in(_node_reading(plan.forward_body)):
        if isinstance(name, str) and name not in allowed:
            what = "denied tool" if name == "secret_tool" else "undecided call"
            _record(f"{what} forwarded", data)


def _write_findings() -> None:
    path = os.environ.get("FUZZ_FINDINGS", "fuzz-findings.json")
    with open(path, "w", encoding="utf-8") as out:
        json.dump(findings, out, indent=1, sort_keys=True)


def _prepare(workdir: str) -> list[str]:
    """Seed corpus and dictionary files for libFuzzer, written under ``workdir``; their arguments."""
    corpus = os.path.join(workdir, "corpus")
    os.makedirs(corpus, exist_ok=True)
    for number, seed in enumerate(SEEDS):
        with open(os.path.join(corpus, f"seed-{number}"), "wb") as out:
            out.write(seed)
    dictionary = os.path.join(workdir, "json-rpc.dict")
    with open(dictionary, "w", encoding="ascii") as out:
        out.writelines('"' + "".join(f"\\x{byte:02x}" for byte in token) + '"\n' for token in TOKENS)
    return [f"-dict={dictionary}", corpus]


def main() -> None:
    workdir = os.environ.get("FUZZ_WORKDIR", "fuzz-work")
    argv = sys.argv + (_prepare(workdir) if not any(not a.startswith("-") for a in sys.argv[1:]) else [])
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
