"""A throw-away ``redis-server`` (Debian's package) on a free 127.0.0.1 port, for the replay-store tests.

No persistence (``--save '' --appendonly no``), its own working directory, readiness by polling
PING against a deadline. A missing ``redis-server`` fails the tests with instructions instead of
skipping them: replay protection across replicas is a contract, and a skip would hide its loss.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from tests.support.loopback import free_port

START_SECONDS = 10.0
STOP_SECONDS = 10.0
_PORT_ATTEMPTS = 5


class RedisServer:
    """One ``redis-server`` process; ``stop()`` and ``start()`` again (same port) to test outages."""

    def __init__(self, workdir: Path, *, password: str | None = None) -> None:
        self.workdir = workdir
        self.password = password
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A synchronous client with short timeouts, for setup and for looking at keys."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=1, socket_connect_timeout=1
        )

    def start(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail(
                "redis-server is not on PATH: install Debian's package (apt-get install redis-server); "
                ".ci/run does this. The Redis replay-store tests need a real server and are never skipped."
            )
        ports = [self.port] if self.port else [free_port() for _ in range(_PORT_ATTEMPTS)]
        for port in ports:
            # The port was free a moment ago; if another process took it, redis-server exits and we move on.
            if self._start_on(executable, port):
                self.port = port
                return
        pytest.fail(f"redis-server did not start on 127.0.0.1 (ports tried: {ports}):\n{self.log()}")

    def _start_on(self, executable: str, port: int) -> bool:
        args = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), "--logfile", ""]
        if self.password:
            args += ["--requirepass", self.password]
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self._log_path().open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        probe = redis.Redis(
            host="127.0.0.1", port=port, password=self.password, socket_timeout=0.5, socket_connect_timeout=0.5
        )
        deadline = time.monotonic() + START_SECONDS
        try:
            while time.monotonic() < deadline:
                try:
                    if probe.ping():
                        return True
                except redis.RedisError:
                    pass
                try:
                    self.process.wait(timeout=0.05)  # also the pause between PINGs
                except subprocess.TimeoutExpired:
                    continue
                return False  # exited: most likely the port was taken
        finally:
            probe.close()
        self._kill()
        pytest.fail(f"redis-server on 127.0.0.1:{port} did not answer PING within {START_SECONDS}s:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM and wait; without persistence nothing is written."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self._kill()
        self.process = None

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_SECONDS)

    def _log_path(self) -> Path:
        return self.workdir / "redis-server.log"

    def log(self) -> str:
        path = self._log_path()
        return path.read_text(errors="replace") if path.exists() else "(no log)"


@contextmanager
def running_redis(workdir: Path, *, password: str | None = None) -> Iterator[RedisServer]:
    """A started ``RedisServer``, stopped on exit whatever happened (use it in a session fixture)."""
    server = RedisServer(workdir, password=password)
    server.start()
    try:
        yield server
    finally:
        server.stop()
