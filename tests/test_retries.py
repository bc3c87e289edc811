"""Retries, timeouts and due times of steps, with the inline executor."""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime, timedelta
from html import unescape as html_unescape
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask

import flask_scoria as scoria
from flask_scoria import Fail, Retry, Scoria, Succeed
from flask_scoria.operator import present
from flask_scoria.policy import MAX_SECONDS
from flask_scoria.runtime.tables import steps

WHO = {"actor_id": "a-1", "tenant_id": "t-1", "session_id": "s-1"}
QUICK = Retry(attempts=3, delay=0.05, backoff=2.0, jitter=False)


class Flaky:
    """Raises ``failures`` times, then succeeds; remembers each attempt it saw."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: list[int] = []

    def __call__(self, step: scoria.StepView, run: scoria.RunSummary) -> Succeed:
        self.attempts.append(step.attempt)
        if len(self.attempts) <= self.failures:
            raise ConnectionError(f"model unavailable ({len(self.attempts)})")
        return Succeed({"attempt": step.attempt})


def start(kind: str) -> scoria.RunSummary:
    return scoria.start_run(WHO, initial_step={"kind": kind})


def events(run_id: str) -> list[scoria.Event]:
    return list(scoria.get_run_detail(run_id).events)


def only_step(run_id: str) -> scoria.Step:
    (step,) = scoria.get_run_detail(run_id).steps
    return step


def test_a_step_that_raises_twice_completes_at_its_third_attempt(
    app: Flask, runtime: Scoria
) -> None:
    flaky = Flaky(failures=2)
    runtime.handler("draft", retry=QUICK)(flaky)
    with app.app_context():
        run = start("draft")
        assert run.status == "completed"
        assert flaky.attempts == [1, 2, 3]
        step = only_step(run.run_id)
        assert (step.status, step.attempt, step.result_envelope) == ("completed", 3, {"attempt": 3})
        timeline = events(run.run_id)
    assert [event.event_type for event in timeline] == [
        "run_started",
        "step_started",
        "retry_scheduled",
        "step_started",
        "retry_scheduled",
        "step_started",
        "step_completed",
        "run_completed",
    ]
    retries = [event for event in timeline if event.event_type == "retry_scheduled"]
    for retry, (attempt, delay) in zip(retries, [(2, 0.05), (3, 0.1)], strict=True):
        payload = retry.payload or {}
        assert payload["attempt"] == attempt
        assert payload["error"]["type"] == "ConnectionError"
        assert "model unavailable" in payload["error"]["traceback"]
        waited = datetime.fromisoformat(payload["not_before"]) - retry.created_at
        assert waited == pytest.approx(timedelta(seconds=delay), abs=timedelta(milliseconds=5))


def test_the_last_attempt_fails_step_and_run(app: Flask, runtime: Scoria) -> None:
    flaky = Flaky(failures=5)
    runtime.handler("draft", retry=Retry(attempts=2, delay=0.01))(flaky)
    with app.app_context():
        run = start("draft")
        assert run.status == "failed"
        assert flaky.attempts == [1, 2]
        step = only_step(run.run_id)
        assert (step.status, step.attempt) == ("failed", 2)
        assert step.error_envelope["message"] == "model unavailable (2)"  # type: ignore[index]
        assert [event.event_type for event in events(run.run_id)][-4:] == [
            "retry_scheduled",
            "step_started",
            "step_failed",
            "run_failed",
        ]
        # and a person can still retry by hand
        flaky.failures = 0
        assert scoria.resume_run(run.run_id).status == "completed"
        assert flaky.attempts == [1, 2, 3]


def test_fail_is_never_retried(app: Flask, runtime: Scoria) -> None:
    seen: list[int] = []

    @runtime.handler("draft", retry=QUICK)
    def refuse(step: scoria.StepView, run: scoria.RunSummary) -> Fail:
        seen.append(step.attempt)
        return Fail("not allowed")

    with app.app_context():
        run = start("draft")
        assert run.status == "failed"
        assert "retry_scheduled" not in [event.event_type for event in events(run.run_id)]
    assert seen == [1]


def test_a_late_outcome_is_discarded_and_the_step_times_out(
    app: Flask, runtime: Scoria, caplog: pytest.LogCaptureFixture
) -> None:
    @runtime.handler("draft", timeout=0.2)
    def slow(step: scoria.StepView, run: scoria.RunSummary) -> Succeed:
        time.sleep(0.5)
        return Succeed({"late": True})

    with app.app_context():
        run = start("draft")
        assert run.status == "failed"
        step = only_step(run.run_id)
        assert step.result_envelope is None
        assert step.error_envelope["type"] == "step_timeout"  # type: ignore[index]
        assert step.error_envelope["timeout"] == 0.2  # type: ignore[index]
        assert [event.event_type for event in events(run.run_id)][-2:] == [
            "step_timeout",
            "run_failed",
        ]
    (record,) = [each for each in caplog.records if "past its timeout" in each.getMessage()]
    assert record.levelname == "WARNING"
    assert f"kind 'draft') of run {run.run_id} ran past its timeout of 0.2 seconds" in (
        record.getMessage()
    )


def test_a_timed_out_attempt_is_retried(app: Flask, runtime: Scoria) -> None:
    calls: list[int] = []

    @runtime.handler("draft", timeout=0.2, retry=Retry(attempts=2, delay=0.01))
    def slow_once(step: scoria.StepView, run: scoria.RunSummary) -> Succeed:
        calls.append(step.attempt)
        if step.attempt == 1:
            time.sleep(0.4)
        return Succeed({"attempt": step.attempt})

    with app.app_context():
        run = start("draft")
        assert run.status == "completed"
        assert only_step(run.run_id).result_envelope == {"attempt": 2}
        types = [event.event_type for event in events(run.run_id)]
    assert calls == [1, 2]
    assert types[2:4] == ["step_timeout", "retry_scheduled"]


def test_a_read_notices_a_timeout_while_the_handler_still_runs(
    app: Flask, runtime: Scoria, caplog: pytest.LogCaptureFixture
) -> None:
    started, release = threading.Event(), threading.Event()
    results: list[scoria.RunSummary] = []

    @runtime.handler("draft", timeout=0.2)
    def stuck(step: scoria.StepView, run: scoria.RunSummary) -> Succeed:
        started.set()
        release.wait(timeout=30)
        return Succeed({"late": True})

    def call() -> None:
        with app.app_context():
            results.append(start("draft"))

    caller = threading.Thread(target=call)
    caller.start()
    try:
        assert started.wait(timeout=30)
        time.sleep(0.3)
        with app.app_context():
            (run,) = scoria.list_runs_for_session(WHO["session_id"])
            assert scoria.get_run(run.run_id).status == "failed"
            assert only_step(run.run_id).error_envelope["type"] == "step_timeout"  # type: ignore[index]
    finally:
        release.set()
        caller.join(timeout=30)
    assert results[0].status == "failed"
    with app.app_context():
        assert only_step(run.run_id).result_envelope is None
        assert [event.event_type for event in events(run.run_id)].count("step_timeout") == 1
        step_id = only_step(run.run_id).id
    # Logged once, by the read that recorded it; not again when the late outcome arrived.
    said = f"Step {step_id} (kind 'draft') of run {run.run_id} ran past its timeout of 0.2 seconds."
    assert [each.getMessage() for each in caplog.records].count(said) == 1


def test_a_per_call_handler_keeps_its_kinds_timeout_and_retries(
    app: Flask, runtime: Scoria
) -> None:
    """A per-call handler replaces the registered function, not its kind's policy: the
    call that runs it and every read of the run judge its step alike."""
    runtime.handler("draft", timeout=0.2, retry=Retry(attempts=2, delay=0.01))(Flaky(0))

    def slow(step: scoria.StepView, run: scoria.RunSummary) -> Succeed:
        time.sleep(0.4 if step.attempt == 1 else 0)
        return Succeed({"attempt": step.attempt})

    with app.app_context():
        run = scoria.start_run(WHO, initial_step={"kind": "draft"}, handlers={"draft": slow})
        assert run.status == "completed"
        assert only_step(run.run_id).result_envelope == {"attempt": 2}
        types = [event.event_type for event in events(run.run_id)]
        assert types[2:4] == ["step_timeout", "retry_scheduled"]
        # A retry due later than the call waits for stays queued for the kind's executor.
        runtime.handler("mail", retry=Retry(attempts=2, delay=3600))(Flaky(0))
        later = scoria.start_run(WHO, initial_step={"kind": "mail"}, handlers={"mail": Flaky(1)})
        assert later.status == "running"
        assert (only_step(later.run_id).status, only_step(later.run_id).attempt) == ("queued", 2)
        # A kind nobody registered: one attempt, no timeout.
        unknown = scoria.start_run(
            WHO, initial_step={"kind": "sketch"}, handlers={"sketch": Flaky(1)}
        )
        assert unknown.status == "failed"
        assert only_step(unknown.run_id).attempt == 1


def test_a_retry_due_later_waits_for_a_worker_and_never_runs_early(
    app: Flask, runtime: Scoria
) -> None:
    flaky = Flaky(failures=1)
    runtime.handler("draft", retry=Retry(attempts=2, delay=30, jitter=False))(flaky)
    with app.app_context():
        run = start("draft")
        assert run.status == "running"
        step = only_step(run.run_id)
        assert (step.status, step.attempt) == ("queued", 2)
        assert step.not_before is not None
        assert step.not_before - datetime.now(UTC) > timedelta(seconds=25)
        assert scoria.dispatch_queued() == []
        assert scoria.dispatch(run.run_id).status == "running"
        assert flaky.attempts == [1]
        # once due, a worker pass (or dispatch) runs it
        engine = runtime.storage().engine
        with engine.begin() as conn:
            conn.execute(
                sa.update(steps).values(not_before=datetime.now(UTC) - timedelta(seconds=1))
            )
        (done,) = scoria.dispatch_queued()
        assert done.status == "completed"
    assert flaky.attempts == [1, 2]


def claimed_by_a_dead_process(runtime: Scoria) -> scoria.RunSummary:
    """A run whose ``draft`` step was claimed by a process that died 5 seconds ago."""
    runtime.handler("draft", retry=Retry(attempts=2, delay=0, jitter=False))(Flaky(failures=0))
    run = scoria.start_run(WHO, initial_step={"kind": "other"})
    past = datetime.now(UTC) - timedelta(seconds=5)
    with runtime.storage().engine.begin() as conn:
        conn.execute(
            sa.update(steps).values(
                kind="draft",
                status="running",
                lease_token="dead",
                lease_expires_at=past,
                started_at=past,
            )
        )
    return run


def test_an_expired_lease_is_retried_per_policy(app: Flask, runtime: Scoria) -> None:
    with app.app_context():
        run = claimed_by_a_dead_process(runtime)
        assert scoria.get_run(run.run_id).status == "running"
        step = only_step(run.run_id)
        assert (step.status, step.attempt) == ("queued", 2)
        assert [event.event_type for event in events(run.run_id)][-2:] == [
            "lease_expired",
            "retry_scheduled",
        ]
        assert scoria.dispatch(run.run_id).status == "completed"


def test_recover_says_it_queued_a_retry(app: Flask, runtime: Scoria) -> None:
    with app.app_context():
        run = claimed_by_a_dead_process(runtime)
    result = app.test_cli_runner().invoke(args=["scoria", "recover"])
    assert result.output == f"retry queued: {run.run_id}\n1 run(s) recovered\n"
    with app.app_context():
        assert (only_step(run.run_id).status, only_step(run.run_id).attempt) == ("queued", 2)


def test_a_traceback_keeps_the_last_8_kib(app: Flask) -> None:
    def deep(depth: int) -> Any:
        if depth == 0:
            raise RuntimeError("x" * 20000)
        return deep(depth - 1)

    with app.app_context():
        run = scoria.start_run(
            WHO, initial_step={"kind": "deep"}, handlers={"deep": lambda s, r: deep(50)}
        )
        error = only_step(run.run_id).error_envelope or {}
    assert len(error["traceback"].encode()) <= 8 * 1024
    assert error["traceback"].rstrip().endswith("x")


@pytest.mark.parametrize(
    "options",
    [
        {"attempts": 0},
        {"attempts": 1.5},
        {"delay": -1},
        {"backoff": 0.5},
        {"max_delay": float("nan")},
        # Beyond what a datetime can hold once added to now.
        {"delay": 1e12, "max_delay": 1e12},
        {"max_delay": 1e20},
    ],
)
def test_retry_refuses_bad_values(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Retry(**options)


@pytest.mark.parametrize("timeout", [0, 1e12, float("inf")])
def test_handler_refuses_a_bad_timeout(runtime: Scoria, timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        runtime.handler("x", timeout=timeout)


def test_handler_refuses_a_bad_executor(runtime: Scoria) -> None:
    with pytest.raises(ValueError, match="executor"):
        runtime.handler("x", executor="threads")


def test_the_longest_retry_delay_is_accepted_and_scheduled(runtime: Scoria, app: Flask) -> None:
    runtime.handler("later", retry=Retry(attempts=2, delay=MAX_SECONDS, max_delay=MAX_SECONDS))(
        Flaky(failures=1)
    )
    with app.app_context():
        run = start("later")
        step = only_step(run.run_id)
    assert step.status == "queued" and step.not_before is not None
    assert step.not_before.year >= datetime.now(UTC).year + 9


def test_the_run_page_shows_the_retry_the_history_and_the_timeout(
    app: Flask, runtime: Scoria
) -> None:
    runtime.operator_scope(lambda: {"tenant_id": WHO["tenant_id"], "actor_id": "ops"})
    runtime.handler("draft", retry=Retry(attempts=5, delay=60, jitter=False))(Flaky(failures=9))

    @runtime.handler("gate", timeout=0.1, retry=Retry(attempts=2, delay=0.01, jitter=False))
    def slow(step: scoria.StepView, run: scoria.RunSummary) -> Succeed:
        time.sleep(0.3)
        return Succeed()

    with app.app_context():
        waiting = start("draft").run_id
        timed_out = start("gate").run_id
        not_before = only_step(waiting).not_before
    assert not_before is not None
    client = app.test_client()
    html = client.get(f"/scoria/workflows/{waiting}").text
    assert "attempt 2 of 5</span>" in html
    due = re.search(r"Attempt 2 of 5 is due <time datetime=\"([^\"]+)\"", html)
    assert due and abs(datetime.fromisoformat(due.group(1)) - not_before) < timedelta(seconds=0.001)
    (line,) = re.findall(r'<li data-attempt-event="step_failed">(.*?)</li>', html, re.S)
    assert line.startswith("Attempt 1 failed <time")
    assert "<strong>ConnectionError</strong> model unavailable (1). Attempt 2 due <time" in line
    # The timeline shows the error's traceback as text, apart from the payload's JSON.
    event = html.split('data-event-type="retry_scheduled"')[1].split("</li>")[0]
    payload, trace = event.split('<details class="traceback">')
    assert "Traceback (most recent" not in payload and "ConnectionError" in payload
    assert "\nConnectionError: model unavailable (1)\n" in html_unescape(trace)
    html = client.get(f"/scoria/workflows/{timed_out}").text
    assert "timed out after 0.1 s" in html
    first, last = re.findall(r'<li data-attempt-event="step_timeout">(.*?)</li>', html, re.S)
    assert first.startswith("Attempt 1 timed out <time") and "Attempt 2 due <time" in first
    assert last.startswith("Attempt 2 timed out <time") and " due " not in last
    assert "<strong>step_timeout</strong> The step was still running 0.1 seconds" in first


def test_failed_attempts_pair_each_failure_with_the_retry_it_led_to() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)

    def event(n: int, kind: str, payload: dict[str, Any] | None = None) -> scoria.Event:
        return scoria.Event(f"r/{n}", n, kind, "s", payload, now + timedelta(seconds=n))  # type: ignore[arg-type]

    due = (now + timedelta(minutes=1)).isoformat()
    lost = {"type": "lease_expired", "message": "stopped"}
    slow = {"type": "step_timeout", "message": "late", "timeout": 5}
    events = [
        event(1, "step_started", {"attempt": 1}),
        event(2, "retry_scheduled", {"attempt": 2, "not_before": due, "error": {"type": "E"}}),
        event(3, "step_started", {"attempt": 2}),
        event(4, "lease_expired", lost),
        event(5, "retry_scheduled", {"attempt": 3, "not_before": due, "error": lost}),
        event(6, "step_started", {"attempt": 3}),
        event(7, "step_timeout", slow),
        event(8, "run_failed"),
        # An operator's Retry: attempt 4 fails for good, with the handler's own error.
        event(9, "retry_requested", {"requested_by": "ops"}),
        event(10, "step_started", {"attempt": 4}),
        event(11, "step_failed", {"type": "ValueError", "message": "bad"}),
    ]
    found = present.failed_attempts(events, attempt=4)
    assert [(each.attempt, each.how, each.error.get("type")) for each in found] == [
        (1, "step_failed", "E"),
        (2, "lease_expired", "lease_expired"),
        (3, "step_timeout", "step_timeout"),
        (4, "step_failed", "ValueError"),
    ]
    assert [each.retry_at for each in found] == [now + timedelta(minutes=1)] * 2 + [None] * 2
    assert found[1].at == now + timedelta(seconds=4)
    # Only the latest events in view: the failure is numbered by the step's attempt now,
    # or by the retry that follows it.
    (alone,) = present.failed_attempts([event(7, "step_timeout", slow)], attempt=3)
    assert (alone.attempt, alone.retry_at) == (3, None)
    cut = events[3:]  # from the lease expiry of attempt 2 on, its step_started out of view
    assert [(each.attempt, each.how) for each in present.failed_attempts(cut, attempt=4)] == [
        (2, "lease_expired"),
        (3, "step_timeout"),
        (4, "step_failed"),
    ]
    # An operator's Retry still queued: the failure it answers is the attempt before.
    queued = [event(1, "step_failed", {"type": "E"}), event(2, "run_failed")]
    queued.append(event(3, "retry_requested", {"attempt": 3}))
    (answered,) = present.failed_attempts(queued, attempt=3)
    assert answered.attempt == 2


def test_an_events_traceback_is_split_from_its_redacted_payload() -> None:
    trace = 'Traceback (most recent call last):\n  File "x.py"\nValueError: \u202eboom'
    payload = {"attempt": 2, "error": {"type": "ValueError", "api_key": "k", "traceback": trace}}
    shown, found = present.split_event_traceback(payload)
    assert found == trace
    assert shown == {"attempt": 2, "error": {"type": "ValueError", "api_key": "[REDACTED]"}}
    assert present.split_event_traceback({"type": "E", "traceback": trace})[1] == trace
    # A key the app redacts hides the error whole, its traceback with it.
    assert present.split_event_traceback(payload, frozenset({"error"})) == (
        {"attempt": 2, "error": "[REDACTED]"},
        None,
    )
