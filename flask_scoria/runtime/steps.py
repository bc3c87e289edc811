"""Moving steps: claiming them for a handler, running claimed steps, expiring leases.

A step is claimed (``running``, with a lease) in the transaction that makes
it runnable; its handler then runs between transactions, holding the lease,
and :mod:`.outcomes` writes what it returned.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Mapping
from typing import Any

from .. import signals
from .._ids import uuid7
from ..readback import Approval
from ..statuses import ApprovalStatus, RunStatus, StepStatus
from . import statements as sql
from .handlers import Handlers
from .rows import approval_from_row
from .transaction import Claim, Conflict, Row, RunChange, Tx

log = logging.getLogger("flask_scoria")


def new_step_row(
    run_id: uuid.UUID,
    *,
    sequence: int,
    kind: str,
    role_id: str,
    parent_step_id: uuid.UUID | None = None,
    handoff_input: Row | None = None,
    projected_context: Row | None = None,
    input: Row | None = None,
) -> Row:
    """A new ``queued`` step of ``run_id``, as a row to insert."""
    return {
        "id": uuid7(),
        "run_id": run_id,
        "parent_step_id": parent_step_id,
        "sequence": sequence,
        "kind": kind,
        "role_id": role_id,
        "status": StepStatus.QUEUED,
        "attempt": 1,
        "handoff_input": handoff_input,
        "projected_context": projected_context,
        "result_envelope": None,
        "error_envelope": None,
        "lease_token": None,
        "lease_expires_at": None,
        "started_at": None,
        "completed_at": None,
        "input": input,
        "not_before": None,
        "trace_context": None,
    }


def claim_step(
    change: RunChange,
    step: Mapping[str, Any],
    handlers: Handlers,
    approval: Approval | None,
    *,
    from_status: StepStatus = StepStatus.QUEUED,
    **changes: object,
) -> bool:
    """Move a step to ``queued``, or straight to ``running`` when its handler is known.

    One change claims at most one step. ``changes`` are further column values
    to write with the move. Returns whether the step was claimed.
    """
    handler = handlers.get(step["kind"])
    if handler is None:
        log.info(
            "Step %s of run %s stays queued: no handler for kind %r is known;"
            " dispatch() or 'flask scoria worker' runs it once one is registered.",
            step["id"],
            change.run_id,
            step["kind"],
        )
    if handler is None or change.claim is not None:
        if from_status != StepStatus.QUEUED or changes:
            change.update_step(
                step["id"], {"status": from_status}, status=StepStatus.QUEUED, **changes
            )
        return False
    token = secrets.token_hex(16)
    values = {
        **changes,
        "status": StepStatus.RUNNING,
        "lease_token": token,
        "lease_expires_at": change.lease_until,
        "started_at": change.now,
    }
    change.update_step(step["id"], {"status": from_status}, **values)
    change.set(current_step_id=step["id"])
    change.event("step_started", step["id"], {"attempt": values.get("attempt", step["attempt"])})
    change.claim = Claim({**step, **values}, token, handler, approval)
    return True


def claim_next(tx: Tx, handlers: Handlers) -> None:
    """Claim the first queued step of the run whose handler is known."""
    for step in sql.QUEUED_STEPS.all(tx.conn, {"b_run_id": tx.run_id, "b_now": tx.now}):
        if handlers.get(step["kind"]) is not None:
            claim_step(tx, step, handlers, decided_approval(tx, step["id"]))
            return


def decided_approval(tx: Tx, step_id: uuid.UUID) -> Approval | None:
    """The latest decision on ``step_id`` (found through the run's approvals index)."""
    params = {"b_run_id": tx.run_id, "b_step_id": step_id}
    row = sql.LATEST_DECIDED_APPROVAL_OF_STEP.first(tx.conn, params)
    return None if row is None else approval_from_row(row)


def fail_run(change: RunChange, step_id: uuid.UUID, event_type: str, error: Row) -> None:
    """End the run as ``failed`` because of ``step_id``."""
    change.set(status=RunStatus.FAILED, completed_at=change.now, current_step_id=step_id)
    change.event(event_type, step_id, error)
    change.event("run_failed", step_id)
    change.signal(signals.run_failed)


def expire_leases(tx: Tx) -> bool:
    """Fail the run if one of its running steps outlived its lease."""
    if tx.status() != RunStatus.RUNNING:
        return False
    params = {"b_run_id": tx.run_id, "b_now": tx.now}
    expired = sql.EXPIRED_STEP_OF_RUN.first(tx.conn, params)
    if expired is None:
        return False
    error = {
        "type": "lease_expired",
        "message": "The process executing this step stopped before it finished;"
        " resume_run retries the step.",
    }
    # Only the lease that was read: a renewal committed since then keeps the step alive.
    held = {
        "status": StepStatus.RUNNING,
        "lease_token": expired["lease_token"],
        "lease_expires_at": expired["lease_expires_at"],
    }
    tx.update_step(
        expired["id"],
        held,
        status=StepStatus.FAILED,
        error_envelope=error,
        lease_token=None,
        lease_expires_at=None,
        completed_at=tx.now,
    )
    fail_run(tx, expired["id"], "lease_expired", error)
    return True


def expire_approval(tx: Tx) -> bool:
    """Fail the run if its pending approval expired; the approval becomes ``expired``."""
    if tx.status() != RunStatus.WAITING_FOR_APPROVAL:
        return False
    expired = sql.EXPIRED_APPROVAL_OF_RUN.first(tx.conn, {"b_run_id": tx.run_id, "b_now": tx.now})
    if expired is None:
        return False
    if not sql.update_approval_if(
        tx.conn,
        expired["id"],
        {"status": ApprovalStatus.PENDING},
        {"status": ApprovalStatus.EXPIRED, "decided_at": tx.now},
    ):
        raise Conflict
    error = {
        "type": "approval_expired",
        "message": f"Nobody decided on {expired['tool_name']!r} before"
        f" {expired['expires_at'].isoformat()}; resume_run asks again.",
    }
    tx.update_step(
        expired["step_id"],
        {"status": StepStatus.WAITING_FOR_APPROVAL},
        status=StepStatus.FAILED,
        error_envelope=error,
        completed_at=tx.now,
    )
    tx.event("approval_expired", expired["step_id"], {"approval_id": str(expired["id"])})
    fail_run(tx, expired["step_id"], "step_failed", error)
    return True


def notice_expiry(tx: Tx) -> bool:
    """Fail the run if a lease or an approval of it expired; whether one did."""
    return expire_leases(tx) or expire_approval(tx)
