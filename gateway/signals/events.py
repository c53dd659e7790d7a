"""What a Security Event Token says: which events (CAEP, RISC) about which subject (RFC 9493).

SSF 1.0 §4 puts the subject in the SET's top-level ``sub_id`` claim; CAEP and RISC events defined
before it carry it as the event's ``subject`` member, so both are read. Subjects are RFC 9493 subject
identifiers; the ``complex`` format (SSF 1.0 §3.2) names its user in the ``user`` member.

Every event listed here ends what the subject holds now: the gateway cannot re-check an access token
against the IdP's new state, so tokens issued before the event are refused and the client must get a
new ID-JAG, which the IdP issues only under its new state. For CAEP ``token-claims-change`` this is the
simplest correct answer: a token minted with the old groups is not re-checked against the new groups,
it is refused, and the next token carries the new groups.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

CAEP = "https://schemas.openid.net/secevent/caep/event-type/"
RISC = "https://schemas.openid.net/secevent/risc/event-type/"
# The event types that cut a subject off (CAEP 1.0 §3, RISC 1.0 §2).
CUT_OFF_EVENTS = frozenset(
    {
        CAEP + "session-revoked",
        CAEP + "credential-change",
        CAEP + "token-claims-change",
        RISC + "account-disabled",
        RISC + "account-purged",
        RISC + "sessions-revoked",
    }
)
_MAX_DEPTH = 2
_MAX_DESCRIBED = 300


def short_name(event_type: str) -> str:
    """A bounded label for metrics and audit: ``caep/session-revoked``, or ``other``."""
    for prefix, family in ((CAEP, "caep"), (RISC, "risc")):
        if event_type.startswith(prefix) and event_type in CUT_OFF_EVENTS:
            return f"{family}/{event_type[len(prefix) :]}"
    return "other"


def subject_keys(subject: Any, depth: int = 0) -> tuple[str, ...]:
    """The revocation keys a subject identifier names (empty when it names no user we can match).

    - ``iss_sub`` (RFC 9493 §3.2.4): the user ``sub`` of that issuer, in every tenant of it;
    - ``email`` (§3.2.2): every user whose access token carries that email (compared case-insensitively,
      as mail providers do in practice);
    - ``opaque`` (§3.2.3): an identifier only the transmitter defines; matched against the user's ``sub``;
    - ``complex`` (SSF 1.0 §3.2): its ``user`` member, one of the above."""
    if not isinstance(subject, Mapping) or depth > _MAX_DEPTH:
        return ()
    form = subject.get("format")
    if form == "iss_sub":
        iss, sub = subject.get("iss"), subject.get("sub")
        if isinstance(iss, str) and iss and isinstance(sub, str) and sub:
            return (key("iss_sub", iss.rstrip("/"), sub),)
    elif form == "email":
        email = subject.get("email")
        if isinstance(email, str) and "@" in email:
            return (key("email", email.lower()),)
    elif form == "opaque":
        opaque = subject.get("id")
        if isinstance(opaque, str) and opaque:
            return (key("opaque", opaque),)
    elif form == "complex" or (form is None and "user" in subject):
        return subject_keys(subject.get("user"), depth + 1)
    return ()


def describe(subject: Any) -> str | None:
    """The subject identifier as one line for the audit trail (its ``sub`` field stays a string)."""
    if subject is None:
        return None
    text = json.dumps(subject, separators=(",", ":"), sort_keys=True, default=str)
    return text if len(text) <= _MAX_DESCRIBED else text[: _MAX_DESCRIBED - 3] + "..."


def principal_keys(issuer: str, subject: str, email: str | None) -> tuple[str, ...]:
    """The revocation keys under which a token holder can be cut off (see ``subject_keys``)."""
    keys = [key("iss_sub", issuer.rstrip("/"), subject), key("opaque", subject)]
    if email:
        keys.append(key("email", email.lower()))
    return tuple(keys)


def key(*parts: str) -> str:
    """JSON keeps the encoding injective whatever characters a subject holds."""
    return json.dumps(parts, separators=(",", ":"))
