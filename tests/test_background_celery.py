"""The ``celery`` executor with real ``celery worker`` processes and a real broker."""

from __future__ import annotations

import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _background import create_app
from _helpers import executions
from conftest import AMQP_URL, REDIS_URL, require_service
from flask import Flask
from sqlalchemy import select
from test_background_worker import (
    APPROVED_IN_THE_BACKGROUND,
    WHO,
    Processes,
    process_env,
    statuses,
    wait_for,
)

import flask_scoria as scoria
from flask_scoria.runtime import execute_step
from flask_scoria.runtime.tables import runs, steps
from flask_scoria.runtime.transaction import utcnow
from flask_scoria.runtime.worker import resend_due_celery_steps

pytest.importorskip("celery")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    yield started
    started.stop_all()


class CeleryRig:
    """A test app on the executor ``celery`` and what its Celery workers need."""

    def __init__(self, database_uri: str, tmp_path: Path, broker: str, **env: str) -> None:
        self.queue = f"scoria-test-{uuid.uuid4().hex[:8]}"
        self.env = process_env(
            database_uri,
            tmp_path,
            SCORIA_TEST_EXECUTOR="celery",
            SCORIA_TEST_BROKER=broker,
            SCORIA_TEST_QUEUE=self.queue,
            **env,
        )
        self.app: Flask = create_app(
            database_uri, broker=broker, SCORIA_EXECUTOR="celery", **self._config(env)
        )
        self.celery: Any = self.app.extensions["celery"]
        self.celery.conf.task_default_queue = self.queue

    @staticmethod
    def _config(env: dict[str, str]) -> dict[str, Any]:
        lease = env.get("SCORIA_TEST_LEASE")
        return {} if lease is None else {"SCORIA_STEP_LEASE_SECONDS": float(lease)}

    def worker(self, processes: Processes, concurrency: int = 8, pool: str = "threads") -> Any:
        command = [sys.executable, "-m", "celery", "-A", "_celeryapp:celery_app", "worker"]
        options = ["--pool", pool, "--concurrency", str(concurrency), "-Q", self.queue]
        quiet = ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"]
        return processes.start([*command, *options, *quiet], self.env)

    def start(self, kind: str, metadata: dict[str, str]) -> scoria.RunSummary:
        with self.app.app_context():
            return scoria.start_run(
                WHO, initial_step={"kind": kind}, runtime={"metadata": metadata}
            )

    def completed(self, processes: Processes, kind: str) -> scoria.RunDetail:
        """Start a run of ``kind`` with a Celery worker running; return it once completed."""
        self.worker(processes, concurrency=2)
        run_id = self.start(kind, {}).run_id
        wait_for(lambda: statuses(self.app, [run_id]) == ["completed"], 60, "the run")
        with self.app.app_context():
            return scoria.get_run_detail(run_id)

    def close(self) -> None:
        with self.celery.connection_for_write() as conn:
            conn.default_channel.queue_purge(self.queue)
        self.app.extensions["scoria"].storage(self.app).engine.dispose()


@pytest.mark.parametrize(("backend", "runs"), [("postgresql", 200), ("sqlite", 30)])
def test_celery_executes_every_step_once_even_when_each_task_is_sent_twice(
    backend: str, runs: int, database_uri: str, tmp_path: Path, processes: Processes
) -> None:
    rig = CeleryRig(database_uri, tmp_path, require_service(REDIS_URL))
    counter = str(tmp_path / "executions")
    rig.worker(processes)
    run_ids = []
    for _ in range(runs):
        run = rig.start("count", {"counter": counter})
        assert run.status == "running"
        # a second delivery of the same task
        rig.celery.send_task("flask_scoria.run_step", args=[run.run_id, run.current_step_id])
        run_ids.append(run.run_id)
    wait_for(lambda: set(statuses(rig.app, run_ids)) == {"completed"}, 90, "every run")
    time.sleep(0.5)  # the duplicates are delivered too
    lines = [line.split() for line in executions(Path(counter))]
    assert len(lines) == runs
    assert len({step_id for _, step_id, _ in lines}) == runs
    rig.close()


