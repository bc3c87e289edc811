"""Reading runs back, noticing expired leases on the way."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Connection, literal, select, tuple_

from .. import _sql
from ..identity import normalize_id
from ..models import runs, steps
from ..readback import RunDetail, RunSummary, load_detail, summary_from_row
from .arguments import int_in_range, run_uuid, tenant_guard
from .steps import expire_leases
from .transaction import UNSET, RuntimeContext, context, load_run, transact, utcnow


def _read_run(ctx: RuntimeContext, key: uuid.UUID, guard: Any) -> dict[str, Any]:
    """Read a run, first failing it if a step's lease expired."""
    with ctx.storage.read() as conn:
        row = load_run(conn, key, guard, lock=False)
        stale = row["status"] == "running" and _sql.EXPIRED_STEP_OF_RUN.first(
            conn, {"b_run_id": key, "b_now": utcnow()}
        )
    if stale:
        _, row, _ = transact(ctx, key, guard, expire_leases)
    return row


def get_run(run_id: str, *, tenant_id: Any = UNSET, identity: Any = None) -> RunSummary:
    """The current summary of one exact run; :class:`RunNotFound` if none is visible."""
    ctx = context()
    return summary_from_row(_read_run(ctx, run_uuid(run_id), tenant_guard(tenant_id, identity)))


def get_run_detail(run_id: str, *, tenant_id: Any = UNSET, identity: Any = None) -> RunDetail:
    """One run with its steps, timeline, approvals, handoffs and ``delegated_handoffs``."""
    ctx = context()
    key = run_uuid(run_id)
    guard = tenant_guard(tenant_id, identity)
    _read_run(ctx, key, guard)
    with ctx.storage.snapshot() as conn:
        return load_detail(conn, load_run(conn, key, guard, lock=False))


def list_runs_for_session(
    session_id: str | None,
    *,
    limit: int = 50,
    before: str | None = None,
    tenant_id: Any = UNSET,
    identity: Any = None,
) -> list[RunSummary]:
    """The runs of one host session, newest first.

    ``before`` is the ``run_id`` of the last run of the previous page.
    """
    session = normalize_id(session_id, "session_id")
    int_in_range(limit, "limit", 500)
    guard = tenant_guard(tenant_id, identity)
    ctx = context()
    if session is None:
        return []
    query = select(runs).where(runs.c.session_id == session)
    if guard is not UNSET:
        query = query.where(runs.c.tenant_id == guard)
    with ctx.storage.read() as conn:
        if before is not None:
            cursor = load_run(conn, run_uuid(before), guard, lock=False)
            after = tuple_(
                literal(cursor["created_at"], runs.c.created_at.type),
                literal(cursor["id"], runs.c.id.type),
            )
            query = query.where(tuple_(runs.c.created_at, runs.c.id) < after)
        rows = [
            dict(row)
            for row in conn.execute(
                query.order_by(runs.c.created_at.desc(), runs.c.id.desc()).limit(limit)
            ).mappings()
        ]
        running = [row["id"] for row in rows if row["status"] == "running"]
        stale = _with_expired_leases(conn, running)
    for index, row in enumerate(rows):
        if row["id"] in stale:
            _, rows[index], _ = transact(ctx, row["id"], guard, expire_leases)
    return [summary_from_row(row) for row in rows]


def _with_expired_leases(conn: Connection, run_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of ``run_ids`` have a running step whose lease expired."""
    if not run_ids:
        return set()
    expired = select(steps.c.run_id).where(
        steps.c.run_id.in_(run_ids),
        steps.c.status == "running",
        steps.c.lease_expires_at < utcnow(),
    )
    return set(conn.execute(expired).scalars())


def recover_expired_leases() -> list[str]:
    """Fail every run whose running step outlived its lease; return their ids."""
    ctx = context()
    with ctx.storage.read() as conn:
        run_ids = list(
            conn.execute(
                select(steps.c.run_id)
                .where(steps.c.status == "running", steps.c.lease_expires_at < utcnow())
                .distinct()
            ).scalars()
        )
    recovered = []
    for key in run_ids:
        expired, _, _ = transact(ctx, key, UNSET, expire_leases)
        if expired:
            recovered.append(str(key))
    return recovered
