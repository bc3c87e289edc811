"""Steps off the request and richer decisions: step input, due times, trace
context, editable and expiring approvals, idempotent starts.

Revision ID: scoria_0002
Revises: scoria_0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

from flask_scoria._types import JSONPayload, UTCDateTime

revision = "scoria_0002"
down_revision = "scoria_0001"
branch_labels = None
depends_on = None

QUEUED = sa.text("status = 'queued'")
EXPIRING = sa.text("status = 'pending' AND expires_at IS NOT NULL")
KEYED = sa.text("idempotency_key IS NOT NULL")
KEYED_WITHOUT_TENANT = sa.text("idempotency_key IS NOT NULL AND tenant_id IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("scoria_steps") as batch:
        batch.add_column(sa.Column("input", JSONPayload, nullable=True))
        batch.add_column(sa.Column("not_before", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("trace_context", JSONPayload, nullable=True))
    op.create_index(
        "ix_scoria_steps_queued",
        "scoria_steps",
        ["not_before"],
        sqlite_where=QUEUED,
        postgresql_where=QUEUED,
    )
    with op.batch_alter_table("scoria_approvals") as batch:
        batch.add_column(
            sa.Column("editable", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("edited_arguments", JSONPayload, nullable=True))
        batch.add_column(sa.Column("expires_at", UTCDateTime(), nullable=True))
    op.create_index(
        "ix_scoria_approvals_expiring",
        "scoria_approvals",
        ["expires_at"],
        sqlite_where=EXPIRING,
        postgresql_where=EXPIRING,
    )
    with op.batch_alter_table("scoria_runs") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(255), nullable=True))
    op.create_index(
        "uq_scoria_runs_tenant_idempotency",
        "scoria_runs",
        ["tenant_id", "idempotency_key"],
        unique=True,
        sqlite_where=KEYED,
        postgresql_where=KEYED,
    )
    # NULL tenants never collide in a unique index: runs without a tenant get their own.
    op.create_index(
        "uq_scoria_runs_untenanted_idempotency",
        "scoria_runs",
        ["idempotency_key"],
        unique=True,
        sqlite_where=KEYED_WITHOUT_TENANT,
        postgresql_where=KEYED_WITHOUT_TENANT,
    )


def downgrade() -> None:
    op.drop_index("uq_scoria_runs_untenanted_idempotency", "scoria_runs")
    op.drop_index("uq_scoria_runs_tenant_idempotency", "scoria_runs")
    with op.batch_alter_table("scoria_runs") as batch:
        batch.drop_column("idempotency_key")
    op.drop_index("ix_scoria_approvals_expiring", "scoria_approvals")
    with op.batch_alter_table("scoria_approvals") as batch:
        batch.drop_column("expires_at")
        batch.drop_column("edited_arguments")
        batch.drop_column("editable")
    op.drop_index("ix_scoria_steps_queued", "scoria_steps")
    with op.batch_alter_table("scoria_steps") as batch:
        batch.drop_column("trace_context")
        batch.drop_column("not_before")
        batch.drop_column("input")
