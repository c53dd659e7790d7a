"""Soak: ``mcp-gateway serve`` in front of real upstreams, driven at a fixed rate for minutes.

    python -m bench.soak [--minutes 3] [--rate 50] [--streams 4] [--stream-seconds 20]

(from the repository root, in the environment of ``pip install -e '.[test]'``; ``npm ci --prefix
tests/node`` adds server-everything as a third upstream). Not a load test and not part of the test
suite: it looks for what only time shows (memory or file descriptors that leak, requests that go
missing from the metrics or the audit trail, errors that happen once in thousands of requests).

Everything runs on 127.0.0.1 as separate processes, so /proc/<pid> measures the gateway alone: the
development IdP (``mcp-gateway dev-idp``), the official Python SDK test upstream (JSON and SSE
answers), server-everything when Node and the packages are there, and the gateway (``serve``, with a
signing key file, ``audit.sink`` to a file, a route with a tool policy). The driver runs a fixed mix
of operations at ``--rate`` per second:

- grants: an ID Token from the IdP (password grant, dev only, once per user and refreshed), then per
  grant an ID-JAG by token exchange (RFC 8693) at the IdP and an access token from the gateway
  (RFC 7523 JWT bearer grant); one in four is for a user the route refuses (``allow_groups``);
- tools/call answered with JSON, answered with an SSE stream, and on server-everything;
- denied tools/call (the route's tool policy), which must never reach the upstream;
- tools/list on the policy route, which must not show the denied tool;
- MCP sessions, deleted and re-created every few dozen calls;
- ``--streams`` long GET event streams held open ``--stream-seconds`` each, then ended by deleting
  their session, and reopened.

At the end it checks, and exits 1 if any check fails: no unexpected error (every answer as expected,
no timeout, no traceback in the gateway's log); the gateway's RSS and open file descriptors flat
(after warm-up vs at the end of the load); every request the driver sent counted in
``mcp_gateway_requests_total`` with its route, method class and status, and every grant in
``mcp_gateway_token_grants_total``; every proxied request's ``X-Request-Id`` in the audit log, with
the audit events counted per kind matching what was sent. Results: docs/soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.parser import text_string_to_metric_families

from gateway.devidp import GRANT_TYPE_PASSWORD, GRANT_TYPE_TOKEN_EXCHANGE, TOKEN_TYPE_ID_JAG, TOKEN_TYPE_ID_TOKEN
from tests.support.loopback import free_port
from tests.support.mcp_http import ACCEPT, INITIALIZED, PROTOCOL, initialize_request, read_event, request, tool_call
from tests.support.node import NodeSupportError, start_everything
from tests.support.upstreams import start_upstream

CLIENT_ID, CLIENT_SECRET = "demo-agent", "demo-agent-secret"  # the dev IdP's built-in client
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
START_SECONDS = 30.0  # for a process to come up
OP_SECONDS = 15.0  # for one operation; an answer later than this is an error
IDLE_SECONDS = 20.0  # after the load: longer than aiohttp's 15 s keep-alive idle timeout
DRAIN_SECONDS = 30.0  # for the last operations and streams after the load stops
SAMPLE_SECONDS = 5.0
SESSION_USES = 40  # calls on a session before it is deleted and a new one made
RSS_GROWTH_LIMIT = 0.10  # of the RSS after warm-up
FD_GROWTH_LIMIT = 16  # connections in use at the moment of sampling vary with the load
POLICY_TOOLS = [{"groups": ["support"], "allow": ["echo", "add"]}, {"groups": ["engineering"], "allow": ["*"]}]
DENIED_TOOL = "delete_everything"


# -- the parts, as processes ----------------------------------------------------------------------


@dataclass
class Stack:
    idp_url: str
    gateway_url: str
    gateway: asyncio.subprocess.Process
    gateway_log: Path
    audit_path: Path
    routes: dict[str, str]  # route name -> its URL at the gateway
    recorded_url: str  # the policy route's upstream: what it received (tests/support/upstream_server)


async def _spawn(args: list[str], log: Path) -> asyncio.subprocess.Process:
    with log.open("wb") as stderr:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "--log-level", "warning", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )  # fmt: skip


async def _stop(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), DRAIN_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode


@asynccontextmanager
async def running_stack(workdir: Path, with_everything: bool) -> AsyncIterator[Stack]:
    async with AsyncExitStack() as stack:
        idp_port = free_port()
        idp = await _spawn(["dev-idp", "--host", "127.0.0.1", "--port", str(idp_port)], workdir / "idp.log")
        stack.push_async_callback(_stop, idp)
        assert idp.stdout is not None
        line = (await asyncio.wait_for(idp.stdout.readline(), START_SECONDS)).decode()
        if " at http://" not in line:
            raise RuntimeError(f"dev IdP did not start; its log: {workdir / 'idp.log'}")
        idp_url = f"http://127.0.0.1:{idp_port}"

        upstream_json = stack.enter_context(start_upstream("streamable-json"))
        upstream_sse = stack.enter_context(start_upstream("streamable-sse"))
        routes = [
            {"name": "json", "path": "/json/mcp", "upstream": upstream_json.mcp_url},
            {
                "name": "tools",
                "path": "/tools/mcp",
                "upstream": upstream_sse.mcp_url,
                "allow_groups": ["engineering", "support"],
                "tools": POLICY_TOOLS,
            },
        ]
        if with_everything:
            everything = stack.enter_context(start_everything())
            routes.append({"name": "everything", "path": "/everything/mcp", "upstream": everything.mcp_url})

        key_path = workdir / "signing-key.pem"
        key = ec.generate_private_key(ec.SECP256R1())
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        port = free_port()
        gateway_url = f"http://127.0.0.1:{port}"
        audit_path = workdir / "audit.jsonl"
        config = {
            "listen": f"127.0.0.1:{port}",
            "public_url": gateway_url,
            "authorization": {
                "signing_key_file": str(key_path),
                "clients": [{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}],
                "identity_providers": [{"issuer": idp_url}],
                # One client id stands for every agent of the soak (~7 grants/s): above the default
                # per-client limit of 60 a minute, which a real deployment sizes per client.
                "token_rate_limit": {"requests_per_minute": 6000, "burst": 200},
            },
            "routes": routes,
            "audit": {"sink": str(audit_path)},
            "limits": {"stream_keepalive_seconds": 5},
            "reload": {"watch_interval_seconds": 0},
            "shutdown_grace_seconds": 5,
        }
        config_path = workdir / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(config))
        gateway_log = workdir / "gateway.log"
        gateway = await _spawn(["serve", "--config", str(config_path)], gateway_log)
        stack.push_async_callback(_stop, gateway)
        await _wait_ready(gateway_url, gateway, gateway_log)
        yield Stack(
            idp_url=idp_url,
            gateway_url=gateway_url,
            gateway=gateway,
            gateway_log=gateway_log,
            audit_path=audit_path,
            routes={r["name"]: gateway_url + r["path"] for r in routes},
            recorded_url=upstream_sse.base_url + "/_test/recorded",
        )


async def _wait_ready(url: str, process: asyncio.subprocess.Process, log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise RuntimeError(f"gateway exited with {process.returncode}; its log: {log}")
            try:
                async with http.get(url + "/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"gateway not ready within {START_SECONDS} s; its log: {log}")


# -- what was sent ---------------------------------------------------------------------------------


@dataclass
class Ledger:
    """Everything the driver sent to the gateway and what came back, to be matched against the
    gateway's metrics and audit log."""

    requests: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)
    request_ids: set[str] = field(default_factory=set)
    audit: collections.Counter[str] = field(default_factory=collections.Counter)
    grants: collections.Counter[str] = field(default_factory=collections.Counter)
    ops: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    errors: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors.append(what)

    def proxied(self, route: str, method_class: str, status: int, headers: Any, audit_event: str) -> None:
        self.requests[(route, method_class, str(status))] += 1
        self.audit[audit_event] += 1
        # Every request past authentication ends with one request.completed line (its status, latency).
        self.audit["request.completed"] += 1
        request_id = headers.get("X-Request-Id")
        if request_id is None:
            self.error(f"{route} {method_class}: no X-Request-Id")
        else:
            self.request_ids.add(request_id)


