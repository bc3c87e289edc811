"""Faults: dropped connections, values a backend cannot store, oversized metadata."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _helpers import IDENTITY, counting_handler, executions
from conftest import create_test_app
from flask import Flask

import flask_scoria as scoria

only_postgres = pytest.mark.parametrize("backend", ["postgresql"])


@contextmanager
def configured_app(database_uri: str, tmp_path: Path, **config: object) -> Iterator[Flask]:
    """An app with extra ``SCORIA_*`` config, its engine disposed afterwards."""
    app = create_test_app(database_uri, tmp_path / "instance", **config)
    try:
        yield app
    finally:
        app.extensions["scoria"].storage(app).engine.dispose()


@contextmanager
def admin_engine(database_uri: str) -> Iterator[sa.Engine]:
    """An engine outside the app's pool, for terminating the app's connections."""
    engine = sa.create_engine(database_uri, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


def terminate_other_backends(admin: sa.Engine) -> int:
    """``pg_terminate_backend`` every other connection to the database; how many."""
    with admin.connect() as conn:
        return len(
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).all()
        )


@only_postgres
@pytest.mark.parametrize("pre_ping", [True, False], ids=["pre-ping", "no-pre-ping"])
def test_connections_terminated_as_the_handler_returns_do_not_strand_the_run(
    database_uri: str, tmp_path: Path, pre_ping: bool
) -> None:
    """Without the ping (a host engine), the outcome's write is retried on a fresh connection."""
    counter = tmp_path / "executions"
    terminated: list[int] = []
    options = {"pool_pre_ping": pre_ping}
    with (
        configured_app(database_uri, tmp_path, SCORIA_ENGINE_OPTIONS=options) as app,
        admin_engine(database_uri) as admin,
    ):

        def work(step: scoria.StepView, run: scoria.RunSummary) -> dict[str, Any]:
            counting_handler(step, run)
            terminated.append(terminate_other_backends(admin))
            return {"done": True}

        with app.app_context():
            run = scoria.start_run(
                IDENTITY,
                initial_step={"kind": "work"},
                runtime={"metadata": {"counter": str(counter)}},
                handlers={"work": work},
            )
            assert terminated and terminated[0] >= 1
            assert run.status == scoria.RunStatus.COMPLETED
            assert scoria.get_run(run.run_id).status == scoria.RunStatus.COMPLETED
    assert len(executions(counter)) == 1


@contextmanager
def kill_next_transaction(app: Flask, admin: sa.Engine) -> Iterator[list[int]]:
    """Once armed (append to the yielded list), terminate the connection of the next
    flask-scoria transaction as it begins: after the pool's ping, before its first statement."""
    engine = app.extensions["scoria"].storage(app).engine
    armed: list[int] = []
    killed: list[int] = []

    def on_begin(conn: sa.Connection) -> None:
        if len(armed) > len(killed):
            pid = conn.connection.driver_connection.info.backend_pid
            with admin.connect() as admin_conn:
                admin_conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
            killed.append(pid)

    sa.event.listen(engine, "begin", on_begin)
    try:
        yield armed
    finally:
        sa.event.remove(engine, "begin", on_begin)


def arming_handler(armed: list[int], counter: Path, times: int = 1) -> Any:
    def work(step: scoria.StepView, run: scoria.RunSummary) -> dict[str, Any]:
        counting_handler(step, run)
        armed.extend([1] * times)
        return {"done": True}

    return work


@only_postgres
def test_a_connection_dropped_inside_the_outcome_write_is_retried(
    app: Flask, database_uri: str, tmp_path: Path
) -> None:
    counter = tmp_path / "executions"
    with (
        admin_engine(database_uri) as admin,
        kill_next_transaction(app, admin) as armed,
        app.app_context(),
    ):
        run = scoria.start_run(
            IDENTITY,
            initial_step={"kind": "work"},
            runtime={"metadata": {"counter": str(counter)}},
            handlers={"work": arming_handler(armed, counter, times=2)},
        )
        detail = scoria.get_run_detail(run.run_id)
    assert run.status == scoria.RunStatus.COMPLETED
    assert [step.status for step in detail.steps] == [scoria.StepStatus.COMPLETED]
    assert [event.sequence for event in detail.events] == [1, 2, 3, 4]
    assert len(executions(counter)) == 1


@only_postgres
def test_storage_error_after_the_run_was_written_names_the_run(
    database_uri: str, tmp_path: Path
) -> None:
    counter = tmp_path / "executions"
    with (
        configured_app(database_uri, tmp_path, SCORIA_RECONNECT_ATTEMPTS=0) as app,
        admin_engine(database_uri) as admin,
    ):
        with (
            kill_next_transaction(app, admin) as armed,
            app.app_context(),
            pytest.raises(scoria.StorageError) as info,
        ):
            scoria.start_run(
                IDENTITY,
                initial_step={"kind": "work"},
                runtime={"metadata": {"counter": str(counter)}},
                handlers={"work": arming_handler(armed, counter)},
            )
        assert info.value.run_id is not None
        assert info.value.run_id in info.value.message
        with app.app_context():
            assert scoria.get_run(info.value.run_id).status == scoria.RunStatus.RUNNING
    assert len(executions(counter)) == 1


@only_postgres
def test_a_dropped_connection_while_inserting_the_run_is_retried(
    app: Flask, database_uri: str
) -> None:
    with admin_engine(database_uri) as admin, kill_next_transaction(app, admin) as armed:
        armed.append(1)
        with app.app_context():
            run = scoria.start_run(IDENTITY)
            assert scoria.get_run(run.run_id).status == scoria.RunStatus.COMPLETED


def test_storage_error_from_a_read_names_no_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'missing-tables.sqlite3'}"
    with (
        configured_app(uri, tmp_path) as app,
        app.app_context(),
        pytest.raises(scoria.StorageError) as info,
    ):
        scoria.start_run(IDENTITY)
    assert info.value.run_id is None


@only_postgres
def test_the_own_engine_pings_and_times_out(database_uri: str, tmp_path: Path) -> None:
    with configured_app(database_uri, tmp_path, SCORIA_STATEMENT_TIMEOUT=0.2) as app:
        engine = app.extensions["scoria"].storage(app).engine
        assert engine.pool._pre_ping
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "200ms"
            assert conn.connection.driver_connection.info.get_parameters()["connect_timeout"]
        with (
            app.app_context(),
            pytest.raises(scoria.StorageError, match="statement timeout"),
            app.extensions["scoria"].storage(app).read() as conn,
        ):
            conn.exec_driver_sql("SELECT pg_sleep(2)")
