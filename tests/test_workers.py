"""``mcp-gateway serve --workers N``: N real processes on one port, supervised (gateway/workers.py).

Real ``serve`` processes, a real ``redis-server`` as the shared replay store and a real upstream. Which
worker answered a request is read from the log: every worker's lines name it (``worker 1 gateway: POST
... (request <id>)``), and each request carries an ``X-Request-Id`` of the test's choosing. Connections
are never reused (``force_close``), so the kernel's SO_REUSEPORT hash spreads them over the workers;
loops that wait for both workers to be hit are bounded (the chance that 64 connections all land on one
of two workers is 2**-63).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.config import ConfigError, load_config
from gateway.devidp import DevIdentityProvider
from gateway.workers import available_cpus, check_workers, restart_delay, workers_argument
from tests.support.mcp_http import McpHttp, request
from tests.support.redis_server import RedisServer, running_redis
from tests.support.scrape import scrape
from tests.support.serve import (
    CLIENT_ID,
    CLIENT_SECRET,
    JWT_BEARER,
    POLL,
    REPO,
    WAIT,
    ServedGateway,
    config_document,
    served,
)
from tests.support.upstreams import RunningUpstream

CONNECTIONS = 64  # attempts to reach both workers (see the module docstring)
_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


def ports_in_a_row(count: int) -> int:
    """The first of ``count`` consecutive loopback ports nothing listens on right now (bounded search)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = int(probe.getsockname()[1])
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    pytest.fail(f"no {count} consecutive free ports on 127.0.0.1")


def workers_document(
    idp: DevIdentityProvider, upstream: RunningUpstream, redis_server: RedisServer, **extra: Any
) -> dict[str, Any]:
    port = ports_in_a_row(1)
    metrics = ports_in_a_row(2)
    return config_document(
        port,
        idp,
        {"json": upstream.mcp_url},
        metrics_listen=f"127.0.0.1:{metrics}",
        replay_store=redis_server.url,
        **extra,
    )


async def until(check: Callable[[], Awaitable[bool] | bool], what: str, stderr: Callable[[], str]) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        result = check()
        if await result if isinstance(result, Awaitable) else result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {WAIT}s\n--- gateway stderr ---\n{stderr()}")
        await asyncio.sleep(POLL)


async def worker_of(gw: ServedGateway, request_id: str) -> int:
    """The worker whose log line names ``request_id`` (a streamed answer may reach the client just
    before the line is written, so poll for it)."""
    pattern = re.compile(rf"worker (\d+) gateway: \S+ \S+ -> \d+ .*\(request {request_id}\)")
    await until(lambda: pattern.search(gw.stderr()) is not None, f"a worker logs request {request_id}", gw.stderr)
    found = pattern.search(gw.stderr())
    assert found is not None
    return int(found.group(1))


def started(stderr: str) -> dict[int, int]:
    """The latest pid of each worker, from the supervisor's ``worker N started (pid P)`` lines."""
    return {int(index): int(pid) for index, pid in _STARTED.findall(stderr)}


def listening(stderr: str, count: int) -> bool:
    """Whether every worker has installed its signal handlers and listens (its ``listening on`` line)."""
    return all(f"worker {i} gateway: listening on" in stderr for i in range(count))


@asynccontextmanager
async def fresh_connections() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        yield http


