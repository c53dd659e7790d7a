"""Tests for the config loader (gateway/config.py): every bad input names its key path and problem.

The key set is a public contract, so the tables below are written in the operator's terms: a change
to a valid config (key path -> new value), the key path the error must name, and what it must say.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import (
    ASYMMETRIC_ALGORITHMS,
    ClientConfig,
    ConfigError,
    GatewayConfig,
    LimitsConfig,
    Secret,
    describe,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "gateway.example.yaml"
MINIMAL = REPO / "config" / "minimal.yaml"
SOURCE = "gw.yaml"
SECRET = "client-secret-5f0c2a9d"
UNSET_VAR = "MCP_GATEWAY_TEST_UNSET_VARIABLE"
DELETE = object()
_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def valid_config() -> dict[str, Any]:
    """The contract's shape with three routes, so that ``routes[2]`` exists."""
    return {
        "listen": "127.0.0.1:8080",
        "public_url": "https://mcp.example.com",
        "authorization": {
            "clients": [{"client_id": "claude-enterprise", "client_secret": SECRET}],
            "identity_providers": [{"issuer": "https://acme.okta.com"}],
        },
        "routes": [
            {
                "name": "linear",
                "path": "/linear/mcp",
                "upstream": "http://linear-mcp:3000/mcp",
                "allow_groups": ["engineering"],
            },
            {"name": "github", "path": "/github/mcp", "upstream": "http://github-mcp:3000/mcp"},
            {"name": "wiki", "path": "/wiki/sse", "upstream": "http://wiki-mcp:8000/sse", "transport": "sse"},
        ],
    }


def edited(edits: dict[str, Any]) -> dict[str, Any]:
    """``valid_config()`` with each ``key.path[i]`` set to its value (or removed, for DELETE)."""
    data = valid_config()
    for path, value in edits.items():
        steps: list[Any] = [int(index) if index else key for key, index in _STEP.findall(path)]
        parent: Any = data
        for step in steps[:-1]:
            parent = parent[step]
        if value is DELETE:
            del parent[steps[-1]]
        else:
            parent[steps[-1]] = value
    return data


def rejection(data: Any, source: str = SOURCE) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source=source)
    return caught.value


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_the_base_of_the_tables_is_valid() -> None:
    assert len(parse_config(valid_config(), source=SOURCE).routes) == 3


CLIENT = {"client_id": "claude-enterprise", "client_secret": SECRET}
IDP = {"issuer": "https://acme.okta.com"}

