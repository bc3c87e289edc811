"""The ``scoria_*`` tables, on flask-scoria's own metadata.

Tables are created by the shipped Alembic revisions (``flask scoria db
upgrade``), never at import or in ``init_app``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ForeignKey, Index, Integer, MetaData, String, Table, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ._types import JSONPayload, UTCDateTime, UUIDType

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

_ID = 255
_NAME = 64
_STATUS = 32

#: Every status a run can have, in the order a run usually passes through them.
RUN_STATUSES = ("running", "waiting_for_approval", "completed", "failed", "rejected", "cancelled")
#: The statuses in which a run has ended; only ``resume_run`` continues a ``failed`` one.
FINISHED_RUN_STATUSES = frozenset({"completed", "failed", "rejected", "cancelled"})

# Partial indexes hold only the rows still open (a running step holds a lease),
# so that finished runs cost nothing in them.
_LEASED = text("lease_expires_at IS NOT NULL")
_PENDING = text("status = 'pending'")


class Base(DeclarativeBase):
    """Declarative base of the ``scoria_*`` tables."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Run(Base):
    """One durable execution. ``version`` guards every transition."""

    __tablename__ = "scoria_runs"

    id: Mapped[uuid.UUID] = mapped_column(UUIDType, primary_key=True)
    session_id: Mapped[str | None] = mapped_column(String(_ID))
    actor_id: Mapped[str | None] = mapped_column(String(_ID))
    tenant_id: Mapped[str | None] = mapped_column(String(_ID))
    root_role_id: Mapped[str] = mapped_column(String(_ID))
    status: Mapped[str] = mapped_column(String(_STATUS))
    version: Mapped[int] = mapped_column(Integer)
    last_event_sequence: Mapped[int] = mapped_column(Integer)
    last_step_sequence: Mapped[int] = mapped_column(Integer)
    current_step_id: Mapped[uuid.UUID | None] = mapped_column(UUIDType)
    run_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSONPayload)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    # Each list of runs is one walk of an index, newest first: the operator's
    # (tenant-wide, or filtered on one column) and a session's.
    __table_args__ = (
        Index("ix_scoria_runs_session_created", "session_id", "tenant_id", "created_at", "id"),
        Index("ix_scoria_runs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_scoria_runs_status_tenant_created", "status", "tenant_id", "created_at", "id"),
        Index("ix_scoria_runs_tenant_actor_created", "tenant_id", "actor_id", "created_at", "id"),
        Index(
            "ix_scoria_runs_tenant_role_created", "tenant_id", "root_role_id", "created_at", "id"
        ),
        {"sqlite_with_rowid": False},
    )


class Step(Base):
    """One unit of work of a run, executed by the handler for its ``kind``."""

    __tablename__ = "scoria_steps"

    id: Mapped[uuid.UUID] = mapped_column(UUIDType, primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(
        UUIDType, ForeignKey("scoria_runs.id", ondelete="CASCADE")
    )
    parent_step_id: Mapped[uuid.UUID | None] = mapped_column(UUIDType)
    sequence: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(_NAME))
    role_id: Mapped[str] = mapped_column(String(_ID))
    status: Mapped[str] = mapped_column(String(_STATUS))
    attempt: Mapped[int] = mapped_column(Integer)
    handoff_input: Mapped[dict[str, Any] | None] = mapped_column(JSONPayload)
    projected_context: Mapped[dict[str, Any] | None] = mapped_column(JSONPayload)
    result_envelope: Mapped[dict[str, Any] | None] = mapped_column(JSONPayload)
    error_envelope: Mapped[dict[str, Any] | None] = mapped_column(JSONPayload)
    lease_token: Mapped[str | None] = mapped_column(String(_STATUS))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("uq_scoria_steps_run_sequence", "run_id", "sequence", unique=True),
        Index(
            "ix_scoria_steps_lease",
            "lease_expires_at",
            sqlite_where=_LEASED,
            postgresql_where=_LEASED,
        ),
    )


class Approval(Base):
    """A pause of one step until an operator approves or rejects it."""

    __tablename__ = "scoria_approvals"

    id: Mapped[uuid.UUID] = mapped_column(UUIDType, primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(
        UUIDType, ForeignKey("scoria_runs.id", ondelete="CASCADE")
    )
    step_id: Mapped[uuid.UUID] = mapped_column(UUIDType)
    status: Mapped[str] = mapped_column(String(_STATUS))
    tool_name: Mapped[str] = mapped_column(String(_ID))
    arguments: Mapped[dict[str, Any] | None] = mapped_column(JSONPayload)
    reason: Mapped[str | None] = mapped_column(Text)
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime)
    decided_by: Mapped[str | None] = mapped_column(String(_ID))
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    note: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_scoria_approvals_run", "run_id"),
        Index(
            "ix_scoria_approvals_pending_requested",
            "requested_at",
            "id",
            sqlite_where=_PENDING,
            postgresql_where=_PENDING,
        ),
    )


class Event(Base):
    """One entry of a run's timeline, numbered by ``sequence`` per run."""

    __tablename__ = "scoria_events"

    run_id: Mapped[uuid.UUID] = mapped_column(
        UUIDType, ForeignKey("scoria_runs.id", ondelete="CASCADE"), primary_key=True
    )
    sequence: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    event_type: Mapped[str] = mapped_column(String(_NAME))
    step_id: Mapped[uuid.UUID | None] = mapped_column(UUIDType)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSONPayload)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    # The timeline is read by run and sequence only: on SQLite the table is that index.
    __table_args__ = ({"sqlite_with_rowid": False},)


class Handoff(Base):
    """A bounded delegation from a parent step to a queued child step."""

    __tablename__ = "scoria_handoffs"

    id: Mapped[uuid.UUID] = mapped_column(UUIDType, primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(
        UUIDType, ForeignKey("scoria_runs.id", ondelete="CASCADE")
    )
    parent_step_id: Mapped[uuid.UUID] = mapped_column(UUIDType)
    child_step_id: Mapped[uuid.UUID | None] = mapped_column(UUIDType)
    delegated_role_id: Mapped[str] = mapped_column(String(_ID))
    delegated_kind: Mapped[str] = mapped_column(String(_NAME))
    capability_tags: Mapped[list[str]] = mapped_column(JSONPayload)
    handoff_input: Mapped[dict[str, Any]] = mapped_column(JSONPayload)
    projected_context: Mapped[dict[str, Any]] = mapped_column(JSONPayload)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_scoria_handoffs_run", "run_id"),)


runs = cast(Table, Run.__table__)
steps = cast(Table, Step.__table__)
approvals = cast(Table, Approval.__table__)
events = cast(Table, Event.__table__)
handoffs = cast(Table, Handoff.__table__)


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Alembic ``include_name`` hook that hides the ``scoria_*`` tables.

    Pass it to a host's ``Migrate(..., include_name=include_name)`` (or
    ``context.configure``) so that autogenerate never proposes dropping them.
    """
    if type_ == "table" and name is not None:
        return not name.startswith("scoria_")
    return True
