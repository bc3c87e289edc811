"""Tenant-scoped reads behind the list pages, with keyset pagination.

Every query here filters by the operator's tenant. A page is one query that
fetches one row more than it shows, so its cost does not grow with the table.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, Select, literal, literal_column, select, tuple_

from .._ids import parse_uuid
from ..extension import get_extension
from ..models import approvals, runs, steps
from ..readback import Approval, RunSummary, approval_from_row, summary_from_row

T = TypeVar("T")

PAGE_SIZE = 50
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR = re.compile(r"^(\d{1,20})\.([0-9a-f]{32})$")
# Inline, so that the planner matches the partial index of pending approvals
# even with a generic plan.
_PENDING: ColumnElement[str] = literal_column("'pending'")


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
        match = _CURSOR.match(text)
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
    """Exact-match filters of the runs list; ``None`` matches anything."""

    status: str | None = None
    session_id: str | None = None
    actor_id: str | None = None
    root_role_id: str | None = None


@dataclass(frozen=True)
class PendingApproval:
    """An approval waiting for a decision, with the run it pauses."""

    approval: Approval
    run: RunSummary


def list_runs(
    tenant_id: str, filters: RunFilters, after: Cursor | None, limit: int = PAGE_SIZE
) -> Page[RunSummary]:
    """The tenant's runs matching ``filters``, newest first, after ``after``."""
    query = select(runs).where(runs.c.tenant_id == tenant_id)
    for column, value in (
        (runs.c.status, filters.status),
        (runs.c.session_id, filters.session_id),
        (runs.c.actor_id, filters.actor_id),
        (runs.c.root_role_id, filters.root_role_id),
    ):
        if value is not None:
            query = query.where(column == value)
    return _page(query, (runs.c.created_at, runs.c.id), after, limit, _run_page_row)


def pending_approvals(
    tenant_id: str, after: Cursor | None, limit: int = PAGE_SIZE
) -> Page[PendingApproval]:
    """The tenant's undecided approvals, newest request first."""
    approval_columns = [column.label(f"a_{column.name}") for column in approvals.c]
    query = (
        select(runs, *approval_columns)
        .join(approvals, approvals.c.run_id == runs.c.id)
        .where(runs.c.tenant_id == tenant_id, approvals.c.status == _PENDING)
    )
    return _page(query, (approvals.c.requested_at, approvals.c.id), after, limit, _pending_page_row)


def step_kind(run_id: str, step_id: str | None) -> str | None:
    """The kind of one step of a run whose tenant the caller already checked."""
    run_key, step_key = parse_uuid(run_id), parse_uuid(step_id)
    if run_key is None or step_key is None:
        return None
    with get_extension().storage().read() as conn:
        kind: str | None = conn.execute(
            select(steps.c.kind).where(steps.c.run_id == run_key, steps.c.id == step_key)
        ).scalar()
    return kind


def _run_page_row(row: Any) -> tuple[RunSummary, Cursor]:
    return summary_from_row(row), Cursor(row["created_at"], row["id"])


def _pending_page_row(row: Any) -> tuple[PendingApproval, Cursor]:
    approval = approval_from_row(
        {name[2:]: value for name, value in row.items() if name.startswith("a_")}
    )
    entry = PendingApproval(approval, summary_from_row(row))
    return entry, Cursor(row["a_requested_at"], row["a_id"])


def _page(
    query: Select[Any],
    order: tuple[ColumnElement[Any], ColumnElement[Any]],
    after: Cursor | None,
    limit: int,
    project: Callable[[Any], tuple[T, Cursor]],
) -> Page[T]:
    if after is not None:
        position = tuple_(
            literal(after.created_at, order[0].type), literal(after.id, order[1].type)
        )
        query = query.where(tuple_(*order) < position)
    query = query.order_by(order[0].desc(), order[1].desc()).limit(limit + 1)
    with get_extension().storage().read() as conn:
        projected = [project(row) for row in conn.execute(query).mappings()]
    shown = projected[:limit]
    more = len(projected) > limit
    return Page([item for item, _ in shown], shown[-1][1].encode() if more else None)
