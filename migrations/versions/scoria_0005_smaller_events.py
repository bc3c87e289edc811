"""Smaller events on PostgreSQL: an enumerated type, and payloads kept as text.

A run writes several events per transition, most of a run's bytes. Each kept
its type's name, 12 to 21 bytes; the enumerated type ``scoria_event_type``
takes 4. Payloads are written once and read whole, never searched, and
``json`` keeps their small objects in less room than ``jsonb``. Both columns
change in one rewrite of the events table, under an exclusive lock. SQLite
keeps both columns as they were.

Revision ID: scoria_0005
Revises: scoria_0004
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "scoria_0005"
down_revision = "scoria_0004"
branch_labels = None
depends_on = None

EVENT_TYPE = sa.Enum(
    *("run_started", "step_queued", "step_started", "waiting_for_approval"),
    *("approval_decided", "approval_expired", "resume_requested", "retry_requested"),
    *("retry_scheduled", "step_completed", "step_failed", "step_timeout", "lease_expired"),
    *("handoff_created", "run_completed", "run_failed", "run_rejected", "run_cancelled"),
    name="scoria_event_type",
)


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    EVENT_TYPE.create(bind)
    op.execute(
        "ALTER TABLE scoria_events"
        " ALTER COLUMN event_type TYPE scoria_event_type USING event_type::scoria_event_type,"
        " ALTER COLUMN payload TYPE json USING payload::json"
    )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute(
        "ALTER TABLE scoria_events"
        " ALTER COLUMN event_type TYPE varchar(64) USING event_type::text,"
        " ALTER COLUMN payload TYPE jsonb USING payload::jsonb"
    )
    EVENT_TYPE.drop(bind)
