"""Read models of runs: what the facade returns and handlers are given.

Everything here is a frozen dataclass with plain-JSON payloads and
timezone-aware UTC datetimes; ids are strings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .statuses import ApprovalStatus, EventType, RunStatus, StepStatus

#: A JSON object as stored: a run's metadata, a step's input and envelopes, arguments.
JSON = Mapping[str, Any]


@dataclass(frozen=True)
class RunSummary:
    """The current state of one run."""

    run_id: str
    session_id: str | None
    actor_id: str | None
    tenant_id: str | None
    root_role_id: str
    status: RunStatus
    awaiting_approval: bool
    current_step_id: str | None
    metadata: JSON
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Approval:
    """A request to approve a tool call of one step, and its decision."""

    id: str
    step_id: str
    status: ApprovalStatus
    tool_name: str
    arguments: JSON | None
    reason: str | None
    requested_at: datetime
    decided_by: str | None
    decided_at: datetime | None
    note: str | None
    editable: bool = False
    edited_arguments: JSON | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True)
class StepView:
    """What a handler sees of the step it executes.

    ``approval`` is the step's latest decided approval, so a handler that asked
    for approval can tell, once resumed, that it was granted. ``input`` is what
    the previous step passed on (``{}`` if nothing). ``idempotency_key`` is
    stable across the step's attempts and unique per step: pass it to the
    model, payment or mail API the handler calls, since a handler whose
    process dies may run again.
    """

    id: str
    run_id: str
    sequence: int
    kind: str
    role_id: str
    attempt: int
    parent_step_id: str | None
    handoff_input: JSON | None
    projected_context: JSON | None
    approval: Approval | None
    input: JSON
    not_before: datetime | None
    idempotency_key: str


@dataclass(frozen=True)
class Step(StepView):
    """A step as stored, with its status and outcome envelopes."""

    status: StepStatus
    result_envelope: JSON | None
    error_envelope: JSON | None
    started_at: datetime | None
    completed_at: datetime | None


@dataclass(frozen=True)
class Event:
    """One timeline entry of a run; ``id`` is ``"<run_id>/<sequence>"``."""

    id: str
    sequence: int
    event_type: EventType
    step_id: str | None
    payload: JSON | None
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
    handoff_input: JSON
    projected_context: JSON
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
    handoff_input: JSON
    projected_context: JSON
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
