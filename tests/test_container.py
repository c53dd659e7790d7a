"""The container image, checked without a Docker engine.

What a build would catch is checked statically: every COPY source exists and is in the build context
(not excluded by .dockerignore), the runtime stage runs as a fixed non-root user with no compilers, and
its entrypoint is the console script. What the runtime stage does with the wheel is reproduced for
real: build the project's wheel with `pip wheel --no-deps`, install it into a fresh venv outside the
source tree, and run the installed `mcp-gateway` entry point.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPILERS = ("gcc", "g++", "cc", "clang", "build-essential", "make", "cmake", "python3-dev", "libc6-dev")


# --- a small Dockerfile reader ----------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions; comments dropped, backslash continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = " ".join(args.split())
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image=words[0], name=name))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


def copy_sources(instruction: Instruction) -> list[str]:
    """Build-context sources of a COPY/ADD (none for COPY --from=stage)."""
    if instruction.args.startswith("["):
        words = json.loads(instruction.args)
    else:
        words = shlex.split(instruction.args)
    flags = [w for w in words if w.startswith("--")]
    if any(f.startswith("--from=") for f in flags):
        return []
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1]


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(stages) -> Stage:
    return stages[-1]


# --- a .dockerignore matcher (Docker's rules: last matching pattern wins, a match on a parent
# directory excludes everything under it, `**` spans directories) ---------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]"
            i = end
        elif char == "\\":
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out + r"\Z")


def ignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((negated, _pattern_regex(pattern)))
    return rules


def is_ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negated, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


@pytest.fixture(scope="module")
def rules():
    return ignore_rules(DOCKERIGNORE.read_text())


def test_dockerignore_matcher_follows_docker_rules():
    rules = ignore_rules("**/node_modules\ntests\n*.md\n!README.md\n**/*.py[cod]\n")
    assert is_ignored("node_modules/x/index.js", rules)
    assert is_ignored("tests/node/node_modules/x/index.js", rules)
    assert is_ignored("tests/test_helm.py", rules)
    assert is_ignored("NOTES.md", rules)
    assert not is_ignored("README.md", rules)
    assert not is_ignored("docs/NOTES.md", rules)
    assert is_ignored("gateway/__pycache__/config.cpython-311.pyc", rules)
    assert not is_ignored("gateway/config.py", rules)


# --- static checks ------------------------------------------------------------------------------


def test_copy_sources_exist_and_are_in_the_build_context(stages, rules):
    sources = [s for stage in stages for i in stage.all("COPY") + stage.all("ADD") for s in copy_sources(i)]
    assert sources, "the Dockerfile copies nothing from the build context"
    for source in sources:
        path = REPO / source
        assert path.exists(), f"COPY source {source} does not exist in the repository"
        assert not is_ignored(source, rules), f"COPY source {source} is excluded by .dockerignore"
        if path.is_dir():
            kept = [p for p in path.rglob("*.py") if not is_ignored(p.relative_to(REPO).as_posix(), rules)]
            assert kept, f"everything under {source} is excluded by .dockerignore"


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "venv/bin/python",
        "node_modules/x/index.js",
        "tests/node/node_modules/x/index.js",
        "tests/test_helm.py",
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/CACHEDIR.TAG",
        "gateway/__pycache__/config.cpython-311.pyc",
        "mcp_auth_gateway.egg-info/PKG-INFO",
        "build/lib/gateway/config.py",
        "dist/mcp_auth_gateway-0.1.0-py3-none-any.whl",
        "helm/mcp-gateway/values.yaml",
        ".env",
        "signing-key.pem",
    ],
)
def test_dockerignore_keeps_junk_and_secrets_out(rules, path):
    assert is_ignored(path, rules)


@pytest.mark.parametrize("path", ["pyproject.toml", "README.md", "gateway/__init__.py", "gateway/config.py"])
def test_dockerignore_keeps_what_the_build_needs(rules, path):
    assert not is_ignored(path, rules)


def test_builder_stage_builds_wheels(stages):
    assert len(stages) >= 2, "expected a multi-stage build"
    builder = stages[0]
    assert any(re.search(r"\bpip wheel\b", i.args) for i in builder.all("RUN"))


BASE_IMAGE = re.compile(r"python:3\.11-slim@sha256:[0-9a-f]{64}")


def test_every_stage_starts_from_the_same_base_image_pinned_by_digest(stages):
    """A tag moves (every Debian or CPython patch release); a digest names exact bytes."""
    assert {stage.image for stage in stages} == {stages[-1].image}
    assert BASE_IMAGE.fullmatch(stages[-1].image), stages[-1].image


def test_final_stage_installs_only_built_wheels(final):
    assert not final.all("COPY") or all("--from=" in i.args for i in final.all("COPY"))
    installs = [i.args for i in final.all("RUN") if re.search(r"\bpip install\b", i.args)]
    assert installs, "the runtime stage installs nothing"
    for command in installs:
        for step in re.findall(r"pip install [^&]*", command):
            assert "--no-index" in step, "the runtime stage must install from the builder's wheels only"
    assert any("--require-hashes -r /tmp/requirements.lock" in command for command in installs)


def test_builder_downloads_only_hashed_locked_files(stages):
    """Every download in the builder is checked against a hash from a lock file; the project itself is
    built offline with the locked build tools."""
    builder = stages[0]
    commands = [step for i in builder.all("RUN") for step in re.split(r"\s*&&\s*", i.args)]
    fetching = [c for c in commands if re.search(r"\bpip (install|wheel|download)\b", c) and "--no-index" not in c]
    assert fetching, "the builder downloads nothing?"
    for command in fetching:
        assert "--require-hashes" in command, command
        assert re.search(r"-r (build-)?requirements\.lock\b", command), command
    project_builds = [c for c in commands if re.search(r"\bpip wheel\b.* \.$", c)]
    assert project_builds and all("--no-build-isolation" in c and "--no-index" in c for c in project_builds)


def _locked(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (pinned version, number of hashes) of a pip-compile --generate-hashes file."""
    pins: dict[str, tuple[str, int]] = {}
    for requirement in re.split(r"\n(?=[A-Za-z0-9])", path.read_text()):
        first = requirement.splitlines()[0]
        if first.startswith("#") or not first.strip():
            continue
        match = re.match(r"([A-Za-z0-9._-]+)==([^ \\;]+)", first)
        assert match, f"{path.name}: not pinned with ==: {first}"
        hashes = re.findall(r"--hash=sha256:[0-9a-f]{64}", requirement)
        pins[canonicalize_name(match.group(1))] = (match.group(2), len(hashes))
    return pins


