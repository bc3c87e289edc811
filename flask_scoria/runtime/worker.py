"""Executing queued steps outside the call that queued them.

A step stays ``queued`` when its executor is another process, when it is
not due yet, or when no handler for its kind was known. :func:`claim_due`
claims the oldest due one (on PostgreSQL with ``FOR UPDATE SKIP LOCKED``, so
that workers never wait for each other); :func:`dispatch_queued` executes
them one after another, :func:`run_worker` (``flask scoria worker``) in
threads, woken on PostgreSQL by the ``NOTIFY`` of the commit that queued a
step, and :func:`execute_step` executes one named step (the Celery task).
Every path claims with the same compare-and-set, so each step runs once.
Each step is executed in an app context of its own, so handlers see a fresh
``g`` and the host's ``db.session`` is torn down after each, as after a
request.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from types import FrameType
from typing import Any

from flask import Flask, current_app
from sqlalchemy import Connection, and_, bindparam, literal_column, or_, select
from sqlalchemy.exc import SQLAlchemyError

from .._ids import parse_uuid
from ..errors import RunNotFound, StorageError
from ..readback import RunSummary
from ..statuses import EventType, RunStatus, StepStatus
from . import statements as sql
from .arguments import UNSET, int_in_range
from .context import RuntimeContext, context
from .executors import CHANNEL, send_to_celery
from .handlers import Handlers
from .outcomes import drive
from .reads import recover_expired_leases
from .rows import split_prefixed, summary_from_row
from .statements import Conflict
from .steps import claim_step, decided_approval, expire_leases
from .tables import Row, RowLike, events, runs, steps
from .transaction import Claim, Tx, transact, utcnow

log = logging.getLogger("flask_scoria")

_RUN_COLUMNS = [column.label(f"runs_{column.key}") for column in runs.c]
#: Written out, so that every plan of these statements, a prepared one's too, can walk
#: the partial index of queued steps in order of when they fall due, not every step.
_IS_QUEUED = steps.c.status == literal_column(f"'{StepStatus.QUEUED}'")
#: Not by the index of runs by status, which holds every running run: checked on the
#: run of each queued step found, since a claim holds SQLite's write lock.
_RUN_IS_RUNNING = sql.unindexed(runs.c.status) == RunStatus.RUNNING
#: What a claim locks on PostgreSQL: the run, and the step too, so that both are read as
#: they are once locked. A step that another call claimed, executed and queued again
#: after the statement's snapshot is checked again as it now is (due, say), not claimed
#: as the snapshot read it.
_CLAIM_LOCKS = (runs, steps)
#: The oldest due queued step of a running run, with its run's columns; on
#: PostgreSQL the run and the step are locked, skipping those another worker holds.
_DUE_STEP = (
    select(steps, *_RUN_COLUMNS)
    .join(runs, runs.c.id == steps.c.run_id)
    .where(
        _IS_QUEUED,
        # A range of the index, which ends at the first step not yet due: every queued
        # step has a time (scoria_0006 gave one to those queued before scoria_0002).
        steps.c.not_before <= bindparam("now"),
        steps.c.kind.in_(bindparam("kinds", expanding=True)),
        _RUN_IS_RUNNING,
    )
    .order_by(steps.c.not_before)
    .limit(1)
    .with_for_update(of=_CLAIM_LOCKS, skip_locked=True)
)
#: When the first queued step of a running run falls due: in the future, or already,
#: when a claim did not take it (its run held by another transaction, a lost race).
_NEXT_DUE = (
    select(steps.c.not_before)
    .join(runs, runs.c.id == steps.c.run_id)
    .where(
        _IS_QUEUED,
        steps.c.kind.in_(bindparam("kinds", expanding=True)),
        _RUN_IS_RUNNING,
    )
    .order_by(steps.c.not_before)
    .limit(1)
)


def claim_due(ctx: RuntimeContext, handlers: Handlers) -> tuple[Row, Claim] | None:
    """Claim the oldest due queued step with a registered handler, or ``None``."""
    kinds = sorted(ctx.registry)
    if not kinds:
        return None
    tx: Tx | None = None
    try:
        with ctx.storage.write() as conn:
            now = utcnow()
            picked = conn.execute(_DUE_STEP, {"now": now, "kinds": kinds}).mappings().first()
            if picked is None:
                return None
            found = dict(picked)
            run = split_prefixed(found, "runs_")
            tx = Tx(conn, run, now, ctx.keeper.expiry(now), ctx.registry)
            step = {key: value for key, value in found.items() if not key.startswith("runs_")}
            if not expire_leases(tx):
                claim_step(tx, step, handlers, decided_approval(tx, step))
            row = tx.commit()
    except Conflict:  # the run changed under the claim (SQLite only): look again later
        return None
    except StorageError as exc:
        if sql.lost_race(exc):  # aborted for a concurrent claim: look again later
            return None
        if tx is not None and tx.claim is not None and ctx.storage.retry_after(exc, 1):
            return _claimed_before(ctx, tx, tx.claim, exc)
        raise
    tx.send(ctx, row)
    return None if tx.claim is None else (row, tx.claim)


def _claimed_before(
    ctx: RuntimeContext, tx: Tx, claim: Claim, exc: StorageError
) -> tuple[Row, Claim] | None:
    """The claim whose connection dropped as it committed, if the commit went through
    (only its answer was lost: the step holds the claim's lease); ``None`` if it did
    not, and the step waits for the next look. Raises ``exc`` when it cannot be read.
    """
    try:
        with ctx.storage.read() as conn:
            step = sql.STEP_BY_ID.first(conn, {"b_step_id": claim.step["id"]})
            if step is None or step["lease_token"] != claim.token:
                return None
            row = sql.RUN_BY_ID.first(conn, {"b_run_id": step["run_id"]})
    except StorageError:
        raise exc from exc.__cause__
    assert row is not None
    tx.send(ctx, row)
    return row, claim


def next_due(ctx: RuntimeContext) -> datetime | None:
    """When the next queued step with a registered handler falls due, if one is waiting."""
    kinds = sorted(ctx.registry)
    if not kinds:
        return None
    with ctx.storage.read() as conn:
        due: datetime | None = conn.execute(_NEXT_DUE, {"kinds": kinds}).scalar()
    return due


def _execute_claimed(app: Flask, handlers: Handlers, row: Row, claim: Claim) -> RunSummary:
    """Execute a claimed step (and what it claims next) in a fresh app context."""
    with app.app_context():
        return summary_from_row(drive(context(), handlers, claim, row))


def dispatch_queued(*, limit: int = 100) -> list[RunSummary]:
    """Execute up to ``limit`` due queued steps that have a registered handler, oldest first.

    Steps whose executor is ``"worker"`` or ``"celery"`` are executed here
    too. Expired leases and timeouts are handled first, as ``flask scoria
    recover`` does. Returns the summary of each step's run after it, in
    order. Steps whose kind has no registered handler are left as they are.
    """
    int_in_range(limit, "limit")
    return list(_dispatched(limit))


def _dispatched(limit: int, stopping: Callable[[], bool] | None = None) -> Iterator[RunSummary]:
    """:func:`dispatch_queued`, each run as its step ends; none claimed once ``stopping``."""
    ctx = context()
    recover_expired_leases()
    handlers = Handlers(None, ctx.registry, local=True, stopping=stopping)
    for _ in range(limit):
        if stopping is not None and stopping():
            return
        claimed = claim_due(ctx, handlers)
        if claimed is None:
            return
        yield _execute_claimed(ctx.app, handlers, *claimed)


#: The step ``b_step_id`` of the run ``b_run_id``, with the run's running steps.
_STEP_AND_RUNNING = sql.Prepared(
    select(steps).where(
        steps.c.run_id == bindparam("b_run_id"),
        or_(steps.c.id == bindparam("b_step_id"), steps.c.status == StepStatus.RUNNING),
    )
)


def execute_step(run_id: str, step_id: str) -> RunSummary | None:
    """Claim and execute one queued step if it is due; ``None`` if it was not claimed.

    A step already claimed, finished or cancelled is left alone, so a
    repeated request executes the step once. A step that this one leads to
    runs where its kind runs, as after a call: a Celery kind's in a task of
    its own, under its own time limit. After a step with a timeout, whose time
    limit the task is under, every step goes on in a task of its own; so does
    an ``inline`` kind's step that is due later (a delay, a retry's backoff).
    """
    ctx = context()
    handlers = Handlers(None, ctx.registry, local=True)
    run_key, step_key = parse_uuid(run_id), parse_uuid(step_id)
    if run_key is None or step_key is None:
        log.warning("Asked to execute step %r of run %r: not the ids of a step.", step_id, run_id)
        return None

    def decide(tx: Tx) -> None:
        if tx.status() != RunStatus.RUNNING:
            return
        found = tx.all(_STEP_AND_RUNNING, {"b_run_id": run_key, "b_step_id": step_key})
        if expire_leases(tx, [row for row in found if row["status"] == StepStatus.RUNNING]):
            return
        step = next((row for row in found if row["id"] == step_key), None)
        if step is not None and step["status"] == StepStatus.QUEUED:
            claim_step(tx, step, handlers, decided_approval(tx, step))

    # The step and the run's running steps travel with the run's lock. A step's decision
    # is read only for a step that started before (decided_approval), so not sent ahead.
    ahead: list[tuple[sql.Prepared, RowLike]] = [
        (_STEP_AND_RUNNING, {"b_run_id": run_key, "b_step_id": step_key})
    ]
    try:
        _, row, claim = transact(ctx, run_key, UNSET, decide, ahead=lambda _now: ahead, claims=True)
    except RunNotFound:
        log.info("Step %s was not executed: its run %s was deleted.", step_id, run_id)
        return None
    if claim is None:
        return None
    timed = ctx.registry.policy(claim.step["kind"]).timeout is not None
    # A Celery task cannot leave a step due later for the next call: none will come.
    later = "celery" if ctx.app.extensions.get("celery") is not None else None
    onward = Handlers(None, ctx.registry, elsewhere="celery" if timed else None, later=later)
    return _execute_claimed(ctx.app, onward, row, claim)


#: Whether the step was queued for Celery whatever its kind's executor (by a task
#: under a time limit, or due later, see :func:`execute_step`), as a next step or a retry.
_QUEUED_FOR_CELERY = (
    select(events.c.sequence)
    .where(
        events.c.run_id == steps.c.run_id,
        events.c.step_id == steps.c.id,
        events.c.event_type.in_([EventType.STEP_QUEUED, EventType.RETRY_SCHEDULED]),
        events.c.payload["executor"].as_string() == "celery",
    )
    .exists()
)

#: Due steps of running runs, oldest first, whose kinds are in ``kinds``, or in
#: ``inline_kinds`` and queued for Celery.
_OVERDUE = (
    select(steps.c.run_id, steps.c.id, steps.c.kind, steps.c.not_before)
    .join(runs, runs.c.id == steps.c.run_id)
    .where(
        _IS_QUEUED,
        steps.c.not_before <= bindparam("before"),
        or_(
            steps.c.kind.in_(bindparam("kinds", expanding=True)),
            and_(steps.c.kind.in_(bindparam("inline_kinds", expanding=True)), _QUEUED_FOR_CELERY),
        ),
        _RUN_IS_RUNNING,
    )
    .order_by(steps.c.not_before)
    .limit(bindparam("limit"))
)


def resend_due_celery_steps(resend_after: float, *, limit: int = 100) -> list[str]:
    """Send the Celery task again for steps due more than ``resend_after`` seconds ago.

    Only steps queued for Celery (of kinds whose executor is ``"celery"``, or
    sent on from a task: under a time limit, or due later, a next step or a
    retry), at most ``limit``, oldest first.
    Returns their ids.
    """
    ctx = context()
    executors = {kind: ctx.registry.policy(kind).executor for kind in sorted(ctx.registry)}
    kinds = [kind for kind, executor in executors.items() if executor == "celery"]
    if not kinds:
        return []
    inline_kinds = [kind for kind, executor in executors.items() if executor == "inline"]
    before = utcnow() - timedelta(seconds=resend_after)
    params = {"before": before, "kinds": kinds, "inline_kinds": inline_kinds, "limit": limit}
    with ctx.storage.read() as conn:
        rows = conn.execute(_OVERDUE, params).all()
    return [
        str(row.id)
        for row in rows
        if send_to_celery(ctx.app, row.run_id, row.id, None, ctx.registry.policy(row.kind).timeout)
    ]


#: The longest a waiting worker goes without looking whether a signal stopped it, in
#: seconds.
STOP_CHECK = 0.5
#: How soon a worker looks again for a step that was due but not claimed (its run held
#: by another transaction, a race lost to another worker), in seconds.
UNCLAIMED_RETRY = 0.1


class _Listener:
    """A PostgreSQL connection that ``LISTEN``\\ s for queued steps."""

    def __init__(self, ctx: RuntimeContext) -> None:
        self._conn: Connection = ctx.storage.engine.connect().execution_options(
            isolation_level="AUTOCOMMIT"
        )
        self._conn.exec_driver_sql(f"LISTEN {CHANNEL}")

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a notification; return whether one came."""
        driver: Any = self._conn.connection.driver_connection
        return any(True for _ in driver.notifies(timeout=timeout, stop_after=1))

    def close(self) -> None:
        self._conn.invalidate()
        self._conn.close()


