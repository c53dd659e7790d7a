"""Typed gateway configuration, loaded from YAML and validated with key paths.

The YAML key set is a public contract (see README "Configuration reference"). Every problem is
reported as ``<file>: <key path>: <problem>`` so an operator can fix it without reading code, and
unknown keys are errors: a typo such as ``alow_groups`` must never silently open a route to everyone.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from jose import jwk
from jose.exceptions import JWKError

from gateway.conditions import ConditionError, compile_cost
from gateway.mcp_methods import KINDS
from gateway.policy import RoutePolicy, RuleSet, describe_access, parse_rules
from gateway.quotas import QuotaRule, parse_quotas
from gateway.tool_pins import DRIFT_MODES, PinFileError, ToolPins, load_pins
from gateway.urls import canonical_url, origin_of

TRANSPORTS = ("streamable-http", "sse")
LOG_FORMATS = ("text", "json")
# python-jose implements these asymmetric JWS algorithms. HMAC is never accepted for IdP
# assertions: an HS* header verified against a public JWKS is the classic key-confusion attack
# (RFC 8725 §2.1, §3.1), and `none` is refused by EMA §7.4.1.
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512")
DEFAULT_IDP_ALGORITHMS = ASYMMETRIC_ALGORITHMS
# The Shared Signals push endpoint (RFC 8935), served only when a transmitter pushes.
SSF_PUSH_PATH = "/ssf/events"
# Paths the gateway serves itself; a route may not shadow them (nor be shadowed by them: the approval
# page, gateway/approvals/http.py, is matched before the routes). The Shared Signals push endpoint is
# reserved only when a transmitter pushes.
RESERVED_PREFIXES = ("/.well-known", "/oauth2", "/healthz", "/readyz", "/metrics", "/approvals")
SSF_DELIVERY_METHODS = ("push", "poll")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ROUTE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# ASCII only: str.isdigit() accepts characters such as '²' that int() then refuses.
_PORT = re.compile(r"^[0-9]{1,5}$")
_PASSWORD_PARAM = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)
# Headers the proxy owns; letting config set them would defeat token stripping or forwarding rules.
_FORBIDDEN_UPSTREAM_HEADERS = frozenset(
    {"host", "authorization", "content-length", "transfer-encoding", "connection", "mcp-session-id"}
)
# The proxy vouches for these itself, so they are stripped even when strip_request_headers is set.
ALWAYS_STRIPPED_REQUEST_HEADERS = ("X-Forwarded-*", "Forwarded", "X-Real-IP")
# Client headers that claim a network origin or an identity which frameworks and auth proxies put in
# front of servers commonly trust (or that rewrite the path or method an upstream sees): the gateway
# is an upstream's only client, so none of them may pass from a client. '*' ends a prefix.
DEFAULT_STRIP_REQUEST_HEADERS = (
    *ALWAYS_STRIPPED_REQUEST_HEADERS,
    "X-Client-IP",
    "X-Cluster-Client-IP",
    "True-Client-IP",
    "CF-Connecting-IP",
    "Fastly-Client-IP",
    "X-Original-Forwarded-For",
    "X-Remote-*",
    "Remote-*",
    "X-User",
    "X-User-*",
    "X-Email",
    "X-Auth-*",
    "X-Authenticated-*",
    "X-MCP-Identity",
    "X-Consumer-*",
    "X-Userinfo",
    "X-Id-Token",
    "X-Access-Token",
    "X-WebAuth-*",
    "X-Goog-Authenticated-*",
    "X-Amzn-Oidc-*",
    "X-MS-Client-Principal*",
    "X-SSL-Client-*",
    "X-Client-Cert*",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
)
_HEADER_PATTERN = re.compile(r"^[!#$%&'+.^_`|~0-9A-Za-z-]+\*?$")
# Stripping these would break MCP itself (Streamable HTTP transport headers).
_MCP_REQUEST_HEADERS = (
    "Accept",
    "Content-Type",
    "Last-Event-ID",
    "Mcp-Session-Id",
    "MCP-Protocol-Version",
    "Mcp-Method",
    "Mcp-Name",
)


class ConfigError(Exception):
    """A configuration problem, rendered as one line naming the file, key path and problem."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")


