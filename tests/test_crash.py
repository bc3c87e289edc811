"""Crash safety: a killed process's step fails by lease expiry and is retried in place."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest
from _helpers import IDENTITY, counting_handler, executions, start_blocking_run, succeed
from conftest import create_test_app
from flask import Flask
from flask.testing import FlaskCliRunner

import flask_scoria as scoria


def kill_inside_handlers(database_uri: str, tmp_path: Path, *names: str) -> list[Path]:
    """Start one blocking run per name in child processes, SIGKILL them inside their handlers.

    The children are killed together once every handler has started, so that no
    lease runs out while another child is still starting. Returns the files that
    count the handlers' executions.
    """
    spawn = multiprocessing.get_context("spawn")
    children = []
    for name in names:
        metadata = {
            "counter": str(tmp_path / f"{name}-executions"),
            "entered": str(tmp_path / f"{name}-entered"),
            "release": str(tmp_path / f"{name}-release"),
        }
        child = spawn.Process(
            target=start_blocking_run, args=(database_uri, str(tmp_path / name), metadata)
        )
        child.start()
        children.append((child, metadata))
    deadline = time.monotonic() + 60
    for child, metadata in children:
        while not Path(metadata["entered"]).exists():
            assert child.is_alive() and time.monotonic() < deadline, "handler never started"
            time.sleep(0.02)
    for child, _ in children:
        child.kill()
    for child, _ in children:
        child.join(timeout=10)
        assert child.exitcode == -9
    return [Path(metadata["counter"]) for _, metadata in children]


def step_id_in(counter: Path) -> str:
    ((_, step_id, _),) = (line.split() for line in executions(counter))
    return step_id


def the_run(session_runs: list[scoria.RunSummary], step_id: str) -> scoria.RunSummary:
    for run in session_runs:
        if scoria.get_run_detail(run.run_id).steps[0].id == step_id:
            return run
    raise AssertionError(f"no run has step {step_id}")


def test_killed_handler_fails_by_lease_and_resumes_in_place(
    app: Flask, runner: FlaskCliRunner, database_uri: str, tmp_path: Path
) -> None:
    read_counter, swept_counter = kill_inside_handlers(database_uri, tmp_path, "read", "swept")
    with app.app_context():
        runs = scoria.list_runs_for_session(IDENTITY["session_id"])
        read_run = the_run(runs, step_id_in(read_counter))
        swept_run = the_run(runs, step_id_in(swept_counter))
        assert read_run.status == swept_run.status == "running"
        time.sleep(1.3)
        # a read notices the expired lease
        failed = scoria.get_run(read_run.run_id)
        assert failed.status == "failed"
        detail = scoria.get_run_detail(read_run.run_id)
        assert "lease_expired" in [event.event_type for event in detail.events]
        assert detail.steps[0].status == "failed"
        assert detail.steps[0].error_envelope["type"] == "lease_expired"  # type: ignore[index]
    # the CLI sweeps the other one
    result = runner.invoke(args=["scoria", "recover"])
    assert result.exit_code == 0, result.output
    assert f"failed: {swept_run.run_id}" in result.output
    assert read_run.run_id not in result.output
    assert "1 run(s) recovered" in result.output
    assert runner.invoke(args=["scoria", "recover"]).output.strip() == "0 run(s) recovered"
    with app.app_context():
        assert scoria.get_run(swept_run.run_id).status == "failed"
        for run, counter in ((read_run, read_counter), (swept_run, swept_counter)):
            resumed = scoria.resume_run(run.run_id, handlers={"work": counting_handler})
            assert (resumed.run_id, resumed.status) == (run.run_id, "completed")
            lines = [line.split() for line in executions(counter)]
            assert [attempt for _, _, attempt in lines] == ["1", "2"]
            assert len({step_id for _, step_id, _ in lines}) == 1
            # a completed step is never executed again
            scoria.dispatch(run.run_id, handlers={"work": counting_handler})
            assert len(executions(counter)) == 2
            events = [event.event_type for event in scoria.get_run_detail(run.run_id).events]
            assert events == [
                "run_started",
                "step_started",
                "lease_expired",
                "run_failed",
                "retry_requested",
                "step_started",
                "step_completed",
                "run_completed",
            ]


def test_live_handler_keeps_its_lease(database_uri: str, tmp_path: Path) -> None:
    app = create_test_app(database_uri, tmp_path / "instance", SCORIA_STEP_LEASE_SECONDS=0.3)
    seen: list[str] = []
    started = threading.Event()
    finished = threading.Event()

    def slow(step: scoria.StepView, run: scoria.RunSummary) -> scoria.Succeed:
        started.set()
        time.sleep(1.5)
        return succeed(step, run)

    def watch() -> None:
        started.wait(timeout=30)
        with app.app_context():
            while not finished.is_set():
                (run,) = scoria.list_runs_for_session(IDENTITY["session_id"])
                seen.append(scoria.get_run(run.run_id).status)
                assert scoria.runtime.recover_expired_leases() == []
                time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with app.app_context():
            run = scoria.start_run(
                scoria.identity(IDENTITY), initial_step={"kind": "work"}, handlers={"work": slow}
            )
    finally:
        finished.set()
        watcher.join(timeout=30)
    app.extensions["scoria"].storage(app).engine.dispose()
    assert run.status == "completed"
    assert len(seen) > 10
    assert set(seen[:-1]) == {"running"}


@pytest.mark.parametrize("call", ["start", "resume", "approve-and-resume"])
def test_a_slow_receiver_keeps_the_claimed_steps_lease(
    database_uri: str, tmp_path: Path, call: str
) -> None:
    """``run_started`` and ``run_resumed`` come between a step's claim and its handler:
    a receiver slower than the lease must not let another process take the step."""
    app = create_test_app(database_uri, tmp_path / "instance", SCORIA_STEP_LEASE_SECONDS=0.3)
    executed: list[bool] = []
    recovered: list[list[str]] = []

    def work(step: scoria.StepView, run: scoria.RunSummary) -> scoria.Outcome:
        executed.append(step.approval is not None)
        if step.approval is None and call != "start":
            return scoria.WaitForApproval("go")
        return scoria.Succeed({"ok": True})

    def slow_receiver(sender: Flask, run: scoria.RunSummary, **extra: object) -> None:
        time.sleep(1.0)
        recovered.append(scoria.runtime.recover_expired_leases())

    app.extensions["scoria"].handler("work")(work)
    signal = scoria.run_started if call == "start" else scoria.run_resumed
    signal.connect(slow_receiver, sender=app)
    try:
        with app.app_context():
            run = scoria.start_run(scoria.identity(IDENTITY), initial_step={"kind": "work"})
            if call == "resume":
                scoria.approve_run(run.run_id, decided_by="operator")
                run = scoria.resume_run(run.run_id)
            elif call == "approve-and-resume":
                run = scoria.approve_run(run.run_id, decided_by="operator", resume=True)
    finally:
        signal.disconnect(slow_receiver, sender=app)
        app.extensions["scoria"].storage(app).engine.dispose()
    assert run.status == "completed"
    assert recovered == [[]]
    assert executed == ([False] if call == "start" else [False, True])
