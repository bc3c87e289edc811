"""Every queued step says when it falls due.

Steps queued before ``scoria_0002`` have no ``not_before``: they were due at
once. Every step queued since has one. This revision gives the old ones the
time of the upgrade, so that a worker's claim looks for due steps as a range
of the index of queued steps, which ends at the first step not yet due,
instead of also walking all those due later to find steps without a time.

Revision ID: scoria_0006
Revises: scoria_0005
Create Date: 2026-12-07
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from flask_scoria._types import UTCDateTime

revision = "scoria_0006"
down_revision = "scoria_0005"
branch_labels = None
depends_on = None

STEPS = sa.table(
    "scoria_steps", sa.column("status", sa.String), sa.column("not_before", UTCDateTime)
)


def upgrade() -> None:
    op.execute(
        STEPS.update()
        .where(STEPS.c.status == "queued", STEPS.c.not_before.is_(None))
        .values(not_before=datetime.now(UTC))
    )


def downgrade() -> None:
    """Nothing to undo: the revisions before this one read a step's time as it is."""