@dataclass(frozen=True)
class Secret:
    """A secret string whose repr never shows the value, so it cannot leak through logs or ``check``."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


@dataclass(frozen=True)
class ClientConfig:
    """A confidential client: it authenticates with a secret (``client_secret_basic``/``_post``) or,
    recommended, with a JWT signed by its private key (``private_key_jwt``, RFC 7523 §2.2), whose
    public keys are given inline (``jwks``) or fetched (``jwks_uri``). Exactly one of the three."""

    client_id: str
    client_secret: Secret | None = None
    jwks: tuple[dict[str, Any], ...] | None = None
    jwks_uri: str | None = None


@dataclass(frozen=True)
class IdentityProviderConfig:
    issuer: str
    jwks_uri: str | None = None
    groups_claim: str = "groups"
    algorithms: tuple[str, ...] = DEFAULT_IDP_ALGORITHMS
    tenant: str | None = None
    # The ID-token bridge (gateway/oauth/id_token_bridge.py): OpenID Connect ID tokens of this IdP, with
    # one of these audiences, are accepted at the token endpoint (RFC 8693) until it issues ID-JAGs.
    accept_id_tokens: bool = False
    id_token_audiences: tuple[str, ...] = ()
    # Google Workspace: the ``hd`` claim an ID token must carry.
    hosted_domain: str | None = None
    # ``claims.groups``: where the groups are, as a path into the claims (``realm_access.roles``);
    # None: the claim named ``groups_claim``.
    groups_path: tuple[str, ...] | None = None

    @property
    def groups_location(self) -> tuple[str, ...]:
        return self.groups_path if self.groups_path is not None else (self.groups_claim,)


@dataclass(frozen=True)
class TokenRateLimitConfig:
    """Token endpoint requests per client (EMA §7.5.1 SHOULD); ``requests_per_minute: 0`` disables it."""

    requests_per_minute: int = 60
    burst: int = 20


@dataclass(frozen=True)
class AuthorizationConfig:
    issuer: str
    identity_providers: tuple[IdentityProviderConfig, ...]
    clients: tuple[ClientConfig, ...]
    signing_key_file: str | None = None
    access_token_ttl_seconds: int = 300
    clock_skew_seconds: int = 60
    max_assertion_lifetime_seconds: int = 600
    previous_signing_key_files: tuple[str, ...] = ()
    token_rate_limit: TokenRateLimitConfig = TokenRateLimitConfig()
    # RFC 9449 §8, §9: every DPoP proof (token endpoint and resources) must carry a server nonce.
    dpop_require_nonce: bool = False


@dataclass(frozen=True)
class RevokedSubject:
    """A ``revoked.subjects`` entry: a user of one IdP (draft-ietf-oauth-identity-assertion-authz-grant
    §6.3: ``sub`` is unique only per issuer, and per tenant there). ``tenant`` None revokes the subject
    in every tenant of the IdP, since revocation should err towards refusing. ``bare``: written as a
    plain ``sub``, which names a user only while exactly one IdP is configured."""

    issuer: str
    subject: str
    tenant: str | None = None
    bare: bool = False


@dataclass(frozen=True)
class TransmitterConfig:
    """A ``shared_signals.transmitters`` entry: an OpenID Shared Signals Framework 1.0 transmitter whose
    Security Event Tokens (RFC 8417) the gateway accepts, pushed to it (RFC 8935) or polled (RFC 8936)."""

    issuer: str
    audience: str
    delivery: str = "push"
    poll_interval_seconds: float = 10.0
    # Poll delivery: the stream's endpoint (SSF 1.0 stream configuration ``delivery.endpoint_url``).
    poll_endpoint: str | None = None
    # The Authorization header value the transmitter must send with a push, or that we send with a poll.
    push_authorization: Secret | None = None
    poll_authorization: Secret | None = None


@dataclass(frozen=True)
class IdentityHeaderConfig:
    """``routes[].identity_header``: a short-lived JWT naming the caller, signed with the gateway's key
    and sent to the upstream on every forwarded request (gateway/proxy/identity_header.py)."""

    name: str = "X-MCP-Identity"
    ttl_seconds: int = 60
    audience: str = ""


@dataclass(frozen=True)
class UpstreamAuthorizationConfig:
    """``routes[].upstream_authorization`` of ``type: id-jag``: the upstream is itself an EMA resource, and
    the gateway obtains a per-user token there by chaining the client's ID-JAG
    (draft-parecki-oauth-identity-assertion-gateways; gateway/oauth/chain.py)."""

    idp_token_endpoint: str
    client_id: str
    client_secret: Secret
    upstream_issuer: str
    upstream_client_id: str
    upstream_client_secret: Secret
    type: str = "id-jag"


@dataclass(frozen=True)
class RouteConfig:
    name: str
    path: str
    upstream: str
    resource: str
    transport: str = "streamable-http"
    allow_groups: tuple[str, ...] | None = None
    scopes: tuple[str, ...] = ("mcp",)
    # What an ID-JAG without a ``scope`` claim is granted (``IdJagValidator._check_scope``).
    default_scopes: tuple[str, ...] = ("mcp",)
    upstream_headers: tuple[tuple[str, Secret], ...] = ()
    max_connections: int = 256
    policy: RoutePolicy = field(default_factory=RoutePolicy.unrestricted, compare=False)
    quotas: tuple[QuotaRule, ...] = field(default=(), compare=False)
    identity_header: IdentityHeaderConfig | None = None
    upstream_authorization: UpstreamAuthorizationConfig | None = None
    # RFC 9449 §7.1: only DPoP-bound tokens with a proof are accepted here (RFC 9728
    # dpop_bound_access_tokens_required).
    require_dpop: bool = False
    # The lock file of ``mcp-gateway pin`` (gateway/tool_pins.py) and what a drift from it does.
    tool_pins: ToolPins | None = field(default=None, compare=False)
    on_tool_drift: str = "hide"


@dataclass(frozen=True)
class LimitsConfig:
    max_request_bytes: int = 4 * 1024 * 1024
    upstream_connect_timeout_seconds: float = 5.0
    upstream_timeout_seconds: float = 300.0
    stream_keepalive_seconds: float = 15.0
    stream_idle_timeout_seconds: float = 0.0
    request_body_timeout_seconds: float = 30.0
    request_header_timeout_seconds: float = 10.0
    max_client_connections: int = 10_000
    max_streams_per_principal: int = 32
    upstream_pool_timeout_seconds: float = 5.0


@dataclass(frozen=True)
class GatewayConfig:
    source: str
    listen_host: str
    listen_port: int
    public_url: str
    authorization: AuthorizationConfig
    routes: tuple[RouteConfig, ...]
    allowed_origins: tuple[str, ...]
    limits: LimitsConfig = LimitsConfig()
    metrics_listen: tuple[str, int] | None = None
    # "memory" or a redis://, rediss:// or unix:// URL; it may carry a Redis password, hence repr=False.
    replay_store: str = field(default="memory", repr=False)
    revoked_subjects: frozenset[RevokedSubject] = frozenset()
    revoked_clients: frozenset[str] = frozenset()
    transmitters: tuple[TransmitterConfig, ...] = ()
    audit_sink: str = "stdout"
    audit_argument_hashes: bool = False
    shutdown_grace_seconds: float = 20.0
    reload_watch_seconds: float = 2.0
    strip_request_headers: tuple[str, ...] = DEFAULT_STRIP_REQUEST_HEADERS
    logging_format: str = "text"
    # Plain-http public_url, issuers and JWKS URLs on non-loopback hosts (test setups only).
    allow_insecure_http: bool = False
    # Base URL of an OTLP/HTTP receiver for traces (gateway/telemetry.py); None: tracing off.
    telemetry_otlp_endpoint: str | None = None


class _Node:
    """A mapping being read, which remembers its key path and which keys were consumed."""

    def __init__(self, source: str, path: str, data: Any) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(source, path or "(top level)", f"must be a mapping, got {_kind(data)}")
        self.source = source
        self.path = path
        self.data = data
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), problem)

    def raw(self, name: str) -> Any:
        self.seen.add(name)
        return self.data.get(name)

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.raw(name)
        if value is None:
            if required:
                raise self.error(name, "is required")
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.error(name, f"must be a non-empty string, got {_kind(value)}")
        return self.expand(name, value)

    def number(self, name: str, default: float, *, minimum: float, maximum: float, integer: bool = True) -> Any:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
            raise self.error(name, f"must be {'an integer' if integer else 'a number'}, got {_kind(value)}")
        if not minimum <= value <= maximum:
            raise self.error(name, f"must be between {minimum:g} and {maximum:g}, got {value}")
        return value

    def string_list(self, name: str) -> tuple[str, ...] | None:
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(name, "must be a list of non-empty strings")
        return tuple(self.expand(name, v) for v in value)

    def children(self, name: str, *, required: bool = False) -> list[_Node]:
        value = self.raw(name)
        if value is None:
            if required:
                raise self.error(name, "is required (a non-empty list)")
            return []
        if not isinstance(value, list) or (required and not value):
            raise self.error(name, "must be a non-empty list")
        return [_Node(self.source, f"{self.key(name)}[{i}]", item) for i, item in enumerate(value)]

    def child(self, name: str) -> _Node:
        value = self.raw(name)
        return _Node(self.source, self.key(name), {} if value is None else value)

    def expand(self, name: str, value: str) -> str:
        """Expand ``${VAR}`` from the environment; an unset variable is an error, not an empty string."""

        def substitute(match: re.Match[str]) -> str:
            var = match.group(1)
            if var not in os.environ:
                raise self.error(name, f"environment variable {var} is not set")
            return os.environ[var]

        return _ENV_REF.sub(substitute, value)

    def finish(self) -> None:
        unknown = sorted(str(k) for k in self.data if k not in self.seen)
        if unknown:
            raise self.error(unknown[0], "unknown key (check the spelling; see the configuration reference)")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys. PyYAML silently keeps the last one, so a second
    ``allow_groups`` or ``public_url`` further down a file would quietly replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable; SafeLoader reports it below
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def load_config(path: str | os.PathLike[str], *, read_tool_pins: bool = True) -> GatewayConfig:
    """Read and validate a config file; raises ConfigError for every user-facing problem.
    ``read_tool_pins=False`` (``mcp-gateway pin``, which writes them) leaves the routes' lock files unread."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        # Not an OSError: without this a binary or Latin-1 file ended in a traceback.
        raise ConfigError(source, "", f"not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(source, "", f"invalid YAML: {where}{getattr(exc, 'problem', exc)}") from None
    except ValueError as exc:
        # SafeLoader builds dates itself and raises ValueError for one like 2001-02-30.
        raise ConfigError(source, "", f"invalid YAML: {exc}") from None
    return parse_config(data, source=source, base_dir=Path(path).resolve().parent, read_tool_pins=read_tool_pins)


def parse_config(
    data: Any, *, source: str = "<config>", base_dir: Path | None = None, read_tool_pins: bool = True
) -> GatewayConfig:
    """Validate an already-parsed YAML document (used by tests and the demo)."""
    root = _Node(source, "", data)
    host, port = _parse_listen(root)
    allow_insecure_http = root.raw("allow_insecure_http")
    if allow_insecure_http is not None and not isinstance(allow_insecure_http, bool):
        raise root.error("allow_insecure_http", "must be true or false")
    insecure_ok = bool(allow_insecure_http)
    public_url = _url(root, "public_url", required=True, tls=not insecure_ok)
    assert public_url is not None
    public_url = public_url.rstrip("/")
    if urlsplit(public_url).path or urlsplit(public_url).query or urlsplit(public_url).fragment:
        # Route resources, metadata and the token endpoint all hang off the origin.
        raise root.error("public_url", "must be an origin like https://mcp.example.com (no path, query or fragment)")
    origins = root.string_list("allowed_origins")
    allowed_origins = tuple(_origin(root, o) for o in origins) if origins is not None else (origin_of(public_url),)
    limits = _parse_limits(root.child("limits"))
    authorization = _parse_authorization(root.child("authorization"), public_url, base_dir, insecure_ok)
    routes = _parse_routes(root, public_url, base_dir, insecure_ok, read_tool_pins)
    # A separate, unauthenticated listener for Prometheus (keeps /metrics off the public port).
    metrics_listen = _parse_listen(root, "metrics_listen", None) if root.data.get("metrics_listen") else None
    if metrics_listen is None:
        root.seen.add("metrics_listen")
    elif metrics_listen == (host, port):
        raise root.error("metrics_listen", "must differ from listen")
    replay_store = _parse_replay_store(root)
    revoked = root.child("revoked")
    revoked_subjects = _parse_revoked_subjects(revoked, authorization.identity_providers)
    revoked_clients = frozenset(revoked.string_list("clients") or ())
    revoked.finish()
    transmitters = _parse_shared_signals(root.child("shared_signals"), public_url, base_dir, insecure_ok)
    if any(t.delivery == "push" for t in transmitters):
        for i, route in enumerate(routes):
            if _overlaps(SSF_PUSH_PATH, route.path):
                raise ConfigError(
                    source, f"routes[{i}].path", f"collides with the Shared Signals push endpoint {SSF_PUSH_PATH}"
                )
    audit = root.child("audit")
    audit_sink = audit.string("sink", "stdout")
    assert audit_sink is not None
    if audit_sink not in ("stdout", "otlp"):
        audit_sink = str(_resolve(base_dir, audit_sink))
    audit_hashes = audit.raw("argument_hashes")
    if audit_hashes is not None and not isinstance(audit_hashes, bool):
        raise audit.error("argument_hashes", "must be true or false")
    audit.finish()
    shutdown_grace = root.number("shutdown_grace_seconds", 20.0, minimum=0, maximum=3600, integer=False)
    reload_node = root.child("reload")
    watch = reload_node.number("watch_interval_seconds", 2.0, minimum=0, maximum=3600, integer=False)
    reload_node.finish()
    strip_request_headers = _parse_strip_request_headers(root)
    logging_node = root.child("logging")
    logging_format = logging_node.string("format", "text")
    if logging_format not in LOG_FORMATS:
        raise logging_node.error("format", f"must be one of {', '.join(LOG_FORMATS)}, got {logging_format!r}")
    logging_node.finish()
    telemetry_otlp_endpoint = _parse_telemetry(root.child("telemetry"))
    if audit_sink == "otlp" and telemetry_otlp_endpoint is None:
        raise audit.error("sink", "otlp sends audit lines to telemetry.otlp_endpoint, which is not set")
    root.finish()
    return GatewayConfig(
        source=source,
        listen_host=host,
        listen_port=port,
        public_url=public_url,
        authorization=authorization,
        routes=routes,
        allowed_origins=allowed_origins,
        limits=limits,
        metrics_listen=metrics_listen,
        replay_store=replay_store,
        revoked_subjects=revoked_subjects,
        revoked_clients=revoked_clients,
        transmitters=transmitters,
        audit_sink=audit_sink,
        audit_argument_hashes=bool(audit_hashes),
        shutdown_grace_seconds=shutdown_grace,
        reload_watch_seconds=watch,
        strip_request_headers=strip_request_headers,
        logging_format=logging_format,
        allow_insecure_http=insecure_ok,
        telemetry_otlp_endpoint=telemetry_otlp_endpoint,
    )


def _parse_listen(root: _Node, name: str = "listen", default: str | None = "0.0.0.0:8080") -> tuple[str, int]:
    listen = root.string(name, default, required=default is None)
    assert listen is not None
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not _PORT.match(port_text) or not 0 <= int(port_text) <= 65535:
        raise root.error(name, f"must be host:port, got {listen!r}")
    return host.strip("[]"), int(port_text)


# What telemetry.otlp_endpoint needs installed (the `otel` extra of the package).
OTEL_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter")


def _parse_telemetry(node: _Node) -> str | None:
    endpoint = _url(node, "otlp_endpoint")
    node.finish()
    if endpoint is not None and not all(_importable(module) for module in OTEL_MODULES):
        raise node.error(
            "otlp_endpoint", "needs the OpenTelemetry SDK and OTLP exporter: pip install 'mcp-auth-gateway[otel]'"
        )
    return endpoint


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _url(node: _Node, name: str, *, required: bool = False, tls: bool = False) -> str | None:
    """An absolute http(s) URL with its host lower-cased. ``tls``: it must be ``https`` unless the
    host is loopback (RFC 8414 §2 issuers, EMA §7.3 and §7.4.1 metadata and key endpoints, MCP
    authorization "Communication Security")."""
    value = node.string(name, required=required)
    if value is None:
        return None
    try:
        parts = urlsplit(value)
        _ = parts.port  # urlsplit accepts ':abc' and ':99999'; only reading .port rejects them
    except ValueError as exc:
        raise node.error(name, f"is not a valid URL ({exc})") from None
    if "#" in value:
        # urlsplit reports an empty fragment ('https://x#') as none, and canonical_url drops any:
        # a configured URL with one would not be the identifier it appears to be (RFC 8707 §2).
        raise node.error(name, "must not contain a fragment ('#')")
    if "@" in parts.netloc:
        # `check` prints URLs and the proxy logs them: credentials belong in upstream_headers (a Secret).
        raise node.error(name, "must not contain credentials (user:password@); use upstream_headers")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise node.error(name, f"must be an absolute http(s) URL, got {value!r}")
    if tls and parts.scheme != "https" and not is_loopback(parts.hostname):
        raise node.error(
            name,
            f"must be an https URL (tokens and keys must travel over TLS), got {value!r}; plain http is "
            "allowed for loopback hosts, or everywhere with allow_insecure_http: true (test setups only)",
        )
    scheme, _, rest = value.partition("://")
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    return f"{scheme}://{rest[:end].lower()}{rest[end:]}"


def is_loopback(host: str) -> bool:
    """``localhost`` (RFC 6761 §6.3) or a loopback address: traffic that never leaves the machine."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_replay_store(root: _Node) -> str:
    """``memory`` (one process) or a Redis URL shared by every replica (EMA §7.4.2 replay detection
    must hold across them). Unlike ``_url`` this accepts credentials: they are Redis AUTH, and
    ``redact_url`` keeps them out of ``check`` output and errors."""
    value = root.string("replay_store", "memory")
    assert value is not None
    if value == "memory":
        return value
    shown = redact_url(value)
    problem = f"must be 'memory' or a redis://, rediss:// or unix:// URL, got {shown!r}"
    if "@" in value:
        problem += " (percent-encode any '#', '/', '?' or '@' in the password)"
    try:
        parts = urlsplit(value)
        _ = parts.port  # urlsplit accepts ':abc' and ':99999'; only reading .port rejects them
    except ValueError:
        # Not the parser's message: it can quote part of a password (e.g. "... as 'hunter2'").
        raise root.error("replay_store", problem) from None
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise root.error("replay_store", problem)
        # redis-py reads the path as the database number and silently ignores anything else.
        if parts.path not in ("", "/") and not re.fullmatch(r"/[0-9]{1,5}", parts.path):
            raise root.error("replay_store", f"path must be a database number such as /0, got {shown!r}")
    elif parts.scheme != "unix" or not parts.path.startswith("/"):
        raise root.error("replay_store", problem)
    return value


def redact_url(url: str) -> str:
    """``url`` with any password (in the userinfo or a ``password=`` query item) replaced by ``***``.

    The userinfo ends at the *last* '@', found without URL parsing: an unencoded '#', '?' or '/'
    in a password must not push part of it into what gets printed as the host or path."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        # Without ':' the whole userinfo is hidden: it may be a password written where the user goes.
        rest = (userinfo.partition(":")[0] + ":***" if ":" in userinfo else "***") + "@" + rest
    return scheme + sep + _PASSWORD_PARAM.sub(r"\1***", rest)


def _origin(node: _Node, value: str) -> str:
    parts = urlsplit(value)
    if value == "*":
        raise node.error("allowed_origins", "'*' is not allowed: list the origins of your MCP web clients")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise node.error("allowed_origins", f"must contain origins like https://app.example.com, got {value!r}")
    return origin_of(value)


def _parse_strip_request_headers(root: _Node) -> tuple[str, ...]:
    patterns = root.string_list("strip_request_headers")
    if patterns is None:
        return DEFAULT_STRIP_REQUEST_HEADERS
    for pattern in patterns:
        if not _HEADER_PATTERN.match(pattern):
            raise root.error(
                "strip_request_headers", f"{pattern!r} is not a header name (or a prefix ending in '*', like X-Auth-*)"
            )
        prefix = pattern.lower().removesuffix("*")
        for needed in _MCP_REQUEST_HEADERS:
            if needed.lower() == prefix or (pattern.endswith("*") and needed.lower().startswith(prefix)):
                raise root.error("strip_request_headers", f"{pattern!r} would strip {needed}, which MCP needs")
    return patterns


def _parse_limits(node: _Node) -> LimitsConfig:
    limits = LimitsConfig(
        max_request_bytes=node.number("max_request_bytes", 4 * 1024 * 1024, minimum=1024, maximum=1 << 30),
        upstream_connect_timeout_seconds=node.number(
            "upstream_connect_timeout_seconds", 5.0, minimum=0.1, maximum=300, integer=False
        ),
        upstream_timeout_seconds=node.number(
            "upstream_timeout_seconds", 300.0, minimum=1, maximum=86400, integer=False
        ),
        stream_keepalive_seconds=node.number("stream_keepalive_seconds", 15.0, minimum=0, maximum=3600, integer=False),
        stream_idle_timeout_seconds=node.number(
            "stream_idle_timeout_seconds", 0.0, minimum=0, maximum=86400, integer=False
        ),
        request_body_timeout_seconds=node.number(
            "request_body_timeout_seconds", 30.0, minimum=0.1, maximum=3600, integer=False
        ),
        request_header_timeout_seconds=node.number(
            "request_header_timeout_seconds", 10.0, minimum=0.1, maximum=3600, integer=False
        ),
        max_client_connections=node.number("max_client_connections", 10_000, minimum=1, maximum=1_000_000),
        max_streams_per_principal=node.number("max_streams_per_principal", 32, minimum=1, maximum=100_000),
        upstream_pool_timeout_seconds=node.number(
            "upstream_pool_timeout_seconds", 5.0, minimum=0.01, maximum=300, integer=False
        ),
    )
    node.finish()
    return limits


def _parse_authorization(node: _Node, public_url: str, base_dir: Path | None, insecure_ok: bool) -> AuthorizationConfig:
    issuer = (_url(node, "issuer", tls=not insecure_ok) or public_url).rstrip("/")
    if origin_of(issuer) != origin_of(public_url):
        # The token endpoint lives on public_url, and MCP SDK clients refuse a token endpoint
        # whose origin differs from the issuer's (mcp client identity_assertion.py).
        raise node.error("issuer", "must have the same origin (scheme, host, port) as public_url")
    signing_key_file = node.string("signing_key_file")
    if signing_key_file is not None:
        signing_key_file = str(_resolve(base_dir, signing_key_file))
        if not Path(signing_key_file).is_file():
            raise node.error("signing_key_file", f"file not found: {signing_key_file}")
    # Key rotation: access tokens signed by these keys are still accepted (and the keys published)
    # until they expire, so replicas can switch keys one by one without refusing live tokens.
    previous_keys = []
    for value in node.string_list("previous_signing_key_files") or ():
        path = str(_resolve(base_dir, value))
        if not Path(path).is_file():
            raise node.error("previous_signing_key_files", f"file not found: {path}")
        previous_keys.append(path)
    if previous_keys and signing_key_file is None:
        raise node.error("previous_signing_key_files", "needs signing_key_file (the current key)")
    config = AuthorizationConfig(
        issuer=issuer,
        signing_key_file=signing_key_file,
        access_token_ttl_seconds=node.number("access_token_ttl_seconds", 300, minimum=30, maximum=3600),
        clock_skew_seconds=node.number("clock_skew_seconds", 60, minimum=0, maximum=300),
        max_assertion_lifetime_seconds=node.number("max_assertion_lifetime_seconds", 600, minimum=30, maximum=3600),
        previous_signing_key_files=tuple(previous_keys),
        token_rate_limit=_parse_token_rate_limit(node.child("token_rate_limit")),
        dpop_require_nonce=_parse_dpop(node.child("dpop")),
        clients=_parse_clients(node, base_dir, insecure_ok),
        identity_providers=_parse_idps(node, issuer, insecure_ok),
    )
    node.finish()
    return config


def _parse_dpop(node: _Node) -> bool:
    require_nonce = _flag(node, "require_nonce")
    node.finish()
    return require_nonce


def _flag(node: _Node, name: str) -> bool:
    value = node.raw(name)
    if value is not None and not isinstance(value, bool):
        raise node.error(name, "must be true or false")
    return bool(value)


def _parse_token_rate_limit(node: _Node) -> TokenRateLimitConfig:
    limit = TokenRateLimitConfig(
        requests_per_minute=node.number("requests_per_minute", 60, minimum=0, maximum=1_000_000),
        burst=node.number("burst", 20, minimum=1, maximum=1_000_000),
    )
    node.finish()
    return limit


def _parse_clients(node: _Node, base_dir: Path | None, insecure_ok: bool) -> tuple[ClientConfig, ...]:
    clients: list[ClientConfig] = []
    for item in node.children("clients", required=True):
        client_id = item.string("client_id", required=True)
        assert client_id is not None
        if any(c.client_id == client_id for c in clients):
            raise item.error("client_id", f"duplicate client_id {client_id!r}")
        given = [key for key in ("client_secret", "client_secret_file", "jwks", "jwks_uri") if key in item.data]
        if len(given) != 1:
            raise item.error(
                "client_secret",
                "set exactly one of client_secret, client_secret_file, jwks or jwks_uri (private_key_jwt)",
            )
        if given[0] == "jwks":
            clients.append(ClientConfig(client_id, jwks=_parse_client_jwks(item)))
        elif given[0] == "jwks_uri":
            clients.append(ClientConfig(client_id, jwks_uri=_url(item, "jwks_uri", tls=not insecure_ok)))
        else:
            clients.append(ClientConfig(client_id, client_secret=Secret(_client_secret(item, base_dir))))
        item.finish()
    return tuple(clients)


def _client_secret(item: _Node, base_dir: Path | None) -> str:
    secret = item.string("client_secret")
    secret_file = item.string("client_secret_file")
    secret_key = "client_secret" if secret_file is None else "client_secret_file"
    if secret_file is not None:
        try:
            secret = _resolve(base_dir, secret_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise item.error("client_secret_file", f"cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise item.error("client_secret_file", "must contain UTF-8 text") from None
    assert secret is not None
    if len(secret) < 16:
        # Name the key the secret came from, so a short file is not reported as client_secret.
        raise item.error(secret_key, "must be at least 16 characters")
    return secret


# Members of a private JWK (RFC 7518 §6.2.2, §6.3.2): a client's private key never belongs here.
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth"})
_JWK_ALGORITHM = {"RSA": "RS256", "P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}


def _parse_client_jwks(item: _Node) -> tuple[dict[str, Any], ...]:
    """A JWK Set (RFC 7517 §5) of the client's public signing keys, checked to be usable now."""
    value = item.raw("jwks")
    keys = value.get("keys") if isinstance(value, Mapping) else None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, Mapping) for k in keys):
        raise item.error("jwks", "must be a JWK Set: {keys: [ {kty: ..., ...}, ... ]}")
    for i, key in enumerate(keys):
        if _PRIVATE_JWK_MEMBERS & set(key):
            raise item.error(f"jwks.keys[{i}]", "is a private key: give the client's public key only")
        alg = _JWK_ALGORITHM.get(key.get("crv") if key.get("kty") == "EC" else key.get("kty"))
        if alg is None:
            raise item.error(f"jwks.keys[{i}]", "must be an RSA or EC (P-256, P-384, P-521) public key")
        try:
            jwk.construct(dict(key), key.get("alg", alg))
        except (JWKError, ValueError, TypeError) as exc:
            raise item.error(f"jwks.keys[{i}]", f"is not a usable key ({exc})") from None
    return tuple(dict(k) for k in keys)


def _parse_idps(node: _Node, own_issuer: str, insecure_ok: bool) -> tuple[IdentityProviderConfig, ...]:
    idps: list[IdentityProviderConfig] = []
    for item in node.children("identity_providers", required=True):
        issuer = _url(item, "issuer", required=True, tls=not insecure_ok)
        assert issuer is not None
        # Compared canonically: "https://MCP.example.com:443/" is still the gateway's own issuer.
        if canonical_url(issuer) == canonical_url(own_issuer):
            # ID-JAG draft "Cross-Domain Use": an AS must not redeem assertions it issued itself.
            raise item.error("issuer", "must not be the gateway's own issuer")
        if any(canonical_url(i.issuer) == canonical_url(issuer) for i in idps):
            raise item.error("issuer", f"duplicate identity provider {issuer!r}")
        algorithms = item.string_list("algorithms") or DEFAULT_IDP_ALGORITHMS
        for alg in algorithms:
            if alg not in ASYMMETRIC_ALGORITHMS:
                raise item.error(
                    "algorithms", f"{alg!r} is not allowed; choose from {', '.join(ASYMMETRIC_ALGORITHMS)}"
                )
        groups_claim = item.string("groups_claim", "groups")
        assert groups_claim is not None
        groups_path = _parse_idp_claims(item)
        accept_id_tokens = item.raw("accept_id_tokens")
        if accept_id_tokens is not None and not isinstance(accept_id_tokens, bool):
            raise item.error("accept_id_tokens", "must be true or false")
        audiences = item.string_list("id_token_audiences")
        hosted_domain = item.string("hosted_domain")
        if accept_id_tokens:
            if not audiences:
                raise item.error(
                    "id_token_audiences", "is required with accept_id_tokens: the client ids ID tokens are issued to"
                )
        else:
            for key in ("id_token_audiences", "hosted_domain"):
                if item.data.get(key) is not None:
                    raise item.error(key, "applies only with accept_id_tokens: true")
        idps.append(
            IdentityProviderConfig(
                issuer=issuer,
                jwks_uri=_url(item, "jwks_uri", tls=not insecure_ok),
                groups_claim=groups_claim,
                algorithms=algorithms,
                tenant=item.string("tenant"),
                accept_id_tokens=bool(accept_id_tokens),
                id_token_audiences=audiences or (),
                hosted_domain=hosted_domain,
                groups_path=groups_path,
            )
        )
        item.finish()
    return tuple(idps)


def _parse_idp_claims(item: _Node) -> tuple[str, ...] | None:
    """``claims: {groups: <path>}``: a dot-separated path into the token's claims (Keycloak puts roles
    in ``realm_access.roles``). ``groups_claim`` names one claim, dots included, so only one may be set."""
    if "claims" not in item.data:
        return None
    node = item.child("claims")
    path = node.string("groups", required=True)
    assert path is not None
    if "groups_claim" in item.data:
        raise item.error("claims", "set either groups_claim or claims.groups, not both")
    parts = tuple(path.split("."))
    if not all(parts):
        raise node.error(
            "groups", f"must be a claim name or a dot-separated path such as realm_access.roles, got {path!r}"
        )
    node.finish()
    return parts


def _parse_revoked_subjects(revoked: _Node, idps: tuple[IdentityProviderConfig, ...]) -> frozenset[RevokedSubject]:
    """Entries are ``{issuer, sub[, tenant]}``; a bare ``sub`` string only with exactly one IdP."""
    entries = revoked.raw("subjects")
    if entries is None:
        return frozenset()
    if not isinstance(entries, list):
        raise revoked.error("subjects", "must be a list of {issuer, sub, tenant} entries")
    subjects: list[RevokedSubject] = []
    for i, entry in enumerate(entries):
        key = f"subjects[{i}]"
        if isinstance(entry, str) and entry:
            if len(idps) != 1:
                raise revoked.error(
                    key,
                    f"a bare subject is ambiguous with {len(idps)} identity providers (a sub is unique only "
                    f"per issuer): write {{issuer: ..., sub: {entry!r}}}",
                )
            subjects.append(RevokedSubject(idps[0].issuer, revoked.expand(key, entry), idps[0].tenant, bare=True))
            continue
        node = _Node(revoked.source, revoked.key(key), entry)
        issuer = node.string("issuer", required=True)
        sub = node.string("sub", required=True)
        tenant = node.string("tenant")
        assert issuer is not None and sub is not None
        idp = next((p for p in idps if canonical_url(p.issuer) == canonical_url(issuer)), None)
        if idp is None:
            raise node.error("issuer", f"{issuer!r} is not one of authorization.identity_providers")
        if idp.tenant is not None and tenant not in (None, idp.tenant):
            raise node.error("tenant", f"the identity provider accepts only tenant {idp.tenant!r}")
        node.finish()
        subjects.append(RevokedSubject(idp.issuer, sub, tenant or idp.tenant))
    return frozenset(subjects)


def _parse_shared_signals(
    node: _Node, public_url: str, base_dir: Path | None, insecure_ok: bool
) -> tuple[TransmitterConfig, ...]:
    transmitters: list[TransmitterConfig] = []
    for item in node.children("transmitters"):
        issuer = _url(item, "issuer", required=True, tls=not insecure_ok)
        assert issuer is not None
        if any(t.issuer == issuer for t in transmitters):
            raise item.error("issuer", f"duplicate transmitter {issuer!r}")
        delivery = item.string("delivery", "push")
        if delivery not in SSF_DELIVERY_METHODS:
            raise item.error("delivery", f"must be one of {', '.join(SSF_DELIVERY_METHODS)}, got {delivery!r}")
        poll_endpoint = _url(item, "poll_endpoint", tls=not insecure_ok)
        if delivery == "poll" and poll_endpoint is None:
            raise item.error("poll_endpoint", "is required with delivery: poll (the stream's delivery endpoint_url)")
        for key, wanted in (
            ("poll_endpoint", "poll"),
            ("poll_interval_seconds", "poll"),
            ("poll_authorization_file", "poll"),
            ("push_authorization_file", "push"),
        ):
            if key in item.data and delivery != wanted:
                raise item.error(key, f"applies only to delivery: {wanted}")
        transmitters.append(
            TransmitterConfig(
                issuer=issuer,
                audience=item.string("audience") or public_url,
                delivery=delivery,
                poll_interval_seconds=item.number(
                    "poll_interval_seconds", 10.0, minimum=1, maximum=3600, integer=False
                ),
                poll_endpoint=poll_endpoint,
                push_authorization=_authorization_file(item, "push_authorization_file", base_dir),
                poll_authorization=_authorization_file(item, "poll_authorization_file", base_dir),
            )
        )
        item.finish()
    node.finish()
    return tuple(transmitters)


def _authorization_file(item: _Node, name: str, base_dir: Path | None) -> Secret | None:
    """An Authorization header value (``Bearer ...``) read from a file, like a mounted Kubernetes Secret."""
    path = item.string(name)
    if path is None:
        return None
    try:
        value = _resolve(base_dir, path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise item.error(name, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise item.error(name, "must contain UTF-8 text") from None
    if len(value) < 16 or not value.isprintable() or not value.isascii():
        raise item.error(name, "must hold one line of printable ASCII, at least 16 characters (e.g. 'Bearer <token>')")
    return Secret(value)


def _parse_routes(
    root: _Node, public_url: str, base_dir: Path | None, insecure_ok: bool, read_tool_pins: bool = True
) -> tuple[RouteConfig, ...]:
    routes: list[RouteConfig] = []
    for item in root.children("routes", required=True):
        routes.append(_parse_route(item, public_url, routes, base_dir, insecure_ok, read_tool_pins))
    return tuple(routes)


def _parse_route(
    item: _Node,
    public_url: str,
    earlier: list[RouteConfig],
    base_dir: Path | None,
    insecure_ok: bool,
    read_tool_pins: bool = True,
) -> RouteConfig:
    name = item.string("name", required=True)
    assert name is not None
    if not _ROUTE_NAME.match(name):
        raise item.error("name", "must be lowercase letters, digits, '-' or '_' (it is used as a metric label)")
    path = item.string("path", required=True)
    assert path is not None
    _check_path(item, path)
    upstream = _url(item, "upstream", required=True)
    assert upstream is not None
    if urlsplit(upstream).query or urlsplit(upstream).fragment:
        raise item.error("upstream", "must not have a query or fragment")
    transport = item.string("transport", "streamable-http")
    if transport not in TRANSPORTS:
        raise item.error("transport", f"must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    scopes = item.string_list("scopes") or ("mcp",)
    for scope in scopes:
        if " " in scope or '"' in scope or "\\" in scope:
            raise item.error("scopes", f"invalid scope token {scope!r} (RFC 6749 §3.3)")
    default_scopes = item.string_list("default_scopes")
    if default_scopes == ():
        raise item.error("default_scopes", "must be a non-empty list of scopes (omit it for the first scope)")
    default_scopes = default_scopes or scopes[:1]
    for scope in default_scopes:
        if scope not in scopes:
            raise item.error("default_scopes", f"scope {scope!r} is not in this route's scopes")
    for other in earlier:
        if other.name == name:
            raise item.error("name", f"duplicate route name {name!r}")
        if _overlaps(other.path, path):
            raise item.error("path", f"{path!r} overlaps route {other.name!r} ({other.path!r})")
    upstream_headers = _parse_upstream_headers(item.child("upstream_headers"))
    route = RouteConfig(
        name=name,
        path=path,
        upstream=upstream.rstrip("/"),
        resource=canonical_url(public_url + path),
        transport=transport,
        allow_groups=item.string_list("allow_groups"),
        scopes=scopes,
        default_scopes=default_scopes,
        upstream_headers=upstream_headers,
        max_connections=item.number("max_connections", 256, minimum=1, maximum=100_000),
        policy=_parse_policy(item, scopes),
        quotas=_parse_route_quotas(item),
        require_dpop=_flag(item, "require_dpop"),
        identity_header=_parse_identity_header(item, upstream, upstream_headers),
        upstream_authorization=_parse_upstream_authorization(item, public_url, base_dir, insecure_ok),
        tool_pins=_parse_tool_pins(item, base_dir, read_tool_pins),
        on_tool_drift=_parse_on_tool_drift(item),
    )
    item.finish()
    return route


def _parse_tool_pins(item: _Node, base_dir: Path | None, read: bool) -> ToolPins | None:
    path = item.string("tool_pins")
    if path is None:
        return None
    if not read:
        return ToolPins(str(_resolve(base_dir, path)), {})
    try:
        return load_pins(_resolve(base_dir, path))
    except PinFileError as exc:
        raise item.error("tool_pins", str(exc)) from None


def _parse_on_tool_drift(item: _Node) -> str:
    mode = item.string("on_tool_drift", "hide")
    assert mode is not None
    if mode not in DRIFT_MODES:
        raise item.error("on_tool_drift", f"must be one of {', '.join(DRIFT_MODES)}, got {mode!r}")
    if "tool_pins" not in item.data and "on_tool_drift" in item.data:
        raise item.error("on_tool_drift", "needs tool_pins (the lock file written by mcp-gateway pin)")
    return mode


# Headers the gateway, HTTP (hop-by-hop, RFC 9110 §7.6.1) or MCP itself sets on the way upstream: an
# identity header of one of these names would replace, or be replaced by, what the transport needs.
_RESERVED_IDENTITY_HEADERS = (
    _FORBIDDEN_UPSTREAM_HEADERS
    | {h.lower() for h in _MCP_REQUEST_HEADERS}
    | {"keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer", "upgrade", "expect"}
    | {"cookie", "origin", "content-encoding", "accept-encoding", "x-request-id", "forwarded", "x-real-ip"}
)


def _parse_identity_header(
    item: _Node, upstream: str, upstream_headers: tuple[tuple[str, Secret], ...]
) -> IdentityHeaderConfig | None:
    if "identity_header" not in item.data:
        return None
    if item.data["identity_header"] is None:
        raise item.error("identity_header", "is empty: write {} for the defaults, or remove the key")
    node = item.child("identity_header")
    name = node.string("name", IdentityHeaderConfig.name)
    assert name is not None
    if not _HEADER_NAME.match(name):
        raise node.error("name", f"{name!r} is not a valid HTTP header name")
    lowered = name.lower()
    if lowered in _RESERVED_IDENTITY_HEADERS or lowered.startswith("x-forwarded-"):
        raise node.error("name", f"{name!r} is managed by the gateway or MCP and cannot carry the identity")
    if any(h.lower() == lowered for h, _ in upstream_headers):
        raise node.error("name", f"{name!r} is also set in upstream_headers")
    ttl = node.number("ttl_seconds", IdentityHeaderConfig.ttl_seconds, minimum=1, maximum=3600)
    # Default audience: the upstream's origin, the identifier an upstream most easily knows for itself.
    audience = node.string("audience", origin_of(upstream))
    assert audience is not None
    node.finish()
    return IdentityHeaderConfig(name=name, ttl_seconds=ttl, audience=audience)


UPSTREAM_AUTHORIZATION_TYPES = ("id-jag",)


def _parse_upstream_authorization(
    item: _Node, public_url: str, base_dir: Path | None, insecure_ok: bool
) -> UpstreamAuthorizationConfig | None:
    if "upstream_authorization" not in item.data:
        return None
    node = item.child("upstream_authorization")
    kind = node.string("type", required=True)
    if kind not in UPSTREAM_AUTHORIZATION_TYPES:
        raise node.error("type", f"must be one of {', '.join(UPSTREAM_AUTHORIZATION_TYPES)}, got {kind!r}")
    idp_token_endpoint = _url(node, "idp_token_endpoint", required=True, tls=not insecure_ok)
    upstream_issuer = _url(node, "upstream_issuer", required=True, tls=not insecure_ok)
    client_id = node.string("client_id", required=True)
    upstream_client_id = node.string("upstream_client_id", required=True)
    assert idp_token_endpoint is not None and upstream_issuer is not None
    assert client_id is not None and upstream_client_id is not None
    if canonical_url(upstream_issuer) == canonical_url(public_url):
        # The draft's Chained Identity Assertion Request: an assertion must not be chained to its own gateway.
        raise node.error("upstream_issuer", "must not be this gateway's own issuer")
    config = UpstreamAuthorizationConfig(
        type=kind,
        idp_token_endpoint=idp_token_endpoint,
        client_id=client_id,
        client_secret=Secret(_secret_file(node, "client_secret_file", base_dir)),
        upstream_issuer=upstream_issuer,
        upstream_client_id=upstream_client_id,
        upstream_client_secret=Secret(_secret_file(node, "upstream_client_secret_file", base_dir)),
    )
    node.finish()
    return config


def _secret_file(node: _Node, name: str, base_dir: Path | None) -> str:
    path = node.string(name, required=True)
    assert path is not None
    try:
        secret = _resolve(base_dir, path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise node.error(name, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise node.error(name, "must contain UTF-8 text") from None
    if not secret:
        raise node.error(name, "is empty")
    return secret


def _parse_route_quotas(item: _Node) -> tuple[QuotaRule, ...]:
    def error(key: str, problem: str) -> ConfigError:
        return ConfigError(item.source, key, problem)

    if "quotas" in item.data and item.data["quotas"] is None:
        raise item.error("quotas", "is empty: list quotas or remove the key")
    quotas = parse_quotas(item.raw("quotas"), item.key("quotas"), error)
    compiled = []
    for i, quota in enumerate(quotas):
        if quota.cost_source is not None:
            try:
                quota = dataclasses.replace(quota, cost=compile_cost(quota.cost_source, kind="tools"))
            except ConditionError as exc:
                raise error(f"{item.key('quotas')}[{i}].cost", str(exc)) from None
        compiled.append(quota)
    return tuple(compiled)


def _parse_policy(item: _Node, scopes: tuple[str, ...]) -> RoutePolicy:
    """Runtime authorization rules (tools/resources/prompts) and per-method scope requirements."""

    def error(key: str, problem: str) -> ConfigError:
        return ConfigError(item.source, key, problem)

    for kind in KINDS:
        if kind in item.data and item.data[kind] is None:
            # `tools:` with every rule commented out is YAML null; reading it as "no rules" would
            # silently allow every tool.
            raise item.error(kind, "is empty: list rules, use [] to allow nothing, or remove the key to allow all")
    rule_sets = {kind: RuleSet(parse_rules(item.raw(kind), item.key(kind), error)) for kind in KINDS}
    required: list[tuple[str, tuple[str, ...]]] = []
    node = item.child("require_scopes")
    for method in list(node.data):
        needed = node.string_list(str(method))
        if not needed:
            raise node.error(str(method), "must be a non-empty list of scopes")
        for scope in needed:
            if scope not in scopes:
                # A scope the route never grants could never be satisfied: every call would be 403.
                raise node.error(str(method), f"scope {scope!r} is not in this route's scopes")
        required.append((str(method), needed))
    node.finish()
    return RoutePolicy(rule_sets["tools"], rule_sets["resources"], rule_sets["prompts"], tuple(required))


def _check_path(item: _Node, path: str) -> None:
    if not path.startswith("/") or path == "/" or path.endswith("/"):
        raise item.error("path", f"must start with '/', not end with '/', and not be '/', got {path!r}")
    if any(c in path for c in "?#%") or "//" in path or "/../" in path + "/" or "/./" in path + "/":
        raise item.error("path", f"must be a plain path without '?', '#', '%', '//' or dot segments, got {path!r}")
    for reserved in RESERVED_PREFIXES:
        if _overlaps(reserved, path):
            raise item.error("path", f"{path!r} collides with the gateway's own {reserved} endpoints")


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _parse_upstream_headers(node: _Node) -> tuple[tuple[str, Secret], ...]:
    headers: list[tuple[str, Secret]] = []
    for name in list(node.data):
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise node.error(str(name), "is not a valid HTTP header name")
        if name.lower() in _FORBIDDEN_UPSTREAM_HEADERS:
            raise node.error(name, "is managed by the gateway and cannot be set")
        value = node.string(name, required=True)
        assert value is not None
        if "\r" in value or "\n" in value:
            raise node.error(name, "must not contain line breaks")
        headers.append((name, Secret(value)))
    node.finish()
    return tuple(headers)


def _resolve(base_dir: Path | None, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path


def describe(config: GatewayConfig, *, emit: Callable[[str], None], as_groups: frozenset[str] | None = None) -> None:
    """Print the effective configuration for ``mcp-gateway check``; secrets are never shown."""
    auth = config.authorization
    emit(f"config: {config.source} (valid)")
    emit(f"listen: {config.listen_host}:{config.listen_port}")
    if config.metrics_listen:
        emit(f"metrics listen: {config.metrics_listen[0]}:{config.metrics_listen[1]}")
    emit(f"public_url: {config.public_url}")
    if config.allow_insecure_http:
        emit(
            "WARNING: allow_insecure_http is set: tokens, assertions and keys may travel without TLS (test setups only)"
        )
    emit(f"issuer: {auth.issuer}")
    emit(f"signing key: {auth.signing_key_file or 'EPHEMERAL (tokens die with the process; set signing_key_file)'}")
    emit(f"access token ttl: {auth.access_token_ttl_seconds}s")
    if config.replay_store == "memory":
        emit("replay store: memory (this process only; replicas need a shared redis:// store)")
    else:
        emit(f"replay store: {redact_url(config.replay_store)}")
    if auth.dpop_require_nonce:
        emit("dpop: every proof must carry a server nonce (DPoP-Nonce)")
    emit("clients: " + ", ".join(c.client_id for c in auth.clients))
    with_secret = [c.client_id for c in auth.clients if c.client_secret is not None]
    if with_secret:
        emit(
            f"clients authenticating with a secret: {', '.join(with_secret)} (private_key_jwt, with jwks or "
            "jwks_uri, is recommended for production: EMA §7.5.1)"
        )
    for idp in auth.identity_providers:
        bridge = f" id_tokens(aud={','.join(idp.id_token_audiences)})" if idp.accept_id_tokens else ""
        emit(
            f"identity provider: {idp.issuer} jwks={idp.jwks_uri or '(discovered)'} "
            f"groups={'.'.join(idp.groups_location)} algorithms={','.join(idp.algorithms)}{bridge}"
        )
    emit(f"allowed origins: {', '.join(config.allowed_origins)}")
    stripped = dict.fromkeys((*ALWAYS_STRIPPED_REQUEST_HEADERS, *config.strip_request_headers), None)
    emit(f"stripped request headers: {', '.join(stripped)}")
    emit("routes:")
    for route in config.routes:
        groups = ", ".join(route.allow_groups) if route.allow_groups is not None else "any authenticated user"
        extra = f" headers={','.join(n for n, _ in route.upstream_headers)}" if route.upstream_headers else ""
        if route.identity_header is not None:
            ident = route.identity_header
            extra += f" identity_header={ident.name}(aud={ident.audience},ttl={ident.ttl_seconds}s)"
        if route.upstream_authorization is not None:
            chain = route.upstream_authorization
            extra += f" upstream_authorization={chain.type}(as={chain.upstream_issuer},idp={chain.idp_token_endpoint})"
        if route.require_dpop:
            extra += " dpop=required"
        if route.tool_pins is not None:
            extra += f" tool_pins={len(route.tool_pins.tools)}({route.on_tool_drift})"
        emit(
            f"  {route.name}: {route.path} -> {route.upstream} [{route.transport}] "
            f"resource={route.resource} scopes={' '.join(route.scopes)} groups={groups}{extra}"
        )
        if as_groups is None:
            continue
        if route.allow_groups is not None and as_groups.isdisjoint(route.allow_groups):
            emit(f"    as {', '.join(sorted(as_groups)) or '(no groups)'}: no access (not in allow_groups)")
            continue
        for line in describe_access(route.policy, as_groups):
            emit(f"    as {', '.join(sorted(as_groups)) or '(no groups)'}: {line}")
    if config.revoked_subjects or config.revoked_clients:
        emit(f"revoked: {len(config.revoked_subjects)} subjects, {len(config.revoked_clients)} clients")
    bare = sorted(s.subject for s in config.revoked_subjects if s.bare)
    if bare:
        emit(
            f"revoked subjects {', '.join(map(repr, bare))} are bare: they name users of "
            f"{auth.identity_providers[0].issuer}, the only identity provider; adding another makes them "
            "ambiguous (a config error), so prefer {issuer, sub} entries"
        )
    for transmitter in config.transmitters:
        emit(
            f"shared signals transmitter: {transmitter.issuer} delivery={transmitter.delivery} "
            f"audience={transmitter.audience}"
            + (f" poll_endpoint={transmitter.poll_endpoint}" if transmitter.poll_endpoint else "")
        )
    emit(f"audit: {config.audit_sink}{' (argument hashes)' if config.audit_argument_hashes else ''}")
    if config.telemetry_otlp_endpoint:
        emit(f"telemetry: OTLP/HTTP traces to {redact_url(config.telemetry_otlp_endpoint)}")
