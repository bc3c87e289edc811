"""Create the runtime tables: runs, steps, approvals, events and handoffs.

Revision ID: scoria_0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

from flask_scoria._types import JSONPayload, UTCDateTime, UUIDType

revision = "scoria_0001"
down_revision = None
branch_labels = ("scoria",)
depends_on = None

LEASED = sa.text("lease_expires_at IS NOT NULL")
PENDING = sa.text("status = 'pending'")


def upgrade() -> None:
    op.create_table(
        "scoria_runs",
        sa.Column("id", UUIDType(), nullable=False),
        sa.Column("session_id", sa.String(255), nullable=True),
        sa.Column("actor_id", sa.String(255), nullable=True),
        sa.Column("tenant_id", sa.String(255), nullable=True),
        sa.Column("root_role_id", sa.String(255), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("last_event_sequence", sa.Integer(), nullable=False),
        sa.Column("last_step_sequence", sa.Integer(), nullable=False),
        sa.Column("current_step_id", UUIDType(), nullable=True),
        sa.Column("metadata", JSONPayload, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_scoria_runs"),
        sqlite_with_rowid=False,
    )
    op.create_index(
        "ix_scoria_runs_session_created",
        "scoria_runs",
        ["session_id", "tenant_id", "created_at", "id"],
    )
    op.create_index(
        "ix_scoria_runs_tenant_created", "scoria_runs", ["tenant_id", "created_at", "id"]
    )
    op.create_index(
        "ix_scoria_runs_status_tenant_created",
        "scoria_runs",
        ["status", "tenant_id", "created_at", "id"],
    )
    op.create_index(
        "ix_scoria_runs_tenant_actor_created",
        "scoria_runs",
        ["tenant_id", "actor_id", "created_at", "id"],
    )
    op.create_index(
        "ix_scoria_runs_tenant_role_created",
        "scoria_runs",
        ["tenant_id", "root_role_id", "created_at", "id"],
    )

    op.create_table(
        "scoria_steps",
        sa.Column("id", UUIDType(), nullable=False),
        sa.Column("run_id", UUIDType(), nullable=False),
        sa.Column("parent_step_id", UUIDType(), nullable=True),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("role_id", sa.String(255), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("handoff_input", JSONPayload, nullable=True),
        sa.Column("projected_context", JSONPayload, nullable=True),
        sa.Column("result_envelope", JSONPayload, nullable=True),
        sa.Column("error_envelope", JSONPayload, nullable=True),
        sa.Column("lease_token", sa.String(32), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["scoria_runs.id"],
            name="fk_scoria_steps_run_id_scoria_runs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_scoria_steps"),
    )
    op.create_index(
        "uq_scoria_steps_run_sequence", "scoria_steps", ["run_id", "sequence"], unique=True
    )
    op.create_index(
        "ix_scoria_steps_lease",
        "scoria_steps",
        ["lease_expires_at"],
        sqlite_where=LEASED,
        postgresql_where=LEASED,
    )

    op.create_table(
        "scoria_approvals",
        sa.Column("id", UUIDType(), nullable=False),
        sa.Column("run_id", UUIDType(), nullable=False),
        sa.Column("step_id", UUIDType(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("tool_name", sa.String(255), nullable=False),
        sa.Column("arguments", JSONPayload, nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("requested_at", UTCDateTime(), nullable=False),
        sa.Column("decided_by", sa.String(255), nullable=True),
        sa.Column("decided_at", UTCDateTime(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["scoria_runs.id"],
            name="fk_scoria_approvals_run_id_scoria_runs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_scoria_approvals"),
    )
    op.create_index("ix_scoria_approvals_run", "scoria_approvals", ["run_id"])
    op.create_index(
        "ix_scoria_approvals_pending_requested",
        "scoria_approvals",
        ["requested_at", "id"],
        sqlite_where=PENDING,
        postgresql_where=PENDING,
    )

    op.create_table(
        "scoria_events",
        sa.Column("run_id", UUIDType(), nullable=False),
        sa.Column("sequence", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("step_id", UUIDType(), nullable=True),
        sa.Column("payload", JSONPayload, nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["scoria_runs.id"],
            name="fk_scoria_events_run_id_scoria_runs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "sequence", name="pk_scoria_events"),
        sqlite_with_rowid=False,
    )

    op.create_table(
        "scoria_handoffs",
        sa.Column("id", UUIDType(), nullable=False),
        sa.Column("run_id", UUIDType(), nullable=False),
        sa.Column("parent_step_id", UUIDType(), nullable=False),
        sa.Column("child_step_id", UUIDType(), nullable=True),
        sa.Column("delegated_role_id", sa.String(255), nullable=False),
        sa.Column("delegated_kind", sa.String(64), nullable=False),
        sa.Column("capability_tags", JSONPayload, nullable=False),
        sa.Column("handoff_input", JSONPayload, nullable=False),
        sa.Column("projected_context", JSONPayload, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["scoria_runs.id"],
            name="fk_scoria_handoffs_run_id_scoria_runs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_scoria_handoffs"),
    )
    op.create_index("ix_scoria_handoffs_run", "scoria_handoffs", ["run_id"])


def downgrade() -> None:
    op.drop_table("scoria_handoffs")
    op.drop_table("scoria_events")
    op.drop_table("scoria_approvals")
    op.drop_table("scoria_steps")
    op.drop_table("scoria_runs")