# (edits to valid_config(), key path named by the error, text the problem must contain)
INVALID = [
    pytest.param({"public_url": DELETE}, "public_url", "is required", id="missing-public-url"),
    pytest.param(
        {"public_url": "mcp.example.com"}, "public_url", "must be an absolute http(s) URL", id="public-url-no-scheme"
    ),
    pytest.param(
        {"public_url": "https://mcp.example.com/gateway"}, "public_url", "must be an origin", id="public-url-with-path"
    ),
    pytest.param(
        {"public_url": "https://mcp.example.com?tenant=a"}, "public_url", "must be an origin", id="public-url-query"
    ),
    pytest.param({"public_url": "https://mcp.example.com#"}, "public_url", "fragment", id="public-url-empty-fragment"),
    pytest.param({"public_url": "https://mcp.example.com#a"}, "public_url", "fragment", id="public-url-fragment"),
    pytest.param(
        {"public_url": "https://ops@mcp.example.com"},
        "public_url",
        "must not contain credentials",
        id="public-url-userinfo",
    ),
    pytest.param(
        {"authorization.issuer": "https://mcp.example.com#x"},
        "authorization.issuer",
        "must not contain a fragment",
        id="issuer-fragment",
    ),
    pytest.param(
        {"routes[2].upstream": "http://wiki-mcp:8000/sse#"},
        "routes[2].upstream",
        "must not contain a fragment",
        id="upstream-empty-fragment",
    ),
    pytest.param({"listen": "0.0.0.0"}, "listen", "must be host:port, got '0.0.0.0'", id="listen-without-port"),
    pytest.param({"listen": ":8080"}, "listen", "must be host:port", id="listen-without-host"),
    pytest.param({"listen": "0.0.0.0:65536"}, "listen", "must be host:port", id="listen-port-out-of-range"),
    pytest.param({"listen": "0.0.0.0:http"}, "listen", "must be host:port", id="listen-port-not-a-number"),
    pytest.param({"listen": "0.0.0.0:\u00b2"}, "listen", "must be host:port", id="listen-port-superscript-digit"),
    pytest.param({"listen": 8080}, "listen", "must be a non-empty string, got int", id="listen-wrong-type"),
    pytest.param({"rotues": []}, "rotues", "unknown key", id="unknown-top-level-key"),
    pytest.param(
        {"routes[0].allow_groups": DELETE, "routes[0].alow_groups": ["engineering"]},
        "routes[0].alow_groups",
        "unknown key",
        id="typo-route-key",
    ),
    pytest.param(
        {"authorization.acess_token_ttl_seconds": 300},
        "authorization.acess_token_ttl_seconds",
        "unknown key",
        id="typo-authorization-key",
    ),
    pytest.param(
        {"authorization.clients[0].clientsecret": SECRET},
        "authorization.clients[0].clientsecret",
        "unknown key",
        id="typo-client-key",
    ),
    pytest.param(
        {"authorization.identity_providers[0].group_claim": "roles"},
        "authorization.identity_providers[0].group_claim",
        "unknown key",
        id="typo-idp-key",
    ),
    pytest.param(
        {"limits": {"max_request_size": 1024}}, "limits.max_request_size", "unknown key", id="typo-limits-key"
    ),
    pytest.param({"routes[2].upstream": DELETE}, "routes[2].upstream", "is required", id="missing-upstream"),
    pytest.param(
        {"routes[2].upstream": "wiki-mcp:8000/sse"},
        "routes[2].upstream",
        "must be an absolute http(s) URL, got 'wiki-mcp:8000/sse'",
        id="upstream-without-scheme",
    ),
    pytest.param(
        {"routes[2].upstream": "ws://wiki-mcp:8000/sse"},
        "routes[2].upstream",
        "must be an absolute http(s) URL",
        id="upstream-not-http",
    ),
    pytest.param(
        {"routes[2].upstream": "http://wiki-mcp:sse/sse"},
        "routes[2].upstream",
        "is not a valid URL (Port could not be cast",
        id="upstream-port-not-a-number",
    ),
    pytest.param(
        {"routes[2].upstream": "http://[::1/sse"}, "routes[2].upstream", "is not a valid URL", id="upstream-unparsable"
    ),
    pytest.param(
        {"routes[2].upstream": "http://wiki:hunter2-password@wiki-mcp:8000/sse"},
        "routes[2].upstream",
        "must not contain credentials",
        id="upstream-with-credentials",
    ),
    pytest.param(
        {"routes[2].upstream": "http://wiki-mcp:8000/sse?key=1"},
        "routes[2].upstream",
        "must not have a query or fragment",
        id="upstream-with-query",
    ),
    pytest.param(
        {"routes[1].name": "linear"}, "routes[1].name", "duplicate route name 'linear'", id="duplicate-route-name"
    ),
    pytest.param(
        {"routes[1].path": "/linear/mcp"},
        "routes[1].path",
        "'/linear/mcp' overlaps route 'linear' ('/linear/mcp')",
        id="duplicate-route-path",
    ),
    pytest.param(
        {"routes[1].path": "/linear/mcp/admin"}, "routes[1].path", "overlaps route 'linear'", id="path-below-another"
    ),
    pytest.param({"routes[2].path": "/linear"}, "routes[2].path", "overlaps route 'linear'", id="path-above-another"),
    pytest.param({"routes[0].path": "linear/mcp"}, "routes[0].path", "must start with '/'", id="path-relative"),
    pytest.param({"routes[0].path": "/"}, "routes[0].path", "not be '/'", id="path-root"),
    pytest.param({"routes[0].path": "/linear/"}, "routes[0].path", "not end with '/'", id="path-trailing-slash"),
    pytest.param({"routes[0].path": "/a/../oauth2"}, "routes[0].path", "dot segments", id="path-dot-segment"),
    pytest.param({"routes[0].path": "/linear?x=1"}, "routes[0].path", "without '?'", id="path-with-query"),
    pytest.param({"routes[0].path": 42}, "routes[0].path", "must be a non-empty string, got int", id="path-int"),
    pytest.param({"routes[0].name": "Linear"}, "routes[0].name", "must be lowercase", id="route-name-uppercase"),
    pytest.param({"routes[0].name": ""}, "routes[0].name", "must be a non-empty string", id="route-name-empty"),
    pytest.param(
        {"routes[0].transport": "websocket"},
        "routes[0].transport",
        "must be one of streamable-http, sse, got 'websocket'",
        id="bad-transport",
    ),
    pytest.param(
        {"routes[0].scopes": ["mcp read"]}, "routes[0].scopes", "invalid scope token 'mcp read'", id="scope-with-space"
    ),
    pytest.param(
        {"routes[0].default_scopes": ["mcp:admin"]},
        "routes[0].default_scopes",
        "scope 'mcp:admin' is not in this route's scopes",
        id="default-scope-outside-scopes",
    ),
    pytest.param(
        {"routes[0].default_scopes": []}, "routes[0].default_scopes", "non-empty list", id="default-scopes-empty"
    ),
    pytest.param(
        {"routes[0].allow_groups": "engineering"},
        "routes[0].allow_groups",
        "must be a list of non-empty strings",
        id="allow-groups-not-a-list",
    ),
    pytest.param(
        {"routes[0].upstream_headers": {"Authorization": "Bearer x"}},
        "routes[0].upstream_headers.Authorization",
        "is managed by the gateway",
        id="upstream-header-authorization",
    ),
    pytest.param(
        {"routes[0].upstream_headers": {"X Api Key": "x"}},
        "routes[0].upstream_headers.X Api Key",
        "is not a valid HTTP header name",
        id="upstream-header-bad-name",
    ),
    pytest.param(
        {"routes[0].upstream_headers": {"X-Api-Key": "a\r\nX-Admin: 1"}},
        "routes[0].upstream_headers.X-Api-Key",
        "must not contain line breaks",
        id="upstream-header-injection",
    ),
    pytest.param(
        {"authorization.clients[0].client_secret": "${" + UNSET_VAR + "}"},
        "authorization.clients[0].client_secret",
        f"environment variable {UNSET_VAR} is not set",
        id="unset-env-var",
    ),
    pytest.param(
        {"routes[2].upstream": "http://${" + UNSET_VAR + "}:8000/sse"},
        "routes[2].upstream",
        f"environment variable {UNSET_VAR} is not set",
        id="unset-env-var-inside-a-value",
    ),
    pytest.param(
        {"authorization.clients[0].client_secret_file": "claude.secret"},
        "authorization.clients[0].client_secret",
        "set exactly one of client_secret, client_secret_file, jwks or jwks_uri",
        id="client-secret-and-file",
    ),
    pytest.param(
        {"authorization.clients[0].client_secret": DELETE},
        "authorization.clients[0].client_secret",
        "set exactly one of client_secret, client_secret_file, jwks or jwks_uri",
        id="client-secret-neither",
    ),
    pytest.param(
        {"authorization.clients[0].client_secret": "too-short"},
        "authorization.clients[0].client_secret",
        "must be at least 16 characters",
        id="client-secret-short",
    ),
    pytest.param(
        {"authorization.clients[0].client_id": DELETE},
        "authorization.clients[0].client_id",
        "is required",
        id="client-id-missing",
    ),
    pytest.param(
        {"authorization.clients": [CLIENT, CLIENT]},
        "authorization.clients[1].client_id",
        "duplicate client_id 'claude-enterprise'",
        id="duplicate-client-id",
    ),
    pytest.param(
        {"authorization.clients": []}, "authorization.clients", "must be a non-empty list", id="clients-empty"
    ),
    pytest.param({"authorization": DELETE}, "authorization.clients", "is required", id="authorization-missing"),
    pytest.param({"authorization": []}, "authorization", "must be a mapping, got list", id="authorization-wrong-type"),
    pytest.param(
        {"authorization.identity_providers[0].algorithms": ["RS256", "HS256"]},
        "authorization.identity_providers[0].algorithms",
        "'HS256' is not allowed",
        id="idp-algorithm-hs256",
    ),
    pytest.param(
        {"authorization.identity_providers[0].algorithms": ["none"]},
        "authorization.identity_providers[0].algorithms",
        "'none' is not allowed",
        id="idp-algorithm-none",
    ),
    pytest.param(
        {"authorization.identity_providers[0].issuer": "https://mcp.example.com"},
        "authorization.identity_providers[0].issuer",
        "must not be the gateway's own issuer",
        id="idp-issuer-is-gateway",
    ),
    pytest.param(
        {"authorization.identity_providers[0].issuer": "https://MCP.example.com:443/"},
        "authorization.identity_providers[0].issuer",
        "must not be the gateway's own issuer",
        id="idp-issuer-is-gateway-spelled-differently",
    ),
    pytest.param(
        {
            "authorization.issuer": "https://mcp.example.com/as",
            "authorization.identity_providers[0].issuer": "https://mcp.example.com/as/",
        },
        "authorization.identity_providers[0].issuer",
        "must not be the gateway's own issuer",
        id="idp-issuer-is-configured-issuer",
    ),
    pytest.param(
        {"authorization.identity_providers[0].issuer": 42},
        "authorization.identity_providers[0].issuer",
        "must be a non-empty string, got int",
        id="idp-issuer-wrong-type",
    ),
    pytest.param(
        {"authorization.identity_providers": [IDP, IDP]},
        "authorization.identity_providers[1].issuer",
        "duplicate identity provider",
        id="duplicate-idp",
    ),
    pytest.param(
        {"authorization.identity_providers[0].jwks_uri": "keys.json"},
        "authorization.identity_providers[0].jwks_uri",
        "must be an absolute http(s) URL",
        id="idp-jwks-uri-relative",
    ),
    pytest.param(
        {"authorization.identity_providers": DELETE},
        "authorization.identity_providers",
        "is required",
        id="idps-missing",
    ),
    pytest.param(
        {"authorization.issuer": "https://auth.example.com"},
        "authorization.issuer",
        "must have the same origin (scheme, host, port) as public_url",
        id="issuer-other-host",
    ),
    pytest.param(
        {"authorization.issuer": "https://mcp.example.com:8443"},
        "authorization.issuer",
        "must have the same origin",
        id="issuer-other-port",
    ),
    pytest.param(
        {"authorization.access_token_ttl_seconds": "300"},
        "authorization.access_token_ttl_seconds",
        "must be an integer, got str",
        id="ttl-string",
    ),
    pytest.param(
        {"authorization.access_token_ttl_seconds": True},
        "authorization.access_token_ttl_seconds",
        "must be an integer, got bool",
        id="ttl-bool",
    ),
    pytest.param(
        {"authorization.access_token_ttl_seconds": 5},
        "authorization.access_token_ttl_seconds",
        "must be between 30 and 3600, got 5",
        id="ttl-too-short",
    ),
    pytest.param(
        {"limits": {"upstream_timeout_seconds": "5m"}},
        "limits.upstream_timeout_seconds",
        "must be a number, got str",
        id="timeout-string",
    ),
    pytest.param({"limits": [1]}, "limits", "must be a mapping, got list", id="limits-wrong-type"),
    pytest.param({"routes": DELETE}, "routes", "is required", id="routes-missing"),
    pytest.param({"routes": []}, "routes", "must be a non-empty list", id="routes-empty"),
    pytest.param({"routes": {"linear": {}}}, "routes", "must be a non-empty list", id="routes-mapping"),
    pytest.param({"routes[0]": "linear"}, "routes[0]", "must be a mapping, got str", id="route-not-a-mapping"),
    pytest.param({"allowed_origins": ["*"]}, "allowed_origins", "'*' is not allowed", id="allowed-origins-star"),
    pytest.param(
        {"allowed_origins": ["https://app.example.com/chat"]},
        "allowed_origins",
        "must contain origins like",
        id="allowed-origin-with-path",
    ),
    pytest.param({"logging": {"format": "xml"}}, "logging.format", "must be one of text, json", id="log-format"),
    pytest.param({"logging": {"level": "debug"}}, "logging.level", "unknown key", id="log-level-is-a-flag"),
]