def test_each_celery_step_runs_in_a_task_of_its_own(
    database_uri: str, tmp_path: Path, processes: Processes
) -> None:
    """The step a Celery step leads to is sent as a task of its own (with its own time
    limit), not run on in the task of the step before."""
    rig = CeleryRig(database_uri, tmp_path, require_service(REDIS_URL))
    second = rig.completed(processes, "in_a_task").steps[-1]
    result = second.result_envelope or {}
    assert result["task"] and result["first_task"] and result["task"] != result["first_task"]
    rig.close()


def test_the_soft_time_limit_is_recorded_as_the_steps_timeout(
    database_uri: str, tmp_path: Path, processes: Processes
) -> None:
    """With the prefork pool the time limit interrupts the handler; it falls past the
    step's own deadline, so the step fails with ``step_timeout``."""
    rig = CeleryRig(database_uri, tmp_path, require_service(REDIS_URL))
    rig.worker(processes, concurrency=1, pool="prefork")
    run_id = rig.start("sleepy", {}).run_id
    wait_for(lambda: statuses(rig.app, [run_id]) == ["failed"], 60, "the run to fail")
    with rig.app.app_context():
        detail = scoria.get_run_detail(run_id)
    assert (detail.steps[0].error_envelope or {})["type"] == "step_timeout"
    assert "step_timeout" in [event.event_type for event in detail.events]
    rig.close()


def test_a_step_after_one_with_a_time_limit_runs_in_a_task_without_it(
    database_uri: str, tmp_path: Path, processes: Processes
) -> None:
    """An ``inline`` kind runs on in the task of the step before, but not under that
    step's time limit: it is sent as a task of its own, with its own limit (none)."""
    rig = CeleryRig(database_uri, tmp_path, require_service(REDIS_URL))
    rig.worker(processes, concurrency=1, pool="prefork")
    run_id = rig.start("timed_then_inline", {}).run_id
    wait_for(lambda: statuses(rig.app, [run_id]) in (["completed"], ["failed"]), 60, "the run")
    with rig.app.app_context():
        detail = scoria.get_run_detail(run_id)
    second = detail.steps[-1]
    assert (detail.summary.status, second.error_envelope) == ("completed", None)
    result = second.result_envelope or {}
    assert result["task"] != result["first_task"]
    rig.close()


def test_an_inline_step_due_later_is_sent_to_celery(
    database_uri: str, tmp_path: Path, processes: Processes
) -> None:
    """A Celery task cannot wait for a step due later, and nothing calls it again: an
    ``inline`` kind's delayed step is sent as a task of its own, due when it is due."""
    rig = CeleryRig(database_uri, tmp_path, require_service(REDIS_URL))
    detail = rig.completed(processes, "to_a_gate")
    gated = detail.steps[-1]
    assert gated.kind == "gate" and (gated.result_envelope or {})["task"]
    queued = [event for event in detail.events if event.event_type == "step_queued"]
    assert queued[-1].step_id == gated.id and (queued[-1].payload or {})["executor"] == "celery"
    rig.close()


def test_an_inline_steps_retry_due_later_is_sent_to_celery(
    database_uri: str, tmp_path: Path, processes: Processes
) -> None:
    """An ``inline`` kind's step runs on in the task of the step before; its retry, due
    later than a call waits for, is sent as a task of its own rather than left for one."""
    rig = CeleryRig(database_uri, tmp_path, require_service(REDIS_URL))
    retried = rig.completed(processes, "to_a_flaky_gate").steps[-1]
    assert retried.kind == "flaky_gate"
    assert (retried.result_envelope or {})["attempt"] == 2
    rig.close()


