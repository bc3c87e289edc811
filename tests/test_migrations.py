"""The shipped Alembic revisions: up, check, down, from the CLI and from an installed wheel."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import sysconfig
import textwrap
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.util import CommandError
from conftest import TABLES, create_test_app, throwaway_postgres_database

import flask_scoria as scoria
from flask_scoria import runtime, schema
from flask_scoria.runtime import tables

REPO = Path(__file__).resolve().parent.parent
PIP = (sys.executable, "-m", "pip", "--quiet")


@pytest.fixture
def empty_database_uri(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database without any table, SQLite file or a fresh PostgreSQL database."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.sqlite3'}"
        return
    with throwaway_postgres_database("scoria_migrations") as url:
        yield url


def scoria_tables(engine: sa.Engine) -> set[str]:
    return {name for name in sa.inspect(engine).get_table_names() if name.startswith("scoria_")}


def test_upgrade_matches_models_and_downgrade_removes_everything(empty_database_uri: str) -> None:
    engine = sa.create_engine(empty_database_uri)
    try:
        assert schema.current_revision(engine) is None
        schema.upgrade(engine)
        assert schema.current_revision(engine) == schema.head_revision()
        assert scoria_tables(engine) == {*TABLES, schema.VERSION_TABLE}
        assert schema.differences(engine) == []
        schema.downgrade(engine)
        assert scoria_tables(engine) == set()
        assert schema.current_revision(engine) is None
        schema.upgrade(engine)
        assert schema.differences(engine) == []
    finally:
        engine.dispose()


def insert_run(
    conn: sa.Connection, tenant: str, revision: str, run_status: str, **step: Any
) -> tuple[uuid.UUID, uuid.UUID]:
    """A run in ``run_status`` and its one step (in that status too, unless ``step`` says
    otherwise), in the columns of ``revision`` (``scoria_0001`` or later); their ids."""
    run_id, step_id = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    later = revision != "scoria_0001"
    conn.execute(
        sa.insert(tables.runs).values(
            id=run_id,
            session_id="s-1",
            actor_id=None,
            tenant_id=tenant,
            root_role_id="executor",
            status=run_status,
            version=3,
            last_event_sequence=3,
            last_step_sequence=1,
            current_step_id=step_id,
            metadata={"payload": {"prompt": "x" * 5000}},
            created_at=now,
            started_at=now,
            completed_at=None,
            updated_at=now,
            **({"idempotency_key": f"key-{run_id}"} if later else {}),
        )
    )
    conn.execute(
        sa.insert(tables.steps)
        .values(
            id=step_id,
            run_id=run_id,
            parent_step_id=None,
            sequence=1,
            kind="approval",
            role_id="executor",
            status=run_status,
            attempt=1,
            handoff_input=None,
            projected_context=None,
            result_envelope=None,
            error_envelope=None,
            lease_token=None,
            lease_expires_at=None,
            started_at=now,
            completed_at=None,
            **({"input": {"n": 1}, "not_before": None, "trace_context": None} if later else {}),
        )
        .values(**step)
    )
    return run_id, step_id


def insert_paused_run(conn: sa.Connection, tenant: str, revision: str) -> uuid.UUID:
    """A run paused for approval, with its step, approval and events, in the columns of
    ``revision`` (``scoria_0001`` or ``scoria_0002``)."""
    run_id, step_id = insert_run(conn, tenant, revision, "waiting_for_approval")
    now = datetime.now(UTC)
    later = revision != "scoria_0001"
    conn.execute(
        sa.insert(tables.approvals).values(
            id=uuid.uuid4(),
            run_id=run_id,
            step_id=step_id,
            status="pending",
            tool_name="publish",
            arguments={"n": 1},
            reason=None,
            requested_at=now,
            decided_by=None,
            decided_at=None,
            note=None,
            **({"editable": True, "edited_arguments": None, "expires_at": None} if later else {}),
        )
    )
    conn.execute(
        sa.insert(tables.events),
        [
            {
                "run_id": run_id,
                "sequence": n,
                "event_type": kind,
                "step_id": None,
                "payload": None,
                "created_at": now,
            }
            for n, kind in enumerate(
                ("run_started", "step_started", "waiting_for_approval"), start=1
            )
        ],
    )
    return run_id


def row_counts(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            table: conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in TABLES
        }


def test_a_database_whose_revisions_the_app_history_records_is_not_migrated_here(
    tmp_path: Path,
) -> None:
    """Mounted in the app's Flask-Migrate history, its scoria revision is in alembic_version:
    schema.upgrade and downgrade would start a second record of the same tables."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'mounted.sqlite3'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        conn.exec_driver_sql(f"INSERT INTO alembic_version VALUES ('{schema.head_revision()}')")
    assert schema.mounted_in_host_history(engine)
    for migrate in (schema.upgrade, schema.downgrade):
        with pytest.raises(CommandError, match="flask db upgrade heads"):
            migrate(engine)
    assert sa.inspect(engine).get_table_names() == ["alembic_version"]
    engine.dispose()


