"""The ``worker`` executor with real ``flask scoria worker`` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from _background import create_app
from _helpers import executions
from flask import Flask

import flask_scoria as scoria

TESTS = Path(__file__).resolve().parent
WHO = {"actor_id": "a-1", "tenant_id": "t-1", "session_id": "s-1"}


def process_env(database_uri: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a child process that builds the test app on ``database_uri``."""
    return {
        **os.environ,
        # The worktree's package and the tests' modules, whatever is installed.
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]),
        "SCORIA_TEST_DATABASE": database_uri,
        "SCORIA_TEST_INSTANCE": str(tmp_path / "instance"),
        **extra,
    }


class Processes:
    """Child processes of one test, stopped (and their output kept) when it ends."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.tmp_path / f"process-{len(self.started)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, cwd=self.tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.started.append((process, log))
        return process

    def worker(self, env: dict[str, str], *options: str) -> subprocess.Popen[bytes]:
        """A ``flask scoria worker`` process, once it is ready for steps and signals."""
        command = [sys.executable, "-m", "flask", "--app", "_background:create_app"]
        process = self.start([*command, "scoria", "worker", *options], env)
        wait_for(lambda: "worker started" in self.output(process), 60, "the worker to start")
        return process

    def output(self, process: subprocess.Popen[bytes]) -> str:
        return next(log for started, log in self.started if started is process).read_text()

    def stop_all(self) -> None:
        for process, _ in self.started:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    yield started
    started.stop_all()


def wait_for(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def statuses(app: Flask, run_ids: list[str]) -> list[str]:
    with app.app_context():
        return [scoria.get_run(run_id).status for run_id in run_ids]


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


#: The timeline of a run whose step asked for approval in the background, was approved with
#: ``resume=True``, and completed in the background.
APPROVED_IN_THE_BACKGROUND = [
    "run_started",
    "step_queued",
    "step_started",
    "waiting_for_approval",
    "approval_decided",
    "resume_requested",
    "step_queued",
    "step_started",
    "step_completed",
    "run_completed",
]


@pytest.mark.parametrize(
    ("backend", "runs", "workers"), [("postgresql", 200, 3), ("sqlite", 40, 2)]
)
def test_worker_processes_execute_every_step_once(
    backend: str, runs: int, workers: int, database_uri: str, tmp_path: Path, processes: Processes
) -> None:
    app = create_app(database_uri)
    counter = tmp_path / "executions"
    env = process_env(database_uri, tmp_path)
    started = [
        processes.worker(env, "--concurrency", "4", "--interval", "0.2") for _ in range(workers)
    ]
    with app.app_context():
        run_ids = []
        for _ in range(runs):
            run = scoria.start_run(
                WHO, initial_step={"kind": "count"}, runtime={"metadata": {"counter": str(counter)}}
            )
            # the call only queued the step
            assert run.status == "running"
            run_ids.append(run.run_id)
        first = scoria.get_run_detail(run_ids[0])
    assert [event.event_type for event in first.events][:2] == ["run_started", "step_queued"]

    wait_for(lambda: set(statuses(app, run_ids)) == {"completed"}, 90, "every run to complete")
    for process in started:
        stop(process)
    lines = [line.split() for line in executions(counter)]
    assert len(lines) == runs
    assert len({step_id for _, step_id, _ in lines}) == runs
    if backend == "postgresql":
        # NOTIFY wakes every worker at once; on SQLite one polling worker may drain
        # forty instant steps before the other polls, which is fine but proves nothing.
        assert len({pid for pid, _, _ in lines}) >= 2, "the work was not shared"
    for process in started:
        assert processes.output(process).rstrip().endswith("worker stopped")
    app.extensions["scoria"].storage(app).engine.dispose()


def test_a_killed_workers_step_is_retried_after_its_lease_expires(
    database_uri: str, tmp_path: Path, processes: Processes
) -> None:
    app = create_app(database_uri)
    env = process_env(database_uri, tmp_path, SCORIA_TEST_LEASE="1")
    files = {name: str(tmp_path / name) for name in ("counter", "entered", "release")}
    first = processes.worker(env, "--interval", "0.2")
    with app.app_context():
        done = scoria.start_run(
            WHO, initial_step={"kind": "count"}, runtime={"metadata": {"counter": files["counter"]}}
        ).run_id
        wait_for(lambda: scoria.get_run(done).status == "completed", 60, "the first run")
        blocked = scoria.start_run(
            WHO, initial_step={"kind": "block"}, runtime={"metadata": files}
        ).run_id
    wait_for(lambda: Path(files["entered"]).exists(), 60, "the handler to start")
    first.kill()
    first.wait(timeout=30)
    Path(files["release"]).touch()

    second = processes.worker(env, "--interval", "0.2")
    wait_for(lambda: statuses(app, [blocked]) == ["completed"], 60, "the retried step")
    stop(second)
    with app.app_context():
        detail = scoria.get_run_detail(blocked)
    lines = [line.split() for line in executions(Path(files["counter"]))]
    # the completed run ran once; the killed step twice, attempt 1 in the killed process
    assert [(pid == str(first.pid), attempt) for pid, _, attempt in lines] == [
        (True, "1"),
        (True, "1"),
        (False, "2"),
    ]
    assert [event.event_type for event in detail.events] == [
        "run_started",
        "step_queued",
        "step_started",
        "lease_expired",
        "retry_scheduled",
        "step_started",
        "step_completed",
        "run_completed",
    ]
    app.extensions["scoria"].storage(app).engine.dispose()


def test_sigterm_stops_an_idle_worker_at_once(
    database_uri: str, tmp_path: Path, processes: Processes
) -> None:
    """However long its interval, an idle worker (on PostgreSQL, waiting for a NOTIFY)
    stops on SIGTERM."""
    worker = processes.worker(process_env(database_uri, tmp_path), "--interval", "600")
    began = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert time.monotonic() - began < 5
    assert "worker stopped" in processes.output(worker)


class Stopping(NamedTuple):
    """A worker sent SIGTERM while the handler of a run's step blocks."""

    app: Flask
    env: dict[str, str]
    files: dict[str, str]
    run_id: str
    worker: subprocess.Popen[bytes]


