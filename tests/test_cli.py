"""The ``mcp-gateway`` command as users run it: ``python -m gateway`` in a subprocess.

What is checked is what the issue promises: ``check`` prints the route table, a bad config ends in
exactly one stderr line ``mcp-gateway: <file>: <key path>: <problem>`` with exit status 2 and no
traceback, secrets never reach stdout or stderr, the demo narrates the whole flow without printing
a usable token, and ``serve`` / ``dev-idp`` start, answer and stop cleanly on SIGTERM. Everything
listens on 127.0.0.1; waiting is bounded polling against a deadline, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwt

from gateway import __version__
from tests.support.loopback import free_port

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "gateway.example.yaml"
MINIMAL = REPO / "config" / "minimal.yaml"
SECRET = "cli-test-secret-4b9e1d7a"
UNSET_VAR = "MCP_GATEWAY_TEST_UNSET_VARIABLE"
# A complete JWS compact serialization (RFC 7515 §7.1): three base64url segments joined by dots. The
# first form is any JSON header ('{"' encodes as "eyJ"), even with an empty signature; the second
# catches any other long enough triple (a logger name such as gateway.oauth.keys is too short).
JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.|[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}")
START_SECONDS = 15.0
STOP_SECONDS = 10.0

BASE_CONFIG = """\
listen: "127.0.0.1:0"
public_url: "https://mcp.example.com"
authorization:
  clients:
    - client_id: claude-enterprise
      client_secret: "${CLAUDE_CLIENT_SECRET}"
  identity_providers:
    - issuer: "https://acme.okta.com"
routes:
  - name: linear
    path: /linear/mcp
    upstream: "http://linear-mcp:3000/mcp"
    allow_groups: [engineering]
  - name: github
    path: /github/mcp
    upstream: "http://github-mcp:3000/mcp"
  - name: wiki
    path: /wiki/sse
    upstream: "http://wiki-mcp:8000/sse"
    transport: sse