def test_a_sqlite_file_that_cannot_be_opened_raises_storage_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine's relative path is the driver's, read from the working directory: the
    error names the file it resolves to, and says to create the folder or fix the path."""
    monkeypatch.chdir(tmp_path)
    engine = sa.create_engine("sqlite:///missing/scoria.sqlite3")
    path = tmp_path / "missing" / "scoria.sqlite3"
    hint = (
        f"SQLite cannot open the file {path}: its folder {path.parent} does not exist. Create"
        " the folder, or correct the path in SCORIA_DATABASE_URI (SQLALCHEMY_DATABASE_URI"
        " with Scoria(app, db=db))."
    )
    try:
        migrations = (schema.upgrade, schema.downgrade, schema.require_own_history)
        for migrate in (*migrations, lambda engine: schema.downgrade(engine, "-1")):
            with pytest.raises(scoria.StorageError) as info:
                migrate(engine)
            assert info.value.hint == hint
            assert info.value.message == (
                "The flask-scoria database is unavailable: OperationalError: unable to open"
                f" database file. {hint}"
            )
            assert isinstance(info.value.__cause__, sa.exc.OperationalError)
        assert not path.parent.exists()
        path.parent.mkdir()
        schema.upgrade(engine)
        assert schema.current_revision(engine) == schema.head_revision()
    finally:
        engine.dispose()


def test_migrations_and_the_runtime_raise_the_same_error_for_a_file_not_opened(
    tmp_path: Path,
) -> None:
    """The own engine's relative path is read from the instance folder: both name the
    file there."""
    app = create_test_app("sqlite:///data/scoria.sqlite3", tmp_path / "instance")
    engine = app.extensions["scoria"].storage(app).engine
    path = tmp_path / "instance" / "data" / "scoria.sqlite3"
    with pytest.raises(scoria.StorageError) as migrating:
        schema.upgrade(engine)
    with app.app_context(), pytest.raises(scoria.StorageError) as listing:
        scoria.list_runs_for_session("s-1")
    assert (
        migrating.value.hint
        == listing.value.hint
        == (
            f"SQLite cannot open the file {path}: its folder {path.parent} does not exist. Create"
            " the folder, or correct the path in SCORIA_DATABASE_URI (SQLALCHEMY_DATABASE_URI"
            " with Scoria(app, db=db))."
        )
    )
    assert migrating.value.message == listing.value.message
    engine.dispose()


def test_an_unknown_revision_is_alembics_error(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'scoria.sqlite3'}")
    try:
        for migrate in (schema.upgrade, schema.downgrade):
            with pytest.raises(CommandError, match="nosuchrev"):
                migrate(engine, "nosuchrev")
    finally:
        engine.dispose()


def test_upgrading_keeps_the_runs_of_the_first_revision(
    empty_database_uri: str, tmp_path: Path
) -> None:
    engine = sa.create_engine(empty_database_uri)
    try:
        schema.upgrade(engine, "scoria_0001")
        with engine.begin() as conn:
            run_id = insert_paused_run(conn, "t-1", "scoria_0001")
        schema.upgrade(engine)
        assert schema.current_revision(engine) == schema.head_revision()
        assert schema.differences(engine) == []
        app = create_test_app(empty_database_uri, tmp_path / "instance")
        with app.app_context():
            detail = scoria.get_run_detail(str(run_id))
            assert detail.summary.status == "waiting_for_approval"
            assert detail.summary.idempotency_key is None
            (step,) = detail.steps
            assert (step.input, step.not_before, step.idempotency_key) == ({}, None, step.id)
            (approval,) = detail.approvals
            assert (approval.editable, approval.edited_arguments, approval.expires_at) == (
                False,
                None,
                None,
            )
            scoria.approve_run(str(run_id), decided_by="ops")
            done = scoria.resume_run(str(run_id), handlers={"approval": lambda s, r: None})
            assert done.status == "completed"
        app.extensions["scoria"].storage(app).engine.dispose()

        schema.downgrade(engine, "scoria_0001")
        assert schema.current_revision(engine) == "scoria_0001"
        with engine.connect() as conn:
            count = conn.execute(sa.text("SELECT count(*) FROM scoria_runs")).scalar()
        assert count == 1
    finally:
        engine.dispose()


def test_a_revision_that_fails_changes_nothing_and_runs_again(empty_database_uri: str) -> None:
    engine = sa.create_engine(empty_database_uri)
    try:
        schema.upgrade(engine, "scoria_0001")
        with engine.begin() as conn:  # in the way of an index scoria_0002 builds
            conn.exec_driver_sql("CREATE TABLE in_the_way (x INTEGER)")
            conn.exec_driver_sql("CREATE INDEX ix_scoria_steps_queued ON in_the_way (x)")
        with pytest.raises(sa.exc.DatabaseError, match="ix_scoria_steps_queued"):
            schema.upgrade(engine)
        assert schema.current_revision(engine) == "scoria_0001"
        step_columns = {column["name"] for column in sa.inspect(engine).get_columns("scoria_steps")}
        assert "not_before" not in step_columns
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE in_the_way")
        schema.upgrade(engine)
        assert schema.current_revision(engine) == schema.head_revision()
        assert schema.differences(engine) == []
    finally:
        engine.dispose()


def test_migrations_run_at_once_take_turns(empty_database_uri: str) -> None:
    """Replicas that each migrate as they start: every upgrade succeeds, the first does
    the work, the others find it done."""
    engines = [sa.create_engine(empty_database_uri) for _ in range(3)]
    try:
        for _round in range(3):
            with ThreadPoolExecutor(len(engines)) as pool:
                list(pool.map(schema.upgrade, engines))  # raises what an upgrade raised
            assert schema.current_revision(engines[0]) == schema.head_revision()
            schema.downgrade(engines[0], "base")
    finally:
        for engine in engines:
            engine.dispose()


def test_migrating_through_the_cli_keeps_every_row(empty_database_uri: str, tmp_path: Path) -> None:
    """``flask scoria db`` migrates on the app's engine, which enforces SQLite's foreign keys:
    rebuilding ``scoria_runs`` must not delete the rows that reference it."""
    engine = sa.create_engine(empty_database_uri)
    app = create_test_app(empty_database_uri, tmp_path / "instance")
    runner = app.test_cli_runner()
    own = app.extensions["scoria"].storage(app).engine
    try:
        upgrade = runner.invoke(args=["scoria", "db", "upgrade", "scoria_0002"])
        assert upgrade.exit_code == 0, upgrade.output
        with engine.begin() as conn:
            insert_paused_run(conn, "t-1", "scoria_0002")
        before = row_counts(engine)
        downgrade = runner.invoke(args=["scoria", "db", "downgrade", "scoria_0001"])
        assert downgrade.exit_code == 0, downgrade.output
        assert row_counts(engine) == before
        if own.dialect.name == "sqlite":
            with own.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        own.dispose()
        engine.dispose()


def test_upgrading_keeps_the_runs_of_the_second_revision(
    empty_database_uri: str, backend: str, tmp_path: Path
) -> None:
    """Through ``flask scoria db``, whose engine enforces SQLite's foreign keys."""
    engine = sa.create_engine(empty_database_uri)
    app = create_test_app(empty_database_uri, tmp_path / "instance")
    runner = app.test_cli_runner()
    try:
        schema.upgrade(engine, "scoria_0002")
        with engine.begin() as conn:
            mine = insert_paused_run(conn, "t-1", "scoria_0002")
            theirs = insert_paused_run(conn, "t-2", "scoria_0002")
            conn.execute(
                sa.insert(tables.handoffs).values(
                    id=uuid.uuid4(),
                    run_id=mine,
                    parent_step_id=uuid.uuid4(),
                    child_step_id=None,
                    delegated_role_id="critic",
                    delegated_kind="review",
                    capability_tags=[],
                    handoff_input={"draft": "d"},
                    projected_context={},
                    created_at=datetime.now(UTC),
                )
            )
        before = row_counts(engine)
        upgrade = runner.invoke(args=["scoria", "db", "upgrade"])
        assert upgrade.exit_code == 0, upgrade.output
        assert row_counts(engine) == before
        assert schema.differences(engine) == []
        if backend == "sqlite":
            assert column_names(engine, "scoria_runs")[-1] == "metadata"
        with app.app_context():
            (waiting,) = runtime.pending_approvals("t-1").rows
            assert (waiting.run.run_id, waiting.approval.editable) == (str(mine), True)
            assert runtime.count_pending_approvals("t-2", up_to=10) == 1
            assert runtime.pending_approvals("t-2").rows[0].run.run_id == str(theirs)
            assert len(scoria.get_run_detail(str(mine)).handoffs) == 1
            scoria.approve_run(str(mine), decided_by="ops")
            done = scoria.resume_run(str(mine), handlers={"approval": lambda s, r: None})
            assert done.status == "completed"
            assert done.metadata == {"payload": {"prompt": "x" * 5000}}
            assert runtime.count_pending_approvals("t-1", up_to=10) == 0

        downgrade = runner.invoke(args=["scoria", "db", "downgrade", "scoria_0002"])
        assert downgrade.exit_code == 0, downgrade.output
        assert schema.current_revision(engine) == "scoria_0002"
        after = row_counts(engine)
        assert after == {**before, "scoria_events": after["scoria_events"]}
        if backend == "sqlite":
            assert column_names(engine, "scoria_runs")[-1] == "idempotency_key"
    finally:
        app.extensions["scoria"].storage(app).engine.dispose()
        engine.dispose()


