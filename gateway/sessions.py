"""Session binding: an MCP session belongs to the principal that created it.

MCP security best practices (Session Hijacking): servers "MUST NOT use sessions for authentication"
and "SHOULD bind session IDs to user-specific information". Legacy upstreams know nothing of users,
so a session id stolen from one user would work for another user with any valid token: the
stale-session authorization bypass other gateways shipped.

The binding is stateless, so any replica can check it: the gateway never shows clients the upstream's
session id, but ``base64url(upstream id) "." owner "." created "." capabilities "." MAC``: a keyed
fingerprint of the owner (route and principal), when the session was created (Unix seconds: a Shared
Signals cut-off ends the sessions its user created before it, gateway/signals/), what the client declared
in ``initialize`` that the gateway itself relies on (``e``: form elicitation, so an approval can be asked
on a POST's SSE response, gateway/approvals/session.py; ``-``: nothing), and an HMAC over all four. Any
replica or worker thus knows the capability without shared state, and a client cannot add it later.
A request presenting a session id is accepted only if the MAC verifies for *the requesting* principal
on *this* route; the upstream then receives its own id back. ``k`` is derived with HKDF (RFC 5869)
from the gateway's signing key, so replicas sharing that key share sessions and nothing new needs
distributing. The same wrapping protects the ``sessionId`` query parameter of the legacy HTTP+SSE
transport.

Key rotation: ids are wrapped with the current key but verified with every key the gateway accepts
tokens from (``authorization.previous_signing_key_files``). During a rolling rotation pods that already
sign with the new key and pods that still sign with the old one therefore accept each other's session
ids, and sessions started before the switch survive it until the old key is dropped.
"""

from __future__ import annotations

import binascii
import enum
import functools
import hashlib
import hmac
import time
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring_ascii

from gateway import b64url
from gateway.oauth.identity import SubjectIdentity
from gateway.oauth.keys import derive_key

_MAC_BYTES = 16
_CHECKED_SESSIONS = 4096  # session checks remembered per binder (live sessions, not every id ever seen)
_MAX_UPSTREAM_ID = 512
ELICITATION, NO_CAPABILITIES = "e", "-"


def derive_session_key(secret_material: bytes) -> bytes:
    return derive_key(secret_material, "session-binding/v2")


class SessionCheck(enum.Enum):
    OK = "ok"
    FOREIGN = "foreign"  # authentic, but created by another principal (or on another route): 403
    UNKNOWN = "unknown"  # not a session id this gateway issued (or its key changed): 404


class SessionBinder:
    def __init__(self, key: bytes, other_keys: Sequence[bytes] = (), *, clock: Callable[[], float] = time.time) -> None:
        """``key`` wraps new session ids; ids wrapped with ``other_keys`` are still accepted."""
        self._key = key
        self._keys = (key, *other_keys)
        self._clock = clock
        self._checked = functools.lru_cache(maxsize=_CHECKED_SESSIONS)(self.check)

    @staticmethod
    def _digest(key: bytes, *parts: str) -> bytes:
        return hmac.new(key, "\x00".join(parts).encode(), hashlib.sha256).digest()[:_MAC_BYTES]

    def wrap(self, route: str, principal: str, upstream_id: str, *, elicitation: bool = False) -> str:
        """The session id the client sees (visible ASCII, as MCP requires): upstream id, a keyed
        fingerprint of the owner (no identity is readable from it), the creation second, the client's
        capabilities the gateway uses, and a MAC over all of them."""
        owner = self._digest(self._key, "owner", route, principal)
        created = str(int(self._clock()))
        capabilities = ELICITATION if elicitation else NO_CAPABILITIES
        fingerprint = b64url.encode(owner)
        mac = self._digest(self._key, "session", upstream_id, fingerprint, created, capabilities)
        return f"{b64url.encode(upstream_id.encode())}.{fingerprint}.{created}.{capabilities}.{b64url.encode(mac)}"

    def unwrap(self, route: str, principal: str, client_id: str) -> tuple[SessionCheck, str | None]:
        """:meth:`check`, remembered: a session's requests present the same id over and over, and the
        answer depends only on the keys, which a binder never changes (a reload builds a new one)."""
        return self._checked(route, principal, client_id)

    def check(self, route: str, principal: str, client_id: str) -> tuple[SessionCheck, str | None]:
        """Check a presented session id; on OK also return the upstream's own session id. Ids wrapped
        before they carried a creation time (three parts) or capabilities (four) are still accepted."""
        parts = client_id.split(".")
        if len(parts) not in (3, 4, 5) or len(client_id) > 2 * _MAX_UPSTREAM_ID:
            return SessionCheck.UNKNOWN, None
        if len(parts) >= 4 and not (parts[2].isascii() and parts[2].isdigit() and len(parts[2]) <= 12):
            return SessionCheck.UNKNOWN, None
        if len(parts) == 5 and parts[3] not in (ELICITATION, NO_CAPABILITIES):
            return SessionCheck.UNKNOWN, None
        try:
            upstream_id = b64url.decode(parts[0]).decode()
            mac = b64url.decode(parts[-1])
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return SessionCheck.UNKNOWN, None
        signed = (upstream_id, *parts[1:-1])
        key = next((k for k in self._keys if hmac.compare_digest(mac, self._digest(k, "session", *signed))), None)
        if key is None:
            return SessionCheck.UNKNOWN, None
        if not hmac.compare_digest(parts[1], b64url.encode(self._digest(key, "owner", route, principal))):
            return SessionCheck.FOREIGN, None
        return SessionCheck.OK, upstream_id

    @staticmethod
    def created_at(client_id: str) -> int:
        """When a session id that ``unwrap`` accepted was created (0: before ids carried it)."""
        parts = client_id.split(".")
        return int(parts[2]) if len(parts) >= 4 else 0

    @staticmethod
    def elicits(client_id: str) -> bool:
        """Whether the session's client declared form elicitation in ``initialize``. Read before the
        id is checked (no key needed); it counts only for an id ``unwrap`` accepts, which the MAC
        guarantees was wrapped with this flag."""
        parts = client_id.split(".")
        return len(parts) == 5 and parts[3] == ELICITATION


def principal_key(identity: SubjectIdentity, client_id: str) -> str:
    """The user is issuer + tenant + sub (gateway/oauth/identity.py: a ``sub`` is unique only within
    its issuer and tenant); the client is part of the principal too, so one user's session cannot be
    reused by another of their agents. JSON keeps the encoding injective.

    The text is exactly ``json.dumps([identity.key, client_id], separators=(",", ":"))`` (session ids and
    approval bindings embed it), assembled from the string encoder ``json.dumps`` itself uses: called
    with options, ``json.dumps`` builds a new encoder every time, eight times the cost."""
    return f"[{encode_basestring_ascii(identity.key)},{encode_basestring_ascii(client_id)}]"