@pytest.mark.parametrize(("edits", "key", "problem"), INVALID)
def test_invalid_config_names_key_path_and_problem(
    edits: dict[str, Any], key: str, problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(UNSET_VAR, raising=False)
    error = rejection(edited(edits))
    assert error.key == key
    assert problem in error.problem
    assert str(error) == f"{SOURCE}: {key}: {error.problem}"
    assert "\n" not in str(error)


@pytest.mark.parametrize(
    "path",
    [
        "/.well-known",
        "/.well-known/x",
        "/oauth2",
        "/oauth2/token",
        "/healthz",
        "/readyz",
        "/metrics/x",
        "/approvals/mcp",
    ],
)
def test_route_path_may_not_shadow_the_gateways_own_endpoints(path: str) -> None:
    error = rejection(edited({"routes[1].path": path}))
    assert error.key == "routes[1].path"
    assert "collides with the gateway's own" in error.problem


def test_secret_values_are_not_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_GATEWAY_TEST_SHORT", "short-secret")
    error = rejection(edited({"authorization.clients[0].client_secret": "${MCP_GATEWAY_TEST_SHORT}"}))
    assert "short-secret" not in str(error)
    error = rejection(edited({"routes[0].upstream": "http://user:hunter2-password@linear-mcp/mcp"}))
    assert "hunter2" not in str(error)


def test_non_mapping_top_level() -> None:
    error = rejection(["public_url", "routes"])
    assert (error.key, error.problem) == ("(top level)", "must be a mapping, got list")


# -- files: YAML syntax, encodings, and paths relative to the config file ------------------------------

# (file content, the error's key path, text the problem must contain)
INVALID_FILES = [
    pytest.param(
        'public_url: "https://mcp.example.com"\nroutes:\n  - name: linear\n     path: /linear/mcp\n',
        "",
        "invalid YAML: line 4, column 10: mapping values are not allowed here",
        id="bad-indentation",
    ),
    pytest.param(
        'public_url: "https://mcp.example.com\nroutes: []\n',
        "",
        "invalid YAML: line 3, column 1: found unexpected end of stream",
        id="unclosed-quote",
    ),
    pytest.param(
        'public_url: "https://a.example.com"\nlisten: "0.0.0.0:8080"\npublic_url: "https://b.example.com"\n',
        "",
        "invalid YAML: line 3, column 1: duplicate key 'public_url'",
        id="duplicate-top-level-key",
    ),
    pytest.param(
        "routes:\n  - name: linear\n    allow_groups: [engineering]\n    allow_groups: []\n",
        "",
        "invalid YAML: line 4, column 5: duplicate key 'allow_groups'",
        id="duplicate-nested-key",
    ),
    pytest.param("public_url: 2001-02-30\n", "", "invalid YAML: day is out of range for month", id="impossible-date"),
    pytest.param(b"public_url: \xff\xfe\n", "", "not UTF-8 text (byte 12)", id="not-utf-8"),
    pytest.param("- public_url\n- routes\n", "(top level)", "must be a mapping, got list", id="top-level-list"),
    pytest.param("just a string\n", "(top level)", "must be a mapping, got str", id="top-level-scalar"),
    pytest.param("", "(top level)", "must be a mapping, got nothing", id="empty-file"),
    pytest.param("# only comments\n", "(top level)", "must be a mapping, got nothing", id="only-comments"),
]


@pytest.mark.parametrize(("content", "key", "problem"), INVALID_FILES)
def test_invalid_file(content: str | bytes, key: str, problem: str, tmp_path: Path) -> None:
    path = write(tmp_path / "gw.yaml", content)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    error = caught.value
    assert (error.key, error.problem) == (key, problem)
    assert str(error) == (f"{path}: {key}: {problem}" if key else f"{path}: {problem}")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: cannot read file: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert str(caught.value) == f"{tmp_path}: cannot read file: Is a directory"


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    routes = valid_config()["routes"]
    text = yaml.safe_dump({**valid_config(), "routes": []}).replace("routes: []\n", "")
    text += "routes:\n  - &linear " + yaml.safe_dump(routes[0], default_flow_style=True)
    text += "  - <<: *linear\n    name: linear2\n    path: /linear2/mcp\n"
    config = load_config(write(tmp_path / "gw.yaml", text))
    assert [(r.name, r.path, r.allow_groups) for r in config.routes] == [
        ("linear", "/linear/mcp", ("engineering",)),
        ("linear2", "/linear2/mcp", ("engineering",)),
    ]


def _config_with_client(tmp_path: Path, client: dict[str, Any], **authorization: Any) -> Path:
    data = edited({"authorization.clients": [client]})
    data["authorization"].update(authorization)
    return write(tmp_path / "conf" / "gw.yaml", yaml.safe_dump(data))


def test_client_secret_file_is_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "conf" / "secrets" / "claude", f"  {SECRET}\n")
    path = _config_with_client(tmp_path, {"client_id": "claude", "client_secret_file": "secrets/claude"})
    monkeypatch.chdir(tmp_path)  # not the config's directory
    config = load_config(path.relative_to(tmp_path))
    assert config.authorization.clients[0].client_secret.value == SECRET


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param(None, "cannot read: No such file or directory", id="missing"),
        pytest.param("short\n", "must be at least 16 characters", id="short"),
        pytest.param(b"\xff" * 20, "must contain UTF-8 text", id="not-utf-8"),
    ],
)
def test_bad_client_secret_file(content: str | bytes | None, problem: str, tmp_path: Path) -> None:
    if content is not None:
        write(tmp_path / "conf" / "claude.secret", content)
    path = _config_with_client(tmp_path, {"client_id": "claude", "client_secret_file": "claude.secret"})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert (caught.value.key, caught.value.problem) == ("authorization.clients[0].client_secret_file", problem)


