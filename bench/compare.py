"""Side by side: the same MCP upstream reached directly, through nginx, through this gateway and through
the FastMCP proxy (issue 13 section 1). Not a test: it prints figures (Markdown) for docs/benchmarks.md.

    python -m bench.compare [--rounds 3] [--seconds 4] [--requests 300] [--streams 10000] [--output FILE]

from the repository root, in the environment of ``pip install -e '.[test]'``. Needs Debian's nginx
(``apt-get install nginx``; skipped with a message otherwise). The FastMCP 4.1.6 proxy is installed
once into its own virtualenv under ``~/.cache/mcp-gateway-bench`` (skipped with a message when PyPI
cannot be reached).

Every party is its own process on 127.0.0.1, so /proc/<pid> measures each alone:

- upstream: the official Python SDK server (tests/support/upstream_server.py), one answering
  ``tools/call`` with JSON and one with an SSE stream;
- direct: the client talks to the upstream;
- nginx: one worker, plain ``proxy_pass`` with keep-alive to the upstream and buffering off;
- gateway: ``mcp-gateway serve`` with bearer validation, 20 routes, a tool policy whose allowing rule
  has a CEL ``when`` condition, audit to a file and the default (info) log level;
- gateway-asyncio: the same gateway on asyncio's own loop, when the uvloop extra is installed (then
  ``gateway`` runs on uvloop): the measurement of the extra;
- fastmcp: ``create_proxy(upstream, auth=JWTVerifier(...))``, the client sending a JWT it verifies.

The client is a raw Streamable HTTP client on aiohttp (one connection per simulated client, one MCP
session each), lighter than the SDK client so that the hop, not the client, is what is measured.
Configurations are interleaved: every round runs each of them once, in turn, and the figures are the
median of the rounds, so a neighbour's load on a shared machine hits all of them alike. The load
average is printed with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import venv
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from bench.bench import BENCH_CONDITION, bench_policy, token_validation_us
from gateway.config import RouteConfig
from gateway.devidp import DevIdentityProvider
from gateway.oauth.access_token import AccessTokenService
from gateway.oauth.idjag import Grant
from gateway.oauth.keys import SigningKey
from tests.support.loopback import free_port
from tests.support.mcp_http import ACCEPT, INITIALIZED, initialize_request, tool_call
from tests.support.upstreams import RunningUpstream, start_upstream

REPO = Path(__file__).resolve().parent.parent
CLIENT_ID = "bench-agent"
CLIENT_SECRET = "bench-agent-secret-0123456789"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FASTMCP_VERSION = "4.1.6"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mcp-gateway-bench"
START = 30.0  # for a process to start
WAIT = 30.0  # for any single request
DECOY_ROUTES = 18  # + json, sse and idle: the realistic table of ~20 routes
CONDITION = "size(args.text) <= 1000 && 'support' in user.groups"
ECHO_TEXT = "x" * 64
CLIENT_COUNTS = (1, 16, 64)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
IDLE_BATCH = 250  # idle streams opened at once


# ----------------------------------------------------------------------------------------- processes


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit, for this process and the children it starts."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _proc_children(pid: int) -> list[int]:
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
    return children


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its live descendants (nginx: master and worker)."""
    total = 0.0
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        total = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total + sum(cpu_seconds(child) for child in _proc_children(pid))