def test_a_step_sent_on_from_a_time_limited_task_is_sent_again_if_lost(
    database_uri: str, tmp_path: Path
) -> None:
    """An ``inline`` step that a task under a time limit queued for Celery, whose send
    was lost, is sent again by ``flask_scoria.recover`` as a Celery kind's would be."""
    rig = CeleryRig(database_uri, tmp_path, require_service(REDIS_URL))
    rig.app.extensions["scoria"].handler("timed_here", timeout=30)(
        lambda step, run: scoria.Next("slow_inline")
    )
    run = rig.start("timed_here", {})
    with rig.app.app_context():
        celery = rig.app.extensions.pop("celery")  # the send of the next step fails
        try:
            assert execute_step(run.run_id, str(run.current_step_id)) is not None
        finally:
            rig.app.extensions["celery"] = celery
        detail = scoria.get_run_detail(run.run_id)
        second = detail.steps[-1]
        assert (second.kind, second.status) == ("slow_inline", "queued")
        queued = [e.payload for e in detail.events if e.event_type == "step_queued"]
        assert queued[-1]["executor"] == "celery"
        assert resend_due_celery_steps(0) == [second.id]
    rig.close()


def failing(step: scoria.StepView, run: scoria.RunSummary) -> None:
    raise ConnectionError("the model timed out")


def test_an_inline_steps_retry_sent_on_from_a_task_is_sent_again_if_lost(
    database_uri: str, tmp_path: Path
) -> None:
    """An ``inline`` kind's retry that a task queued for Celery, unsent (due past the
    broker's countdown, or the broker down), is sent again by ``flask_scoria.recover``
    once due, as a step queued for Celery is: nothing else would run it."""
    rig = CeleryRig(database_uri, tmp_path, require_service(REDIS_URL))
    runtime = rig.app.extensions["scoria"]
    runtime.handler("to_a_late_retry")(lambda step, run: scoria.Next("late_retry"))
    later = scoria.Retry(attempts=2, delay=1200, jitter=False)  # past the longest countdown
    runtime.handler("late_retry", executor="inline", retry=later)(failing)
    run = rig.start("to_a_late_retry", {})
    with rig.app.app_context():
        assert execute_step(run.run_id, str(run.current_step_id)) is not None
        detail = scoria.get_run_detail(run.run_id)
        retried = detail.steps[-1]
        assert (retried.kind, retried.status, retried.attempt) == ("late_retry", "queued", 2)
        (scheduled,) = [e.payload for e in detail.events if e.event_type == "retry_scheduled"]
        assert scheduled["executor"] == "celery"
        assert resend_due_celery_steps(0) == []  # not due yet
        storage = runtime.storage(rig.app)
        with storage.engine.begin() as conn:
            conn.execute(
                steps.update()
                .where(steps.c.id == uuid.UUID(retried.id))
                .values(not_before=utcnow())
            )
        assert resend_due_celery_steps(0) == [retried.id]
    rig.close()


def test_the_recover_command_sends_a_lost_send_again(
    database_uri: str, tmp_path: Path, processes: Processes
) -> None:
    """A step whose send failed (no Celery app, a broker down) stays queued until
    ``flask scoria recover`` sends it again, as the beat task does."""
    rig = CeleryRig(database_uri, tmp_path, require_service(REDIS_URL))
    counter = str(tmp_path / "executions")
    celery = rig.app.extensions.pop("celery")
    try:
        run = rig.start("count", {"counter": counter})
    finally:
        rig.app.extensions["celery"] = celery
    rig.worker(processes, concurrency=2)
    with rig.app.app_context():
        (step,) = scoria.get_run_detail(run.run_id).steps
    assert step.status == "queued"
    result = rig.app.test_cli_runner().invoke(args=["scoria", "recover", "--resend-after", "0"])
    assert result.exit_code == 0, result.output
    assert f"sent to Celery again: step {step.id}" in result.output
    wait_for(lambda: statuses(rig.app, [run.run_id]) == ["completed"], 60, "the resent step")
    assert len(executions(Path(counter))) == 1
    rig.close()