def test_signing_key_file_not_found(tmp_path: Path) -> None:
    path = _config_with_client(tmp_path, CLIENT, signing_key_file="keys/signing.pem")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    error = caught.value
    assert error.key == "authorization.signing_key_file"
    assert error.problem == f"file not found: {tmp_path / 'conf' / 'keys' / 'signing.pem'}"


def test_signing_key_file_is_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = write(tmp_path / "conf" / "keys" / "signing.pem", "load_config only resolves it; check loads it\n")
    path = _config_with_client(tmp_path, CLIENT, signing_key_file="keys/signing.pem")
    monkeypatch.chdir(tmp_path)
    assert load_config(path.relative_to(tmp_path)).authorization.signing_key_file == str(key)


# -- happy paths ---------------------------------------------------------------------------------------


def test_example_config_parses_as_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAUDE_CLIENT_SECRET", SECRET)
    config = load_config(EXAMPLE)
    auth = config.authorization
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 8080)
    assert config.public_url == "https://mcp.example.com"
    assert auth.issuer == "https://mcp.example.com"
    assert auth.signing_key_file is None
    assert auth.access_token_ttl_seconds == 300
    assert [(c.client_id, c.client_secret.value) for c in auth.clients] == [("claude-enterprise", SECRET)]
    (idp,) = auth.identity_providers
    assert (idp.issuer, idp.jwks_uri, idp.groups_claim) == (
        "https://acme.okta.com",
        "https://acme.okta.com/oauth2/v1/keys",
        "groups",
    )
    assert idp.algorithms == ASYMMETRIC_ALGORITHMS
    (route,) = config.routes
    assert (route.name, route.path, route.upstream, route.transport, route.allow_groups) == (
        "linear",
        "/linear/mcp",
        "http://linear-mcp:3000/mcp",
        "streamable-http",
        ("engineering",),
    )
    assert route.resource == "https://mcp.example.com/linear/mcp"
    assert route.scopes == ("mcp",)


