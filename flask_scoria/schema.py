"""Applying and checking the shipped Alembic revisions of the ``scoria_*`` tables."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from .runtime import metadata
from .storage import begin_sqlite, connect

#: The table that records which flask-scoria revision a database is at.
VERSION_TABLE = "scoria_alembic_version"
#: Alembic's default version table, where a host that mounts the revisions records them.
HOST_VERSION_TABLE = "alembic_version"


def migrations_path() -> Path:
    """The folder of the shipped revisions, installed or in a source checkout."""
    packaged = Path(__file__).with_name("migrations")
    if packaged.is_dir():
        return packaged
    return Path(__file__).parent.parent / "migrations"


def versions_path() -> Path:
    """The ``versions`` folder, for a host's Alembic ``version_locations``."""
    return migrations_path() / "versions"


def only_scoria_tables(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic ``include_name`` hook limiting a comparison to ``scoria_*`` tables."""
    if type_ == "table":
        return name is not None and name.startswith("scoria_")
    return True


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic ``include_name`` hook that hides the ``scoria_*`` tables.

    Pass it to a host's ``Migrate(..., include_name=include_name)`` (or
    ``context.configure``) so that autogenerate never proposes dropping them.
    """
    if type_ == "table" and name is not None:
        return not name.startswith("scoria_")
    return True


#: The key of the PostgreSQL advisory lock that migrations hold until they commit.
_MIGRATION_LOCK = 0x5C0_41A


@contextmanager
def _alembic(engine: Engine) -> Iterator[Config]:
    require_own_history(engine)
    with engine.connect() as connection:
        enforced = _suspend_foreign_keys(connection)
        try:
            with connection.begin():
                if connection.dialect.name == "sqlite":
                    # pysqlite leaves DDL outside any transaction: without this, a
                    # revision that fails halfway keeps what it did, and never reruns.
                    _begin_immediate(connection)
                elif connection.dialect.name == "postgresql":
                    # Replicas that migrate as they start take turns: the second
                    # reads the version the first committed, and has nothing to do.
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
                config = Config()
                config.set_main_option("script_location", str(migrations_path()))
                config.attributes["connection"] = connection
                yield config
        finally:
            if enforced:
                _pragma(connection, "PRAGMA foreign_keys=ON")


@contextmanager
def _driver_errors(connection: Connection, statement: str) -> Iterator[None]:
    """The driver's errors of ``statement`` (a database locked past the busy timeout)
    raised as SQLAlchemy's, as every other statement's are."""
    driver_error = connection.dialect.loaded_dbapi.Error
    try:
        yield
    except driver_error as exc:
        raise DBAPIError.instance(statement, None, exc, driver_error) from exc


def _begin_immediate(connection: Connection) -> None:
    with _driver_errors(connection, "BEGIN IMMEDIATE"):
        begin_sqlite(connection, "IMMEDIATE")


def _pragma(connection: Connection, statement: str) -> Any:
    """The first value ``statement`` reads, run on the driver's connection: a PRAGMA that
    a transaction would ignore (``foreign_keys``) stays out of the one a host engine
    begins on SQLAlchemy's ``begin`` event."""
    driver: Any = connection.connection.driver_connection
    with _driver_errors(connection, statement):
        cursor = driver.cursor()
        try:
            row = cursor.execute(statement).fetchone()
        finally:
            cursor.close()
    return None if row is None else row[0]


def _suspend_foreign_keys(connection: Connection) -> bool:
    """Turn SQLite's foreign keys off for a migration; whether they were on.

    Alembic rebuilds a table on SQLite by dropping the old one, which with
    foreign keys on deletes the rows of every table referencing it: a rebuild
    of ``scoria_runs`` would delete every step, event, approval and handoff.
    """
    if connection.dialect.name != "sqlite":
        return False
    enforced = bool(_pragma(connection, "PRAGMA foreign_keys"))
    _pragma(connection, "PRAGMA foreign_keys=OFF")
    return enforced


def upgrade(engine: Engine, revision: str = "heads") -> None:
    """Bring the ``scoria_*`` tables up to ``revision`` (default: the newest).

    Raises :class:`~flask_scoria.StorageError` when no connection to the database can
    be opened (a SQLite file whose folder does not exist), with the runtime's hint:
    the file it tried, and what to do. Raises Alembic's ``CommandError`` on a database
    whose scoria revisions are mounted in the app's own Alembic history, and for an
    unknown revision. A revision that fails raises SQLAlchemy's error and changes
    nothing. So does :func:`downgrade`.
    """
    with _alembic(engine) as config:
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    """Take the ``scoria_*`` tables down to ``revision`` (default: none at all).

    Down to the base (``base``, ``scoria@base``, or steps back such as ``-6``
    that reach it) the version table goes too, so no ``scoria_*`` table is left.
    """
    to_base = reaches_base(engine, revision)
    with _alembic(engine) as config:
        command.downgrade(config, revision)
        if to_base:
            config.attributes["connection"].exec_driver_sql(f"DROP TABLE IF EXISTS {VERSION_TABLE}")


#: A revision relative to another, as Alembic writes them: ``-2``, ``scoria@-2``,
#: ``head-1``, ``scoria_0003-2``, ``scoria_0002+1`` (from the database's revision when
#: none is named).
_RELATIVE = re.compile(r"(?:\w+@)?(?P<start>\w+?)?(?P<sign>[+-])(?P<steps>\d+)")


def reaches_base(engine: Engine, revision: str) -> bool:
    """Whether a downgrade of ``engine`` to ``revision`` leaves no revision at all.

    An unknown revision raises Alembic's ``CommandError``; steps back past the
    base are Alembic's to refuse, so they do not count as reaching it.
    """
    scripts = _scripts()
    relative = _RELATIVE.fullmatch(revision)
    if relative is None:
        return not scripts.get_revisions(revision)
    if relative["sign"] == "+":
        return False
    start = relative["start"]
    if start is None:
        reached = current_revision(engine)
    else:
        found = scripts.get_revisions(start)
        reached = found[0].revision if found else None
    for _ in range(int(relative["steps"])):
        if reached is None:
            return False
        down = scripts.get_revision(reached).down_revision
        reached = down if isinstance(down, str) else None
    return reached is None


def _scripts() -> ScriptDirectory:
    config = Config()
    config.set_main_option("script_location", str(migrations_path()))
    return ScriptDirectory.from_config(config)


def _recorded(engine: Engine) -> tuple[str, str] | None:
    """The version table holding a flask-scoria revision, and that revision."""
    known = {script.revision for script in _scripts().walk_revisions()}
    # The first connection of every function here: one that cannot open says why.
    with connect(engine) as connection:
        for table in (VERSION_TABLE, HOST_VERSION_TABLE):
            context = MigrationContext.configure(connection, opts={"version_table": table})
            applied = [head for head in context.get_current_heads() if head in known]
            if applied:
                return table, applied[0]
    return None


def current_revision(engine: Engine) -> str | None:
    """The flask-scoria revision the database is at, or ``None`` before the first upgrade.

    Looks in flask-scoria's own version table, then in the host's
    ``alembic_version`` for revisions mounted in the host's history.
    """
    recorded = _recorded(engine)
    return recorded[1] if recorded else None


def mounted_in_host_history(engine: Engine) -> bool:
    """Whether the host's ``alembic_version`` records the flask-scoria revision."""
    recorded = _recorded(engine)
    return recorded is not None and recorded[0] == HOST_VERSION_TABLE


def require_own_history(engine: Engine) -> None:
    """Raise Alembic's ``CommandError`` if the host's history records the revisions.

    Migrated here as well, a second version table would record a second history of
    the same tables. A database that cannot be opened raises
    :class:`~flask_scoria.StorageError`, as :func:`upgrade` does.
    """
    if mounted_in_host_history(engine):
        raise CommandError(
            "the scoria revisions are recorded in your app's alembic_version (mounted in"
            " its history); migrate them with your app's own commands (flask db upgrade"
            " heads, flask db downgrade)"
        )


def head_revision() -> str:
    """The newest shipped revision."""
    head = _scripts().get_current_head()
    assert head is not None
    return head


def differences(engine: Engine) -> list[Any]:
    """What differs between the models and the database.

    Alembic's autogenerate finds missing or extra tables, columns, indexes and
    constraints, and changed column types; a partial index whose condition is
    not the models' is listed as ``("modify_index_condition", name, expected,
    found)``.
    """
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "include_name": only_scoria_tables,
                "version_table": VERSION_TABLE,
            },
        )
        return [*compare_metadata(context, metadata), *_index_conditions(connection)]


