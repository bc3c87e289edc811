"""Queued steps run later: ``dispatch_queued`` and ``flask scoria worker``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _helpers import counting_handler, executions, until_a_query_waits_for_a_lock, write_locked
from conftest import create_test_app
from flask import Flask, g
from flask.testing import FlaskCliRunner
from test_operator import generic_plan, query_plan, recorded_queries

import flask_scoria as scoria
from flask_scoria import InvalidRunOptions, Scoria, schema
from flask_scoria.runtime import recover_expired_leases
from flask_scoria.runtime.context import context
from flask_scoria.runtime.tables import runs, steps
from flask_scoria.runtime.worker import (
    _CLAIM_LOCKS,
    _DUE_STEP,
    _NEXT_DUE,
    _OVERDUE,
    UNCLAIMED_RETRY,
    Worker,
)

TESTS = Path(__file__).resolve().parent
WHO = {"actor_id": "a-1", "tenant_id": "t-1", "session_id": "s-1"}


def queued_run(counter: Path, kind: str = "count") -> str:
    """A running run whose only step waits for a handler of ``kind``."""
    run = scoria.start_run(
        WHO, initial_step={"kind": kind}, runtime={"metadata": {"counter": str(counter)}}
    )
    assert run.status == "running"
    return run.run_id


def test_dispatch_queued_runs_steps_once_a_handler_is_registered(
    app: Flask, runtime: Scoria, tmp_path: Path
) -> None:
    counter = tmp_path / "count.txt"
    with app.app_context():
        first, second = queued_run(counter), queued_run(counter)
        unknown = queued_run(counter, kind="not-registered")
        finished = scoria.start_run(WHO).run_id
        assert scoria.dispatch_queued() == []

        runtime.handler("count")(counting_handler)
        dispatched = scoria.dispatch_queued()

        assert [run.run_id for run in dispatched] == [first, second]
        assert {run.status for run in dispatched} == {"completed"}
        assert len(executions(counter)) == 2
        assert scoria.get_run(unknown).status == "running"
        assert scoria.get_run(finished).status == "completed"
        assert scoria.dispatch_queued() == []
        assert len(executions(counter)) == 2


def test_dispatch_queued_takes_the_oldest_runs_first(
    app: Flask, runtime: Scoria, tmp_path: Path
) -> None:
    counter = tmp_path / "count.txt"
    with app.app_context():
        run_ids = [queued_run(counter) for _ in range(3)]
        runtime.handler("count")(counting_handler)
        assert [run.run_id for run in scoria.dispatch_queued(limit=2)] == run_ids[:2]
        assert [run.run_id for run in scoria.dispatch_queued(limit=2)] == run_ids[2:]


@pytest.mark.parametrize("limit", [0, -1, True, 2.5, "10"])
def test_dispatch_queued_refuses_a_bad_limit(app: Flask, limit: object) -> None:
    with app.app_context(), pytest.raises(InvalidRunOptions, match="limit"):
        scoria.dispatch_queued(limit=limit)  # type: ignore[arg-type]


def test_concurrent_workers_run_each_step_once(app: Flask, runtime: Scoria, tmp_path: Path) -> None:
    counter = tmp_path / "count.txt"
    with app.app_context():
        run_ids = {queued_run(counter) for _ in range(12)}
    runtime.handler("count")(counting_handler)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def work() -> None:
        with app.app_context():
            barrier.wait()
            try:
                while scoria.dispatch_queued(limit=3):
                    pass
            except BaseException as exc:  # a typed error or a driver error both fail the test
                errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    lines = executions(counter)
    assert len(lines) == len(run_ids)
    assert len({line.split()[1] for line in lines}) == len(run_ids)
    with app.app_context():
        assert {scoria.get_run(run_id).status for run_id in run_ids} == {"completed"}


def test_worker_command_makes_one_pass(
    app: Flask, runtime: Scoria, runner: FlaskCliRunner, tmp_path: Path
) -> None:
    counter = tmp_path / "count.txt"
    with app.app_context():
        run_id = queued_run(counter)
    runtime.handler("count")(counting_handler)
    result = runner.invoke(args=["scoria", "worker", "--once"])
    assert result.exit_code == 0, result.output
    assert result.output == f"dispatched {run_id}: completed\n"
    result = runner.invoke(args=["scoria", "worker", "--once"])
    assert (result.exit_code, result.output) == (0, "")
    assert len(executions(counter)) == 1


@pytest.mark.parametrize("interval", ["0", "nan", "inf", "3601"])
def test_worker_command_refuses_a_bad_interval(runner: FlaskCliRunner, interval: str) -> None:
    result = runner.invoke(args=["scoria", "worker", "--interval", interval])
    assert result.exit_code == 2
    assert "--interval" in result.output


def test_worker_process_waits_out_a_locked_database(tmp_path: Path) -> None:
    """A real ``flask scoria worker`` keeps going through a locked database, then stops on ^C."""
    database = tmp_path / "scoria.sqlite3"
    counter = tmp_path / "count.txt"
    (tmp_path / "workerapp.py").write_text(
        textwrap.dedent(
            f"""
            from _helpers import counting_handler
            from conftest import create_test_app

            app = create_test_app(
                "sqlite:///{database}", "{tmp_path / "instance"}", SCORIA_SQLITE_BUSY_TIMEOUT=0.05
            )
            app.extensions["scoria"].handler("count")(counting_handler)
            """
        )
    )
    app = create_test_app(f"sqlite:///{database}", tmp_path / "instance")
    engine = app.extensions["scoria"].storage(app).engine
    schema.upgrade(engine)
    with app.app_context():
        run_id = queued_run(counter)
    engine.dispose()

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS), str(TESTS.parent)]),
    }
    errors = tmp_path / "worker.err"
    with write_locked(database), errors.open("w") as err_file:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flask",
                "--app",
                "workerapp",
                "scoria",
                "worker",
                "--interval",
                "0.1",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err_file,
            text=True,
        )
        deadline = time.monotonic() + 30
        while "retrying" not in errors.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)  # passes find the database locked
    try:
        deadline = time.monotonic() + 20
        while not executions(counter) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        worker.send_signal(signal.SIGINT)
        out, _ = worker.communicate(timeout=20)
    err = errors.read_text()
    assert worker.returncode == 0, err
    assert "database is locked" in err and "retrying" in err
    assert f"dispatched {run_id}: completed" in out
    assert out.rstrip().endswith("worker stopped")
    assert len(executions(counter)) == 1


def test_a_signal_while_the_worker_holds_its_wake_up_lock_stops_it(tmp_path: Path) -> None:
    """A signal handler runs between two instructions of the main thread, even one that
    holds the lock waking the worker takes: noting the signal must not wait for it."""
    script = tmp_path / "signalled.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, signal
            from flask import Flask
            from flask_scoria.runtime.worker import Worker, _handle_signals

            worker = Worker(Flask("w"), concurrency=1, interval=600, on_dispatched=print)
            _handle_signals(worker._on_signal)
            with worker._freed._cond:
                os.kill(os.getpid(), signal.SIGTERM)
                noted = "noted"
            print(noted, worker._stop_requested(), worker._freed.is_set())
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=30
    )
    assert (result.returncode, result.stdout) == (0, "noted True True\n"), result.stderr


def test_each_worker_run_gets_a_fresh_app_context(
    app: Flask, runtime: Scoria, runner: FlaskCliRunner, tmp_path: Path
) -> None:
    counter = tmp_path / "count.txt"
    with app.app_context():
        first, second = queued_run(counter), queued_run(counter)
    seen: list[tuple[str, object]] = []
    torn_down: list[str] = []

    @runtime.handler("count")
    def remember(step: scoria.StepView, run: scoria.RunSummary) -> scoria.Succeed:
        # What a handler leaves on ``g`` (or in a host's db.session) must not reach the next run.
        seen.append((run.run_id, g.get("left_by_previous_run")))
        g.left_by_previous_run = run.run_id
        return scoria.Succeed()

    @app.teardown_appcontext
    def count_teardown(_exc: BaseException | None) -> None:
        if "left_by_previous_run" in g:
            torn_down.append(g.left_by_previous_run)

    result = runner.invoke(args=["scoria", "worker", "--once"])

    assert result.exit_code == 0, result.output
    assert seen == [(first, None), (second, None)]
    # Each run's context was torn down right after it, as after a request.
    assert torn_down == [first, second]


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_due_step_whose_run_another_transaction_holds_is_looked_for_again_soon(
    app: Flask, runtime: Scoria
) -> None:
    """The claim skips a run locked by another transaction: no NOTIFY will come once it
    is released, so the worker looks again shortly, not after its whole interval."""
    runtime.handler("work", executor="worker")(lambda step, run: {"done": True})
    worker = Worker(app, concurrency=1, interval=30.0, on_dispatched=lambda run: None)
    engine = runtime.storage(app).engine
    try:
        with app.app_context():
            run_id = scoria.start_run(WHO, initial_step={"kind": "work"}).run_id
            with engine.connect() as holder, holder.begin():
                holder.execute(sa.select(runs.c.id).where(runs.c.id == run_id).with_for_update())
                assert worker._pass(context()) == UNCLAIMED_RETRY
            assert worker._pass(context()) == 30.0  # claimed; nothing else is queued
            worker._pool.shutdown(wait=True)
            assert scoria.get_run(run_id).status == "completed"
    finally:
        worker._close_listener()
        worker._pool.shutdown(wait=True)


def test_each_pass_finds_stale_steps_by_the_index_of_leases(app: Flask, runtime: Scoria) -> None:
    """Also where a kind has a timeout: running steps hold a lease, and only they are looked
    at, not every step stored."""
    runtime.handler("slow", timeout=30)(lambda step, run: scoria.Succeed())
    with recorded_queries(runtime, app) as statements, app.app_context():
        recover_expired_leases()
    [(statement, parameters)] = [(sql, params) for sql, params in statements if "UNION" in sql]
    plan = query_plan(runtime.storage(app).engine, statement, parameters)
    assert "ix_scoria_steps_lease" in plan, plan


def test_a_worker_finds_the_next_due_step_by_the_index_of_queued_steps(
    app: Flask, runtime: Scoria
) -> None:
    """Also in a prepared statement's plan, made for any parameters, and on SQLite without
    statistics among many running runs: a backlog of queued steps costs a claim a walk of
    their index up to the first due one, not a sort of them all nor a walk of the runs.
    The next due time is the first entry of that index (of a running run)."""
    with app.app_context():
        for _ in range(20):
            scoria.start_run(WHO, initial_step={"kind": "later"})
    engine = runtime.storage(app).engine
    now = datetime.now(UTC)
    for statement, parameters in (
        (_DUE_STEP, {"now": now, "kinds": ["x"]}),
        (_NEXT_DUE, {"kinds": ["x"]}),
        (_OVERDUE, {"before": now, "kinds": ["x"], "inline_kinds": ["y"], "limit": 100}),
    ):
        ranged = "now" in parameters or "before" in parameters
        expanded = statement.compile(engine).construct_expanded_state(parameters)
        if engine.dialect.name == "sqlite":
            assert expanded.positiontup is not None
            values = (expanded.parameters[name] for name in expanded.positiontup)
            positional = tuple(
                str(value) if isinstance(value, datetime) else value for value in values
            )
            plan = query_plan(engine, expanded.statement, positional)
            first = plan.split(" | ")[0]
            # A range of times, which ends at the first step not yet due (or due).
            walk = "ix_scoria_steps_queued (not_before" if ranged else "ix_scoria_steps_queued"
            assert f"scoria_steps USING INDEX {walk}" in first, plan
            assert "TEMP B-TREE" not in plan and "ix_scoria_runs" not in plan, plan
            continue
        plan = generic_plan(engine, expanded.statement, expanded.parameters)
        assert "ix_scoria_steps_queued" in plan and "Sort" not in plan, plan
        assert "Seq Scan on scoria_steps" not in plan, plan
        assert not ranged or re.search(r"Index Cond: \(not_before [<>]", plan), plan


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_claim_reads_a_step_that_moved_after_its_snapshot_as_it_now_is(
    app: Flask, runtime: Scoria
) -> None:
    """A worker's claim reads the due step in the statement's snapshot, then locks it
    with its run: a step that another call claimed, executed and queued again for later
    in between is checked again as it now is, and not claimed early on the old read.

    A worker skips a locked run rather than wait for it, and the window is too short to
    hit on purpose; the same statement that waits for the locks shows the check."""
    runtime.handler("later", executor="worker")(lambda step, run: None)
    with app.app_context():
        run = scoria.start_run(WHO, initial_step={"kind": "later"})
    engine = runtime.storage(app).engine
    waiting = _DUE_STEP.with_for_update(of=_CLAIM_LOCKS)  # no SKIP LOCKED: it waits
    found: list[Any] = []

    def claim() -> None:
        with engine.connect() as conn:
            picked = conn.execute(waiting, {"now": datetime.now(UTC), "kinds": ["later"]})
            found.append(picked.first())
            conn.rollback()

    key = uuid.UUID(run.run_id)
    retried = {"attempt": 2, "not_before": datetime.now(UTC) + timedelta(hours=1)}
    with engine.connect() as held:
        held.execute(runs.update().where(runs.c.id == key).values(version=runs.c.version + 2))
        held.execute(steps.update().where(steps.c.run_id == key).values(**retried))
        claiming = threading.Thread(target=claim)
        claiming.start()
        until_a_query_waits_for_a_lock(engine)
        held.commit()
        claiming.join(timeout=30)
    assert found == [None]  # queued again, but not due for an hour
    with engine.begin() as conn:
        conn.execute(
            steps.update().where(steps.c.run_id == key).values(not_before=datetime.now(UTC))
        )
    claim()
    assert (found[-1].attempt, found[-1].runs_version) == (2, 3)
