"""Running queued steps outside the request that created them.

A step whose handler was not known when its run was created or resumed
stays ``queued``. :func:`dispatch_queued` finds the running runs with such
steps and dispatches them with the app's registered handlers;
:func:`run_worker` (``flask scoria worker``) calls it in a loop, and a
host's own scheduler can call it too. Dispatch is a compare-and-set, so any
number of workers (and requests) can share a database: each step still runs
once. Each run is dispatched in an app context of its own, so handlers see a
fresh ``g`` and the host's ``db.session`` is torn down after each, as after
a request.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flask import Flask, current_app
from sqlalchemy import select

from ..errors import StorageError
from ..readback import RunSummary
from ..statuses import RunStatus, StepStatus
from .arguments import int_in_range
from .context import context
from .reads import recover_expired_leases
from .tables import runs, steps
from .transitions import dispatch


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
            steps.c.status == StepStatus.QUEUED,
            steps.c.kind.in_(kinds),
            runs.c.status == RunStatus.RUNNING,
        )
        .distinct()
        .order_by(runs.c.created_at, runs.c.id)
        .limit(limit)
    )
    with ctx.storage.read() as conn:
        run_ids = [str(row.id) for row in conn.execute(waiting)]
    dispatched = []
    for run_id in run_ids:
        with ctx.app.app_context():
            dispatched.append(dispatch(run_id))
    return dispatched


def run_worker(
    *,
    interval: float,
    limit: int,
    once: bool,
    on_dispatched: Callable[[RunSummary], None],
    on_error: Callable[[StorageError], None],
) -> None:
    """Dispatch queued steps of the current app until interrupted (or once).

    Each pass runs in an app context of its own. When the database is
    unavailable ``on_error`` is told and the pass is retried after
    ``interval`` seconds.
    """
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    while True:
        try:
            with app.app_context():
                found = dispatch_queued(limit=limit)
        except StorageError as exc:
            if once:
                raise
            on_error(exc)
            found = []
        for run in found:
            on_dispatched(run)
        if once:
            return
        if not found:
            time.sleep(interval)
