"""Blinker signals: sent once per transition, after the commit, with the new summary."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from _helpers import IDENTITY, ask_then_work
from flask import Flask

import flask_scoria as scoria
from flask_scoria import Fail

SIGNALS = {
    "run_started": scoria.run_started,
    "run_paused": scoria.run_paused,
    "approval_decided": scoria.approval_decided,
    "run_resumed": scoria.run_resumed,
    "run_completed": scoria.run_completed,
    "run_failed": scoria.run_failed,
    "handoff_created": scoria.handoff_created,
}

Received = list[tuple[str, str, str, dict[str, Any]]]


@pytest.fixture
def received(app: Flask) -> Iterator[Received]:
    """``(signal, run_id, status read back at send time, extra)`` for each signal sent."""
    log: Received = []
    problems: list[str] = []
    receivers = []
    for name, signal in SIGNALS.items():

        def receiver(
            sender: Any, *, run: scoria.RunSummary, _name: str = name, **extra: Any
        ) -> None:
            # A receiver's exception is logged, not raised: collect problems instead.
            if sender is not app or not isinstance(run, scoria.RunSummary):
                problems.append(f"{_name}: sent by {sender!r} with {run!r}")
                return
            stored = scoria.get_run(run.run_id).status
            log.append((_name, run.run_id, stored, extra))
            if stored != run.status:
                problems.append(f"{_name}: sent before the commit ({stored} != {run.status})")

        signal.connect(receiver, sender=app)
        receivers.append((signal, receiver))
    with app.app_context():
        yield log
    for signal, receiver in receivers:
        signal.disconnect(receiver, sender=app)
    assert problems == []


def names(log: Received) -> list[str]:
    return [name for name, *_ in log]


def test_pause_decide_resume_complete(received: Received) -> None:
    run = scoria.start_run(
        scoria.identity(IDENTITY), initial_step={"kind": "work"}, handlers={"work": ask_then_work}
    )
    assert names(received) == ["run_started", "run_paused"]
    scoria.approve_run(run.run_id, decided_by="reviewer")
    assert names(received)[2:] == ["approval_decided"]
    assert received[2][3]["approval"]["decided_by"] == "reviewer"
    assert received[2][3]["approval"]["decision"] == "approved"
    scoria.resume_run(run.run_id, handlers={"work": ask_then_work})
    assert names(received)[3:] == ["run_resumed", "run_completed"]
    assert {run_id for _, run_id, _, _ in received} == {run.run_id}
    assert [status for _, _, status, _ in received] == [
        "running",
        "waiting_for_approval",
        "waiting_for_approval",
        "running",
        "completed",
    ]


def test_failed_run(received: Received) -> None:
    scoria.start_run(
        scoria.identity(IDENTITY),
        initial_step={"kind": "work"},
        handlers={"work": lambda step, run: Fail("no")},
    )
    assert names(received) == ["run_started", "run_failed"]


def test_resuming_past_an_expired_approval_sends_no_run_failed(received: Received) -> None:
    """The expiry and the retry that asks again commit together: nobody sees the run failed."""

    def ask(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        if step.approval is None:
            return scoria.WaitForApproval("send", expires_in=0.05)
        return None

    run = scoria.start_run(
        scoria.identity(IDENTITY), initial_step={"kind": "work"}, handlers={"work": ask}
    )
    time.sleep(0.1)
    resumed = scoria.resume_run(run.run_id, handlers={"work": ask})
    assert resumed.status == "waiting_for_approval"
    assert names(received) == ["run_started", "run_paused", "run_resumed", "run_paused"]
    events = [event.event_type for event in scoria.get_run_detail(run.run_id).events]
    assert events.count("approval_expired") == 1 and events.count("run_failed") == 1


def test_run_without_steps(received: Received) -> None:
    scoria.start_run(scoria.identity(IDENTITY))
    assert names(received) == ["run_started", "run_completed"]


def test_handoff_created(received: Received) -> None:
    run = scoria.start_handoff_run(
        scoria.identity(IDENTITY),
        "critic",
        root_role_id="planner",
        delegated_kind="review",
        handoff_input={"brief": "check"},
        projected_context={"draft_answer": "text"},
    )
    assert names(received) == ["run_started", "handoff_created"]
    handoff = received[1][3]["handoff"]
    (delegated,) = scoria.get_run_detail(run.run_id).delegated_handoffs
    assert handoff["handoff_id"] == delegated.handoff_id
    assert handoff["delegated_role_id"] == "critic"
    scoria.dispatch(run.run_id, handlers={"review": lambda step, run: None})
    assert names(received)[2:] == ["run_completed"]


def test_rejected_calls_send_nothing(received: Received) -> None:
    with pytest.raises(scoria.InvalidHandoff):
        scoria.start_handoff_run(
            scoria.identity(IDENTITY),
            "critic",
            root_role_id="planner",
            delegated_kind="review",
            handoff_input={},
            projected_context={"transcript": []},
        )
    with pytest.raises(scoria.RunNotFound):
        scoria.resume_run("missing")
    assert received == []


def test_a_failing_receiver_is_logged_and_the_call_still_succeeds(
    app: Flask, received: Received, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(sender: Any, **extra: Any) -> None:
        raise RuntimeError("notifier is down")

    scoria.run_started.connect(broken, sender=app)
    try:
        run = scoria.start_run(IDENTITY)
    finally:
        scoria.run_started.disconnect(broken, sender=app)
    assert scoria.get_run(run.run_id).status == "completed"
    assert names(received) == ["run_started", "run_completed"]
    failures = [r for r in caplog.records if "signal receiver failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert "notifier is down" in str(failures[0].exc_info[1])
