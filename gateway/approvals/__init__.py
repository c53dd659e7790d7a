"""Approvals: calls a human must approve before the gateway forwards them.

With enterprise-managed authorization nobody clicks a consent screen any more, so the few calls that
need a person are caught at run time. A ``tools`` allow rule with ``require_approval`` makes the
decision engine answer "ask" (gateway/engine.py ``Effect.APPROVE``) instead of "allow"; how the gateway
asks depends on who can be asked and which protocol generation the client speaks:

- the caller, in the call's own round, when its client can show a form (``elicitation`` capability):
  MCP 2026-07-28 multi-round-trip requests (an ``InputRequiredResult`` with a signed, stateless
  ``requestState``: gateway/approvals/stateless.py), or, up to 2025-11-25, an ``elicitation/create``
  request on the POST's SSE response (gateway/approvals/session.py);
- someone else (``approver_groups``): the call is parked and a member of those groups decides at
  ``/approvals/{id}`` (gateway/approvals/delegated.py);
- nobody: a client that cannot be asked gets ``approval_required``.

Whatever the path, the upstream sees the call only once it is approved, exactly as it was decided
(the arguments are bound by their SHA-256), and never sees the gateway's own fields.
"""
