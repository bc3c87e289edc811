"""Transactions on one run: read it, decide, compare-and-set its version.

Every change to a run is one short transaction that ends in a compare-and-set
on the run's ``version``; steps, approvals, handoffs and events change only
inside such a transaction, so a lost race is noticed and retried.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from blinker import NamedSignal
from flask import Flask
from sqlalchemy import Connection

from .. import _sql
from ..errors import RunNotFound, StorageError
from ..execution import Handler, LeaseKeeper
from ..readback import Approval, summary_from_row
from ..storage import Storage

T = TypeVar("T")

MAX_ATTEMPTS = 50


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class RuntimeContext:
    """What one call needs of the current app's flask-scoria state."""

    app: Flask
    storage: Storage
    registry: Mapping[str, Handler]
    keeper: LeaseKeeper
    handoff_max_bytes: int
    handoff_max_depth: int


def context() -> RuntimeContext:
    from ..extension import runtime_context

    return runtime_context()


class Conflict(Exception):
    """Another transaction changed the run first; read it again."""


class StepLost(Exception):
    """The step was cancelled or its lease expired while its handler ran."""


@dataclass
class Claim:
    step: dict[str, Any]
    token: str
    handler: Handler
    approval: Approval | None


class Timeline:
    """Numbers the events one transaction appends to a run's timeline."""

    now: datetime

    def _timeline(self) -> tuple[uuid.UUID, int, list[dict[str, Any]]]:
        """The run's id, its last event sequence before this transaction, the new events."""
        raise NotImplementedError

    def event(
        self,
        event_type: str,
        step_id: uuid.UUID | None = None,
        payload: dict[str, Any] | None = None,
    ) -> None:
        """Append an event numbered after the run's last one."""
        run_id, last_sequence, appended = self._timeline()
        appended.append(
            {
                "run_id": run_id,
                "sequence": last_sequence + len(appended) + 1,
                "event_type": event_type,
                "step_id": step_id,
                "payload": payload,
                "created_at": self.now,
            }
        )


@dataclass
class Tx(Timeline):
    """The changes one transaction makes to one run, applied by :meth:`commit`."""

    conn: Connection
    run: dict[str, Any]
    now: datetime
    lease_until: datetime
    changes: dict[str, Any] = field(default_factory=dict)
    new_events: list[dict[str, Any]] = field(default_factory=list)
    signals: list[tuple[NamedSignal, dict[str, Any]]] = field(default_factory=list)
    claim: Claim | None = None

    @property
    def run_id(self) -> uuid.UUID:
        return self.run["id"]  # type: ignore[no-any-return]

    def status(self) -> str:
        return self.changes.get("status", self.run["status"])  # type: ignore[no-any-return]

    def set(self, **changes: Any) -> None:
        self.changes.update(changes)

    def _timeline(self) -> tuple[uuid.UUID, int, list[dict[str, Any]]]:
        return self.run_id, self.run["last_event_sequence"], self.new_events

    def signal(self, signal: NamedSignal, **extra: Any) -> None:
        self.signals.append((signal, extra))

    def update_step(self, step_id: uuid.UUID, expect: Mapping[str, Any], **values: Any) -> None:
        """Update one step only if it still matches ``expect``."""
        if not _sql.update_step_if(self.conn, step_id, expect, values):
            raise Conflict

    def finish_step(self, step_id: uuid.UUID, held: Mapping[str, Any], **values: Any) -> None:
        """Record a handler's outcome, unless the step is no longer held by it."""
        try:
            self.update_step(step_id, held, **values)
        except Conflict:
            raise StepLost from None

    def commit(self) -> dict[str, Any]:
        """Compare-and-set the run, then append the events."""
        if not self.changes and not self.new_events:
            return self.run
        values = dict(self.changes)
        values["version"] = self.run["version"] + 1
        values["last_event_sequence"] = self.run["last_event_sequence"] + len(self.new_events)
        values["updated_at"] = self.now
        # The events go with the compare-and-set; a lost race rolls both back.
        with _sql.pipeline(self.conn):
            cursor = _sql.update_run_if_version(self.conn, self.run_id, self.run["version"], values)
            if self.new_events:
                _sql.INSERT_EVENTS.execute_many(self.conn, self.new_events)
        won = cursor.rowcount == 1
        cursor.close()
        if not won:
            raise Conflict
        return {**self.run, **values}


def send(
    app: Flask, pending: list[tuple[NamedSignal, dict[str, Any]]], row: dict[str, Any]
) -> None:
    if not any(signal.receivers for signal, _ in pending):
        return
    summary = summary_from_row(row)
    for signal, extra in pending:
        for receiver in signal.receivers_for(app):
            try:
                receiver(app, run=summary, **extra)
            except Exception:
                # The change is committed: a failing receiver must not look like a failed call.
                app.logger.exception("flask-scoria: a %r signal receiver failed", signal.name)


def utcnow() -> datetime:
    return datetime.now(UTC)


def transact(
    ctx: RuntimeContext,
    run_id: uuid.UUID,
    guard: Any,
    decide: Callable[[Tx], T],
    *,
    known: dict[str, Any] | None = None,
) -> tuple[T, dict[str, Any], Claim | None]:
    """Run ``decide`` on the freshly read run until its compare-and-set wins.

    ``known`` is the run as this process last committed it. On SQLite, whose
    ``BEGIN IMMEDIATE`` already serialises writers, the first try decides on
    it without reading the run again: if the run changed since, the
    compare-and-set fails and the next try reads it. PostgreSQL always reads
    the run first, locking it before any of its steps.
    """
    if not ctx.storage.is_sqlite:
        known = None
    for attempt in range(MAX_ATTEMPTS):
        try:
            with ctx.storage.write() as conn:
                row = known or load_run(conn, run_id, guard, lock=True)
                known = None
                now = utcnow()
                tx = Tx(conn, row, now, ctx.keeper.expiry(now))
                outcome = decide(tx)
                new_row = tx.commit()
        except Conflict:
            time.sleep(random.uniform(0, 0.002 * (attempt + 1)))
            continue
        except StepLost:
            with ctx.storage.read() as conn:
                return None, load_run(conn, run_id, guard, lock=False), None  # type: ignore[return-value]
        send(ctx.app, tx.signals, new_row)
        return outcome, new_row, tx.claim
    raise StorageError(
        f"Run {run_id} kept changing under this call; gave up after {MAX_ATTEMPTS} tries."
    )


def load_run(conn: Connection, run_id: uuid.UUID, guard: Any, *, lock: bool) -> dict[str, Any]:
    query = _sql.RUN_BY_ID_FOR_UPDATE if lock else _sql.RUN_BY_ID
    row = query.first(conn, {"b_run_id": run_id})
    if row is None or (guard is not UNSET and row["tenant_id"] != guard):
        raise RunNotFound(str(run_id))
    return row
