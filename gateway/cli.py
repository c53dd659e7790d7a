"""The ``mcp-gateway`` command: serve | check | pin | demo | dev-idp.

User errors (bad config, unusable key, busy port) end with one line on stderr and a non-zero exit
status; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__, event_loop, logs
from gateway.condition_health import find_problems, has_conditions, needs_prompts
from gateway.config import ConfigError, GatewayConfig, RouteConfig, describe, load_config
from gateway.mcp_methods import KINDS
from gateway.oauth.keys import SigningKey, SigningKeyError, load_signing_key
from gateway.tool_pins import definition_hash, write_pins
from gateway.upstream_catalog import Catalog, CatalogError, fetch_catalog
from gateway.workers import Worker, bind_shared, supervise, workers_argument

log = logging.getLogger("gateway")
# Lines a person or a supervisor waits for (the dev IdP's address, the demo's steps) must not sit in
# a block buffer when stdout is a pipe or a file.
_say = functools.partial(print, flush=True)
# ``check --explain``: the user a call is decided for unless --as-user names one.
EXPLAIN_USER = "explain-user"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-gateway", description="Enterprise-managed (ID-JAG) authorization gateway for MCP servers."
    )
    parser.add_argument("--version", action="version", version=f"mcp-gateway {__version__}")
    parser.add_argument("--log-level", default=None, choices=logs.LEVELS, help="default info (demo: warning)")
    # Also accepted after the command (`serve --config F --log-level debug`), where container args and
    # the Helm chart's extraArgs put it; SUPPRESS keeps an absent one from overriding one given before.
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--log-level", default=argparse.SUPPRESS, choices=logs.LEVELS, help="default info")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_command(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, parents=[after])

    serve = add_command("serve", "run the gateway")
    serve.add_argument("--config", required=True, help="path to the YAML config")
    serve.add_argument(
        "--workers",
        type=workers_argument,
        default=1,
        metavar="N",
        help="processes sharing the port (default 1; auto: the CPUs available); N > 1 needs a Redis "
        "replay_store and metrics_listen",
    )

    check = add_command("check", "validate a config and print the effective route table")
    check.add_argument("--config", required=True, help="path to the YAML config")
    check.add_argument(
        "--as-groups", default=None, metavar="G1,G2", help="also show what a user in these IdP groups may see"
    )
    check.add_argument(
        "--upstreams",
        action="store_true",
        help="also connect to each route's upstream and type-check conditions against its tools and prompts",
    )
    check.add_argument(
        "--explain", default=None, metavar="NAME", help="decide one call of this tool on --route, showing every step"
    )
    check.add_argument("arguments", nargs="?", default=None, help="with --explain: the arguments, a JSON object")
    check.add_argument("--route", default=None, metavar="NAME", help="with --explain: the route")
    check.add_argument(
        "--kind", default="tools", choices=KINDS, help="with --explain: what NAME is (default tools; resources: a URI)"
    )
    check.add_argument("--as-user", default=EXPLAIN_USER, metavar="SUB", help=f"with --explain: sub ({EXPLAIN_USER})")
    check.add_argument("--as-client", default=None, metavar="ID", help="with --explain: client_id (the first client)")

    pin = add_command("pin", "write a route's tool_pins lock file from its upstream's tools/list")
    pin.add_argument("--config", required=True, help="path to the YAML config")
    pin.add_argument("--route", required=True, metavar="NAME", help="the route whose upstream's tools are pinned")

    demo = add_command("demo", "run upstream + development IdP + gateway and the whole flow")
    demo.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8080, help="gateway port (default 8080; 0 = any free port)")
    demo.add_argument("--once", action="store_true", help="exit after the flow instead of serving")

    idp = add_command("dev-idp", "run the development IdP alone (NOT for production)")
    idp.add_argument("--host", default="127.0.0.1")
    idp.add_argument("--port", type=int, default=9000)
    idp.add_argument("--issuer", default=None, help="issuer URL (default http://HOST:PORT)")
    idp.add_argument("--algorithm", default="ES256", choices=["ES256", "RS256"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = args.log_level or ("warning" if args.command == "demo" else "info")
    logs.configure(level)
    try:
        if args.command == "check" and (args.explain, args.route, args.arguments) != (None, None, None):
            return _explain(args)
        if args.command == "check":
            return _check(args.config, args.as_groups, upstreams=args.upstreams)
        if args.command == "pin":
            return asyncio.run(_pin(args.config, args.route))
        if args.command == "serve" and args.workers > 1:
            return supervise(args.config, level, args.workers, _signing_key, _serve_worker)
        if args.command == "serve":
            event_loop.use_fastest()
            return asyncio.run(_serve(args.config, level))
        if args.command == "demo":
            return asyncio.run(_demo(args.host, args.port, args.once))
        return asyncio.run(_dev_idp(args.host, args.port, args.issuer, args.algorithm))
    except ConfigError as exc:
        print(f"mcp-gateway: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _check(path: str, as_groups: str | None = None, *, upstreams: bool = False) -> int:
    config = _load_checked(path)
    describe(config, emit=print, as_groups=_groups(as_groups))
    if upstreams:
        return asyncio.run(_check_upstreams(config))
    return 0


def _explain(args: argparse.Namespace) -> int:
    """``check --explain NAME --route R [ARGUMENTS]``: one call decided as the gateway would, step by step."""
    from gateway.explain import ExplainError, Question, explain  # the engine: not needed by a plain check

    try:
        if args.explain is None:
            raise ExplainError("--route and ARGUMENTS are only used with --explain NAME")
        if args.route is None:
            raise ExplainError("--explain needs --route NAME")
        config = _load_checked(args.config)
        groups = _groups(args.as_groups) or frozenset()
        question = Question(args.route, args.explain, args.arguments, groups, args.kind, args.as_user, args.as_client)
        lines = explain(config, question)
    except ExplainError as exc:
        print(f"mcp-gateway: {exc}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    return 0


def _load_checked(path: str) -> GatewayConfig:
    config = load_config(path)
    if config.authorization.signing_key_file:
        # Load it as serve would: a file that exists but is not a usable key must fail check too.
        _signing_key(config)
    return config


def _groups(as_groups: str | None) -> frozenset[str] | None:
    return None if as_groups is None else frozenset(g.strip() for g in as_groups.split(",") if g.strip())


async def _check_upstreams(config: GatewayConfig) -> int:
    """``check --upstreams``: list every route's upstream (in parallel) and type-check its conditions.

    A summary per route goes to stdout; each problem is one stderr line ``file: key.path: tool 'x':
    problem`` (an unreachable upstream: ``file: routes[N].upstream: ...``); any problem exits 2."""

    async def fetch(route: RouteConfig) -> Catalog | CatalogError:
        try:
            return await fetch_catalog(route, config.limits, prompts=needs_prompts(route))
        except CatalogError as exc:
            return exc

    results = await asyncio.gather(*(fetch(route) for route in config.routes))
    failed = False
    print("upstreams:", flush=True)
    for index, (route, catalog) in enumerate(zip(config.routes, results, strict=True)):
        if isinstance(catalog, CatalogError):
            failed = True
            print(f"  {route.name}: unreachable", flush=True)
            print(
                f"mcp-gateway: {config.source}: routes[{index}].upstream: cannot list the tools of route "
                f"'{route.name}' ({route.upstream}): {catalog}",
                file=sys.stderr,
            )
            continue
        problems = find_problems(route, index, catalog)
        listed = f"{len(catalog.tools)} tools" + (f", {len(catalog.prompts)} prompts" if needs_prompts(route) else "")
        if not has_conditions(route):
            verdict = "no conditions"
        else:
            errors = sum(len(problem.problems) for problem in problems)
            verdict = f"conditions: {errors} type error{'s' * (errors != 1)}" if errors else "conditions type-check"
        pin_problems = _pin_problems(route, index, catalog)
        if route.tool_pins is not None:
            count = len(pin_problems)
            verdict += f"; pins: {count} problem{'s' * (count != 1)}" if count else "; pins match"
        print(f"  {route.name}: {listed}; {verdict}", flush=True)
        for problem in problems:
            failed = True
            for line in problem.lines():
                print(f"mcp-gateway: {config.source}: {line}", file=sys.stderr)
        for line in pin_problems:
            failed = True
            print(f"mcp-gateway: {config.source}: {line}", file=sys.stderr)
    return 2 if failed else 0


async def _pin(path: str, name: str) -> int:
    """``pin --route NAME``: list the route's upstream tools (every page) and write ``tool_pins``."""
    config = load_config(path, read_tool_pins=False)  # the lock file may not exist yet: pin writes it
    index = next((i for i, route in enumerate(config.routes) if route.name == name), None)
    if index is None:
        names = ", ".join(route.name for route in config.routes)
        print(f"mcp-gateway: {config.source}: --route: no route named {name!r} (routes: {names})", file=sys.stderr)
        return 2
    route = config.routes[index]
    if route.tool_pins is None:
        print(
            f"mcp-gateway: {config.source}: routes[{index}].tool_pins: is not set (add the lock file's path, "
            f"e.g. pins/{name}.json)",
            file=sys.stderr,
        )
        return 2
    try:
        catalog = await fetch_catalog(route, config.limits, prompts=False)
    except CatalogError as exc:
        print(
            f"mcp-gateway: {config.source}: routes[{index}].upstream: cannot list the tools of route "
            f"'{name}' ({route.upstream}): {exc}",
            file=sys.stderr,
        )
        return 2
    try:
        pinned = write_pins(Path(route.tool_pins.path), name, route.upstream, list(catalog.definitions))
    except OSError as exc:
        print(f"mcp-gateway: cannot write {route.tool_pins.path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    _say(f"pinned {len(pinned)} tools of route '{name}' to {route.tool_pins.path}")
    return 0


def _pin_problems(route: RouteConfig, index: int, catalog: Catalog) -> list[str]:
    """``check --upstreams``: pinned tools the upstream no longer lists, or lists changed."""
    if route.tool_pins is None:
        return []
    listed = {tool["name"]: definition_hash(tool) for tool in catalog.definitions}
    problems = []
    for tool, digest in sorted(route.tool_pins.tools.items()):
        if tool not in listed:
            problems.append(f"routes[{index}].tool_pins: tool '{tool}' is pinned but the upstream no longer has it")
        elif listed[tool] != digest:
            problems.append(f"routes[{index}].tool_pins: tool '{tool}' changed since it was pinned")
    return problems


def _signing_key(config: GatewayConfig) -> SigningKey:
    """The configured (or ephemeral) signing key; an unusable file is reported like any config error."""
    try:
        return load_signing_key(config.authorization.signing_key_file)
    except SigningKeyError as exc:
        raise ConfigError(config.source, "authorization.signing_key_file", str(exc)) from None


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _serve_worker(worker: Worker) -> int:
    """One of ``serve --workers N``'s processes (gateway/workers.py forks it with the supervisor's key)."""
    return await _serve(worker.config_path, worker.log_level, worker)


async def _serve(path: str, log_level: str, worker: Worker | None = None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the config (as does a change of the file).

    Shutdown is graceful: readiness turns 503 and live SSE streams are ended cleanly at once (clients
    reconnect to another replica), then in-flight requests get up to ``shutdown_grace_seconds`` to
    finish before the process exits 0. The Helm chart's terminationGracePeriodSeconds covers it.
    """
    from gateway.app import Gateway, start_gateway

    config = load_config(path) if worker is None else worker.load(path)
    logs.configure(log_level, config.logging_format, None if worker is None else worker.index)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if worker is None:
        gateway = Gateway(config, signing_key=_signing_key(config), config_path=path)
    else:
        gateway = Gateway(
            config,
            signing_key=worker.signing_key,
            config_path=path,
            metrics_port_offset=worker.index,
            config_check=worker.check,
        )
    try:
        sock = None if worker is None else bind_shared(config.listen_host, config.listen_port)
        runner, url = await start_gateway(gateway, sock=sock, shutdown_timeout=config.shutdown_grace_seconds)
    except OSError as exc:
        print(
            f"mcp-gateway: cannot listen on {config.listen_host}:{config.listen_port}: {exc.strerror}", file=sys.stderr
        )
        return 1
    reloads: set[asyncio.Task[bool]] = set()

    def reload() -> None:
        task = loop.create_task(gateway.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    log.info("listening on %s; public URL %s; %d routes", url, config.public_url, len(config.routes))
    try:
        await stop.wait()
    finally:
        ended = gateway.drain()
        log.info(
            "shutting down: ended %d streams, waiting up to %ss for requests",
            ended,
            gateway.config.shutdown_grace_seconds,
        )
        await runner.cleanup()
    log.info("stopped")
    return 0


async def _demo(host: str, port: int, once: bool) -> int:
    from gateway.demo import DemoFailed, run_demo

    try:
        await run_demo(host, port, once=once, emit=_say)
    except DemoFailed as exc:
        print(f"mcp-gateway demo: {exc}", file=sys.stderr)
        return 1
    return 0


async def _dev_idp(host: str, port: int, issuer: str | None, algorithm: str) -> int:
    from gateway.devidp import DevIdentityProvider

    idp = DevIdentityProvider(issuer=issuer, algorithm=algorithm)
    try:
        url = await idp.start(host, port)
    except OSError as exc:
        print(f"mcp-gateway: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    _say(f"development IdP (NOT FOR PRODUCTION) at {url}; users alice, bob, carol; client demo-agent")
    try:
        await _wait_for_signal()
    finally:
        await idp.stop()
    return 0
