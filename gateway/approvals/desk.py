"""The approval desk: what the gateway does with a call the decision engine says to ask about.

One desk per request (gateway/pipeline/decide.py builds it), consulted by gateway/enforce.py for every
call the engine answered with ``approve`` and for every call carrying the gateway's own
``requestState``. It settles the call one of three ways:

- :class:`Approved`: a person approved this very call; forward ``raw`` (the gateway's fields removed);
- :class:`Answered`: the gateway answers the call itself (an ``InputRequiredResult`` asking, or a
  ``-32003`` refusal with ``data.reason``: ``approval_required``, ``approval_declined``,
  ``approval_cancelled``, ``approval_timeout``, ``approval_pending``, ``approval_state_invalid``);
- :class:`Ask`: ask the caller on this POST's SSE response before forwarding (up to 2025-11-25).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.approvals import stateless
from gateway.approvals.binding import CallBinding, arguments_sha256, summary
from gateway.approvals.spec import ApprovalSpec
from gateway.approvals.stateless import APPROVAL_INPUT, APPROVED, ASK, PARKED, StateInvalid, StateSigner
from gateway.classify import STATELESS_SINCE, Call, request_protocol_version
from gateway.oauth.access_token import Principal
from gateway.oauth.replay import ReplayStore, ReplayStoreUnavailable
from gateway.proxy.jsonrpc import ResultRewrite
from gateway.proxy.request_body import RpcMessage
from gateway.sessions import principal_key

FORBIDDEN = -32003
CLIENT_CAPABILITIES_META = "io.modelcontextprotocol/clientCapabilities"

# Told every approval event: (event, fields). Events: approval.asked, approval.granted, approval.declined,
# approval.cancelled, approval.expired, approval.refused (a state that is not this call's).
ApprovalObserver = Callable[..., None]


@dataclass(frozen=True)
class Approved:
    raw: dict[str, Any]
    after: ResultRewrite | None = None  # applied to the upstream's result of this call


@dataclass(frozen=True)
class Answered:
    response: dict[str, Any]
    reason: str  # for the audit line of the call
    asked: bool = False  # a question, not a refusal: audited as ``approval.asked`` alone
    approval_url: str | None = None  # approval_pending: where an approver decides (gateway/approvals/http.py)


@dataclass(frozen=True)
class Ask:
    message: RpcMessage
    binding: CallBinding
    spec: ApprovalSpec
    text: str


Settlement = Approved | Answered | Ask


class DelegatedApprovals(Protocol):
    """``approver_groups``: someone else decides (gateway/approvals/delegated.py)."""

    async def settle(
        self, message: RpcMessage, binding: CallBinding, spec: ApprovalSpec, text: str, principal: Principal
    ) -> Approved | Answered: ...


def refusal(message: RpcMessage, reason: str, text: str, **data: Any) -> Answered:
    error = {"code": FORBIDDEN, "message": text, "data": {"reason": reason, "method": message.method, **data}}
    return Answered({"jsonrpc": "2.0", "id": message.id, "error": error}, reason)


def supports_form_elicitation(capabilities: Any) -> bool:
    """MCP 2025-11-25 "Elicitation": ``elicitation: {}`` means form mode (backwards compatibility);
    otherwise ``form`` must be declared."""
    if not isinstance(capabilities, dict):
        return False
    elicitation = capabilities.get("elicitation")
    return isinstance(elicitation, dict) and ("form" in elicitation or "url" not in elicitation)


class ApprovalDesk:
    def __init__(
        self,
        *,
        principal: Principal,
        route: str,
        headers: Mapping[str, str],
        signer: StateSigner,
        replay: ReplayStore,
        observe: ApprovalObserver,
        session_elicitation: bool = False,
        can_stream: bool = False,
        delegated: DelegatedApprovals | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``session_elicitation``: the session's client declared form elicitation in ``initialize``;
        ``can_stream``: this POST may be answered with SSE (single request, Accept allows it)."""
        self._principal = principal
        self._route = route
        self._headers = headers
        self._signer = signer
        self._replay = replay
        self._observe = observe
        self._session_elicitation = session_elicitation
        self._can_stream = can_stream
        self._delegated = delegated
        self._clock = clock

    def binding(self, call: Call) -> CallBinding:
        owner = principal_key(self._principal.identity, self._principal.client_id)
        return CallBinding(self._route, owner, call.target or "", arguments_sha256(call.arguments))

    def _event(self, event: str, binding: CallBinding, approval_id: str | None, **fields: Any) -> None:
        self._observe(event, approval_id=approval_id, route=binding.route, target=binding.tool, **fields)

    async def settle(self, message: RpcMessage, call: Call, spec: ApprovalSpec | None) -> Settlement:
        """``spec`` None: the call is allowed without approval but carries a gateway state to unwrap."""
        binding = self.binding(call)
        params = message.params or {}
        state = params.get("requestState")
        if stateless.is_gateway_state(state):
            return await self._resume(message, binding, state, spec)
        if spec is None:
            return Approved(message.raw)
        text = summary(spec, self._route, binding.tool, call.arguments)
        if spec.delegated:
            if self._delegated is None:
                return refusal(message, "approval_required", "This call needs approval and approvals are unavailable")
            settled = await self._delegated.settle(message, binding, spec, text, self._principal)
            if isinstance(settled, Approved) and self._stateless(message):
                # The upstream's own rounds of this call (2026-07-28) stay approved: one approval, one call.
                return Approved(settled.raw, self._wrap_upstream_round(binding, spec.timeout_seconds))
            if isinstance(settled, Answered) and settled.approval_url and self._shows_urls(message):
                return self._park_stateless(message, binding, spec, settled, settled.approval_url)
            return settled
        if self._stateless(message):
            if supports_form_elicitation(self._capabilities(message)):
                return self._ask_stateless(message, binding, spec, text)
        elif self._session_elicitation and self._can_stream:
            return Ask(message, binding, spec, text)
        return refusal(
            message,
            "approval_required",
            f"Calling tool '{binding.tool}' needs your approval, and your client cannot be asked "
            "(it did not declare the elicitation capability)",
        )

    def _capabilities(self, message: RpcMessage) -> Any:
        meta = (message.params or {}).get("_meta")
        return meta.get(CLIENT_CAPABILITIES_META) if isinstance(meta, dict) else None

    def _shows_urls(self, message: RpcMessage) -> bool:
        """A 2026-07-28 client declaring URL-mode elicitation (``elicitation: {url: {}}``)."""
        elicitation = (self._capabilities(message) or {}).get("elicitation") if self._stateless(message) else None
        return isinstance(elicitation, dict) and "url" in elicitation

    def _park_stateless(
        self, message: RpcMessage, binding: CallBinding, spec: ApprovalSpec, pending: Answered, url: str
    ) -> Answered:
        """``approval_pending`` as a URL-mode elicitation: the client shows its user the approval page to
        hand to an approver; its retry (the state, stage ``parked``) is forwarded if the approval was
        granted meanwhile, and answered ``approval_pending`` (no second round) if not."""
        text = f"{pending.response['error']['message']}. Open {url} and pass it to an approver."
        inner = (message.params or {}).get("requestState")
        token, _ = self._signer.new(
            binding, PARKED, self._clock(), spec.timeout_seconds, inner if isinstance(inner, str) else None
        )
        result = stateless.input_required(text, token, stateless.url_request(text, url))
        return Answered({"jsonrpc": "2.0", "id": message.id, "result": result}, "approval pending", asked=True)

    def _stateless(self, message: RpcMessage) -> bool:
        version = request_protocol_version(message, self._headers)
        return version is not None and version >= STATELESS_SINCE

    def _ask_stateless(self, message: RpcMessage, binding: CallBinding, spec: ApprovalSpec, text: str) -> Answered:
        # A call that was itself a retry of the upstream's round keeps that round: its state rides along.
        inner = (message.params or {}).get("requestState")
        inner = inner if isinstance(inner, str) else None
        token, nonce = self._signer.new(binding, ASK, self._clock(), spec.timeout_seconds, inner)
        self._event("approval.asked", binding, nonce, reason="input_required")
        result = stateless.input_required(text, token)
        return Answered({"jsonrpc": "2.0", "id": message.id, "result": result}, "approval asked", asked=True)

    async def _resume(
        self, message: RpcMessage, binding: CallBinding, token: str, spec: ApprovalSpec | None
    ) -> Settlement:
        params = message.params or {}
        try:
            state = self._signer.verify(token, binding, self._clock())
        except StateInvalid as invalid:
            if invalid.problem == "expired":
                self._event("approval.expired", binding, None, reason="input_required")
                return refusal(message, "approval_timeout", "The approval of this call expired; call it again")
            self._event("approval.refused", binding, None, reason=invalid.problem)
            return refusal(
                message,
                "approval_state_invalid",
                "This requestState was not issued for this call",
                detail=invalid.problem,
            )
        try:
            first = await self._replay.first_use(f"approval-state\x00{state.nonce}", state.expires_at)
        except ReplayStoreUnavailable:
            return refusal(message, "approval_unavailable", "Approvals are unavailable right now; try again")
        if not first:
            self._event("approval.refused", binding, state.nonce, reason="replayed")
            return refusal(message, "approval_state_invalid", "This requestState was already used", detail="replayed")
        responses = params.get("inputResponses")
        responses = dict(responses) if isinstance(responses, dict) else {}
        if state.stage == ASK:
            answer = stateless.answer_of(responses.pop(APPROVAL_INPUT, None))
            if answer != "approved":
                self._event(f"approval.{answer}", binding, state.nonce, approver=self._principal.subject)
                return refusal(message, f"approval_{answer}", f"The call of tool '{binding.tool}' was not approved")
            self._event("approval.granted", binding, state.nonce, approver=self._principal.subject)
        elif state.stage == PARKED:
            blocked = await self._parked(message, binding, spec, responses.pop(APPROVAL_INPUT, None))
            if blocked is not None:
                return blocked
        forwarded = {k: v for k, v in params.items() if k not in ("requestState", "inputResponses")}
        if state.inner is not None:  # the upstream's own round: its state back, and the client's answers to it
            forwarded["requestState"] = state.inner
            if responses:
                forwarded["inputResponses"] = responses
        # Without an upstream round in progress the upstream asked nothing: nothing to answer is forwarded.
        ttl = spec.timeout_seconds if spec is not None else max(1, state.expires_at - int(self._clock()))
        return Approved({**message.raw, "params": forwarded}, self._wrap_upstream_round(binding, ttl))

    async def _parked(
        self, message: RpcMessage, binding: CallBinding, spec: ApprovalSpec | None, answer: Any
    ) -> Answered | None:
        """The retry after the client showed the approval URL: None when the approval was granted (the
        call goes on, once), else why not. The question was the requester's to dismiss, not to answer."""
        if not isinstance(answer, dict) or answer.get("action") != "accept":
            self._event("approval.cancelled", binding, None, reason="approval URL dismissed")
            return refusal(
                message, "approval_cancelled", f"The call of tool '{binding.tool}' was not sent for approval"
            )
        if spec is None:  # the rule no longer asks
            return None
        if not spec.delegated or self._delegated is None:
            return refusal(message, "approval_required", "The approval rule of this call changed; call it again")
        text = summary(spec, self._route, binding.tool, (message.params or {}).get("arguments"))
        settled = await self._delegated.settle(message, binding, spec, text, self._principal)
        return None if isinstance(settled, Approved) else settled

    def _wrap_upstream_round(self, binding: CallBinding, ttl: int) -> ResultRewrite:
        """An approved call the upstream answers with its own ``InputRequiredResult``: the client's
        next round must still count as approved, and the upstream must get its own state back."""

        def wrap(result: dict[str, Any]) -> dict[str, Any]:
            if result.get("resultType") != "input_required":
                return result
            inner = result.get("requestState")
            token, _ = self._signer.new(
                binding, APPROVED, self._clock(), ttl, inner if isinstance(inner, str) else None
            )
            return {**result, "requestState": token}

        return wrap
