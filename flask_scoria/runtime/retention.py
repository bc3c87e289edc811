"""Deleting runs that ended long ago, with everything recorded about them."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, delete, func, select

from ..errors import InvalidRunOptions
from ..statuses import RunStatus
from .arguments import UNSET, TenantGuard, int_in_range, tenant_guard
from .context import context
from .tables import approvals, events, handoffs, runs, steps
from .transaction import utcnow

#: The statuses of runs that have ended.
_ENDED = sorted(status for status in RunStatus if status.finished)


#: The most runs one pruning transaction deletes: each is a bound parameter of its
#: statements, of which PostgreSQL takes 65,535 at most.
MAX_BATCH = 10_000


def prune_runs(
    *,
    older_than: timedelta,
    tenant_id: object = UNSET,
    batch_size: int = 500,
    dry_run: bool = False,
) -> int:
    """Delete the runs that ended more than ``older_than`` ago; return how many.

    A run's steps, events, approvals and handoffs go with it. Runs that have
    not ended (``running``, ``waiting_for_approval``) are never touched.
    ``tenant_id`` limits the pruning to one tenant (``None``: runs without a
    tenant; a blank string is refused, not taken for ``None``). Each batch of
    ``batch_size`` runs (at most 10,000) is one short transaction, so pruning a
    large table does not hold up the app. With ``dry_run`` nothing is deleted
    and the number that would be is returned.
    """
    if not isinstance(older_than, timedelta) or older_than <= timedelta(0):
        raise InvalidRunOptions("older_than must be a positive datetime.timedelta.")
    if isinstance(tenant_id, str) and not tenant_id.strip():
        # A blank id stands for "no tenant" elsewhere; here it would delete those runs.
        raise InvalidRunOptions(
            "tenant_id is blank; pass tenant_id=None to prune the runs without a tenant."
        )
    int_in_range(batch_size, "batch_size", MAX_BATCH)
    if not isinstance(dry_run, bool):
        raise InvalidRunOptions("dry_run must be True or False.")
    try:
        cutoff = utcnow() - older_than
    except OverflowError:
        raise InvalidRunOptions("older_than reaches back before the year 1.") from None
    ctx = context()
    conditions = _ended_before(cutoff, tenant_guard(tenant_id, None))
    if dry_run:
        with ctx.storage.read() as conn:
            count = select(func.count()).select_from(runs).where(*conditions)
            return conn.execute(count).scalar_one()
    oldest_first = select(runs.c.id).where(*conditions).limit(batch_size).with_for_update()
    if tenant_id is not UNSET:
        # In the order of the tenant's index of runs by creation, so that a prepared
        # statement's plan, made for any tenant and cutoff, walks that index too rather
        # than scanning the table.
        oldest_first = oldest_first.order_by(runs.c.created_at)
    pruned = 0
    while True:
        with ctx.storage.write() as conn:
            batch = list(conn.scalars(oldest_first))
            for table in (events, approvals, handoffs, steps):
                conn.execute(delete(table).where(table.c.run_id.in_(batch)))
            conn.execute(delete(runs).where(runs.c.id.in_(batch)))
        pruned += len(batch)
        if len(batch) < batch_size:
            break
    if pruned:
        ctx.app.logger.info(
            "flask-scoria: pruned %d runs that ended more than %s ago", pruned, older_than
        )
    return pruned


def _ended_before(cutoff: datetime, tenant: TenantGuard) -> list[ColumnElement[bool]]:
    # A run is created before it ends: its creation bounds the walk of a tenant's runs
    # by an index, where the end alone would walk all its ended runs at each batch.
    conditions = [
        runs.c.status.in_(_ENDED),
        runs.c.completed_at < cutoff,
        runs.c.created_at < cutoff,
    ]
    if tenant is not UNSET:
        conditions.append(
            runs.c.tenant_id.is_(None) if tenant is None else runs.c.tenant_id == tenant
        )
    return conditions
