"""What the operator's Approve and Reject buttons do, through the facade."""

from __future__ import annotations

from .. import runtime
from ..errors import InvalidRunOptions
from ..readback import RunSummary
from ..state import app_state
from .access import OperatorScope


def approve(run_id: str, scope: OperatorScope, approval_id: str, note: str | None) -> RunSummary:
    """Approve, as the operator, the approval the page showed.

    Resumes at once when the step's kind has a registered handler; without
    one the run stays approved and waiting, for the host's own ``resume_run``
    with its per-call handlers.
    """
    decided = runtime.approve_run(
        run_id,
        decided_by=_decider(scope),
        note=note,
        approval_id=approval_id,
        tenant_id=scope.tenant_id,
    )
    if runtime.step_kind(run_id, decided.current_step_id) in app_state().registry.handlers:
        return runtime.resume_run(run_id, tenant_id=scope.tenant_id)
    return decided


def reject(run_id: str, scope: OperatorScope, approval_id: str, reason: str | None) -> RunSummary:
    """Reject, as the operator, the approval the page showed; step and run end ``rejected``."""
    return runtime.reject_run(
        run_id,
        decided_by=_decider(scope),
        reason=reason,
        approval_id=approval_id,
        tenant_id=scope.tenant_id,
    )


def _decider(scope: OperatorScope) -> str:
    if scope.actor_id is None:
        raise InvalidRunOptions(
            "The operator scope names no actor_id, so nobody can be recorded as the"
            " decider; return one from the @runtime.operator_scope resolver."
        )
    return scope.actor_id
