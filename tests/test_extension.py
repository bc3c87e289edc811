"""Wiring: the host's Flask-SQLAlchemy engine, configuration, the default database."""

from __future__ import annotations

import importlib.util
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

import flask_scoria as scoria
from flask_scoria import Scoria, schema


def make_host_app(database_uri: str, instance_path: Path) -> tuple[Flask, SQLAlchemy, type]:
    app = Flask("host", instance_path=str(instance_path))
    app.config.update(SQLALCHEMY_DATABASE_URI=database_uri, TESTING=True)
    db = SQLAlchemy(app)

    class Note(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "host_notes"
        id: Mapped[int] = mapped_column(primary_key=True)
        text: Mapped[str]

    Scoria(app, db=db)
    with app.app_context():
        db.create_all()
    return app, db, Note


def test_host_engine_is_used_and_host_session_is_left_alone(
    database_uri: str, tmp_path: Path
) -> None:
    app, db, note = make_host_app(database_uri, tmp_path / "instance")
    # Nothing to open there: a read-only root filesystem needs no instance folder.
    assert not (tmp_path / "instance").exists()
    with app.app_context():
        assert app.extensions["scoria"].storage().engine is db.engine
        db.session.add(note(text="not committed by scoria"))
        run = scoria.start_run(scoria.identity({"session_id": "host-session"}))
        db.session.rollback()
        assert db.session.scalar(sa.select(sa.func.count()).select_from(note)) == 0
        assert scoria.get_run(run.run_id).status == "completed"
        db.session.remove()
        db.drop_all()
        db.engine.dispose()


def test_each_app_of_a_shared_db_gets_its_own_engine(tmp_path: Path) -> None:
    """One ``SQLAlchemy`` and one ``Scoria`` for two apps (an app factory's tests): an
    app's storage is its own engine, whichever app's context is current."""
    db = SQLAlchemy()
    runtime = Scoria(db=db)
    apps = []
    for name in ("a", "b"):
        app = Flask(name, instance_path=str(tmp_path / name))
        app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / name}.sqlite3"
        db.init_app(app)
        runtime.init_app(app)
        apps.append(app)
    first, second = apps
    with first.app_context():
        assert str(runtime.storage(second).engine.url).endswith("b.sqlite3")
        assert str(runtime.storage(first).engine.url).endswith("a.sqlite3")
    for app in apps:
        with app.app_context():
            db.engine.dispose()


def test_host_engine_shares_postgres_transactions_safely(postgres_url: str, tmp_path: Path) -> None:
    """A flushed, uncommitted host write does not block or leak into a scoria write."""
    app, db, note = make_host_app(postgres_url, tmp_path / "instance")
    with app.app_context():
        db.session.add(note(text="flushed, then rolled back"))
        db.session.flush()
        run = scoria.start_run(scoria.identity({"session_id": "pg-host"}))
        db.session.rollback()
        assert db.session.scalar(sa.select(sa.func.count()).select_from(note)) == 0
        assert [r.run_id for r in scoria.list_runs_for_session("pg-host")] == [run.run_id]
        db.session.remove()
        db.drop_all()
        db.engine.dispose()