def test_celery_and_a_flask_worker_share_the_steps_on_rabbitmq(
    database_uri: str, tmp_path: Path, processes: Processes
) -> None:
    rig = CeleryRig(database_uri, tmp_path, require_service(AMQP_URL))
    counter = str(tmp_path / "executions")
    rig.worker(processes, concurrency=4)
    processes.worker(rig.env, "--concurrency", "4", "--interval", "0.2")
    run_ids = [rig.start("count", {"counter": counter}).run_id for _ in range(40)]
    wait_for(lambda: set(statuses(rig.app, run_ids)) == {"completed"}, 90, "every run")
    lines = [line.split() for line in executions(Path(counter))]
    assert len(lines) == len({step_id for _, step_id, _ in lines}) == 40
    rig.close()


def test_a_killed_celery_workers_step_is_retried_by_the_recover_task(
    database_uri: str, tmp_path: Path, processes: Processes
) -> None:
    rig = CeleryRig(database_uri, tmp_path, require_service(REDIS_URL), SCORIA_TEST_LEASE="1")
    files = {name: str(tmp_path / name) for name in ("counter", "entered", "release")}
    first = rig.worker(processes, concurrency=2)
    run_id = rig.start("block", files).run_id
    wait_for(lambda: Path(files["entered"]).exists(), 60, "the handler to start")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    Path(files["release"]).touch()
    rig.worker(processes, concurrency=2)

    engine = rig.app.extensions["scoria"].storage(rig.app).engine

    def recovered() -> bool:
        # what the beat entry of flask_scoria.recover does every few seconds; the status
        # is read without the facade, which would notice the expired lease itself
        rig.celery.send_task("flask_scoria.recover")
        time.sleep(0.5)
        with engine.connect() as conn:
            status = conn.execute(select(runs.c.status).where(runs.c.id == uuid.UUID(run_id)))
            return status.scalar() == "completed"

    wait_for(recovered, 60, "the retried step")
    with rig.app.app_context():
        events = [event.event_type for event in scoria.get_run_detail(run_id).events]
    attempts = [line.split()[2] for line in executions(Path(files["counter"]))]
    assert attempts == ["1", "2"]
    assert events[-5:] == [
        "lease_expired",
        "retry_scheduled",
        "step_started",
        "step_completed",
        "run_completed",
    ]
    rig.close()


def test_an_approval_with_resume_sends_the_step_to_celery(
    database_uri: str, tmp_path: Path, processes: Processes
) -> None:
    rig = CeleryRig(database_uri, tmp_path, require_service(REDIS_URL))
    counter = str(tmp_path / "executions")
    worker = rig.worker(processes, concurrency=4)
    run = rig.start("approved", {"counter": counter})
    with rig.app.app_context():
        wait_for(
            lambda: scoria.get_run(run.run_id).status == "waiting_for_approval",
            60,
            "the approval",
        )
        # the decision only queues the step, and sends its task
        approved = scoria.approve_run(run.run_id, decided_by="ops", resume=True)
        assert approved.status == "running"
    # a second delivery of the same task
    rig.celery.send_task("flask_scoria.run_step", args=[run.run_id, run.current_step_id])
    wait_for(lambda: statuses(rig.app, [run.run_id]) == ["completed"], 60, "the approved step")
    time.sleep(0.5)  # the duplicate is delivered too
    with rig.app.app_context():
        detail = scoria.get_run_detail(run.run_id)
    assert [event.event_type for event in detail.events] == APPROVED_IN_THE_BACKGROUND
    assert (detail.steps[0].result_envelope or {})["decision"] == "approved"
    # the approved step ran once, in the celery worker
    ((pid, _, _),) = [line.split() for line in executions(Path(counter))]
    assert pid == str(worker.pid)
    rig.close()
