"""The example assistant: the Scoria Phoenix guide's flow as a Flask app.

Run it with ``make demo`` (``python -m examples.assistant.demo``). With
``ASSISTANT_SCORIA_EXECUTOR=celery`` its steps run on Celery workers instead
(``celery -A examples.assistant.celery_app:celery_app worker``; see the
"Running steps in the background" docs).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask
from sqlalchemy import event

MIGRATIONS = Path(__file__).with_name("migrations")


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Create the assistant app; ``config`` overrides the defaults."""
    app = Flask(__name__)
    app.config.from_mapping(
        SQLALCHEMY_DATABASE_URI="sqlite:///" + os.path.join(app.instance_path, "assistant.sqlite3"),
        # Seconds an operator has to approve an answer before the approval expires.
        APPROVAL_EXPIRES_IN=3600,
        # The operator pages link back to the assistant.
        SCORIA_HOME_URL="/",
    )
    app.config.from_prefixed_env("ASSISTANT")
    if config:
        app.config.update(config)
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        # A write may wait on another writer: fail after 30 s, not SQLite's default 5 s.
        app.config.setdefault("SQLALCHEMY_ENGINE_OPTIONS", {"connect_args": {"timeout": 30}})
    os.makedirs(app.instance_path, exist_ok=True)
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = _instance_secret(Path(app.instance_path))

    from . import (
        handlers,  # noqa: F401  (registers the step handlers)
        views,
    )
    from .extensions import db, migrate, runtime

    db.init_app(app)
    with app.app_context():
        if db.engine.dialect.name == "sqlite":
            event.listen(db.engine, "connect", _sqlite_pragmas)
    migrate.init_app(app, db, directory=str(MIGRATIONS))
    runtime.init_app(app)
    if app.config.get("SCORIA_EXECUTOR") == "celery":
        celery_init_app(app)
    app.register_blueprint(views.bp)
    return app


def celery_init_app(app: Flask) -> Any:
    """Flask's documented Celery setup: tasks run in the app's context.

    The broker is ``CELERY_BROKER_URL`` (default: Redis on this machine), the
    queue ``CELERY_QUEUE`` (default ``celery``).
    """
    from celery import Celery, Task

    class FlaskTask(Task):  # type: ignore[misc]
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.conf.update(
        broker_url=app.config.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
        task_default_queue=app.config.get("CELERY_QUEUE", "celery"),
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
    )
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    """WAL, so that pages read while a run is written; FULL, so a decision survives a crash."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _instance_secret(instance: Path) -> str:
    """A secret key kept in the instance folder, so sign-ins survive restarts."""
    path = instance / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()
