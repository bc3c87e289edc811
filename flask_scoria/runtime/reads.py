"""Reading runs back: one run, lists of runs newest first, pending approvals.

Every list is one keyset query that fetches one row more than it shows, so
its cost does not grow with the table. Reads of a run, and the lists that
ask to (``notice``), record the expired leases and approvals they find.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Literal, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    Table,
    bindparam,
    exists,
    false,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY

from .._ids import parse_uuid
from .._json import is_storable_text
from .._types import UUIDType
from ..errors import InvalidRunOptions, RunNotFound, StorageError, short_repr
from ..identity import normalize_id
from ..readback import Approval, DelegatedHandoff, Event, RunDetail, RunSummary, Step
from ..statuses import ApprovalStatus, RunStatus
from . import statements as sql
from .arguments import LARGEST_INT, UNSET, TenantGuard, int_in_range, run_uuid, tenant_guard
from .context import RuntimeContext, context
from .handlers import HandlerRegistry
from .rows import (
    approval_from_row,
    delegated_handoff_from_row,
    delegated_handoffs_query,
    evidence_order,
    latest_approvals,
    latest_rows,
    load_detail,
    split_prefixed,
    summary_from_row,
    window_events,
    window_steps,
)
from .steps import notice_expiry, stale_condition, stale_step
from .tables import Row, RowLike, approvals, events, handoffs, runs, steps
from .transaction import load_run, transact, utcnow

log = logging.getLogger("flask_scoria")

T = TypeVar("T")

#: Rows on one page of a list, unless the caller asks for another number.
PAGE_SIZE = 50
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR = re.compile(r"(\d{1,20})\.([0-9a-f]{32})")
# Inline, so that the planner matches the partial index of pending approvals
# even with a generic plan.
_PENDING: ColumnElement[str] = literal_column(f"'{ApprovalStatus.PENDING}'")
_BUT_METADATA = tuple(column for column in runs.c if column.key != "metadata")
#: A run's columns with its metadata left out (read as ``None``), for what does not show it.
_WITHOUT_METADATA = (*_BUT_METADATA, null().label("metadata"))
#: The columns of a run with only the prompt of its metadata, read by the database.
_WITH_PROMPT = (*_BUT_METADATA, runs.c.metadata[("payload", "prompt")].label("prompt"))


@dataclass(frozen=True)
class Cursor:
    """Where a page ends: the creation time and id of its last row."""

    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        """The opaque ``?after=`` value of this position."""
        micros = (self.created_at - _EPOCH) // timedelta(microseconds=1)
        return f"{micros}.{self.id.hex}"

    @classmethod
    def decode(cls, text: str) -> Cursor | None:
        """The position ``encode`` wrote, or ``None`` for anything else."""
        match = _CURSOR.fullmatch(text)
        parsed = parse_uuid(match.group(2)) if match else None
        if match is None or parsed is None:
            return None
        try:
            return cls(_EPOCH + timedelta(microseconds=int(match.group(1))), parsed)
        except OverflowError:
            return None


@dataclass(frozen=True)
class Page(Generic[T]):
    """Rows of one page, and the cursor of the next page if there is one."""

    rows: Sequence[T]
    next_cursor: str | None


@dataclass(frozen=True)
class RunFilters:
    """Exact-match filters of a list of runs; ``None`` matches anything.

    ``awaiting_resume`` keeps only runs whose approval was granted and that
    wait for ``resume_run``.
    """

    status: str | None = None
    session_id: str | None = None
    actor_id: str | None = None
    root_role_id: str | None = None
    awaiting_resume: bool = False
    #: The start of a run id in hex (dashes left out), read as a range of the primary key.
    run_id_prefix: str | None = None
    #: Created at or after this moment.
    created_from: datetime | None = None
    #: Created before this moment.
    created_until: datetime | None = None
    #: Text the run's ``metadata["payload"]["prompt"]`` contains, ignoring case; searched in
    #: the newest :data:`PROMPT_SCAN` runs that match the other filters, not in all.
    prompt_contains: str | None = None


@dataclass(frozen=True)
class PendingApproval:
    """An approval waiting for a decision, with the run it pauses."""

    approval: Approval
    run: RunSummary


def _read_run(
    ctx: RuntimeContext, key: uuid.UUID, guard: TenantGuard, *, metadata: bool = True
) -> Row:
    """Read a run (without its metadata if not ``metadata``), first failing it if a step's
    lease or its approval expired."""
    with ctx.storage.read() as conn:
        if metadata:
            row = load_run(conn, key, guard, lock=False)
        else:
            found = conn.execute(select(*_WITHOUT_METADATA).where(runs.c.id == key)).first()
            if found is None or (guard is not UNSET and found.tenant_id != guard):
                raise RunNotFound(str(key))
            row = dict(found._mapping)
        now = utcnow()
        if row["status"] == RunStatus.RUNNING:
            running = sql.RUNNING_STEPS_OF_RUN.all(conn, {"b_run_id": key})
            stale = stale_step(running, now, ctx.registry) is not None
        elif row["status"] == RunStatus.WAITING_FOR_APPROVAL:
            expired = sql.EXPIRED_APPROVAL_OF_RUN.first(conn, {"b_run_id": key, "b_now": now})
            stale = expired is not None
        else:
            stale = False
    if stale:
        _, row, _ = transact(ctx, key, guard, notice_expiry)
    return row


def get_run(run_id: str, *, tenant_id: object = UNSET, identity: object = None) -> RunSummary:
    """The current summary of one exact run; :class:`RunNotFound` if none is visible.

    A lease or approval of the run found expired is recorded first (the step
    retried or failed, as :func:`dispatch` would), so the summary is never stale.
    """
    ctx = context()
    return summary_from_row(_read_run(ctx, run_uuid(run_id), tenant_guard(tenant_id, identity)))


def run_status(run_id: str, *, tenant_id: object = UNSET) -> RunSummary:
    """:func:`get_run` with the run's metadata left out (``{}``), for status polls."""
    ctx = context()
    key = run_uuid(run_id)
    return summary_from_row(_read_run(ctx, key, tenant_guard(tenant_id, None), metadata=False))


