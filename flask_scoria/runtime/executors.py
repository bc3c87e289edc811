"""Handing queued steps to the process that executes them.

A step left ``queued`` for a ``flask scoria worker`` is announced with a
PostgreSQL ``NOTIFY`` in the transaction that queued it, so it is delivered
on commit. A step for Celery is sent as the task ``flask_scoria.run_step``
once that transaction has committed. Either way the database stays the
source of truth: whoever executes the step claims it with the same
compare-and-set, so a repeated announcement is harmless.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from flask import Flask
from sqlalchemy import Connection

log = logging.getLogger("flask_scoria")

#: The PostgreSQL channel workers listen on.
CHANNEL = "scoria_steps"
#: The Celery task that executes one step.
RUN_STEP_TASK = "flask_scoria.run_step"
#: The longest Celery countdown used for a delayed step (a broker holds such a
#: message unacknowledged; RabbitMQ's consumer timeout is 30 minutes). Later
#: steps are sent by the periodic ``flask_scoria.recover`` task once due.
MAX_COUNTDOWN = 15 * 60.0
#: Seconds a step's Celery soft time limit adds to its kind's timeout: the task starts
#: before it claims the step, whose deadline counts from the claim.
TIME_LIMIT_GRACE = 1.0


@dataclass(frozen=True)
class QueuedStep:
    """A step left ``queued`` for another process, or for later."""

    run_id: uuid.UUID
    step_id: uuid.UUID
    executor: str
    not_before: datetime
    timeout: float | None


def notify(conn: Connection) -> None:
    """Wake the PostgreSQL workers once the transaction of ``conn`` commits."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"NOTIFY {CHANNEL}")


def announce(app: Flask, queued: list[QueuedStep]) -> None:
    """Send the Celery task of each committed step queued for Celery."""
    for step in queued:
        if step.executor == "celery":
            send_to_celery(app, step.run_id, step.step_id, step.not_before, step.timeout)


def send_to_celery(
    app: Flask,
    run_id: uuid.UUID,
    step_id: uuid.UUID,
    not_before: datetime | None,
    timeout: float | None,
) -> bool:
    """Send ``flask_scoria.run_step(run_id, step_id)``; whether it was sent.

    A broker that cannot be reached is logged, not raised: the step is
    already queued in the database, and ``flask_scoria.recover`` sends it again.
    """
    celery = app.extensions.get("celery")
    if celery is None:
        log.error(
            "Step %s is queued for Celery, but app.extensions['celery'] is not set;"
            " build the Celery app with celery_init_app(app).",
            step_id,
        )
        return False
    options: dict[str, object] = {}
    if not_before is not None:
        countdown = (not_before - datetime.now(UTC)).total_seconds()
        if countdown > MAX_COUNTDOWN:
            return False
        if countdown > 0:
            options["countdown"] = countdown
    if timeout is not None:
        # Past the step's own deadline, which starts at the claim inside the task: the
        # limit's exception is then recorded as the step's timeout.
        options["soft_time_limit"] = timeout + TIME_LIMIT_GRACE
    try:
        celery.send_task(RUN_STEP_TASK, args=[str(run_id), str(step_id)], **options)
    except Exception:
        log.warning("Could not send step %s to Celery; it stays queued.", step_id, exc_info=True)
        return False
    return True
