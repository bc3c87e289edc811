"""Exactly one winner of concurrent transitions, across threads and processes."""

from __future__ import annotations

import multiprocessing
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _helpers import (
    IDENTITY,
    executions,
    outcome_of,
    race_in_process,
    until_a_query_waits_for_a_lock,
    wait_for_approval,
)
from conftest import create_test_app
from flask import Flask

import flask_scoria as scoria
from flask_scoria.runtime import tables
from flask_scoria.runtime.worker import execute_step

THREADS = 32
PROCESSES = 4


def start_run(app: Flask, counter: Path, handlers: dict[str, Any] | None = None) -> str:
    with app.app_context():
        return scoria.start_run(
            scoria.identity(IDENTITY),
            initial_step={"kind": "work"},
            runtime={"metadata": {"counter": str(counter)}},
            handlers=handlers,
        ).run_id


def paused_run(app: Flask, counter: Path, *, approved: bool = False) -> str:
    run_id = start_run(app, counter, {"work": wait_for_approval})
    if approved:
        with app.app_context():
            scoria.approve_run(run_id, decided_by="reviewer")
    return run_id


def race_threads(
    app: Flask, run_id: str, verb_of: Callable[[int], str]
) -> list[tuple[str, str, str]]:
    """Call ``verb_of(i)`` from THREADS threads released together."""
    barrier = threading.Barrier(THREADS)
    results: list[tuple[str, str, str]] = []
    lock = threading.Lock()

    def racer(index: int) -> None:
        with app.app_context():
            barrier.wait(timeout=30)
            outcome = outcome_of(verb_of(index), run_id, f"thread-{index}")
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == THREADS
    return results