def get_run_detail(run_id: str, *, tenant_id: object = UNSET, identity: object = None) -> RunDetail:
    """One run with its steps, timeline, approvals, handoffs and ``delegated_handoffs``."""
    ctx = context()
    key = run_uuid(run_id)
    guard = tenant_guard(tenant_id, identity)
    _read_run(ctx, key, guard)
    with ctx.storage.snapshot() as conn:
        return load_detail(conn, load_run(conn, key, guard, lock=False))


#: How many steps, events, approvals and handoffs a run window shows by default.
WINDOW = 50


@dataclass(frozen=True)
class RunWindow:
    """One run with the latest part of each of its lists, and how long each list is.

    ``steps`` and ``events`` are the latest ``limit`` before the asked
    sequence, oldest first; ``older_steps`` / ``older_events`` are the
    ``before`` sequence of the next older part, ``None`` at the start.
    ``delegated_handoffs`` is one keyset page (``older_handoffs`` its cursor).
    """

    summary: RunSummary
    steps: Sequence[Step]
    step_count: int
    older_steps: int | None
    events: Sequence[Event]
    event_count: int
    older_events: int | None
    approvals: Sequence[Approval]
    approval_count: int
    delegated_handoffs: Sequence[DelegatedHandoff]
    handoff_count: int
    older_handoffs: str | None


