"""The gateway at several commits, side by side: what a change was worth (docs/benchmarks.md, "Results").

    python -m bench.ab [--rounds 3] [--seconds 4] [--requests 400] REV [REV ...]

from the repository root, in the environment of ``pip install -e '.[test]'``. Each REV (a commit, a
branch, ``HEAD``; ``.`` for the working tree as it is) is checked out into a temporary git worktree and
served from there by ``bench.compare``'s ``gateway`` (the same config: bearer validation, 21 routes,
a CEL condition, audit to a file), in front of the same upstream (the official Python SDK server, JSON
answers). Every round serves each revision in turn, after a direct run: 16 clients calling back to
back for ``--seconds`` (calls per second, and the gateway's CPU per call from /proc), then
``--requests`` one-client calls (p50 latency, and CPU per call). Figures are medians over the rounds;
ratios are to the direct runs of the same rounds. All revisions run with the current environment's
packages: a revision needing a package this checkout does not is not comparable this way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.compare import REPO, Target, cpu_seconds, gateway, latencies, load_average, machine, pct, run_load
from gateway.devidp import DevIdentityProvider
from tests.support.upstreams import start_upstream

CLIENTS = 16


@contextlib.contextmanager
def checkouts(revisions: list[str], into: Path) -> Iterator[dict[str, Path]]:
    """A detached worktree per revision (``.``: this checkout itself), removed afterwards."""
    git = shutil.which("git")
    if git is None:
        raise SystemExit("bench.ab needs git (it checks each revision out into a worktree)")
    made: list[Path] = []
    paths: dict[str, Path] = {}
    try:
        for index, revision in enumerate(revisions):
            if revision == ".":
                paths[revision] = REPO
                continue
            path = into / f"rev-{index}"
            subprocess.run(
                [git, "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(path), revision], check=True
            )
            made.append(path)
            paths[revision] = path
        yield paths
    finally:
        for path in made:
            subprocess.run([git, "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)


async def main(args: argparse.Namespace) -> None:
    print(f"command: `python -m bench.ab {' '.join(sys.argv[1:])}`")
    print(f"machine: {machine()}; load average at start {load_average()}")
    work = Path(tempfile.mkdtemp(prefix="mcp-gateway-ab-"))
    idps = {"ES256": DevIdentityProvider(algorithm="ES256")}
    for idp in idps.values():
        await idp.start()
    figures: dict[str, dict[str, list[float]]] = {}
    try:
        with checkouts(args.revisions, work) as paths, start_upstream("streamable-json") as upstream:
            urls = {"json": upstream.mcp_url, "sse": upstream.mcp_url, "idle": upstream.mcp_url}
            direct = Target("direct", {"json": upstream.mcp_url})
            for round_ in range(args.rounds):
                await measure("direct", direct, args, figures)
                for index, revision in enumerate(args.revisions):
                    async with gateway(work, idps, urls, name=f"rev-{index}", source=paths[revision]) as gw:
                        await measure(revision, gw.target, args, figures)
                print(f"round {round_ + 1}/{args.rounds} done; load average {load_average()}", file=sys.stderr)
    finally:
        for idp in idps.values():
            await idp.stop()
    base = {key: statistics.median(values) for key, values in figures["direct"].items()}
    print()
    print(f"| gateway at | calls/s, {CLIENTS} clients, vs direct | CPU per call, {CLIENTS} clients | "
          "p50 one client vs direct | CPU per call, one client |")  # fmt: skip
    print("|---|---|---|---|---|")
    for revision in args.revisions:
        mine = {key: statistics.median(values) for key, values in figures[revision].items()}
        print(
            f"| {revision} | {mine['rate'] / base['rate']:.2f} x | {mine['cpu_many']:.0f} µs | "
            f"{mine['p50'] / base['p50']:.2f} x | {mine['cpu_one']:.0f} µs |"
        )
    print(f"\ndirect: {base['rate']:.0f} calls/s with {CLIENTS} clients, p50 {base['p50'] * 1000:.3f} ms")
    print(f"load average at end {load_average()}")


async def measure(
    name: str, target: Target, args: argparse.Namespace, figures: dict[str, dict[str, list[float]]]
) -> None:
    load = await run_load(target, "json", CLIENTS, args.seconds)
    if load.errors:
        raise SystemExit(f"{name}: {load.errors} calls failed")
    before = cpu_seconds(target.pid) if target.pid else 0.0
    samples, errors = await latencies(target, "json", args.requests)
    if errors:
        raise SystemExit(f"{name}: {errors} one-client calls failed")
    # latencies() makes 20 warm-up calls before the timed ones; all of them cost CPU.
    one = ((cpu_seconds(target.pid) - before) / (args.requests + 20)) if target.pid else 0.0
    entry = figures.setdefault(name, {"rate": [], "cpu_many": [], "p50": [], "cpu_one": []})
    entry["rate"].append(load.ok / load.seconds)
    entry["cpu_many"].append(load.cpu / load.ok * 1e6 if target.pid else 0.0)
    entry["p50"].append(pct(samples, 0.5))
    entry["cpu_one"].append(one * 1e6)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revisions", nargs="+", help="commits to compare ('.' for the working tree)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one throughput run (default 4)")
    parser.add_argument("--requests", type=int, default=400, help="one-client calls per round (default 400)")
    asyncio.run(main(parser.parse_args()))
