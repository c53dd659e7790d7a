"""Helpers shared by the launchers of test servers that run as child processes (upstreams.py, node.py)."""

from __future__ import annotations

import subprocess
from typing import IO, Any


def stop_process(process: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; idempotent. Closes our end of the child's stdin
    first, so a child that exits on stdin EOF also goes on its own."""
    if process.stdin is not None and not process.stdin.closed:
        try:
            process.stdin.close()
        except OSError:
            pass
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


def read_so_far(file: IO[bytes]) -> bytes:
    """Everything written to ``file`` so far, leaving its position where it was (for a child's output
    redirected to a temporary file that it may still be writing)."""
    file.flush()
    position = file.tell()
    file.seek(0)
    data = file.read()
    file.seek(position)
    return data