def get_run_window(
    run_id: str,
    *,
    tenant_id: object = UNSET,
    identity: object = None,
    limit: int = WINDOW,
    handoff_limit: int | None = None,
    steps_before: int | None = None,
    events_before: int | None = None,
    handoffs_after: Cursor | str | None = None,
) -> RunWindow:
    """One run with a bounded part of its steps, timeline, approvals and handoffs.

    Its cost does not grow with the run: a fixed number of queries, each
    reading at most ``limit`` rows (``handoff_limit`` handoffs, default
    ``limit``), plus two counts and the first step's number. ``handoffs_after`` is a window's
    ``older_handoffs``, for the next page of handoffs.
    """
    if handoffs_after is not None and not isinstance(handoffs_after, Cursor):
        decoded = Cursor.decode(handoffs_after) if isinstance(handoffs_after, str) else None
        if decoded is None:
            raise InvalidRunOptions(
                "handoffs_after must be a window's older_handoffs,"
                f" not {short_repr(handoffs_after)}."
            )
        handoffs_after = decoded
    int_in_range(limit, "limit", 500)
    handoff_limit = int_in_range(handoff_limit or limit, "handoff_limit", 500)
    for name, value in (("steps_before", steps_before), ("events_before", events_before)):
        if value is not None:
            int_in_range(value, name, LARGEST_INT)
    ctx = context()
    key = run_uuid(run_id)
    guard = tenant_guard(tenant_id, identity)
    _read_run(ctx, key, guard)
    with ctx.storage.snapshot() as conn:
        row = load_run(conn, key, guard, lock=False)
        step_rows = latest_rows(conn, steps, key, limit, steps_before)
        event_rows = latest_rows(conn, events, key, limit, events_before)
        approval_list = latest_approvals(conn, key, limit)
        order = (handoffs.c.created_at, handoffs.c.id)
        chosen = _keyset(
            select(handoffs.c.id).where(handoffs.c.run_id == key),
            order,
            handoffs_after,
            handoff_limit,
        )
        evidence = _page(
            delegated_handoffs_query(key, chosen),
            order,
            handoffs_after,
            handoff_limit,
            _evidence_page_row,
            conn,
        )
        approval_count = _count_of_run(conn, approvals, key)
        handoff_count = _count_of_run(conn, handoffs, key)
        # A run's steps are numbered on from its first, which may be past 1.
        first_step = conn.execute(
            select(func.min(steps.c.sequence)).where(steps.c.run_id == key)
        ).scalar()
    return RunWindow(
        summary=summary_from_row(row),
        steps=window_steps(step_rows, approval_list),
        step_count=0 if first_step is None else row["last_step_sequence"] - first_step + 1,
        older_steps=_older(step_rows, limit, first_step or 1),
        events=window_events(event_rows),
        event_count=row["last_event_sequence"],
        older_events=_older(event_rows, limit, 1),
        approvals=approval_list,
        approval_count=approval_count,
        delegated_handoffs=sorted(evidence.rows, key=evidence_order),
        handoff_count=handoff_count,
        older_handoffs=evidence.next_cursor,
    )


def _older(rows: Sequence[RowLike], limit: int, first: int) -> int | None:
    """The ``before`` of the part older than newest-first ``rows`` (numbered from
    ``first``), if there is one."""
    if len(rows) < limit or rows[-1]["sequence"] <= first:
        return None
    oldest: int = rows[-1]["sequence"]
    return oldest


def _count_of_run(conn: Connection, table: Table, run_id: uuid.UUID) -> int:
    query = select(func.count()).select_from(table).where(table.c.run_id == run_id)
    count: int = conn.execute(query).scalar_one()
    return count


def _evidence_page_row(row: Row) -> tuple[DelegatedHandoff, Cursor]:
    return delegated_handoff_from_row(row), Cursor(row["created_at"], row["id"])


