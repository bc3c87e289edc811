"""Faults: dropped connections, values a backend cannot store, oversized metadata."""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _helpers import (
    IDENTITY,
    ask_then_work,
    counting_handler,
    counting_once_approved,
    executions,
    row_counts,
    succeed,
)
from _proxy import HOWS, LosingProxy, losing_proxy
from conftest import create_test_app
from flask import Flask

import flask_scoria as scoria
from flask_scoria import StorageError, schema
from flask_scoria import runtime as scoria_runtime
from flask_scoria.runtime import tables
from flask_scoria.runtime.context import context
from flask_scoria.runtime.worker import Worker
from flask_scoria.state import app_state
from flask_scoria.storage import PING_AFTER_IDLE, RECONNECT_MAX_DELAY, Storage
from flask_scoria.storage import _hint as storage_hint

only_postgres = pytest.mark.parametrize("backend", ["postgresql"])
ASK = {"work": ask_then_work}


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
    flask-scoria transaction as the pool lends it out: after any ping, before its first
    statement."""
    engine = app.extensions["scoria"].storage(app).engine
    armed: list[int] = []
    killed: list[int] = []

    def on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if len(armed) > len(killed):
            pid = dbapi_connection.info.backend_pid
            with admin.connect() as admin_conn:
                admin_conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
            killed.append(pid)

    sa.event.listen(engine, "checkout", on_checkout)
    try:
        yield armed
    finally:
        sa.event.remove(engine, "checkout", on_checkout)


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


def test_a_start_whose_run_disappears_while_its_step_runs_says_so(app: Flask) -> None:
    """The run a start committed is gone when its step's outcome is written (a crash of
    the database lost it before it reached the disk, or somebody deleted it): the start
    fails with a StorageError that says so, not with RunNotFound."""
    engine = app.extensions["scoria"].storage(app).engine

    def vanish(step: scoria.StepView, run: scoria.RunSummary) -> dict[str, Any]:
        with engine.begin() as conn:
            conn.execute(tables.runs.delete().where(tables.runs.c.id == uuid.UUID(run.run_id)))
        return {"done": True}

    with app.app_context():
        with pytest.raises(scoria.StorageError, match="disappeared while its first step ran"):
            scoria.start_run(IDENTITY, initial_step={"kind": "work"}, handlers={"work": vanish})
        assert scoria.list_runs_for_session(IDENTITY["session_id"]) == []


@only_postgres
def test_a_dropped_connection_while_inserting_the_run_is_retried(
    app: Flask, database_uri: str
) -> None:
    with admin_engine(database_uri) as admin, kill_next_transaction(app, admin) as armed:
        armed.append(1)
        with app.app_context():
            run = scoria.start_run(IDENTITY)
            assert scoria.get_run(run.run_id).status == scoria.RunStatus.COMPLETED


@only_postgres
@pytest.mark.parametrize("resume", [False, True], ids=["approve", "approve-and-resume"])
def test_a_dropped_connection_while_approving_is_retried(
    app: Flask, database_uri: str, resume: bool
) -> None:
    """The approval's single statement loses its connection; the transaction that follows
    on a fresh one decides once."""
    with admin_engine(database_uri) as admin, app.app_context():
        run = scoria.start_run(IDENTITY, initial_step={"kind": "work"}, handlers=ASK)
        with kill_next_transaction(app, admin) as armed:
            armed.append(1)
            decided = scoria.approve_run(
                run.run_id, decided_by="operator", resume=resume, handlers=ASK
            )
        detail = scoria.get_run_detail(run.run_id)
    assert decided.status == ("completed" if resume else "waiting_for_approval")
    (approval,) = detail.approvals
    assert (approval.status, approval.decided_by) == ("approved", "operator")
    types = [event.event_type for event in detail.events]
    assert types.count("approval_decided") == 1
    assert [event.sequence for event in detail.events] == list(range(1, len(types) + 1))


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"port": 1}, "No database server answered"),
        ({"database": "scoria_no_such_database"}, "no database or user of the URL's name"),
        ({"username": "scoria_no_such_role"}, "no database or user of the URL's name"),
    ],
)
def test_a_server_that_refuses_the_url_says_what_to_correct(
    postgres_url: str, tmp_path: Path, change: dict[str, Any], says: str
) -> None:
    uri = sa.make_url(postgres_url).set(**change).render_as_string(hide_password=False)
    with (
        configured_app(uri, tmp_path) as app,
        app.app_context(),
        pytest.raises(scoria.StorageError) as info,
    ):
        scoria.list_runs_for_session("s")
    assert info.value.hint is not None and says in info.value.hint
    assert "SCORIA_DATABASE_URI" in info.value.hint and info.value.hint in info.value.message


def test_storage_error_from_a_read_names_no_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'missing-tables.sqlite3'}"
    with (
        configured_app(uri, tmp_path) as app,
        app.app_context(),
        pytest.raises(scoria.StorageError) as info,
    ):
        scoria.start_run(IDENTITY)
    assert info.value.run_id is None
    assert info.value.hint is not None and "flask scoria db upgrade" in info.value.hint


@pytest.mark.parametrize(
    ("reason", "missing"),
    [
        ('relation "scoria_runs" does not exist', True),
        ('type "scoria_event_type" does not exist', True),
        ("no such table: scoria_steps", True),
        ("operator does not exist: scoria_event_type = text", False),
        ('column "scoria_extra" does not exist', False),
    ],
)
def test_the_missing_tables_hint_names_only_missing_tables(reason: str, missing: bool) -> None:
    assert (storage_hint(reason, sa.create_engine("sqlite://")) is not None) is missing


@only_postgres
def test_the_own_engine_replaces_a_connection_that_died_in_the_pool(
    database_uri: str, tmp_path: Path
) -> None:
    """A read is not retried: the ping of a connection that sat idle keeps it from failing."""
    with (
        configured_app(database_uri, tmp_path) as app,
        admin_engine(database_uri) as admin,
        app.app_context(),
    ):
        run = scoria.start_run(IDENTITY)
        assert terminate_other_backends(admin) >= 1
        time.sleep(PING_AFTER_IDLE * 1.2)
        assert scoria.get_run(run.run_id).run_id == run.run_id


@only_postgres
def test_the_urls_own_options_and_connect_timeout_are_kept(
    database_uri: str, tmp_path: Path
) -> None:
    url = sa.make_url(database_uri).update_query_dict(
        {"options": "-c search_path=elsewhere,public", "connect_timeout": "7"}
    )
    uri = url.render_as_string(hide_password=False)
    with configured_app(uri, tmp_path, SCORIA_STATEMENT_TIMEOUT=0.2) as app:
        engine = app.extensions["scoria"].storage(app).engine
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW search_path").scalar() == "elsewhere,public"
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "200ms"
            parameters = conn.connection.driver_connection.info.get_parameters()
            assert parameters["connect_timeout"] == "7"
    own = url.update_query_dict({"options": "-c statement_timeout=1s"})
    with configured_app(own.render_as_string(hide_password=False), tmp_path) as app:
        engine = app.extensions["scoria"].storage(app).engine
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "1s"


@only_postgres
def test_the_own_engine_times_out(database_uri: str, tmp_path: Path) -> None:
    with configured_app(database_uri, tmp_path, SCORIA_STATEMENT_TIMEOUT=0.2) as app:
        engine = app.extensions["scoria"].storage(app).engine
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "200ms"
            assert conn.connection.driver_connection.info.get_parameters()["connect_timeout"]
        with (
            app.app_context(),
            pytest.raises(scoria.StorageError, match="statement timeout") as info,
            app.extensions["scoria"].storage(app).read() as conn,
        ):
            conn.exec_driver_sql("SELECT pg_sleep(2)")
        assert info.value.hint is not None and "SCORIA_STATEMENT_TIMEOUT" in info.value.hint


TENANT = IDENTITY["tenant_id"]


@pytest.fixture
def ops(app: Flask) -> Any:
    """A client of the operator pages, as an operator of ``TENANT``."""
    app.extensions["scoria"].operator_scope(lambda: {"tenant_id": TENANT, "actor_id": "ops"})
    return app.test_client()


def paused(**runtime: Any) -> scoria.RunSummary:
    return scoria.start_run(
        IDENTITY, initial_step={"kind": "ask"}, handlers={"ask": ask_then_work}, **runtime
    )


def test_approved_runs_waiting_for_resume_can_be_listed(app: Flask, ops: Any) -> None:
    with app.app_context():
        waiting = paused()
        approved = paused()
        scoria.approve_run(approved.run_id, decided_by="ops")
        resumed = paused()
        scoria.approve_run(resumed.run_id, decided_by="ops")
        scoria.resume_run(resumed.run_id, handlers={"ask": ask_then_work})
        found = scoria_runtime.list_runs(scoria_runtime.RunFilters(awaiting_resume=True))
    assert [run.run_id for run in found.rows] == [approved.run_id]
    html = ops.get("/scoria/workflows?status=awaiting_resume").get_data(as_text=True)
    assert f"workflows/{approved.run_id}" in html
    assert f"workflows/{waiting.run_id}" not in html
    assert f"workflows/{resumed.run_id}" not in html
    assert 'value="awaiting_resume" selected' in html


def test_metadata_larger_than_the_cap_is_refused_and_nothing_written(
    database_uri: str, tmp_path: Path
) -> None:
    with configured_app(database_uri, tmp_path, SCORIA_MAX_METADATA_BYTES=1000) as app:
        engine = app.extensions["scoria"].storage(app).engine
        before = row_counts(engine)
        with app.app_context():
            with pytest.raises(scoria.InvalidRunOptions, match="SCORIA_MAX_METADATA_BYTES"):
                scoria.start_run(IDENTITY, runtime={"metadata": {"text": "x" * 1000}})
            with pytest.raises(scoria.InvalidRunOptions, match="1000"):
                scoria.start_handoff_run(
                    {**IDENTITY, "metadata": {"text": "y" * 1000}},
                    "critic",
                    root_role_id="planner",
                    delegated_kind="review",
                    handoff_input={},
                    projected_context={},
                )
            scoria.start_run(IDENTITY, runtime={"metadata": {"text": "x" * 900}})
        assert row_counts(engine)["scoria_runs"] == before["scoria_runs"] + 1


@contextmanager
def statements_of(app: Flask) -> Iterator[list[str]]:
    """The SQL text of every statement SQLAlchemy sends while the block runs."""
    engine = app.extensions["scoria"].storage(app).engine
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(args[2])

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def test_lists_and_status_polls_read_no_metadata(app: Flask, ops: Any) -> None:
    with app.app_context():
        run = paused(runtime={"metadata": {"payload": "p" * 10_000}})
    pages = (
        "/scoria/workflows",
        "/scoria/workflows?status=awaiting_resume",
        f"/scoria/sessions/{IDENTITY['session_id']}",
        "/scoria/approvals",
        f"/scoria/workflows/{run.run_id}/status.json",
    )
    for url in pages:
        with statements_of(app) as seen:
            response = ops.get(url)
        assert response.status_code == 200, url
        reads = [sql for sql in seen if "FROM scoria_runs" in sql or "JOIN scoria_runs" in sql]
        assert reads, url
        assert not [sql for sql in reads if "scoria_runs.metadata" in sql], url
    assert ops.get(pages[-1]).get_json()["status"] == "waiting_for_approval"


HIDDEN = (
    *("secret_key", "aws_secret_access_key", "Proxy-Authorization", "api_keys", "passwords"),
    *("tokens", "pwd", "passphrase", "jwt", "bearer", "credential", "signing_key"),
    *("encryption_key", "auth", "basicAuth", "client_secret", "AWS_ACCESS_KEY"),
)
SHOWN = ("max_tokens", "prompt_tokens", "session_id", "draft_answer", "author", "authority")


def test_credentials_are_redacted_and_url_passwords_masked(app: Flask, ops: Any) -> None:
    arguments = {key: f"value-of-{key}" for key in (*HIDDEN, *SHOWN)}
    arguments.update(
        database_url="postgresql://app:hunter2@db.internal:5432/prod",
        dsn="host=db user=app password=hunter3 dbname=prod",
        notes=["see https://bob:hunter4@example.com/x", "https://example.com/a@b"],
    )

    def ask(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        return scoria.WaitForApproval("deploy", arguments)

    with app.app_context():
        run = scoria.start_run(IDENTITY, initial_step={"kind": "ask"}, handlers={"ask": ask})
    html = ops.get(f"/scoria/workflows/{run.run_id}").get_data(as_text=True)
    for key in HIDDEN:
        assert f"value-of-{key}&#34;" not in html, key
        assert f"&#34;{key}&#34;: &#34;[REDACTED]&#34;" in html, key
    for key in SHOWN:
        assert f"value-of-{key}&#34;" in html, key
    assert "hunter" not in html
    assert "postgresql://app:[REDACTED]@db.internal:5432/prod" in html
    assert "password=[REDACTED] dbname=prod" in html
    assert "https://example.com/a@b" in html


@pytest.mark.parametrize("key", [*SHOWN, "pwd", "passphrase", "secret_key", "auth", "jwt"])
def test_handoffs_still_carry_what_the_contract_allows(app: Flask, key: str) -> None:
    with app.app_context():
        run = scoria.start_handoff_run(
            IDENTITY,
            "critic",
            root_role_id="planner",
            delegated_kind="review",
            handoff_input={},
            projected_context={key: 1},
        )
    assert run.run_id


def test_the_unavailable_page_names_no_connection_details(tmp_path: Path) -> None:
    uri = "postgresql+psycopg://scoria_user@127.0.0.1:1/scoria_secret_db"
    with configured_app(uri, tmp_path, SCORIA_CONNECT_TIMEOUT=2) as app:
        app.extensions["scoria"].operator_scope(lambda: {"tenant_id": TENANT, "actor_id": "ops"})
        response = app.test_client().get("/scoria/workflows")
    html = response.get_data(as_text=True)
    assert response.status_code == 503
    assert "unavailable" in html
    for detail in ("127.0.0.1", "port 1", "scoria_user", "scoria_secret_db", "psycopg"):
        assert detail not in html, detail


def test_security_headers_on_every_response_under_the_prefix(app: Flask) -> None:
    @app.get("/scoria-elsewhere")
    def elsewhere() -> str:
        return "host page"

    app.extensions["scoria"].operator_scope(lambda: {"tenant_id": TENANT, "actor_id": "ops"})
    ops = app.test_client()
    responses = [
        ops.get("/scoria/no/such/page"),
        ops.get("/scoria/workflows/x/approve"),
        ops.delete("/scoria/workflows"),
        ops.get("/scoria"),
    ]
    assert [response.status_code for response in responses][:3] == [404, 303, 405]
    for response in responses:
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"
    assert "Content-Security-Policy" not in ops.get("/scoria-elsewhere").headers


def test_a_read_only_sqlite_file_can_be_read_and_says_why_writes_fail(
    tmp_path: Path,
) -> None:
    path = tmp_path / "scoria.sqlite3"
    with configured_app(f"sqlite:///{path}", tmp_path / "writer") as writer:
        schema.upgrade(writer.extensions["scoria"].storage(writer).engine)
        with writer.app_context():
            run = scoria.start_run(IDENTITY)
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")
    uri = f"sqlite:///file:{path}?mode=ro&uri=true"
    with configured_app(uri, tmp_path / "reader") as reader, reader.app_context():
        assert scoria.get_run(run.run_id).status == scoria.RunStatus.COMPLETED
        assert [found.run_id for found in scoria.list_runs_for_session("session-1")] == [run.run_id]
        with pytest.raises(scoria.StorageError, match="read-only for this process"):
            scoria.start_run(IDENTITY)


ASK = {"work": ask_then_work}


def test_a_deleted_sqlite_file_is_not_written_to_in_silence(tmp_path: Path) -> None:
    """Connections that opened a file since deleted (or replaced) are not lent out: their
    writes would be lost with the file. The next call meets the empty file, and says so."""
    uri = f"sqlite:///{tmp_path / 'runs.sqlite3'}"
    with configured_app(uri, tmp_path) as app:
        schema.upgrade(app.extensions["scoria"].storage(app).engine)
        with app.app_context():
            kept = scoria.start_run(IDENTITY)
            for suffix in ("", "-wal", "-shm"):
                (tmp_path / f"runs.sqlite3{suffix}").unlink(missing_ok=True)
            with pytest.raises(scoria.StorageError) as info:
                scoria.start_run(IDENTITY)
            assert info.value.hint is not None and "db upgrade" in info.value.hint
            with pytest.raises(scoria.StorageError):
                scoria.get_run(kept.run_id)


@only_postgres
def test_without_pipeline_mode_the_runtime_works_the_same(app: Flask) -> None:
    """Another driver, or a libpq older than 14: each write is checked as it goes."""
    app.extensions["scoria"].storage(app).pipelines = False
    with app.app_context():
        run = scoria.start_run(IDENTITY, initial_step={"kind": "work"}, handlers=ASK)
        assert scoria.approve_run(
            run.run_id, decided_by="ops", resume=True, handlers=ASK
        ).status == (scoria.RunStatus.COMPLETED)

        def cancelled_meanwhile(step: scoria.StepView, run: scoria.RunSummary) -> Any:
            with app.app_context():
                scoria.cancel_run(run.run_id, cancelled_by="ops")
            return {"late": True}

        lost = scoria.start_run(
            IDENTITY, initial_step={"kind": "work"}, handlers={"work": cancelled_meanwhile}
        )
        assert lost.status == scoria.RunStatus.CANCELLED


@only_postgres
def test_a_worker_whose_listen_connection_dropped_in_the_pool_goes_on(
    database_uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection it takes for LISTEN can be one the server closed a moment ago."""
    # Two connections: the one LISTEN holds, and one that the pool lends out again and again.
    pool = {"pool_size": 2, "max_overflow": 0}
    with (
        configured_app(
            database_uri, tmp_path, SCORIA_EXECUTOR="worker", SCORIA_ENGINE_OPTIONS=pool
        ) as app,
        admin_engine(database_uri) as admin,
        app.app_context(),
    ):
        app.extensions["scoria"].handler("work")(succeed)
        worker = Worker(app, concurrency=1, interval=5.0, on_dispatched=lambda run: None)
        unavailable: list[StorageError] = []

        def one_pass() -> None:
            """A pass as the worker's loop makes it: a StorageError waits for the next."""
            try:
                worker._pass(context())
            except StorageError as exc:
                unavailable.append(exc)
                worker._close_listener()

        try:
            one_pass()  # listens; sweeps the leases, which it then skips a while
            worker._close_listener()
            # Both connections lent out and returned a moment ago: neither is pinged again.
            run = scoria.start_run(IDENTITY, initial_step={"kind": "work"})  # queued
            assert scoria.get_run(run.run_id).status == scoria.RunStatus.RUNNING
            assert terminate_other_backends(admin) == 2
            one_pass()  # LISTEN meets the dropped connection; the claim takes a fresh one
            assert "LISTEN connection failed" in caplog.text and not unavailable
            worker._pool.shutdown(wait=True)
            assert scoria.get_run(run.run_id).status == scoria.RunStatus.COMPLETED
            worker._pool = ThreadPoolExecutor(1)
            one_pass()
            assert worker._listener is not None  # listening again, on a fresh connection
        finally:
            worker._close_listener()
            worker._pool.shutdown(wait=True)


