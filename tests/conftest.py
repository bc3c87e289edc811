"""Fixtures: an app per test on SQLite and on PostgreSQL.

PostgreSQL comes from ``SCORIA_TEST_POSTGRES_URL`` (default: the local
server, database ``test``); each test session creates and drops its own
throwaway database there. Where PostgreSQL cannot be reached its tests are
skipped with the reason, unless ``SCORIA_REQUIRE_POSTGRES=1`` (set by CI),
which turns the skip into a failure. Redis (``SCORIA_TEST_REDIS_URL``) and
RabbitMQ (``SCORIA_TEST_AMQP_URL``) work the same way with
``SCORIA_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner

from flask_scoria import Scoria, schema

POSTGRES_URL = os.environ.get(
    "SCORIA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REQUIRE_POSTGRES = os.environ.get("SCORIA_REQUIRE_POSTGRES") == "1"
REDIS_URL = os.environ.get("SCORIA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("SCORIA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
REQUIRE_SERVICES = os.environ.get("SCORIA_REQUIRE_SERVICES") == "1"
BACKENDS = ("sqlite", "postgresql")
TABLES = ("scoria_handoffs", "scoria_events", "scoria_approvals", "scoria_steps", "scoria_runs")


@contextlib.contextmanager
def throwaway_postgres_database(prefix: str) -> Iterator[str]:
    """Create an empty PostgreSQL database, yield its URL, then drop it.

    Skips the test where PostgreSQL is unreachable, or fails it under
    ``SCORIA_REQUIRE_POSTGRES=1``.
    """
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        admin.dispose()
        message = f"PostgreSQL unreachable at {POSTGRES_URL}: {str(exc).splitlines()[0]}"
        if REQUIRE_POSTGRES:
            pytest.fail(message + " (SCORIA_REQUIRE_POSTGRES=1)")
        pytest.skip(message)
    try:
        yield sa.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def require_service(url: str) -> str:
    """``url`` if its server answers on its port; else skip loudly (fail under CI)."""
    parsed = sa.make_url(url.replace("amqp://", "amqp+x://"))
    try:
        socket.create_connection((parsed.host or "127.0.0.1", parsed.port or 0), timeout=2).close()
    except OSError as exc:
        message = f"SERVICE UNREACHABLE: {url.split('@')[-1]} ({exc}); start it to run this test"
        if REQUIRE_SERVICES:
            pytest.fail(message + " (SCORIA_REQUIRE_SERVICES=1)")
        pytest.skip(message)
    return url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of a throwaway PostgreSQL database, migrated, for this test session."""
    with throwaway_postgres_database("scoria_test") as url:
        engine = sa.create_engine(url)
        schema.upgrade(engine)
        engine.dispose()
        yield url


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The name of the database backend the test runs on."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def database_uri(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database for one test."""
    if backend == "sqlite":
        uri = f"sqlite:///{tmp_path / 'scoria.sqlite3'}"
        engine = sa.create_engine(uri)
        schema.upgrade(engine)
        engine.dispose()
        yield uri
        return
    if request.node.get_closest_marker("own_database"):
        # TRUNCATE keeps the statistics an ANALYZE gathered, and the next test's plans.
        with throwaway_postgres_database("scoria_own") as own:
            engine = sa.create_engine(own)
            schema.upgrade(engine)
            engine.dispose()
            yield own
        return
    uri = request.getfixturevalue("postgres_url")
    yield uri
    engine = sa.create_engine(uri)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {', '.join(TABLES)}")
    engine.dispose()


def create_test_app(database_uri: str, instance_path: Path, **config: object) -> Flask:
    """An app with flask-scoria on ``database_uri``; also used by child processes."""
    app = Flask("scoria_test_app", instance_path=str(instance_path))
    app.config.update(
        TESTING=True,
        SECRET_KEY="test-secret",
        SCORIA_DATABASE_URI=database_uri,
        **config,
    )
    Scoria(app)
    return app


@pytest.fixture
def app(database_uri: str, tmp_path: Path) -> Iterator[Flask]:
    app = create_test_app(database_uri, tmp_path / "instance")
    yield app
    app.extensions["scoria"].storage(app).engine.dispose()


@pytest.fixture
def runtime(app: Flask) -> Scoria:
    """The app's ``Scoria`` instance."""
    return app.extensions["scoria"]  # type: ignore[no-any-return]


@pytest.fixture
def app_ctx(app: Flask) -> Iterator[None]:
    with app.app_context():
        yield


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    return app.test_cli_runner()
