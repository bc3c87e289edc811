"""Projecting stored rows into the read models, and reading a whole run."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection, RowMapping, Table, select

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
from ..statuses import ApprovalStatus, RunStatus, StepStatus
from .tables import approvals, events, handoffs, steps

_DECIDED = (ApprovalStatus.APPROVED, ApprovalStatus.REJECTED)


def split_prefixed(row: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The columns of a joined row whose labels start with ``prefix``, without it."""
    return {key[len(prefix) :]: value for key, value in row.items() if key.startswith(prefix)}


def _sid(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)


def summary_from_row(row: Mapping[Any, Any]) -> RunSummary:
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


def approval_from_row(row: Mapping[Any, Any]) -> Approval:
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


def _step_fields(row: Mapping[Any, Any], approval: Approval | None) -> dict[str, Any]:
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


def step_view_from_row(row: Mapping[Any, Any], approval: Approval | None) -> StepView:
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


def _handoff_from_row(row: RowMapping) -> HandoffRecord:
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


def load_detail(conn: Connection, run_row: Mapping[Any, Any]) -> RunDetail:
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
    event_list = [
        Event(
            id=f"{row['run_id']}/{row['sequence']}",
            sequence=row["sequence"],
            event_type=row["event_type"],
            step_id=_sid(row["step_id"]),
            payload=row["payload"],
            created_at=row["created_at"],
        )
        for row in rows_of_run(events, events.c.sequence)
    ]
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
    entries.sort(
        key=lambda entry: (
            entry.parent_step_sequence or entry.child_step_sequence or 0,
            entry.created_at,
        )
    )
    return entries