def test_example_config_has_the_contracts_shape() -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    assert set(raw) == {"listen", "public_url", "authorization", "routes"}
    assert set(raw["authorization"]) == {"issuer", "access_token_ttl_seconds", "clients", "identity_providers"}
    assert raw["authorization"]["clients"][0] == {
        "client_id": "claude-enterprise",
        "client_secret": "${CLAUDE_CLIENT_SECRET}",
    }
    assert set(raw["authorization"]["identity_providers"][0]) == {"issuer", "jwks_uri", "groups_claim"}
    assert set(raw["routes"][0]) == {"name", "path", "upstream", "transport", "allow_groups"}


def test_minimal_config_gets_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_CLIENT_SECRET", SECRET)
    config = load_config(MINIMAL)
    auth = config.authorization
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 8080)
    assert auth.issuer == config.public_url == "https://mcp.example.com"
    assert auth.signing_key_file is None
    assert (auth.access_token_ttl_seconds, auth.clock_skew_seconds, auth.max_assertion_lifetime_seconds) == (
        300,
        60,
        600,
    )
    (idp,) = auth.identity_providers
    assert (idp.jwks_uri, idp.groups_claim, idp.algorithms, idp.tenant) == (None, "groups", ASYMMETRIC_ALGORITHMS, None)
    (route,) = config.routes
    assert route.transport == "streamable-http"
    assert route.scopes == ("mcp",)
    assert route.allow_groups is None
    assert route.upstream_headers == ()
    assert route.resource == config.public_url + route.path
    assert config.allowed_origins == ("https://mcp.example.com",)
    assert config.limits == LimitsConfig()


