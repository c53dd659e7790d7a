"""Confidential-client authentication at the token endpoint (RFC 6749 §2.3.1).

The ID-JAG draft: the grant "SHOULD only be supported for confidential clients", and the ``client_id``
claim is compared with the *authenticated* client (never the unauthenticated request parameter).
Both ``client_secret_basic`` (the TypeScript SDK, the conformance AS) and ``client_secret_post`` (the
Python SDK's default) are accepted; secrets are compared in constant time, including for unknown
client ids, so response timing does not reveal which client ids exist.

RFC 6749 §2.3.1: for ``client_secret_basic`` the client id and secret are each encoded with
``application/x-www-form-urlencoded`` before base64, so ``+`` is a space and ``%XX`` a byte. The
TypeScript SDK skips that encoding (``btoa(id:secret)``), which matters only for ids or secrets
containing ``+`` or ``%``: the credentials exactly as sent are tried as well, second. Either way the
client must present its exact secret, so this widens nothing.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from urllib.parse import unquote_plus

from multidict import MultiDictProxy

from gateway.config import ClientConfig
from gateway.oauth.errors import InvalidClient, InvalidRequest

_UNKNOWN_CLIENT_SECRET = b"\x00" * 32


class ClientAuthenticator:
    def __init__(self, clients: tuple[ClientConfig, ...]) -> None:
        self._secrets: Mapping[str, bytes] = {c.client_id: c.client_secret.value.encode() for c in clients}

    def authenticate(self, authorization: str | None, form: MultiDictProxy[str]) -> str:
        """Return the authenticated client_id or raise InvalidClient / InvalidRequest."""
        form_id = _single(form, "client_id")
        form_secret = _single(form, "client_secret")
        if authorization is not None and authorization[:6].lower() == "basic ":
            if form_secret is not None:
                raise InvalidRequest("use exactly one client authentication method")
            candidates = _decode_basic(authorization[6:])
            if form_id is not None and all(form_id != client_id for client_id, _ in candidates):
                raise InvalidRequest("client_id parameter does not match the authenticated client")
        elif form_secret is not None:
            if form_id is None:
                raise InvalidRequest("client_secret was given without client_id")
            candidates = [(form_id, form_secret)]
        else:
            raise InvalidClient(
                "client authentication is required (client_secret_basic or client_secret_post)",
                reason="client_auth_missing",
            )
        authenticated = None
        for client_id, secret in candidates:
            expected = self._secrets.get(client_id)
            matches = hmac.compare_digest(secret.encode(), expected or _UNKNOWN_CLIENT_SECRET)
            if expected is not None and matches and authenticated is None:
                authenticated = client_id
        if authenticated is None:
            raise InvalidClient("client authentication failed", reason="client_auth_failed")
        return authenticated


def _single(form: MultiDictProxy[str], name: str) -> str | None:
    """RFC 6749 §3.2: "Request and response parameters MUST NOT be included more than once"."""
    values = form.getall(name, [])
    if len(values) > 1:
        raise InvalidRequest(f"parameter {name} is repeated")
    return values[0] if values else None


def _decode_basic(encoded: str) -> list[tuple[str, str]]:
    """(client_id, secret) candidates: form-decoded (RFC 6749 §2.3.1) first, then as sent if different."""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidClient("malformed Basic credentials", reason="client_auth_failed") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep or not client_id:
        raise InvalidClient("malformed Basic credentials", reason="client_auth_failed")
    # The ':' is split before decoding: an encoded id may contain one ('%3A').
    try:
        form_decoded = (unquote_plus(client_id, errors="strict"), unquote_plus(secret, errors="strict"))
    except UnicodeDecodeError:
        return [(client_id, secret)]  # '%XX' that is not UTF-8: it can only be meant as sent
    return [form_decoded] if form_decoded == (client_id, secret) else [form_decoded, (client_id, secret)]