# -- the driver ------------------------------------------------------------------------------------


@dataclass
class Session:
    route: str
    user: str
    session_id: str
    uses: int = 0


class Driver:
    def __init__(self, stack: Stack, http: aiohttp.ClientSession, ledger: Ledger) -> None:
        self.stack = stack
        self.http = http
        self.ledger = ledger
        self.id_tokens: dict[str, tuple[str, float]] = {}
        self.tokens: dict[tuple[str, str], str] = {}
        self.idle: dict[tuple[str, str], list[Session]] = collections.defaultdict(list)
        self.ids = itertools.count(100)

    # grants

    async def id_token(self, user: str) -> str:
        """Dev IdP password grant (stands in for the user's SSO login), reused for five minutes."""
        cached = self.id_tokens.get(user)
        if cached is not None and time.monotonic() - cached[1] < 300:
            return cached[0]
        form = {"grant_type": GRANT_TYPE_PASSWORD, "username": user, "password": f"{user}-password"}
        body = await self._idp_token(form)
        self.id_tokens[user] = (body["id_token"], time.monotonic())
        return body["id_token"]

    async def _idp_token(self, form: dict[str, str]) -> dict[str, Any]:
        form = {**form, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        async with self.http.post(self.stack.idp_url + "/token", data=form) as response:
            body = await response.json()
            if response.status != 200:
                raise RuntimeError(f"IdP refused {form['grant_type']}: {body}")
            return body

    async def grant(self, user: str, route: str) -> tuple[int, dict[str, Any]]:
        """Token exchange at the IdP (ID Token -> ID-JAG), then the JWT bearer grant at the gateway."""
        id_jag = await self._idp_token(
            {
                "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
                "requested_token_type": TOKEN_TYPE_ID_JAG,
                "subject_token": await self.id_token(user),
                "subject_token_type": TOKEN_TYPE_ID_TOKEN,
                "audience": self.stack.gateway_url,
                "resource": self.stack.routes[route],
                "scope": "mcp",
            }
        )
        form = {"grant_type": JWT_BEARER, "assertion": id_jag["access_token"]}
        form |= {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        async with self.http.post(self.stack.gateway_url + "/oauth2/token", data=form) as response:
            body = await response.json()
            self.ledger.grants["issued" if response.status == 200 else "refused"] += 1
            self.ledger.audit["token.issued" if response.status == 200 else "token.denied"] += 1
            if response.status == 200:
                self.tokens[(user, route)] = body["access_token"]
            return response.status, body

    async def op_grant(self, user: str, route: str) -> None:
        status, body = await self.grant(user, route)
        if status != 200:
            self.ledger.error(f"grant for {user} on {route}: {status} {body}")

    async def op_refused_grant(self) -> None:
        status, body = await self.grant("carol", "tools")  # carol is in neither allowed group
        if (status, body.get("error")) != (400, "invalid_grant"):
            self.ledger.error(f"grant for carol on tools: expected 400 invalid_grant, got {status} {body}")

    # MCP over the gateway

    def _headers(self, user: str, route: str, session: Session | None = None, **extra: str) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.tokens[(user, route)]}", "Accept": ACCEPT}
        if session is not None:
            headers |= {"Mcp-Session-Id": session.session_id, "MCP-Protocol-Version": PROTOCOL}
        return headers | extra

    async def post(
        self, route: str, user: str, session: Session | None, message: dict[str, Any], method_class: str, event: str
    ) -> tuple[int, Any, Any]:
        """POST one JSON-RPC message; returns the status, the answer to it (JSON or from an SSE
        stream) and the headers; records the request in the ledger."""
        url = self.stack.routes[route]
        async with self.http.post(url, json=message, headers=self._headers(user, route, session)) as response:
            answer: Any = None
            if response.content_type == "text/event-stream":
                answer = await _answer_on_stream(response, message.get("id"))
            elif response.content_type == "application/json":
                answer = await response.json()
            else:
                await response.read()
            self.ledger.proxied(route, method_class, response.status, response.headers, event)
            return response.status, answer, response.headers

    async def open_session(self, route: str, user: str) -> Session:
        status, answer, headers = await self.post(
            route, user, None, initialize_request(1, "soak"), "initialize", "request.allowed"
        )
        if status != 200 or "result" not in (answer or {}):
            raise RuntimeError(f"initialize on {route}: {status} {answer}")
        session = Session(route, user, headers["Mcp-Session-Id"])
        status, _, _ = await self.post(route, user, session, INITIALIZED, "notification", "request.allowed")
        if status != 202:
            raise RuntimeError(f"notifications/initialized on {route}: {status}")
        return session

    async def delete_session(self, session: Session) -> None:
        url = self.stack.routes[session.route]
        async with self.http.delete(url, headers=self._headers(session.user, session.route, session)) as response:
            await response.read()
            self.ledger.proxied(session.route, "session_delete", response.status, response.headers, "request.allowed")
            if response.status != 200:
                self.ledger.error(f"DELETE session on {session.route}: {response.status}")

    @asynccontextmanager
    async def session(self, route: str, user: str) -> AsyncIterator[Session]:
        """A session of this user on this route for one operation (never shared by two at once);
        deleted and replaced after SESSION_USES operations."""
        idle = self.idle[(route, user)]
        session = idle.pop() if idle else await self.open_session(route, user)
        yield session
        session.uses += 1
        if session.uses >= SESSION_USES:
            await self.delete_session(session)
        else:
            idle.append(session)

    async def call(self, route: str, user: str, name: str, arguments: dict[str, Any], event: str) -> Any:
        async with self.session(route, user) as session:
            call_id = next(self.ids)
            status, answer, _ = await self.post(
                route, user, session, tool_call(call_id, name, arguments), "tools/call", event
            )
        if status != 200 or not isinstance(answer, dict) or answer.get("id") != call_id:
            raise RuntimeError(f"{name} on {route}: {status} {answer}")
        return answer

    async def op_json_call(self) -> None:
        a, b = next(self.ids), 7
        answer = await self.call("json", "alice", "add", {"a": a, "b": b}, "tool.called")
        _expect_text(self.ledger, "json add", answer, str(a + b))

    async def op_sse_call(self) -> None:
        text = uuid.uuid4().hex
        answer = await self.call("tools", "bob", "echo", {"text": text}, "tool.called")
        _expect_text(self.ledger, "tools echo", answer, text)

    async def op_everything_call(self) -> None:
        text = uuid.uuid4().hex
        answer = await self.call("everything", "alice", "echo", {"message": text}, "tool.called")
        if text not in json.dumps(answer.get("result")):
            self.ledger.error(f"everything echo: {answer}")

    async def op_denied_call(self) -> None:
        answer = await self.call("tools", "bob", DENIED_TOOL, {}, "tool.denied")
        if answer.get("error", {}).get("code") != -32003:
            self.ledger.error(f"denied call was not refused by the gateway: {answer}")

    async def op_tools_list(self) -> None:
        async with self.session("tools", "bob") as session:
            list_id = next(self.ids)
            status, answer, _ = await self.post(
                "tools", "bob", session, request(list_id, "tools/list"), "tools/list", "request.allowed"
            )
        names = {tool["name"] for tool in (answer or {}).get("result", {}).get("tools", [])}
        if status != 200 or names != {"echo", "add"}:
            self.ledger.error(f"tools/list for bob: {status} {sorted(names)}")

    async def hold_streams(self, stop: asyncio.Event, hold: float) -> None:
        """One long GET stream after another until ``stop``: opened on a fresh session, read (keep-alive
        comments arrive every 5 s), and ended after ``hold`` seconds by deleting its session."""
        while not stop.is_set():
            session = await self.open_session("tools", "alice")
            url = self.stack.routes["tools"]
            headers = self._headers("alice", "tools", session, Accept="text/event-stream")
            started = time.monotonic()
            async with self.http.get(url, headers=headers) as response:
                if (response.status, response.content_type) != (200, "text/event-stream"):
                    raise RuntimeError(f"GET stream: {response.status} {response.content_type}")
                try:
                    async with asyncio.timeout(hold):
                        await stop.wait()
                except TimeoutError:
                    pass
                await self.delete_session(session)
                async with asyncio.timeout(OP_SECONDS):
                    while await response.content.readany():
                        pass
                self.ledger.proxied("tools", "stream", response.status, response.headers, "request.allowed")
            self.ledger.ops["get_stream"] += 1
            self.ledger.latencies["get_stream"].append(time.monotonic() - started)

    async def close_sessions(self) -> None:
        for sessions in self.idle.values():
            while sessions:
                await self.delete_session(sessions.pop())


async def _answer_on_stream(response: aiohttp.ClientResponse, message_id: Any) -> Any:
    while (event := await read_event(response.content)) is not None:
        if event.data:
            message = json.loads(event.data)
            if message.get("id") == message_id and ("result" in message or "error" in message):
                answer = message
                while await response.content.readany():  # the rest of the stream, to its end
                    pass
                return answer
    return None


def _expect_text(ledger: Ledger, what: str, answer: dict[str, Any], text: str) -> None:
    content = answer.get("result", {}).get("content") or [{}]
    if content[0].get("text") != text:
        ledger.error(f"{what}: expected {text!r}, got {answer}")


# -- the gateway process ----------------------------------------------------------------------------


@dataclass
class Sample:
    at: float
    rss_mb: float
    fds: int
    cpu_seconds: float


def sample(pid: int, started: float) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return Sample(
        at=time.monotonic() - started,
        rss_mb=rss_kb / 1024,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        cpu_seconds=(int(stat[11]) + int(stat[12])) / ticks,  # utime + stime (proc(5) fields 14, 15)
    )


async def sample_until(stop: asyncio.Event, pid: int, started: float, samples: list[Sample]) -> None:
    while not stop.is_set():
        samples.append(sample(pid, started))
        try:
            async with asyncio.timeout(SAMPLE_SECONDS):
                await stop.wait()
        except TimeoutError:
            pass


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with http.get(url + "/metrics") as response:
        text = await response.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- the run -------------------------------------------------------------------------------------------


async def drive(driver: Driver, ledger: Ledger, seconds: float, rate: float, streams: int, hold: float) -> None:
    """Start one operation every 1/rate seconds (on a fixed schedule, whatever the answers take),
    from a fixed mix; every operation must end within OP_SECONDS."""
    everything = "everything" in driver.stack.routes
    grants = itertools.cycle(
        [("alice", "json"), ("bob", "tools"), ("alice", "tools")] + [("alice", "everything")] * everything
    )
    mix: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("grant", lambda: driver.op_grant(*next(grants))),
        ("grant", lambda: driver.op_grant(*next(grants))),
        ("refused_grant", driver.op_refused_grant),
        *[("json_call", driver.op_json_call)] * (5 if everything else 8),
        *[("sse_call", driver.op_sse_call)] * 4,
        *[("everything_call", driver.op_everything_call)] * (3 if everything else 0),
        *[("denied_call", driver.op_denied_call)] * 3,
        *[("tools_list", driver.op_tools_list)] * 2,
    ]
    in_flight: set[asyncio.Task[None]] = set()

    async def run(name: str, op: Callable[[], Awaitable[None]]) -> None:
        started = time.monotonic()
        try:
            async with asyncio.timeout(OP_SECONDS):
                await op()
        except Exception as exc:  # every failure of an operation is a finding, reported at the end
            ledger.error(f"{name}: {type(exc).__name__}: {exc}")
        ledger.ops[name] += 1
        ledger.latencies[name].append(time.monotonic() - started)

    stop = asyncio.Event()
    holders = [
        asyncio.create_task(driver.hold_streams(stop, hold * (0.5 + i / max(1, streams)))) for i in range(streams)
    ]
    started = time.monotonic()
    for tick, (name, op) in enumerate(itertools.cycle(mix)):
        due = started + tick / rate
        if due - started >= seconds:
            break
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        task = asyncio.create_task(run(name, op))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    stop.set()
    async with asyncio.timeout(DRAIN_SECONDS):
        await asyncio.gather(*in_flight)
        for result in await asyncio.gather(*holders, return_exceptions=True):
            if isinstance(result, BaseException):
                ledger.error(f"get_stream: {type(result).__name__}: {result}")
        await driver.close_sessions()