def test_rebuilding_the_runs_table_refuses_enforced_foreign_keys(tmp_path: Path) -> None:
    """A host's Alembic on SQLite with foreign keys on gets an error, and keeps every row."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'host.sqlite3'}")

    @sa.event.listens_for(engine, "connect")
    def enforce(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA foreign_keys=ON")

    try:
        schema.upgrade(engine, "scoria_0002")
        with engine.begin() as conn:
            insert_paused_run(conn, "t-1", "scoria_0002")
        before = row_counts(engine)
        with engine.begin() as conn:
            config = Config()
            config.set_main_option("script_location", str(schema.migrations_path()))
            config.attributes["connection"] = conn
            with pytest.raises(RuntimeError, match="foreign_keys=OFF"):
                command.upgrade(config, "scoria_0003")
        assert schema.current_revision(engine) == "scoria_0002"
        assert row_counts(engine) == before
    finally:
        engine.dispose()


def column_names(engine: sa.Engine, table: str) -> list[str]:
    return [column["name"] for column in sa.inspect(engine).get_columns(table)]


def table_shapes(engine: sa.Engine, *, ordered: bool) -> dict[str, Any]:
    """Each ``scoria_*`` table as the database describes it, its columns in order if
    ``ordered``."""
    inspector = sa.inspect(engine)
    shapes = {}
    for table in TABLES:
        columns = [
            (column["name"], str(column["type"]), column["nullable"], column.get("default"))
            for column in inspector.get_columns(table)
        ]
        indexes = {
            index["name"]: (
                index["column_names"],
                bool(index["unique"]),
                {key: str(value) for key, value in index.get("dialect_options", {}).items()},
            )
            for index in inspector.get_indexes(table)
        }
        shapes[table] = {
            "columns": columns if ordered else sorted(columns),
            "indexes": indexes,
            "primary key": inspector.get_pk_constraint(table),
            "foreign keys": inspector.get_foreign_keys(table),
            "options": inspector.get_table_options(table),
        }
    return shapes


def test_revisions_build_the_tables_of_the_models(backend: str, tmp_path: Path) -> None:
    """Column order too, where it matters: on SQLite, which reads a row's columns in order
    (PostgreSQL keeps large values out of line, and its tables are not rebuilt)."""
    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            uris = [f"sqlite:///{tmp_path / name}.sqlite3" for name in ("revisions", "models")]
        else:
            uris = [
                stack.enter_context(throwaway_postgres_database(f"scoria_{name}"))
                for name in ("revisions", "models")
            ]
        migrated, modelled = (sa.create_engine(uri) for uri in uris)
        stack.callback(migrated.dispose)
        stack.callback(modelled.dispose)
        schema.upgrade(migrated)
        tables.metadata.create_all(modelled)
        ordered = backend == "sqlite"
        assert table_shapes(migrated, ordered=ordered) == table_shapes(modelled, ordered=ordered)


def test_db_commands(empty_database_uri: str, tmp_path: Path) -> None:
    app = create_test_app(empty_database_uri, tmp_path / "instance")
    runner = app.test_cli_runner()
    head = schema.head_revision()
    current = runner.invoke(args=["scoria", "db", "current"])
    assert current.exit_code == 0 and current.output.startswith("none")
    check = runner.invoke(args=["scoria", "db", "check"])
    assert check.exit_code != 0
    assert "flask scoria db upgrade" in check.output
    upgrade = runner.invoke(args=["scoria", "db", "upgrade"])
    assert upgrade.exit_code == 0, upgrade.output
    assert runner.invoke(args=["scoria", "db", "current"]).output.strip() == head
    check = runner.invoke(args=["scoria", "db", "check"])
    assert check.exit_code == 0, check.output
    assert head in check.output
    with app.app_context():
        assert scoria.start_run(scoria.identity({"session_id": "s"})).status == "completed"
    # Every way to name the base asks first; a step back that stops short does not, nor
    # one past the base, which Alembic refuses.
    for base in ([], ["scoria@base"], ["--", "-6"], ["--", "scoria@-6"], ["scoria_0001-1"]):
        refused = runner.invoke(args=["scoria", "db", "downgrade", *base], input="n\n")
        assert refused.exit_code == 1 and "drops every scoria_* table" in refused.output, base
        assert runner.invoke(args=["scoria", "db", "current"]).output.strip() == head
    for short_of_base in (["--", "-1"], ["head-1"], ["scoria@head-2"], ["scoria_0002+1"]):
        one_back = runner.invoke(args=["scoria", "db", "downgrade", *short_of_base])
        assert one_back.exit_code == 0 and "Go on?" not in one_back.output, one_back.output
        runner.invoke(args=["scoria", "db", "upgrade"])
    past_base = runner.invoke(args=["scoria", "db", "downgrade", "--", "-9"])
    assert past_base.exit_code == 1 and "Go on?" not in past_base.output, past_base.output
    downgrade = runner.invoke(args=["scoria", "db", "downgrade", "scoria@base"], input="y\n")
    assert downgrade.exit_code == 0, downgrade.output
    engine = app.extensions["scoria"].storage(app).engine
    assert scoria_tables(engine) == set()
    assert runner.invoke(args=["scoria", "db", "current"]).output.startswith("none")
    engine.dispose()


def test_init_app_runs_no_ddl(tmp_path: Path) -> None:
    path = tmp_path / "fresh.sqlite3"
    app = create_test_app(f"sqlite:///{path}", tmp_path / "instance")
    app.test_client().get("/scoria/workflows")
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
        app.extensions["scoria"].storage(app).engine.dispose()


def test_include_name_hides_scoria_tables() -> None:
    assert scoria.include_name("scoria_runs", "table", {}) is False
    assert scoria.include_name(schema.VERSION_TABLE, "table", {}) is False
    assert scoria.include_name("users", "table", {}) is True
    assert scoria.include_name("scoria_runs_status", "index", {}) is True
    assert schema.only_scoria_tables("scoria_runs", "table", {}) is True
    assert schema.only_scoria_tables("users", "table", {}) is False


MIGRATE_FROM_WHEEL = textwrap.dedent(
    """
    import sys
    import sqlalchemy as sa
    import flask_scoria
    from flask_scoria import schema

    engine = sa.create_engine("sqlite:///" + sys.argv[1])
    schema.upgrade(engine)
    print(flask_scoria.__file__)
    print(schema.migrations_path())
    print(schema.current_revision(engine))
    """
)


def test_installed_wheel_migrates_a_database(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(REPO)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("flask_scoria-*.whl")
    target = tmp_path / "installed"
    subprocess.run(
        [*PIP, "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        cwd=tmp_path,
    )
    database = tmp_path / "from-wheel.sqlite3"
    dependencies = sysconfig.get_paths()["purelib"]
    # -S: no site module, so the editable install's .pth cannot add the source tree
    done = subprocess.run(
        [sys.executable, "-S", "-c", MIGRATE_FROM_WHEEL, str(database)],
        env={"PYTHONPATH": os.pathsep.join([str(target), dependencies]), "PATH": "/usr/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    module_file, migrations, revision = done.stdout.split()
    assert Path(module_file).is_relative_to(target)
    assert Path(migrations).is_relative_to(target)
    assert revision == schema.head_revision()
    engine = sa.create_engine(f"sqlite:///{database}")
    try:
        assert scoria_tables(engine) == {*TABLES, schema.VERSION_TABLE}
        assert schema.differences(engine) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_status_index_built_beforehand_is_left_as_it_is(empty_database_uri: str) -> None:
    """The index ``scoria_0004`` builds, built by hand first without blocking writes (as
    docs/migrations.md shows), is not built again."""
    engine = sa.create_engine(empty_database_uri)
    name = "ix_scoria_runs_status_tenant_created"
    migrations_doc = Path(__file__).parent.parent / "docs" / "migrations.md"
    (by_hand,) = [
        block.split("```")[0]
        for block in migrations_doc.read_text().split("```sql\n")[1:]
        if "CONCURRENTLY" in block.split("```")[0]
    ]
    try:
        schema.upgrade(engine, "scoria_0003")
        # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for statement in by_hand.split(";"):
                if statement.strip():
                    conn.exec_driver_sql(statement)
            built = conn.exec_driver_sql(f"SELECT to_regclass('{name}')::oid").scalar()
        schema.upgrade(engine)
        with engine.connect() as conn:
            assert conn.exec_driver_sql(f"SELECT to_regclass('{name}')::oid").scalar() == built
        assert schema.differences(engine) == []
    finally:
        engine.dispose()


def test_check_sees_a_partial_index_whose_condition_differs(empty_database_uri: str) -> None:
    """Autogenerate compares no index conditions: an index rebuilt by hand under a model's
    name, without its condition or with another, is a difference all the same."""
    engine = sa.create_engine(empty_database_uri)
    try:
        schema.upgrade(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP INDEX ix_scoria_steps_lease")
            conn.exec_driver_sql(
                "CREATE INDEX ix_scoria_steps_lease ON scoria_steps (lease_expires_at)"
            )
            conn.exec_driver_sql("DROP INDEX ix_scoria_approvals_expiring")
            conn.exec_driver_sql(
                "CREATE INDEX ix_scoria_approvals_expiring ON scoria_approvals (expires_at)"
                " WHERE status = 'rejected' AND expires_at IS NOT NULL"
            )
        found = schema.differences(engine)
        assert {(kind, name, expected) for kind, name, expected, _ in found} == {
            ("modify_index_condition", "ix_scoria_steps_lease", "lease_expires_at IS NOT NULL"),
            (
                "modify_index_condition",
                "ix_scoria_approvals_expiring",
                "status = 'pending' AND expires_at IS NOT NULL",
            ),
        }
        assert {name: actual for _, name, _, actual in found}["ix_scoria_steps_lease"] is None
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_event_types_are_one_enumerated_type_on_postgresql(empty_database_uri: str) -> None:
    """The revisions' enumerated type holds every ``EventType``, and the column uses it:
    a new member without a revision that adds it would fail at its first event."""
    engine = sa.create_engine(empty_database_uri)
    try:
        schema.upgrade(engine)
        with engine.connect() as conn:
            values = conn.exec_driver_sql(
                "SELECT unnest(enum_range(NULL::scoria_event_type))::text"
            ).scalars()
            column_type = conn.exec_driver_sql(
                "SELECT udt_name FROM information_schema.columns"
                " WHERE table_name = 'scoria_events' AND column_name = 'event_type'"
            ).scalar_one()
        assert sorted(values) == sorted(scoria.EventType)
        assert column_type == "scoria_event_type"
        schema.downgrade(engine, "scoria_0004")
        with engine.connect() as conn:
            gone = conn.exec_driver_sql("SELECT to_regtype('scoria_event_type')").scalar()
        assert gone is None
    finally:
        engine.dispose()


def test_upgrading_gives_queued_steps_without_a_time_one(
    empty_database_uri: str, tmp_path: Path
) -> None:
    """Steps queued before ``scoria_0002`` had no ``not_before``: due at once, and still
    claimed once a worker looks for due steps only by their time."""
    engine = sa.create_engine(empty_database_uri)
    app = create_test_app(empty_database_uri, tmp_path / "instance")
    executed: list[str] = []
    app.extensions["scoria"].handler("work")(lambda step, run: executed.append(step.id))
    now = datetime.now(UTC)
    try:
        schema.upgrade(engine, "scoria_0005")
        queued = {}
        with engine.begin() as conn:
            for name, not_before in (("untimed", None), ("later", now + timedelta(days=1))):
                _, queued[name] = insert_run(
                    conn,
                    "t-1",
                    "scoria_0005",
                    "running",
                    kind="work",
                    status="queued",
                    not_before=not_before,
                )
        schema.upgrade(engine)
        with engine.connect() as conn:
            times = dict(
                conn.execute(sa.select(tables.steps.c.id, tables.steps.c.not_before)).all()
            )
        assert now <= times[queued["untimed"]] <= datetime.now(UTC)
        assert times[queued["later"]] == now + timedelta(days=1)
        with app.app_context():
            done = scoria.dispatch_queued()
        assert [run.status for run in done] == ["completed"]
        assert executed == [str(queued["untimed"])]
    finally:
        app.extensions["scoria"].storage(app).engine.dispose()
        engine.dispose()