def test_lock_files_pin_every_dependency_with_hashes():
    """The locks cover pyproject.toml (runtime dependencies with the ``otel`` extra, which
    ``audit.sink: otlp`` and ``telemetry.otlp_endpoint`` need, and build-system requirements) with
    versions its specifiers allow; the real install from the lock is the `installed` fixture below."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    runtime = project["project"]["dependencies"] + project["project"]["optional-dependencies"]["otel"]
    for lock, declared in [
        ("requirements.lock", runtime),
        ("build-requirements.lock", project["build-system"]["requires"]),
    ]:
        pins = _locked(REPO / lock)
        assert all(count >= 1 for _, count in pins.values()), lock
        for text in declared:
            requirement = Requirement(text)
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{lock} does not pin {name}"
            assert requirement.specifier.contains(pins[name][0], prereleases=True), (lock, text, pins[name])


def test_final_stage_runs_as_fixed_non_root_user(final):
    users = final.all("USER")
    assert users, "the runtime stage runs as root"
    uid, _, gid = users[-1].args.partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    assert uid.isdigit() and int(uid) == 10001
    assert gid.isdigit() and int(gid) == 10001


def test_final_stage_has_no_compilers(final):
    for instruction in final.all("RUN"):
        words = set(re.split(r"[\s;&|]+", instruction.args))
        assert not words & set(COMPILERS), f"build tools in the runtime stage: {instruction.args}"


def test_entrypoint_command_and_ports(stages, final):
    assert json.loads(final.all("ENTRYPOINT")[-1].args) == ["mcp-gateway"]
    assert json.loads(final.all("CMD")[-1].args) == ["serve", "--config", "/etc/mcp-gateway/config.yaml"]
    assert {p for i in final.all("EXPOSE") for p in i.args.split()} == {"8080", "9090"}
    assert not [i for stage in stages for i in stage.all("HEALTHCHECK")], "Kubernetes probes replace HEALTHCHECK"


# --- the wheel the image installs, installed for real -------------------------------------------------


@dataclass
class Installed:
    wheel: Path
    venv: Path
    workdir: Path

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    """`pip wheel --no-deps` of the project, installed into a fresh venv (once per session) as the image
    does: the dependencies from requirements.lock with --require-hashes, then the wheel alone."""
    root = tmp_path_factory.mktemp("image")
    wheels = root / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(wheels), str(REPO)])
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("*.whl")
    venv = root / "venv"
    created = _run([sys.executable, "-m", "venv", str(venv)])
    assert created.returncode == 0, created.stderr
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # Without PYTHONPATH: a checkout on it would make the project look installed already.
    locked = _run([*pip, "--require-hashes", "-r", str(REPO / "requirements.lock")], env=_clean_env())
    assert locked.returncode == 0, locked.stderr
    project = _run([*pip, "--no-deps", str(wheel)], env=_clean_env())
    assert project.returncode == 0, project.stderr
    check = _run([str(venv / "bin" / "python"), "-m", "pip", "check"], env=_clean_env())
    assert check.returncode == 0, check.stdout + check.stderr  # the lock satisfies every requirement
    workdir = root / "elsewhere"
    workdir.mkdir()
    return Installed(wheel=wheel, venv=venv, workdir=workdir)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def test_wheel_holds_the_package_and_nothing_else(installed):
    names = zipfile.ZipFile(installed.wheel).namelist()
    packages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "gateway").rglob("__init__.py")}
    for package in packages:
        assert f"{package}/__init__.py" in names, f"{package} is missing from the wheel"
    top_level = {n.split("/")[0] for n in names}
    (dist_info,) = top_level - {"gateway"}
    assert dist_info.endswith(".dist-info"), f"unexpected top-level entries in the wheel: {sorted(top_level)}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(installed.wheel).read(entry_points).decode()
    assert re.search(r"^mcp-gateway = gateway\.cli:main$", text, re.MULTILINE)


def test_installed_package_imports_from_the_venv_not_the_source_tree(installed):
    result = _run(
        [str(installed.bin("python")), "-c", "import gateway.config, aiohttp, jose, yaml; print(gateway.__file__)"],
        cwd=installed.workdir,
        env=_clean_env(),
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(installed.venv)


def test_installed_entry_point_runs(installed):
    """`mcp-gateway --help` from the installed console script. Depends on the gateway CLI (gateway.cli)."""
    assert installed.bin("mcp-gateway").exists()
    result = _run([str(installed.bin("mcp-gateway")), "--help"], cwd=installed.workdir, env=_clean_env())
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout
    assert "check" in result.stdout


def test_installed_package_accepts_opentelemetry_config(installed):
    """The image carries the ``otel`` extra: a config exporting traces and the audit trail over OTLP
    passes ``check`` (without the extra it is a config error naming it)."""
    config = installed.workdir / "otel.yaml"  # JSON is YAML
    config.write_text(
        json.dumps(
            {
                "public_url": "http://127.0.0.1:8080",
                "authorization": {
                    "clients": [{"client_id": "agent", "client_secret": "agent-secret-0123456789abcdef"}],
                    "identity_providers": [{"issuer": "http://127.0.0.1:9/idp"}],
                },
                "telemetry": {"otlp_endpoint": "http://127.0.0.1:4318"},
                "audit": {"sink": "otlp"},
                "routes": [{"name": "demo", "path": "/mcp", "upstream": "http://127.0.0.1:9/mcp"}],
            }
        )
    )
    result = _run(
        [str(installed.bin("mcp-gateway")), "check", "--config", str(config)], cwd=installed.workdir, env=_clean_env()
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "telemetry: OTLP/HTTP traces to http://127.0.0.1:4318" in result.stdout


def test_installed_demo_runs_the_whole_flow(installed):
    """The README's newcomer path: the installed package alone (no test extras, no `mcp`) runs the
    demo end to end: dev IdP, upstream, gateway, ID-JAG exchange and tool calls."""
    result = _run(
        [str(installed.bin("mcp-gateway")), "demo", "--once", "--port", "0"], cwd=installed.workdir, env=_clean_env()
    )
    assert result.returncode == 0, result.stderr
    assert "The SEP-990 flow succeeded." in result.stdout
    assert '"authorization": "absent"' in result.stdout