@only_postgres
def test_a_lease_renewal_whose_connection_dropped_is_retried_at_once(
    app: Flask, database_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    with admin_engine(database_uri) as admin, app.app_context():
        run = scoria.start_run(IDENTITY, initial_step={"kind": "later"})  # no handler: queued
        (step,) = scoria.get_run_detail(run.run_id).steps
        state = app_state(app)
        engine = state.storage.engine
        with engine.begin() as conn:
            conn.execute(
                sa.update(tables.steps)
                .where(tables.steps.c.id == uuid.UUID(step.id))
                .values(status="running", lease_token="held", lease_expires_at=sa.func.now())
            )
        assert terminate_other_backends(admin) >= 1
        state.keeper._renew(state.storage, uuid.UUID(step.id), "held")
        with engine.connect() as conn:
            renewed = conn.execute(
                sa.select(tables.steps.c.lease_expires_at - sa.func.now()).where(
                    tables.steps.c.id == uuid.UUID(step.id)
                )
            ).scalar_one()
    assert renewed.total_seconds() > 60
    assert "Could not renew" not in caplog.text


#: Who decides, resumes or cancels in the tests of lost replies: the proxy's marker.
LOSER = "lost-reply-operator"

VERBS: dict[str, Any] = {
    "approve": lambda run_id: scoria.approve_run(run_id, decided_by=LOSER),
    "approve-and-resume": lambda run_id: scoria.approve_run(run_id, decided_by=LOSER, resume=True),
    "reject": lambda run_id: scoria.reject_run(run_id, decided_by=LOSER),
    "resume": lambda run_id: scoria.resume_run(run_id, requested_by=LOSER),
    "cancel": lambda run_id: scoria.cancel_run(run_id, cancelled_by=LOSER),
}
#: The status each verb leaves the run in.
AFTER = {
    "approve": "waiting_for_approval",
    "approve-and-resume": "completed",
    "reject": "rejected",
    "resume": "completed",
    "cancel": "cancelled",
}


@contextmanager
def run_behind_a_proxy(
    database_uri: str, tmp_path: Path, handler: Any, **config: object
) -> Iterator[tuple[LosingProxy, Flask, str]]:
    """An app whose connections go through a :class:`LosingProxy`, and a run of it whose
    first step's ``handler`` may count its executions in ``tmp_path/executions``."""
    with (
        losing_proxy(database_uri) as (proxy, through_proxy),
        configured_app(
            through_proxy, tmp_path, SCORIA_ENGINE_OPTIONS={"pool_pre_ping": False}, **config
        ) as app,
    ):
        app.extensions["scoria"].handler("first")(handler)
        with app.app_context():
            run_id = scoria.start_run(
                IDENTITY,
                initial_step={"kind": "first"},
                runtime={"metadata": {"counter": str(tmp_path / "executions")}},
            ).run_id
        yield proxy, app, run_id


@contextmanager
def gated_run_behind_a_proxy(
    database_uri: str, tmp_path: Path
) -> Iterator[tuple[LosingProxy, Flask, str]]:
    """:func:`run_behind_a_proxy`, its run waiting for approval."""
    with run_behind_a_proxy(database_uri, tmp_path, counting_once_approved) as made:
        yield made


@only_postgres
@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("pipelines", [True, False], ids=["pipelined", "statement-by-statement"])
@pytest.mark.parametrize("verb", list(VERBS))
def test_a_change_whose_connection_failed_as_it_was_sent_is_done_once(
    database_uri: str, tmp_path: Path, verb: str, pipelines: bool, how: str
) -> None:
    """The connection failed once the change was sent: after the server committed it
    and before its answer came, at once whatever the server did with it, or as the
    server ended its process. The call tries again on a fresh connection; where the
    first commit went through, it finds its own change there and returns it as done.
    The handler of a claimed step runs once, at once."""
    counter = tmp_path / "executions"
    with gated_run_behind_a_proxy(database_uri, tmp_path) as (proxy, app, run_id):
        app.extensions["scoria"].storage(app).pipelines = pipelines
        with app.app_context():
            if verb == "resume":
                scoria.approve_run(run_id, decided_by="operator")
            proxy.fail_next(LOSER, how)
            done = VERBS[verb](run_id)
            # A connection whose server process ended after it answered may be back in
            # the pool; reads are not retried (see docs/operations.md).
            app.extensions["scoria"].storage(app).engine.dispose()
            detail = scoria.get_run_detail(run_id)
    assert proxy.failed == 1
    assert done.run_id == run_id and done.status == AFTER[verb] == detail.summary.status
    assert len(executions(counter)) == (1 if AFTER[verb] == "completed" else 0)
    types = [event.event_type for event in detail.events]
    assert [event.sequence for event in detail.events] == list(range(1, len(types) + 1))
    assert types.count("approval_decided") == (0 if verb in ("resume", "cancel") else 1) + (
        verb == "resume"
    )


@only_postgres
@pytest.mark.parametrize("resume", [False, True], ids=["approve", "approve-and-resume"])
def test_a_lost_answer_that_cannot_be_checked_is_a_storage_error(
    database_uri: str, tmp_path: Path, resume: bool
) -> None:
    """The approval's answer was lost and the database cannot be reached to see whether
    it committed: the call says so, rather than report somebody else's decision."""
    with gated_run_behind_a_proxy(database_uri, tmp_path) as (proxy, app, run_id):
        proxy.fail_next(LOSER, refuse=1)
        with app.app_context(), pytest.raises(scoria.StorageError):
            scoria.approve_run(run_id, decided_by=LOSER, resume=resume)
        app.extensions["scoria"].storage(app).engine.dispose()
        with app.app_context():
            (approval,) = scoria.get_run_detail(run_id).approvals
    assert (approval.status, approval.decided_by) == ("approved", LOSER)


@only_postgres
def test_a_start_whose_answer_is_lost_and_cannot_be_checked_names_its_run(
    database_uri: str, tmp_path: Path
) -> None:
    """The new run's answer was lost and the database cannot be reached to see whether
    it committed: the error names the run, so that the caller looks for it rather than
    starting a second one, and says what becomes of the step it did not execute."""
    counter = tmp_path / "executions"
    with (
        losing_proxy(database_uri) as (proxy, through_proxy),
        configured_app(
            through_proxy,
            tmp_path,
            SCORIA_ENGINE_OPTIONS={"pool_pre_ping": False},
            SCORIA_RECONNECT_ATTEMPTS=1,
        ) as app,
    ):
        app.extensions["scoria"].handler("first")(counting_handler)
        proxy.fail_next(LOSER, refuse=1)
        with app.app_context(), pytest.raises(StorageError) as raised:
            scoria.start_run(
                IDENTITY,
                initial_step={"kind": "first"},
                runtime={"metadata": {"counter": str(counter), "marker": LOSER}},
            )
        app.extensions["scoria"].storage(app).engine.dispose()
        with app.app_context():
            run = scoria.get_run(raised.value.run_id or "")
            (step,) = scoria.get_run_detail(run.run_id).steps
    assert proxy.failed == 1
    assert (run.status, step.status) == ("running", "running")
    assert "may have been written" in raised.value.message
    assert "lease expires" in raised.value.message
    assert not counter.exists()


@only_postgres
@pytest.mark.parametrize("how", HOWS)
def test_a_worker_claim_whose_connection_failed_runs_its_step_once(
    database_uri: str, tmp_path: Path, how: str
) -> None:
    """The connection of a worker's claim failed as it committed: a claim that went
    through is executed at once (not left running until its lease expires, which would
    spend an attempt the handler never had); one that did not is claimed again."""
    counter = tmp_path / "executions"
    with (
        run_behind_a_proxy(database_uri, tmp_path, counting_handler, SCORIA_EXECUTOR="worker") as (
            proxy,
            app,
            run_id,
        ),
        app.app_context(),
    ):
        (step,) = scoria.get_run_detail(run_id).steps
        proxy.fail_next(uuid.UUID(step.id).bytes, how)
        try:
            done = scoria.dispatch_queued()
        except scoria.StorageError:  # failed before its commit: nothing was claimed
            done = []
        if not done:  # the claim did not go through: the next look claims the step
            app.extensions["scoria"].storage(app).engine.dispose()
            done = scoria.dispatch_queued()
        app.extensions["scoria"].storage(app).engine.dispose()
        detail = scoria.get_run_detail(run_id)
    assert proxy.failed == 1
    assert [summary.status for summary in done] == ["completed"] == [detail.summary.status]
    assert len(executions(counter)) == 1
    assert detail.steps[0].attempt == 1
    assert "lease_expired" not in [event.event_type for event in detail.events]


def test_any_number_of_reconnect_attempts_waits_at_most_the_longest_delay() -> None:
    """``SCORIA_RECONNECT_ATTEMPTS`` set very high ("retry for ever"): the thousandth
    try after a dropped connection still waits, where the delay's doubling overflowed."""
    engine = sa.create_engine("sqlite://")
    storage = Storage(engine, reconnect_attempts=10_000)
    dropped = StorageError("connection dropped")
    dropped.__cause__ = sa.exc.DBAPIError(
        "SELECT 1", None, Exception("gone"), connection_invalidated=True
    )
    began = time.monotonic()
    assert storage.retry_after(dropped, 1_100)
    assert time.monotonic() - began <= RECONNECT_MAX_DELAY + 0.5
    assert not storage.retry_after(dropped, 10_001)
    engine.dispose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_forked_process_opens_connections_of_its_own(database_uri: str, tmp_path: Path) -> None:
    """A pre-forking server's worker, forked after the app used the database: it never
    shares the parent's pooled connections, which keep working in the parent."""
    with configured_app(database_uri, tmp_path) as app, app.app_context():
        run_id = scoria.start_run(IDENTITY).run_id
        engine = app.extensions["scoria"].storage(app).engine
        assert engine.pool.checkedin() >= 1
        pid = os.fork()
        if pid == 0:  # the child: reports through its exit status only
            code = 1
            try:
                inherited = engine.pool.checkedin()
                started = scoria.start_run(IDENTITY).status
                code = 0 if (inherited, started) == (0, "completed") else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert [scoria.get_run(run_id).status for _ in range(3)] == ["completed"] * 3
