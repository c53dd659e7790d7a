"""The gateway's own signing key: loaded from a PEM file or generated ephemerally.

Access tokens are JWTs the gateway signs and later verifies itself; their public key is published at
``jwks_uri`` (RFC 8414 §2) so resource servers and auditors can verify them too. Only asymmetric
keys are supported, so the published JWKS can never be used to forge a token.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from jose import jwk
from jose.backends.base import Key

from gateway import b64url

log = logging.getLogger(__name__)

_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class SigningKeyError(Exception):
    """The signing key file is unusable; the message names the file and the problem."""


@dataclass(frozen=True)
class SigningKey:
    """A private key, its JWS algorithm, RFC 7638 key id and ready-made python-jose key objects."""

    algorithm: str
    kid: str
    private: Key
    public: Key
    public_jwk: dict[str, Any]
    # Key material for derived secrets (session binding, gateway/sessions.py); never logged.
    secret_material: bytes = field(default=b"", repr=False)

    @classmethod
    def from_pem(cls, pem: bytes, *, source: str = "signing key") -> SigningKey:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise SigningKeyError(f"{source}: not an unencrypted PEM private key ({exc})") from None
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < 2048:
                raise SigningKeyError(f"{source}: RSA keys must be at least 2048 bits")
            algorithm = "RS256"
        elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _EC_ALGORITHMS:
            algorithm = _EC_ALGORITHMS[key.curve.name]
        else:
            raise SigningKeyError(f"{source}: only RSA (>= 2048 bits) and EC P-256/384/521 keys are supported")
        pem_text = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        private = jwk.construct(pem_text, algorithm)
        public = private.public_key()
        public_dict = {k: v for k, v in public.to_dict().items() if k != "alg"}
        kid = jwk_thumbprint(public_dict)
        public_jwk = {**public_dict, "kid": kid, "alg": algorithm, "use": "sig"}
        secret = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cls(algorithm, kid, private, public, public_jwk, secret)

    @classmethod
    def from_file(cls, path: str) -> SigningKey:
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"{path}: cannot read signing key: {exc.strerror or exc}") from None
        return cls.from_pem(pem, source=path)

    @classmethod
    def generate(cls) -> SigningKey:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cls.from_pem(pem, source="ephemeral key")


def load_signing_key(path: str | None) -> SigningKey:
    if path:
        return SigningKey.from_file(path)
    log.warning(
        "authorization.signing_key_file is not set: using an EPHEMERAL signing key. Access tokens "
        "become invalid on restart and differ between replicas. Do not run like this in production."
    )
    return SigningKey.generate()


def derive_key(secret_material: bytes, purpose: str) -> bytes:
    """A 256-bit key for one purpose only (session binding, DPoP nonces, approval states, argument
    digests), derived from the signing key with HKDF (RFC 5869): replicas sharing the signing key derive
    the same keys, and no derived key or what it protects reveals the signing key or another purpose's."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"mcp-gateway", info=purpose.encode()).derive(
        secret_material
    )


def jwk_thumbprint(public_jwk: dict[str, Any]) -> str:
    """RFC 7638 §3: SHA-256 over the required members, lexicographically ordered, no whitespace."""
    required = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}[public_jwk["kty"]]
    canonical = json.dumps({k: public_jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return b64url.encode(digest)
