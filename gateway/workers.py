"""``serve --workers N``: N gateway processes on one port, supervised by the process that started them.

One Python process uses about one core. To use more, N workers each bind their own socket to the same
address with ``SO_REUSEPORT`` (socket(7)): the kernel spreads incoming connections over the listening
sockets by a hash of the connection's addresses, so no process accepts for the others and a dead worker
takes only its own queue with it. The supervisor (this module, synchronous, no event loop) loads and
checks the config, makes the signing key and forks the workers, so they share one key (an ephemeral key
included: a token minted by one worker is valid at the others). It restarts a worker that dies (with a
backoff while it keeps dying early), forwards SIGHUP (reload) and SIGTERM/SIGINT (graceful drain) to
every worker, and exits once all have stopped.

A connection goes to any worker, so nothing a request relies on may live in one worker's memory. The
config is refused (one ``file: key: problem`` line, exit 2) when it would:
- ``replay_store: memory``: each worker would remember only the ID-JAGs it redeemed itself, so one could be
  redeemed once per worker (RFC 7523 §3 / EMA §7.4.2 replay detection), and quotas would count per worker;
- a route with ``transport: sse``: the legacy transport answers a POST on the GET stream another worker
  may hold;
- no ``metrics_listen``: /metrics on the shared port would show the counters of whichever worker took the
  scrape's connection. Worker ``i`` serves its own /metrics on ``metrics_listen``'s port + ``i``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import math
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import logs
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.oauth.keys import SigningKey

log = logging.getLogger("gateway.supervisor")

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
# A worker that ran this long before dying is restarted at once: it crashed, it is not crash-looping.
STABLE_SECONDS = 30.0
# After SIGTERM, workers get shutdown_grace_seconds to drain; those still running this much later are killed.
KILL_MARGIN_SECONDS = 10.0
_POLL_SECONDS = 1.0
_CGROUP = Path("/sys/fs/cgroup")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def workers_argument(text: str) -> int:
    """``--workers``: a positive count, or ``auto`` for the CPUs this process may use."""
    if text == "auto":
        return available_cpus()
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number or 'auto', got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {count}")
    return count


def available_cpus(cgroup: Path = _CGROUP) -> int:
    """The CPUs this process may run on (its affinity mask), capped by a cgroup CPU quota (a container's
    CPU limit, rounded up: 1.5 CPUs of quota are used better by two workers than by one). cgroup v2
    ``cpu.max`` is ``<quota> <period>`` or ``max <period>``; cgroup v1 has ``cpu/cpu.cfs_quota_us`` (-1:
    none) and ``cpu/cpu.cfs_period_us``."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return cpus  # no quota to read: the affinity mask is the limit
    try:
        if quota not in ("max", "-1"):
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (ValueError, ZeroDivisionError):
        pass  # unreadable: the affinity mask is the limit
    return cpus


def check_workers(config: GatewayConfig, count: int) -> None:
    """Refuse a config whose state would differ between ``count`` workers (see the module docstring)."""
    if count < 2:
        return
    source = config.source
    if config.replay_store == "memory":
        raise ConfigError(
            source,
            "replay_store",
            f"'memory' cannot be shared by --workers {count}: an ID-JAG could be redeemed once per worker and "
            "quotas would count per worker; use a Redis URL (redis://, rediss://, unix://)",
        )
    for index, route in enumerate(config.routes):
        if route.transport == "sse":
            raise ConfigError(
                source,
                f"routes[{index}].transport",
                f"'sse' cannot be served by --workers {count}: the legacy transport answers a POST on the "
                "event stream one worker holds; run one worker per pod",
            )
    if config.metrics_listen is None:
        raise ConfigError(
            source,
            "metrics_listen",
            f"is required with --workers {count}: /metrics on the shared port would show one worker's "
            f"counters; worker i serves its own on metrics_listen's port + i (i = 0..{count - 1})",
        )
    host, port = config.metrics_listen
    if host == config.listen_host and port <= config.listen_port < port + count:
        raise ConfigError(
            source, "metrics_listen", f"ports {port}-{port + count - 1} (one per worker) include the listen port"
        )


