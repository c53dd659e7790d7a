"""Who a principal is: a subject is unique only within its issuer, and within its tenant there.

RFC 7519 §4.1.2: ``sub`` is "locally unique in the context of the issuer or be globally unique";
draft-ietf-oauth-identity-assertion-authz-grant §3.1 and §6.3: a subject is unique as ``iss`` + ``sub``
for a single-tenant issuer and as ``iss`` + ``tenant`` + ``sub`` for a multi-tenant one. So "alice" from
two IdPs, or from two tenants of one IdP, are different people, and everything that keys on a person
(access token claims, revocation, audit, quotas, session binding) keys on this triple.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class SubjectIdentity:
    issuer: str
    tenant: str | None
    subject: str

    @cached_property
    def key(self) -> str:
        """One string per identity and one identity per string (a JSON array, ASCII only): for map
        and store keys and MAC inputs. Joining with a separator would not be injective, since ``sub``
        and ``tenant`` may contain any character."""
        return json.dumps([self.issuer, self.tenant, self.subject], separators=(",", ":"))