class Worker:
    """``flask scoria worker``: claims due steps and executes them in ``concurrency`` threads.

    The main thread claims and the threads execute, each step in a fresh app
    context. SIGTERM or SIGINT stops claiming; the running handlers finish and
    their outcomes are written before :meth:`run` returns. A second signal exits
    at once: the leases of the steps still running expire, and they are retried.
    """

    def __init__(
        self,
        app: Flask,
        *,
        concurrency: int,
        interval: float,
        on_dispatched: Callable[[RunSummary], None],
    ) -> None:
        self.app = app
        self.interval = interval
        self.on_dispatched = on_dispatched
        self._stopping = threading.Event()
        self._signalled = False
        self._slots = threading.Semaphore(concurrency)
        self._freed = threading.Event()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="scoria-worker")
        self._listener: _Listener | None = None
        self._swept = 0.0

    def _stop_claiming(self) -> None:
        self._stopping.set()
        self._freed.set()

    def _on_signal(self, *_: object) -> None:
        # A signal handler runs between two instructions of the main thread, which may
        # hold the lock an event's set() takes: only note the signal, the loop stops.
        if self._stop_noted():
            os._exit(1)
        self._signalled = True

    def _stop_noted(self) -> bool:
        """Whether a signal asked the worker to stop (read from any thread)."""
        return self._signalled or self._stopping.is_set()

    def _stop_requested(self) -> bool:
        """Whether the worker is stopping; a noted signal stops its claiming here."""
        if self._signalled:
            self._stop_claiming()
        return self._stopping.is_set()

    def run(self, on_started: Callable[[], None] = lambda: None) -> None:
        """Claim and execute due steps until stopped; ``on_started`` once signals stop it."""
        previous = _handle_signals(self._on_signal)
        on_started()
        try:
            while not self._stop_requested():
                try:
                    with self.app.app_context():
                        wake = self._pass(context())
                except StorageError as exc:
                    log.warning(
                        "The worker found the database unavailable: %s [%s]; retrying in %g s.",
                        exc.message,
                        exc.code,
                        self.interval,
                    )
                    self._close_listener()
                    wake = self.interval
                self._wait(wake)
        finally:
            self._pool.shutdown(wait=True)
            self._close_listener()
            _restore_signals(previous)

    def run_once(self, limit: int) -> None:
        """Execute up to ``limit`` due steps one after another, here; a signal lets the
        step that runs finish, and stops the pass."""
        previous = _handle_signals(self._on_signal)
        try:
            with self.app.app_context():
                for run in _dispatched(limit, stopping=self._stop_noted):
                    self.on_dispatched(run)
        finally:
            self._pool.shutdown(wait=True)
            _restore_signals(previous)

    def _pass(self, ctx: RuntimeContext) -> float:
        """Sweep stale steps now and then, claim what is due; return how long to wait."""
        if time.monotonic() - self._swept >= self.interval:
            recover_expired_leases()
            self._swept = time.monotonic()
        if self._listener is None and not ctx.storage.is_sqlite:
            try:
                self._listener = _Listener(ctx)
            except SQLAlchemyError as exc:
                # A pooled connection that dropped; the next pass listens on a fresh one,
                # and this one claims what is due meanwhile.
                log.warning("The worker's LISTEN connection failed (%s); reconnecting.", exc)
        handlers = Handlers(None, ctx.registry, local=True, stopping=self._stop_noted)
        while not self._stop_requested():
            if not self._slots.acquire(blocking=False):
                return self.interval  # every thread is busy: the first one freed wakes the wait
            try:
                claimed = claim_due(ctx, handlers)
            except BaseException:
                self._slots.release()
                raise
            if claimed is None:
                self._slots.release()
                break
            self._pool.submit(self._execute, handlers, *claimed)
        due = next_due(ctx)
        if due is None:
            return self.interval
        seconds = (due - utcnow()).total_seconds()
        # A step due already was not claimed: no NOTIFY will come for it, so look again soon.
        return min(self.interval, seconds if seconds > 0 else UNCLAIMED_RETRY)

    def _execute(self, handlers: Handlers, row: Row, claim: Claim) -> None:
        """Execute a claimed step, then claim the next due one here while there is one."""
        claimed: tuple[Row, Claim] | None = (row, claim)
        try:
            while claimed is not None:
                self.on_dispatched(_execute_claimed(self.app, handlers, *claimed))
                claimed = None
                if not self._stop_noted():
                    with self.app.app_context():
                        claimed = claim_due(context(), handlers)
        except StorageError as exc:
            log.warning(
                "The worker found the database unavailable: %s [%s]; a step it could not"
                " record is retried once its lease expires.",
                exc.message,
                exc.code,
            )
        except BaseException:  # nothing reads the pool's futures: say it here
            log.exception("The worker could not execute step %s.", claim.step["id"])
        finally:
            self._slots.release()
            self._freed.set()

    def _wait(self, timeout: float) -> None:
        """Wait for a queued step (NOTIFY), a freed thread, a due time or a stop."""
        deadline = time.monotonic() + timeout
        while not self._stop_requested():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self._listener is None or not self._has_free_slot():
                if self._freed.wait(min(left, STOP_CHECK)):
                    self._freed.clear()
                    return
                continue
            try:
                if self._listener.wait(min(left, STOP_CHECK)):
                    return
            except Exception as exc:
                log.warning("The worker's LISTEN connection failed (%s); reconnecting.", exc)
                self._close_listener()
                return

    def _has_free_slot(self) -> bool:
        if self._slots.acquire(blocking=False):
            self._slots.release()
            return True
        return False

    def _close_listener(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            try:
                listener.close()
            except Exception:
                log.debug("Closing the LISTEN connection failed.", exc_info=True)


_Handler = Callable[[int, FrameType | None], Any] | int | None


def _handle_signals(stop: Callable[..., None]) -> dict[int, _Handler]:
    """Let SIGTERM and SIGINT stop the worker (from the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {number: signal.signal(number, stop) for number in (signal.SIGTERM, signal.SIGINT)}


def _restore_signals(previous: dict[int, _Handler]) -> None:
    for number, handler in previous.items():
        signal.signal(number, handler)


def run_worker(
    *,
    concurrency: int = 1,
    interval: float,
    limit: int,
    once: bool,
    on_dispatched: Callable[[RunSummary], None],
    on_started: Callable[[], None] = lambda: None,
) -> None:
    """Execute due queued steps of the current app until SIGTERM or SIGINT (or one pass).

    With ``once``, up to ``limit`` due steps are executed one after another
    and the call returns. When the database is unavailable a warning is
    logged and the pass is retried after ``interval`` seconds.
    """
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    worker = Worker(
        app,
        concurrency=concurrency,
        interval=interval,
        on_dispatched=on_dispatched,
    )
    if once:
        worker.run_once(limit)
    else:
        worker.run(on_started)
