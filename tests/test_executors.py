"""Where steps run: SCORIA_EXECUTOR, pinned executors and per-call handlers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import create_test_app
from flask import Flask

import flask_scoria as scoria
from flask_scoria import Retry, Scoria, Succeed, WaitForApproval
from flask_scoria.runtime import execute_step
from flask_scoria.runtime.tables import steps

WHO = {"actor_id": "a-1", "tenant_id": "t-1", "session_id": "s-1"}


@pytest.fixture
def worker_app(database_uri: str, tmp_path: Path) -> Iterator[Flask]:
    app = create_test_app(database_uri, tmp_path / "instance", SCORIA_EXECUTOR="worker")
    yield app
    app.extensions["scoria"].storage(app).engine.dispose()


def work(step: scoria.StepView, run: scoria.RunSummary) -> Succeed:
    return Succeed({"attempt": step.attempt})


def gate(step: scoria.StepView, run: scoria.RunSummary) -> WaitForApproval | Succeed:
    if step.approval is None:
        return WaitForApproval("publish")
    return Succeed({"approved": True})


def kinds_of_events(run_id: str) -> list[str]:
    return [event.event_type for event in scoria.get_run_detail(run_id).events]


def test_with_the_worker_executor_a_call_only_queues_the_step(worker_app: Flask) -> None:
    runtime: Scoria = worker_app.extensions["scoria"]
    runtime.handler("work")(work)
    with worker_app.app_context():
        run = scoria.start_run(WHO, initial_step={"kind": "work"})
        assert run.status == "running"
        (step,) = scoria.get_run_detail(run.run_id).steps
        assert step.status == "queued"
        assert step.not_before is not None
        assert kinds_of_events(run.run_id) == ["run_started", "step_queued"]
        # dispatch announces it again, but does not run it here
        assert scoria.dispatch(run.run_id).status == "running"
        (done,) = scoria.dispatch_queued()
        assert done.status == "completed"
        assert kinds_of_events(run.run_id)[-3:] == [
            "step_started",
            "step_completed",
            "run_completed",
        ]


def test_a_pinned_inline_handler_runs_in_the_call(worker_app: Flask) -> None:
    runtime: Scoria = worker_app.extensions["scoria"]
    runtime.handler("gate", executor="inline")(gate)
    with worker_app.app_context():
        run = scoria.start_run(WHO, initial_step={"kind": "gate"})
        assert run.status == "waiting_for_approval"
        scoria.approve_run(run.run_id, decided_by="ops")
        assert scoria.resume_run(run.run_id).status == "completed"


def test_resuming_for_the_worker_queues_the_approved_step(worker_app: Flask) -> None:
    runtime: Scoria = worker_app.extensions["scoria"]
    runtime.handler("gate")(gate)
    with worker_app.app_context():
        run = scoria.start_run(WHO, initial_step={"kind": "gate"}, handlers={"gate": gate})
        assert run.status == "waiting_for_approval"  # per-call handlers run inline
        scoria.approve_run(run.run_id, decided_by="ops")
        resumed = scoria.resume_run(run.run_id)
        assert resumed.status == "running"
        assert kinds_of_events(run.run_id)[-2:] == ["resume_requested", "step_queued"]
        (done,) = scoria.dispatch_queued()
        assert done.status == "completed"


def test_a_kind_unknown_here_goes_to_the_default_executor(worker_app: Flask) -> None:
    with worker_app.app_context():
        run = scoria.start_run(WHO, initial_step={"kind": "elsewhere"})
        assert kinds_of_events(run.run_id) == ["run_started", "step_queued"]


def test_a_kind_can_be_pinned_to_the_worker_while_the_default_is_inline(app: Flask) -> None:
    runtime: Scoria = app.extensions["scoria"]
    runtime.handler("slow", executor="worker")(work)
    runtime.handler("quick")(work)
    with app.app_context():
        assert scoria.start_run(WHO, initial_step={"kind": "quick"}).status == "completed"
        slow = scoria.start_run(WHO, initial_step={"kind": "slow"})
        assert slow.status == "running"
        assert [run.run_id for run in scoria.dispatch_queued()] == [slow.run_id]


def test_an_unknown_executor_is_refused_at_startup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SCORIA_EXECUTOR"):
        create_test_app("sqlite://", tmp_path, SCORIA_EXECUTOR="threads")


def test_the_celery_task_executes_its_named_step_once(worker_app: Flask) -> None:
    """``execute_step`` is the body of ``flask_scoria.run_step``."""
    runtime: Scoria = worker_app.extensions["scoria"]
    runtime.handler("gate")(gate)
    with worker_app.app_context():
        run = scoria.start_run(WHO, initial_step={"kind": "gate"})
        other = scoria.start_run(WHO, initial_step={"kind": "gate"})
        step_id = run.current_step_id
        assert step_id is not None
        # a step named with another run's id is left alone, as is a run deleted since
        # (or a message that names no step)
        assert execute_step(other.run_id, step_id) is None
        assert execute_step(str(uuid.uuid4()), step_id) is None
        assert execute_step("not-a-run", "not-a-step") is None
        paused = execute_step(run.run_id, step_id)
        assert paused is not None and paused.status == "waiting_for_approval"
        # a second delivery of the same task
        assert execute_step(run.run_id, step_id) is None
        assert scoria.approve_run(run.run_id, decided_by="ops", resume=True).status == "running"
        # the approved step sees its decision
        done = execute_step(run.run_id, step_id)
        assert done is not None and done.status == "completed"
        (step,) = scoria.get_run_detail(run.run_id).steps
        assert step.result_envelope == {"approved": True}
        assert scoria.get_run(other.run_id).status == "running"


def test_the_celery_task_retries_its_steps_expired_lease_first(worker_app: Flask) -> None:
    runtime: Scoria = worker_app.extensions["scoria"]
    runtime.handler("work", retry=Retry(attempts=2, delay=0, jitter=False))(work)
    with worker_app.app_context():
        run = scoria.start_run(WHO, initial_step={"kind": "work"})
        past = datetime.now(UTC) - timedelta(seconds=5)
        with runtime.storage().engine.begin() as conn:  # as if a worker claimed it and died
            conn.execute(
                sa.update(steps).values(
                    status="running", lease_token="dead", lease_expires_at=past, started_at=past
                )
            )
        step_id = run.current_step_id
        assert step_id is not None
        # a redelivered task: the lease is expired, and the step queued again
        assert execute_step(run.run_id, step_id) is None
        assert kinds_of_events(run.run_id)[-2:] == ["lease_expired", "retry_scheduled"]
        done = execute_step(run.run_id, step_id)
        assert done is not None and done.status == "completed"
        (step,) = scoria.get_run_detail(run.run_id).steps
        assert step.result_envelope == {"attempt": 2}
