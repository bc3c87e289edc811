"""The statements the runtime executes, built once.

Building a SQLAlchemy statement costs several times more than executing a
prepared one, and every transition runs a handful of them; so the hot ones are
constructed here with bind parameters and reused.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from functools import cache
from typing import Any

from sqlalchemy import Connection, Update, bindparam, func, insert, select, update

from .models import approvals, events, handoffs, runs, steps

INSERT_RUN = insert(runs)
INSERT_STEP = insert(steps)
INSERT_EVENTS = insert(events)
INSERT_APPROVAL = insert(approvals)
INSERT_HANDOFF = insert(handoffs)

RUN_BY_ID = select(runs).where(runs.c.id == bindparam("b_run_id"))
RUN_BY_ID_FOR_UPDATE = RUN_BY_ID.with_for_update()
UPDATE_RUN_IF_VERSION = update(runs).where(
    runs.c.id == bindparam("b_run_id"), runs.c.version == bindparam("b_version")
)

STEP_BY_ID = select(steps).where(steps.c.id == bindparam("b_step_id"))
QUEUED_STEPS = (
    select(steps)
    .where(steps.c.run_id == bindparam("b_run_id"), steps.c.status == "queued")
    .order_by(steps.c.sequence)
)
OPEN_STEP_COUNT = (
    select(func.count())
    .select_from(steps)
    .where(
        steps.c.run_id == bindparam("b_run_id"),
        steps.c.status.not_in(("completed", "cancelled")),
    )
)
EXPIRED_STEP_OF_RUN = (
    select(steps.c.id, steps.c.lease_token)
    .where(
        steps.c.run_id == bindparam("b_run_id"),
        steps.c.status == "running",
        steps.c.lease_expires_at < bindparam("b_now"),
    )
    .limit(1)
)

LATEST_APPROVAL_OF_RUN = (
    select(approvals)
    .where(approvals.c.run_id == bindparam("b_run_id"))
    .order_by(approvals.c.requested_at.desc(), approvals.c.id.desc())
    .limit(1)
)
LATEST_DECIDED_APPROVAL_OF_STEP = (
    select(approvals)
    .where(
        approvals.c.step_id == bindparam("b_step_id"),
        approvals.c.status.in_(("approved", "rejected")),
    )
    .order_by(approvals.c.decided_at.desc(), approvals.c.id.desc())
    .limit(1)
)
DECIDE_PENDING_APPROVAL = update(approvals).where(
    approvals.c.id == bindparam("b_approval_id"), approvals.c.status == "pending"
)


@cache
def _update_step_where(names: tuple[str, ...]) -> Update:
    return update(steps).where(
        steps.c.id == bindparam("b_step_id"),
        *(steps.c[name] == bindparam(f"b_{name}") for name in names),
    )


def update_step_if(
    conn: Connection, step_id: uuid.UUID, expect: Mapping[str, Any], values: Mapping[str, Any]
) -> bool:
    """Update one step only while its columns still equal ``expect``."""
    statement = _update_step_where(tuple(sorted(expect)))
    params = {**values, "b_step_id": step_id}
    params.update({f"b_{name}": value for name, value in expect.items()})
    return conn.execute(statement, params).rowcount == 1


def update_run_if_version(
    conn: Connection, run_id: uuid.UUID, version: int, values: Mapping[str, Any]
) -> bool:
    """Compare-and-set a run on its ``version``."""
    params = {**values, "b_run_id": run_id, "b_version": version}
    return conn.execute(UPDATE_RUN_IF_VERSION, params).rowcount == 1
