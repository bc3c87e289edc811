"""The ``scoria_*`` tables, on flask-scoria's own metadata.

Tables are created by the shipped Alembic revisions (``flask scoria db
upgrade``), never at import or in ``init_app``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    case,
    false,
    text,
)

from .._types import JSONPayload, JSONRecord, UTCDateTime, UUIDType
from ..statuses import ApprovalStatus, EventType
from .arguments import MAX_KIND

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: A row of one of these tables as a dict keyed by column key: what statements take and
#: return, and what the runtime changes before it writes.
Row = dict[str, Any]
#: A row as read, or the parameters of a statement.
RowLike = Mapping[Any, Any]

#: The metadata of every ``scoria_*`` table, for Alembic.
metadata = MetaData(naming_convention=NAMING_CONVENTION)

_ID = 255
_NAME = 64
_STATUS = 32

# Partial indexes hold only the rows still open (a running step holds a lease),
# so that finished runs cost nothing in them.
_LEASED = text("lease_expires_at IS NOT NULL")
_PENDING = text("status = 'pending'")
_QUEUED = text("status = 'queued'")
_EXPIRING = text("status = 'pending' AND expires_at IS NOT NULL")
_KEYED = text("idempotency_key IS NOT NULL")
#: Runs that have not completed: the few a status filter looks for.
_NOT_COMPLETED = text("status <> 'completed'")
_KEYED_WITHOUT_TENANT = text("idempotency_key IS NOT NULL AND tenant_id IS NULL")

# An event's type: on PostgreSQL an enumerated type, 4 bytes in each of a run's many
# events where its name takes 12 to 21; elsewhere its name.
_EVENT_TYPE = Enum(
    *(member.value for member in EventType),
    name="scoria_event_type",
    length=_NAME,
    create_constraint=False,
)


def _run_id_column(*, primary_key: bool = False) -> Column[object]:
    """The column naming the run a row belongs to; the row goes when the run does."""
    return Column(
        "run_id",
        UUIDType,
        ForeignKey("scoria_runs.id", ondelete="CASCADE"),
        nullable=False,
        primary_key=primary_key,
    )


#: One durable execution. ``version`` guards every transition.
#: On SQLite a rowid table: in a ``WITHOUT ROWID`` table a search of the primary key
#: reads in full each row it compares with, a large metadata included.
runs = Table(
    "scoria_runs",
    metadata,
    Column("id", UUIDType, primary_key=True),
    Column("session_id", String(_ID)),
    Column("actor_id", String(_ID)),
    Column("tenant_id", String(_ID)),
    Column("root_role_id", String(_ID), nullable=False),
    Column("status", String(_STATUS), nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_event_sequence", Integer, nullable=False),
    Column("last_step_sequence", Integer, nullable=False),
    Column("current_step_id", UUIDType),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime),
    Column("completed_at", UTCDateTime),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("idempotency_key", String(_ID)),
    # Last: SQLite reads a row's columns in order, so a column after a large metadata
    # would cost every read that leaves it out a walk of its overflow pages.
    Column("metadata", JSONPayload, nullable=False),
    # Each list of runs is one walk of an index, newest first: the operator's
    # (tenant-wide, or filtered on one column) and a session's.
    Index("ix_scoria_runs_session_created", "session_id", "tenant_id", "created_at", "id"),
    Index("ix_scoria_runs_tenant_created", "tenant_id", "created_at", "id"),
    # On PostgreSQL without completed runs, whose many entries would otherwise move
    # on every status change; SQLite cannot use a partial index for a status filter.
    Index(
        "ix_scoria_runs_status_tenant_created",
        "status",
        "tenant_id",
        "created_at",
        "id",
        postgresql_where=_NOT_COMPLETED,
    ),
    Index("ix_scoria_runs_tenant_actor_created", "tenant_id", "actor_id", "created_at", "id"),
    Index("ix_scoria_runs_tenant_role_created", "tenant_id", "root_role_id", "created_at", "id"),
    # A start's idempotency key is unique per tenant, and among runs without one.
    Index(
        "uq_scoria_runs_tenant_idempotency",
        "tenant_id",
        "idempotency_key",
        unique=True,
        sqlite_where=_KEYED,
        postgresql_where=_KEYED,
    ),
    Index(
        "uq_scoria_runs_untenanted_idempotency",
        "idempotency_key",
        unique=True,
        sqlite_where=_KEYED_WITHOUT_TENANT,
        postgresql_where=_KEYED_WITHOUT_TENANT,
    ),
)

#: One unit of work of a run, executed by the handler for its ``kind``.
steps = Table(
    "scoria_steps",
    metadata,
    Column("id", UUIDType, primary_key=True),
    _run_id_column(),
    Column("parent_step_id", UUIDType),
    Column("sequence", Integer, nullable=False),
    Column("kind", String(MAX_KIND), nullable=False),
    Column("role_id", String(_ID), nullable=False),
    Column("status", String(_STATUS), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("handoff_input", JSONPayload),
    Column("projected_context", JSONPayload),
    Column("result_envelope", JSONPayload),
    Column("error_envelope", JSONPayload),
    Column("lease_token", String(_STATUS)),
    Column("lease_expires_at", UTCDateTime),
    Column("started_at", UTCDateTime),
    Column("completed_at", UTCDateTime),
    Column("input", JSONPayload),
    Column("not_before", UTCDateTime),
    Column("trace_context", JSONPayload),
    Index("uq_scoria_steps_run_sequence", "run_id", "sequence", unique=True),
    Index(
        "ix_scoria_steps_lease", "lease_expires_at", sqlite_where=_LEASED, postgresql_where=_LEASED
    ),
    # Queued steps, by when they fall due: what a worker looks for.
    Index("ix_scoria_steps_queued", "not_before", sqlite_where=_QUEUED, postgresql_where=_QUEUED),
)

#: A pause of one step until an operator approves or rejects it.
approvals = Table(
    "scoria_approvals",
    metadata,
    Column("id", UUIDType, primary_key=True),
    _run_id_column(),
    Column("step_id", UUIDType, nullable=False),
    Column("status", String(_STATUS), nullable=False),
    Column("tool_name", String(_ID), nullable=False),
    Column("arguments", JSONPayload),
    Column("reason", Text),
    Column("requested_at", UTCDateTime, nullable=False),
    Column("decided_by", String(_ID)),
    Column("decided_at", UTCDateTime),
    Column("note", Text),
    Column("editable", Boolean, nullable=False, server_default=false()),
    Column("edited_arguments", JSONPayload),
    Column("expires_at", UTCDateTime),
    # The run's tenant, copied when the approval is written, so that a tenant's inbox
    # walks only its own pending approvals.
    Column("tenant_id", String(_ID)),
    Index("ix_scoria_approvals_run", "run_id"),
    Index(
        "ix_scoria_approvals_tenant_pending_requested",
        "tenant_id",
        "requested_at",
        "id",
        sqlite_where=_PENDING,
        postgresql_where=_PENDING,
    ),
    Index(
        "ix_scoria_approvals_expiring",
        "expires_at",
        sqlite_where=_EXPIRING,
        postgresql_where=_EXPIRING,
    ),
)

#: A run's approvals, newest first: its pending one (a run waits for one at a time), then
#: the decided ones, then those that expired or were cancelled, which decide nothing;
#: whatever the clock of the process that requested each one said.
APPROVALS_NEWEST_FIRST = (
    case(
        (approvals.c.status == ApprovalStatus.PENDING, 0),
        (approvals.c.status == ApprovalStatus.APPROVED, 1),
        (approvals.c.status == ApprovalStatus.REJECTED, 1),
        else_=2,
    ),
    approvals.c.requested_at.desc(),
    approvals.c.id.desc(),
)

#: One entry of a run's timeline, numbered by ``sequence`` per run.
#: The timeline is read by run and sequence only: on SQLite the table is that index.
events = Table(
    "scoria_events",
    metadata,
    _run_id_column(primary_key=True),
    Column("sequence", Integer, primary_key=True, autoincrement=False),
    Column("event_type", _EVENT_TYPE, nullable=False),
    Column("step_id", UUIDType),
    Column("payload", JSONRecord),
    Column("created_at", UTCDateTime, nullable=False),
    sqlite_with_rowid=False,
)

#: A bounded delegation from a parent step to a queued child step.
handoffs = Table(
    "scoria_handoffs",
    metadata,
    Column("id", UUIDType, primary_key=True),
    _run_id_column(),
    Column("parent_step_id", UUIDType, nullable=False),
    Column("child_step_id", UUIDType),
    Column("delegated_role_id", String(_ID), nullable=False),
    Column("delegated_kind", String(_NAME), nullable=False),
    Column("capability_tags", JSONPayload, nullable=False),
    Column("handoff_input", JSONPayload, nullable=False),
    Column("projected_context", JSONPayload, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # A run's handoffs in the order its page shows them, newest first.
    Index("ix_scoria_handoffs_run_created", "run_id", "created_at", "id"),
)