#: The condition of each ``scoria_*`` index on PostgreSQL (``NULL``: none).
_STORED_CONDITIONS = """
    SELECT index.relname, pg_get_expr(pg_index.indpred, pg_index.indrelid)
    FROM pg_index
    JOIN pg_class AS index ON index.oid = pg_index.indexrelid
    JOIN pg_class AS owner ON owner.oid = pg_index.indrelid
    WHERE owner.relname LIKE 'scoria\\_%' AND pg_table_is_visible(owner.oid)
"""
#: The statement that made each ``scoria_*`` index on SQLite; its condition follows WHERE.
_STORED_INDEXES = """
    SELECT name, sql FROM sqlite_master
    WHERE type = 'index' AND tbl_name LIKE 'scoria\\_%' ESCAPE '\\' AND sql IS NOT NULL
"""
_WHERE = re.compile(r"\swhere\s", re.IGNORECASE)
#: A PostgreSQL cast, as ``pg_get_expr`` writes one: ``::text``, ``::character varying``.
_CAST = re.compile(r"::[a-z_]+(?: varying| with(?:out)? time zone)?")


def _index_conditions(connection: Connection) -> list[tuple[str, str, str | None, str | None]]:
    """Partial indexes whose condition is not the models' (autogenerate cannot see one)."""
    dialect = connection.dialect.name
    stored: dict[str, str | None]
    if dialect == "postgresql":
        stored = dict(connection.execute(text(_STORED_CONDITIONS)).all())
    elif dialect == "sqlite":
        made = connection.execute(text(_STORED_INDEXES)).all()
        stored = {name: _after_where(sql) for name, sql in made}
    else:
        return []
    found = []
    for table in metadata.tables.values():
        for index in table.indexes:
            if index.name not in stored:
                continue  # a missing index is autogenerate's to report
            where = index.dialect_options[dialect]["where"]
            expected = None if where is None else str(where)
            actual = stored[index.name]
            if _condition(expected) != _condition(actual):
                found.append(("modify_index_condition", str(index.name), expected, actual))
    return found


def _after_where(sql: str) -> str | None:
    """The condition of a ``CREATE INDEX`` statement, or ``None`` without one."""
    parts = _WHERE.split(sql, 1)
    return parts[1] if len(parts) == 2 else None


def _condition(sql: str | None) -> str | None:
    """``sql`` without casts, parentheses, case or spacing: how the database rewrites it.

    PostgreSQL keeps ``status <> 'completed'`` as ``((status)::text <> 'completed'::text)``.
    """
    if sql is None:
        return None
    bare = _CAST.sub("", sql.lower()).replace("(", " ").replace(")", " ")
    return " ".join(bare.split())
