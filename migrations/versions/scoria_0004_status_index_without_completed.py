"""Runs by status on PostgreSQL: the index leaves out completed runs.

Every run passes through ``running`` (and many through ``waiting_for_approval``)
on its way to ``completed``; each of those changes moved the run's entry in
the index, leaving pages of dead entries behind. Runs that have not completed
are few; completed ones are most runs, found as quickly through the tenant's
index. SQLite's index is left as it is: its planner cannot prove a status
filter falls within a partial index like this one.

Revision ID: scoria_0004
Revises: scoria_0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "scoria_0004"
down_revision = "scoria_0003"
branch_labels = None
depends_on = None

NAME = "ix_scoria_runs_status_tenant_created"
COLUMNS = ["status", "tenant_id", "created_at", "id"]


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    built = bind.execute(sa.text("SELECT pg_get_indexdef(to_regclass(:name))"), {"name": NAME})
    if " WHERE " in (built.scalar() or ""):
        return  # built by hand beforehand, concurrently (docs/migrations.md)
    op.drop_index(NAME, "scoria_runs")
    op.create_index(NAME, "scoria_runs", COLUMNS, postgresql_where=sa.text("status <> 'completed'"))


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index(NAME, "scoria_runs")
    op.create_index(NAME, "scoria_runs", COLUMNS)
