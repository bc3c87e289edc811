"""Creating runs: ``start_run`` and ``start_handoff_run``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial

from .. import signals
from .._ids import uuid7
from ..errors import InvalidHandoff, InvalidRunOptions, RunNotFound, StorageError
from ..identity import Identity
from ..identity import identity as normalize_identity
from ..readback import RunSummary
from ..statuses import EventType, RunStatus, StepStatus
from . import statements as sql
from .arguments import idempotency_name, initial_step_spec, require_name, role_name, run_metadata
from .context import RuntimeContext, context
from .handlers import Handler, Handlers
from .handoffs import record_handoff, validate_handoff
from .outcomes import drive
from .rows import summary_from_row
from .steps import claim_step, new_step_row
from .tables import Row
from .transaction import MAX_ATTEMPTS, DuplicateStart, NewRun, utcnow

log = logging.getLogger("flask_scoria")


def _new_run(
    ctx: RuntimeContext,
    ident: Identity,
    root_role_id: str,
    metadata: Row,
    idempotency_key: str | None,
) -> NewRun:
    now = utcnow()
    row = {
        "id": uuid7(),
        "session_id": ident.session_id,
        "actor_id": ident.actor_id,
        "tenant_id": ident.tenant_id,
        "root_role_id": root_role_id,
        "status": RunStatus.RUNNING,
        "version": 1,
        "last_event_sequence": 0,
        "last_step_sequence": 0,
        "current_step_id": None,
        "metadata": metadata,
        "created_at": now,
        "started_at": now,
        "completed_at": None,
        "updated_at": now,
        "idempotency_key": idempotency_key,
    }
    if ident.tenant_id is None and ctx.has_operators:
        log.warning(
            "Run %s starts without a tenant_id, so no operator will see it: the operator"
            " pages show only runs of the operator's tenant. Pass the tenant in the identity.",
            row["id"],
        )
    new = NewRun(row, now, ctx.keeper.expiry(now))
    new.event(EventType.RUN_STARTED)
    new.signal(signals.run_started)
    return new


def _started_before(ctx: RuntimeContext, ident: Identity, key: str | None) -> RunSummary | None:
    """The run an earlier start with the same idempotency key and tenant created, if any."""
    if key is None:
        return None
    with ctx.storage.read() as conn:
        if ident.tenant_id is None:
            row = sql.RUN_BY_UNTENANTED_KEY.first(conn, {"b_key": key})
        else:
            row = sql.RUN_BY_TENANT_KEY.first(conn, {"b_key": key, "b_tenant": ident.tenant_id})
    return None if row is None else summary_from_row(row)


def _launch(ctx: RuntimeContext, new: NewRun, resolver: Handlers, ident: Identity) -> RunSummary:
    """Write the new run, then execute the step it claimed, if any.

    If a start with the same idempotency key won the race, its run is returned
    instead, and nothing of this one is written or executed (unless that run
    was pruned meanwhile: then this one is written after all). A
    :class:`StorageError` after the run was written names it in ``run_id``.
    The run's first commit does not wait for the disk when its step runs
    here (see :attr:`~.transaction.RunChange.flushes`): a crash of the
    database server meanwhile can lose it, which is said as well.
    """
    for _attempt in range(MAX_ATTEMPTS):
        try:
            row = new.insert(ctx.storage)
            break
        except DuplicateStart:
            earlier = _started_before(ctx, ident, new.run["idempotency_key"])
            if earlier is not None:
                return earlier
            # The earlier run ended and was pruned meanwhile: its key is free again.
    else:
        raise StorageError(
            f"Run {new.run_id} could not be written: its idempotency key was taken and freed"
            f" again {MAX_ATTEMPTS} times. Start it again."
        )
    new.send(ctx, row)
    try:
        return summary_from_row(drive(ctx, resolver, new.claim, row))
    except StorageError as exc:
        lost = "" if new.flushes else " (if it finds none, a crash of the database lost it)"
        raise StorageError(
            f"{exc.message} Run {new.run_id} was started before that: find it with"
            f" get_run(run_id) rather than starting another{lost}.",
            run_id=str(new.run_id),
            hint=exc.hint,
        ) from exc
    except RunNotFound as exc:
        raise StorageError(
            f"Run {new.run_id} disappeared while its first step ran: a crash of the database"
            " lost its start before it reached the disk, or it was deleted. Start it again."
        ) from exc


def start_run(
    identity: object,
    *,
    root_role_id: str = "executor",
    initial_step: Mapping[str, object] | None = None,
    runtime: Mapping[str, object] | None = None,
    handlers: Mapping[str, Handler | str] | None = None,
    idempotency_key: str | None = None,
) -> RunSummary:
    """Start a new run for ``identity`` and return its summary.

    With ``initial_step`` the run gets one queued step, executed in this call
    when a handler for its kind is known and its executor is ``inline``
    (per-call ``handlers`` always are); a ``worker`` or ``celery`` executor
    runs it later, the call returning the run ``running``. Without it the run
    has no work and is ``completed`` at once. ``runtime={"metadata": {...}}``
    is stored on the run, with the identity's own metadata, if it has any,
    under the key ``"identity"`` (which ``runtime``'s metadata may then not
    use). With
    ``idempotency_key``, a second start with the same key and tenant returns
    the first run unchanged and runs nothing. Raises :class:`InvalidIdentity`
    or :class:`InvalidRunOptions`.
    """
    ident = normalize_identity(identity)
    role = role_name(root_role_id, "root_role_id")
    ctx = context()
    step_spec = initial_step_spec(initial_step, role, ctx.handoff_max_bytes)
    key = idempotency_name(idempotency_key, InvalidRunOptions)
    metadata = run_metadata(runtime, ident, ctx.max_metadata_bytes)
    resolver = Handlers(handlers, ctx.registry)
    earlier = _started_before(ctx, ident, key)
    if earlier is not None:
        return earlier
    new = _new_run(ctx, ident, role, metadata, key)
    if step_spec is None:
        new.set(status=RunStatus.COMPLETED, completed_at=new.now)
        new.event(EventType.RUN_COMPLETED)
        new.signal(signals.run_completed)
    else:
        step = new_step_row(new.run_id, **step_spec)
        new.add_step(step)
        new.set(current_step_id=step["id"])
        claim_step(new, step, resolver, None)
    return _launch(ctx, new, resolver, ident)


def start_handoff_run(
    identity: object,
    delegated_role_id: str,
    *,
    root_role_id: str,
    delegated_kind: str,
    handoff_input: Mapping[str, object],
    projected_context: Mapping[str, object],
    capability_tags: object = (),
    handlers: Mapping[str, Handler | str] | None = None,
    runtime: Mapping[str, object] | None = None,
    idempotency_key: str | None = None,
) -> RunSummary:
    """Start a run whose root ``handoff`` step delegates to a queued child step.

    Everything is validated before anything is written; a rejected call raises
    :class:`InvalidHandoff` with a ``code`` naming the rule. The child runs as
    :func:`start_run`'s first step does: in this call with an ``inline``
    handler for ``delegated_kind``, later on another executor; without a
    handler it stays ``queued`` until :func:`dispatch`. ``idempotency_key`` and
    ``runtime`` work as for :func:`start_run`.
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
    if ctx.max_steps < 2:
        raise InvalidRunOptions(
            "A handoff run has two steps (its root and the delegated one); SCORIA_MAX_STEPS"
            f" is {ctx.max_steps}."
        )
    metadata = run_metadata(runtime, ident, ctx.max_metadata_bytes)
    key = idempotency_name(idempotency_key, InvalidRunOptions)
    resolver = Handlers(handlers, ctx.registry)
    earlier = _started_before(ctx, ident, key)
    if earlier is not None:
        return earlier
    new = _new_run(ctx, ident, role, metadata, key)
    root = new_step_row(new.run_id, sequence=1, kind="handoff", role_id=role)
    root.update(status=StepStatus.COMPLETED, started_at=new.now, completed_at=new.now)
    new.add_step(root)
    child, result = record_handoff(new, root["id"], spec)
    root["result_envelope"] = result
    new.set(current_step_id=child["id"])
    claim_step(new, child, resolver, None)
    return _launch(ctx, new, resolver, ident)
