"""What the operator's buttons do, through the runtime: decide, cancel, retry."""

from __future__ import annotations

from collections.abc import Mapping

from .. import runtime
from ..errors import InvalidRunOptions, RunNotResumable
from ..readback import RunSummary
from ..state import app_state
from .access import OperatorScope


def approve(
    run_id: str,
    scope: OperatorScope,
    approval_id: str,
    note: str | None,
    arguments: Mapping[str, object] | None = None,
) -> RunSummary:
    """Approve, as the operator, the approval the page showed (with edited ``arguments``).

    When the step's kind has a registered handler, the decision and the
    step's claim are one transaction (``resume=True``); without one the run
    stays approved and waiting, for the host's own ``resume_run`` with its
    per-call handlers.
    """
    paused = runtime.get_run(run_id, tenant_id=scope.tenant_id)
    return runtime.approve_run(
        run_id,
        decided_by=_decider(scope),
        note=note,
        arguments=arguments,
        approval_id=approval_id,
        resume=_registered_kind(paused) is not None,
        tenant_id=scope.tenant_id,
    )


def reject(run_id: str, scope: OperatorScope, approval_id: str, reason: str | None) -> RunSummary:
    """Reject, as the operator, the approval the page showed; step and run end ``rejected``."""
    return runtime.reject_run(
        run_id,
        decided_by=_decider(scope),
        reason=reason,
        approval_id=approval_id,
        tenant_id=scope.tenant_id,
    )


def cancel(run_id: str, scope: OperatorScope, reason: str | None) -> RunSummary:
    """Cancel, as the operator, a run that has not ended."""
    return runtime.cancel_run(
        run_id, cancelled_by=_decider(scope), reason=reason, tenant_id=scope.tenant_id
    )


def retry(run_id: str, scope: OperatorScope, attempt: int | None = None) -> RunSummary:
    """Resume the run with the registered handlers, as the operator: retry the failed step of
    a ``failed`` run (at ``attempt``, the one the page showed), or continue an approved one
    that waits for ``resume_run``."""
    run = runtime.get_run(run_id, tenant_id=scope.tenant_id)
    if _registered_kind(run) is None:
        raise RunNotResumable(
            run_id,
            run.status,
            "No handler is registered in this app for the kind of the run's current step,"
            " so it cannot be resumed from these pages: the app resumes it with a handler"
            " of its own.",
        )
    return runtime.resume_run(
        run_id, requested_by=_decider(scope), attempt=attempt, tenant_id=scope.tenant_id
    )


def _registered_kind(run: RunSummary) -> str | None:
    """The kind of the run's current step, if this app has a handler registered for it."""
    head = runtime.step_head(run.run_id, run.current_step_id)
    if head is None or head.kind not in app_state().registry.handlers:
        return None
    return head.kind


def _decider(scope: OperatorScope) -> str:
    if scope.actor_id is None:
        raise InvalidRunOptions(
            "The operator scope names no actor_id, so nobody can be recorded as the"
            " decider; return one from the @runtime.operator_scope resolver."
        )
    return scope.actor_id
