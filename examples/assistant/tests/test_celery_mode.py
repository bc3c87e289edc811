"""The assistant with its steps on Celery: a real ``celery worker`` on a real Redis."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

import flask_scoria as scoria
from examples.assistant import create_app
from examples.assistant.database import prepare
from examples.assistant.extensions import db

from .test_flows import ask, sign_in

REPO = Path(__file__).resolve().parents[3]
REDIS_URL = os.environ.get("SCORIA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def require_redis() -> None:
    url = sa.make_url(REDIS_URL)
    try:
        socket.create_connection((url.host or "127.0.0.1", url.port or 6379), timeout=2).close()
    except OSError as exc:
        message = f"Redis unreachable at {REDIS_URL}: {exc}"
        if os.environ.get("SCORIA_REQUIRE_SERVICES") == "1":
            pytest.fail(message + " (SCORIA_REQUIRE_SERVICES=1)")
        pytest.skip(message)


@pytest.fixture
def celery_app(tmp_path: Path) -> Iterator[tuple[Flask, subprocess.Popen[bytes], Path]]:
    pytest.importorskip("celery")
    require_redis()
    config = {
        "SECRET_KEY": "test",
        "SCORIA_EXECUTOR": "celery",
        "CELERY_BROKER_URL": REDIS_URL,
        "CELERY_QUEUE": f"assistant-{uuid.uuid4().hex[:8]}",
        "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'assistant.sqlite3'}",
    }
    app = create_app({"TESTING": True, **config})
    with app.app_context():
        prepare()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        **{f"ASSISTANT_{key}": value for key, value in config.items()},
    }
    celery = [sys.executable, "-m", "celery", "-A", "examples.assistant.celery_app:celery_app"]
    options = ["--pool", "threads", "--concurrency", "2", "-Q", config["CELERY_QUEUE"]]
    log = tmp_path / "celery.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [*celery, "worker", *options],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield app, worker, log
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        with app.app_context():
            db.engine.dispose()


def wait_for(check: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()}"
        time.sleep(0.2)


def test_the_steps_run_on_the_celery_worker(
    celery_app: tuple[Flask, subprocess.Popen[bytes], Path],
) -> None:
    app, worker, log = celery_app
    client = app.test_client()
    sign_in(client, "alice")
    run_id = ask(client, "When is the launch?")

    def status() -> str:
        with app.app_context():
            return str(scoria.get_run(run_id).status)

    # The request only queued the draft: a Celery worker drafts, then asks for approval.
    wait_for(lambda: status() == "waiting_for_approval", "the draft", log)
    with app.app_context():
        queued = scoria.approve_run(run_id, decided_by="ops", resume=True)
    assert queued.status == "running"  # the approved step went to the worker
    wait_for(lambda: status() == "completed", "the answer to be sent", log)
    with app.app_context():
        detail = scoria.get_run_detail(run_id)
    assert [(step.kind, step.status) for step in detail.steps] == [
        ("draft", "completed"),
        ("approval", "completed"),
        ("send", "completed"),
    ]
    assert "step_queued" in [event.event_type for event in detail.events]
    assert worker.poll() is None
