"""The app that the worker and Celery processes of the background tests run.

Configured from the environment, so that ``flask --app _background`` and
``celery -A _celeryapp`` build the same app as the test that starts them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from _helpers import blocking_handler, counting_handler
from conftest import create_test_app
from flask import Flask

from flask_scoria import Retry, RunSummary, StepView


def noop(step: StepView, run: RunSummary) -> None:
    return None


def celery_init_app(app: Flask) -> Any:
    """Flask's documented way to build a Celery app for a Flask app."""
    from celery import Celery, Task

    class FlaskTask(Task):  # type: ignore[misc]
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def create_app(database_uri: str | None = None, **config: Any) -> Flask:
    """The test app: handlers ``count``, ``block`` (retried once) and ``noop``."""
    env = os.environ
    broker = config.pop("broker", env.get("SCORIA_TEST_BROKER"))
    settings = {
        "SCORIA_EXECUTOR": env.get("SCORIA_TEST_EXECUTOR", "worker"),
        "SCORIA_STEP_LEASE_SECONDS": float(env.get("SCORIA_TEST_LEASE", "300")),
        **config,
    }
    if broker:
        settings["CELERY"] = {
            "broker_url": broker,
            "task_ignore_result": True,
            "worker_prefetch_multiplier": 1,
            "broker_connection_retry_on_startup": True,
            "task_default_queue": env.get("SCORIA_TEST_QUEUE", "celery"),
        }
    app = create_test_app(
        database_uri or env["SCORIA_TEST_DATABASE"],
        Path(env.get("SCORIA_TEST_INSTANCE", "instance")).resolve(),
        **settings,
    )
    runtime = app.extensions["scoria"]
    runtime.handler("count")(counting_handler)
    runtime.handler("block", retry=Retry(attempts=2, delay=0))(blocking_handler)
    runtime.handler("noop")(noop)
    if broker:
        celery_init_app(app)
    return app
