"""Throughput of ``serve --workers 1`` vs ``--workers 2`` (not a test: numbers, not assertions).

    python bench/workers.py [--rounds 3] [--seconds 6] [--connections 16] [--workers 0,1,2]

Starts on 127.0.0.1: the demo upstream (aiohttp, answers ``application/json``) in its own process, the
development IdP, a ``redis-server`` (the replay store every multi-worker config needs), and for each
configuration a ``mcp-gateway serve --workers N`` process (N = 0: the clients call the upstream
directly). Load comes from two client processes, each holding half of ``--connections`` keep-alive
connections (one MCP session each) and calling the ``echo`` tool back to back for ``--seconds``.
Configurations are interleaved over ``--rounds`` so a change in the machine's background load hits all
of them alike. Reported per run: calls/s, errors, the CPU seconds the gateway's processes (supervisor
and workers) used per 10k calls and their memory (PSS) at the end, read from /proc.

Everything shares the machine: on a 2-core box the upstream and the load generators compete with the
workers for the same cores, so the figures bound what a second worker can add here from below.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import yaml

from gateway.demo_upstream import start_demo_upstream
from gateway.devidp import DevIdentityProvider

REPO = Path(__file__).resolve().parent.parent
CLIENT_ID = "bench-agent"
CLIENT_SECRET = "bench-agent-secret-0123456789"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ACCEPT = "application/json, text/event-stream"
PROTOCOL = "2025-11-25"
START_SECONDS = 20.0
TICKS = os.sysconf("SC_CLK_TCK")


def free_port(count: int = 1) -> int:
    """The first of ``count`` consecutive loopback ports nothing listens on (one metrics port per worker)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            first = int(sock.getsockname()[1])
        probes = [socket.socket() for _ in range(count)]
        try:
            for port, probe in zip(range(first, first + count), probes, strict=True):
                probe.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise SystemExit(f"no {count} consecutive free ports on 127.0.0.1")


# -- load generator (a child process) --------------------------------------------------------------


async def _client(url: str, token: str, until: float) -> tuple[int, int]:
    headers = {"Authorization": f"Bearer {token}", "Accept": ACCEPT}
    calls = errors = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": PROTOCOL,
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "1"},
            },
        }
        async with http.post(url, json=init, headers=headers) as response:
            headers = {
                **headers,
                "Mcp-Session-Id": response.headers["Mcp-Session-Id"],
                "MCP-Protocol-Version": PROTOCOL,
            }
            await response.read()
        async with http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers) as r:
            await r.read()
        while time.monotonic() < until:
            call = {"jsonrpc": "2.0", "id": calls + 1, "method": "tools/call"}
            call["params"] = {"name": "echo", "arguments": {"text": "hello"}}
            async with http.post(url, json=call, headers=headers) as response:
                body = await response.read()
                if response.status == 200 and b'"result"' in body:
                    calls += 1
                else:
                    errors += 1
    return calls, errors


async def _load(url: str, tokens: list[str], seconds: float) -> None:
    until = time.monotonic() + seconds
    results = await asyncio.gather(*(_client(url, token, until) for token in tokens))
    print(json.dumps({"calls": sum(c for c, _ in results), "errors": sum(e for _, e in results)}), flush=True)


# -- the runs ---------------------------------------------------------------------------------------


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14 and 15)
    return total / TICKS


def _pss_mb(pids: list[int]) -> float:
    """Proportional set size: memory the forked workers still share with the supervisor (copy-on-write)
    counts once in the sum, not once per process as RSS would."""
    total_kb = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total_kb += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
    return total_kb / 1024


def _family(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [pid, *(int(c) for c in children.read_text().split())] if children.exists() else [pid]


async def _grant(http: aiohttp.ClientSession, base: str, idp: DevIdentityProvider, public_url: str) -> str:
    now = int(time.time())
    claims = {
        "iss": idp.issuer,
        "sub": "alice",
        "aud": public_url,
        "client_id": CLIENT_ID,
        "jti": uuid.uuid4().hex,
        "iat": now,
        "exp": now + 300,
        "scope": "mcp",
        "resource": f"{public_url}/echo/mcp",
    }
    form = {"grant_type": JWT_BEARER, "assertion": idp.sign(claims), "client_id": CLIENT_ID}
    form["client_secret"] = CLIENT_SECRET
    async with http.post(base + "/oauth2/token", data=form) as response:
        body = await response.json()
        assert response.status == 200, body
        return str(body["access_token"])


async def _direct(upstream_url: str, args: argparse.Namespace) -> dict[str, float]:
    """The same load straight to the upstream (no gateway): the ceiling the upstream and clients allow."""
    half = args.connections // 2
    tokens = ["unused"] * args.connections
    loads = [await _start_load(upstream_url, part, args.seconds) for part in (tokens[:half], tokens[half:])]
    outputs = [json.loads((await load.communicate())[0]) for load in loads]
    calls = sum(o["calls"] for o in outputs)
    return {
        "calls_per_s": calls / args.seconds,
        "errors": sum(o["errors"] for o in outputs),
        "cpu_per_10k": 0.0,
        "pss_mb": 0.0,
    }


async def _run(workers: int, config: Path, args: argparse.Namespace, idp: DevIdentityProvider) -> dict[str, float]:
    document = yaml.safe_load(await asyncio.to_thread(config.read_text))
    base = "http://" + document["listen"]
    log_path = config.with_suffix(f".{workers}.log")
    with log_path.open("w") as log:
        gateway = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", str(workers),
            cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + START_SECONDS
            while True:
                try:
                    async with http.get(base + "/readyz") as response:
                        if response.status == 200 and _listening(config, workers):
                            break
                except aiohttp.ClientConnectionError:
                    pass
                if time.monotonic() > deadline or gateway.returncode is not None:
                    raise SystemExit(f"gateway --workers {workers} did not start:\n{log_path.read_text()}")
                await asyncio.sleep(0.05)
            tokens = [await _grant(http, base, idp, document["public_url"]) for _ in range(args.connections)]
        family = _family(gateway.pid)
        cpu_before = _cpu_seconds(family)
        half = args.connections // 2
        loads = [await _start_load(base + "/echo/mcp", part, args.seconds) for part in (tokens[:half], tokens[half:])]
        outputs = [json.loads((await load.communicate())[0]) for load in loads]
        cpu = _cpu_seconds(family) - cpu_before
        pss = _pss_mb(family)
    finally:
        gateway.terminate()
        await asyncio.wait_for(gateway.wait(), 30)
    calls = sum(o["calls"] for o in outputs)
    return {
        "calls_per_s": calls / args.seconds,
        "errors": sum(o["errors"] for o in outputs),
        "cpu_per_10k": cpu * 10_000 / max(calls, 1),
        "pss_mb": pss,
    }


async def _start_load(url: str, tokens: list[str], seconds: float) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "load",
        url,
        json.dumps(tokens),
        str(seconds),
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )


