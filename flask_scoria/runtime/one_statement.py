"""Approvals decided, and approved steps claimed, as one statement on PostgreSQL.

The common case of :func:`~.transitions.approve_run` (with or without
``resume``) and of :func:`~.transitions.resume_run` after an approval needs
nothing decided in Python: a pending approval is approved, or the approved
step is claimed for a handler this process runs. PostgreSQL then writes the
whole transition in one statement of data-modifying CTEs, its own
transaction, where the general way (:func:`~.transaction.transact`) takes two
round trips between ``BEGIN`` and ``COMMIT``:

- the run is locked first (``FOR UPDATE``), as every transition locks it, and
  only if no other call changed it since the statement's snapshot, which its
  other reads see;
- each write requires the one before it, so that a statement which finds
  nothing to do (no pending approval, a step that goes elsewhere, another
  tenant's run) writes nothing; the verb then decides as a transaction,
  which says why;
- the run's version and event numbers count on from its row, under the lock;
- a statement whose first write happened and whose run was not written (a
  change its snapshot did not see) fails whole, and the verb decides as a
  transaction too; so does one aborted for a concurrent transaction, or
  whose connection dropped (the transaction finds out whether it committed).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import (
    CTE,
    Boolean,
    ColumnElement,
    Integer,
    Select,
    String,
    Update,
    bindparam,
    cast,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY

from ..errors import StorageError
from ..statuses import ApprovalStatus, EventType, RunStatus, StepStatus
from ..storage import COMMIT_WITHOUT_WAITING
from . import statements as sql
from .arguments import UNSET, TenantGuard
from .context import RuntimeContext
from .rows import split_prefixed
from .tables import Row, approvals, events, runs, steps
from .transaction import utcnow

_NOW = bindparam("b_now", type_=runs.c.updated_at.type)
_RUN_PREFIX, _STEP_PREFIX, _APPROVAL_PREFIX = "run_", "step_", "approval_"


@dataclass(frozen=True)
class Written:
    """What a statement of this module wrote: the run, its approval, the claimed step."""

    run: Row
    approval: Row
    step: Row | None


def approve(
    ctx: RuntimeContext,
    run_id: uuid.UUID,
    guard: TenantGuard,
    approval_id: uuid.UUID | None,
    decided_by: str,
    note: str | None,
    edited: Row | None,
    claiming: Sequence[str] | None,
    resumed: Row | None,
) -> Written | None:
    """Approve the pending approval, and with ``claiming`` claim its step; ``None``: not done.

    ``approval_id`` names the approval (else the run's latest), ``edited`` the
    arguments that replace the requested ones, ``claiming`` the kinds whose
    handlers this process runs, ``resumed`` the payload of the claim's
    ``resume_requested`` event.
    """
    statement = _approve_statement(approval_id is not None, claiming is not None)
    params = {
        "b_approval_id": approval_id,
        "b_decided_by": decided_by,
        "b_note": note,
        "b_edited_arguments": edited,
        "b_edits": edited is not None,
        "b_kinds": list(claiming or ()),
        "b_resume_payload": resumed,
    }
    return _write(ctx, statement, run_id, guard, params)


def resume(
    ctx: RuntimeContext,
    run_id: uuid.UUID,
    guard: TenantGuard,
    claiming: Sequence[str],
    payload: Row | None,
) -> Written | None:
    """Claim the approved step of a run waiting for approval, its ``resume_requested``
    event saying ``payload``; ``None``: not done."""
    params = {"b_kinds": list(claiming), "b_resume_payload": payload}
    return _write(ctx, _resume_statement(), run_id, guard, params)


def _write(
    ctx: RuntimeContext,
    statement: sql.Prepared,
    run_id: uuid.UUID,
    guard: TenantGuard,
    params: Row,
) -> Written | None:
    now = utcnow()
    params.update(
        b_run_id=run_id,
        b_now=now,
        b_any_tenant=guard is UNSET,
        b_tenant=None if guard is UNSET else guard,
        b_token=secrets.token_hex(16),
        b_lease_until=ctx.keeper.expiry(now),
    )
    try:
        with ctx.storage.autocommit() as conn:
            row = statement.first(conn, params)
    except StorageError as exc:
        if ctx.storage.retry_after(exc, 1):
            try:
                return _written_before(ctx, run_id, params)
            except StorageError:
                # Whether it committed cannot be told: the caller must not be told more.
                raise exc from exc.__cause__
        if sql.unmatched(exc) or sql.lost_race(exc):
            return None  # the transaction that follows finds out what happened
        raise
    assert row is not None
    run = split_prefixed(row, _RUN_PREFIX)
    if run["id"] is None:
        return None
    step = split_prefixed(row, _STEP_PREFIX)
    return Written(run, split_prefixed(row, _APPROVAL_PREFIX), step if step else None)


def _written_before(ctx: RuntimeContext, run_id: uuid.UUID, params: Row) -> Written | None:
    """What the statement with ``params`` wrote, if its connection dropped after it
    committed (only its answer was lost); ``None`` if it did not commit: the
    transaction that follows then decides. Raises ``StorageError`` when it
    cannot be read.

    Its writes carry its time (``b_now``) and its claim's lease token (``b_token``).
    """
    with ctx.storage.read() as conn:
        run = sql.RUN_BY_ID.first(conn, {"b_run_id": run_id})
        if run is None or run["updated_at"] != params["b_now"]:
            return None
        if params.get("b_approval_id") is None:
            approval = sql.LATEST_APPROVAL.first(conn, {"b_run_id": run_id})
        else:
            by_id = {"b_run_id": run_id, "b_approval_id": params["b_approval_id"]}
            approval = sql.APPROVAL_OF_RUN.first(conn, by_id)
        step = sql.STEP_BY_ID.first(conn, {"b_step_id": run["current_step_id"]})
    if approval is None:
        return None
    claimed = step is not None and step["lease_token"] == params["b_token"]
    return Written(run, approval, step if claimed else None)


@cache
def _approve_statement(by_id: bool, claim: bool) -> sql.Prepared:
    locked = _locked()
    # The decision the transaction would make, once the run is locked.
    decide = (sql.DECIDE_APPROVAL if by_id else sql.DECIDE_LATEST_APPROVAL).statement
    assert isinstance(decide, Update)
    conditions = [select(locked.c.id).exists()]
    if claim:
        conditions.append(select(steps.c.id).where(*_claimable(approvals.c.step_id)).exists())
    decided = (
        decide.where(*conditions)
        .values(
            status=ApprovalStatus.APPROVED,
            decided_by=bindparam("b_decided_by"),
            decided_at=_NOW,
            note=bindparam("b_note"),
            edited_arguments=bindparam("b_edited_arguments"),
        )
        .cte("decided")
    )
    step_id = select(decided.c.step_id).scalar_subquery()
    # As the transaction writes it: which approval, how, by whom.
    payload = func.json_build_object(
        literal_column("'approval_id'"),
        select(decided.c.id).scalar_subquery(),
        literal_column("'decision'"),
        literal_column(f"'{ApprovalStatus.APPROVED}'"),
        literal_column("'decided_by'"),
        cast(bindparam("b_decided_by"), String),
    )
    decided_event = (EventType.APPROVAL_DECIDED, payload)
    if not claim:
        run = _moved_run(decided, None, 1)
        new_events = _events(run, step_id, [decided_event])
        return _result(decided, run, new_events, [(decided, _APPROVAL_PREFIX)], flush=True)
    claimed = _claimed(step_id)
    run = _moved_run(claimed, claimed, 3)
    new_events = _events(run, step_id, [decided_event, *_claim_events(claimed)])
    parts = [(claimed, _STEP_PREFIX), (decided, _APPROVAL_PREFIX)]
    return _result(decided, run, new_events, parts, flush=True)


@cache
def _resume_statement() -> sql.Prepared:
    locked = _locked(RunStatus.WAITING_FOR_APPROVAL)
    current_step_id = select(locked.c.current_step_id).scalar_subquery()
    approval = sql.latest_approval_of_step(current_step_id).cte("approval")
    approved = select(approval.c.id).where(approval.c.status == ApprovalStatus.APPROVED).exists()
    claimed = _claimed(select(locked.c.current_step_id).where(approved).scalar_subquery())
    run = _moved_run(claimed, claimed, 2)
    new_events = _events(run, select(claimed.c.id).scalar_subquery(), _claim_events(claimed))
    parts = [(claimed, _STEP_PREFIX), (approval, _APPROVAL_PREFIX)]
    # A claim alone: its commit need not wait for the disk (see RunChange.flushes).
    return _result(claimed, run, new_events, parts, flush=False)


def _locked(status: RunStatus | None = None) -> CTE:
    """The run, locked, if it is the tenant's (any tenant's with ``b_any_tenant``) and
    still as the statement's snapshot saw it.

    The statement's other reads (the approval a resume claims on) see that
    snapshot, taken before the lock was granted: a run that another call
    changed meanwhile is left alone here, and the verb decides as a transaction.
    """
    seen = select(runs.c.version).where(runs.c.id == bindparam("b_run_id")).scalar_subquery()
    query = select(runs.c.id, runs.c.current_step_id).where(
        runs.c.id == bindparam("b_run_id"),
        runs.c.version == seen,
        or_(
            bindparam("b_any_tenant", type_=Boolean),
            runs.c.tenant_id.is_not_distinct_from(bindparam("b_tenant", type_=String)),
        ),
    )
    if status is not None:
        query = query.where(runs.c.status == status)
    return query.with_for_update().cte("locked")


def _claimable(step_id: ColumnElement[Any]) -> list[ColumnElement[bool]]:
    """The step ``step_id`` waiting for approval, due, of a kind this process runs (``b_kinds``)."""
    return [
        steps.c.id == step_id,
        steps.c.status == StepStatus.WAITING_FOR_APPROVAL,
        steps.c.kind == func.any(bindparam("b_kinds", type_=ARRAY(String))),
        or_(steps.c.not_before.is_(None), steps.c.not_before <= _NOW),
    ]


def _claimed(step_id: ColumnElement[Any]) -> CTE:
    """The step ``step_id``, claimed for this process with the lease ``b_token``."""
    return (
        update(steps)
        .where(*_claimable(step_id))
        .values(
            status=StepStatus.RUNNING,
            lease_token=bindparam("b_token"),
            lease_expires_at=bindparam("b_lease_until"),
            started_at=_NOW,
        )
        .returning(*steps.c)
        .cte("claimed")
    )


def _claim_events(claimed: CTE) -> list[tuple[EventType, ColumnElement[Any]]]:
    """The events of resuming at the ``claimed`` step, as the transaction writes them; the
    payload of ``resume_requested`` is the parameter ``b_resume_payload``."""
    attempt = select(claimed.c.attempt).scalar_subquery()
    resumed = bindparam("b_resume_payload", type_=events.c.payload.type)
    return [
        (EventType.RESUME_REQUESTED, resumed),
        (EventType.STEP_STARTED, func.json_build_object(literal_column("'attempt'"), attempt)),
    ]


def _moved_run(after: CTE, claimed: CTE | None, new_events: int) -> CTE:
    """The run, moved on once ``after`` wrote its row: running the ``claimed`` step, if any."""
    values: dict[str, Any] = {
        "version": runs.c.version + 1,
        "last_event_sequence": runs.c.last_event_sequence + new_events,
        "updated_at": _NOW,
    }
    if claimed is not None:
        values["status"] = RunStatus.RUNNING
        values["current_step_id"] = select(claimed.c.id).scalar_subquery()
    return (
        update(runs)
        .where(runs.c.id == bindparam("b_run_id"), select(after.c.id).exists())
        .values(**values)
        .returning(*runs.c)
        .cte("run")
    )


def _events(
    run: CTE, step_id: ColumnElement[Any], new: Sequence[tuple[EventType, ColumnElement[Any]]]
) -> CTE:
    """The events ``new`` (type, payload) of ``step_id``, numbered up to the run's last."""
    rows = [
        select(
            run.c.id,
            run.c.last_event_sequence - (len(new) - 1 - index),
            cast(literal_column(f"'{event_type.value}'"), events.c.event_type.type),
            step_id,
            payload,
            _NOW,
        )
        for index, (event_type, payload) in enumerate(new)
    ]
    columns = ["run_id", "sequence", "event_type", "step_id", "payload", "created_at"]
    return insert(events).from_select(columns, union_all(*rows)).cte("new_events")


