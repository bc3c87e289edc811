"""Projecting stored rows into the read models, and reading a whole run."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, Connection, RowMapping, Select, Table, select

from ..readback import (
    Approval,
    DelegatedHandoff,
    Event,
    HandoffRecord,
    RunDetail,
    RunSummary,
    Step,
    StepView,
)
from ..statuses import ApprovalStatus, EventType, RunStatus, StepStatus
from .tables import APPROVALS_NEWEST_FIRST, Row, RowLike, approvals, events, handoffs, steps

_DECIDED = (ApprovalStatus.APPROVED, ApprovalStatus.REJECTED)


def split_prefixed(row: RowLike, prefix: str) -> Row:
    """The columns of a joined row whose labels start with ``prefix``, without it."""
    return {short: row[key] for key, short in _prefixed(tuple(row), prefix)}


@lru_cache(maxsize=64)
def _prefixed(labels: tuple[str, ...], prefix: str) -> tuple[tuple[str, str], ...]:
    """Each label of ``labels`` that starts with ``prefix``, with it and without it.

    Cached: a statement's rows all have the same labels.
    """
    return tuple((label, label[len(prefix) :]) for label in labels if label.startswith(prefix))


def _sid(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)


def summary_from_row(row: RowLike) -> RunSummary:
    """Project a ``scoria_runs`` row (or its dict) into a :class:`RunSummary`."""
    return RunSummary(
        run_id=str(row["id"]),
        session_id=row["session_id"],
        actor_id=row["actor_id"],
        tenant_id=row["tenant_id"],
        root_role_id=row["root_role_id"],
        status=RunStatus(row["status"]),
        awaiting_approval=row["status"] == RunStatus.WAITING_FOR_APPROVAL,
        current_step_id=_sid(row["current_step_id"]),
        metadata=row["metadata"] or {},
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        updated_at=row["updated_at"],
        idempotency_key=row["idempotency_key"],
    )


def approval_from_row(row: RowLike) -> Approval:
    """Project a ``scoria_approvals`` row into an :class:`Approval`."""
    return Approval(
        id=str(row["id"]),
        step_id=str(row["step_id"]),
        status=ApprovalStatus(row["status"]),
        tool_name=row["tool_name"],
        arguments=row["arguments"],
        reason=row["reason"],
        requested_at=row["requested_at"],
        decided_by=row["decided_by"],
        decided_at=row["decided_at"],
        note=row["note"],
        editable=bool(row["editable"]),
        edited_arguments=row["edited_arguments"],
        expires_at=row["expires_at"],
    )


def _step_fields(row: RowLike, approval: Approval | None) -> Row:
    return {
        "id": str(row["id"]),
        "run_id": str(row["run_id"]),
        "sequence": row["sequence"],
        "kind": row["kind"],
        "role_id": row["role_id"],
        "attempt": row["attempt"],
        "parent_step_id": _sid(row["parent_step_id"]),
        "handoff_input": row["handoff_input"],
        "projected_context": row["projected_context"],
        "approval": approval,
        "input": row["input"] or {},
        "not_before": row["not_before"],
        "idempotency_key": str(row["id"]),
    }


def step_view_from_row(row: RowLike, approval: Approval | None) -> StepView:
    """Project a ``scoria_steps`` row into what a handler is given."""
    return StepView(**_step_fields(row, approval))


def _step_from_row(row: RowMapping, approval: Approval | None) -> Step:
    return Step(
        **_step_fields(row, approval),
        status=StepStatus(row["status"]),
        result_envelope=row["result_envelope"],
        error_envelope=row["error_envelope"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
    )


def _handoff_from_row(row: RowLike) -> HandoffRecord:
    return HandoffRecord(
        id=str(row["id"]),
        parent_step_id=str(row["parent_step_id"]),
        child_step_id=_sid(row["child_step_id"]),
        delegated_role_id=row["delegated_role_id"],
        delegated_kind=row["delegated_kind"],
        capability_tags=row["capability_tags"] or [],
        handoff_input=row["handoff_input"] or {},
        projected_context=row["projected_context"] or {},
        created_at=row["created_at"],
    )


def load_detail(conn: Connection, run_row: RowLike) -> RunDetail:
    """Read everything recorded for one run, four queries whatever its size."""
    run_id = run_row["id"]

    def rows_of_run(table: Table, *order: ColumnElement[Any]) -> Iterable[RowMapping]:
        query = select(table).where(table.c.run_id == run_id).order_by(*order)
        return conn.execute(query).mappings()

    approval_list = [
        approval_from_row(row)
        for row in rows_of_run(approvals, approvals.c.requested_at, approvals.c.id)
    ]
    latest_decided: dict[str, Approval] = {}
    for approval in approval_list:
        if approval.status in _DECIDED:
            latest_decided[approval.step_id] = approval
    step_list = [
        _step_from_row(row, latest_decided.get(str(row["id"])))
        for row in rows_of_run(steps, steps.c.sequence)
    ]
    event_list = [_event_from_row(row) for row in rows_of_run(events, events.c.sequence)]
    handoff_list = [
        _handoff_from_row(row)
        for row in rows_of_run(handoffs, handoffs.c.created_at, handoffs.c.id)
    ]
    return RunDetail(
        summary=summary_from_row(run_row),
        steps=step_list,
        events=event_list,
        approvals=approval_list,
        handoffs=handoff_list,
        delegated_handoffs=delegated_handoffs(handoff_list, step_list),
    )


def delegated_handoffs(
    handoff_list: Sequence[HandoffRecord], step_list: Sequence[Step]
) -> list[DelegatedHandoff]:
    """Join each handoff with its parent and child step, ordered by parent sequence."""
    by_id = {step.id: step for step in step_list}
    entries = []
    for handoff in handoff_list:
        parent = by_id.get(handoff.parent_step_id)
        child = by_id.get(handoff.child_step_id) if handoff.child_step_id else None
        entries.append(
            DelegatedHandoff(
                handoff_id=handoff.id,
                parent_step_id=handoff.parent_step_id,
                parent_step_sequence=parent.sequence if parent else None,
                parent_step_kind=parent.kind if parent else None,
                parent_role_id=parent.role_id if parent else None,
                delegated_role_id=handoff.delegated_role_id,
                delegated_kind=handoff.delegated_kind,
                child_step_id=child.id if child else None,
                child_step_sequence=child.sequence if child else None,
                child_step_kind=child.kind if child else None,
                child_role_id=child.role_id if child else None,
                child_status=child.status if child else "child_step_pending",
                handoff_input=handoff.handoff_input,
                projected_context=handoff.projected_context,
                capability_tags=handoff.capability_tags,
                created_at=handoff.created_at,
            )
        )
    entries.sort(key=evidence_order)
    return entries


def _event_from_row(row: RowMapping) -> Event:
    return Event(
        id=f"{row['run_id']}/{row['sequence']}",
        sequence=row["sequence"],
        event_type=EventType(row["event_type"]),
        step_id=_sid(row["step_id"]),
        payload=row["payload"],
        created_at=row["created_at"],
    )


def latest_rows(
    conn: Connection, table: Table, run_id: uuid.UUID, limit: int, before: int | None
) -> list[RowMapping]:
    """Up to ``limit`` rows of one run by ``sequence``, newest first, before ``before``."""
    query = select(table).where(table.c.run_id == run_id)
    if before is not None:
        query = query.where(table.c.sequence < before)
    query = query.order_by(table.c.sequence.desc()).limit(limit)
    return list(conn.execute(query).mappings())


def latest_approvals(conn: Connection, run_id: uuid.UUID, limit: int) -> list[Approval]:
    """The run's ``limit`` latest approvals (its pending one among them), in the order
    they were requested."""
    query = (
        select(approvals)
        .where(approvals.c.run_id == run_id)
        .order_by(*APPROVALS_NEWEST_FIRST)
        .limit(limit)
    )
    latest = [approval_from_row(row) for row in conn.execute(query).mappings()]
    return sorted(latest, key=lambda approval: (approval.requested_at, approval.id))


def window_steps(rows: Sequence[RowMapping], approval_list: Sequence[Approval]) -> list[Step]:
    """Steps of newest-first ``rows``, oldest first, each with its latest decided approval."""
    latest_decided = {
        approval.step_id: approval for approval in approval_list if approval.status in _DECIDED
    }
    return [_step_from_row(row, latest_decided.get(str(row["id"]))) for row in reversed(rows)]


def window_events(rows: Sequence[RowMapping]) -> list[Event]:
    """Events of newest-first ``rows``, oldest first."""
    return [_event_from_row(row) for row in reversed(rows)]


_PARENT = steps.alias("parent_step")
_CHILD = steps.alias("child_step")


def delegated_handoffs_query(run_id: uuid.UUID, page: Select[Any]) -> Select[Any]:
    """The run's handoffs of ``page`` (a query of their ids) with their parent and child steps.

    The page is chosen on the handoffs alone, so that only its rows are joined.
    """
    chosen = page.subquery()
    return (
        select(
            handoffs,
            _PARENT.c.sequence.label("p_sequence"),
            _PARENT.c.kind.label("p_kind"),
            _PARENT.c.role_id.label("p_role_id"),
            _CHILD.c.id.label("c_id"),
            _CHILD.c.sequence.label("c_sequence"),
            _CHILD.c.kind.label("c_kind"),
            _CHILD.c.role_id.label("c_role_id"),
            _CHILD.c.status.label("c_status"),
        )
        .select_from(
            handoffs.outerjoin(_PARENT, _PARENT.c.id == handoffs.c.parent_step_id).outerjoin(
                _CHILD, _CHILD.c.id == handoffs.c.child_step_id
            )
        )
        .join(chosen, chosen.c.id == handoffs.c.id)
        .where(handoffs.c.run_id == run_id)
    )


def delegated_handoff_from_row(row: RowLike) -> DelegatedHandoff:
    """Project a row of :func:`delegated_handoffs_query`."""
    record = _handoff_from_row(row)
    child = row["c_id"] is not None
    return DelegatedHandoff(
        handoff_id=record.id,
        parent_step_id=record.parent_step_id,
        parent_step_sequence=row["p_sequence"],
        parent_step_kind=row["p_kind"],
        parent_role_id=row["p_role_id"],
        delegated_role_id=record.delegated_role_id,
        delegated_kind=record.delegated_kind,
        child_step_id=_sid(row["c_id"]),
        child_step_sequence=row["c_sequence"],
        child_step_kind=row["c_kind"],
        child_role_id=row["c_role_id"],
        child_status=StepStatus(row["c_status"]) if child else "child_step_pending",
        handoff_input=record.handoff_input,
        projected_context=record.projected_context,
        capability_tags=record.capability_tags,
        created_at=record.created_at,
    )


def evidence_order(entry: DelegatedHandoff) -> tuple[int, datetime]:
    """How Delegated Evidence is ordered: by the parent step's sequence, then creation."""
    return (entry.parent_step_sequence or entry.child_step_sequence or 0, entry.created_at)
