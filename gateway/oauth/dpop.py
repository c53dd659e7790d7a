"""DPoP proofs (RFC 9449): the checks of §4.3 and the server nonces of §8 and §9.

A proof is a JWT the client signs with its own key for one HTTP request: ``typ`` ``dpop+jwt``, the
public key in the ``jwk`` header, and claims ``jti``, ``htm`` (the method), ``htu`` (the URL, as the
client sees it: built here from ``public_url``, never from the internal address the gateway was
reached on), ``iat``, ``ath`` (base64url SHA-256 of the access token, at a resource) and ``nonce``
(when the server asks for one). The signature is checked with python-jose against that ``jwk``; the
key's RFC 7638 thumbprint (``jkt``) is what an access token is bound to (``cnf.jkt``, §6.1).

Single use (§11.1): each proof's ``jti`` is recorded in the replay store (shared by replicas when it
is Redis) until the proof would be refused for its age anyway, so a captured proof cannot be replayed
at this or another replica.

Nonces (§8, §9): with ``authorization.dpop.require_nonce`` every proof must carry a nonce the gateway
issued recently. Nonces are stateless: a time window number and an HMAC of it under a key derived
from the signing key, so every replica sharing the signing key accepts the others' nonces and no
store lookup is needed. A nonce is accepted in its own window and the next one.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from jose import jwk, jws
from jose.exceptions import JOSEError
from jose.utils import base64url_decode

from gateway import b64url
from gateway.config import ASYMMETRIC_ALGORITHMS
from gateway.oauth import jose_json
from gateway.oauth.keys import derive_key, jwk_thumbprint
from gateway.oauth.replay import ReplayStore
from gateway.urls import canonical_url

DPOP_TYP = "dpop+jwt"
# RFC 9449 §4.2: an asymmetric algorithm; "none" and MACs are never accepted. Advertised as
# dpop_signing_alg_values_supported (AS metadata, RFC 9449 §5.1; RFC 9728 §2) and in challenges.
ALGORITHMS = ASYMMETRIC_ALGORITHMS
# RFC 9449 §11.1: proofs are accepted only for "a relatively brief period": iat at most this old (plus
# the configured clock skew), and no more than the skew in the future.
PROOF_MAX_AGE_SECONDS = 60
NONCE_WINDOW_SECONDS = 300
_MAX_PROOF_BYTES = 8 * 1024
_MAX_JTI_LENGTH = 256
_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_MIN_RSA_BITS = 2048
# RFC 7518 §6.2.2, §6.3.2: members of a private key, which must never travel in a proof.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class ProofError(Exception):
    """The proof is refused: ``invalid_dpop_proof``, or ``use_dpop_nonce`` when ``nonce`` is set (the
    fresh nonce to send in ``DPoP-Nonce``). The description is safe to return to the client."""

    def __init__(self, description: str, *, nonce: str | None = None) -> None:
        super().__init__(description)
        self.description = description
        self.nonce = nonce


def derive_nonce_key(secret_material: bytes) -> bytes:
    """A key for nothing but nonces, derived from the signing key (RFC 5869 HKDF), so replicas that
    share the signing key share it and a nonce reveals nothing about the signing key."""
    return derive_key(secret_material, "dpop-nonce/v1")


class NonceIssuer:
    """Stateless server nonces: ``<window>.<HMAC-SHA256(key, window)>``, valid in two windows."""

    def __init__(self, key: bytes, *, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self._clock = clock

    def current(self) -> str:
        return self._nonce(int(self._clock() // NONCE_WINDOW_SECONDS))

    def is_valid(self, nonce: object) -> bool:
        if not isinstance(nonce, str) or not nonce.isascii():
            return False
        window = int(self._clock() // NONCE_WINDOW_SECONDS)
        return any(hmac.compare_digest(nonce.encode(), self._nonce(w).encode()) for w in (window, window - 1))

    def _nonce(self, window: int) -> str:
        mac = hmac.new(self._key, str(window).encode(), hashlib.sha256).digest()
        return f"{window}.{b64url.encode(mac)}"


class DpopVerifier:
    def __init__(
        self,
        replay: ReplayStore,
        nonces: NonceIssuer,
        *,
        require_nonce: bool,
        clock_skew_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._replay = replay
        self.nonces = nonces
        self.require_nonce = require_nonce
        self._skew = clock_skew_seconds
        self._clock = clock

    async def verify(self, proofs: list[str], *, method: str, url: str, access_token: str | None = None) -> str:
        """Check the request's ``DPoP`` header values against RFC 9449 §4.3 for ``method`` and the
        client-visible ``url``; with ``access_token`` (at a resource, §7.1) ``ath`` must match it.
        Returns the proof key's thumbprint (jkt). Raises ``ProofError``, or ``ReplayStoreUnavailable``
        when the proof's single use cannot be checked (the caller refuses, retryably)."""
        if len(proofs) != 1:
            raise ProofError("exactly one DPoP header is required" if proofs else "a DPoP proof is required")
        proof = proofs[0].strip()
        header = _parse_header(proof)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise ProofError("the DPoP proof algorithm is not supported")
        public_jwk = _public_jwk(header.get("jwk"), alg)
        try:
            key = jwk.construct(public_jwk, alg)
            payload = jws.verify(proof, key, algorithms=[alg])
        except (JOSEError, ValueError, TypeError):
            raise ProofError("the DPoP proof signature is invalid") from None
        try:
            claims = jose_json.loads(payload)
        except ValueError:
            raise ProofError("the DPoP proof claims are malformed") from None
        if not isinstance(claims, dict):
            raise ProofError("the DPoP proof claims are not a JSON object")
        jti = self._check_claims(claims, method, url, access_token)
        if self.require_nonce and not self.nonces.is_valid(claims.get("nonce")):
            raise ProofError("a fresh DPoP nonce is required (use the DPoP-Nonce value)", nonce=self.nonces.current())
        jkt = jwk_thumbprint(public_jwk)
        issued_at = float(claims["iat"])
        first_use = await self._replay.first_use(
            f"dpop\x00{jkt}\x00{jti}", issued_at + PROOF_MAX_AGE_SECONDS + self._skew
        )
        if not first_use:
            raise ProofError("the DPoP proof has already been used (jti)")
        return jkt

    def _check_claims(self, claims: dict[str, Any], method: str, url: str, access_token: str | None) -> str:
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > _MAX_JTI_LENGTH:
            raise ProofError("the DPoP proof has no valid jti")
        if claims.get("htm") != method:
            raise ProofError("the DPoP proof htm does not match the request method")
        htu = claims.get("htu")
        if not isinstance(htu, str) or _target(htu) != _target(url):
            raise ProofError("the DPoP proof htu does not match the request URL")
        iat = jose_json.numeric_date(claims.get("iat"))
        now = self._clock()
        if iat is None:
            raise ProofError("the DPoP proof has no valid iat")
        if iat > now + self._skew or iat < now - PROOF_MAX_AGE_SECONDS - self._skew:
            raise ProofError("the DPoP proof iat is outside the acceptable window")
        if access_token is not None:
            ath = claims.get("ath")
            expected = b64url.encode(hashlib.sha256(access_token.encode()).digest())
            if not isinstance(ath, str) or not hmac.compare_digest(ath.encode(), expected.encode()):
                raise ProofError("the DPoP proof ath does not match the access token")
        return jti