"""


def cli_env() -> dict[str, str]:
    # Without PYTHONUNBUFFERED, as users run it: stdout to a pipe is block-buffered unless flushed.
    env = {k: v for k, v in os.environ.items() if k not in (UNSET_VAR, "PYTHONUNBUFFERED")}
    return {**env, "CLAUDE_CLIENT_SECRET": SECRET, "MCP_CLIENT_SECRET": SECRET}


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        cwd=REPO,
        check=False,
    )


def http_get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def signing_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "signing-key.pem"
    path.write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    return path


# -- check -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [EXAMPLE, MINIMAL], ids=["example", "minimal"])
def test_check_prints_route_table(config: Path) -> None:
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == f"config: {config} (valid)"
    assert "routes:" in lines
    assert SECRET not in result.stdout


def test_check_example_route_table() -> None:
    result = run_cli("check", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert (
        "  linear: /linear/mcp -> http://linear-mcp:3000/mcp [streamable-http] "
        "resource=https://mcp.example.com/linear/mcp scopes=mcp groups=engineering"
    ) in result.stdout.splitlines()
    assert "clients: claude-enterprise" in result.stdout
    assert SECRET not in result.stdout + result.stderr


def test_check_shows_a_loaded_signing_key(tmp_path: Path, signing_key_file: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        BASE_CONFIG.replace("authorization:\n", f"authorization:\n  signing_key_file: {signing_key_file}\n")
    )
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"signing key: {signing_key_file}" in result.stdout.splitlines()


def assert_one_line_error(result: subprocess.CompletedProcess[str], prefix: str, problem: str) -> None:
    assert "Traceback" not in result.stderr
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), lines[0]
    assert problem in lines[0][len(prefix) :], lines[0]
    assert SECRET not in result.stderr


# (text replaced in BASE_CONFIG, its replacement, the key path, text the problem must contain)
BAD_CONFIGS = [
    pytest.param('public_url: "https://mcp.example.com"\n', "", "public_url", "is required", id="missing-public-url"),
    pytest.param('"127.0.0.1:0"', "8080", "listen", "must be a non-empty string, got int", id="listen-wrong-type"),
    pytest.param("routes:\n", "log_level: debug\nroutes:\n", "log_level", "unknown key", id="unknown-top-level-key"),
    pytest.param("allow_groups:", "alow_groups:", "routes[0].alow_groups", "unknown key", id="typo-nested-key"),
    pytest.param(
        '"http://wiki-mcp:8000/sse"',
        '"wiki-mcp:8000/sse"',
        "routes[2].upstream",
        "must be an absolute http(s) URL",
        id="bad-upstream",
    ),
    pytest.param("path: /github/mcp", "path: /oauth2/github", "routes[1].path", "collides", id="reserved-path"),
    pytest.param("name: github", "name: linear", "routes[1].name", "duplicate route name", id="duplicate-name"),
    pytest.param("transport: sse", "transport: websocket", "routes[2].transport", "must be one of", id="transport"),
    pytest.param(
        "${CLAUDE_CLIENT_SECRET}",
        "${" + UNSET_VAR + "}",
        "authorization.clients[0].client_secret",
        f"environment variable {UNSET_VAR} is not set",
        id="unset-env-var",
    ),
    pytest.param(
        '- issuer: "https://acme.okta.com"\n',
        '- issuer: "https://acme.okta.com"\n      algorithms: [HS256]\n',
        "authorization.identity_providers[0].algorithms",
        "'HS256' is not allowed",
        id="hs256",
    ),
    pytest.param(
        '- issuer: "https://acme.okta.com"',
        '- issuer: "https://mcp.example.com"',
        "authorization.identity_providers[0].issuer",
        "must not be the gateway's own issuer",
        id="idp-is-gateway",
    ),
]


@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize(("old", "new", "key", "problem"), BAD_CONFIGS)
def test_bad_config_is_one_line(command: str, old: str, new: str, key: str, problem: str, tmp_path: Path) -> None:
    assert old in BASE_CONFIG
    config = tmp_path / "gw.yaml"
    config.write_text(BASE_CONFIG.replace(old, new, 1))
    result = run_cli(command, "--config", str(config), timeout=15)
    assert_one_line_error(result, f"mcp-gateway: {config}: {key}: ", problem)


BAD_FILES = [
    pytest.param(
        "routes:\n  - name: linear\n     path: /linear/mcp\n",
        "invalid YAML: line 3, column 10: mapping values are not allowed here",
        id="invalid-yaml",
    ),
    pytest.param(BASE_CONFIG + "listen: 127.0.0.1:1\n", "invalid YAML: line 21, column 1: duplicate key", id="dup"),
    pytest.param("- listen\n- routes\n", "(top level): must be a mapping, got list", id="top-level-list"),
    pytest.param(b"listen: \xff\n", "not UTF-8 text", id="not-utf-8"),
    pytest.param(None, "cannot read file: No such file or directory", id="missing-file"),
]


@pytest.mark.parametrize(("content", "problem"), BAD_FILES)
def test_bad_file_is_one_line(content: str | bytes | None, problem: str, tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    if isinstance(content, bytes):
        config.write_bytes(content)
    elif content is not None:
        config.write_text(content)
    result = run_cli("check", "--config", str(config))
    assert_one_line_error(result, f"mcp-gateway: {config}: ", problem)


@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize(
    ("key_pem", "problem"),
    [
        pytest.param(b"not a key\n", "not an unencrypted PEM private key", id="not-pem"),
        pytest.param(
            pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
            "RSA keys must be at least 2048 bits",
            id="rsa-1024",
        ),
    ],
)
def test_unusable_signing_key_is_one_line(command: str, key_pem: bytes, problem: str, tmp_path: Path) -> None:
    key = tmp_path / "signing-key.pem"
    key.write_bytes(key_pem)
    config = tmp_path / "gw.yaml"
    config.write_text(BASE_CONFIG.replace("authorization:\n", "authorization:\n  signing_key_file: signing-key.pem\n"))
    result = run_cli(command, "--config", str(config), timeout=15)
    assert_one_line_error(result, f"mcp-gateway: {config}: authorization.signing_key_file: {key}: ", problem)


def test_log_level_is_accepted_after_the_command() -> None:
    """Container args and the Helm chart's extraArgs come after `serve --config FILE`: a --log-level
    there must not end the process with "unrecognized arguments" (a crash loop in Kubernetes). The
    serve case runs for real in test_logging.py."""
    result = run_cli("check", "--config", str(MINIMAL), "--log-level", "debug")
    assert result.returncode == 0, result.stderr
    result = run_cli("serve", "--config", str(MINIMAL), "--log-level", "loud")
    assert result.returncode == 2
    assert "argument --log-level: invalid choice: 'loud'" in result.stderr


def test_version() -> None:
    result = run_cli("--version")
    assert (result.returncode, result.stdout) == (0, f"mcp-gateway {__version__}\n")


# -- demo ------------------------------------------------------------------------------------------------


def test_credential_pattern_matches_real_tokens() -> None:
    assert JWT.search("token: " + jwt.encode({"sub": "alice"}, "k" * 32, algorithm="HS256"))
    assert JWT.search("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.")
    assert not JWT.search("gateway.oauth.keys at http://127.0.0.1:8080 version 1.0.0")


def test_demo_once_narrates_the_whole_flow_without_printing_a_credential() -> None:
    result = run_cli("demo", "--once", "--port", "0", timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    steps = [
        "ID token claims:",
        '"sub": "alice"',
        "ID-JAG header:",
        '"typ": "oauth-id-jag+jwt"',
        "token response:",
        '"token_type": "Bearer"',
        "tools/list: [",
        '"echo"',
        "tools/call whoami (what the upstream saw):",
        '"authorization": "absent"',
        "The SEP-990 flow succeeded.",
    ]
    positions = [out.find(step) for step in steps]
    assert -1 not in positions, [s for s, p in zip(steps, positions, strict=True) if p == -1]
    assert positions == sorted(positions), "steps out of order"
    assert JWT.search(out) is None, JWT.search(out)
    assert JWT.search(result.stderr) is None
    assert "Traceback" not in result.stderr


def test_demo_on_a_busy_port_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("demo", "--once", "--port", str(port), timeout=30)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"mcp-gateway demo: cannot listen on 127.0.0.1:{port}: Address already in use (try --port 0)"
    ]


# -- long-running commands: serve and dev-idp -----------------------------------------------------------


@dataclass
class Running:
    process: subprocess.Popen[str]
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_until_answering(self, url: str) -> tuple[int, Any]:
        """GET ``url`` until something answers; waiting on the process between tries notices a crash."""
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                return http_get(url)
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{url} did not answer within {START_SECONDS}s:\n{self.stderr()}")
            try:
                code = self.process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"exited with status {code} before {url} answered:\n{self.stderr()}")

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=STOP_SECONDS)


@contextmanager
def running(*args: str, tmp_path: Path, stdout: int | IO[str]) -> Iterator[Running]:
    stderr_path = tmp_path / f"{args[0]}.stderr"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            stdout=stdout,
            stderr=stderr,
            text=True,
            env=cli_env(),
            cwd=REPO,
        )
    try:
        yield Running(process, stderr_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_SECONDS)
        if process.stdout is not None:
            process.stdout.close()


def read_line(process: subprocess.Popen[str], within: float) -> str:
    """The next stdout line, or fail after ``within`` seconds (select: no blocking past the deadline)."""
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], within)
    if not readable:
        pytest.fail(f"no output within {within}s")
    return process.stdout.readline()


@pytest.fixture(scope="module")
def dev_idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, str, str]]:
    """``mcp-gateway dev-idp --port 0``: the running process, its first stdout line and its issuer."""
    tmp_path = tmp_path_factory.mktemp("dev-idp")
    with running("dev-idp", "--port", "0", tmp_path=tmp_path, stdout=subprocess.PIPE) as idp:
        line = read_line(idp.process, START_SECONDS)
        match = re.search(r" at (http://127\.0\.0\.1:\d+);", line)
        assert match, f"no issuer in {line!r}; stderr:\n{idp.stderr()}"
        yield idp, line, match.group(1)
        assert idp.terminate() == 0


def test_dev_idp_prints_its_issuer_and_serves_discovery(dev_idp: tuple[Running, str, str]) -> None:
    idp, line, issuer = dev_idp
    assert "NOT FOR PRODUCTION" in line
    status, document = idp.wait_until_answering(issuer + "/.well-known/openid-configuration")
    assert status == 200
    assert document["issuer"] == issuer
    assert document["jwks_uri"].startswith(issuer + "/")
    status, jwks = http_get(document["jwks_uri"])
    assert status == 200
    assert jwks["keys"]


def serve_config(tmp_path: Path, port: int, idp_issuer: str, signing_key_file: Path) -> Path:
    config = tmp_path / "gw.yaml"
    config.write_text(
        BASE_CONFIG.replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"')
        .replace("https://mcp.example.com", f"http://127.0.0.1:{port}")
        .replace("https://acme.okta.com", idp_issuer)
        .replace("authorization:\n", f"authorization:\n  signing_key_file: {signing_key_file}\n")
    )
    return config


def test_serve_ready_while_idp_is_unreachable(tmp_path: Path, signing_key_file: Path) -> None:
    """Readiness means "config loaded, not draining": an unreachable IdP is named, not fatal."""
    port = free_port()
    unreachable_idp = f"http://127.0.0.1:{free_port()}"
    config = serve_config(tmp_path, port, unreachable_idp, signing_key_file)
    base = f"http://127.0.0.1:{port}"
    with running("serve", "--config", str(config), tmp_path=tmp_path, stdout=subprocess.DEVNULL) as gateway:
        assert gateway.wait_until_answering(base + "/healthz") == (200, {"status": "ok"})
        status, body = http_get(base + "/readyz")
        assert (status, body["idp_keys_missing"]) == (200, [unreachable_idp])
        status, metadata = http_get(base + "/.well-known/oauth-authorization-server")
        assert (status, metadata["issuer"], metadata["token_endpoint"]) == (200, base, base + "/oauth2/token")
        assert gateway.terminate() == 0
        stderr = gateway.stderr()
    assert SECRET not in stderr
    assert "Traceback" not in stderr


def test_serve_ready_with_the_dev_idp(
    tmp_path: Path, signing_key_file: Path, dev_idp: tuple[Running, str, str]
) -> None:
    _, _, issuer = dev_idp
    port = free_port()
    config = serve_config(tmp_path, port, issuer, signing_key_file)
    base = f"http://127.0.0.1:{port}"
    with running("serve", "--config", str(config), tmp_path=tmp_path, stdout=subprocess.DEVNULL) as gateway:
        assert gateway.wait_until_answering(base + "/healthz")[0] == 200
        assert http_get(base + "/readyz") == (200, {"status": "ready"})
        assert gateway.terminate() == 0
        stderr = gateway.stderr()
    assert SECRET not in stderr
    assert "Traceback" not in stderr


def test_serve_on_a_busy_port_is_one_line(tmp_path: Path, signing_key_file: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = serve_config(tmp_path, port, "https://acme.okta.com", signing_key_file)
        result = run_cli("serve", "--config", str(config), timeout=15)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"mcp-gateway: cannot listen on 127.0.0.1:{port}: Address already in use"]
