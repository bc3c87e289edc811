"""Running queued steps outside the request that created them.

A step whose handler was not known when its run was created or resumed
stays ``queued``. :func:`dispatch_queued` finds the running runs with such
steps and dispatches them with the app's registered handlers. ``flask scoria
worker`` calls it in a loop; a host's own scheduler can call it too.
Dispatch is a compare-and-set, so any number of workers (and requests) can
share a database: each step still runs once.
"""

from __future__ import annotations

from sqlalchemy import select

from .models import runs, steps
from .readback import RunSummary
from .runtime import dispatch, recover_expired_leases
from .runtime.arguments import int_in_range
from .runtime.transaction import context


def dispatch_queued(*, limit: int = 100) -> list[RunSummary]:
    """Dispatch up to ``limit`` running runs that have queued steps with a registered handler.

    Expired leases are failed first, as ``flask scoria recover`` does.
    Returns the summaries of the runs dispatched, oldest first. Runs whose queued
    steps have no registered handler are left as they are.
    """
    int_in_range(limit, "limit")
    ctx = context()
    recover_expired_leases()
    kinds = sorted(ctx.registry)
    if not kinds:
        return []
    waiting = (
        select(runs.c.id, runs.c.created_at)
        .join(steps, steps.c.run_id == runs.c.id)
        .where(
            steps.c.status == "queued",
            steps.c.kind.in_(kinds),
            runs.c.status == "running",
        )
        .distinct()
        .order_by(runs.c.created_at, runs.c.id)
        .limit(limit)
    )
    with ctx.storage.read() as conn:
        run_ids = [str(row.id) for row in conn.execute(waiting)]
    return [dispatch(run_id) for run_id in run_ids]
