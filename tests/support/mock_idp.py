"""Launch ``tests/conformance/mock_idp.mjs``: npm ``oauth2-mock-server`` as an enterprise IdP (real signed
ID tokens, JWKS, OIDC discovery) plus our small RFC 8693 route minting ID-JAGs with its keys.

Synchronous like :func:`tests.support.upstreams.start_upstream`: the IdP is another process; the returned
object is a context manager that stops it.
"""

from __future__ import annotations

import os
import queue
import subprocess
import tempfile
import threading
from types import TracebackType
from typing import IO

from tests.support.conformance import CONFORMANCE_DIR, NODE, ConformanceSetupError
from tests.support.processes import read_so_far, stop_process

MOCK_IDP = CONFORMANCE_DIR / "mock_idp.mjs"
STARTUP_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 5.0
_LISTENING = "MOCK_IDP_LISTENING "


class MockIdp:
    def __init__(self, process: subprocess.Popen[str], issuer: str, stderr: IO[bytes]) -> None:
        self.process = process
        self.issuer = issuer
        self._stderr = stderr

    @property
    def token_endpoint(self) -> str:
        """oauth2-mock-server's own token endpoint (issues ID tokens)."""
        return self.issuer + "/token"

    @property
    def token_exchange_endpoint(self) -> str:
        """Our route: ID token -> ID-JAG."""
        return self.issuer + "/token-exchange"

    def stderr_text(self) -> str:
        return read_so_far(self._stderr).decode(errors="replace")

    def stop(self) -> None:
        stop_process(self.process, STOP_TIMEOUT_SECONDS)
        self._stderr.close()

    def __enter__(self) -> MockIdp:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_mock_idp(idp_client_id: str, resource_client_id: str, groups: tuple[str, ...] = ()) -> MockIdp:
    """Start the IdP on 127.0.0.1 (OS-assigned port) and return once it announces its issuer URL."""
    if not NODE.is_file():
        raise ConformanceSetupError(f"{NODE} is missing: run `npm ci --prefix tests/conformance` first")
    env = {key: value for key, value in os.environ.items() if not key.startswith("NODE_")}
    env.update(IDP_CLIENT_ID=idp_client_id, RESOURCE_CLIENT_ID=resource_client_id, GROUPS=",".join(groups))
    stderr = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [str(NODE), str(MOCK_IDP)],
        cwd=CONFORMANCE_DIR,
        env=env,
        stdin=subprocess.PIPE,  # closed by us (or by the OS if we die) -> the IdP exits
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    try:
        line = lines.get(timeout=STARTUP_TIMEOUT_SECONDS)
    except queue.Empty:
        line = None
    if line is None or not line.startswith(_LISTENING):
        stop_process(process, STOP_TIMEOUT_SECONDS)
        message = read_so_far(stderr).decode(errors="replace")
        stderr.close()
        raise ConformanceSetupError(f"mock_idp.mjs did not start: {line!r}\n{message}")
    return MockIdp(process, line[len(_LISTENING) :].strip(), stderr)
