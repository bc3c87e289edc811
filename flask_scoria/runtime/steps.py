"""Executing claimed steps and recording what their handlers returned.

Handlers run between transactions, holding a lease on their step.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping
from datetime import datetime
from functools import partial
from typing import Any

from .. import _sql, signals
from .._ids import uuid7
from ..errors import InvalidHandoff
from ..execution import Handlers, run_handler
from ..handoff import HandoffSpec, validate_handoff
from ..outcomes import Fail, Handoff, Outcome, Succeed, WaitForApproval
from ..readback import Approval, approval_from_row, step_view_from_row, summary_from_row
from .transaction import UNSET, Claim, RuntimeContext, Tx, transact


def drive(
    ctx: RuntimeContext, handlers: Handlers, claim: Claim | None, row: dict[str, Any]
) -> dict[str, Any]:
    """Execute claimed steps one after another until none is left to claim."""
    while claim is not None:
        view = step_view_from_row(claim.step, claim.approval)
        with ctx.keeper.hold(ctx.storage, claim.step["id"], claim.token):
            outcome = run_handler(claim.handler, view, summary_from_row(row))
        _, row, claim = transact(
            ctx,
            row["id"],
            UNSET,
            partial(record_outcome, ctx=ctx, handlers=handlers, claim=claim, outcome=outcome),
            known=row,
        )
    return row


def record_outcome(
    tx: Tx, *, ctx: RuntimeContext, handlers: Handlers, claim: Claim, outcome: Outcome
) -> None:
    step_id = claim.step["id"]
    held = {"status": "running", "lease_token": claim.token}
    done = {"lease_token": None, "lease_expires_at": None, "completed_at": tx.now}
    if isinstance(outcome, Handoff):
        try:
            spec = validate_handoff(
                delegated_role_id=outcome.delegated_role_id,
                delegated_kind=outcome.delegated_kind,
                handoff_input={} if outcome.handoff_input is None else outcome.handoff_input,
                projected_context=(
                    {} if outcome.projected_context is None else outcome.projected_context
                ),
                capability_tags=outcome.capability_tags,
                max_bytes=ctx.handoff_max_bytes,
                max_depth=ctx.handoff_max_depth,
            )
        except InvalidHandoff as exc:
            outcome = Fail({"type": "invalid_handoff", "code": exc.code, "message": exc.message})
        else:
            sequence = tx.run["last_step_sequence"] + 1
            child, handoff = handoff_rows(tx.run_id, step_id, spec, sequence=sequence, now=tx.now)
            result = handoff_result(handoff, spec)
            tx.finish_step(step_id, held, status="completed", result_envelope=result, **done)
            _sql.INSERT_STEP.execute_many(tx.conn, [child])
            _sql.INSERT_HANDOFF.execute_many(tx.conn, [handoff])
            tx.set(last_step_sequence=sequence)
            tx.event("step_completed", step_id)
            tx.event("handoff_created", step_id, handoff_payload(handoff))
            tx.signal(signals.handoff_created, handoff=handoff_payload(handoff))
            claim_next(tx, handlers)
            return
    if isinstance(outcome, Succeed):
        tx.finish_step(step_id, held, status="completed", result_envelope=outcome.result, **done)
        tx.event("step_completed", step_id)
        if _no_open_steps(tx):
            tx.set(status="completed", completed_at=tx.now)
            tx.event("run_completed")
            tx.signal(signals.run_completed)
        else:
            claim_next(tx, handlers)
    elif isinstance(outcome, WaitForApproval):
        tx.finish_step(
            step_id, held, status="waiting_for_approval", lease_token=None, lease_expires_at=None
        )
        _sql.INSERT_APPROVAL.execute_many(
            tx.conn,
            [
                {
                    "id": uuid7(),
                    "run_id": tx.run_id,
                    "step_id": step_id,
                    "status": "pending",
                    "tool_name": outcome.tool_name,
                    "arguments": outcome.arguments,
                    "reason": outcome.reason,
                    "requested_at": tx.now,
                    "decided_by": None,
                    "decided_at": None,
                    "note": None,
                }
            ],
        )
        tx.set(status="waiting_for_approval", current_step_id=step_id)
        tx.event("waiting_for_approval", step_id, {"tool_name": outcome.tool_name})
        tx.signal(signals.run_paused)
    elif isinstance(outcome, Fail):
        tx.finish_step(step_id, held, status="failed", error_envelope=outcome.error, **done)
        fail_run(tx, step_id, "step_failed", outcome.error)


def _no_open_steps(tx: Tx) -> bool:
    """Whether every step of the run is now completed or cancelled."""
    if tx.run["last_step_sequence"] == 1:
        # A run that never had a second step has only the one just completed.
        return True
    open_steps = _sql.OPEN_STEP_COUNT.first(tx.conn, {"b_run_id": tx.run_id})
    return open_steps is not None and open_steps["count"] == 0


def fail_run(tx: Tx, step_id: uuid.UUID, event_type: str, error: dict[str, Any]) -> None:
    tx.set(status="failed", completed_at=tx.now, current_step_id=step_id)
    tx.event(event_type, step_id, error)
    tx.event("run_failed", step_id)
    tx.signal(signals.run_failed)


def claim_step(
    tx: Tx,
    step: Mapping[Any, Any],
    handlers: Handlers,
    approval: Approval | None,
    *,
    from_status: str = "queued",
    **changes: Any,
) -> bool:
    """Move a step to ``queued``, or straight to ``running`` when its handler is known.

    ``changes`` are further column values to write with the move.
    """
    handler = handlers.get(step["kind"])
    if handler is None or tx.claim is not None:
        if from_status != "queued" or changes:
            tx.update_step(step["id"], {"status": from_status}, status="queued", **changes)
        return False
    token = secrets.token_hex(16)
    values = {
        **changes,
        "status": "running",
        "lease_token": token,
        "lease_expires_at": tx.lease_until,
        "started_at": tx.now,
    }
    tx.update_step(step["id"], {"status": from_status}, **values)
    tx.set(current_step_id=step["id"])
    tx.event("step_started", step["id"], {"attempt": values.get("attempt", step["attempt"])})
    tx.claim = Claim({**step, **values}, token, handler, approval)
    return True


def claim_next(tx: Tx, handlers: Handlers) -> None:
    for step in _sql.QUEUED_STEPS.all(tx.conn, {"b_run_id": tx.run_id}):
        if handlers.get(step["kind"]) is not None:
            claim_step(tx, step, handlers, decided_approval(tx, step["id"]))
            return


def decided_approval(tx: Tx, step_id: uuid.UUID) -> Approval | None:
    """The latest decision on ``step_id`` (found through the run's approvals index)."""
    params = {"b_run_id": tx.run_id, "b_step_id": step_id}
    row = _sql.LATEST_DECIDED_APPROVAL_OF_STEP.first(tx.conn, params)
    return None if row is None else approval_from_row(row)


def expire_leases(tx: Tx) -> bool:
    """Fail the run if one of its running steps outlived its lease."""
    if tx.status() != "running":
        return False
    params = {"b_run_id": tx.run_id, "b_now": tx.now}
    expired = _sql.EXPIRED_STEP_OF_RUN.first(tx.conn, params)
    if expired is None:
        return False
    error = {
        "type": "lease_expired",
        "message": "The process executing this step stopped before it finished;"
        " resume_run retries the step.",
    }
    # Only the lease that was read: a renewal committed since then keeps the step alive.
    held = {
        "status": "running",
        "lease_token": expired["lease_token"],
        "lease_expires_at": expired["lease_expires_at"],
    }
    tx.update_step(
        expired["id"],
        held,
        status="failed",
        error_envelope=error,
        lease_token=None,
        lease_expires_at=None,
        completed_at=tx.now,
    )
    fail_run(tx, expired["id"], "lease_expired", error)
    return True


def new_step_row(
    run_id: uuid.UUID,
    *,
    sequence: int,
    kind: str,
    role_id: str,
    parent_step_id: uuid.UUID | None = None,
    handoff_input: dict[str, Any] | None = None,
    projected_context: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": uuid7(),
        "run_id": run_id,
        "parent_step_id": parent_step_id,
        "sequence": sequence,
        "kind": kind,
        "role_id": role_id,
        "status": "queued",
        "attempt": 1,
        "handoff_input": handoff_input,
        "projected_context": projected_context,
        "result_envelope": None,
        "error_envelope": None,
        "lease_token": None,
        "lease_expires_at": None,
        "started_at": None,
        "completed_at": None,
    }


def handoff_rows(
    run_id: uuid.UUID, parent_id: uuid.UUID, spec: HandoffSpec, *, sequence: int, now: datetime
) -> tuple[dict[str, Any], dict[str, Any]]:
    child = new_step_row(
        run_id,
        sequence=sequence,
        kind=spec.delegated_kind,
        role_id=spec.delegated_role_id,
        parent_step_id=parent_id,
        handoff_input=spec.handoff_input,
        projected_context=spec.projected_context,
    )
    handoff = {
        "id": uuid7(),
        "run_id": run_id,
        "parent_step_id": parent_id,
        "child_step_id": child["id"],
        "delegated_role_id": spec.delegated_role_id,
        "delegated_kind": spec.delegated_kind,
        "capability_tags": spec.capability_tags,
        "handoff_input": spec.handoff_input,
        "projected_context": spec.projected_context,
        "created_at": now,
    }
    return child, handoff


def handoff_result(handoff: dict[str, Any], spec: HandoffSpec) -> dict[str, Any]:
    return {"handoff_id": str(handoff["id"]), "delegated_role_id": spec.delegated_role_id}


def handoff_payload(handoff: dict[str, Any]) -> dict[str, Any]:
    return {
        "handoff_id": str(handoff["id"]),
        "child_step_id": str(handoff["child_step_id"]),
        "delegated_role_id": handoff["delegated_role_id"],
        "delegated_kind": handoff["delegated_kind"],
    }