def _listening(config: Path, workers: int) -> bool:
    if workers == 1:
        return True
    text = config.with_suffix(f".{workers}.log").read_text()
    return all(f"worker {i} gateway: listening on" in text for i in range(workers))


async def main(args: argparse.Namespace) -> None:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is needed (apt-get install redis-server)")
    counts = [int(n) for n in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        redis_port = free_port()
        redis = await asyncio.create_subprocess_exec(
            redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            stdout=asyncio.subprocess.DEVNULL, cwd=tmp,
        )  # fmt: skip
        upstream = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "upstream", stdout=asyncio.subprocess.PIPE, cwd=REPO
        )
        idp = DevIdentityProvider()
        await idp.start()
        try:
            assert upstream.stdout is not None
            upstream_url = (await asyncio.wait_for(upstream.stdout.readline(), START_SECONDS)).decode().strip()
            port = free_port()
            config = Path(tmp) / "gateway.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "listen": f"127.0.0.1:{port}",
                        "public_url": f"http://127.0.0.1:{port}",
                        "metrics_listen": f"127.0.0.1:{free_port(max(counts))}",
                        "replay_store": f"redis://127.0.0.1:{redis_port}/0",
                        "authorization": {
                            "clients": [{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}],
                            "identity_providers": [{"issuer": idp.issuer}],
                            "token_rate_limit": {"requests_per_minute": 0},
                        },
                        "routes": [{"name": "echo", "path": "/echo/mcp", "upstream": upstream_url}],
                        "reload": {"watch_interval_seconds": 0},
                    }
                )
            )
            results: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
            for round_number in range(args.rounds):
                for workers in counts:
                    load = os.getloadavg()[0]
                    if workers == 0:
                        result = await _direct(upstream_url, args)
                    else:
                        result = await _run(workers, config, args, idp)
                    results[workers].append(result)
                    print(
                        f"round {round_number + 1} workers={workers}: {result['calls_per_s']:7.0f} calls/s  "
                        f"errors={result['errors']:.0f}  gateway CPU {result['cpu_per_10k']:5.2f} s/10k calls  "
                        f"memory (PSS) {result['pss_mb']:5.1f} MB  "
                        f"(load average before: {load:.1f})",
                        flush=True,
                    )
            setup = f"{args.connections} connections, {args.seconds}s each, {os.cpu_count()} CPUs"
            print(f"\nmedian of {args.rounds} runs, {setup}:")
            direct = statistics.median(r["calls_per_s"] for r in results[0]) if 0 in results else None
            for workers in counts:
                runs = results[workers]
                rate = statistics.median(r["calls_per_s"] for r in runs)
                line = f"  workers={workers}: {rate:7.0f} calls/s"
                if direct and workers:
                    line += f" ({rate / direct:.2f}x direct)"
                if workers > 1 and 1 in results:
                    # Each round's ratio to the one-worker run next to it: robust to drifting background load.
                    pairs = zip(runs, results[1], strict=True)
                    ratio = statistics.median(r["calls_per_s"] / o["calls_per_s"] for r, o in pairs)
                    line += f" ({ratio:.2f}x one worker, median of the rounds' ratios)"
                if workers:
                    cpu = statistics.median(r["cpu_per_10k"] for r in runs)
                    pss = statistics.median(r["pss_mb"] for r in runs)
                    line += f"; gateway CPU {cpu:5.2f} s/10k calls; memory (PSS) {pss:5.1f} MB"
                print(line)
        finally:
            await idp.stop()
            upstream.terminate()
            await upstream.wait()
            redis.terminate()
            await redis.wait()


async def _upstream() -> None:
    runner, url = await start_demo_upstream("127.0.0.1", 0)
    print(url, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    if sys.argv[1:2] == ["upstream"]:
        try:
            asyncio.run(_upstream())
        except KeyboardInterrupt:
            pass
        sys.exit(0)
    if sys.argv[1:2] == ["load"]:
        asyncio.run(_load(sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts to compare (0: direct)")
    asyncio.run(main(parser.parse_args()))