def stop_while_blocked(
    database_uri: str, tmp_path: Path, processes: Processes, kind: str
) -> Stopping:
    """Start a worker and a run of ``kind`` (a blocking handler), then SIGTERM the worker."""
    app = create_app(database_uri)
    env = process_env(database_uri, tmp_path)
    files = {name: str(tmp_path / name) for name in ("counter", "entered", "release")}
    worker = processes.worker(env, "--interval", "0.2")
    with app.app_context():
        run_id = scoria.start_run(
            WHO, initial_step={"kind": kind}, runtime={"metadata": files}
        ).run_id
    wait_for(lambda: Path(files["entered"]).exists(), 60, "the handler to start")
    worker.send_signal(signal.SIGTERM)
    return Stopping(app, env, files, run_id, worker)


def test_sigterm_lets_the_running_handler_finish(
    database_uri: str, tmp_path: Path, processes: Processes
) -> None:
    app, _, files, run_id, worker = stop_while_blocked(database_uri, tmp_path, processes, "block")
    time.sleep(0.5)
    assert worker.poll() is None, "the worker left before its handler finished"
    Path(files["release"]).touch()
    assert worker.wait(timeout=30) == 0
    assert statuses(app, [run_id]) == ["completed"]
    app.extensions["scoria"].storage(app).engine.dispose()


def test_sigterm_leaves_the_next_step_of_a_run_queued(
    database_uri: str, tmp_path: Path, processes: Processes
) -> None:
    """A stopping worker lets the running handler finish and claims nothing more, not
    even the step that handler's Next queues: that one waits for the next worker."""
    stopping = stop_while_blocked(database_uri, tmp_path, processes, "block_then_count")
    app, env, files, run_id, worker = stopping
    # Sooner than the worker's loop looks again (--interval 0.2): the signal itself counts.
    time.sleep(0.05)
    Path(files["release"]).touch()
    assert worker.wait(timeout=30) == 0
    with app.app_context():
        first, second = scoria.get_run_detail(run_id).steps
    assert (first.status, second.kind, second.status) == ("completed", "count", "queued")
    assert len(executions(Path(files["counter"]))) == 1
    next_worker = processes.worker(env, "--interval", "0.2")
    wait_for(lambda: statuses(app, [run_id]) == ["completed"], 60, "the next worker")
    next_worker.send_signal(signal.SIGTERM)
    app.extensions["scoria"].storage(app).engine.dispose()


def test_sigterm_lets_a_single_pass_finish_its_step_and_stops_it(
    database_uri: str, tmp_path: Path, processes: Processes
) -> None:
    """``worker --once`` from a scheduler, sent SIGTERM while a handler runs: the handler
    finishes and its outcome is recorded, and the pass claims no further step."""
    app = create_app(database_uri)
    env = process_env(database_uri, tmp_path)
    files = {name: str(tmp_path / name) for name in ("counter", "entered", "release")}
    with app.app_context():
        blocked, waiting = (
            scoria.start_run(WHO, initial_step={"kind": kind}, runtime={"metadata": files}).run_id
            for kind in ("block", "count")
        )
    command = [sys.executable, "-m", "flask", "--app", "_background:create_app"]
    once = processes.start([*command, "scoria", "worker", "--once"], env)
    wait_for(lambda: Path(files["entered"]).exists(), 60, "the handler to start")
    once.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert once.poll() is None, "the pass left before its handler finished"
    Path(files["release"]).touch()
    assert once.wait(timeout=30) == 0
    assert statuses(app, [blocked, waiting]) == ["completed", "running"]
    assert f"dispatched {blocked}: completed" in processes.output(once)
    app.extensions["scoria"].storage(app).engine.dispose()


def test_an_approval_with_resume_queues_the_step_for_the_workers(
    database_uri: str, tmp_path: Path, processes: Processes
) -> None:
    app = create_app(database_uri)
    counter = tmp_path / "executions"
    env = process_env(database_uri, tmp_path)
    workers = [processes.worker(env, "--interval", "0.2") for _ in range(2)]
    with app.app_context():
        run_id = scoria.start_run(
            WHO, initial_step={"kind": "approved"}, runtime={"metadata": {"counter": str(counter)}}
        ).run_id
        wait_for(
            lambda: scoria.get_run(run_id).status == "waiting_for_approval", 60, "the approval"
        )
        # the decision only queues the step
        assert scoria.approve_run(run_id, decided_by="ops", resume=True).status == "running"
    wait_for(lambda: statuses(app, [run_id]) == ["completed"], 60, "the approved step")
    for process in workers:
        stop(process)
    with app.app_context():
        detail = scoria.get_run_detail(run_id)
    assert [event.event_type for event in detail.events] == APPROVED_IN_THE_BACKGROUND
    assert (detail.steps[0].result_envelope or {})["decision"] == "approved"
    # the approved step ran once, in one of the workers
    ((pid, _, _),) = [line.split() for line in executions(counter)]
    assert pid in {str(process.pid) for process in workers}
    app.extensions["scoria"].storage(app).engine.dispose()
