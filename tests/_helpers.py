"""Handlers and database probes shared by the runtime tests.

Handlers live in a module (not in a test function) so that they can be named
as ``"_helpers:function"`` strings and imported by child processes.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import flask_scoria as scoria
from flask_scoria import Succeed, WaitForApproval

TABLES = ("scoria_runs", "scoria_steps", "scoria_approvals", "scoria_events", "scoria_handoffs")
IDENTITY = {"actor_id": "actor-1", "tenant_id": "tenant-1", "session_id": "session-1"}


def succeed(step: scoria.StepView, run: scoria.RunSummary) -> Succeed:
    return Succeed({"step_id": step.id, "attempt": step.attempt})


def wait_for_approval(step: scoria.StepView, run: scoria.RunSummary) -> WaitForApproval:
    return WaitForApproval("publish", {"env": "prod"}, reason="Needs a human")


def ask_then_work(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    """Ask for approval the first time; once approved, do the work."""
    if step.approval is None:
        return WaitForApproval("publish", {"env": "prod"})
    return Succeed({"approved_by": step.approval.decided_by, "decision": step.approval.status})


def edit_then_send(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    """Ask to send to everybody, editable; once approved, send to whom the decider chose."""
    if step.approval is None:
        return WaitForApproval("send_email", {"to": "all@example.com"}, editable=True)
    return Succeed({"sent_to": (step.approval.edited_arguments or {}).get("to")})


def counting_handler(step: scoria.StepView, run: scoria.RunSummary) -> dict[str, Any]:
    """Append one line per execution to the file named in the run's metadata."""
    path = Path(run.metadata["counter"])
    with path.open("a") as out:
        out.write(f"{os.getpid()} {step.id} {step.attempt}\n")
        out.flush()
        os.fsync(out.fileno())
    return {"pid": os.getpid()}


def counting_once_approved(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    """Ask for approval the first time; once decided, count the execution and complete."""
    if step.approval is None:
        return WaitForApproval("publish", {"env": "prod"})
    return Succeed({"decision": step.approval.status, **counting_handler(step, run)})


def blocking_handler(step: scoria.StepView, run: scoria.RunSummary) -> dict[str, Any]:
    """Record the execution, announce it, then block until killed or released."""
    counting_handler(step, run)
    Path(run.metadata["entered"]).touch()
    release = Path(run.metadata["release"])
    deadline = time.monotonic() + 60
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"released": release.exists()}


def block_then_count(step: scoria.StepView, run: scoria.RunSummary) -> scoria.Next:
    """Block as :func:`blocking_handler` does, then go on with a ``count`` step."""
    blocking_handler(step, run)
    return scoria.Next("count")


def executions(counter: Path) -> list[str]:
    """The lines ``counting_handler`` wrote, one per execution."""
    return counter.read_text().splitlines() if counter.exists() else []


def row_counts(engine: sa.Engine) -> dict[str, int]:
    """The number of rows of every ``scoria_*`` table."""
    with engine.connect() as conn:
        return {
            table: conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one()
            for table in TABLES
        }


def call_verb(verb: str, run_id: str, who: str) -> Any:
    """Call one facade verb that races with others; losers raise a ScoriaError."""
    if verb == "resume":
        return scoria.resume_run(run_id, handlers={"work": counting_handler})
    if verb == "dispatch":
        return scoria.dispatch(run_id, handlers={"work": counting_handler})
    if verb == "approve":
        return scoria.approve_run(run_id, decided_by=who)
    if verb == "approve_and_resume":
        return scoria.approve_run(
            run_id, decided_by=who, resume=True, handlers={"work": counting_handler}
        )
    if verb == "start_keyed":
        # ``run_id`` is the idempotency key, and the file that counts executions.
        return scoria.start_run(
            scoria.identity(IDENTITY),
            initial_step={"kind": "work"},
            runtime={"metadata": {"counter": run_id}},
            handlers={"work": counting_handler},
            idempotency_key=run_id,
        )
    if verb == "reject":
        return scoria.reject_run(run_id, decided_by=who)
    raise AssertionError(verb)


def outcome_of(verb: str, run_id: str, who: str) -> tuple[str, str, str]:
    """``(who, "ok" or the error code, detail)`` of one racing call."""
    try:
        summary = call_verb(verb, run_id, who)
    except scoria.ApprovalAlreadyDecided as exc:
        return who, exc.code, f"{exc.decision}:{exc.decided_by}"
    except scoria.ScoriaError as exc:
        return who, exc.code, exc.message
    except Exception as exc:
        return who, "unexpected", f"{type(exc).__name__}: {exc}"
    return who, "ok", f"{summary.status} {summary.run_id}"


def race_in_process(
    database_uri: str,
    instance_path: str,
    index: int,
    races: list[tuple[str, str]],
    barrier: Any,
    results: Any,
) -> None:
    """Child process: build an app, then join each race at the barrier."""
    from conftest import create_test_app

    app = create_test_app(database_uri, Path(instance_path))
    with app.app_context():
        scoria.get_run(races[0][1])  # connect before the first race
        for race, (verb, run_id) in enumerate(races):
            if verb == "approve_or_reject":
                verb = "approve" if index % 2 == 0 else "reject"
            barrier.wait(timeout=60)
            results.put((race, *outcome_of(verb, run_id, f"process-{index}")))
    app.extensions["scoria"].storage(app).engine.dispose()


def start_blocking_run(database_uri: str, instance_path: str, metadata: dict[str, str]) -> None:
    """Child process: start a run whose handler blocks until the process is killed."""
    from conftest import create_test_app

    app = create_test_app(database_uri, Path(instance_path), SCORIA_STEP_LEASE_SECONDS=1)
    with app.app_context():
        scoria.start_run(
            scoria.identity(IDENTITY),
            initial_step={"kind": "work"},
            runtime={"metadata": metadata},
            handlers={"work": blocking_handler},
        )


#: The unsafe context key names, suffixes and prefixes of the contract (section 6).
UNSAFE_NAMES = (
    *("transcript", "transcripts", "messages", "message_history", "history", "chat_history"),
    *("conversation_history", "provider_session", "provider_state", "runtime_state", "session"),
    *("session_state", "socket", "socket_state", "assigns", "private", "cookies", "headers"),
    *("secrets", "message", "cookie", "header", "secret", "token", "password", "passwd"),
    *("api_key", "apikey", "authorization", "credentials", "private_key", "access_token"),
    "refresh_token",
)
UNSAFE_SUFFIXES = (
    *("_transcript", "_history", "_messages", "_cookies", "_headers", "_secrets"),
    *("_provider_session", "_socket", "_token", "_secret", "_password", "_api_key", "_cookie"),
    *("_header", "_credentials"),
)
UNSAFE_PREFIXES = ("provider_session_", "socket_")


@contextmanager
def write_locked(path: Path, seconds: float | None = None) -> Iterator[None]:
    """Hold SQLite's write lock from another connection (for ``seconds``, or the block)."""
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        if seconds is not None:
            time.sleep(seconds)
        yield
    finally:
        blocker.rollback()
        blocker.close()


def until_a_query_waits_for_a_lock(engine: sa.Engine, timeout: float = 30) -> None:
    """Return once a PostgreSQL session waits for a lock (or ``timeout`` seconds passed)."""
    blocked = sa.text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    deadline = time.monotonic() + timeout
    with engine.connect() as watcher:
        while not watcher.execute(blocked).scalar() and time.monotonic() < deadline:
            time.sleep(0.01)
