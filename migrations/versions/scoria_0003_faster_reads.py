"""Faster reads: on SQLite, runs in a rowid table with their metadata last;
approvals that carry their run's tenant; a run's handoffs indexed in page order.

Revision ID: scoria_0003
Revises: scoria_0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "scoria_0003"
down_revision = "scoria_0002"
branch_labels = None
depends_on = None

PENDING = sa.text("status = 'pending'")
RUNS_BEFORE = (
    *("id", "session_id", "actor_id", "tenant_id", "root_role_id", "status", "version"),
    *("last_event_sequence", "last_step_sequence", "current_step_id", "metadata"),
    *("created_at", "started_at", "completed_at", "updated_at", "idempotency_key"),
)
RUNS_AFTER = (*(name for name in RUNS_BEFORE if name != "metadata"), "metadata")

runs = sa.table("scoria_runs", sa.column("id"), sa.column("tenant_id"))
approvals = sa.table("scoria_approvals", sa.column("run_id"), sa.column("tenant_id"))


def upgrade() -> None:
    _rebuild_runs(RUNS_AFTER, with_rowid=True)
    with op.batch_alter_table("scoria_approvals") as batch:
        batch.add_column(sa.Column("tenant_id", sa.String(255), nullable=True))
    run_tenant = sa.select(runs.c.tenant_id).where(runs.c.id == approvals.c.run_id)
    op.execute(approvals.update().values(tenant_id=run_tenant.scalar_subquery()))
    op.drop_index("ix_scoria_approvals_pending_requested", "scoria_approvals")
    op.create_index(
        "ix_scoria_approvals_tenant_pending_requested",
        "scoria_approvals",
        ["tenant_id", "requested_at", "id"],
        sqlite_where=PENDING,
        postgresql_where=PENDING,
    )
    op.create_index(
        "ix_scoria_handoffs_run_created", "scoria_handoffs", ["run_id", "created_at", "id"]
    )
    op.drop_index("ix_scoria_handoffs_run", "scoria_handoffs")


def downgrade() -> None:
    _rebuild_runs(RUNS_BEFORE, with_rowid=False)
    op.create_index("ix_scoria_handoffs_run", "scoria_handoffs", ["run_id"])
    op.drop_index("ix_scoria_handoffs_run_created", "scoria_handoffs")
    op.create_index(
        "ix_scoria_approvals_pending_requested",
        "scoria_approvals",
        ["requested_at", "id"],
        sqlite_where=PENDING,
        postgresql_where=PENDING,
    )
    op.drop_index("ix_scoria_approvals_tenant_pending_requested", "scoria_approvals")
    with op.batch_alter_table("scoria_approvals") as batch:
        batch.drop_column("tenant_id")


def _rebuild_runs(columns: tuple[str, ...], *, with_rowid: bool) -> None:
    """Rebuild ``scoria_runs`` on SQLite with its columns in this order.

    SQLite reads a row's columns in order, walking a large value's overflow
    pages to reach the columns after it; in a ``WITHOUT ROWID`` table a search
    of the primary key also reads in full each large row it compares with.
    PostgreSQL keeps large values out of line, so its table is left as it is.
    """
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        return
    if bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
        # Dropping the old table would delete the rows of every table that references it.
        raise RuntimeError(
            "scoria_0003 rebuilds scoria_runs, which needs PRAGMA foreign_keys=OFF on SQLite;"
            " turn it off for the migration (flask scoria db upgrade does)."
        )
    with op.batch_alter_table(
        "scoria_runs",
        recreate="always",
        partial_reordering=[columns],
        table_kwargs={"sqlite_with_rowid": with_rowid},
    ):
        pass