def list_runs(
    filters: RunFilters = RunFilters(),
    *,
    tenant: TenantGuard = UNSET,
    after: Cursor | None = None,
    limit: int = PAGE_SIZE,
    metadata: bool | Literal["prompt"] = True,
    notice: bool = False,
) -> Page[RunSummary]:
    """Runs matching ``filters`` (of ``tenant``, unless :data:`UNSET`), newest first.

    The page starts after ``after``; ties in creation time are broken by
    ``run_id``, descending. Without ``metadata`` the runs' metadata is not
    read (each summary's is ``{}``); with ``"prompt"`` only its
    ``payload.prompt`` is (what a prompt search compares). A filter no run
    can match, such as text with a NUL character, gives an empty page. With ``notice`` the expired
    leases and approvals of the runs found are recorded, as reading each run
    would record them: a run that no longer matches the status filter leaves
    the page, and one whose recording fails is listed as it was found.
    """
    if metadata == "prompt":
        query, project = select(*_WITH_PROMPT), _prompt_page_row
    else:
        query, project = select(runs) if metadata else select(*_WITHOUT_METADATA), _run_page_row
    # Runs whose ids start with this many digits were created within a minute or so:
    # found by their key, every other filter checked on each, not by the other indexes.
    digits = _id_digits(filters.run_id_prefix)
    by_key = digits is not None and len(digits) >= KEY_PREFIX_DIGITS

    def matches(column: ColumnElement[Any], value: object) -> ColumnElement[bool]:
        return (sql.unindexed(column) if by_key else column) == value

    if tenant is not UNSET:
        query = query.where(matches(runs.c.tenant_id, tenant))
    named = (
        (runs.c.session_id, filters.session_id),
        (runs.c.actor_id, filters.actor_id),
        (runs.c.root_role_id, filters.root_role_id),
    )
    for value in (filters.status, *(value for _, value in named)):
        if value is not None and not is_storable_text(value):
            return Page([], None)
    for column, value in named:
        if value is not None:
            query = query.where(matches(column, value))
    # A session's or an actor's runs are found by their index, their status checked on
    # each: the index of runs by status would hold the tenant's many others.
    by_status = filters.session_id is None and filters.actor_id is None and not by_key
    if filters.status is not None:
        query = query.where(*_status_is(filters.status, by_status))
    query = _searched(query, filters, digits)
    if filters.awaiting_resume:
        pending = exists().where(approvals.c.run_id == runs.c.id, approvals.c.status == _PENDING)
        query = query.where(*_status_is(RunStatus.WAITING_FOR_APPROVAL, by_status), ~pending)
    found = _page(query, (runs.c.created_at, runs.c.id), after, limit, project)
    if not notice:
        return found
    status = RunStatus.WAITING_FOR_APPROVAL if filters.awaiting_resume else filters.status
    noticed = _noticed(found.rows, tenant, bool(metadata))
    return Page([run for run in noticed if status in (None, run.status)], found.next_cursor)


def _noticed(rows: Sequence[RunSummary], guard: TenantGuard, metadata: bool) -> list[RunSummary]:
    """``rows``, each open run whose lease or approval expired brought up to date.

    A database that refuses the write (read-only, locked) is tried once: the rest of
    the page is listed as found, and the error logged.
    """
    ctx = context()
    stale = _with_expiries(ctx, [uuid.UUID(run.run_id) for run in rows if not run.status.finished])
    noticed = []
    for run in rows:
        key = uuid.UUID(run.run_id)
        if key in stale:
            try:
                run = summary_from_row(transact(ctx, key, guard, notice_expiry)[1])
            except RunNotFound:  # pruned since it was listed
                pass
            except StorageError as exc:
                log.warning("Could not record the expiries of listed run %s: %s", key, exc)
                stale = set()
            run = run if metadata else replace(run, metadata={})
        noticed.append(run)
    return noticed


def _status_is(status: str, by_index: bool = True) -> list[ColumnElement[bool]]:
    """Runs with ``status``: on PostgreSQL, a walk of the index of runs not completed.

    That index leaves completed runs out; saying so in the query, with the
    value written out, lets the planner use it even for a prepared statement.
    Without ``by_index``, the status is checked on the runs another index finds.
    """
    if not by_index:
        return [sql.unindexed(runs.c.status) == status]
    condition = [runs.c.status == status]
    if status != RunStatus.COMPLETED:
        condition.append(runs.c.status != literal_column(f"'{RunStatus.COMPLETED}'"))
    return condition


