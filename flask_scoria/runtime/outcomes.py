"""Executing claimed steps and recording what their handlers returned.

Each outcome type has one recorder here; a new outcome needs its class in
``flask_scoria.outcomes``, its check in :mod:`.handlers` and a recorder in
:data:`RECORDERS`.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from .. import signals
from .._ids import uuid7
from .._json import oversized
from ..errors import InvalidHandoff, short_repr
from ..outcomes import Fail, Handoff, Next, Outcome, Succeed, WaitForApproval
from ..readback import RunSummary
from ..statuses import ApprovalStatus, EventType, RunStatus, StepStatus
from . import statements as sql
from . import tracing
from .arguments import UNSET
from .context import RuntimeContext
from .handlers import Handlers, Raised, invalid_result, run_handler, unreadable
from .handoffs import record_handoff, validate_handoff
from .rows import step_view_from_row, summary_from_row
from .steps import (
    claim_next,
    claim_step,
    dispatch_next,
    fail_run,
    new_step_row,
    retry_or_fail,
    stale_error,
    step_deadline,
)
from .tables import Row
from .transaction import Claim, Tx, transact, utcnow

#: The least time between two approvals of a step, as the second one's request records it.
_TICK = timedelta(microseconds=1)


def drive(ctx: RuntimeContext, handlers: Handlers, claim: Claim | None, row: Row) -> Row:
    """Execute claimed steps one after another until none is left to claim.

    A retry of a step executed here that falls due within
    ``SCORIA_INLINE_RETRY_WAIT`` seconds is waited for and executed too.
    """
    # The steps claimed here after the first join the trace the first joined, as those a
    # request executes join the request's.
    trace = None if claim is None else claim.step["trace_context"]
    while claim is not None:
        kind = claim.step["kind"]
        recorded, row, claim = _execute(ctx, handlers, claim, row, trace)
        if claim is None and recorded is not None and recorded.due is not None:
            wait = (recorded.due - utcnow()).total_seconds()
            here = handlers.runs_here(kind, due=wait <= 0)
            if not handlers.local and here and wait <= ctx.inline_retry_wait:
                time.sleep(max(wait, 0))
                next_due = partial(dispatch_next, handlers=handlers)
                _, row, claim = transact(ctx, row["id"], UNSET, next_due, claims=True)
    return row


def _execute(
    ctx: RuntimeContext, handlers: Handlers, claim: Claim, row: Row, trace: Row | None
) -> tuple[Recorded | None, Row, Claim | None]:
    """Run the handler of ``claim`` in its span (joining its own trace context, else
    ``trace``), then record its outcome."""
    step = claim.step
    deadline = step_deadline(step, handlers.policy(step["kind"]).timeout)
    view = step_view_from_row(step, claim.approval)
    headers = step["trace_context"] or trace
    with tracing.step_span(headers, str(row["id"]), step["kind"], step["attempt"]) as span:
        with ctx.keeper.hold(ctx.storage, step["id"], claim.token, deadline):
            outcome = run_handler(claim.handler, view, _handler_summary(row))
        record = partial(record_outcome, ctx=ctx, handlers=handlers, claim=claim, outcome=outcome)
        recorded, row, next_claim = transact(ctx, row["id"], UNSET, record, known=row)
        span.status("discarded" if recorded is None else recorded.status)
    return recorded, row, next_claim


def _handler_summary(row: Row) -> RunSummary:
    """The run as a handler is given it, with a metadata of its own: what the handler
    changes there is neither stored nor seen by the caller or by later steps."""
    run = summary_from_row(row)
    return replace(run, metadata=copy.deepcopy(run.metadata)) if run.metadata else run


@dataclass(frozen=True)
class Recorded:
    """What an outcome did to its step: the new status, and when a retry is due."""

    status: str
    due: datetime | None = None


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

    def finish(self, status: StepStatus, **values: object) -> Recorded:
        """Write the step's new status, unless the step is no longer held by this claim."""
        self.write(self.step_id, status=status, lease_token=None, lease_expires_at=None, **values)
        return Recorded(status)

    def write(self, step_id: uuid.UUID, **values: object) -> None:
        """Update the step while this claim still holds it; else :class:`StepLost`."""
        held = {"status": StepStatus.RUNNING, "lease_token": self.claim.token}
        self.tx.finish_step(step_id, held, **values)

    def retry_or_fail(self, error: Row, event_type: EventType) -> Recorded:
        """A failed attempt: queue the step again while attempts remain, else fail it."""
        kind = self.claim.step["kind"]
        policy, later = self.handlers.policy(kind), self.handlers.policy(kind, due=False)
        due = retry_or_fail(self.tx, self.claim.step, self.write, policy, error, event_type, later)
        return Recorded(StepStatus.FAILED if due is None else StepStatus.QUEUED, due)

    def timed_out(self) -> float | None:
        """The step's timeout if it passed before this outcome arrived."""
        timeout = self.handlers.policy(self.claim.step["kind"]).timeout
        deadline = step_deadline(self.claim.step, timeout)
        return timeout if deadline is not None and deadline <= self.tx.now else None