def check_metrics(ledger: Ledger, metrics: dict[Any, float]) -> list[str]:
    problems = []
    counted: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for (name, labels), value in metrics.items():
        if name == "mcp_gateway_requests_total":
            labels_dict = dict(labels)
            counted[(labels_dict["route"], labels_dict["method"], labels_dict["status"])] = int(value)
    if counted != ledger.requests:
        diff = {
            k: (ledger.requests[k], counted[k])
            for k in set(counted) | set(ledger.requests)
            if counted[k] != ledger.requests[k]
        }
        problems.append(f"mcp_gateway_requests_total differs from what was sent (sent, counted): {diff}")
    issued = metrics.get(("mcp_gateway_token_grants_total", frozenset({("result", "issued"), ("reason", "ok")})), 0)
    refused = sum(
        v
        for (n, labels), v in metrics.items()
        if n == "mcp_gateway_token_grants_total" and dict(labels)["result"] != "issued"
    )
    if (int(issued), int(refused)) != (ledger.grants["issued"], ledger.grants["refused"]):
        problems.append(f"grants issued/refused: sent {dict(ledger.grants)}, counted {issued}/{refused}")
    return problems


def check_audit(ledger: Ledger, audit_path: Path) -> list[str]:
    events: collections.Counter[str] = collections.Counter()
    ids: set[str] = set()
    for line in audit_path.read_text().splitlines():
        record = json.loads(line)
        events[record["event"]] += 1
        if "request_id" in record:
            ids.add(record["request_id"])
    problems = []
    if events != ledger.audit:
        problems.append(f"audit events {dict(events)} differ from what was sent {dict(ledger.audit)}")
    if ids != ledger.request_ids:
        missing, extra = len(ledger.request_ids - ids), len(ids - ledger.request_ids)
        problems.append(f"request ids: {missing} sent but not audited, {extra} audited but not sent")
    return problems


