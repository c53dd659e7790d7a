"""Is a JSON value a well-formed RFC 9493 Subject Identifier (the shape of a JWT ``sub_id`` claim)?

RFC 9493 §3: a Subject Identifier is a JSON object whose ``format`` member names an identifier format,
plus the members that format requires (§3.2). Only the shape is checked here: who a user is stays the
JWT's ``iss`` (+ ``tenant``) + ``sub`` (gateway/oauth/identity.py). A format registered after RFC 9493
(the IANA "Security Event Identifier Formats" registry grows) is accepted with any members, since the
gateway reads none of them.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from typing import Any

_E164 = re.compile(r"\+[1-9][0-9]{1,14}")


def _absolute_uri(value: str) -> bool:
    return bool(urllib.parse.urlsplit(value).scheme)


def _email(value: str) -> bool:
    local, at, domain = value.rpartition("@")
    return bool(local and at and domain)


def _any(value: str) -> bool:
    return True


# RFC 9493 §3.2: each format's required members (always non-empty strings), and what else each
# member's value must look like.
_FORMATS: dict[str, dict[str, Callable[[str], bool]]] = {
    "account": {"uri": lambda v: v.startswith("acct:") and len(v) > 5},  # an RFC 7565 acct URI
    "email": {"email": _email},
    "iss_sub": {"iss": _any, "sub": _any},
    "opaque": {"id": _any},
    "phone_number": {"phone_number": lambda v: _E164.fullmatch(v) is not None},
    "did": {"url": lambda v: v.startswith("did:")},
    "uri": {"uri": _absolute_uri},
}


def subject_identifier_problem(value: Any, *, nested: bool = False) -> str | None:
    """What is wrong with ``value`` as a Subject Identifier, or None. ``aliases`` (RFC 9493 §3.2) holds
    other Subject Identifiers, never another ``aliases``, so the recursion is one level deep."""
    if not isinstance(value, dict):
        return "is not a JSON object"
    form = value.get("format")
    if not isinstance(form, str) or not form:
        return "has no format member"
    if form == "aliases":
        if nested:
            return "nests aliases inside aliases"
        identifiers = value.get("identifiers")
        if not isinstance(identifiers, list) or not identifiers:
            return "has no identifiers (format aliases)"
        for identifier in identifiers:
            if problem := subject_identifier_problem(identifier, nested=True):
                return problem
        return None
    for member, well_formed in _FORMATS.get(form, {}).items():
        member_value = value.get(member)
        if not isinstance(member_value, str) or not member_value or not well_formed(member_value):
            return f"has no valid {member} member (format {form})"
    return None


def iss_sub_pairs(value: dict[str, Any]) -> list[tuple[str, str]]:
    """The (``iss``, ``sub``) of every ``iss_sub`` identifier in a well-formed Subject Identifier."""
    if value["format"] == "aliases":
        return [pair for identifier in value["identifiers"] for pair in iss_sub_pairs(identifier)]
    return [(value["iss"], value["sub"])] if value["format"] == "iss_sub" else []
