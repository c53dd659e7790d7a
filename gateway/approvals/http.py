"""``/approvals/{id}``: where a member of ``approver_groups`` approves or declines a parked call.

- ``GET``: a minimal HTML page for people (tool, route, requester, what would run, status, expiry) with
  a form: the approver's access token in a password field, and approve / decline buttons. No
  JavaScript; everything shown is HTML-escaped; the page may not be framed, cached or leak its URL
  (the id) in a Referer.
- ``POST``: the decision, by a bearer token in ``Authorization`` (RFC 6750 §2.1) with a JSON body
  ``{"decision": "approve" | "decline"}`` (default approve), or by the page's form: ``access_token`` and
  ``decision`` form-encoded (RFC 6750 §2.2). Answered in JSON.

The token is checked as on the proxied path (signature, expiry, the config's ``revoked``, RFC 7009
revocation, Shared Signals cut-offs) but may have been issued for any route of this gateway: the page
belongs to the gateway, and an approver need not use the requester's route. A DPoP-bound token is
refused: a form cannot carry its proof (RFC 9449 §7). The approver's groups must meet the approval's
``approver_groups``, and the requester can never approve their own call. A POST from a browser must
come from the gateway's own origin (the page's form), so another site cannot post a pasted token.
"""

from __future__ import annotations

import html
import json
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from aiohttp import web

from gateway import logs
from gateway.approvals.delegated import APPROVALS_PATH
from gateway.approvals.store import (
    CONFLICT,
    DECLINED,
    GRANTED,
    PENDING,
    UNKNOWN,
    ApprovalRecord,
    ApprovalStore,
    ApprovalStoreUnavailable,
)
from gateway.audit import AuditLog
from gateway.oauth.access_token import InvalidToken, Principal
from gateway.urls import origin_of

if TYPE_CHECKING:
    from gateway.runtime import Runtime

log = logging.getLogger(__name__)

ROUTE = APPROVALS_PATH + "{approval_id}"
_ID = re.compile(r"[A-Za-z0-9_-]{22}")  # secrets.token_urlsafe(16)
MAX_BODY_BYTES = 16_384  # a decision and a token
DECISIONS = {"approve": GRANTED, "decline": DECLINED}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
FORM = "application/x-www-form-urlencoded"


def loggable_path(path: str) -> str:
    """The request path for the access log: an approval's id is a capability, so it is not logged."""
    return APPROVALS_PATH + "{id}" if path.startswith(APPROVALS_PATH) else path