async def test_two_workers_share_one_port_and_a_grant_redeemed_at_one_is_refused_at_the_other(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream, redis_server: RedisServer
) -> None:
    document = workers_document(idp, upstream_json, redis_server)
    # The token rate limit counts per process; this test sends up to 64 token requests in a burst.
    document["authorization"]["token_rate_limit"] = {"requests_per_minute": 0}
    async with served(tmp_path, idp, document, args=["--workers", "2"]) as gw:
        await until(lambda: listening(gw.stderr(), 2), "both workers listening", gw.stderr)
        now = int(time.time())
        assertion = idp.sign(
            {
                "iss": idp.issuer,
                "sub": "alice",
                "aud": gw.public_url,
                "client_id": CLIENT_ID,
                "jti": uuid.uuid4().hex,
                "iat": now,
                "exp": now + 300,
                "scope": "mcp",
                "resource": f"{gw.public_url}/json/mcp",
            }
        )
        form = {
            "grant_type": JWT_BEARER,
            "assertion": assertion,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        }
        answers: dict[int, list[int]] = {0: [], 1: []}
        tokens: list[str] = []
        async with fresh_connections() as http:
            for _ in range(CONNECTIONS):
                request_id = uuid.uuid4().hex
                headers = {"X-Request-Id": request_id}
                async with http.post(gw.base + "/oauth2/token", data=form, headers=headers) as response:
                    status, body = response.status, await response.json()
                if status == 200:
                    tokens.append(body["access_token"])
                else:
                    assert (status, body["error"]) == (400, "invalid_grant"), body
                answers[await worker_of(gw, request_id)].append(status)
                if all(answers.values()):
                    break
            assert all(answers.values()), f"every connection went to one worker: {answers}"
            assert len(tokens) == 1, answers  # redeemed once, refused at both workers after that
            # The token and the MCP session one worker issued are accepted by both (shared signing key,
            # stateless session binding).
            client = McpHttp(http, f"{gw.base}/json/mcp", tokens[0])
            await client.initialize()
            served_by: set[int] = set()
            for number in range(CONNECTIONS):
                request_id = uuid.uuid4().hex
                listed = await client.call(request(number, "tools/list"), **{"X-Request-Id": request_id})
                assert listed["result"]["tools"], listed
                served_by.add(await worker_of(gw, request_id))
                if served_by == {0, 1}:
                    break
            assert served_by == {0, 1}


async def test_sighup_reloads_every_worker_and_each_serves_its_own_metrics(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream, redis_server: RedisServer
) -> None:
    document = workers_document(idp, upstream_json, redis_server)
    host, port = document["metrics_listen"].rsplit(":", 1)
    async with served(tmp_path, idp, document, args=["--workers", "2"]) as gw:
        await until(lambda: listening(gw.stderr(), 2), "both workers listening", gw.stderr)
        assert await gw.status("/extra/mcp") == 404
        async with aiohttp.ClientSession() as http:
            metrics = [f"http://{host}:{int(port) + i}/metrics" for i in range(2)]
            before = [await scrape(http, url) for url in metrics]
            reloads = [s.value("mcp_gateway_config_reloads_total", result="success") for s in before]
            assert reloads == [0, 0], gw.stderr()
            document["routes"].append({"name": "extra", "path": "/extra/mcp", "upstream": upstream_json.mcp_url})
            gw.write_config(document)
            gw.send(signal.SIGHUP)

            async def both_reloaded() -> bool:
                scraped = [await scrape(http, url) for url in metrics]
                return [s.value("mcp_gateway_config_reloads_total", result="success") for s in scraped] == [1, 1]

            await until(both_reloaded, "both workers reloaded", gw.stderr)

            # A reload must pass the same check as the start: an sse route would need one worker.
            document["routes"][0]["transport"] = "sse"
            gw.write_config(document)
            gw.send(signal.SIGHUP)

            async def both_refused() -> bool:
                scraped = [await scrape(http, url) for url in metrics]
                return [s.value("mcp_gateway_config_reloads_total", result="failure") for s in scraped] == [1, 1]

            await until(both_refused, "both workers refused the reload", gw.stderr)
            refusal = "routes[0].transport: 'sse' cannot be served by --workers 2"
            assert gw.stderr().count(refusal) == 2, gw.stderr()
        async with fresh_connections() as http:
            for _ in range(8):
                async with http.post(gw.base + "/extra/mcp", json={}) as response:
                    assert response.status == 401, gw.stderr()  # the new route, at whichever worker
            # /metrics is not on the shared port, where it would show one worker's counters.
            async with http.get(gw.base + "/metrics") as response:
                assert response.status == 404, gw.stderr()


