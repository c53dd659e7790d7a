"""Unpadded base64url (RFC 4648 §5, as JOSE uses it: RFC 7515 §2), for the gateway's own compact values:
session ids, signed approval states, DPoP nonces and thumbprints. python-jose's helpers do the work;
these give them the ``str`` interface the callers need."""

from __future__ import annotations

from jose.utils import base64url_decode, base64url_encode


def encode(data: bytes) -> str:
    return base64url_encode(data).decode("ascii")


def decode(text: str) -> bytes:
    """Raises ``ValueError`` (``binascii.Error``, or ``UnicodeEncodeError`` for non-ASCII text)."""
    return base64url_decode(text.encode("ascii"))
