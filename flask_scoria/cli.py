"""The ``flask scoria`` command group.

Every command prints a human-readable table by default and JSON with
``--json``. A :class:`~flask_scoria.ScoriaError` ends the command with its
message and code and a non-zero exit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

import click
from alembic.util import CommandError
from flask import current_app
from flask.cli import AppGroup
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from . import schema
from .errors import RunNotFound, ScoriaError
from .readback import RunDetail, RunSummary
from .runtime import (
    UNSET,
    RunFilters,
    TenantGuard,
    approve_run,
    cancel_run,
    dispatch,
    get_run,
    get_run_detail,
    list_runs,
    prune_runs,
    recover_expired_leases,
    reject_run,
    resend_due_celery_steps,
    resume_run,
    run_worker,
    tenant_guard,
)
from .state import app_state
from .statuses import RunStatus, StepStatus
from .verify import LANES, parse_payload, run_lane

F = TypeVar("F", bound=Callable[..., Any])


scoria_cli = AppGroup("scoria", help="Inspect and operate flask-scoria runs.")
db_cli = AppGroup("db", help="Manage the scoria_* tables.")
scoria_cli.add_command(db_cli)

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
approval_option = click.option(
    "--approval",
    "approval_id",
    help="Decide only this approval (its id from 'show'), never a later one.",
)


def _engine() -> Engine:
    return app_state().storage.engine


def scoria_errors(fn: F) -> F:
    """Turn a ``ScoriaError`` (message and code), a database error or a migration's
    error (an unknown revision) into a click error."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ScoriaError as exc:
            raise click.ClickException(f"{exc.message} [{exc.code}]") from None
        except CommandError as exc:
            raise click.ClickException(str(exc)) from None
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise click.ClickException(f"database error: {reason}") from None

    return wrapper  # type: ignore[return-value]