async def test_a_killed_worker_is_restarted_and_sigterm_stops_every_worker(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream, redis_server: RedisServer
) -> None:
    document = workers_document(idp, upstream_json, redis_server)
    async with served(tmp_path, idp, document, args=["--workers", "2"]) as gw:
        await until(lambda: listening(gw.stderr(), 2), "both workers listening", gw.stderr)
        first = started(gw.stderr())
        assert sorted(first) == [0, 1] and gw.process.pid not in first.values()
        os.kill(first[1], signal.SIGKILL)
        await until(lambda: started(gw.stderr()).get(1, first[1]) != first[1], "worker 1 restarted", gw.stderr)
        restarted = started(gw.stderr())
        assert restarted[0] == first[0]
        assert "worker 1 was killed by SIGKILL" in gw.stderr()
        # The new worker 1 takes connections on the shared port again, once it listens.
        await until(lambda: gw.stderr().count("worker 1 gateway: listening on") == 2, "worker 1 back", gw.stderr)
        marker = len(gw.stderr())
        async with fresh_connections() as http:
            for _ in range(CONNECTIONS):
                async with http.post(gw.base + "/json/mcp", json={}) as response:
                    assert response.status == 401
                if "worker 1 gateway: POST /json/mcp" in gw.stderr()[marker:]:
                    break
        assert "worker 1 gateway: POST /json/mcp" in gw.stderr()[marker:], gw.stderr()

        gw.send(signal.SIGTERM)
        assert await gw.exit_code(WAIT) == 0
        for pid in restarted.values():
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        log = gw.stderr()
        assert "worker 0 gateway: stopped" in log and "worker 1 gateway: stopped" in log
        assert "all workers stopped" in log


def serve_once(tmp_path: Path, document: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(path), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=WAIT, check=False)


def test_the_memory_replay_store_is_refused_with_two_workers(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    document = config_document(ports_in_a_row(1), idp, {"json": upstream_json.mcp_url})
    document["metrics_listen"] = f"127.0.0.1:{ports_in_a_row(2)}"
    result = serve_once(tmp_path, document, "--workers", "2")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"mcp-gateway: {tmp_path / 'gateway.yaml'}: replay_store: 'memory' cannot be shared")
    assert "redeemed once per worker" in lines[0] and "quotas would count per worker" in lines[0]
    assert "Redis" in lines[0]


@pytest.mark.parametrize(
    ("change", "key", "problem"),
    [
        ({"metrics_listen": None}, "metrics_listen", "is required with --workers 3"),
        ({"transport": "sse"}, "routes[0].transport", "'sse' cannot be served by --workers 3"),
        ({"metrics_listen": "127.0.0.1:{listen_minus_1}"}, "metrics_listen", "include the listen port"),
    ],
)
def test_state_that_would_differ_between_workers_is_refused(
    tmp_path: Path, idp: DevIdentityProvider, change: dict[str, Any], key: str, problem: str
) -> None:
    document = config_document(8080, idp, {"json": "http://127.0.0.1:9/mcp"}, replay_store="redis://127.0.0.1:9/0")
    document["metrics_listen"] = "127.0.0.1:9090"
    for name, value in change.items():
        if name == "transport":
            document["routes"][0]["transport"] = value
        elif value is None:
            del document[name]
        else:
            document[name] = value.format(listen_minus_1=8079)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(document))
    config = load_config(path)
    check_workers(config, 1)  # one process holds all its state: nothing to refuse
    with pytest.raises(ConfigError) as refused:
        check_workers(config, 3)
    assert (refused.value.key, problem in refused.value.problem) == (key, True), refused.value


