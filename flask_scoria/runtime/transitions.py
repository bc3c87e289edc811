"""The verbs that move an existing run: dispatch, resume, approve, reject, cancel."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime

from .. import signals
from .._json import json_object, oversized
from ..errors import (
    ApprovalAlreadyDecided,
    ApprovalPending,
    InvalidDecision,
    InvalidRunOptions,
    NoPendingApproval,
    RunNotResumable,
)
from ..readback import Approval, RunSummary
from ..statuses import ApprovalStatus, EventType, RunStatus, StepStatus
from . import one_statement
from . import statements as sql
from .arguments import (
    LARGEST_INT,
    UNSET,
    TenantGuard,
    approval_key,
    decider,
    int_in_range,
    optional_text,
    run_uuid,
    tenant_guard,
)
from .context import RuntimeContext, context
from .handlers import Handler, Handlers
from .outcomes import drive
from .rows import approval_from_row, split_prefixed, summary_from_row
from .statements import Conflict
from .steps import (
    claim_next,
    claim_step,
    decided_approval,
    expire_approval,
    expire_leases,
    notice_expiry,
)
from .tables import Row, RowLike
from .transaction import Claim, Signal, Tx, send_signals, transact

#: A failed run can still be cancelled, which stops it from being retried.
_CANCELLABLE = (RunStatus.RUNNING, RunStatus.WAITING_FOR_APPROVAL, RunStatus.FAILED)


def dispatch(
    run_id: str,
    *,
    handlers: Mapping[str, Handler | str] | None = None,
    tenant_id: object = UNSET,
    identity: object = None,
) -> RunSummary:
    """Execute the queued steps of a ``running`` run whose handlers are known, or send
    them to their executor (``worker``, ``celery``), which runs them later.

    On a run in any other state, or whose steps are already claimed, nothing
    changes, but for an expired lease or approval, recorded as a read records
    it. Concurrent dispatchers never execute one step twice.
    """
    key = run_uuid(run_id)
    guard = tenant_guard(tenant_id, identity)
    ctx = context()
    resolver = Handlers(handlers, ctx.registry)

    def decide(tx: Tx) -> None:
        if not notice_expiry(tx) and tx.status() == RunStatus.RUNNING:
            claim_next(tx, resolver)

    _, row, claim = transact(ctx, key, guard, decide, claims=True)
    return summary_from_row(drive(ctx, resolver, claim, row))


def resume_run(
    run_id: str,
    *,
    handlers: Mapping[str, Handler | str] | None = None,
    requested_by: str | None = None,
    attempt: int | None = None,
    tenant_id: object = UNSET,
    identity: object = None,
) -> RunSummary:
    """Continue the same run: after an approval, or by retrying its failed step.

    Never creates a run. ``requested_by`` names who asked (an operator, say),
    recorded on the ``resume_requested`` or ``retry_requested`` event. Raises
    :class:`ApprovalPending` while the approval is undecided and
    :class:`RunNotResumable` in any state other than an approved pause or
    ``failed``. With ``attempt``, only a ``failed`` run whose failed step is at
    that attempt is retried, so that a page or a job retries what it saw once.
    """
    key = run_uuid(run_id)
    guard = tenant_guard(tenant_id, identity)
    who = None if requested_by is None else decider(requested_by, "requested_by")
    seen = None if attempt is None else int_in_range(attempt, "attempt", LARGEST_INT)
    ctx = context()
    resolver = Handlers(handlers, ctx.registry)

    def decide(tx: Tx) -> None:
        expire_leases(tx)
        status = tx.status()
        if status == RunStatus.WAITING_FOR_APPROVAL and seen is None:
            _resume_approved(tx, resolver, who)
        elif status == RunStatus.FAILED:
            _retry_failed(tx, resolver, who, seen)
        else:
            raise RunNotResumable(str(tx.run_id), status, _not_resumable_message(tx, status, seen))

    if ctx.storage.pipelines and seen is None and (claiming := resolver.kinds_run_here()):
        written = one_statement.resume(ctx, key, guard, claiming, _resume_payload(who))
        if written is not None:
            return _drive_written(ctx, resolver, written, [(signals.run_resumed, {})])
    ahead = [(sql.LATEST_APPROVAL_WITH_STEP, {"b_run_id": key})]
    _, row, claim = transact(ctx, key, guard, decide, ahead=lambda now: ahead, claims=True)
    return summary_from_row(drive(ctx, resolver, claim, row))


def _approve_at_once(
    ctx: RuntimeContext,
    handlers: Handlers,
    key: uuid.UUID,
    guard: TenantGuard,
    expected: uuid.UUID | None,
    who: str,
    note: str | None,
    edited: Row | None,
    resume: bool,
) -> RunSummary | None:
    """Approve as one statement on PostgreSQL (:mod:`.one_statement`); ``None``: not done."""
    claiming = handlers.kinds_run_here() if resume else None
    if not ctx.storage.pipelines or claiming == []:
        return None
    resumed = _resume_payload(who)
    written = one_statement.approve(ctx, key, guard, expected, who, note, edited, claiming, resumed)
    if written is None:
        return None
    approval = _decision(written.approval["id"], ApprovalStatus.APPROVED, who)
    sent: list[Signal] = [(signals.approval_decided, {"approval": approval})]
    if resume:
        sent.append((signals.run_resumed, {}))
    return _drive_written(ctx, handlers, written, sent)


def _drive_written(
    ctx: RuntimeContext, handlers: Handlers, written: one_statement.Written, sent: list[Signal]
) -> RunSummary:
    """Signal what a statement of :mod:`.one_statement` wrote, then execute the step it claimed."""
    claim = None
    if written.step is not None:
        step = written.step
        handler = handlers.get(step["kind"])
        assert handler is not None, "only a kind with a handler here is claimed"
        claim = Claim(step, step["lease_token"], handler, approval_from_row(written.approval))
    send_signals(ctx, written.run, sent, claim)
    return summary_from_row(drive(ctx, handlers, claim, written.run))


def _not_resumable_message(tx: Tx, status: str, attempt: int | None) -> str:
    run_id = tx.run_id
    if status == RunStatus.WAITING_FOR_APPROVAL:
        return (
            f"Run {run_id} is waiting for approval: attempt= retries only a failed run;"
            " decide the approval, then resume it without attempt=."
        )
    if attempt is not None:
        return f"Run {run_id} is {status}: attempt {attempt} is no longer the one to retry."
    if status != RunStatus.RUNNING:
        return f"Run {run_id} is {status} and cannot be resumed."
    step = _current_step(tx)
    if step is not None and step["status"] == StepStatus.RUNNING:
        lease = step["lease_expires_at"]
        held = (
            ""
            if lease is None
            else f" (its lease held until {lease.isoformat(timespec='seconds')})"
        )
        return (
            f"Run {run_id} is running; its step {step['kind']!r} is executing{held}: wait for it."
        )
    if step is not None and step["status"] == StepStatus.QUEUED:
        executor = tx.registry.policy(step["kind"]).executor
        if executor != "inline":
            where = "a worker" if executor == "worker" else "Celery"
            return f"Run {run_id} is running; its step {step['kind']!r} is queued for {where}."
        due = step["not_before"]
        if due is not None and due > tx.now:
            return (
                f"Run {run_id} is running; its step {step['kind']!r} is due at"
                f" {due.isoformat(timespec='seconds')} (a delay, or a retry's backoff):"
                " dispatch() executes it from then on, as a worker does."
            )
    return f"Run {run_id} is running; call dispatch() to execute its queued steps."


def _current_step(tx: Tx) -> Row | None:
    step_id = tx.changes.get("current_step_id", tx.run["current_step_id"])
    if step_id is None:
        return None
    return tx.first(sql.STEP_BY_ID, {"b_step_id": step_id})


def _latest_approval(tx: Tx) -> Approval | None:
    """The latest approval of the run's current step; of the run, once it moved on to a
    step without one (a decision that came too late hears who decided)."""
    params = {"b_run_id": tx.run_id}
    row = tx.first(sql.LATEST_APPROVAL, params) or tx.first(sql.LATEST_APPROVAL_OF_RUN, params)
    return None if row is None else approval_from_row(row)


def _resume_approved(tx: Tx, handlers: Handlers, requested_by: str | None) -> None:
    row = tx.first(sql.LATEST_APPROVAL_WITH_STEP, {"b_run_id": tx.run_id})
    if row is None:
        raise NoPendingApproval(str(tx.run_id))
    approval = approval_from_row(row)
    if approval.status == ApprovalStatus.PENDING:
        if approval.expires_at is not None and approval.expires_at < tx.now:
            # It expired unnoticed: record that, then ask again. The run never ends
            # failed for anyone to see, so no run_failed is sent.
            expire_approval(tx, announce=False)
            _retry_failed(tx, handlers, requested_by)
            return
        raise ApprovalPending(str(tx.run_id), approval.id)
    _continue(tx, split_prefixed(row, "steps_"), handlers, approval, requested_by)


def _continue(
    tx: Tx, step: Row, handlers: Handlers, approval: Approval, requested_by: str | None
) -> None:
    """Resume the run at its approved ``step``: claim it for its handler, or queue it."""
    tx.set(status=RunStatus.RUNNING)
    tx.event(EventType.RESUME_REQUESTED, step["id"], _resume_payload(requested_by))
    tx.signal(signals.run_resumed)
    claim_step(tx, step, handlers, approval, from_status=StepStatus.WAITING_FOR_APPROVAL)


def _decision(approval_id: uuid.UUID, decision: ApprovalStatus, decided_by: str) -> Row:
    """The payload of an ``approval_decided`` event and signal (the one-statement approval
    writes the event's in its SQL)."""
    return {"approval_id": str(approval_id), "decision": decision, "decided_by": decided_by}


def _resume_payload(requested_by: str | None) -> Row | None:
    """The payload of a ``resume_requested`` event: who asked, if the caller said."""
    return None if requested_by is None else {"requested_by": requested_by}


def _retry_failed(
    tx: Tx, handlers: Handlers, requested_by: str | None, seen: int | None = None
) -> None:
    step = _current_step(tx)
    if step is None or step["status"] != StepStatus.FAILED:
        raise RunNotResumable(
            str(tx.run_id), RunStatus.FAILED, f"Run {tx.run_id} has no failed step to retry."
        )
    if seen is not None and step["attempt"] != seen:
        if seen > step["attempt"]:
            said = f"has no attempt {seen}: its step's failed attempt is {step['attempt']}."
        else:
            said = (
                f"was retried since attempt {seen} failed: its attempt {step['attempt']}"
                " failed in turn."
            )
        raise RunNotResumable(
            str(tx.run_id),
            RunStatus.FAILED,
            f"Run {tx.run_id} {said} Retry that one, if it should be.",
        )
    attempt = step["attempt"] + 1
    tx.set(status=RunStatus.RUNNING, completed_at=None)
    payload: Row = {"attempt": attempt}
    if requested_by is not None:
        payload["requested_by"] = requested_by
    tx.event(EventType.RETRY_REQUESTED, step["id"], payload)
    tx.signal(signals.run_resumed)
    claim_step(
        tx,
        step,
        handlers,
        decided_approval(tx, step),
        from_status=StepStatus.FAILED,
        attempt=attempt,
        error_envelope=None,
        result_envelope=None,
        completed_at=None,
    )


def _explain_undecided(tx: Tx, approval_id: uuid.UUID | None, edits: bool) -> None:
    """Raise why the approval (default: the run's latest) could not be decided; for an
    approval that expired unnoticed, write its expiry instead."""
    if approval_id is None:
        approval = _latest_approval(tx)
    else:
        row = tx.first(sql.APPROVAL_OF_RUN, {"b_run_id": tx.run_id, "b_approval_id": approval_id})
        approval = None if row is None else approval_from_row(row)
    if approval is None or approval.status == ApprovalStatus.EXPIRED:
        latest = None if approval is None else _latest_approval(tx)
        asked_again = latest.id if latest and latest.status == ApprovalStatus.PENDING else None
        raise NoPendingApproval(
            str(tx.run_id),
            None if approval_id is None else str(approval_id),
            expired=approval is not None,
            pending_id=asked_again,
        )
    if approval.status != ApprovalStatus.PENDING:
        raise ApprovalAlreadyDecided(
            str(tx.run_id), approval.id, approval.status, approval.decided_by
        )
    if approval.expires_at is not None and approval.expires_at < tx.now:
        expire_approval(tx)
        return
    if edits and not approval.editable:
        raise InvalidDecision(
            f"Approval {approval.id} of run {tx.run_id} is not editable, so its arguments"
            " cannot be replaced; approve it as requested or reject it."
        )
    raise Conflict


def approve_run(
    run_id: str,
    *,
    decided_by: str,
    note: str | None = None,
    arguments: Mapping[str, object] | None = None,
    approval_id: str | None = None,
    resume: bool = False,
    handlers: Mapping[str, Handler | str] | None = None,
    tenant_id: object = UNSET,
    identity: object = None,
) -> RunSummary:
    """Approve the run's pending approval as ``decided_by``.

    Given ``approval_id`` (the approval the decider was shown), only that
    approval is decided, never a later one. ``arguments`` replace the
    requested ones, for an approval that is ``editable`` (otherwise
    :class:`InvalidDecision`). Without ``resume`` the run stays
    ``waiting_for_approval`` until :func:`resume_run`; with it the step is
    claimed in the same transaction, so no other caller can resume in
    between, and run (or queued) before this returns. Raises
    :class:`ApprovalAlreadyDecided` (naming the winner) or
    :class:`NoPendingApproval` (also for an approval that expired).
    """
    if not isinstance(resume, bool):
        raise InvalidRunOptions("resume must be True or False.")
    edited = None
    if arguments is not None:
        edited = json_object(arguments, what="arguments", error=InvalidRunOptions)
    return _decide(
        run_id,
        ApprovalStatus.APPROVED,
        decided_by,
        note,
        approval_id,
        tenant_id,
        identity,
        edited=edited,
        resume=resume,
        handlers=handlers,
    )


def reject_run(
    run_id: str,
    *,
    decided_by: str,
    reason: str | None = None,
    approval_id: str | None = None,
    tenant_id: object = UNSET,
    identity: object = None,
) -> RunSummary:
    """Reject the run's pending approval; the step and the run end ``rejected``.

    ``approval_id`` binds the decision to one approval, as for :func:`approve_run`.
    """
    return _decide(
        run_id, ApprovalStatus.REJECTED, decided_by, reason, approval_id, tenant_id, identity
    )


def _decide(
    run_id: object,
    decision: ApprovalStatus,
    decided_by: object,
    note: object,
    approval_id: object,
    tenant_id: object,
    identity: object,
    *,
    edited: Row | None = None,
    resume: bool = False,
    handlers: Mapping[str, Handler | str] | None = None,
) -> RunSummary:
    key = run_uuid(run_id)
    guard = tenant_guard(tenant_id, identity)
    who = decider(decided_by, "decided_by")
    text = optional_text(note, "note" if decision == ApprovalStatus.APPROVED else "reason")
    expected = approval_key(approval_id)
    ctx = context()
    if edited is not None:
        cap = ctx.result_max_bytes
        too_large = oversized(edited, cap, "arguments", "SCORIA_RESULT_MAX_BYTES")
        if too_large is not None:
            raise InvalidRunOptions(too_large)
    resolver = Handlers(handlers, ctx.registry)
    if decision == ApprovalStatus.APPROVED and not isinstance(expected, str):
        approved = _approve_at_once(ctx, resolver, key, guard, expected, who, text, edited, resume)
        if approved is not None:
            return approved

    def decision_sent(now: datetime) -> Sequence[tuple[sql.Prepared, RowLike]]:
        """The decision, and with ``resume`` the step it resumes, read with the run."""
        if isinstance(expected, str):  # names no approval at all
            return []
        params = {
            "b_run_id": key,
            "b_now": now,
            "b_edits": edited is not None,
            "status": decision,
            "decided_by": who,
            "decided_at": now,
            "note": text,
            "edited_arguments": edited,
        }
        sent: list[tuple[sql.Prepared, RowLike]] = [
            (sql.DECIDE_LATEST_APPROVAL, params)
            if expected is None
            else (sql.DECIDE_APPROVAL, {**params, "b_approval_id": expected})
        ]
        if resume:
            sent.append((sql.CURRENT_STEP_OF_RUN, {"b_run_id": key}))
        return sent

    def decide(tx: Tx) -> bool:
        """Decide; ``False`` when the approval turned out to have expired."""
        if isinstance(expected, str):
            raise NoPendingApproval(str(tx.run_id), expected)
        decision_statement, params = decision_sent(tx.now)[0]
        decided = tx.first(decision_statement, params)
        if decided is None:
            _explain_undecided(tx, expected, edited is not None)
            return False
        step_id = decided["step_id"]
        payload = _decision(decided["id"], decision, who)
        tx.event(EventType.APPROVAL_DECIDED, step_id, payload)
        tx.signal(signals.approval_decided, approval=payload)
        if decision == ApprovalStatus.REJECTED:
            tx.update_step(
                step_id,
                {"status": StepStatus.WAITING_FOR_APPROVAL},
                status=StepStatus.REJECTED,
                completed_at=tx.now,
            )
            tx.set(status=RunStatus.REJECTED, completed_at=tx.now)
            tx.event(EventType.RUN_REJECTED, step_id, {"reason": text})
        elif resume:
            step = tx.first(sql.CURRENT_STEP_OF_RUN, {"b_run_id": tx.run_id})
            if step is None or step["id"] != step_id:
                step = tx.first(sql.STEP_BY_ID, {"b_step_id": step_id})
            assert step is not None
            _continue(tx, step, resolver, approval_from_row(decided), who)
        return True

    decided, row, claim = transact(ctx, key, guard, decide, ahead=decision_sent)
    if decided is False:  # it expired: that is written now
        raise NoPendingApproval(str(key), None if expected is None else str(expected), expired=True)
    return summary_from_row(drive(ctx, resolver, claim, row))


def cancel_run(
    run_id: str,
    *,
    cancelled_by: str,
    reason: str | None = None,
    tenant_id: object = UNSET,
    identity: object = None,
) -> RunSummary:
    """End a run that is running, waiting for approval or failed, with its open steps and
    approvals, as ``cancelled``, so that a failed run is never retried.

    A handler still executing finishes, but its outcome is discarded.
    """
    key = run_uuid(run_id)
    guard = tenant_guard(tenant_id, identity)
    who = decider(cancelled_by, "cancelled_by")
    text = optional_text(reason, "reason")
    ctx = context()

    def decide(tx: Tx) -> None:
        if tx.status() not in _CANCELLABLE:
            raise RunNotResumable(
                str(tx.run_id), tx.status(), f"Run {tx.run_id} already ended as {tx.status()}."
            )
        ended = {"b_run_id": tx.run_id, "b_now": tx.now}
        tx.write(sql.CANCEL_OPEN_STEPS, ended)
        tx.write(sql.CANCEL_PENDING_APPROVALS, {**ended, "b_by": who, "b_note": text})
        tx.set(status=RunStatus.CANCELLED, completed_at=tx.now)
        tx.event(EventType.RUN_CANCELLED, None, {"cancelled_by": who, "reason": text})

    _, row, _ = transact(ctx, key, guard, decide)
    return summary_from_row(row)