def check_flat(samples: list[Sample], seconds: float, idle: Sample) -> tuple[list[str], Sample, Sample, Sample]:
    warm_at = max(20.0, 0.15 * seconds)
    under_load = [s for s in samples if s.at <= seconds]
    warm = next((s for s in under_load if s.at >= warm_at), under_load[0])
    end = under_load[-1]
    middle = min(under_load, key=lambda s: abs(s.at - (warm.at + end.at) / 2))
    problems = []
    if end.rss_mb > warm.rss_mb * (1 + RSS_GROWTH_LIMIT):
        problems.append(f"RSS grew from {warm.rss_mb:.1f} MB to {end.rss_mb:.1f} MB")
    if idle.fds > warm.fds + FD_GROWTH_LIMIT:
        problems.append(f"open fds grew from {warm.fds} to {idle.fds} ({IDLE_SECONDS:g} s after the load)")
    return problems, warm, middle, end


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def soak(minutes: float, rate: float, streams: int, hold: float) -> int:
    seconds = minutes * 60
    with_everything = shutil.which("node") is not None
    workdir = Path(tempfile.mkdtemp(prefix="mcp-gateway-soak-"))
    ledger = Ledger()
    samples: list[Sample] = []
    async with AsyncExitStack() as stack:
        try:
            parts = await stack.enter_async_context(running_stack(workdir, with_everything))
        except NodeSupportError as exc:
            print(f"server-everything unavailable ({exc}); soaking without it")
            parts = await stack.enter_async_context(running_stack(workdir, False))
        pid = parts.gateway.pid
        connector = aiohttp.TCPConnector(limit=200)
        http = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
        driver = Driver(parts, http, ledger)
        for user, route in [("alice", "json"), ("bob", "tools"), ("alice", "tools"), ("alice", "everything")]:
            if route in parts.routes:
                await driver.op_grant(user, route)
        started = time.monotonic()
        stop_sampling = asyncio.Event()
        sampler = asyncio.create_task(sample_until(stop_sampling, pid, started, samples))
        print(f"soaking {minutes:g} min at {rate:g} ops/s, {streams} long GET streams; routes {sorted(parts.routes)}")
        await drive(driver, ledger, seconds, rate, streams, hold)
        stop_sampling.set()
        await sampler
        after = sample(pid, started)
        # Connections kept alive in the gateway's pools (client and upstream side) are not leaks: they
        # close after their idle timeout (aiohttp's 15 s). File descriptors are judged once that passed.
        await asyncio.sleep(IDLE_SECONDS)
        idle = sample(pid, started)
        metrics = await scrape(http, parts.gateway_url)
        exit_status = await _stop(parts.gateway)
        async with http.get(parts.recorded_url) as response:
            recorded = await response.json()
    log = parts.gateway_log.read_text(errors="replace")
    problems = list(ledger.errors)
    if exit_status != 0:
        problems.append(f"gateway exited with {exit_status}")
    if "Traceback" in log or "unhandled error" in log:
        problems.append("the gateway logged a traceback (see its log)")
    if any(entry.get("name") == DENIED_TOOL for entry in recorded):
        problems.append(f"{DENIED_TOOL} reached the upstream")
    problems += check_metrics(ledger, metrics)
    problems += check_audit(ledger, parts.audit_path)
    flat_problems, warm, middle, end = check_flat(samples, seconds, idle)
    problems += flat_problems

    cpu = (end.cpu_seconds - warm.cpu_seconds) / max(1e-9, end.at - warm.at)
    sent = sum(ledger.requests.values()) + sum(ledger.grants.values())
    print(f"\nrequests to the gateway: {sent} ({sent / seconds:.1f}/s), operations: {sum(ledger.ops.values())}")
    for name, count in sorted(ledger.ops.items()):
        lat = ledger.latencies[name]
        print(f"  {name:<16} {count:>7}  p50 {pct(lat, 0.5) * 1000:8.1f} ms  p99 {pct(lat, 0.99) * 1000:8.1f} ms")
    print(f"grants: {dict(ledger.grants)}; audit lines: {sum(ledger.audit.values())}")
    print("gateway process (after warm-up / middle / end of load / after the load / idle 20 s later):")
    for label, s in (("warm", warm), ("middle", middle), ("end", end), ("after", after), ("idle", idle)):
        print(f"  {label:<7} t={s.at:6.0f} s  RSS {s.rss_mb:6.1f} MB  fds {s.fds:4d}")
    every = max(1, round(30 / SAMPLE_SECONDS))
    print("  RSS MB every 30 s:", " ".join(f"{s.rss_mb:.1f}" for s in samples[::every]))
    print("  fds every 30 s:   ", " ".join(str(s.fds) for s in samples[::every]))
    mean_rss = statistics.fmean(s.rss_mb for s in samples)
    print(f"  CPU {cpu * 100:.0f}% of one core under load; RSS mean of all {len(samples)} samples {mean_rss:.1f} MB")
    warnings = sum(" WARNING " in line or " ERROR " in line for line in log.splitlines())
    print(f"gateway log: {warnings} warning/error lines; files in {workdir}")
    if problems:
        print(f"\nFAILED: {len(problems)} problem(s)")
        for problem in problems[:20]:
            print("  -", problem)
        return 1
    print("\nOK: no unexpected error; RSS and fds flat; every request in the metrics and the audit log")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=50.0, help="operations started per second")
    parser.add_argument("--streams", type=int, default=4, help="long GET streams held open at any time")
    parser.add_argument("--stream-seconds", type=float, default=20.0, help="how long each GET stream is held")
    args = parser.parse_args()
    return asyncio.run(soak(args.minutes, args.rate, args.streams, args.stream_seconds))


if __name__ == "__main__":
    sys.exit(main())