def test_every_route_gets_its_resource_and_defaults() -> None:
    config = parse_config(valid_config(), source=SOURCE)
    assert [(r.name, r.transport, r.resource, r.scopes) for r in config.routes] == [
        ("linear", "streamable-http", "https://mcp.example.com/linear/mcp", ("mcp",)),
        ("github", "streamable-http", "https://mcp.example.com/github/mcp", ("mcp",)),
        ("wiki", "sse", "https://mcp.example.com/wiki/sse", ("mcp",)),
    ]


def test_public_url_is_normalised_for_resources() -> None:
    config = parse_config(edited({"public_url": "https://MCP.example.com:443/"}), source=SOURCE)
    assert config.public_url == "https://mcp.example.com:443"
    assert config.routes[0].resource == "https://mcp.example.com/linear/mcp"
    assert config.allowed_origins == ("https://mcp.example.com",)


def test_extension_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_GATEWAY_TEST_API_KEY", "upstream-api-key-value")
    config = parse_config(
        edited(
            {
                "allowed_origins": ["https://claude.ai"],
                "limits": {"max_request_bytes": 2048, "stream_idle_timeout_seconds": 30},
                "authorization.clock_skew_seconds": 0,
                "authorization.max_assertion_lifetime_seconds": 300,
                "authorization.identity_providers[0].algorithms": ["ES256"],
                "authorization.identity_providers[0].tenant": "acme",
                "routes[0].scopes": ["mcp", "mcp:admin"],
                "routes[0].upstream_headers": {"X-Api-Key": "${MCP_GATEWAY_TEST_API_KEY}"},
            }
        ),
        source=SOURCE,
    )
    assert config.allowed_origins == ("https://claude.ai",)
    assert config.limits == LimitsConfig(max_request_bytes=2048, stream_idle_timeout_seconds=30)
    assert (config.authorization.clock_skew_seconds, config.authorization.max_assertion_lifetime_seconds) == (0, 300)
    idp = config.authorization.identity_providers[0]
    assert (idp.algorithms, idp.tenant) == (("ES256",), "acme")
    route = config.routes[0]
    assert route.scopes == ("mcp", "mcp:admin")
    assert [(n, s.value) for n, s in route.upstream_headers] == [("X-Api-Key", "upstream-api-key-value")]