def test_workers_argument_and_the_cpus_available(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    v2.mkdir()
    assert available_cpus(tmp_path / "absent") == affinity
    for cpu_max, expected in [("max 100000", affinity), ("50000 100000", 1), ("150000 100000", min(affinity, 2))]:
        (v2 / "cpu.max").write_text(cpu_max + "\n")  # half a CPU is still one worker; 1.5 CPUs are two
        assert available_cpus(v2) == expected, cpu_max
    for quota, expected in [("-1", affinity), ("50000", 1), ("150000", min(affinity, 2))]:
        (v1 / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
        (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
        assert available_cpus(v1) == expected, quota
    assert workers_argument("3") == 3
    assert workers_argument("auto") == available_cpus()
    for bad in ("0", "-1", "two"):
        with pytest.raises(Exception, match="must be"):
            workers_argument(bad)
    assert [restart_delay(n) for n in range(8)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]


def test_an_unknown_workers_value_is_one_usage_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(tmp_path / "x.yaml"), "--workers", "many"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert result.returncode == 2
    assert "argument --workers: must be a positive number or 'auto', got 'many'" in result.stderr
    assert "Traceback" not in result.stderr


# Emits audit records in batches of ``batch`` (each flushed by the log's writer task as one write far larger
# than a pipe's atomic write, PIPE_BUF: 4096 bytes on Linux), ``rounds`` times, as a busy worker does.
_AUDIT_WRITER = """
import asyncio, sys
from gateway.audit import AuditLog

async def main(name, rounds, batch):
    audit = AuditLog("stdout", flush_interval=0.001)
    await audit.start()
    for r in range(rounds):
        for i in range(batch):
            audit.emit("tool.call", route=name * 40, reason=f"{name}-{r}-{i}", request_id=name * 64)
        await asyncio.sleep(0.002)
    await audit.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def test_audit_lines_of_workers_sharing_stdout_never_interleave() -> None:
    """Workers inherit one stdout (a pipe to the container runtime): every line must arrive whole."""
    rounds, batch = 300, 100
    read_end, write_end = os.pipe()
    # The smallest pipe (one page): a write larger than that waits for the reader part-way, which is when a
    # write of another process can slip in, as with a busy log collector's full pipe.
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    try:
        writers = [
            subprocess.Popen(
                [sys.executable, "-c", _AUDIT_WRITER, name, str(rounds), str(batch)], cwd=REPO, stdout=write_end
            )
            for name in ("a", "b")
        ]
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read()  # until both writers have exited
    for writer in writers:
        assert writer.wait(timeout=WAIT) == 0
    lines = output.decode().splitlines()
    broken = [line[:80] for line in lines if not (line.startswith('{"ts"') and line.endswith("}"))]
    assert broken == [], f"{len(broken)} of {len(lines)} lines broken"
    assert len(lines) == 2 * rounds * batch


def test_a_busy_metrics_port_of_a_worker_is_one_line_before_any_worker_starts(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream
) -> None:
    metrics = ports_in_a_row(2)
    document = config_document(
        ports_in_a_row(1), idp, {"json": upstream_json.mcp_url}, replay_store="redis://127.0.0.1:9/0"
    )
    document["metrics_listen"] = f"127.0.0.1:{metrics}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", metrics + 1))
        taken.listen()
        result = serve_once(tmp_path, document, "--workers", "2")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"mcp-gateway: cannot listen on 127.0.0.1:{metrics + 1} (metrics_listen of worker 1): Address already in use"
    )
    assert "worker 0 started" not in result.stderr


def exited(pid: int) -> bool:
    """Whether ``pid`` has exited (gone, or a zombie its new parent has not reaped yet)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


async def test_workers_drain_and_exit_when_the_supervisor_is_killed(
    tmp_path: Path, idp: DevIdentityProvider, upstream_json: RunningUpstream, redis_server: RedisServer
) -> None:
    document = workers_document(idp, upstream_json, redis_server)
    async with served(tmp_path, idp, document, args=["--workers", "2"]) as gw:
        await until(lambda: listening(gw.stderr(), 2), "both workers listening", gw.stderr)
        workers = started(gw.stderr())
        gw.process.kill()  # SIGKILL: the supervisor cannot forward anything
        await gw.process.wait()
        await until(lambda: all(exited(pid) for pid in workers.values()), "orphaned workers exit", gw.stderr)
        log = gw.stderr()
        assert "worker 0 gateway: stopped" in log and "worker 1 gateway: stopped" in log  # drained, not killed
