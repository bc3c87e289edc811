"""Executing claimed steps and recording what their handlers returned.

Each outcome type has one recorder here; a new outcome needs its class in
``flask_scoria.outcomes``, its check in :mod:`.handlers` and a recorder in
:data:`RECORDERS`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from .. import signals
from .._ids import uuid7
from ..errors import InvalidHandoff
from ..outcomes import Fail, Handoff, Next, Outcome, Succeed, WaitForApproval
from ..statuses import ApprovalStatus, RunStatus, StepStatus
from . import statements as sql
from .context import UNSET, RuntimeContext
from .handlers import Handlers, run_handler
from .handoffs import record_handoff, serialized_size, validate_handoff
from .rows import step_view_from_row, summary_from_row
from .steps import claim_next, claim_step, fail_run, new_step_row
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
        "editable": outcome.editable,
        "edited_arguments": None,
        "expires_at": _after(tx.now, outcome.expires_in),
    }
    sql.INSERT_APPROVAL.execute_many(tx.conn, [approval])
    tx.set(status=RunStatus.WAITING_FOR_APPROVAL, current_step_id=done.step_id)
    tx.event("waiting_for_approval", done.step_id, {"tool_name": outcome.tool_name})
    tx.signal(signals.run_paused)


def _fail(done: Finished, outcome: Fail) -> None:
    done.finish(StepStatus.FAILED, error_envelope=outcome.error, completed_at=done.tx.now)
    fail_run(done.tx, done.step_id, "step_failed", outcome.error)


def _next(done: Finished, outcome: Next) -> None:
    tx = done.tx
    sequence = tx.step_sequence() + 1
    limit = done.ctx.max_steps
    if sequence > limit:
        message = f"Next({outcome.kind!r}) would give the run step {sequence}; the limit is {limit}"
        _fail(
            done, Fail({"type": "max_steps_exceeded", "message": message + " (SCORIA_MAX_STEPS)."})
        )
        return
    given = dict(outcome.input or {})
    size, cap = serialized_size(given), done.ctx.handoff_max_bytes
    if size > cap:
        message = f"Next input is {size} bytes serialized; the limit is {cap}"
        _fail(
            done,
            Fail(
                {
                    "type": "invalid_handler_result",
                    "message": message + " (SCORIA_HANDOFF_MAX_BYTES).",
                }
            ),
        )
        return
    step = new_step_row(
        tx.run_id,
        sequence=sequence,
        kind=outcome.kind,
        role_id=outcome.role_id or done.claim.step["role_id"],
        input=given,
    )
    step["not_before"] = _after(tx.now, outcome.delay)
    tx.add_step(step)
    result = {"next_step_id": str(step["id"]), "next_kind": outcome.kind}
    done.finish(StepStatus.COMPLETED, result_envelope=result, completed_at=tx.now)
    tx.event("step_completed", done.step_id)
    if step["not_before"] is None:
        claim_step(tx, step, done.handlers, None)
    else:
        tx.set(current_step_id=step["id"])
        tx.event("step_queued", step["id"], {"not_before": step["not_before"].isoformat()})


def _after(now: datetime, seconds: float | timedelta | None) -> datetime | None:
    """``now`` plus ``seconds``; ``None`` for no time at all."""
    if not seconds:
        return None
    return now + (seconds if isinstance(seconds, timedelta) else timedelta(seconds=seconds))


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
    Next: _next,
}


def _no_open_steps(tx: Tx) -> bool:
    """Whether every step of the run is now completed or cancelled."""
    if tx.run["last_step_sequence"] == 1:
        # A run that never had a second step has only the one just completed.
        return True
    open_steps = sql.OPEN_STEP_COUNT.first(tx.conn, {"b_run_id": tx.run_id})
    return open_steps is not None and open_steps["count"] == 0