def _named_tenant(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.strip():
        # Read as "no tenant" it would select the runs started without one.
        raise click.BadParameter("is blank; for the runs without a tenant, use --no-tenant.")
    return value


#: ``--tenant``, which never takes a blank value (an unset variable in a script).
tenant_option = click.option(
    "--tenant", "tenant_id", callback=_named_tenant, help="Only runs of this tenant_id."
)
no_tenant_option = click.option("--no-tenant", is_flag=True, help="Only runs without a tenant_id.")


def tenant_filter(tenant_id: str | None, no_tenant: bool) -> TenantGuard:
    """The tenant that ``--tenant`` or ``--no-tenant`` selects; ``UNSET``: any tenant."""
    if no_tenant and tenant_id is not None:
        raise click.UsageError("Give --tenant or --no-tenant, not both.")
    if no_tenant:
        return None
    return UNSET if tenant_id is None else tenant_guard(tenant_id, None)


def _plain(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def echo_json(value: object) -> None:
    """Print dataclasses, mappings and lists as indented JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif isinstance(value, list):
        value = [dataclasses.asdict(item) for item in value]
    click.echo(json.dumps(value, indent=2, default=_plain))


#: Control characters written out as ``\x1b`` escapes: a stored text (a model's reason,
#: say) cannot move the cursor, clear the screen or retitle the operator's terminal.
_CONTROLS = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)]}


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%SZ")
    if isinstance(value, dict | list):
        return json.dumps(value, default=_plain)
    return str(value).translate(_CONTROLS)


def echo_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print rows as left-aligned columns under ``headers``."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        click.echo(
            "  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip()
        )


def echo_summary(run: RunSummary) -> None:
    """Print one run's summary as ``key: value`` lines."""
    for field in ("run_id", "status", "session_id", "actor_id", "tenant_id", "root_role_id"):
        click.echo(f"{field + ':':<15} {_cell(getattr(run, field))}")
    click.echo(f"{'created_at:':<15} {_cell(run.created_at)}")
    click.echo(f"{'completed_at:':<15} {_cell(run.completed_at)}")


def _echo_run(run: RunSummary, as_json: bool) -> None:
    if as_json:
        echo_json(run)
    else:
        echo_summary(run)


# -- database ------------------------------------------------------------------


@db_cli.command("upgrade")
@click.argument("revision", default="heads")
@scoria_errors
def db_upgrade(revision: str) -> None:
    """Apply flask-scoria's migrations up to REVISION (default: newest)."""
    engine = _engine()
    schema.upgrade(engine, revision)
    click.echo(f"scoria tables at revision {schema.current_revision(engine)}")


@db_cli.command("downgrade")
@click.argument("revision", default="base")
@click.option("--yes", is_flag=True, help="Do not ask before dropping every run.")
@scoria_errors
def db_downgrade(revision: str, yes: bool) -> None:
    """Revert flask-scoria's migrations down to REVISION (default: drop all)."""
    engine = _engine()
    schema.require_own_history(engine)  # before asking
    if not yes and schema.reaches_base(engine, revision):
        click.confirm("This drops every scoria_* table and every run in them. Go on?", abort=True)
    schema.downgrade(engine, revision)
    click.echo(f"scoria tables at revision {schema.current_revision(engine)}")


@db_cli.command("current")
@scoria_errors
def db_current() -> None:
    """Print the revision the database is at."""
    click.echo(schema.current_revision(_engine()) or "none (run: flask scoria db upgrade)")


@db_cli.command("check")
@scoria_errors
def db_check() -> None:
    """Exit non-zero unless the database matches the newest revision."""
    engine = _engine()
    current = schema.current_revision(engine)
    head = schema.head_revision()
    if current != head:
        raise click.ClickException(
            f"scoria tables are at {current or 'no revision'}, newest is {head};"
            " run: flask scoria db upgrade"
        )
    diffs = schema.differences(engine)
    if diffs:
        raise click.ClickException(f"scoria tables differ from the models: {diffs}")
    click.echo(f"scoria tables are up to date ({head})")


# -- runs ------------------------------------------------------------------------


@scoria_cli.command("runs")
@click.option("--session", "session_id", help="Only runs of this session_id.")
@tenant_option
@no_tenant_option
@click.option(
    "--status",
    type=click.Choice([status.value for status in RunStatus]),
    help="Only runs in this status.",
)
@click.option("--limit", type=click.IntRange(1, 500), default=20, show_default=True)
@json_option
@scoria_errors
def runs_command(
    session_id: str | None,
    tenant_id: str | None,
    no_tenant: bool,
    status: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List runs, newest first."""
    filters = RunFilters(status=status, session_id=session_id)
    found = list_runs(filters, tenant=tenant_filter(tenant_id, no_tenant), limit=limit).rows
    if as_json:
        echo_json(found)
        return
    if not found:
        click.echo("No runs found.")
        return
    echo_table(
        ("RUN_ID", "STATUS", "SESSION", "ACTOR", "TENANT", "CREATED"),
        (
            (run.run_id, run.status, run.session_id, run.actor_id, run.tenant_id, run.created_at)
            for run in found
        ),
    )


def echo_detail(detail: RunDetail) -> None:
    """Print a run's summary, steps, approvals, delegated handoffs and timeline."""
    echo_summary(detail.summary)
    click.echo("\nSteps")
    echo_table(
        ("SEQ", "KIND", "ROLE", "STATUS", "ATTEMPT", "RESULT / ERROR"),
        (
            (
                s.sequence,
                s.kind,
                s.role_id,
                s.status,
                s.attempt,
                s.error_envelope or s.result_envelope,
            )
            for s in detail.steps
        ),
    )
    if detail.approvals:
        click.echo("\nApprovals")
        echo_table(
            ("APPROVAL_ID", "TOOL", "STATUS", "DECIDED_BY", "DECIDED_AT", "REASON / NOTE"),
            (
                (a.id, a.tool_name, a.status, a.decided_by, a.decided_at, a.note or a.reason)
                for a in detail.approvals
            ),
        )
    if detail.delegated_handoffs:
        click.echo("\nDelegated handoffs")
        echo_table(
            ("DELEGATED_ROLE", "KIND", "CHILD_STATUS", "PROJECTED_CONTEXT"),
            (
                (h.delegated_role_id, h.delegated_kind, h.child_status, h.projected_context)
                for h in detail.delegated_handoffs
            ),
        )
    click.echo("\nTimeline")
    echo_table(
        ("SEQ", "AT", "EVENT"),
        ((e.sequence, e.created_at, e.event_type) for e in detail.events),
    )


@scoria_cli.command("show")
@click.argument("run_id")
@json_option
@scoria_errors
def show(run_id: str, as_json: bool) -> None:
    """Show one run: summary, steps, approvals, handoffs and timeline."""
    detail = get_run_detail(run_id)
    if as_json:
        echo_json(detail)
    else:
        echo_detail(detail)


@scoria_cli.command("approve")
@click.argument("run_id")
@click.option("--by", "decided_by", required=True, help="Who approves (recorded).")
@click.option("--note", help="A note kept with the decision.")
@approval_option
@json_option
@scoria_errors
def approve(
    run_id: str, decided_by: str, note: str | None, approval_id: str | None, as_json: bool
) -> None:
    """Approve the pending approval of RUN_ID; the run waits for 'resume'."""
    run = approve_run(run_id, decided_by=decided_by, note=note, approval_id=approval_id)
    _echo_run(run, as_json)
    if not as_json:
        click.echo(f"\nApproved. Continue the run with: flask scoria resume {run.run_id}")


@scoria_cli.command("reject")
@click.argument("run_id")
@click.option("--by", "decided_by", required=True, help="Who rejects (recorded).")
@click.option("--reason", help="Why, kept with the decision.")
@approval_option
@json_option
@scoria_errors
def reject(
    run_id: str, decided_by: str, reason: str | None, approval_id: str | None, as_json: bool
) -> None:
    """Reject the pending approval of RUN_ID, ending the run as rejected."""
    run = reject_run(run_id, decided_by=decided_by, reason=reason, approval_id=approval_id)
    _echo_run(run, as_json)


@scoria_cli.command("cancel")
@click.argument("run_id")
@click.option("--by", "cancelled_by", required=True, help="Who cancels (recorded).")
@click.option("--reason", help="Why, kept with the cancellation.")
@json_option
@scoria_errors
def cancel(run_id: str, cancelled_by: str, reason: str | None, as_json: bool) -> None:
    """Cancel RUN_ID with its open steps and approvals; a running handler's outcome is dropped."""
    _echo_run(cancel_run(run_id, cancelled_by=cancelled_by, reason=reason), as_json)


@scoria_cli.command("resume")
@click.argument("run_id")
@click.option("--by", "requested_by", help="Who asks for it (recorded on the run's timeline).")
@json_option
@scoria_errors
def resume(run_id: str, requested_by: str | None, as_json: bool) -> None:
    """Resume RUN_ID after its approval, or retry its failed step."""
    _echo_run(resume_run(run_id, requested_by=requested_by), as_json)


@scoria_cli.command("dispatch")
@click.argument("run_id")
@json_option
@scoria_errors
def dispatch_command(run_id: str, as_json: bool) -> None:
    """Run the queued steps of RUN_ID with the app's registered handlers."""
    run = dispatch(run_id)
    _echo_run(run, as_json)
    if run.status == RunStatus.RUNNING:
        registered = app_state().registry.handlers
        steps = get_run_detail(run.run_id).steps
        queued = {step.kind for step in steps if step.status == StepStatus.QUEUED}
        for kind in sorted(queued - set(registered)):
            click.echo(f"no handler for kind {kind!r} in this app: its step stays queued", err=True)


def _not_nan(_ctx: click.Context, _param: click.Parameter, value: float) -> float:
    """``value``, unless it is NaN (which every range check lets through)."""
    if math.isnan(value):
        raise click.BadParameter("nan is not a number.")
    return value


@scoria_cli.command("worker")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Steps executed at once, each in a thread of its own.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05, max=3600),
    callback=_not_nan,
    default=1.0,
    show_default=True,
    help="Seconds between polls on SQLite, and between sweeps of expired leases and timeouts.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=100,
    show_default=True,
    help="Steps executed by --once.",
)
@click.option("--once", is_flag=True, help="Execute the due steps one after another, then exit.")
@scoria_errors
def worker(concurrency: int, interval: float, limit: int, once: bool) -> None:
    """Execute queued steps with the app's registered handlers until stopped.

    Claims due steps oldest first; on PostgreSQL it is woken as soon as a
    step is queued, on SQLite it polls every INTERVAL seconds. It also
    retries or fails steps whose lease expired or whose timeout passed.
    Several workers may share a database: each step still runs once.
    SIGTERM or SIGINT stops it after its running handlers finish. When the
    database is unavailable the pass is retried after INTERVAL seconds.
    """
    run_worker(
        concurrency=concurrency,
        interval=interval,
        limit=limit,
        once=once,
        on_dispatched=lambda run: click.echo(f"dispatched {run.run_id}: {run.status}"),
        on_started=lambda: click.echo(f"worker started: {concurrency} thread(s)"),
    )
    if not once:
        click.echo("worker stopped")


@scoria_cli.command("prune")
@click.option(
    "--days",
    # At most a thousand years: a cutoff a date can hold.
    type=click.FloatRange(min=0, min_open=True, max=365_000),
    callback=_not_nan,
    required=True,
    help="Delete runs that ended more than this many days ago.",
)
@tenant_option
@no_tenant_option
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@scoria_errors
def prune(days: float, tenant_id: str | None, no_tenant: bool, dry_run: bool) -> None:
    """Delete runs that ended long ago, with their steps, events, approvals and handoffs.

    Runs still running or waiting for approval are never deleted.
    """
    options: dict[str, Any] = {}
    tenant = tenant_filter(tenant_id, no_tenant)
    if tenant is not UNSET:
        options["tenant_id"] = tenant
    count = prune_runs(older_than=timedelta(days=days), dry_run=dry_run, **options)
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {count} run(s) that ended more than {days:g} day(s) ago")


@scoria_cli.command("recover")
@click.option(
    "--resend-after",
    type=click.FloatRange(min=0, max=365 * 24 * 3600),
    default=60.0,
    show_default=True,
    help="Send again to Celery the steps queued for it that fell due this many seconds ago.",
)
@scoria_errors
def recover(resend_after: float) -> None:
    """Retry (per their Retry policy) or fail steps whose lease expired or whose timeout
    passed, fail runs whose approval expired, and send again to Celery the steps whose
    send was lost."""
    recovered = recover_expired_leases()
    for run_id in recovered:
        try:
            status = get_run(run_id).status
        except RunNotFound:  # pruned since
            continue
        # As the run is now: a worker may have gone on with a retry already.
        click.echo(f"{'retry queued' if status == RunStatus.RUNNING else status}: {run_id}")
    click.echo(f"{len(recovered)} run(s) recovered")
    for step_id in resend_due_celery_steps(resend_after):
        click.echo(f"sent to Celery again: step {step_id}")


# -- verify --------------------------------------------------------------------


@scoria_cli.command("verify")
@click.argument("lane", type=click.Choice(tuple(LANES)), default="adoption")
@click.option(
    "--kind", help="Step kind to exercise (default: 'approval', or 'review' for the handoff)."
)
@click.option(
    "--payload",
    "payload_json",
    metavar="JSON",
    help='The runs\' payload, a JSON object (default {"prompt": ...}).',
)
@json_option
def verify(lane: str, kind: str | None, payload_json: str | None, as_json: bool) -> None:
    """Run the adoption checklist with this app's handlers in a throwaway database.

    LANE is 'adoption' (default) or 'runtime-to-handoff'. The app's own
    database must be migrated; nothing is written to it.
    """
    try:
        payload = None if payload_json is None else parse_payload(payload_json)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--payload") from None
    host = current_app._get_current_object()  # type: ignore[attr-defined]
    report = run_lane(host, lane, kind, payload)
    if as_json:
        checks = [dataclasses.asdict(check) for check in report.checks]
        echo_json({"lane": lane, "passed": not report.failures, "checks": checks})
    else:
        for check in report.checks:
            click.echo(f"{check.outcome:<4}  {check.name}: {check.detail}")
    if report.failures:
        raise click.ClickException(f"verify {lane}: {report.failures} check(s) failed")
    if not as_json:
        click.echo(f"\nverify {lane}: all checks passed")