def _result(
    first: CTE,
    run: CTE,
    new_events: CTE,
    parts: Sequence[tuple[CTE, str]],
    *,
    flush: bool,
) -> sql.Prepared:
    """One row: the run as written, and ``parts``, each under its prefix.

    Its columns are ``NULL`` when nothing was written. The statement fails
    (``division_by_zero``) when ``first`` wrote a row and the run was not
    written; without ``flush`` its commit does not wait for the disk.
    """
    same = select(func.count()).select_from(first).scalar_subquery() == (
        select(func.count()).select_from(run).scalar_subquery()
    )
    checks: list[ColumnElement[Any]] = [(literal(1) // cast(same, Integer)).label("all_written")]
    if not flush:
        checks.append(literal_column(COMMIT_WITHOUT_WAITING).label("relaxed"))
    checked = select(*checks).subquery("checked")
    # The checks are selected, so that the database cannot leave them out.
    columns: list[Any] = list(checked.c)
    columns.extend(column.label(f"{_RUN_PREFIX}{column.key}") for column in run.c)
    source: Any = checked.outerjoin(run, true())
    for part, prefix in parts:
        columns.extend(column.label(f"{prefix}{column.key}") for column in part.c)
        source = source.outerjoin(part, true())
    statement: Select[Any] = select(*columns).select_from(source).add_cte(new_events)
    return sql.Prepared(statement)
