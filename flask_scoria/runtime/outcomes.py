"""Executing claimed steps and recording what their handlers returned.

Each outcome type has one recorder here; a new outcome needs its class in
``flask_scoria.outcomes``, its check in :mod:`.handlers` and a recorder in
:data:`RECORDERS`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from .. import signals
from .._ids import uuid7
from ..errors import InvalidHandoff
from ..outcomes import Fail, Handoff, Outcome, Succeed, WaitForApproval
from ..statuses import ApprovalStatus, RunStatus, StepStatus
from . import statements as sql
from .context import UNSET, RuntimeContext
from .handlers import Handlers, run_handler
from .handoffs import record_handoff, validate_handoff
from .rows import step_view_from_row, summary_from_row
from .steps import claim_next, fail_run
from .transaction import Claim, Row, Tx, transact


def drive(ctx: RuntimeContext, handlers: Handlers, claim: Claim | None, row: Row) -> Row:
    """Execute claimed steps one after another until none is left to claim."""
    while claim is not None:
        view = step_view_from_row(claim.step, claim.approval)
        with ctx.keeper.hold(ctx.storage, claim.step["id"], claim.token):
            outcome = run_handler(claim.handler, view, summary_from_row(row))
        record = partial(record_outcome, ctx=ctx, handlers=handlers, claim=claim, outcome=outcome)
        _, row, claim = transact(ctx, row["id"], UNSET, record, known=row)
    return row


@dataclass(frozen=True)
class Finished:
    """One handler's outcome, being written in the transaction ``tx``."""

    tx: Tx
    ctx: RuntimeContext
    handlers: Handlers
    claim: Claim

    @property
    def step_id(self) -> uuid.UUID:
        step_id: uuid.UUID = self.claim.step["id"]
        return step_id

    def finish(self, status: StepStatus, **values: object) -> None:
        """Write the step's new status, unless the step is no longer held by this claim."""
        held = {"status": StepStatus.RUNNING, "lease_token": self.claim.token}
        self.tx.finish_step(
            self.step_id, held, status=status, lease_token=None, lease_expires_at=None, **values
        )


def record_outcome(
    tx: Tx, *, ctx: RuntimeContext, handlers: Handlers, claim: Claim, outcome: Outcome
) -> None:
    """Write a handler's ``outcome`` for the step of ``claim`` in the transaction ``tx``."""
    RECORDERS[type(outcome)](Finished(tx, ctx, handlers, claim), outcome)


def _succeed(done: Finished, outcome: Succeed) -> None:
    tx = done.tx
    done.finish(StepStatus.COMPLETED, result_envelope=outcome.result, completed_at=tx.now)
    tx.event("step_completed", done.step_id)
    if _no_open_steps(tx):
        tx.set(status=RunStatus.COMPLETED, completed_at=tx.now)
        tx.event("run_completed")
        tx.signal(signals.run_completed)
    else:
        claim_next(tx, done.handlers)


def _wait_for_approval(done: Finished, outcome: WaitForApproval) -> None:
    tx = done.tx
    done.finish(StepStatus.WAITING_FOR_APPROVAL)
    approval = {
        "id": uuid7(),
        "run_id": tx.run_id,
        "step_id": done.step_id,
        "status": ApprovalStatus.PENDING,
        "tool_name": outcome.tool_name,
        "arguments": outcome.arguments,
        "reason": outcome.reason,
        "requested_at": tx.now,
        "decided_by": None,
        "decided_at": None,
        "note": None,
        "editable": False,
        "edited_arguments": None,
        "expires_at": None,
    }
    sql.INSERT_APPROVAL.execute_many(tx.conn, [approval])
    tx.set(status=RunStatus.WAITING_FOR_APPROVAL, current_step_id=done.step_id)
    tx.event("waiting_for_approval", done.step_id, {"tool_name": outcome.tool_name})
    tx.signal(signals.run_paused)


def _fail(done: Finished, outcome: Fail) -> None:
    done.finish(StepStatus.FAILED, error_envelope=outcome.error, completed_at=done.tx.now)
    fail_run(done.tx, done.step_id, "step_failed", outcome.error)


def _handoff(done: Finished, outcome: Handoff) -> None:
    try:
        spec = validate_handoff(
            delegated_role_id=outcome.delegated_role_id,
            delegated_kind=outcome.delegated_kind,
            handoff_input={} if outcome.handoff_input is None else outcome.handoff_input,
            projected_context=(
                {} if outcome.projected_context is None else outcome.projected_context
            ),
            capability_tags=outcome.capability_tags,
            max_bytes=done.ctx.handoff_max_bytes,
            max_depth=done.ctx.handoff_max_depth,
        )
    except InvalidHandoff as exc:
        _fail(done, Fail({"type": "invalid_handoff", "code": exc.code, "message": exc.message}))
        return
    _, result = record_handoff(done.tx, done.step_id, spec)
    done.finish(StepStatus.COMPLETED, result_envelope=result, completed_at=done.tx.now)
    claim_next(done.tx, done.handlers)


#: The recorder of each outcome type.
RECORDERS: dict[type, Callable[[Finished, Any], None]] = {
    Succeed: _succeed,
    WaitForApproval: _wait_for_approval,
    Fail: _fail,
    Handoff: _handoff,
}


def _no_open_steps(tx: Tx) -> bool:
    """Whether every step of the run is now completed or cancelled."""
    if tx.run["last_step_sequence"] == 1:
        # A run that never had a second step has only the one just completed.
        return True
    open_steps = sql.OPEN_STEP_COUNT.first(tx.conn, {"b_run_id": tx.run_id})
    return open_steps is not None and open_steps["count"] == 0