def test_env_expansion_inside_a_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_GATEWAY_TEST_HOST", "linear-mcp.internal")
    config = parse_config(edited({"routes[0].upstream": "http://${MCP_GATEWAY_TEST_HOST}:3000/mcp"}), source=SOURCE)
    assert config.routes[0].upstream == "http://linear-mcp.internal:3000/mcp"


# -- secrets never show ----------------------------------------------------------------------------------


def _config_with_secrets() -> GatewayConfig:
    return parse_config(edited({"routes[0].upstream_headers": {"X-Api-Key": "header-secret-7d1e"}}), source=SOURCE)


def test_secret_never_shows_its_value(caplog: pytest.LogCaptureFixture) -> None:
    secret = Secret(SECRET)
    client = ClientConfig("claude-enterprise", secret)
    logging.getLogger("gateway.test").warning("logged by mistake: %s %r", secret, client)
    for rendered in (repr(secret), str(secret), f"{secret}", repr(client), str(client), caplog.text):
        assert SECRET not in rendered
    assert secret.value == SECRET
    assert repr(secret) == "Secret(***)"


def test_config_repr_hides_every_secret() -> None:
    rendered = repr(_config_with_secrets())
    assert SECRET not in rendered
    assert "header-secret-7d1e" not in rendered


def test_describe_shows_the_route_table_without_secrets() -> None:
    lines: list[str] = []
    describe(_config_with_secrets(), emit=lines.append)
    text = "\n".join(lines)
    assert SECRET not in text
    assert "header-secret-7d1e" not in text
    assert "clients: claude-enterprise" in lines
    assert (
        "  linear: /linear/mcp -> http://linear-mcp:3000/mcp [streamable-http] "
        "resource=https://mcp.example.com/linear/mcp scopes=mcp groups=engineering headers=X-Api-Key"
    ) in lines
    assert "  wiki: /wiki/sse -> http://wiki-mcp:8000/sse [sse] " in "\n".join(lines)
    assert any(line.startswith("signing key: EPHEMERAL") for line in lines)