def race_across_processes(
    database_uri: str, tmp_path: Path, races: list[tuple[str, str]]
) -> dict[int, list[tuple[str, str, str]]]:
    """Run each ``(verb, run_id)`` race in PROCESSES processes; the outcomes by race."""
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(PROCESSES)
    queue = spawn.Queue()
    processes = [
        spawn.Process(
            target=race_in_process,
            args=(database_uri, str(tmp_path / f"instance-{i}"), i, races, barrier, queue),
        )
        for i in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    collected = [queue.get(timeout=120) for _ in range(PROCESSES * len(races))]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    by_race: dict[int, list[tuple[str, str, str]]] = {}
    for race, *outcome in collected:
        by_race.setdefault(race, []).append(tuple(outcome))  # type: ignore[arg-type]
    return by_race


def codes(results: list[tuple[str, str, str]]) -> Counter[str]:
    return Counter(code for _, code, _ in results)


def assert_single_resume(app: Flask, run_id: str, counter: Path, results: Any) -> None:
    assert codes(results) == {"ok": 1, "run_not_resumable": len(results) - 1}, results
    assert len(executions(counter)) == 1
    with app.app_context():
        assert scoria.get_run(run_id).status == "completed"
        events = [event.event_type for event in scoria.get_run_detail(run_id).events]
    assert events.count("resume_requested") == 1
    assert events.count("step_started") == 2


def assert_single_decision(app: Flask, run_id: str, results: Any) -> str:
    assert codes(results) == {"ok": 1, "approval_already_decided": len(results) - 1}, results
    (winner,) = [who for who, code, _ in results if code == "ok"]
    with app.app_context():
        (approval,) = scoria.get_run_detail(run_id).approvals
    assert approval.decided_by == winner
    for _, code, detail in results:
        if code != "ok":
            assert detail == f"{approval.status}:{winner}"
    return approval.status


def assert_single_dispatch(app: Flask, run_id: str, counter: Path, results: Any) -> None:
    assert codes(results) == {"ok": len(results)}, results
    assert len(executions(counter)) == 1
    with app.app_context():
        assert scoria.get_run(run_id).status == "completed"


def test_resume_race_in_threads(app: Flask, tmp_path: Path) -> None:
    counter = tmp_path / "executions"
    run_id = paused_run(app, counter, approved=True)
    results = race_threads(app, run_id, lambda index: "resume")
    assert_single_resume(app, run_id, counter, results)


def test_approve_race_in_threads(app: Flask, tmp_path: Path) -> None:
    run_id = paused_run(app, tmp_path / "executions")
    results = race_threads(app, run_id, lambda index: "approve")
    assert assert_single_decision(app, run_id, results) == "approved"
    with app.app_context():
        assert scoria.get_run(run_id).status == "waiting_for_approval"


def test_approve_and_reject_race_in_threads(app: Flask, tmp_path: Path) -> None:
    run_id = paused_run(app, tmp_path / "executions")
    results = race_threads(app, run_id, lambda index: ("approve", "reject")[index % 2])
    decision = assert_single_decision(app, run_id, results)
    with app.app_context():
        status = scoria.get_run(run_id).status
    assert status == ("rejected" if decision == "rejected" else "waiting_for_approval")


def test_dispatch_race_in_threads(app: Flask, tmp_path: Path) -> None:
    counter = tmp_path / "executions"
    run_id = start_run(app, counter)
    results = race_threads(app, run_id, lambda index: "dispatch")
    assert_single_dispatch(app, run_id, counter, results)


def test_races_across_processes(app: Flask, database_uri: str, tmp_path: Path) -> None:
    resume_counter = tmp_path / "resume-executions"
    dispatch_counter = tmp_path / "dispatch-executions"
    races = [
        ("resume", paused_run(app, resume_counter, approved=True)),
        ("approve", paused_run(app, tmp_path / "unused")),
        ("approve_or_reject", paused_run(app, tmp_path / "unused")),
        ("dispatch", start_run(app, dispatch_counter)),
    ]
    by_race = race_across_processes(database_uri, tmp_path, races)
    assert_single_resume(app, races[0][1], resume_counter, by_race[0])
    assert assert_single_decision(app, races[1][1], by_race[1]) == "approved"
    assert_single_decision(app, races[2][1], by_race[2])
    assert_single_dispatch(app, races[3][1], dispatch_counter, by_race[3])


@pytest.mark.runtime_to_handoff
def test_dispatch_race_on_a_queued_handoff_child(app: Flask, tmp_path: Path) -> None:
    counter = tmp_path / "executions"
    with app.app_context():
        run_id = scoria.start_handoff_run(
            scoria.identity(IDENTITY),
            "critic",
            root_role_id="planner",
            delegated_kind="work",
            handoff_input={"brief": "review the draft"},
            projected_context={"draft_answer": "Trains are reimbursed."},
            runtime={"metadata": {"counter": str(counter)}},
        ).run_id
        (entry,) = scoria.get_run_detail(run_id).delegated_handoffs
        assert entry.child_status == "queued"
    results = race_threads(app, run_id, lambda index: "dispatch")
    assert_single_dispatch(app, run_id, counter, results)
    with app.app_context():
        (entry,) = scoria.get_run_detail(run_id).delegated_handoffs
    assert entry.child_status == "completed"
    ((_, step_id, _),) = (line.split() for line in executions(counter))
    assert step_id == entry.child_step_id


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_races_on_a_serializable_database(database_uri: str, tmp_path: Path) -> None:
    """A database whose transactions default to SERIALIZABLE aborts some of them; those
    are tried again, so the losers still get typed errors and nothing else."""
    serializable = {"options": "-c default_transaction_isolation=serializable"}
    app = create_test_app(
        database_uri,
        tmp_path / "instance",
        SCORIA_ENGINE_OPTIONS={"connect_args": serializable},
    )
    counter = tmp_path / "executions"
    approved = paused_run(app, counter, approved=True)
    assert_single_resume(app, approved, counter, race_threads(app, approved, lambda i: "resume"))
    paused = paused_run(app, tmp_path / "other")
    assert assert_single_decision(app, paused, race_threads(app, paused, lambda i: "approve"))
    key = str(tmp_path / "keyed-executions")
    results = race_threads(app, key, lambda i: "start_keyed")
    assert {code for _, code, _ in results} == {"ok"}, results
    assert len({detail.split()[1] for _, _, detail in results}) == 1
    assert len(executions(Path(key))) == 1
    app.extensions["scoria"].storage(app).engine.dispose()


@contextmanager
def changed_while_waiting(
    engine: sa.Engine, run_key: uuid.UUID, call: Callable[[], None]
) -> Iterator[tuple[sa.Connection, datetime]]:
    """Hold the run's lock while ``call`` runs in a thread and waits for it; then change
    the run, as another call would, at the time given, with what the block adds."""
    with engine.connect() as held:
        held.execute(
            sa.select(tables.runs.c.id).where(tables.runs.c.id == run_key).with_for_update()
        )
        calling = threading.Thread(target=call)
        calling.start()
        until_a_query_waits_for_a_lock(engine)
        now = datetime.now(UTC)
        yield held, now
        held.execute(
            tables.runs.update()
            .where(tables.runs.c.id == run_key)
            .values(version=tables.runs.c.version + 1, updated_at=now)
        )
        held.commit()
        calling.join(timeout=30)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_resume_waiting_for_the_runs_lock_sees_the_approval_asked_meanwhile(
    app: Flask, tmp_path: Path
) -> None:
    """A resume whose statement read the run before another call moved it (here: its
    step asked for approval again, as a first resume's handler does) must not claim the
    step on the approval it read: the new one is pending."""
    executed: list[str | None] = []

    def ask_each_time(step: scoria.StepView, run: scoria.RunSummary) -> scoria.Outcome:
        executed.append(None if step.approval is None else step.approval.id)
        return scoria.WaitForApproval("again")

    app.extensions["scoria"].handler("ask")(ask_each_time)
    engine = app.extensions["scoria"].storage(app).engine
    with app.app_context():
        run = scoria.start_run(scoria.identity(IDENTITY), initial_step={"kind": "ask"})
        scoria.approve_run(run.run_id, decided_by="reviewer")
        (first,) = scoria.get_run_detail(run.run_id).approvals
    outcome: list[object] = []

    def resume() -> None:
        with app.app_context():
            try:
                outcome.append(scoria.resume_run(run.run_id).status)
            except scoria.ScoriaError as exc:
                outcome.append(type(exc))

    run_key = uuid.UUID(run.run_id)
    with changed_while_waiting(engine, run_key, resume) as (held, now):
        # What another resume's handler leaves behind: the step asks again.
        held.execute(
            tables.approvals.insert().values(
                id=uuid.uuid4(),
                run_id=run_key,
                step_id=uuid.UUID(first.step_id),
                status="pending",
                tool_name="again",
                requested_at=now,
                tenant_id=None,
            )
        )
    assert outcome == [scoria.ApprovalPending]
    assert executed == [None]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
@pytest.mark.parametrize("verb", ["cancel", "execute a queued step"])
def test_a_call_waiting_for_the_runs_lock_writes_a_time_after_the_change_it_waited_for(
    app: Flask, verb: str
) -> None:
    """A call that waited for the run's lock while another call changed the run dates
    its own change after that call's: the run's timeline never goes back in time. A
    cancel reads the run under its lock; a worker's claim sends its step's read with the
    lock, on a time taken before it."""
    app.extensions["scoria"].handler("later", executor="worker")(lambda step, run: None)
    engine = app.extensions["scoria"].storage(app).engine
    with app.app_context():
        run = scoria.start_run(scoria.identity(IDENTITY), initial_step={"kind": "later"})
        started = scoria.get_run_detail(run.run_id)
    (step,) = started.steps
    calls: dict[str, Callable[[], object]] = {
        "cancel": lambda: scoria.cancel_run(run.run_id, cancelled_by="operator"),
        "execute a queued step": lambda: execute_step(run.run_id, step.id),
    }
    failures: list[BaseException] = []

    def call() -> None:
        with app.app_context():
            try:
                calls[verb]()
            except BaseException as exc:  # reported below
                failures.append(exc)

    with changed_while_waiting(engine, uuid.UUID(run.run_id), call) as (_, changed_at):
        pass
    assert failures == []
    with app.app_context():
        detail = scoria.get_run_detail(run.run_id)
    assert detail.summary.status == ("cancelled" if verb == "cancel" else "completed")
    written = detail.events[len(started.events) :]
    assert written and all(event.created_at >= changed_at for event in written), [
        (event.event_type, event.created_at) for event in detail.events
    ]
    assert detail.summary.updated_at >= changed_at