def record_outcome(
    tx: Tx, *, ctx: RuntimeContext, handlers: Handlers, claim: Claim, outcome: Outcome
) -> Recorded:
    """Write a handler's ``outcome`` for the step of ``claim`` in the transaction ``tx``.

    An outcome that arrives after the step's timeout is discarded: the step
    timed out.
    """
    done = Finished(tx, ctx, handlers, claim)
    timeout = done.timed_out()
    if timeout is not None:
        return done.retry_or_fail(
            stale_error(tx, claim.step, EventType.STEP_TIMEOUT, timeout), EventType.STEP_TIMEOUT
        )
    too_large = _too_large(outcome, ctx.result_max_bytes)
    if too_large is not None:
        return _fail(done, too_large)
    return RECORDERS[type(outcome)](done, outcome)


def _too_large(outcome: Outcome, cap: int) -> Fail | None:
    """The failure of an outcome that would store more than ``cap`` bytes in one value.

    ``Next`` input and handoffs have their own cap (``SCORIA_HANDOFF_MAX_BYTES``).
    """
    stored: list[tuple[str, object]] = []
    if isinstance(outcome, Succeed):
        stored = [("The handler result", outcome.result)]
    elif isinstance(outcome, WaitForApproval):
        stored = [("Approval arguments", outcome.arguments), ("Approval reason", outcome.reason)]
    elif isinstance(outcome, Fail) and not isinstance(outcome, Raised):
        # An exception's record is bounded already, and keeps its retry policy.
        stored = [("The handler error", outcome.error)]
    for what, value in stored:
        too_large = oversized(value, cap, what, "SCORIA_RESULT_MAX_BYTES")
        if too_large is not None:
            return invalid_result(too_large)
    return None


def _succeed(done: Finished, outcome: Succeed) -> Recorded:
    tx = done.tx
    recorded = done.finish(
        StepStatus.COMPLETED, result_envelope=outcome.result, completed_at=tx.now
    )
    tx.event(EventType.STEP_COMPLETED, done.step_id)
    if _no_open_steps(tx):
        tx.set(status=RunStatus.COMPLETED, completed_at=tx.now)
        tx.event(EventType.RUN_COMPLETED)
        tx.signal(signals.run_completed)
    else:
        claim_next(tx, done.handlers)
    return recorded


def _wait_for_approval(done: Finished, outcome: WaitForApproval) -> Recorded:
    tx = done.tx
    recorded = done.finish(StepStatus.WAITING_FOR_APPROVAL)
    # A step's approvals are ordered by when they were requested: this one comes after
    # the one its handler saw, even from a process whose clock is behind.
    seen = done.claim.approval
    requested_at = tx.now if seen is None else max(tx.now, seen.requested_at + _TICK)
    approval = {
        "id": uuid7(),
        "run_id": tx.run_id,
        "step_id": done.step_id,
        "status": ApprovalStatus.PENDING,
        "tool_name": outcome.tool_name,
        "arguments": outcome.arguments,
        "reason": outcome.reason,
        "requested_at": requested_at,
        "decided_by": None,
        "decided_at": None,
        "note": None,
        "editable": outcome.editable,
        "edited_arguments": None,
        "expires_at": _after(requested_at, outcome.expires_in),
        "tenant_id": tx.run["tenant_id"],
    }
    tx.add_approval(approval)
    tx.set(status=RunStatus.WAITING_FOR_APPROVAL, current_step_id=done.step_id)
    tx.event(EventType.WAITING_FOR_APPROVAL, done.step_id, {"tool_name": outcome.tool_name})
    tx.signal(signals.run_paused)
    return recorded


