"""Creating runs: ``start_run`` and ``start_handoff_run``."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping
from datetime import datetime
from functools import partial
from typing import Any

from blinker import NamedSignal

from .. import _sql, signals
from .._ids import uuid7
from ..errors import InvalidHandoff
from ..execution import Handlers, LeaseKeeper, log
from ..handoff import require_name, validate_handoff
from ..identity import Identity
from ..identity import identity as normalize_identity
from ..readback import RunSummary, summary_from_row
from ..storage import Storage
from .arguments import initial_step_spec, role_name, run_metadata
from .steps import drive, handoff_payload, handoff_result, handoff_rows, new_step_row
from .transaction import Claim, Timeline, context, send, utcnow


def new_run_row(
    ident: Identity, root_role_id: str, metadata: dict[str, Any], now: datetime
) -> dict[str, Any]:
    return {
        "id": uuid7(),
        "session_id": ident.session_id,
        "actor_id": ident.actor_id,
        "tenant_id": ident.tenant_id,
        "root_role_id": root_role_id,
        "status": "running",
        "version": 1,
        "last_event_sequence": 0,
        "last_step_sequence": 0,
        "current_step_id": None,
        "metadata": metadata,
        "created_at": now,
        "started_at": now,
        "completed_at": None,
        "updated_at": now,
    }


class NewRun(Timeline):
    """Collects the rows of a run being created, inserted in one transaction."""

    def __init__(self, row: dict[str, Any], now: datetime, keeper: LeaseKeeper) -> None:
        self.row = row
        self.now = now
        self.keeper = keeper
        self.steps: list[dict[str, Any]] = []
        self.handoffs: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.claim: Claim | None = None

    def _timeline(self) -> tuple[uuid.UUID, int, list[dict[str, Any]]]:
        return self.row["id"], 0, self.events

    def add_step(self, step: dict[str, Any], handlers: Handlers) -> None:
        """Add a queued step, claimed at once when its handler is known."""
        self.steps.append(step)
        self.row["last_step_sequence"] = max(self.row["last_step_sequence"], step["sequence"])
        self.row["current_step_id"] = step["id"]
        handler = handlers.get(step["kind"])
        if handler is None:
            log.info(
                "Step %s of run %s stays queued: no handler for kind %r is known;"
                " dispatch() or 'flask scoria worker' runs it once one is registered.",
                step["id"],
                self.row["id"],
                step["kind"],
            )
        if handler is None or self.claim is not None:
            return
        token = secrets.token_hex(16)
        step.update(
            status="running",
            lease_token=token,
            lease_expires_at=self.keeper.expiry(self.now),
            started_at=self.now,
        )
        self.event("step_started", step["id"], {"attempt": 1})
        self.claim = Claim(step, token, handler, None)

    def insert(self, storage: Storage) -> None:
        self.row["last_event_sequence"] = len(self.events)
        with storage.write() as conn, _sql.pipeline(conn):
            _sql.INSERT_RUN.execute_many(conn, [self.row])
            if self.steps:
                _sql.INSERT_STEP.execute_many(conn, self.steps)
            if self.handoffs:
                _sql.INSERT_HANDOFF.execute_many(conn, self.handoffs)
            _sql.INSERT_EVENTS.execute_many(conn, self.events)


def start_run(
    identity: Any,
    *,
    root_role_id: str = "executor",
    initial_step: Mapping[str, Any] | None = None,
    runtime: Mapping[str, Any] | None = None,
    handlers: Mapping[str, Any] | None = None,
) -> RunSummary:
    """Start a new run for ``identity`` and return its summary.

    With ``initial_step`` the run gets one queued step, executed at once when
    a handler for its kind is known. Without it the run has no work and is
    ``completed`` at once. ``runtime={"metadata": {...}}`` is stored on the
    run. Raises :class:`InvalidIdentity` or :class:`InvalidRunOptions`.
    """
    ident = normalize_identity(identity)
    role = role_name(root_role_id, "root_role_id")
    step_spec = initial_step_spec(initial_step, role)
    metadata = run_metadata(runtime, ident)
    ctx = context()
    resolver = Handlers(handlers, ctx.registry)
    now = utcnow()
    new = NewRun(new_run_row(ident, role, metadata, now), now, ctx.keeper)
    new.event("run_started")
    if step_spec is None:
        new.row.update(status="completed", completed_at=now)
        new.event("run_completed")
    else:
        new.add_step(new_step_row(new.row["id"], **step_spec), resolver)
    new.insert(ctx.storage)
    pending: list[tuple[NamedSignal, dict[str, Any]]] = [(signals.run_started, {})]
    if step_spec is None:
        pending.append((signals.run_completed, {}))
    send(ctx.app, pending, new.row)
    return summary_from_row(drive(ctx, resolver, new.claim, new.row))


def start_handoff_run(
    identity: Any,
    delegated_role_id: str,
    *,
    root_role_id: str,
    delegated_kind: str,
    handoff_input: Mapping[str, Any],
    projected_context: Mapping[str, Any],
    capability_tags: Any = (),
    handlers: Mapping[str, Any] | None = None,
    runtime: Mapping[str, Any] | None = None,
) -> RunSummary:
    """Start a run whose root ``handoff`` step delegates to a queued child step.

    Everything is validated before anything is written; a rejected call raises
    :class:`InvalidHandoff` with a ``code`` naming the rule. With a handler for
    ``delegated_kind`` the child runs at once; otherwise it stays ``queued``
    until :func:`dispatch`.
    """
    ident = normalize_identity(identity)
    role = require_name(
        root_role_id, "root_role_id", error=partial(InvalidHandoff, "invalid_root_role_id")
    )
    ctx = context()
    spec = validate_handoff(
        delegated_role_id=delegated_role_id,
        delegated_kind=delegated_kind,
        handoff_input=handoff_input,
        projected_context=projected_context,
        capability_tags=capability_tags,
        max_bytes=ctx.handoff_max_bytes,
        max_depth=ctx.handoff_max_depth,
    )
    metadata = run_metadata(runtime, ident)
    resolver = Handlers(handlers, ctx.registry)
    now = utcnow()
    new = NewRun(new_run_row(ident, role, metadata, now), now, ctx.keeper)
    run_id = new.row["id"]
    root = new_step_row(run_id, sequence=1, kind="handoff", role_id=role)
    new.event("run_started")
    child, handoff = handoff_rows(run_id, root["id"], spec, sequence=2, now=now)
    root.update(
        status="completed",
        started_at=now,
        completed_at=now,
        result_envelope=handoff_result(handoff, spec),
    )
    new.steps.append(root)
    new.event("step_completed", root["id"])
    new.handoffs.append(handoff)
    new.event("handoff_created", root["id"], handoff_payload(handoff))
    new.add_step(child, resolver)
    new.insert(ctx.storage)
    send(
        ctx.app,
        [
            (signals.run_started, {}),
            (signals.handoff_created, {"handoff": handoff_payload(handoff)}),
        ],
        new.row,
    )
    return summary_from_row(drive(ctx, resolver, new.claim, new.row))
