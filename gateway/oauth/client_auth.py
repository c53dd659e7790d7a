"""Confidential-client authentication at the token endpoint (RFC 6749 §2.3.1).

The ID-JAG draft: the grant "SHOULD only be supported for confidential clients", and the ``client_id``
claim is compared with the *authenticated* client (never the unauthenticated request parameter).
Both ``client_secret_basic`` (the TypeScript SDK, the conformance AS) and ``client_secret_post`` (the
Python SDK's default) are accepted; secrets are compared in constant time, including for unknown
client ids, so response timing does not reveal which client ids exist.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from urllib.parse import unquote

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
            client_id, secret = _decode_basic(authorization[6:])
            if form_id is not None and form_id != client_id:
                raise InvalidRequest("client_id parameter does not match the authenticated client")
        elif form_secret is not None:
            if form_id is None:
                raise InvalidRequest("client_secret was given without client_id")
            client_id, secret = form_id, form_secret
        else:
            raise InvalidClient(
                "client authentication is required (client_secret_basic or client_secret_post)",
                reason="client_auth_missing",
            )
        expected = self._secrets.get(client_id)
        matches = hmac.compare_digest(secret.encode(), expected or _UNKNOWN_CLIENT_SECRET)
        if expected is None or not matches:
            raise InvalidClient("client authentication failed", reason="client_auth_failed")
        return client_id


def _single(form: MultiDictProxy[str], name: str) -> str | None:
    """RFC 6749 §3.2: "Request and response parameters MUST NOT be included more than once"."""
    values = form.getall(name, [])
    if len(values) > 1:
        raise InvalidRequest(f"parameter {name} is repeated")
    return values[0] if values else None


def _decode_basic(encoded: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidClient("malformed Basic credentials", reason="client_auth_failed") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep or not client_id:
        raise InvalidClient("malformed Basic credentials", reason="client_auth_failed")
    # RFC 6749 §2.3.1 form-encodes both parts; percent-decoding (not '+' -> space) also accepts
    # clients that skip the encoding, such as the TypeScript SDK (SPEC §1.2 note).
    return unquote(client_id), unquote(secret)
