"""The statuses of runs, steps and approvals, and the types of a run's events.

Each is a :class:`~enum.StrEnum`, so a status compares equal to its plain
string (``run.status == "completed"``) and is stored as that string.
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    """Where a run is, in the order a run usually passes through them."""

    RUNNING = "running"
    WAITING_FOR_APPROVAL = "waiting_for_approval"
    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Whether the run has ended; only ``resume_run`` continues a ``failed`` one."""
        return self in _FINISHED


_FINISHED = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.REJECTED, RunStatus.CANCELLED}
)


class StepStatus(StrEnum):
    """Where a step is."""

    QUEUED = "queued"
    RUNNING = "running"
    WAITING_FOR_APPROVAL = "waiting_for_approval"
    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"


class ApprovalStatus(StrEnum):
    """Whether an approval is still waiting for a decision, and which."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class EventType(StrEnum):
    """What an entry of a run's timeline records.

    On PostgreSQL the column is an enumerated type (``scoria_event_type``), so
    a new member needs a revision that adds it there.
    """

    RUN_STARTED = "run_started"
    STEP_QUEUED = "step_queued"
    STEP_STARTED = "step_started"
    WAITING_FOR_APPROVAL = "waiting_for_approval"
    APPROVAL_DECIDED = "approval_decided"
    APPROVAL_EXPIRED = "approval_expired"
    RESUME_REQUESTED = "resume_requested"
    RETRY_REQUESTED = "retry_requested"
    RETRY_SCHEDULED = "retry_scheduled"
    STEP_COMPLETED = "step_completed"
    STEP_FAILED = "step_failed"
    STEP_TIMEOUT = "step_timeout"
    LEASE_EXPIRED = "lease_expired"
    HANDOFF_CREATED = "handoff_created"
    RUN_COMPLETED = "run_completed"
    RUN_FAILED = "run_failed"
    RUN_REJECTED = "run_rejected"
    RUN_CANCELLED = "run_cancelled"