#: How many of the newest matching runs a prompt search reads.
PROMPT_SCAN = 2000
#: A run id prefix with this many hex digits (32 bits of a UUIDv7's milliseconds) names
#: the runs created within about a minute: few enough to find by the key, then sort.
KEY_PREFIX_DIGITS = 8
_HEX = re.compile(r"[0-9a-f]{1,32}")


def _id_digits(prefix: str | None) -> str | None:
    """A run id prefix as the digits it gives, without dashes, in lower case."""
    return None if prefix is None else prefix.replace("-", "").lower()


def _searched(query: Select[Any], filters: RunFilters, digits: str | None) -> Select[Any]:
    """``query`` narrowed by the runs list's search fields, ``digits`` those of the run id
    prefix (:func:`_id_digits`).

    A prompt search reads first where the newest :data:`PROMPT_SCAN` runs that
    ``query`` matches begin, and searches the runs created since.
    """
    if digits is not None:
        if not _HEX.fullmatch(digits):
            return query.where(false())
        low = uuid.UUID(digits.ljust(32, "0"))
        high = uuid.UUID(digits.ljust(32, "f"))
        query = query.where(runs.c.id >= low, runs.c.id <= high)
    if filters.created_from is not None:
        query = query.where(runs.c.created_at >= filters.created_from)
    if filters.created_until is not None:
        query = query.where(runs.c.created_at < filters.created_until)
    text = filters.prompt_contains
    if text is not None:
        if not is_storable_text(text):
            return query.where(false())
        newest = (
            query.with_only_columns(runs.c.created_at)
            .order_by(runs.c.created_at.desc(), runs.c.id.desc())
            .limit(PROMPT_SCAN)
            .subquery()
        )
        # Read first, so that the plan of the search knows where the walk of the runs in
        # order stops: a search that matches nothing reads the newest, not all of them.
        with context().storage.read() as conn:
            oldest = conn.execute(select(func.min(newest.c.created_at))).scalar()
        if oldest is None:
            return query.where(false())
        prompt = func.lower(runs.c.metadata["payload"]["prompt"].as_string())
        query = query.where(
            runs.c.created_at >= oldest, prompt.contains(text.lower(), autoescape=True)
        )
    return query


def list_runs_for_session(
    session_id: str | None,
    *,
    limit: int = 50,
    before: str | None = None,
    tenant_id: object = UNSET,
    identity: object = None,
) -> list[RunSummary]:
    """The runs of one host session, newest first, ``limit`` (1 to 500) at most.

    ``before`` is the ``run_id`` of the last run of the previous page; one that
    names no run visible to the guard raises :class:`RunNotFound`.
    """
    session = normalize_id(session_id, "session_id")
    int_in_range(limit, "limit", 500)
    guard = tenant_guard(tenant_id, identity)
    ctx = context()
    if session is None:
        return []
    after = None
    if before is not None:
        with ctx.storage.read() as conn:
            last = load_run(conn, run_uuid(before), guard, lock=False)
        after = Cursor(last["created_at"], last["id"])
    found = list_runs(
        RunFilters(session_id=session), tenant=guard, after=after, limit=limit, notice=True
    )
    return list(found.rows)


def pending_approvals(
    tenant_id: str, after: Cursor | None = None, limit: int = PAGE_SIZE
) -> Page[PendingApproval]:
    """The tenant's undecided approvals, newest request first (the runs without metadata)."""
    approval_columns = [column.label(f"a_{column.name}") for column in approvals.c]
    query = (
        select(*_WITHOUT_METADATA, *approval_columns)
        .select_from(approvals)
        .join(runs, runs.c.id == approvals.c.run_id)
        .where(*_decidable(tenant_id))
    )
    return _page(query, (approvals.c.requested_at, approvals.c.id), after, limit, _pending_page_row)