def _fail(done: Finished, outcome: Fail) -> Recorded:
    recorded = done.finish(
        StepStatus.FAILED, error_envelope=outcome.error, completed_at=done.tx.now
    )
    fail_run(done.tx, done.step_id, EventType.STEP_FAILED, outcome.error)
    return recorded


def _beyond_max_steps(done: Finished, what: str) -> Fail | None:
    """The failure of an outcome whose new step would pass ``SCORIA_MAX_STEPS``."""
    tx, limit = done.tx, done.ctx.max_steps
    # Sequences are unique and start at 1 or more: a run whose next sequence is within
    # the limit has fewer steps. Only past it (or numbered from higher up) are they counted.
    if tx.step_sequence() + 1 <= limit:
        return None
    counted = tx.first(sql.STEP_COUNT, {"b_run_id": tx.run_id})
    total = (counted["count"] if counted else 0) + 1
    if total <= limit:
        return None
    message = f"{what} would give the run {total} steps; the limit is {limit}"
    return Fail({"type": "max_steps_exceeded", "message": message + " (SCORIA_MAX_STEPS)."})


def _next(done: Finished, outcome: Next) -> Recorded:
    tx = done.tx
    beyond = _beyond_max_steps(done, f"Next({outcome.kind!r})")
    if beyond is not None:
        return _fail(done, beyond)
    sequence = tx.step_sequence() + 1
    given = dict(outcome.input or {})
    cap = done.ctx.handoff_max_bytes
    too_large = oversized(given, cap, "Next input", "SCORIA_HANDOFF_MAX_BYTES")
    if too_large is not None:
        return _fail(done, invalid_result(too_large))
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
    recorded = done.finish(StepStatus.COMPLETED, result_envelope=result, completed_at=tx.now)
    tx.event(EventType.STEP_COMPLETED, done.step_id)
    tx.set(current_step_id=step["id"])
    claimed = claim_step(tx, step, done.handlers, None)
    told = any(
        event["event_type"] == EventType.STEP_QUEUED and event["step_id"] == step["id"]
        for event in tx.new_events
    )
    if not claimed and not told and step["not_before"] is not None:
        payload = {"not_before": step["not_before"].isoformat()}
        sent = [queued.executor for queued in tx.queued if queued.step_id == step["id"]]
        if sent:  # as _leave_queued says it: a lost send is sent again by the recover task
            payload = {"executor": sent[0], **payload}
        tx.event(EventType.STEP_QUEUED, step["id"], payload)
    return recorded


def _after(now: datetime, seconds: float | timedelta | None) -> datetime | None:
    """``now`` plus ``seconds``; ``None`` for no time at all."""
    if not seconds:
        return None
    return now + (seconds if isinstance(seconds, timedelta) else timedelta(seconds=seconds))


def _raised(done: Finished, outcome: Raised) -> Recorded:
    return done.retry_or_fail(outcome.error, EventType.STEP_FAILED)


def _handoff(done: Finished, outcome: Handoff) -> Recorded:
    beyond = _beyond_max_steps(done, f"Handoff to {short_repr(outcome.delegated_kind)}")
    if beyond is not None:
        return _fail(done, beyond)
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
        error = {"type": "invalid_handoff", "code": exc.code, "message": exc.message}
        return _fail(done, Fail(error))
    except Exception as exc:  # a payload whose own methods raise when read
        return _fail(done, unreadable(outcome, exc, done.step_id))
    child, result = record_handoff(done.tx, done.step_id, spec)
    recorded = done.finish(StepStatus.COMPLETED, result_envelope=result, completed_at=done.tx.now)
    # The run's current step: claimed here, or queued with its time for the process
    # that runs its kind (as a handoff run's first child is).
    done.tx.set(current_step_id=child["id"])
    claim_step(done.tx, child, done.handlers, None)
    return recorded


#: The recorder of each outcome type.
RECORDERS: dict[type, Callable[[Finished, Any], Recorded]] = {
    Succeed: _succeed,
    WaitForApproval: _wait_for_approval,
    Fail: _fail,
    Raised: _raised,
    Handoff: _handoff,
    Next: _next,
}


def _no_open_steps(tx: Tx) -> bool:
    """Whether every step of the run is now completed or cancelled."""
    if tx.run["last_step_sequence"] == 1:
        # A run that never had a second step has only the one just completed.
        return True
    open_steps = tx.first(sql.OPEN_STEP_COUNT, {"b_run_id": tx.run_id})
    return open_steps is not None and open_steps["count"] == 0