class Refused(Exception):
    def __init__(self, status: int, error: str, description: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description
        self.headers = headers or {}


class ApprovalPages:
    def __init__(
        self,
        store: ApprovalStore,
        runtime: Callable[[], Runtime],
        audit: AuditLog,
        *,
        count: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``count(route, event)``: told each decision (the ``mcp_gateway_approvals_total`` metric)."""
        self._count = count
        self._store = store
        self._runtime = runtime
        self._audit = audit
        self._clock = clock

    async def handle(self, request: web.Request) -> web.Response:
        try:
            if request.method == "GET":
                return await self._page(request)
            if request.method == "POST":
                return await self._decide(request)
            raise Refused(405, "method_not_allowed", "use GET or POST", {"Allow": "GET, POST"})
        except Refused as refused:
            body = {"error": refused.error, "error_description": refused.description}
            return web.json_response(body, status=refused.status, headers={**SECURITY_HEADERS, **refused.headers})
        except ApprovalStoreUnavailable:
            body = {"error": "temporarily_unavailable", "error_description": "approvals are unavailable right now"}
            return web.json_response(body, status=503, headers={**SECURITY_HEADERS, "Retry-After": "5"})

    async def _record(self, request: web.Request) -> ApprovalRecord:
        approval_id = request.match_info["approval_id"]
        record = await self._store.get(approval_id, self._clock()) if _ID.fullmatch(approval_id) else None
        if record is None:
            raise Refused(404, "not_found", "no such approval, or it expired")
        return record

    async def _page(self, request: web.Request) -> web.Response:
        record = await self._record(request)
        return web.Response(
            text=render_page(record, self._clock()), content_type="text/html", charset="utf-8", headers=SECURITY_HEADERS
        )

    async def _decide(self, request: web.Request) -> web.Response:
        runtime = self._runtime()
        origin = request.headers.get("Origin")
        if origin is not None and not _same_origin(origin, runtime.config.public_url):
            raise Refused(403, "origin_refused", "approvals are decided on the gateway's own page")
        token, decision = await _credentials(request)
        approver = await self._approver(runtime, token)
        record = await self._record(request)
        if record.status != PENDING:
            raise Refused(409, "already_decided", f"this approval is already {record.status}")
        if not set(approver.groups) & set(record.request.approver_groups):
            groups = ", ".join(record.request.approver_groups)
            raise Refused(403, "forbidden", f"deciding this approval needs membership of {groups}")
        if approver.identity.key == record.request.requester:
            raise Refused(403, "forbidden", "the requester cannot decide their own call (separation of duties)")
        status = DECISIONS[decision]
        outcome = await self._store.decide(
            record.request.approval_id, status, approver.subject, approver.idp_issuer, self._clock()
        )
        if outcome == UNKNOWN:
            raise Refused(404, "not_found", "no such approval, or it expired")
        if outcome == CONFLICT:
            raise Refused(409, "already_decided", "this approval was decided by someone else meanwhile")
        self._audit.emit(
            f"approval.{status}",
            request_id=logs.REQUEST_ID.get(),
            sub=approver.subject,
            client_id=approver.client_id,
            idp=approver.idp_issuer,
            tenant=approver.tenant,
            groups=approver.groups,
            route=record.request.route,
            target=record.request.tool,
            approval_id=record.request.approval_id,
            approver=approver.subject,
            approver_idp=approver.idp_issuer,
            decision="allow" if status == GRANTED else "deny",
        )
        if self._count is not None:
            self._count(record.request.route, status)
        body = {"approval_id": record.request.approval_id, "status": status}
        return web.json_response(body, headers=SECURITY_HEADERS)

    async def _approver(self, runtime: Runtime, token: str) -> Principal:
        try:
            principal = runtime.tokens.inspect(token)
        except InvalidToken as exc:
            raise _unauthorized(str(exc)) from None
        if runtime.routes.for_resource(principal.audience) is None:
            raise _unauthorized("the access token was not issued for a route of this gateway")
        if principal.jkt is not None:
            raise _unauthorized("a DPoP-bound access token cannot be used here (no proof can come with a form)")
        if runtime.refuses_holder(principal) or await runtime.token_revocations.is_revoked(principal):
            raise _unauthorized("the access token has been revoked")
        return principal


def _unauthorized(description: str) -> Refused:
    return Refused(401, "invalid_token", description, {"WWW-Authenticate": 'Bearer error="invalid_token"'})


def _same_origin(origin: str, public_url: str) -> bool:
    try:
        return origin_of(origin) == origin_of(public_url)
    except ValueError:
        return False


async def _credentials(request: web.Request) -> tuple[str, str]:
    """The token and the decision: header + JSON, or form (RFC 6750 §2: one method only)."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise Refused(413, "invalid_request", "the request body is too large")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise Refused(413, "invalid_request", "the request body is too large")
    headers = request.headers.getall("Authorization", [])
    if len(headers) > 1:
        raise Refused(400, "invalid_request", "multiple Authorization headers")
    scheme, _, header_token = headers[0].partition(" ") if headers else ("", "", "")
    if request.content_type == FORM:
        fields = _form(raw)
        token = fields.get("access_token", "")
        if headers:
            raise Refused(400, "invalid_request", "send the token in Authorization or in the form, not both")
    else:
        fields = _json(raw)
        if scheme.lower() != "bearer":
            token = ""
        else:
            token = header_token.strip()
    if not token:
        raise Refused(401, "invalid_token", "an access token is required", {"WWW-Authenticate": "Bearer"})
    decision = fields.get("decision", "approve")
    if not isinstance(decision, str) or decision not in DECISIONS:
        raise Refused(400, "invalid_request", "decision must be 'approve' or 'decline'")
    return token, decision


def _form(raw: bytes) -> dict[str, Any]:
    try:
        pairs = parse_qs(raw.decode(), keep_blank_values=True, strict_parsing=bool(raw), max_num_fields=10)
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "invalid_request", "the form is malformed") from None
    if any(len(values) > 1 for values in pairs.values()):
        raise Refused(400, "invalid_request", "a form field is repeated")
    return {name: values[0] for name, values in pairs.items()}


def _json(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "invalid_request", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise Refused(400, "invalid_request", "the body must be a JSON object")
    return body


def render_page(record: ApprovalRecord, now: float) -> str:
    request = record.request
    expires = datetime.fromtimestamp(record.expires_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    left = max(0, int(record.expires_at - now))
    rows = [
        ("Tool", request.tool),
        ("Route", request.route),
        ("Requester", f"{request.requester_sub} ({request.requester_idp}), client {request.client_id}"),
        ("Approvers", ", ".join(request.approver_groups)),
        ("Status", record.status + (f" by {record.approver}" if record.approver else "")),
        ("Expires", f"{expires} (in {left} s)"),
    ]
    table = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    form = (
        '<form method="post">\n'
        '<label>Your access token <input type="password" name="access_token" autocomplete="off" required></label>\n'
        '<button type="submit" name="decision" value="approve">Approve</button>\n'
        '<button type="submit" name="decision" value="decline">Decline</button>\n'
        "</form>"
        if record.status == PENDING
        else ""
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>Approval requested</title>\n"
        "<style>body{font-family:sans-serif;max-width:48em;margin:2em auto}th{text-align:left;padding-right:1em}"
        "pre{white-space:pre-wrap;background:#f4f4f4;padding:1em}</style></head>\n"
        f"<body><h1>Approval requested</h1>\n<table>\n{table}\n</table>\n"
        f"<pre>{html.escape(request.text)}</pre>\n{form}\n</body></html>\n"
    )
