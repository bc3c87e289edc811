"""Moving steps: claiming them for a handler, queueing retries, expiring leases.

A step is claimed (``running``, with a lease) in the transaction that makes
it runnable; its handler then runs between transactions, holding the lease,
and :mod:`.outcomes` writes what it returned.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import ColumnElement, and_, or_

from .. import signals
from .._ids import uuid7
from ..policy import HandlerPolicy
from ..readback import Approval
from ..statuses import ApprovalStatus, EventType, RunStatus, StepStatus
from . import statements as sql
from . import tracing
from .executors import QueuedStep
from .handlers import HandlerRegistry, Handlers
from .rows import approval_from_row
from .tables import Row, RowLike, steps
from .transaction import Claim, RunChange, Tx

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
    """Move a step to ``queued``, or straight to ``running`` when this process executes it.

    A step stays ``queued`` while no handler for its kind is known, before its
    ``not_before``, and when its executor is another process (which is told
    on commit). One change claims at most one step. ``changes`` are further
    column values to write with the move. Returns whether the step was claimed.
    """
    kind = step["kind"]
    handler = handlers.get(kind)
    if handler is None:
        log.info(
            "Step %s of run %s stays queued: no handler for kind %r is known;"
            " dispatch() or 'flask scoria worker' runs it once one is registered.",
            step["id"],
            change.run_id,
            kind,
        )
    not_before: datetime | None = changes.get("not_before", step["not_before"])  # type: ignore[assignment]
    due = not_before is None or not_before <= change.now
    if handler is None or change.claim is not None or not due or not handlers.runs_here(kind):
        _leave_queued(change, step, handlers, from_status, handler is not None, changes)
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
    attempt = values.get("attempt", step["attempt"])
    change.event(EventType.STEP_STARTED, step["id"], {"attempt": attempt})
    change.claim = Claim({**step, **values}, token, handler, approval)
    return True


def _leave_queued(
    change: RunChange,
    step: Mapping[str, Any],
    handlers: Handlers,
    from_status: StepStatus,
    known: bool,
    changes: dict[str, object],
) -> None:
    """Write the step as ``queued``, due now unless later, and tell its executor."""
    not_before: datetime | None = changes.get("not_before", step["not_before"])  # type: ignore[assignment]
    if not_before is None:
        changes["not_before"] = not_before = change.now
    policy = handlers.policy(step["kind"], due=not_before <= change.now)
    # A kind unknown here still goes to the app's default executor, if that is another process.
    ours = known or policy.executor != "inline"
    elsewhere = ours and (not_before > change.now or not handlers.runs_here(step["kind"]))
    if elsewhere:
        headers = tracing.carrier()
        if headers is not None:
            changes["trace_context"] = headers
    if from_status != StepStatus.QUEUED or changes:
        change.update_step(step["id"], {"status": from_status}, status=StepStatus.QUEUED, **changes)
        if elsewhere:
            payload = {"executor": policy.executor, "not_before": _iso(not_before)}
            change.event(EventType.STEP_QUEUED, step["id"], payload)
    if elsewhere:
        change.queue(
            QueuedStep(change.run_id, step["id"], str(policy.executor), not_before, policy.timeout)
        )


def _iso(moment: object) -> str:
    return moment.isoformat() if isinstance(moment, datetime) else str(moment)


def retry_or_fail(
    change: RunChange,
    step: Mapping[str, Any],
    write: Callable[..., None],
    policy: HandlerPolicy,
    error: Row,
    event_type: EventType,
    later: HandlerPolicy | None = None,
) -> datetime | None:
    """After a failed attempt, queue the step again while attempts remain, else fail it.

    ``write(step_id, **values)`` updates the step only while it is
    still held as it was read. ``event_type`` names the failure
    (``step_failed``, ``step_timeout``, ``lease_expired``). A retry that
    falls due later is queued for ``later``'s executor, if given. Returns
    when the next attempt falls due, or ``None`` when step and run failed.
    """
    step_id = step["id"]
    attempt = step["attempt"]
    released = {"lease_token": None, "lease_expires_at": None}
    if attempt >= policy.retry.attempts:
        write(
            step_id,
            status=StepStatus.FAILED,
            error_envelope=error,
            completed_at=change.now,
            **released,
        )
        fail_run(change, step_id, event_type, error)
        return None
    not_before = change.now + policy.retry.delay_after(attempt)
    values: dict[str, object] = {
        "status": StepStatus.QUEUED,
        "attempt": attempt + 1,
        "not_before": not_before,
        "error_envelope": None,
        "completed_at": None,
        **released,
    }
    headers = tracing.carrier()
    if headers is not None:
        values["trace_context"] = headers
    write(step_id, **values)
    if event_type != EventType.STEP_FAILED:
        change.event(event_type, step_id, error)
    payload: dict[str, object] = {
        "attempt": attempt + 1,
        "attempts": policy.retry.attempts,
        "not_before": _iso(not_before),
        "error": error,
    }
    if later is not None and not_before > change.now:
        policy = later
    if policy.executor != "inline":
        # Where the retry is sent, so that a lost send is sent again (see step_queued).
        payload["executor"] = policy.executor
    change.event(EventType.RETRY_SCHEDULED, step_id, payload)
    executor = str(policy.executor)
    change.queue(QueuedStep(change.run_id, step_id, executor, not_before, policy.timeout))
    return not_before


def claim_next(tx: Tx, handlers: Handlers) -> None:
    """Claim the first queued step of the run whose handler is known."""
    for step in tx.all(sql.QUEUED_STEPS, {"b_run_id": tx.run_id, "b_now": tx.now}):
        if handlers.get(step["kind"]) is not None:
            claim_step(tx, step, handlers, decided_approval(tx, step))
            return


def decided_approval(tx: Tx, step: RowLike) -> Approval | None:
    """The latest decision on ``step`` (found through the run's approvals index).

    A step that never started has none: only its handler can ask for approval.
    """
    if step["started_at"] is None:
        return None
    params = {"b_run_id": tx.run_id, "b_step_id": step["id"]}
    row = tx.first(sql.LATEST_DECIDED_APPROVAL_OF_STEP, params)
    return None if row is None else approval_from_row(row)


def fail_run(
    change: RunChange,
    step_id: uuid.UUID,
    event_type: EventType,
    error: Row,
    *,
    announce: bool = True,
) -> None:
    """End the run as ``failed`` because of ``step_id``; ``announce`` sends ``run_failed``
    (not for a run that its transaction goes on to retry, which never ends failed)."""
    change.set(status=RunStatus.FAILED, completed_at=change.now, current_step_id=step_id)
    change.event(event_type, step_id, error)
    change.event(EventType.RUN_FAILED, step_id)
    if announce:
        change.signal(signals.run_failed)


def step_deadline(step: RowLike, timeout: float | None) -> datetime | None:
    """When a claimed step times out (``None``: it never does)."""
    if timeout is None:
        return None
    started: datetime = step["started_at"]
    return started + timedelta(seconds=timeout)


def stale_step(
    running: Iterable[Row], now: datetime, registry: HandlerRegistry
) -> tuple[Row, EventType] | None:
    """Which of a run's ``running`` steps is past its timeout or its lease, and which of the two."""
    timeouts = registry.timeouts()
    for step in running:
        deadline = step_deadline(step, timeouts.get(step["kind"]))
        if deadline is not None and deadline <= now:
            return step, EventType.STEP_TIMEOUT
        if step["lease_expires_at"] is not None and step["lease_expires_at"] < now:
            return step, EventType.LEASE_EXPIRED
    return None


def stale_condition(now: datetime, registry: HandlerRegistry) -> ColumnElement[bool]:
    """Which running steps (of any run) are past their lease or their kind's timeout."""
    late = [
        and_(steps.c.kind == kind, steps.c.started_at <= now - timedelta(seconds=timeout))
        for kind, timeout in sorted(registry.timeouts().items())
    ]
    # Every running step holds a lease: saying so walks the index of leases, whatever
    # the timeouts, not every step ever stored.
    return and_(
        steps.c.status == StepStatus.RUNNING,
        steps.c.lease_expires_at.is_not(None),
        or_(steps.c.lease_expires_at < now, *late),
    )


def stale_error(change: RunChange, step: Row, reason: EventType, timeout: float | None) -> Row:
    """The error envelope of ``step``, which timed out or lost its lease; a warning says so
    once ``change`` is committed."""
    if reason == EventType.STEP_TIMEOUT:
        change.warn(
            "Step %s (kind %r) of run %s ran past its timeout of %g seconds.",
            step["id"],
            step["kind"],
            step["run_id"],
            timeout,
        )
        return {
            "type": "step_timeout",
            "message": f"The step was still running {timeout:g} seconds after it started;"
            " its late outcome is discarded.",
            "timeout": timeout,
        }
    change.warn(
        "Step %s (kind %r) of run %s lost its lease: the process executing it stopped,"
        " or could not reach the database to record its outcome, before it finished.",
        step["id"],
        step["kind"],
        step["run_id"],
    )
    return {
        "type": "lease_expired",
        "message": "The process executing this step stopped, or could not reach the"
        " database to record its outcome, before it finished; resume_run retries the step.",
        "lease_expired_at": step["lease_expires_at"].isoformat(),
    }


def expire_leases(tx: Tx, running: Iterable[Row] | None = None) -> bool:
    """Retry or fail a running step of the run that outlived its lease or its timeout.

    ``running``: the run's running steps, if the caller has read them already.
    """
    if tx.status() != RunStatus.RUNNING:
        return False
    if running is None:
        running = tx.all(sql.RUNNING_STEPS_OF_RUN, {"b_run_id": tx.run_id})
    found = stale_step(running, tx.now, tx.registry)
    if found is None:
        return False
    step, reason = found
    policy = tx.registry.policy(step["kind"])
    # Only the lease that was read: a renewal committed since then keeps the step alive.
    held = {
        "status": StepStatus.RUNNING,
        "lease_token": step["lease_token"],
        "lease_expires_at": step["lease_expires_at"],
    }
    error = stale_error(tx, step, reason, policy.timeout)
    retry_or_fail(tx, step, partial(_write_held, tx, held), policy, error, reason)
    return True


def expire_approval(tx: Tx, *, announce: bool = True) -> bool:
    """Fail the run if its pending approval expired; the approval becomes ``expired``.

    ``announce``: send ``run_failed`` (see :func:`fail_run`)."""
    if tx.status() != RunStatus.WAITING_FOR_APPROVAL:
        return False
    expired = tx.first(sql.EXPIRED_APPROVAL_OF_RUN, {"b_run_id": tx.run_id, "b_now": tx.now})
    if expired is None:
        return False
    tx.update_approval(
        expired["id"],
        {"status": ApprovalStatus.PENDING},
        status=ApprovalStatus.EXPIRED,
        decided_at=tx.now,
    )
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
    tx.event(
        EventType.APPROVAL_EXPIRED,
        expired["step_id"],
        {"approval_id": str(expired["id"]), "expired_at": expired["expires_at"].isoformat()},
    )
    fail_run(tx, expired["step_id"], EventType.STEP_FAILED, error, announce=announce)
    return True


def notice_expiry(tx: Tx) -> bool:
    """Fail the run if a lease or an approval of it expired; whether one did."""
    return expire_leases(tx) or expire_approval(tx)


def _write_held(tx: Tx, held: Mapping[str, object], step_id: uuid.UUID, **values: object) -> None:
    tx.update_step(step_id, held, **values)


def dispatch_next(tx: Tx, handlers: Handlers) -> None:
    """Claim the run's next due step, unless a stale step ended or the run is not running."""
    if not expire_leases(tx) and tx.status() == RunStatus.RUNNING:
        claim_next(tx, handlers)