def restart_delay(early_deaths: int) -> float:
    """None after a worker that ran for a while; then 0.5 s, doubling per early death, at most 30 s."""
    if early_deaths == 0:
        return 0.0
    return min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2 ** (early_deaths - 1))


def bind_shared(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """A listening socket in the ``SO_REUSEPORT`` group of ``host:port`` (one per worker); with
    ``listen=False`` only bound, to test the address without taking a share of its connections.

    Linux only lets sockets of the same effective user join a group, so another user cannot take a
    share of the connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


@dataclass
class Worker:
    """What a forked worker is given: its index, the supervisor's checked config and the shared key."""

    index: int
    count: int
    config_path: str
    log_level: str
    config: GatewayConfig
    signing_key: SigningKey

    def load(self, path: str) -> GatewayConfig:
        """The config file as it is now (another worker may have reloaded it since the supervisor read it),
        or the supervisor's config if the file no longer passes."""
        try:
            config = load_config(path)
            self.check(config)
            return config
        except ConfigError as exc:
            log.error("config file refused, starting with the config the supervisor checked: %s", exc)
            return self.config

    def check(self, config: GatewayConfig) -> None:
        check_workers(config, self.count)


@dataclass
class _Slot:
    """One worker position: its current process and how it has been dying."""

    index: int
    pid: int | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None


class Supervisor:
    def __init__(
        self,
        path: str,
        log_level: str,
        count: int,
        config: GatewayConfig,
        signing_key: SigningKey,
        run_worker: Callable[[Worker], Coroutine[Any, Any, int]],
    ) -> None:
        self.path = path
        self.log_level = log_level
        self.count = count
        self.config = config
        self.signing_key = signing_key
        self.run_worker = run_worker
        self.pid = os.getpid()
        self.slots = [_Slot(i) for i in range(count)]
        self.stopping = False
        self.kill_at = math.inf
        self.failed = False

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # taken with sigtimedwait: no handler races
        for slot in self.slots:
            self._start(slot)
        assert self.config.metrics_listen is not None  # check_workers requires it
        metrics_host, metrics_port = self.config.metrics_listen
        log.info(
            "%d workers on %s:%d (SO_REUSEPORT); their metrics on %s:%d-%d",
            self.count,
            self.config.listen_host,
            self.config.listen_port,
            metrics_host,
            metrics_port,
            metrics_port + self.count - 1,
        )
        while True:
            received = signal.sigtimedwait(SIGNALS, self._timeout())
            if received is not None:
                self._on_signal(received.si_signo)
            self._reap()
            if self.stopping and not self._running():
                log.info("all workers stopped")
                return 1 if self.failed else 0
            now = time.monotonic()
            if self.stopping and now >= self.kill_at:
                self._kill_remaining()
            for slot in self.slots:
                if not self.stopping and slot.restart_at is not None and now >= slot.restart_at:
                    self._start(slot)

    def _timeout(self) -> float:
        due = [slot.restart_at for slot in self.slots if slot.restart_at is not None and not self.stopping]
        if self.stopping:
            due.append(self.kill_at)
        return max(0.0, min([*due, time.monotonic() + _POLL_SECONDS]) - time.monotonic())

    def _running(self) -> list[_Slot]:
        return [slot for slot in self.slots if slot.pid is not None]

    def _on_signal(self, signo: int) -> None:
        if signo == signal.SIGHUP:
            log.info("SIGHUP: reloading every worker")
            self._reload_own_config()
            self._forward(signal.SIGHUP)
        elif signo in (signal.SIGTERM, signal.SIGINT) and not self.stopping:
            self.stopping = True
            self.kill_at = time.monotonic() + self.config.shutdown_grace_seconds + KILL_MARGIN_SECONDS
            log.info("%s: draining every worker", signal.Signals(signo).name)
            self._forward(signal.SIGTERM)

    def _reload_own_config(self) -> None:
        """Keep the config a restarted worker falls back to current (the workers validate their own)."""
        try:
            config = load_config(self.path)
            check_workers(config, self.count)
        except ConfigError:
            return  # each worker logs why it keeps its running config
        self.config = config

    def _forward(self, signo: signal.Signals) -> None:
        for slot in self._running():
            assert slot.pid is not None
            try:
                os.kill(slot.pid, signo)
            except ProcessLookupError:
                pass  # exited a moment ago: reaped next

    def _kill_remaining(self) -> None:
        for slot in self._running():
            log.error("worker %d (pid %d) did not stop in time: killing it", slot.index, slot.pid)
        self.failed = True
        self._forward(signal.SIGKILL)
        self.kill_at = math.inf

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is not None:
                self._exited(slot, status)

    def _exited(self, slot: _Slot, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        slot.pid = None
        if self.stopping:
            self.failed |= code != 0
            log.info("worker %d %s", slot.index, how)
            return
        lived = time.monotonic() - slot.started
        slot.failures = 0 if lived >= STABLE_SECONDS else slot.failures + 1
        delay = restart_delay(slot.failures)
        slot.restart_at = time.monotonic() + delay
        log.error("worker %d %s after %.1fs; restarting it in %.1fs", slot.index, how, lived, delay)

    def _start(self, slot: _Slot) -> None:
        slot.restart_at = None
        worker = Worker(slot.index, self.count, self.path, self.log_level, self.config, self.signing_key)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._child(worker)
        slot.pid = pid
        slot.started = time.monotonic()
        log.info("worker %d started (pid %d)", slot.index, pid)

    def _child(self, worker: Worker) -> None:
        """Runs in the forked worker and never returns: the supervisor's loop must not run twice."""
        code = 1
        try:
            for signo in SIGNALS:
                signal.signal(signo, signal.SIG_DFL)
            # Until the worker's own handler is installed a SIGHUP must not end it (the default action):
            # it loads the config file as it starts anyway.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            _drain_when_orphaned(self.pid)
            code = asyncio.run(self.run_worker(worker))
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _drain_when_orphaned(supervisor: int) -> None:
    """Ask the kernel for a SIGTERM (a graceful drain) when the supervisor dies, even by SIGKILL, so no
    worker keeps serving unsupervised (prctl(2) PR_SET_PDEATHSIG); a supervisor already gone means now."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning(
            "prctl(PR_SET_PDEATHSIG) failed: errno %d; this worker outlives a killed supervisor", ctypes.get_errno()
        )
    if os.getppid() != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)


def supervise(
    path: str,
    log_level: str,
    count: int,
    signing_key: Callable[[GatewayConfig], SigningKey],
    run_worker: Callable[[Worker], Coroutine[Any, Any, int]],
) -> int:
    """``serve --workers N`` with N > 1: check, bind-test the port, fork the workers, supervise them."""
    config = load_config(path)
    logs.configure(log_level, config.logging_format)
    check_workers(config, count)
    key = signing_key(config)
    # A busy port is one clear line and no workers, not a worker restarted with backoff forever.
    assert config.metrics_listen is not None  # check_workers requires it
    metrics_host, metrics_port = config.metrics_listen
    addresses = [(config.listen_host, config.listen_port, "listen")]
    addresses += [(metrics_host, metrics_port + i, f"metrics_listen of worker {i}") for i in range(count)]
    for host, port, what in addresses:
        try:
            bind_shared(host, port, listen=False).close()
        except OSError as exc:
            print(f"mcp-gateway: cannot listen on {host}:{port} ({what}): {exc.strerror}", file=sys.stderr)
            return 1
    return Supervisor(path, log_level, count, config, key, run_worker).run()