def count_pending_approvals(tenant_id: str, *, up_to: int) -> int:
    """How many of the tenant's approvals wait for a decision, counting at most ``up_to``."""
    # In the inbox's order, so that its index, which holds pending approvals only, is
    # walked from the newest: a planner that expects many matches would otherwise scan
    # the table, hoping to reach the limit early, and read all of it for a tenant with few.
    waiting = (
        select(approvals.c.id)
        .where(*_decidable(tenant_id))
        .order_by(approvals.c.requested_at.desc(), approvals.c.id.desc())
        .limit(up_to)
        .subquery()
    )
    with context().storage.read() as conn:
        return conn.execute(select(func.count()).select_from(waiting)).scalar_one()


def get_approval(
    run_id: str, approval_id: str, *, tenant_id: object = UNSET, identity: object = None
) -> Approval | None:
    """One approval of one run, or ``None`` if the run has no such approval."""
    key = run_uuid(run_id)
    guard = tenant_guard(tenant_id, identity)
    approval_key = parse_uuid(approval_id)
    with context().storage.read() as conn:
        load_run(conn, key, guard, lock=False)
        if approval_key is None:
            return None
        row = sql.APPROVAL_OF_RUN.first(conn, {"b_run_id": key, "b_approval_id": approval_key})
    return None if row is None else approval_from_row(row)


@dataclass(frozen=True)
class StepHead:
    """What an operator's form needs of a step: its kind, attempt, and the ``type`` of
    its error, if it failed with one."""

    kind: str
    attempt: int
    error_type: str | None = None


def step_head(run_id: str, step_id: str | None) -> StepHead | None:
    """The kind, attempt and error type of one step of a run whose tenant the caller
    already checked."""
    run_key, step_key = parse_uuid(run_id), parse_uuid(step_id)
    if run_key is None or step_key is None:
        return None
    error_type = steps.c.error_envelope["type"].as_string().label("error_type")
    with context().storage.read() as conn:
        row = conn.execute(
            select(steps.c.kind, steps.c.attempt, error_type).where(
                steps.c.run_id == run_key, steps.c.id == step_key
            )
        ).first()
    return None if row is None else StepHead(row.kind, row.attempt, row.error_type)


def _run_page_row(row: Row) -> tuple[RunSummary, Cursor]:
    return summary_from_row(row), Cursor(row["created_at"], row["id"])


def _prompt_page_row(row: Row) -> tuple[RunSummary, Cursor]:
    prompt = row.pop("prompt")
    row["metadata"] = {} if prompt is None else {"payload": {"prompt": prompt}}
    return _run_page_row(row)


def _pending_page_row(row: Row) -> tuple[PendingApproval, Cursor]:
    entry = PendingApproval(approval_from_row(split_prefixed(row, "a_")), summary_from_row(row))
    return entry, Cursor(row["a_requested_at"], row["a_id"])


def _page(
    query: Select[Any],
    order: tuple[ColumnElement[Any], ColumnElement[Any]],
    after: Cursor | None,
    limit: int,
    project: Callable[[Row], tuple[T, Cursor]],
    conn: Connection | None = None,
) -> Page[T]:
    query = _keyset(query, order, after, limit)
    if conn is None:
        with context().storage.read() as own:
            projected = [project(dict(row)) for row in own.execute(query).mappings()]
    else:
        projected = [project(dict(row)) for row in conn.execute(query).mappings()]
    shown = projected[:limit]
    more = len(projected) > limit
    return Page([item for item, _ in shown], shown[-1][1].encode() if more else None)


def _keyset(
    query: Select[Any],
    order: tuple[ColumnElement[Any], ColumnElement[Any]],
    after: Cursor | None,
    limit: int,
) -> Select[Any]:
    """``query``'s page after ``after`` in descending ``order``, with one row more."""
    if after is not None:
        position = tuple_(
            literal(after.created_at, order[0].type), literal(after.id, order[1].type)
        )
        query = query.where(tuple_(*order) < position)
    return query.order_by(order[0].desc(), order[1].desc()).limit(limit + 1)