# -- TLS (RFC 8414 §2, EMA §7.3 / §7.4.1, MCP authorization "Communication Security") --------------

PLAIN_HTTP_KEYS = {
    "public_url": "http://mcp.example.com",
    "authorization.issuer": "http://mcp.example.com",
    "authorization.identity_providers[0].issuer": "http://acme.okta.com",
    "authorization.identity_providers[0].jwks_uri": "http://acme.okta.com/keys",
}


@pytest.mark.parametrize("key", PLAIN_HTTP_KEYS)
def test_rfc8414_s2_plain_http_is_refused_off_loopback(key: str) -> None:
    error = rejection(edited({key: PLAIN_HTTP_KEYS[key]}))
    assert error.key == key
    assert "must be an https URL" in error.problem and "allow_insecure_http" in error.problem


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "[::1]", "localhost", "LOCALHOST", "idp.localhost"])
def test_rfc8414_s2_plain_http_is_allowed_on_loopback(host: str) -> None:
    config = parse_config(
        edited(
            {
                "public_url": f"http://{host}:8080",
                "authorization.identity_providers[0].issuer": f"http://{host}:9000",
                "authorization.identity_providers[0].jwks_uri": f"http://{host}:9000/jwks",
            }
        ),
        source=SOURCE,
    )
    assert config.public_url == f"http://{host.lower()}:8080"
    assert not config.allow_insecure_http


def test_rfc8414_s2_allow_insecure_http_is_an_explicit_loud_opt_out(caplog: pytest.LogCaptureFixture) -> None:
    data = edited({**PLAIN_HTTP_KEYS, "allow_insecure_http": True})
    config = parse_config(data, source=SOURCE)
    assert config.allow_insecure_http
    lines: list[str] = []
    describe(config, emit=lines.append)
    assert any(line.startswith("WARNING: allow_insecure_http") for line in lines)
    assert rejection(edited({"allow_insecure_http": "yes"})).key == "allow_insecure_http"


def test_hosts_are_lower_cased_when_the_config_is_loaded() -> None:
    config = parse_config(
        edited(
            {
                "public_url": "https://MCP.Example.COM",
                "authorization.issuer": "https://mcp.EXAMPLE.com",
                "authorization.identity_providers[0].issuer": "https://ACME.okta.com/oauth2/Default",
                "authorization.identity_providers[0].jwks_uri": "https://ACME.okta.com/Keys?Kind=X",
            }
        ),
        source=SOURCE,
    )
    idp = config.authorization.identity_providers[0]
    assert (config.public_url, config.authorization.issuer) == ("https://mcp.example.com",) * 2
    assert (idp.issuer, idp.jwks_uri) == ("https://acme.okta.com/oauth2/Default", "https://acme.okta.com/Keys?Kind=X")