def test_a_host_sqlite_engine_that_sends_its_own_begin(tmp_path: Path) -> None:
    """SQLAlchemy's recipe for pysqlite (the driver's own transactions off, ``BEGIN``
    sent on the ``begin`` event, foreign keys on) leaves a transaction open when
    flask-scoria starts its own: migrations (whose table rebuild needs the foreign keys
    off), writes and snapshot reads still work, and so does the host."""
    app, db, note = make_host_app(f"sqlite:///{tmp_path / 'host.sqlite3'}", tmp_path / "i")
    runtime = app.extensions["scoria"]
    runtime.handler("ask")(
        lambda step, run: {"done": True} if step.approval else scoria.WaitForApproval("send")
    )
    with app.app_context():

        def connect(dbapi: Any, _record: Any) -> None:
            dbapi.isolation_level = None
            dbapi.execute("PRAGMA foreign_keys=ON")

        sa.event.listen(db.engine, "connect", connect)
        sa.event.listen(db.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
        db.engine.dispose()
        schema.upgrade(db.engine)
        run = scoria.start_run(scoria.identity({"actor_id": "a"}), initial_step={"kind": "ask"})
        assert run.status == "waiting_for_approval"
        scoria.approve_run(run.run_id, decided_by="ops")
        assert scoria.resume_run(run.run_id).status == "completed"
        assert scoria.get_run_detail(run.run_id).steps[0].result_envelope == {"done": True}
        with db.engine.connect() as conn:  # the migration turned them on again
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        db.session.add(note(text="the host's own write"))
        db.session.commit()
        assert db.session.scalar(sa.select(sa.func.count()).select_from(note)) == 1
        db.session.remove()
        db.engine.dispose()


def test_default_database_lives_in_the_instance_folder(tmp_path: Path) -> None:
    app = Flask("default_db", instance_path=str(tmp_path / "instance"))
    runtime = Scoria(app)
    engine = runtime.storage(app).engine
    assert engine.url.database == str(tmp_path / "instance" / "scoria.sqlite3")
    schema.upgrade(engine)
    with app.app_context():
        run = scoria.start_run(None)
        assert scoria.get_run(run.run_id).status == "completed"
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    engine.dispose()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("SCORIA_SQLITE_SYNCHRONOUS", "SOMETIMES", "SCORIA_SQLITE_SYNCHRONOUS"),
        ("SCORIA_URL_PREFIX", "scoria", "SCORIA_URL_PREFIX"),
        ("SCORIA_URL_PREFIX", "/", "SCORIA_URL_PREFIX"),
        # Would mount the operator pages at the site's root.
        ("SCORIA_URL_PREFIX", "//", "SCORIA_URL_PREFIX"),
        ("SCORIA_URL_PREFIX", "//ops", "SCORIA_URL_PREFIX"),
        ("SCORIA_URL_PREFIX", "/<x>", "SCORIA_URL_PREFIX"),
        ("SCORIA_URL_PREFIX", "/ops?x", "SCORIA_URL_PREFIX"),
        ("SCORIA_URL_PREFIX", "/ops#x", "SCORIA_URL_PREFIX"),
        ("SCORIA_URL_PREFIX", "/ops x", "SCORIA_URL_PREFIX"),
        ("SCORIA_STEP_LEASE_SECONDS", 0, "SCORIA_STEP_LEASE_SECONDS"),
        ("SCORIA_HANDOFF_MAX_DEPTH", -1, "SCORIA_HANDOFF_MAX_DEPTH"),
        ("SCORIA_HANDOFF_MAX_DEPTH", 65, "SCORIA_HANDOFF_MAX_DEPTH"),
        ("SCORIA_STEP_LEASE_SECONDS", "soon", "SCORIA_STEP_LEASE_SECONDS"),
        ("SCORIA_HANDOFF_MAX_BYTES", None, "SCORIA_HANDOFF_MAX_BYTES"),
        ("SCORIA_HANDOFF_MAX_BYTES", True, "SCORIA_HANDOFF_MAX_BYTES"),
        ("SCORIA_SQLITE_BUSY_TIMEOUT", -1, "SCORIA_SQLITE_BUSY_TIMEOUT"),
        # Beyond what a datetime, a driver's timeout or an int can hold.
        ("SCORIA_STEP_LEASE_SECONDS", 1e12, "SCORIA_STEP_LEASE_SECONDS"),
        ("SCORIA_STEP_LEASE_SECONDS", float("inf"), "SCORIA_STEP_LEASE_SECONDS"),
        ("SCORIA_STATEMENT_TIMEOUT", 1e20, "SCORIA_STATEMENT_TIMEOUT"),
        ("SCORIA_CONNECT_TIMEOUT", float("nan"), "SCORIA_CONNECT_TIMEOUT"),
        ("SCORIA_SQLITE_BUSY_TIMEOUT", 1e12, "SCORIA_SQLITE_BUSY_TIMEOUT"),
        ("SCORIA_INLINE_RETRY_WAIT", 1e12, "SCORIA_INLINE_RETRY_WAIT"),
        ("SCORIA_MAX_STEPS", float("inf"), "SCORIA_MAX_STEPS"),
        ("SCORIA_STEP_LEASE_SECONDS", 10**400, "SCORIA_STEP_LEASE_SECONDS"),
        ("SCORIA_RECONNECT_ATTEMPTS", float("inf"), "SCORIA_RECONNECT_ATTEMPTS"),
        ("SCORIA_DATABASE_URI", "not a url", "SCORIA_DATABASE_URI"),
        ("SCORIA_DATABASE_URI", "postgress://db/app", "SCORIA_DATABASE_URI"),
        ("SCORIA_ENGINE_OPTIONS", "pool_size=5", "SCORIA_ENGINE_OPTIONS"),
        ("SCORIA_ENGINE_OPTIONS", {"pool_sise": 5}, "SCORIA_ENGINE_OPTIONS"),
        ("SCORIA_ENGINE_OPTIONS", {"connect_args": "x"}, "SCORIA_ENGINE_OPTIONS"),
        ("SCORIA_DATABASE_URI", "mysql+nosuchdriver://db/app", "SCORIA_DATABASE_URI"),
        ("SCORIA_HANDOFF_MAX_BYTES", 1.5, "SCORIA_HANDOFF_MAX_BYTES"),
        ("SCORIA_REDACT_KEYS", [1, 2], "SCORIA_REDACT_KEYS"),
    ],
)
def test_bad_configuration_is_refused_at_init(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    app = Flask("bad_config", instance_path=str(tmp_path))
    app.config[key] = value
    with pytest.raises(ValueError, match=message):
        Scoria(app)
    assert "scoria" not in app.extensions


def test_a_url_whose_driver_is_not_installed_is_refused_at_init(tmp_path: Path) -> None:
    if importlib.util.find_spec("MySQLdb") is not None:
        pytest.skip("mysqlclient is installed here")
    app = Flask("no_driver", instance_path=str(tmp_path))
    app.config["SCORIA_DATABASE_URI"] = "mysql+mysqldb://db/app"
    with pytest.raises(ValueError, match=r"SCORIA_DATABASE_URI.*MySQLdb"):
        Scoria(app)


def test_a_missing_psycopg_names_the_extra_that_installs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As where neither driver was ever installed.
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    for uri in ("postgresql+psycopg://db/app", "postgresql://db/app", "postgres://db/app"):
        app = Flask("no_psycopg", instance_path=str(tmp_path))
        app.config["SCORIA_DATABASE_URI"] = uri
        with pytest.raises(
            ValueError, match=r"pip install '\.\[postgres\]'.*postgresql\+psycopg://"
        ):
            Scoria(app)


def test_defaults_are_written_to_the_config(tmp_path: Path) -> None:
    app = Flask("defaults", instance_path=str(tmp_path))
    runtime = Scoria(app)
    assert app.config["SCORIA_URL_PREFIX"] == "/scoria"
    assert app.config["SCORIA_STEP_LEASE_SECONDS"] == 300.0
    assert runtime.settings(app).handoff_max_bytes == 64 * 1024
    runtime.storage(app).engine.dispose()


def test_one_extension_serves_several_apps(tmp_path: Path) -> None:
    runtime = Scoria()
    first = Flask("first", instance_path=str(tmp_path / "a"))
    second = Flask("second", instance_path=str(tmp_path / "b"))
    runtime.init_app(first)
    runtime.init_app(second)
    assert runtime.storage(first).engine is not runtime.storage(second).engine
    for app in (first, second):
        schema.upgrade(runtime.storage(app).engine)
        with app.app_context():
            scoria.start_run({"session_id": app.name})
    with first.app_context():
        assert len(scoria.list_runs_for_session("first")) == 1
        assert scoria.list_runs_for_session("second") == []
    for app in (first, second):
        runtime.storage(app).engine.dispose()


def test_the_registered_handlers_and_scope_can_be_read_not_changed() -> None:
    runtime = Scoria()
    assert dict(runtime.handlers) == {} and runtime.operator_scope_resolver is None

    @runtime.handler("draft")
    def draft(step: scoria.StepView, run: scoria.RunSummary) -> scoria.Succeed:
        return scoria.Succeed({})

    @runtime.operator_scope
    def scope() -> None:
        return None

    assert list(runtime.handlers) == ["draft"] and runtime.operator_scope_resolver is scope
    with pytest.raises(TypeError):
        runtime.handlers["other"] = draft  # type: ignore[index]


def test_handler_kind_must_be_named(tmp_path: Path) -> None:
    runtime = Scoria()
    with pytest.raises(ValueError, match="non-empty"):
        runtime.handler(" ")
    for unreadable in ("k" * 65, "tab\tkind"):
        with pytest.raises(ValueError, match="at most 64"):
            runtime.handler(unreadable)


def test_a_kind_has_one_handler() -> None:
    """A second function for a kind would resume the first one's paused runs."""
    runtime = Scoria()

    @runtime.handler("draft", retry=scoria.Retry(attempts=3))
    def billing_draft(step: scoria.StepView, run: scoria.RunSummary) -> scoria.Succeed:
        return scoria.Succeed({})

    def support_draft(step: scoria.StepView, run: scoria.RunSummary) -> scoria.Succeed:
        return scoria.Succeed({})

    with pytest.raises(ValueError, match=r"'draft' already have a handler, .*billing_draft"):
        runtime.handler("draft")(support_draft)
    assert runtime.handlers["draft"] is billing_draft
    # The same function again, as a module imported twice registers it: no change.
    runtime.handler("draft", retry=scoria.Retry(attempts=3))(billing_draft)
    runtime.handler("other")(support_draft)
    assert dict(runtime.handlers) == {"draft": billing_draft, "other": support_draft}
    runtime.handler("quick")(lambda step, run: {"v": 1})
    with pytest.raises(ValueError, match="'quick' already have a handler"):
        runtime.handler("quick")(lambda step, run: {"v": 2})
    # An app factory called twice makes its callable handlers again: the same class.
    runtime.handler("drafter")(Drafter("a"))
    runtime.handler("drafter")(Drafter("a"))
    with pytest.raises(ValueError, match="'drafter' already have a handler"):
        runtime.handler("drafter")(billing_draft)
    # Methods and partials are told apart by the function they call, and its arguments.
    runtime.handler("method")(Drafter("a").draft)
    runtime.handler("method")(Drafter("b").draft)
    with pytest.raises(ValueError, match=r"'method' already have a handler, .*Drafter\.draft"):
        runtime.handler("method")(Drafter("a").discard)
    runtime.handler("partial")(partial(Drafter.draft, Drafter("a")))
    with pytest.raises(ValueError, match="'partial' already have a handler"):
        runtime.handler("partial")(partial(Drafter.discard, Drafter("a")))


class Drafter:
    def __init__(self, model: str) -> None:
        self.model = model

    def __call__(self, step: scoria.StepView, run: scoria.RunSummary) -> scoria.Succeed:
        return scoria.Succeed({"model": self.model})

    def draft(self, step: scoria.StepView, run: scoria.RunSummary) -> scoria.Succeed:
        return scoria.Succeed({"model": self.model})

    def discard(self, step: scoria.StepView, run: scoria.RunSummary) -> None:
        return None


def test_a_handler_registered_without_its_kind_says_how() -> None:
    runtime = Scoria()
    with pytest.raises(ValueError, match=r'write @runtime.handler\("kind"\) above draft'):

        @runtime.handler  # type: ignore[arg-type]
        def draft(step: scoria.StepView, run: scoria.RunSummary) -> None:
            return None


def test_the_celery_executor_without_celery_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As where Celery was never installed.
    monkeypatch.setitem(sys.modules, "celery", None)
    monkeypatch.delitem(sys.modules, "flask_scoria.celery_tasks", raising=False)
    monkeypatch.delattr(scoria, "celery_tasks", raising=False)
    with pytest.raises(ImportError, match=r'pip install "flask-scoria\[celery\]"'):
        Scoria().handler("later", executor="celery")
    app = Flask("no_celery", instance_path=str(tmp_path))
    app.config["SCORIA_EXECUTOR"] = "celery"
    with pytest.raises(ImportError, match="needs Celery"):
        Scoria(app)


def test_a_handler_kind_is_registered_as_start_run_reads_it(tmp_path: Path) -> None:
    app = Flask("padded", instance_path=str(tmp_path))
    runtime = Scoria(app)
    runtime.handler(" review ")(lambda step, run: {"ok": True})
    assert list(runtime.handlers) == ["review"]
    with app.app_context():
        schema.upgrade(runtime.storage(app).engine)
        run = scoria.start_run({"tenant_id": "t"}, initial_step={"kind": " review"})
    assert run.status == "completed"


def test_a_relative_sqlite_path_is_in_the_instance_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    app = Flask("relative", instance_path=str(tmp_path / "instance"))
    app.config["SCORIA_DATABASE_URI"] = "sqlite:///runs.sqlite3"
    runtime = Scoria(app)
    engine = runtime.storage(app).engine
    assert engine.url.database == str(tmp_path / "instance" / "runs.sqlite3")
    absolute = Flask("absolute", instance_path=str(tmp_path / "other"))
    absolute.config["SCORIA_DATABASE_URI"] = f"sqlite:///{tmp_path / 'abs.sqlite3'}"
    assert Scoria(absolute).storage(absolute).engine.url.database == str(tmp_path / "abs.sqlite3")
    engine.dispose()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("ssn", ("ssn",)), ("ssn, IBAN", ("ssn", "iban")), (["customerSSN"], ("customer_ssn",))],
)
def test_redact_keys_from_a_list_or_one_string(
    tmp_path: Path, value: object, expected: tuple[str, ...]
) -> None:
    app = Flask("redact", instance_path=str(tmp_path))
    app.config["SCORIA_REDACT_KEYS"] = value
    assert Scoria(app).settings(app).redact_keys == expected


def test_unknown_scoria_keys_are_named_in_a_warning(tmp_path: Path) -> None:
    app = Flask("typo", instance_path=str(tmp_path))
    app.config["SCORIA_DATABASE_URL"] = "sqlite:///elsewhere.sqlite3"
    with pytest.warns(UserWarning, match="SCORIA_DATABASE_URL"):
        Scoria(app)


def test_own_engine_keys_with_a_host_db_are_named_in_a_warning(tmp_path: Path) -> None:
    app = Flask("host_db", instance_path=str(tmp_path))
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'app.sqlite3'}",
        SCORIA_DATABASE_URI=f"sqlite:///{tmp_path / 'tests.sqlite3'}",
    )
    db = SQLAlchemy(app)
    with pytest.warns(UserWarning, match="SCORIA_DATABASE_URI"):
        Scoria(app, db=db)
    with app.app_context():
        db.engine.dispose()


def test_a_host_db_that_was_never_initialized_is_named(tmp_path: Path) -> None:
    app = Flask("forgot", instance_path=str(tmp_path))
    runtime = Scoria(app, db=SQLAlchemy())
    with app.app_context(), pytest.raises(RuntimeError, match=r"db.init_app\(app\)"):
        runtime.storage()
