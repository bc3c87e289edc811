"""An SQLite database held by another writer: typed errors, and leases that survive it."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from _helpers import row_counts, write_locked
from conftest import create_test_app

import flask_scoria as scoria
from flask_scoria import schema


def test_a_locked_database_raises_storage_error_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "scoria.sqlite3"
    app = create_test_app(f"sqlite:///{path}", tmp_path, SCORIA_SQLITE_BUSY_TIMEOUT=0.2)
    engine = app.extensions["scoria"].storage(app).engine
    schema.upgrade(engine)
    with app.app_context(), write_locked(path):
        try:
            scoria.start_run({"session_id": "s-1"})
        except scoria.StorageError as exc:
            assert "database is locked" in exc.message and "db.session" in exc.message
        else:
            raise AssertionError("start_run wrote through another writer's lock")
    assert row_counts(engine)["scoria_runs"] == 0
    engine.dispose()


def test_a_migration_of_a_locked_database_is_a_database_error(tmp_path: Path) -> None:
    path = tmp_path / "scoria.sqlite3"
    app = create_test_app(f"sqlite:///{path}", tmp_path, SCORIA_SQLITE_BUSY_TIMEOUT=0.2)
    schema.upgrade(app.extensions["scoria"].storage(app).engine, "scoria_0005")
    runner = app.test_cli_runner()
    with write_locked(path):
        for command in (["upgrade"], ["downgrade", "scoria_0004"]):
            result = runner.invoke(args=["scoria", "db", *command])
            assert result.exit_code == 1, result.output
            assert result.output == "Error: database error: database is locked\n", command
    assert runner.invoke(args=["scoria", "db", "current"]).output.strip() == "scoria_0005"
    app.extensions["scoria"].storage(app).engine.dispose()


def test_the_lease_keeper_outlives_a_renewal_that_found_the_database_locked(
    tmp_path: Path,
) -> None:
    path = tmp_path / "scoria.sqlite3"
    app = create_test_app(
        f"sqlite:///{path}",
        tmp_path,
        SCORIA_SQLITE_BUSY_TIMEOUT=0.05,
        SCORIA_STEP_LEASE_SECONDS=0.6,
    )
    runtime: scoria.Scoria = app.extensions["scoria"]
    engine = runtime.storage(app).engine
    schema.upgrade(engine)
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    @runtime.handler("slow")
    def slow(step: scoria.StepView, run: scoria.RunSummary) -> dict[str, Any]:
        calls.append(step.attempt)
        entered.set()
        release.wait(10)
        return {"ok": True}

    result: dict[str, scoria.RunSummary] = {}

    def start() -> None:
        with app.app_context():
            result["run"] = scoria.start_run({"session_id": "s-1"}, initial_step={"kind": "slow"})

    worker = threading.Thread(target=start)
    worker.start()
    assert entered.wait(10)
    with write_locked(path, seconds=0.5):  # the renewals due meanwhile fail
        pass
    time.sleep(0.8)  # past the lease: only renewals after the lock keep the step alive
    with app.app_context():
        (run,) = scoria.list_runs_for_session("s-1")
        assert scoria.get_run(run.run_id).status == "running"
    release.set()
    worker.join(10)
    assert result["run"].status == "completed"
    assert calls == [1]
    engine.dispose()


def test_a_session_list_on_a_locked_database_lists_runs_as_found(
    tmp_path: Path, caplog: Any
) -> None:
    path = tmp_path / "scoria.sqlite3"
    app = create_test_app(f"sqlite:///{path}", tmp_path, SCORIA_SQLITE_BUSY_TIMEOUT=0.1)
    engine = app.extensions["scoria"].storage(app).engine
    schema.upgrade(engine)

    def brief(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        return scoria.WaitForApproval("send", expires_in=0.05)

    with app.app_context():
        ids = [
            scoria.start_run(
                {"session_id": "s-1"}, initial_step={"kind": "b"}, handlers={"b": brief}
            ).run_id
            for _ in range(3)
        ]
        time.sleep(0.1)  # every approval has expired; nothing has recorded it yet
        began = time.monotonic()
        with write_locked(path):
            listed = scoria.list_runs_for_session("s-1")
        # One wait for the lock, not one per run.
        assert time.monotonic() - began < 1.0
        assert {run.run_id for run in listed} == set(ids)
        assert {run.status for run in listed} == {"waiting_for_approval"}
        warned = [r for r in caplog.records if "Could not record the expiries" in r.getMessage()]
        assert len(warned) == 1
        assert {run.status for run in scoria.list_runs_for_session("s-1")} == {"failed"}
    engine.dispose()


def _open_at_once(path: str, go: Any, failures: Any) -> None:
    """Child process: open the file with the own engine as soon as ``go`` is set."""
    from flask_scoria.storage import create_standalone_engine

    engine = create_standalone_engine(
        f"sqlite:///{path}",
        busy_timeout=5.0,
        synchronous="FULL",
        engine_options={},
        connect_timeout=5.0,
        statement_timeout=30.0,
    )
    go.wait()
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT count(*) FROM t").scalar()
    except Exception as exc:
        failures.put(repr(exc))


def test_processes_that_open_a_new_file_at_once_all_get_in(tmp_path: Path) -> None:
    """Each switches the file to WAL mode; SQLite refuses all but one, at once."""
    fork = multiprocessing.get_context("fork")
    failures = fork.Queue()
    for trial in range(12):
        path = str(tmp_path / f"new-{trial}.sqlite3")
        created = sqlite3.connect(path)  # as a migration tool may leave it: not in WAL mode
        created.execute("CREATE TABLE t (a)")
        created.commit()
        created.close()
        go = fork.Event()
        children = [fork.Process(target=_open_at_once, args=(path, go, failures)) for _ in range(6)]
        for child in children:
            child.start()
        time.sleep(0.2)
        go.set()
        for child in children:
            child.join(timeout=30)
            assert child.exitcode == 0
    assert failures.empty(), failures.get()
