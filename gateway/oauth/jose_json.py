"""Strict JSON for the JOSE headers and JWT claims the gateway reads.

RFC 8259 §6: "Numeric values that cannot be represented in the grammar below (such as Infinity and
NaN) are not permitted". Python's ``json`` (which python-jose uses) accepts ``NaN``, ``Infinity`` and
``-Infinity`` by default and turns a number too large for a double (``1e400``) into infinity. A NaN
compares false with everything, so ``now > exp + skew`` is false for ``exp = NaN`` and an expiry
check silently passes. Every JWT segment is therefore parsed here, refusing all of them anywhere in
the document, and time claims must be integer NumericDates (RFC 7519 §2) in a sane range.
"""

from __future__ import annotations

import json
import math
from typing import Any

from jose.utils import base64url_decode

# 9999-12-31T23:59:59Z: far beyond any real token, small enough that float(value) is exact.
MAX_NUMERIC_DATE = 253_402_300_799


class JoseJSONError(ValueError):
    """A JOSE segment is not strict JSON; the message is safe to show to the client."""


def _refuse_constant(name: str) -> Any:
    raise JoseJSONError(f"{name} is not a JSON number (RFC 8259 §6)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JoseJSONError("a number is too large to represent (RFC 8259 §6)")
    return value


def loads(data: bytes | str) -> Any:
    """Parse UTF-8 JSON (RFC 7519 §7.2), refusing non-finite numbers anywhere in it.

    Raises ``JoseJSONError`` for a non-finite number and ``ValueError`` for anything else that is
    not JSON (``UnicodeDecodeError`` and ``json.JSONDecodeError`` are both ``ValueError``)."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)


def unverified_header(token: str) -> dict[str, Any]:
    """The protected header of a compact JWS, strictly parsed; raises ``ValueError`` if malformed.

    Read before the signature is checked only to pick the key and algorithm (RFC 7515 §5.2)."""
    segment = token.partition(".")[0]
    header = loads(base64url_decode(segment.encode("ascii")))
    if not isinstance(header, dict):
        raise ValueError("the JOSE header is not a JSON object")
    return header


def typ_is(value: Any, expected: str) -> bool:
    """Whether a JOSE ``typ`` header names the media type ``expected`` (given without ``application/``).

    RFC 7515 §4.1.9: ``typ`` is a media type, compared case-insensitively (RFC 2045 §5.1), and a value
    without a '/' means ``application/`` + value; so ``OAUTH-ID-JAG+JWT`` and
    ``application/oauth-id-jag+jwt`` both name ``oauth-id-jag+jwt``."""
    if not isinstance(value, str):
        return False
    media_type = value.lower()
    if "/" not in media_type:
        media_type = "application/" + media_type
    return media_type == "application/" + expected.lower()


def numeric_date(value: Any) -> int | None:
    """``value`` if it is an integer NumericDate (bool is not one) between 0 and year 9999, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_NUMERIC_DATE:
        return value
    return None
