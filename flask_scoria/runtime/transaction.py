"""Changes to one run: read it, decide, and write every change at once.

Every change to an existing run is one short transaction that ends in a
compare-and-set on the run's ``version`` (:class:`Tx`); a new run is written
with all its first rows in one transaction (:class:`NewRun`). Both collect
the same kinds of change, so the rules that move steps work on either.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from blinker import NamedSignal
from sqlalchemy import Connection

from ..errors import RunNotFound, StorageError
from ..readback import Approval
from ..statuses import EventType, RunStatus
from ..storage import Storage, commit_without_waiting, dropped_connection
from . import statements as sql
from .arguments import UNSET, TenantGuard
from .context import RuntimeContext
from .executors import CHANNEL, QueuedStep, announce, notify
from .handlers import Handler, HandlerRegistry
from .rows import summary_from_row
from .statements import Conflict
from .tables import Row, RowLike, approvals, steps

log = logging.getLogger("flask_scoria")

T = TypeVar("T")


MAX_ATTEMPTS = 50

#: The events of a change that claims a step and decides nothing: it need not wait for
#: the disk (:attr:`RunChange.flushes`).
_CLAIMING = frozenset(
    {
        EventType.RUN_STARTED,
        EventType.STEP_STARTED,
        EventType.RESUME_REQUESTED,
        EventType.RETRY_REQUESTED,
    }
)


class DuplicateStart(Exception):
    """Another start with the same idempotency key and tenant was committed first."""


class StepLost(Exception):
    """The step was cancelled or its lease expired while its handler ran."""


class MustFlush(Exception):
    """A change begun without waiting for the disk turned out to need it."""


class Waited(Exception):
    """The statements sent ahead carry a time from before another call changed the run.

    The run's lock was waited for: the change is decided again on a time after that
    call's, so that the run's timeline never goes back in time.
    """


class AlreadyWritten(Exception):
    """The run as a change whose connection dropped wrote it: its commit went through."""

    def __init__(self, run: Row) -> None:
        super().__init__()
        self.run = run


@dataclass
class Claim:
    """A step this process moved to ``running``, with the lease token it holds."""

    step: Row
    token: str
    handler: Handler
    approval: Approval | None


#: A signal to send once a change is committed, with what it says besides the run.
Signal = tuple[NamedSignal, dict[str, object]]


def utcnow() -> datetime:
    return datetime.now(UTC)


class RunChange(ABC):
    """The changes one transaction makes to one run: columns, steps, events, signals."""

    def __init__(self, run: Row, now: datetime, lease_until: datetime) -> None:
        self.run = run
        self.now = now
        self.lease_until = lease_until
        self.changes: Row = {}
        self.new_events: list[Row] = []
        self.signals: list[Signal] = []
        self.warnings: list[tuple[str, tuple[object, ...]]] = []
        self.claim: Claim | None = None
        self.queued: list[QueuedStep] = []

    @property
    def run_id(self) -> uuid.UUID:
        run_id: uuid.UUID = self.run["id"]
        return run_id

    @property
    def flushes(self) -> bool:
        """Whether the commit waits until the database has written it to disk.

        A change that claims a step for this process, and records nothing
        else (the run's start, the resume or retry that led to the claim),
        does not: the claimed step's outcome is committed by the same call,
        which waits for both. Only a crash of the database server (of the
        machine, for SQLite) in between loses the claim: the call then fails,
        or returns the run as the crash left it, and the step is claimed
        again. A decision or an outcome always waits, so that nobody sees one
        before it is on disk; everything a call wrote is on disk when it returns.
        """
        return self.claim is None or any(
            event["event_type"] not in _CLAIMING for event in self.new_events
        )

    def status(self) -> RunStatus:
        """The run's status as this transaction leaves it."""
        return RunStatus(self.changes["status"] if "status" in self.changes else self.run["status"])

    def set(self, **changes: object) -> None:
        """Change columns of the run."""
        self.changes.update(changes)

    def event(
        self, event_type: EventType, step_id: uuid.UUID | None = None, payload: Row | None = None
    ) -> None:
        """Append an event numbered after the run's last one."""
        self.new_events.append(
            {
                "run_id": self.run_id,
                "sequence": self.run["last_event_sequence"] + len(self.new_events) + 1,
                "event_type": event_type,
                "step_id": step_id,
                "payload": payload,
                "created_at": self.now,
            }
        )

    def signal(self, signal: NamedSignal, **extra: object) -> None:
        """Send ``signal`` once the change is committed."""
        self.signals.append((signal, extra))

    def warn(self, message: str, *args: object) -> None:
        """Log a warning on the ``flask_scoria`` logger once the change is committed."""
        self.warnings.append((message, args))

    def queue(self, step: QueuedStep) -> None:
        """Announce ``step`` to the process that executes it, on commit."""
        self.queued.append(step)

    def add_step(self, step: Row) -> None:
        """Add a new step to the run."""
        self.set(last_step_sequence=max(self.step_sequence(), step["sequence"]))
        self._insert(sql.INSERT_STEP, step)

    def add_handoff(self, handoff: Row) -> None:
        """Record a handoff of the run."""
        self._insert(sql.INSERT_HANDOFF, handoff)

    def add_approval(self, approval: Row) -> None:
        """Ask for a decision on a step of the run."""
        self._insert(sql.INSERT_APPROVAL, approval)

    @abstractmethod
    def _insert(self, statement: sql.Prepared, row: Row) -> None:
        """Insert ``row`` with the change."""

    def step_sequence(self) -> int:
        """The highest step sequence of the run so far."""
        sequence: int = self.changes.get("last_step_sequence") or self.run["last_step_sequence"]
        return sequence

    @abstractmethod
    def update_step(
        self, step_id: uuid.UUID, expect: Mapping[str, object], **values: object
    ) -> None:
        """Update one step only if it still matches ``expect``; else raise :class:`Conflict`."""

    def finish_step(self, step_id: uuid.UUID, held: Mapping[str, object], **values: object) -> None:
        """Record a handler's outcome, unless the step is no longer held by it."""
        try:
            self.update_step(step_id, held, **values)
        except Conflict:
            raise StepLost from None

    def send(self, ctx: RuntimeContext, row: Row) -> None:
        """Log the warnings, announce the queued steps and send the collected signals for
        the committed ``row``."""
        for message, args in self.warnings:
            log.warning(message, *args)
        announce(ctx.app, self.queued)
        send_signals(ctx, row, self.signals, self.claim)


def send_signals(
    ctx: RuntimeContext, row: Row, sent: Sequence[Signal], claim: Claim | None
) -> None:
    """Send each of ``sent`` for the committed run ``row``, to the receivers of the app.

    The lease of the step ``claim`` holds is kept alive meanwhile, so that a slow
    receiver does not hand the step to another process before its handler runs.
    """
    if not any(signal.receivers for signal, _ in sent):
        return
    summary = summary_from_row(row)
    app = ctx.app
    lease = (
        nullcontext()
        if claim is None
        else ctx.keeper.hold(ctx.storage, claim.step["id"], claim.token)
    )
    with lease:
        for signal, extra in sent:
            for receiver in signal.receivers_for(app):
                try:
                    receiver(app, run=summary, **extra)
                except Exception:
                    # The change is committed: a failing receiver is not a failed call.
                    app.logger.exception("flask-scoria: a %r signal receiver failed", signal.name)


class NewRun(RunChange):
    """A run being created: its rows are inserted together by :meth:`insert`."""

    def __init__(self, run: Row, now: datetime, lease_until: datetime) -> None:
        super().__init__(run, now, lease_until)
        self.new_rows: list[tuple[sql.Prepared, Row]] = []

    def _insert(self, statement: sql.Prepared, row: Row) -> None:
        self.new_rows.append((statement, row))

    def update_step(
        self, step_id: uuid.UUID, expect: Mapping[str, object], **values: object
    ) -> None:
        for statement, step in self.new_rows:
            if (
                statement is sql.INSERT_STEP
                and step["id"] == step_id
                and all(step[key] == value for key, value in expect.items())
            ):
                step.update(values)
                return
        raise Conflict

    def insert(self, storage: Storage) -> Row:
        """Write the run with its steps, handoffs and events; return the run as written.

        If the connection drops, the write is tried again on a fresh one,
        unless the run turns out to be there: the dropped commit went through.
        """
        row = {**self.run, **self.changes, "last_event_sequence": len(self.new_events)}
        tries = 0
        for attempt in range(MAX_ATTEMPTS):
            # With psycopg, the rows are one statement: a transaction of its own.
            writing = (
                storage.autocommit() if storage.pipelines else storage.write(flush=self.flushes)
            )
            try:
                with writing as conn:
                    if tries == 0 or sql.RUN_BY_ID.first(conn, {"b_run_id": self.run_id}) is None:
                        self._insert_all(conn, row, batch=storage.pipelines)
                return row
            except StorageError as exc:
                if sql.unmatched(exc):
                    raise DuplicateStart from None
                if sql.lost_race(exc):
                    # A concurrent start, of the same idempotency key, say, went first.
                    back_off(attempt)
                    continue
                tries += 1
                if storage.retry_after(exc, tries):
                    continue
                if tries > 1 or dropped_connection(exc):
                    # A write sent on a dropped connection may have been committed.
                    raise self._maybe_written(exc) from exc
                raise
        raise StorageError(
            f"Run {self.run_id} could not be written; gave up after {MAX_ATTEMPTS} tries."
        )

    def _maybe_written(self, exc: StorageError) -> StorageError:
        """``exc``, naming the run that a dropped connection may have written."""
        held = (
            ""
            if self.claim is None
            else " If it was, its first step did not run: it is held until its lease expires,"
            f" at {self.lease_until.isoformat()}, then retried or failed like a step whose"
            " process stopped."
        )
        return StorageError(
            f"{exc.message} Run {self.run_id} may have been written before the connection"
            f" dropped: look for it with get_run(run_id) before starting another.{held}",
            run_id=str(self.run_id),
            hint=exc.hint,
        )

    def _insert_all(self, conn: Connection, row: Row, *, batch: bool) -> None:
        keyed = row["idempotency_key"] is not None
        # The new rows of each table together, tables in the order they were first added.
        rows = [
            (statement, [new for of, new in self.new_rows if of is statement])
            for statement in dict.fromkeys(statement for statement, _ in self.new_rows)
        ]
        rows.append((sql.INSERT_EVENTS, self.new_events))
        if batch:
            # One statement, whose guard fails it when the idempotency key is taken.
            writes = sql.Batch(conn)
            writes.notify = CHANNEL if self.queued else None
            writes.flush = self.flushes
            if keyed:
                writes.add(sql.INSERT_RUN_IF_NEW[conn.dialect.name], row, guarded=True)
            else:
                writes.add(sql.INSERT_RUN, row)
            for statement, new in rows:
                for each in new:
                    writes.add(statement, each)
            writes.send()
            return
        if self.queued:
            notify(conn)
        # A keyed run goes first, on its own, so that a start that lost the race writes nothing.
        if keyed:
            try:
                sql.INSERT_RUN_IF_NEW[conn.dialect.name].expect_one(conn, row)
            except Conflict:
                raise DuplicateStart from None
        else:
            sql.INSERT_RUN.execute_many(conn, [row])
        for statement, new in rows:
            if new:
                statement.execute_many(conn, new)


class Tx(RunChange):
    """A change to a stored run, applied by :meth:`commit` as a compare-and-set.

    With ``defer``, the checks of its writes travel with the commit instead
    of each waiting for its answer (see :meth:`~.statements.Prepared.expect_one`);
    with a ``batch`` as well, its writes are held and reach the database as
    one statement, before its next read or with its commit. Its reads and
    writes go through its methods, so that they keep their order.
    """

    def __init__(
        self,
        conn: Connection,
        run: Row,
        now: datetime,
        lease_until: datetime,
        registry: HandlerRegistry,
        *,
        defer: bool = False,
        batch: bool = False,
        alone: bool = False,
        ahead: list[Ahead] | None = None,
    ) -> None:
        super().__init__(run, now, lease_until)
        self._conn = conn
        #: The app's handlers and policies, for retrying a step whose lease or time ran out.
        self.registry = registry
        self.defer = defer
        locking = self.run_id if alone else None
        self._batch = sql.Batch(conn, locking=locking) if defer and batch else None
        self.ahead = ahead or []

    @property
    def alone(self) -> bool:
        """Whether the change is one statement, its own transaction, that locks the run
        first: it may not read (see :class:`~.statements.NotAlone`)."""
        return self._batch is not None and self._batch.locking is not None

    def first(self, statement: sql.Prepared, params: RowLike) -> Row | None:
        """The first row of ``statement``, read ahead with the run if it was."""
        return self._sent(statement, params).first()

    def all(self, statement: sql.Prepared, params: RowLike) -> list[Row]:
        """Every row of ``statement``, read ahead with the run if it was."""
        return self._sent(statement, params).all()

    def _sent(self, statement: sql.Prepared, params: RowLike) -> sql.Sent:
        for index, (sent_statement, sent_params, sent) in enumerate(self.ahead):
            if sent_statement is statement and sent_params == params:
                del self.ahead[index]
                return sent
        if self.alone:
            raise sql.NotAlone
        if self._batch is not None:
            self._batch.send()
        return statement.send(self._conn, params)

    def write(self, statement: sql.Prepared, *rows: RowLike) -> None:
        """Execute a write (that may change any number of rows) once per row of parameters."""
        if self._batch is None:
            statement.execute_many(self._conn, rows)
            return
        for params in rows:
            self._batch.add(statement, params)

    def _insert(self, statement: sql.Prepared, row: Row) -> None:
        self.write(statement, row)

    def _write_one(self, statement: sql.Prepared, params: RowLike) -> None:
        """Execute a write that must change exactly one row (else :class:`Conflict`)."""
        if self._batch is not None:
            self._batch.add(statement, params, guarded=True)
        else:
            statement.expect_one(self._conn, params, defer=self.defer)

    def update_step(
        self, step_id: uuid.UUID, expect: Mapping[str, object], **values: object
    ) -> None:
        self._write_one(*sql.update_if(steps, step_id, expect, values))

    def update_approval(
        self, approval_id: uuid.UUID, expect: Mapping[str, object], **values: object
    ) -> None:
        """Update one approval only if it still matches ``expect``; else raise :class:`Conflict`."""
        self._write_one(*sql.update_if(approvals, approval_id, expect, values))

    def wrote(self, run: Row) -> bool:
        """Whether ``run`` is the run as this change's commit wrote it: a retry after a
        dropped connection finds out so whether that commit went through."""
        return (
            bool(self.changes or self.new_events)
            and run["version"] == self.run["version"] + 1
            and run["updated_at"] == self.now
        )

    def commit(self) -> Row:
        """Compare-and-set the run, then append the events."""
        if any(statement.writes for statement, _, _ in self.ahead):
            raise RuntimeError("A write sent ahead of the decision was not decided on.")
        if self.queued:
            if self._batch is not None:
                self._batch.notify = CHANNEL
            else:
                notify(self._conn)
        row = self.run
        if self.changes or self.new_events:
            values = dict(self.changes)
            values["version"] = self.run["version"] + 1
            values["last_event_sequence"] = self.run["last_event_sequence"] + len(self.new_events)
            values["updated_at"] = self.now
            # The events go with the compare-and-set; a lost race rolls both back.
            self._write_one(*sql.update_run_if_version(self.run_id, self.run["version"], values))
            if self.new_events:
                self.write(sql.INSERT_EVENTS, *self.new_events)
            row = {**self.run, **values}
        if self._batch is not None:
            self._batch.flush = self.flushes
            self._batch.send()
        elif not self.flushes and self._conn.dialect.name == "postgresql":
            # Statement by statement (a worker's claim, or no pipeline mode): one more.
            commit_without_waiting(self._conn)
        return row


#: A statement sent ahead of a decision, with its parameters, and its pending result.
Ahead = tuple[sql.Prepared, RowLike, sql.Sent]


def transact(
    ctx: RuntimeContext,
    run_id: uuid.UUID,
    guard: TenantGuard,
    decide: Callable[[Tx], T],
    *,
    known: Row | None = None,
    ahead: Callable[[datetime], Sequence[tuple[sql.Prepared, RowLike]]] | None = None,
    claims: bool = False,
) -> tuple[T | None, Row, Claim | None]:
    """Run ``decide`` on the freshly read run until its compare-and-set wins.

    ``known`` is the run as this process last committed it: the first try
    decides on it without reading the run again, and if the run changed
    since, the compare-and-set fails and the next try reads it. SQLite's
    ``BEGIN IMMEDIATE`` already serialises writers; PostgreSQL still locks
    the run first (without waiting for its row), before any of its steps,
    as every transition does. There, a change on ``known`` that reads
    nothing is one statement, its own transaction (:func:`_alone`).

    If the step a handler held was lost meanwhile, the outcome is ``None``
    and the run is returned as it now is. A transaction whose connection
    dropped is tried again on a fresh one, a bounded number of times; if its
    commit went through after all (only its answer was lost), the next try
    finds the run as that commit wrote it, and returns that change as made.

    The checks of the writes travel with the commit; if one failed, the
    transaction is decided again with each write checked as it goes, which
    tells which one (a lost step or a conflict). A transaction the database
    aborted for a concurrent one (a serialization failure or a deadlock) is
    tried again as a lost compare-and-set is.

    On PostgreSQL, the statements ``ahead`` returns for the transaction's
    time are sent together with the run's lock, after it, so that the
    decision finds their rows (with :meth:`Tx.first`) without waiting for
    them; a write among them must be one the decision reads. On SQLite the
    decision runs them itself, as it needs them. A transaction takes its time
    once it holds the run's lock, so that the run's timeline never goes back
    in time: a try whose statements sent ahead turn out to carry a time
    before the run's last change (it waited for the lock while another call
    changed the run) is decided again, reading the run before it takes its
    time.

    With ``claims`` (the change is expected to claim a step for this call),
    a SQLite transaction begins without waiting for the disk on commit, as
    it may only choose before it begins (see :attr:`RunChange.flushes` and
    :attr:`~flask_scoria.storage.Storage.relaxes_at_begin`); a change that
    turns out to need the disk is decided again with it. PostgreSQL
    chooses in the transaction's last statement.
    """
    dropped = 0
    defer = True
    waited = False
    flush = not (claims and ctx.storage.relaxes_at_begin)
    alone = known is not None and ctx.storage.pipelines
    #: The change of a try whose connection dropped as it committed, and its outcome.
    unsure: tuple[Tx, T] | None = None
    for attempt in range(MAX_ATTEMPTS):
        deciding: list[tuple[Tx, T]] = []
        try:
            if alone and known is not None:
                alone = False
                try:
                    return _alone(ctx, known, decide, deciding)
                except sql.NotAlone:
                    pass  # a transaction, on the same known run
                except BaseException:
                    known = None  # whatever the next try is, it reads the run
                    raise
            with ctx.storage.write(pipeline=True, flush=flush) as conn:
                sent: list[Ahead] = []
                if known is not None:
                    if not ctx.storage.is_sqlite:
                        sql.RUN_BY_ID_FOR_UPDATE.execute(conn, {"b_run_id": run_id}).close()
                    row, known = known, None
                    now = utcnow()
                elif ctx.storage.is_sqlite or ahead is None or waited:
                    row = load_run(conn, run_id, guard, lock=True)
                    now = utcnow()  # once the run's lock is held
                else:
                    now = utcnow()
                    locked = sql.RUN_BY_ID_FOR_UPDATE.send(conn, {"b_run_id": run_id})
                    sent = [(s, p, s.send(conn, p)) for s, p in ahead(now)]
                    row = checked_run(locked.first(), run_id, guard)
                    if row["updated_at"] > now:
                        raise Waited
                if unsure is not None and unsure[0].wrote(row):
                    raise AlreadyWritten(row)
                tx = Tx(
                    conn,
                    row,
                    now,
                    ctx.keeper.expiry(now),
                    ctx.registry,
                    defer=defer,
                    batch=ctx.storage.pipelines,
                    ahead=sent,
                )
                outcome = decide(tx)
                if tx.flushes and not flush:
                    raise MustFlush
                deciding.append((tx, outcome))
                new_row = tx.commit()
        except AlreadyWritten as written:
            assert unsure is not None
            tx, outcome = unsure
            new_row = written.run
        except MustFlush:
            flush = True
            continue
        except Waited:
            waited = True
            continue
        except Conflict:
            back_off(attempt)
            continue
        except StepLost:
            with ctx.storage.read() as conn:
                return None, load_run(conn, run_id, guard, lock=False), None
        except StorageError as exc:
            if defer and sql.unmatched(exc):
                defer = False
                continue
            if sql.lost_race(exc):
                # The database chose this transaction to abort (an isolation level above
                # READ COMMITTED, or a deadlock): like a lost compare-and-set.
                back_off(attempt)
                continue
            dropped += 1
            if not ctx.storage.retry_after(exc, dropped):
                raise
            if deciding:
                unsure = deciding[-1]
            continue
        tx.send(ctx, new_row)
        return outcome, new_row, tx.claim
    raise StorageError(
        f"Run {run_id} kept changing under this call; gave up after {MAX_ATTEMPTS} tries."
    )


def _alone(
    ctx: RuntimeContext, row: Row, decide: Callable[[Tx], T], deciding: list[tuple[Tx, T]]
) -> tuple[T | None, Row, Claim | None]:
    """Decide on ``row`` and write the change as one statement, its own transaction.

    For a change that reads nothing: the outcome of a handler, decided on the
    run as its claim committed it. The statement locks the run before it
    updates anything, as every transaction does. Raises
    :class:`~.statements.NotAlone` before writing anything when the change
    needs a transaction; ``StorageError`` when the statement failed, its
    compare-and-set included. The change about to be written is appended to
    ``deciding``.
    """
    with ctx.storage.autocommit() as conn:
        now = utcnow()
        expiry = ctx.keeper.expiry(now)
        tx = Tx(conn, row, now, expiry, ctx.registry, defer=True, batch=True, alone=True)
        outcome = decide(tx)
        deciding.append((tx, outcome))
        new_row = tx.commit()
    tx.send(ctx, new_row)
    return outcome, new_row, tx.claim


def back_off(attempt: int) -> None:
    """Wait a little before trying a transaction that lost a race again (with jitter)."""
    time.sleep(random.uniform(0, 0.002 * (attempt + 1)))


def load_run(conn: Connection, run_id: uuid.UUID, guard: TenantGuard, *, lock: bool) -> Row:
    """Read one run, as if it did not exist when it belongs to another tenant than ``guard``."""
    query = sql.RUN_BY_ID_FOR_UPDATE if lock else sql.RUN_BY_ID
    return checked_run(query.first(conn, {"b_run_id": run_id}), run_id, guard)


def checked_run(row: Row | None, run_id: uuid.UUID, guard: TenantGuard) -> Row:
    """``row``, unless it is missing or belongs to another tenant than ``guard``."""
    if row is None or (guard is not UNSET and row["tenant_id"] != guard):
        raise RunNotFound(str(run_id))
    return row
