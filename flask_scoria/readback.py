"""Read models of runs and the queries that project them.

Everything here is a frozen dataclass with plain-JSON payloads and
timezone-aware UTC datetimes; ids are strings.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, RowMapping, Table, select

from .models import approvals, events, handoffs, steps

DECIDED = ("approved", "rejected")


@dataclass(frozen=True)
class RunSummary:
    """The current state of one run."""

    run_id: str
    session_id: str | None
    actor_id: str | None
    tenant_id: str | None
    root_role_id: str
    status: str
    awaiting_approval: bool
    current_step_id: str | None
    metadata: Mapping[str, Any]
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True)
class Approval:
    """A request to approve a tool call of one step, and its decision."""

    id: str
    step_id: str
    status: str
    tool_name: str
    arguments: Mapping[str, Any] | None
    reason: str | None
    requested_at: datetime
    decided_by: str | None
    decided_at: datetime | None
    note: str | None


@dataclass(frozen=True)
class StepView:
    """What a handler sees of the step it executes.

    ``approval`` is the step's latest decided approval, so a handler that asked
    for approval can tell, once resumed, that it was granted.
    """

    id: str
    run_id: str
    sequence: int
    kind: str
    role_id: str
    attempt: int
    parent_step_id: str | None
    handoff_input: Mapping[str, Any] | None
    projected_context: Mapping[str, Any] | None
    approval: Approval | None


@dataclass(frozen=True)
class Step(StepView):
    """A step as stored, with its status and outcome envelopes."""

    status: str
    result_envelope: Mapping[str, Any] | None
    error_envelope: Mapping[str, Any] | None
    started_at: datetime | None
    completed_at: datetime | None


@dataclass(frozen=True)
class Event:
    """One timeline entry of a run; ``id`` is ``"<run_id>/<sequence>"``."""

    id: str
    sequence: int
    event_type: str
    step_id: str | None
    payload: Mapping[str, Any] | None
    created_at: datetime


@dataclass(frozen=True)
class HandoffRecord:
    """A handoff as stored: who delegated what to whom."""

    id: str
    parent_step_id: str
    child_step_id: str | None
    delegated_role_id: str
    delegated_kind: str
    capability_tags: Sequence[str]
    handoff_input: Mapping[str, Any]
    projected_context: Mapping[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class DelegatedHandoff:
    """The curated evidence of one handoff: parent, child and what crossed."""

    handoff_id: str
    parent_step_id: str
    parent_step_sequence: int | None
    parent_step_kind: str | None
    parent_role_id: str | None
    delegated_role_id: str
    delegated_kind: str
    child_step_id: str | None
    child_step_sequence: int | None
    child_step_kind: str | None
    child_role_id: str | None
    child_status: str
    handoff_input: Mapping[str, Any]
    projected_context: Mapping[str, Any]
    capability_tags: Sequence[str]
    created_at: datetime


@dataclass(frozen=True)
class RunDetail:
    """A run with its steps, timeline, approvals and handoffs."""

    summary: RunSummary
    steps: Sequence[Step]
    events: Sequence[Event]
    approvals: Sequence[Approval]
    handoffs: Sequence[HandoffRecord]
    delegated_handoffs: Sequence[DelegatedHandoff]


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
        status=row["status"],
        awaiting_approval=row["status"] == "waiting_for_approval",
        current_step_id=_sid(row["current_step_id"]),
        metadata=row["metadata"] or {},
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        updated_at=row["updated_at"],
    )


def approval_from_row(row: Mapping[Any, Any]) -> Approval:
    """Project a ``scoria_approvals`` row into an :class:`Approval`."""
    return Approval(
        id=str(row["id"]),
        step_id=str(row["step_id"]),
        status=row["status"],
        tool_name=row["tool_name"],
        arguments=row["arguments"],
        reason=row["reason"],
        requested_at=row["requested_at"],
        decided_by=row["decided_by"],
        decided_at=row["decided_at"],
        note=row["note"],
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
    }


def step_view_from_row(row: Mapping[Any, Any], approval: Approval | None) -> StepView:
    """Project a ``scoria_steps`` row into what a handler is given."""
    return StepView(**_step_fields(row, approval))


def _step_from_row(row: RowMapping, approval: Approval | None) -> Step:
    return Step(
        **_step_fields(row, approval),
        status=row["status"],
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
        if approval.status in DECIDED:
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
