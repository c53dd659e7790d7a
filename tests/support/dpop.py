"""A DPoP client key that builds real RFC 9449 proofs with python-jose, for tests.

Every part of a proof can be overridden (``claims`` replaces or, with None, removes a claim;
``header`` likewise for the JOSE header; ``sign_with`` signs with another key while the ``jwk``
header still names this one), so each rejection the resource server and the token endpoint must make
is one call away.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jws

from gateway.oauth.keys import jwk_thumbprint


class DpopKey:
    """One client key pair: EC P-256 (ES256) by default, or RSA (RS256) of ``rsa_bits``."""

    def __init__(self, algorithm: str = "ES256", *, rsa_bits: int = 2048) -> None:
        key = (
            ec.generate_private_key(ec.SECP256R1())
            if algorithm == "ES256"
            else rsa.generate_private_key(65537, rsa_bits)
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        self.algorithm = algorithm
        self.private = jwk.construct(pem, algorithm)
        self.public_jwk = {k: v for k, v in self.private.public_key().to_dict().items() if k != "alg"}

    @property
    def jkt(self) -> str:
        return jwk_thumbprint(self.public_jwk)

    def proof(
        self,
        method: str,
        url: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        claims: dict[str, Any] | None = None,
        header: dict[str, Any] | None = None,
        sign_with: DpopKey | None = None,
    ) -> str:
        body: dict[str, Any] = {"jti": uuid.uuid4().hex, "htm": method, "htu": url, "iat": int(time.time())}
        if access_token is not None:
            body["ath"] = ath(access_token)
        if nonce is not None:
            body["nonce"] = nonce
        headers: dict[str, Any] = {"typ": "dpop+jwt", "jwk": self.public_jwk}
        for target, overrides in ((body, claims), (headers, header)):
            for key, value in (overrides or {}).items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value
        signer = sign_with or self
        return jws.sign(body, signer.private, headers=headers, algorithm=signer.algorithm)


def ath(access_token: str) -> str:
    """RFC 9449 §4.2: base64url (no padding) of the SHA-256 of the access token's ASCII."""
    return base64.urlsafe_b64encode(hashlib.sha256(access_token.encode()).digest()).rstrip(b"=").decode()