def _stale_steps(now: datetime, registry: HandlerRegistry) -> Select[Any]:
    """The runs with a running step past its lease or its kind's timeout at ``now``."""
    return select(steps.c.run_id).where(stale_condition(now, registry))


def _decidable(tenant_id: str) -> list[ColumnElement[bool]]:
    """The tenant's approvals still open to a decision: pending, and not past their expiry
    (which the next read of their run records)."""
    return [
        approvals.c.tenant_id == tenant_id,
        approvals.c.status == _PENDING,
        or_(approvals.c.expires_at.is_(None), approvals.c.expires_at >= utcnow()),
    ]


def _expired_approvals(now: datetime) -> Select[Any]:
    """The runs with a pending approval that expired before ``now``."""
    return select(approvals.c.run_id).where(
        approvals.c.status == _PENDING,
        approvals.c.expires_at.is_not(None),
        approvals.c.expires_at < now,
    )


def _with_expiries(ctx: RuntimeContext, run_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of ``run_ids`` have a lease or an approval that expired."""
    if not run_ids:
        return set()
    now = utcnow()
    leases = _stale_steps(now, ctx.registry).where(_among(ctx, steps.c.run_id, run_ids))
    decisions = _expired_approvals(now).where(_among(ctx, approvals.c.run_id, run_ids))
    with ctx.storage.read() as conn:
        return set(conn.execute(leases.union(decisions)).scalars())


def runs_awaiting_resume(run_ids: Sequence[str], *, tenant: TenantGuard = UNSET) -> frozenset[str]:
    """Which of ``run_ids`` (of ``tenant``, unless :data:`UNSET`) were approved and wait
    for ``resume_run``."""
    if not run_ids:
        return frozenset()
    ctx = context()
    # Each run is looked up by its key, its approvals by their run: neither the status
    # nor the tenant is a condition an index could serve (all the tenant's waiting runs),
    # and the approvals' status is a parameter, which no partial index of pending
    # approvals matches.
    pending = exists().where(
        approvals.c.run_id == runs.c.id, approvals.c.status == ApprovalStatus.PENDING
    )
    query = select(runs.c.id).where(
        _among(ctx, runs.c.id, [uuid.UUID(run_id) for run_id in run_ids]),
        sql.unindexed(runs.c.status) == RunStatus.WAITING_FOR_APPROVAL,
        ~pending,
    )
    if tenant is not UNSET:
        query = query.where(sql.unindexed(runs.c.tenant_id) == tenant)
    with ctx.storage.read() as conn:
        return frozenset(str(key) for key in conn.execute(query).scalars())


def _among(
    ctx: RuntimeContext, column: ColumnElement[Any], run_ids: list[uuid.UUID]
) -> ColumnElement[bool]:
    """``column`` is one of ``run_ids``.

    On PostgreSQL one array, not a placeholder per id: the statement's text
    stays the same, so that its parse is cached whatever the page's length.
    """
    if ctx.storage.is_sqlite:
        return column.in_(run_ids)
    return column == func.any(bindparam("b_run_ids", run_ids, type_=ARRAY(UUIDType())))


def recover_expired_leases() -> list[str]:
    """Retry or fail every running step past its lease or timeout, and fail every run whose
    approval expired; return the ids of those runs."""
    ctx = context()
    now = utcnow()
    with ctx.storage.read() as conn:
        run_ids = sorted(
            set(
                conn.execute(
                    _stale_steps(now, ctx.registry).union(_expired_approvals(now))
                ).scalars()
            )
        )
    recovered = []
    for key in run_ids:
        try:
            expired, _, _ = transact(ctx, key, UNSET, notice_expiry)
        except RunNotFound:
            continue  # deleted since it was read
        if expired:
            recovered.append(str(key))
    return recovered
