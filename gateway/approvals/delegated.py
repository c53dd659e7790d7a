"""``approver_groups``: someone else approves the call, at ``/approvals/{id}`` (gateway/approvals/http.py).

The caller's call is parked, not held open: the gateway answers it at once with ``-32003``
``approval_pending``, an ``approval_url`` to hand to an approver and ``expires_in``. A member of one of
the ``approver_groups`` (never the requester: separation of duties) decides there. The same principal's
identical call (same route, tool and arguments hash: gateway/approvals/binding.py) is then forwarded
once; retried before the decision it gets the same pending answer (same id), after a decline
``approval_declined``. A grant is usable for ``timeout_seconds`` after it was given, a pending approval
waits as long; a later retry asks again (audited as ``approval.expired``).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable

from gateway.approvals.binding import CallBinding
from gateway.approvals.desk import Answered, ApprovalObserver, Approved, refusal
from gateway.approvals.spec import ApprovalSpec
from gateway.approvals.store import (
    DECLINED,
    GRANTED,
    PENDING,
    ApprovalRecord,
    ApprovalRequest,
    ApprovalStore,
    ApprovalStoreUnavailable,
)
from gateway.oauth.access_token import Principal
from gateway.proxy.request_body import RpcMessage

APPROVALS_PATH = "/approvals/"
ID_BYTES = 16  # 128 bits: the id is a capability to see the call (deciding also needs an approver's token)
_ATTEMPTS = 2  # a grant another replica used a moment ago: ask again once


def new_approval_id() -> str:
    return secrets.token_urlsafe(ID_BYTES)


class DelegatedDesk:
    """The desk's ``delegated`` collaborator (gateway/approvals/desk.py ``DelegatedApprovals``)."""

    def __init__(
        self,
        store: ApprovalStore,
        public_url: str,
        observe: ApprovalObserver,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._public_url = public_url
        self._observe = observe
        self._clock = clock

    async def settle(
        self, message: RpcMessage, binding: CallBinding, spec: ApprovalSpec, text: str, principal: Principal
    ) -> Approved | Answered:
        request = ApprovalRequest(
            approval_id=new_approval_id(),
            fingerprint=binding.fingerprint,
            route=binding.route,
            tool=binding.tool,
            requester=principal.identity.key,
            requester_sub=principal.subject,
            requester_idp=principal.idp_issuer,
            client_id=principal.client_id,
            approver_groups=spec.approver_groups,
            text=text,
            timeout_seconds=spec.timeout_seconds,
        )
        try:
            for _ in range(_ATTEMPTS):
                now = self._clock()
                opened = await self._store.open(request, now)
                record = opened.record
                if opened.expired is not None:
                    self._event("approval.expired", binding, opened.expired)
                if opened.created:
                    self._event("approval.asked", binding, request.approval_id, approver_groups=spec.approver_groups)
                    return self._pending(message, record, now)
                if record.status == PENDING:
                    return self._pending(message, record, now)
                if record.status == DECLINED:
                    return refusal(
                        message,
                        "approval_declined",
                        f"The call of tool '{binding.tool}' was not approved",
                        approval_id=record.request.approval_id,
                    )
                if record.status == GRANTED and await self._store.use(record.request.approval_id, now):
                    self._event(
                        "approval.used",
                        binding,
                        record.request.approval_id,
                        approver=record.approver,
                        approver_idp=record.approver_idp,
                    )
                    return Approved(message.raw)
        except ApprovalStoreUnavailable:
            pass
        return refusal(message, "approval_unavailable", "Approvals are unavailable right now; try again")

    def _pending(self, message: RpcMessage, record: ApprovalRecord, now: float) -> Answered:
        request = record.request
        url = self._public_url + APPROVALS_PATH + request.approval_id
        groups = ", ".join(request.approver_groups)
        pending = refusal(
            message,
            "approval_pending",
            f"Calling tool '{request.tool}' needs approval by a member of {groups}; "
            f"an approver can decide at {url}, then call it again",
            approval_id=request.approval_id,
            approval_url=url,
            expires_in=max(0, int(record.expires_at - now)),
        )
        return dataclasses.replace(pending, approval_url=url)

    def _event(self, event: str, binding: CallBinding, approval_id: str, **fields: object) -> None:
        self._observe(event, approval_id=approval_id, route=binding.route, target=binding.tool, **fields)