def memory_kib(pid: int, key: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak RSS) of ``pid`` and its descendants, KiB."""
    total = 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                total = int(line.split()[1])
    return total + sum(memory_kib(child, key) for child in _proc_children(pid))


@contextlib.contextmanager
def process(argv: list[str], log: Path, **options: Any) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **options)
    try:
        yield child
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


async def wait_http(url: str, child: subprocess.Popen[bytes], log: Path, ok: Callable[[int], bool]) -> None:
    deadline = time.monotonic() + START
    async with aiohttp.ClientSession() as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url) as response:
                    if ok(response.status):
                        return
            if child.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{url} did not come up; its log:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.05)


# -------------------------------------------------------------------------------------- the parties


@dataclass
class Target:
    """One way to reach the upstream: a URL per response mode, the headers a client sends, and the
    process whose CPU and memory the hop costs (None: no hop)."""

    name: str
    urls: dict[str, str]  # "json" / "sse" -> MCP endpoint
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # per mode: the token
    pid: int | None = None


NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream json_upstream {{ server {json}; keepalive 64; }}
    upstream sse_upstream {{ server {sse}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location /json/ {{
            proxy_pass http://json_upstream/;
            proxy_set_header Host {json};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
        location /sse/ {{
            proxy_pass http://sse_upstream/;
            proxy_set_header Host {sse};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


@contextlib.asynccontextmanager
async def nginx(work: Path, upstreams: dict[str, RunningUpstream]) -> AsyncIterator[Target | None]:
    binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if binary is None:
        print("nginx: not installed, skipped (Debian/Ubuntu: apt-get install nginx)", file=sys.stderr)
        yield None
        return
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(dir=work, port=port, json=upstreams["json"].host_port, sse=upstreams["sse"].host_port)
    )
    log = work / "nginx.log"
    with process([binary, "-c", str(conf), "-p", str(work), "-g", "daemon off;"], log) as child:
        base = f"http://127.0.0.1:{port}"
        await wait_http(base + "/json/mcp", child, log, lambda status: status < 500)
        yield Target("nginx", {"json": base + "/json/mcp", "sse": base + "/sse/mcp"}, pid=child.pid)


def gateway_document(port: int, idps: list[DevIdentityProvider], urls: dict[str, str], audit: Path) -> dict[str, Any]:
    tools = {
        "tools": [
            {"id": "echo-support", "groups": ["support"], "allow": ["echo", "get_*"], "when": CONDITION},
            {"id": "engineering", "groups": ["engineering"], "allow": ["*"], "deny": ["delete_*"]},
        ]
    }
    routes = [
        {"name": f"team-{i:02d}", "path": f"/team-{i:02d}/mcp", "upstream": urls["json"], "allow_groups": ["support"]}
        for i in range(DECOY_ROUTES)
    ]
    routes += [
        {"name": "json", "path": "/json/mcp", "upstream": urls["json"], **tools},
        {"name": "sse", "path": "/sse/mcp", "upstream": urls["sse"], **tools},
        {"name": "idle", "path": "/idle/mcp", "upstream": urls["idle"], "max_connections": 100_000},
    ]
    return {
        "listen": f"127.0.0.1:{port}",
        "public_url": f"http://127.0.0.1:{port}",
        "authorization": {
            "clients": [{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}],
            "identity_providers": [{"issuer": idp.issuer} for idp in idps],
            # What a grant costs, not what the per-client limiter allows.
            "token_rate_limit": {"requests_per_minute": 1_000_000, "burst": 1_000_000},
        },
        "routes": routes,
        "limits": {"max_streams_per_principal": 100_000, "max_client_connections": 100_000},
        "audit": {"sink": str(audit)},
        "reload": {"watch_interval_seconds": 0},
    }


def id_jag(idp: DevIdentityProvider, audience: str, resource: str, user: str = "alice") -> str:
    now = int(time.time())
    claims = {
        "iss": idp.issuer,
        "sub": user,
        "aud": audience,
        "client_id": CLIENT_ID,
        "jti": uuid.uuid4().hex,
        "iat": now,
        "exp": now + 600,
        "scope": "mcp",
        "groups": ["support"],
        "resource": resource,
    }
    return idp.sign(claims)


async def grant(http: aiohttp.ClientSession, base: str, assertion: str) -> tuple[int, dict[str, Any]]:
    form = {"grant_type": JWT_BEARER, "assertion": assertion, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    async with http.post(base + "/oauth2/token", data=form) as response:
        return response.status, await response.json(content_type=None)


@dataclass
class Gateway:
    target: Target
    base: str
    idps: dict[str, DevIdentityProvider]
    idle_url: str

    async def refresh_tokens(self) -> None:
        """A fresh access token per route (each is issued for its route's resource alone, RFC 8707),
        written into the headers the clients send: a token never outlives its ID-JAG (10 minutes
        here), and a whole run takes longer."""
        async with aiohttp.ClientSession() as http:
            for route in ("json", "sse", "idle"):
                assertion = id_jag(self.idps["ES256"], self.base, f"{self.base}/{route}/mcp")
                status, body = await grant(http, self.base, assertion)
                if status != 200:
                    raise SystemExit(f"gateway refused the bench grant: {body}")
                self.target.headers.setdefault(route, {})["Authorization"] = "Bearer " + body["access_token"]


@contextlib.asynccontextmanager
async def gateway(
    work: Path,
    idps: dict[str, DevIdentityProvider],
    urls: dict[str, str],
    name: str = "gateway",
    loop: str = "auto",
    source: Path = REPO,
) -> AsyncIterator[Gateway]:
    """``mcp-gateway serve`` on ``loop`` (MCP_GATEWAY_EVENT_LOOP: auto is uvloop when installed), with the
    ``gateway`` package of the checkout at ``source`` (bench/ab.py serves other commits' checkouts)."""
    port = free_port()
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(gateway_document(port, list(idps.values()), urls, work / f"{name}-audit.jsonl")))
    log = work / f"{name}.log"
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    path = os.pathsep.join(p for p in (str(source), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "MCP_GATEWAY_EVENT_LOOP": loop, "PYTHONPATH": path}
    with process(argv, log, cwd=source, env=env) as child:
        base = f"http://127.0.0.1:{port}"
        await wait_http(base + "/readyz", child, log, lambda status: status == 200)
        target = Target(name, {"json": base + "/json/mcp", "sse": base + "/sse/mcp"}, pid=child.pid)
        gw = Gateway(target, base, idps, base + "/idle/mcp")
        await gw.refresh_tokens()
        yield gw


FASTMCP_PROXY = """
import sys
from fastmcp.server import create_proxy
from fastmcp.server.auth.providers.jwt import JWTVerifier

upstream, port, jwks, issuer, audience = sys.argv[1:]
auth = JWTVerifier(jwks_uri=jwks, issuer=issuer, audience=audience, algorithm="ES256")
create_proxy(upstream, auth=auth).run(transport="http", host="127.0.0.1", port=int(port), log_level="warning")
"""


def fastmcp_python() -> Path | None:
    """The venv's python with fastmcp 4.1.6, created on first use (the recipe of issue 13: the
    requirements of fastmcp-slim[client,server] with certifi unpinned, then the two packages
    --no-deps); None, with a message, when it cannot be installed."""
    home = CACHE / f"fastmcp-{FASTMCP_VERSION}"
    python = home / "bin" / "python"
    if (home / "installed").exists():
        return python
    try:
        from packaging.requirements import Requirement

        shutil.rmtree(home, ignore_errors=True)
        venv.create(home, with_pip=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        with tempfile.TemporaryDirectory() as download:
            subprocess.run(
                [*pip[:3], "download", "-q", "--no-deps", "-d", download, f"fastmcp-slim=={FASTMCP_VERSION}"],
                check=True,
                timeout=300,
            )
            wheel = next(Path(download).glob("fastmcp_slim-*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
                metadata = archive.read(name).decode()
        wanted = []
        for line in metadata.splitlines():
            if not line.startswith("Requires-Dist: "):
                continue
            requirement = Requirement(line.removeprefix("Requires-Dist: "))
            if requirement.marker is not None and not any(
                requirement.marker.evaluate({"extra": extra}) for extra in ("client", "server")
            ):
                continue
            if requirement.name == "certifi":
                requirement.specifier = type(requirement.specifier)("")
            requirement.marker = None
            wanted.append(str(requirement))
        subprocess.run([*pip, *wanted], check=True, timeout=900)
        subprocess.run(
            [*pip, "--no-deps", f"fastmcp=={FASTMCP_VERSION}", f"fastmcp-slim=={FASTMCP_VERSION}"],
            check=True,
            timeout=300,
        )
    except (OSError, subprocess.SubprocessError, StopIteration) as exc:
        print(f"fastmcp: cannot install fastmcp {FASTMCP_VERSION} from PyPI ({exc}); skipped", file=sys.stderr)
        return None
    (home / "installed").write_text(FASTMCP_VERSION)
    return python


@contextlib.asynccontextmanager
async def fastmcp(work: Path, idp: DevIdentityProvider, upstream: str) -> AsyncIterator[Target | None]:
    python = fastmcp_python()
    if python is None:
        yield None
        return
    script = work / "fastmcp_proxy.py"
    script.write_text(FASTMCP_PROXY)
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    log = work / "fastmcp.log"
    argv = [str(python), str(script), upstream, str(port), idp.jwks_uri, idp.issuer, url]
    with process(argv, log, cwd=work) as child:
        await wait_http(url, child, log, lambda status: status in (401, 405, 406, 400))
        now = int(time.time())
        claims = {"iss": idp.issuer, "sub": "alice", "aud": url, "iat": now, "exp": now + 3600, "scope": "mcp"}
        token = idp.sign(claims, typ="JWT")
        # FastMCP answers with its own framing whatever the upstream's: one proxy, in front of the JSON one.
        yield Target("fastmcp", {"json": url}, {"json": {"Authorization": "Bearer " + token}}, child.pid)


# -------------------------------------------------------------------------------------- the client


class Client:
    """One simulated MCP client: its own connection and session on one URL."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url = url
        self.headers = {"Accept": ACCEPT, "Content-Type": "application/json", **headers}
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1), timeout=aiohttp.ClientTimeout(total=WAIT)
        )
        self.next_id = 1

    async def open(self) -> None:
        async with self.http.post(self.url, json=initialize_request(), headers=self.headers) as response:
            if response.status != 200:
                raise SystemExit(f"initialize at {self.url}: {response.status} {await response.text()}")
            await response.read()
            session = response.headers.get("Mcp-Session-Id")
        if session is not None:
            self.headers["Mcp-Session-Id"] = session
        self.headers["MCP-Protocol-Version"] = "2025-11-25"
        async with self.http.post(self.url, json=INITIALIZED, headers=self.headers) as response:
            await response.read()

    def _message(self) -> dict[str, Any]:
        self.next_id += 1
        return tool_call(self.next_id, "echo", {"text": ECHO_TEXT})

    async def call(self) -> bool:
        try:
            async with self.http.post(self.url, json=self._message(), headers=self.headers) as response:
                body = await response.read()
                return response.status == 200 and b'"result"' in body
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def first_event(self) -> float | None:
        """Seconds until the first ``data:`` line of an SSE answer (None: not SSE, or an error)."""
        started = time.perf_counter()
        try:
            async with self.http.post(self.url, json=self._message(), headers=self.headers) as response:
                if response.status != 200:
                    return None
                while line := await response.content.readline():
                    if line.startswith(b"data:"):
                        elapsed = time.perf_counter() - started
                        await response.read()
                        return elapsed
        except (aiohttp.ClientError, TimeoutError):
            return None
        return None

    async def close(self) -> None:
        await self.http.close()


@contextlib.asynccontextmanager
async def clients(target: Target, mode: str, count: int) -> AsyncIterator[list[Client]]:
    opened = [Client(target.urls[mode], target.headers.get(mode, {})) for _ in range(count)]
    try:
        await asyncio.gather(*(c.open() for c in opened))
        yield opened
    finally:
        await asyncio.gather(*(c.close() for c in opened))


# ------------------------------------------------------------------------------------ measurements


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Load:
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)


async def run_load(target: Target, mode: str, count: int, seconds: float, keep_latencies: bool = False) -> Load:
    """``count`` clients calling back to back for ``seconds``; the hop's CPU over the same window."""
    load = Load()
    async with clients(target, mode, count) as opened:
        for client in opened:  # warm-up: connections, caches
            await client.call()
        cpu_before = cpu_seconds(target.pid) if target.pid else 0.0
        started = time.perf_counter()
        deadline = started + seconds

        async def loop(client: Client) -> None:
            while time.perf_counter() < deadline:
                begun = time.perf_counter()
                if await client.call():
                    load.ok += 1
                    if keep_latencies:
                        load.latencies.append(time.perf_counter() - begun)
                else:
                    load.errors += 1

        await asyncio.gather(*(loop(c) for c in opened))
        load.seconds = time.perf_counter() - started
        load.cpu = (cpu_seconds(target.pid) if target.pid else 0.0) - cpu_before
    return load


async def latencies(target: Target, mode: str, n: int) -> tuple[list[float], int]:
    samples, errors = [], 0
    async with clients(target, mode, 1) as (client,):
        for _ in range(20):
            await client.call()
        for _ in range(n):
            started = time.perf_counter()
            if await client.call():
                samples.append(time.perf_counter() - started)
            else:
                errors += 1
    return samples, errors


async def first_events(target: Target, n: int) -> list[float]:
    samples = []
    async with clients(target, "sse", 1) as (client,):
        for _ in range(20):
            await client.first_event()
        for _ in range(n):
            if (elapsed := await client.first_event()) is not None:
                samples.append(elapsed)
    return samples


async def grants_per_core(gw: Gateway, algorithm: str, n: int, concurrency: int = 8) -> tuple[float, float, int]:
    """Pre-minted ID-JAGs redeemed at the token endpoint: grants per gateway CPU-second, per wall second."""
    idp = gw.idps[algorithm]
    assertions = [id_jag(idp, gw.base, f"{gw.base}/json/mcp") for _ in range(n)]
    queue = iter(assertions)
    errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        await grant(http, gw.base, id_jag(idp, gw.base, f"{gw.base}/json/mcp"))  # JWKS fetched

        async def worker() -> None:
            nonlocal errors
            for assertion in queue:
                status, _ = await grant(http, gw.base, assertion)
                errors += status != 200

        assert gw.target.pid is not None
        cpu_before, started = cpu_seconds(gw.target.pid), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu, wall = cpu_seconds(gw.target.pid) - cpu_before, time.perf_counter() - started
    return n / cpu, n / wall, errors


async def idle_upstream_app() -> web.Application:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await response.prepare(request)
        await response.write(b": open\n\n")
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await asyncio.Event().wait()  # idle until the client goes
        return response

    app = web.Application()
    app.router.add_get("/mcp", stream)
    return app


def serve_idle_upstream(port: int) -> None:
    """``--idle-upstream PORT``: a Streamable HTTP server's GET stream and nothing else, held open
    idle. The SDK server is not used here: holding thousands of sessions would measure it, not the hop."""
    web.run_app(idle_upstream_app(), host="127.0.0.1", port=port, print=None, backlog=4096)


async def idle_streams(gw: Gateway, wanted: int) -> tuple[int, float, float]:
    """Open ``wanted`` idle GET event streams through the gateway; (held, RSS MiB before, after)."""
    await gw.refresh_tokens()
    url, headers = gw.idle_url, {"Accept": "text/event-stream", **gw.target.headers["idle"]}
    pid = gw.target.pid
    assert pid is not None
    before = memory_kib(pid, "VmRSS") / 1024
    held: list[aiohttp.ClientResponse] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as http:

        async def open_one() -> None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with asyncio.timeout(WAIT):
                    response = await http.get(url, headers=headers)
                if response.status == 200:
                    held.append(response)
                else:
                    response.release()

        while len(held) < wanted:
            size = min(IDLE_BATCH, wanted - len(held))
            count = len(held)
            await asyncio.gather(*(open_one() for _ in range(size)))
            if len(held) == count:
                print(f"idle streams: stuck at {count}", file=sys.stderr)
                break
        await asyncio.sleep(1.0)  # let the gateway settle: not a synchronisation, a measurement delay
        after = memory_kib(pid, "VmRSS") / 1024
        for response in held:
            response.close()
    return len(held), before, after


# --------------------------------------------------------------------------------------- reporting


def ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base else "-"


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    nginx_version = "absent"
    if binary := shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None):
        nginx_version = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr.strip()
    return (
        f"{os.cpu_count()} CPUs ({model}), {platform.platform()}, Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}, {nginx_version}"
    )


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# -------------------------------------------------------------------------------------------- main


async def main(args: argparse.Namespace) -> None:
    hard = raise_fd_limit()
    out: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        out.append(line)

    emit(f"command: `{' '.join(['python -m bench.compare', *sys.argv[1:]])}`")
    emit(f"machine: {machine()}; load average at start {load_average()}")
    micro = await bench_policy(20_000)
    tokens = AccessTokenService(SigningKey.generate(), "https://gw.example", 3600)
    route = RouteConfig("b", "/b", "http://127.0.0.1:9/mcp", "https://gw.example/b")
    grant_ = Grant("alice", "https://idp.example", CLIENT_ID, route, ("mcp",), ("support",), "bench")
    uncached_us, cached_us = token_validation_us(tokens, route, grant_, 2000)

    work = Path(tempfile.mkdtemp(prefix="mcp-gateway-compare-"))
    idps = {"ES256": DevIdentityProvider(algorithm="ES256"), "RS256": DevIdentityProvider(algorithm="RS256")}
    for idp in idps.values():
        await idp.start()
    with contextlib.ExitStack() as stack:
        upstreams = {
            "json": stack.enter_context(start_upstream("streamable-json")),
            "sse": stack.enter_context(start_upstream("streamable-sse")),
        }
        idle_log, idle_port = work / "idle-upstream.log", free_port()
        argv = [sys.executable, "-m", "bench.compare", "--idle-upstream", str(idle_port)]
        idle = stack.enter_context(process(argv, idle_log, cwd=REPO))
        idle_url = f"http://127.0.0.1:{idle_port}/mcp"
        await wait_http(idle_url, idle, idle_log, lambda status: status == 200)
        urls = {"json": upstreams["json"].mcp_url, "sse": upstreams["sse"].mcp_url, "idle": idle_url}
        async with contextlib.AsyncExitStack() as astack:
            direct = Target("direct", {"json": urls["json"], "sse": urls["sse"]})
            proxy_nginx = await astack.enter_async_context(nginx(work, upstreams))
            gw = await astack.enter_async_context(gateway(work, idps, urls))
            # With the uvloop extra installed, the same gateway on asyncio's loop too: the A/B of the extra.
            on_asyncio = None
            if importlib.util.find_spec("uvloop") is not None:
                on_asyncio = await astack.enter_async_context(gateway(work, idps, urls, "gateway-asyncio", "asyncio"))
            proxy_fastmcp = (
                None
                if args.no_fastmcp
                else await astack.enter_async_context(fastmcp(work, idps["ES256"], urls["json"]))
            )
            gateways = [g for g in (gw, on_asyncio) if g is not None]
            targets = [t for t in (direct, proxy_nginx, *(g.target for g in gateways), proxy_fastmcp) if t is not None]
            await measure(args, targets, gateways, emit)
            emit()
            emit("| in-process (one core) | figure |")
            emit("|---|---|")
            emit(f"| bearer validation, warm cache | {cached_us:.1f} µs |")
            emit(f"| bearer validation, first sight (ES256 signature) | {uncached_us:.1f} µs |")
            emit(f"| tools/call plan (strict parse, decide, re-serialise) | {micro['plan_us']:.1f} µs |")
            emit(f"| one CEL condition (`{BENCH_CONDITION}`) | {micro['condition_us']:.1f} µs |")
            emit()
            wanted = min(args.streams, (hard - 512) // 2)
            if wanted < args.streams:
                emit(f"(idle streams: {wanted}, not {args.streams}: two fds per stream, fd hard limit {hard})")
            held, before, after = await idle_streams(gw, wanted)
            per = (after - before) * 1024 / held if held else 0.0
            emit(
                f"idle SSE streams held by the gateway: {held}; RSS {before:.0f} MiB -> {after:.0f} MiB "
                f"({per:.1f} KiB per stream)"
            )
            emit(f"load average at end {load_average()}")
    for idp in idps.values():
        await idp.stop()
    if args.output:
        Path(args.output).write_text("\n".join(out) + "\n")


async def measure(
    args: argparse.Namespace, targets: list[Target], gateways: list[Gateway], emit: Callable[[str], None]
) -> None:
    gw = gateways[0]
    names = [t.name for t in targets]
    lat: dict[tuple[str, str], list[float]] = {}
    errors: dict[str, int] = dict.fromkeys(names, 0)
    first: dict[str, list[float]] = {}
    loads: dict[tuple[str, int], list[Load]] = {}
    for round_ in range(args.rounds):
        for each in gateways:
            await each.refresh_tokens()
        for target in targets:
            for mode in target.urls:
                samples, failed = await latencies(target, mode, args.requests)
                lat.setdefault((target.name, mode), []).extend(samples)
                errors[target.name] += failed
            if "sse" in target.urls:
                first.setdefault(target.name, []).extend(await first_events(target, args.requests // 2))
            for count in CLIENT_COUNTS:
                load = await run_load(target, "json", count, args.seconds)
                loads.setdefault((target.name, count), []).append(load)
                errors[target.name] += load.errors
        print(f"round {round_ + 1}/{args.rounds} done; load average {load_average()}", file=sys.stderr)

    def p50(name: str, mode: str) -> float | None:
        samples = lat.get((name, mode))
        return pct(samples, 0.5) if samples else None

    emit()
    emit(f"### tools/call latency, one client ({args.rounds} rounds x {args.requests} calls, interleaved)")
    emit()
    emit("| path | mode | p50 ms | p90 ms | p99 ms | p50 vs direct | p50 vs nginx |")
    emit("|---|---|---|---|---|---|---|")
    for name in names:
        for mode in ("json", "sse"):
            samples = lat.get((name, mode))
            if not samples:
                continue
            ms = [s * 1000 for s in samples]
            emit(
                f"| {name} | {mode} | {pct(ms, 0.5):.3f} | {pct(ms, 0.9):.3f} | {pct(ms, 0.99):.3f} | "
                f"{ratio(pct(ms, 0.5), _ms(p50('direct', mode)))} | {ratio(pct(ms, 0.5), _ms(p50('nginx', mode)))} |"
            )
    emit()
    emit(f"### throughput, JSON mode, calls/s (median of {args.rounds} runs of {args.seconds:g} s)")
    emit()
    emit("| path | clients | calls/s | vs direct | vs nginx | errors | hop CPU-s per 10k | hop peak RSS MiB |")
    emit("|---|---|---|---|---|---|---|---|")
    rate = {key: statistics.median(load.ok / load.seconds for load in runs) for key, runs in loads.items()}
    for name, target in zip(names, targets, strict=True):
        for count in CLIENT_COUNTS:
            runs = loads[(name, count)]
            ok = sum(r.ok for r in runs)
            cpu = f"{sum(r.cpu for r in runs) / ok * 10_000:.2f}" if target.pid and ok else "-"
            rss = f"{memory_kib(target.pid, 'VmHWM') / 1024:.0f}" if target.pid else "-"
            mine = rate[(name, count)]
            emit(
                f"| {name} | {count} | {mine:.0f} | {ratio(mine, rate.get(('direct', count)))} | "
                f"{ratio(mine, rate.get(('nginx', count)))} | {sum(r.errors for r in runs)} | {cpu} | {rss} |"
            )
    emit()
    if ("fastmcp", 16) in rate:
        emit(f"gateway / fastmcp throughput at 16 clients: {ratio(rate[('gateway', 16)], rate[('fastmcp', 16)])}")
    emit(f"errors over everything above: {errors}")
    emit()
    emit("### time to first SSE event (tools/call answered with an SSE stream)")
    emit()
    emit("| path | p50 ms | p90 ms | p50 minus direct ms |")
    emit("|---|---|---|---|")
    base = pct(first["direct"], 0.5) if first.get("direct") else None
    for name, samples in first.items():
        if samples:
            delta = f"{(pct(samples, 0.5) - base) * 1000:+.3f}" if base is not None else "-"
            emit(f"| {name} | {pct(samples, 0.5) * 1000:.3f} | {pct(samples, 0.9) * 1000:.3f} | {delta} |")
    emit()
    emit("### grants (pre-minted ID-JAGs, 8 concurrent requests)")
    emit()
    emit("| ID-JAG | grants per gateway CPU-second | grants/s wall | errors |")
    emit("|---|---|---|---|")
    await gw.refresh_tokens()
    for algorithm in ("ES256", "RS256"):
        per_core, per_second, failed = await grants_per_core(gw, algorithm, args.grants)
        emit(f"| {algorithm} | {per_core:.0f} | {per_second:.0f} | {failed} |")


def _ms(seconds: float | None) -> float | None:
    return seconds * 1000 if seconds is not None else None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one throughput run (default 4)")
    parser.add_argument("--requests", type=int, default=300, help="one-client calls per round and mode (300)")
    parser.add_argument("--grants", type=int, default=2000, help="ID-JAGs redeemed per algorithm (2000)")
    parser.add_argument("--streams", type=int, default=10_000, help="idle SSE streams to hold (10000)")
    parser.add_argument("--no-fastmcp", action="store_true", help="leave the FastMCP proxy out")
    parser.add_argument("--output", default=None, help="also write the Markdown results to this file")
    parser.add_argument("--idle-upstream", type=int, default=None, help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.idle_upstream is not None:
        serve_idle_upstream(parsed.idle_upstream)
    else:
        asyncio.run(main(parsed))