def _parse_header(proof: str) -> dict[str, Any]:
    """The protected header, read before verifying only to find the key and algorithm (RFC 7515 §5.2)."""
    if len(proof) > _MAX_PROOF_BYTES or not proof.isascii() or proof.count(".") != 2:
        raise ProofError("the DPoP proof is not a compact JWS")
    try:
        header = jose_json.unverified_header(proof)
    except ValueError:
        raise ProofError("the DPoP proof header is malformed") from None
    if not jose_json.typ_is(header.get("typ"), DPOP_TYP):
        raise ProofError(f"the DPoP proof typ must be {DPOP_TYP}")
    if "crit" in header:
        raise ProofError("critical header extensions are not supported")
    return header


def _public_jwk(value: object, alg: str) -> dict[str, Any]:
    """RFC 9449 §4.3 items 5-7: the ``jwk`` header is a public key fitting ``alg``."""
    if not isinstance(value, dict):
        raise ProofError("the DPoP proof has no jwk header")
    if _PRIVATE_MEMBERS & set(value):
        raise ProofError("the DPoP proof jwk must be a public key")
    kty = value.get("kty")
    if alg.startswith("ES"):
        members = ("kty", "crv", "x", "y")
        if kty != "EC" or value.get("crv") != _CURVES[alg]:
            raise ProofError("the DPoP proof jwk does not fit its algorithm")
    else:
        members = ("kty", "n", "e")
        if kty != "RSA":
            raise ProofError("the DPoP proof jwk does not fit its algorithm")
    if not all(isinstance(value.get(m), str) and value[m] for m in members):
        raise ProofError("the DPoP proof jwk is malformed")
    if kty == "RSA" and len(_decode(value["n"])) * 8 < _MIN_RSA_BITS:
        raise ProofError(f"the DPoP proof RSA key is shorter than {_MIN_RSA_BITS} bits")
    return {m: value[m] for m in members}


def _decode(value: str) -> bytes:
    try:
        return base64url_decode(value.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise ProofError("the DPoP proof jwk is malformed") from None


def _target(url: str) -> str:
    """RFC 9449 §4.3 item 9: compared without query and fragment, after RFC 3986 §6.2.2 and §6.2.3
    normalisation (``canonical_url``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return ""
    return canonical_url(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))
