"""The run state machine through the facade, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _helpers import IDENTITY, ask_then_work, succeed, wait_for_approval
from conftest import create_test_app
from flask import Flask, current_app

import flask_scoria as scoria
from flask_scoria import Fail, Scoria, Succeed, WaitForApproval
from flask_scoria.runtime.tables import runs, steps

pytestmark = pytest.mark.usefixtures("app_ctx")

STEP = {"kind": "work"}


def start(handlers: dict[str, Any] | None = None, **options: Any) -> scoria.RunSummary:
    return scoria.start_run(
        scoria.identity(IDENTITY), initial_step=STEP, handlers=handlers, **options
    )


def paused_run() -> str:
    return start({"work": wait_for_approval}).run_id


def event_types(run_id: str) -> list[str]:
    return [event.event_type for event in scoria.get_run_detail(run_id).events]


def only_step(run_id: str) -> scoria.Step:
    (step,) = scoria.get_run_detail(run_id).steps
    return step


def test_start_without_initial_step_is_completed_at_once() -> None:
    run = scoria.start_run(scoria.identity(IDENTITY))
    assert run.status == "completed"
    assert run.completed_at is not None
    assert run.current_step_id is None
    assert (run.actor_id, run.tenant_id, run.session_id) == ("actor-1", "tenant-1", "session-1")
    assert event_types(run.run_id) == ["run_started", "run_completed"]
    assert scoria.get_run_detail(run.run_id).steps == []


def test_step_without_handler_stays_queued_until_dispatch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("INFO", logger="flask_scoria"):
        run = start()
    assert "no handler for kind 'work' is known" in caplog.text
    assert run.status == "running"
    assert only_step(run.run_id).status == "queued"
    # a dispatch that still knows no handler changes nothing
    assert scoria.dispatch(run.run_id).status == "running"
    assert event_types(run.run_id) == ["run_started"]
    done = scoria.dispatch(run.run_id, handlers={"work": succeed})
    assert done.status == "completed"
    step = only_step(run.run_id)
    assert step.status == "completed"
    assert step.result_envelope == {"step_id": step.id, "attempt": 1}
    # dispatch on a finished run is a no-op
    assert scoria.dispatch(run.run_id, handlers={"work": succeed}).updated_at == done.updated_at


def test_registry_handler_and_import_string(runtime: Scoria) -> None:
    @runtime.handler("work")
    def registered(step: scoria.StepView, run: scoria.RunSummary) -> dict[str, str]:
        return {"by": "registry"}

    assert only_step(start().run_id).result_envelope == {"by": "registry"}
    by_string = start({"work": "_helpers:succeed"})
    assert by_string.status == "completed"
    assert only_step(by_string.run_id).result_envelope["attempt"] == 1  # type: ignore[index]
    # a per-call handler wins over the registry
    per_call = start({"work": lambda step, run: {"by": "per-call"}})
    assert only_step(per_call.run_id).result_envelope == {"by": "per-call"}


def test_unimportable_handler_string_is_invalid_run_options() -> None:
    with pytest.raises(scoria.InvalidRunOptions):
        start({"work": "_helpers:no_such_function"})
    with pytest.raises(scoria.InvalidRunOptions):
        start({"work": 42})


@pytest.mark.parametrize(
    ("returned", "envelope"),
    [
        (Succeed({"a": 1}), {"a": 1}),
        (Succeed(), None),
        ({"b": [1, 2]}, {"b": [1, 2]}),
        (None, None),
        (Succeed("text"), {"result": "text"}),
        (Succeed([1, "x"]), {"result": [1, "x"]}),
    ],
)
def test_success_outcomes(returned: Any, envelope: Any) -> None:
    run = start({"work": lambda step, run: returned})
    assert run.status == "completed"
    step = only_step(run.run_id)
    assert step.status == "completed"
    assert step.result_envelope == envelope


def raise_error(step: scoria.StepView, run: scoria.RunSummary) -> None:
    raise ValueError("boom")


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (lambda step, run: Fail("nope"), {"message": "nope"}),
        (lambda step, run: Fail({"code": 7}), {"code": 7}),
        (raise_error, {"type": "ValueError", "message": "boom"}),
    ],
)
def test_failure_outcomes(handler: Any, expected: dict[str, Any]) -> None:
    run = start({"work": handler})
    assert run.status == "failed"
    step = only_step(run.run_id)
    assert step.status == "failed"
    envelope = dict(step.error_envelope or {})
    if handler is raise_error:  # an exception's envelope also holds its last frames
        assert 'raise ValueError("boom")' in envelope.pop("traceback")
    assert envelope == expected
    assert event_types(run.run_id)[-2:] == ["step_failed", "run_failed"]


def test_a_cancelled_sdk_or_a_library_exiting_fails_the_step(app: Flask) -> None:
    def cancelled(step: scoria.StepView, run: scoria.RunSummary) -> None:
        raise asyncio.CancelledError

    def exits(step: scoria.StepView, run: scoria.RunSummary) -> None:
        sys.exit(2)

    run = start({"work": cancelled})
    assert (run.status, (only_step(run.run_id).error_envelope or {})["type"]) == (
        "failed",
        "CancelledError",
    )
    # Off the main thread (a worker's, a threaded server's), sys.exit() is a library's,
    # and so is any other BaseException: no signal arrives there.
    found: list[scoria.RunSummary] = []

    def in_a_thread() -> None:
        with app.app_context():
            found.append(start({"work": exits}))
            found.append(start({"work": interrupted}))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join(30)
    failures = [(only_step(run.run_id).error_envelope or {}).get("type") for run in found]
    assert [run.status for run in found] == ["failed", "failed"]
    assert failures == ["SystemExit", "KeyboardInterrupt"]
    # On the main thread it may be a server's signal handler ending the process.
    with pytest.raises(SystemExit):
        start({"work": exits})


def interrupted(step: scoria.StepView, run: scoria.RunSummary) -> None:
    raise KeyboardInterrupt


def test_ctrl_c_in_a_handler_is_not_a_failure() -> None:
    with pytest.raises(KeyboardInterrupt):
        start({"work": interrupted})


@pytest.mark.parametrize("returned", [42, "done", object(), Succeed({"x": object()})])
def test_unknown_return_is_invalid_handler_result(returned: Any) -> None:
    run = start({"work": lambda step, run: returned})
    assert run.status == "failed"
    assert only_step(run.run_id).error_envelope["type"] == "invalid_handler_result"  # type: ignore[index]


class Unreadable(dict[str, Any]):
    """A result whose items cannot be read."""

    def items(self) -> Any:
        raise RuntimeError("no items today")


class ReviewHandoff(scoria.Handoff):
    """An app's own kind of handoff."""


def test_a_result_that_cannot_be_read_fails_the_step() -> None:
    run = start({"work": lambda step, run: Succeed(Unreadable(a=1))})
    assert run.status == "failed"
    error = only_step(run.run_id).error_envelope or {}
    assert error["type"] == "invalid_handler_result"
    assert "RuntimeError: no items today" in error["message"]


def test_an_outcome_of_a_subclass_is_recorded_as_its_class() -> None:
    run = start({"work": lambda step, run: ReviewHandoff("critic", "review")})
    assert run.status == "running"
    parent, child = scoria.get_run_detail(run.run_id).steps
    assert (parent.status, child.kind, child.role_id) == ("completed", "review", "critic")


def test_an_approval_that_expires_at_once_is_refused() -> None:
    run = start({"work": lambda step, run: scoria.WaitForApproval("publish", expires_in=0)})
    assert run.status == "failed"
    error = only_step(run.run_id).error_envelope or {}
    assert error["type"] == "invalid_handler_result"
    assert "expires_in must be more than 0" in error["message"]


def test_handler_sees_its_approval_after_resume() -> None:
    run = start({"work": ask_then_work})
    assert run.status == "waiting_for_approval"
    assert run.awaiting_approval is True
    approval = scoria.get_run_detail(run.run_id).approvals[0]
    assert (approval.status, approval.tool_name, approval.arguments) == (
        "pending",
        "publish",
        {"env": "prod"},
    )
    approved = scoria.approve_run(run.run_id, decided_by="reviewer", note="fine")
    assert approved.status == "waiting_for_approval"
    resumed = scoria.resume_run(run.run_id, handlers={"work": ask_then_work})
    assert resumed.run_id == run.run_id
    assert resumed.status == "completed"
    assert only_step(run.run_id).result_envelope == {
        "approved_by": "reviewer",
        "decision": "approved",
    }
    detail = scoria.get_run_detail(run.run_id)
    assert len(detail.approvals) == 1
    assert detail.approvals[0].note == "fine"
    decided = [e.payload for e in detail.events if e.event_type == "approval_decided"]
    approval_id = detail.approvals[0].id
    assert decided == [
        {"approval_id": approval_id, "decision": "approved", "decided_by": "reviewer"}
    ]
    # Approving and resuming in one call (one statement on PostgreSQL) says the same.
    fused = paused_run()
    scoria.approve_run(fused, decided_by="reviewer", resume=True, handlers={"work": succeed})
    detail = scoria.get_run_detail(fused)
    decided = [e.payload for e in detail.events if e.event_type == "approval_decided"]
    expected = {"approval_id": detail.approvals[0].id, "decision": "approved"}
    assert decided == [{**expected, "decided_by": "reviewer"}]


def test_reject_ends_step_and_run_and_cannot_be_decided_again() -> None:
    run_id = paused_run()
    rejected = scoria.reject_run(run_id, decided_by="boss", reason="too risky")
    assert rejected.status == "rejected"
    assert only_step(run_id).status == "rejected"
    approval = scoria.get_run_detail(run_id).approvals[0]
    assert (approval.status, approval.decided_by, approval.note) == (
        "rejected",
        "boss",
        "too risky",
    )
    for verb in (scoria.approve_run, scoria.reject_run):
        with pytest.raises(scoria.ApprovalAlreadyDecided) as info:
            verb(run_id, decided_by="someone-else")
        assert info.value.decided_by == "boss"
        assert info.value.decision == "rejected"
        assert info.value.code == "approval_already_decided"
    with pytest.raises(scoria.RunNotResumable) as not_resumable:
        scoria.resume_run(run_id, handlers={"work": succeed})
    assert not_resumable.value.status == "rejected"


def test_approval_decided_twice_names_the_first_decider() -> None:
    run_id = paused_run()
    scoria.approve_run(run_id, decided_by="first")
    with pytest.raises(scoria.ApprovalAlreadyDecided) as info:
        scoria.reject_run(run_id, decided_by="second")
    assert (info.value.decided_by, info.value.decision) == ("first", "approved")


def test_no_pending_approval_on_a_run_without_approvals() -> None:
    run = scoria.start_run(scoria.identity(IDENTITY))
    with pytest.raises(scoria.NoPendingApproval):
        scoria.approve_run(run.run_id, decided_by="x")
    with pytest.raises(scoria.NoPendingApproval):
        scoria.reject_run(run.run_id, decided_by="x")


def test_resume_pending_running_and_completed_runs() -> None:
    with pytest.raises(scoria.ApprovalPending):
        scoria.resume_run(paused_run(), handlers={"work": succeed})
    running = start()
    with pytest.raises(scoria.RunNotResumable) as info:
        scoria.resume_run(running.run_id, handlers={"work": succeed})
    assert info.value.status == "running"
    assert "dispatch" in info.value.message
    completed = start({"work": succeed})
    with pytest.raises(scoria.RunNotResumable) as info:
        scoria.resume_run(completed.run_id, handlers={"work": succeed})
    assert info.value.status == "completed"
    assert info.value.code == "run_not_resumable"


def test_failed_step_is_retried_in_place() -> None:
    run = start({"work": lambda step, run: Fail("transient")})
    assert run.status == "failed"
    failed = only_step(run.run_id)
    resumed = scoria.resume_run(run.run_id, handlers={"work": succeed})
    assert (resumed.run_id, resumed.status) == (run.run_id, "completed")
    retried = only_step(run.run_id)
    assert retried.id == failed.id
    assert retried.attempt == 2
    assert retried.error_envelope is None
    assert retried.result_envelope == {"step_id": failed.id, "attempt": 2}
    detail = scoria.get_run_detail(run.run_id)
    retry = [event for event in detail.events if event.event_type == "retry_requested"]
    assert [event.payload for event in retry] == [{"attempt": 2}]
    assert detail.summary.completed_at is not None


def test_a_retry_names_the_attempt_it_saw_fail() -> None:
    failing = {"work": lambda step, run: Fail("transient")}
    run = start(failing)
    for bad in (0, -1, True, "1", 1.0, 2**31):
        with pytest.raises(scoria.InvalidRunOptions, match="attempt"):
            scoria.resume_run(run.run_id, handlers=failing, attempt=bad)
    assert only_step(run.run_id).attempt == 1
    assert scoria.resume_run(run.run_id, handlers=failing, attempt=1).status == "failed"
    with pytest.raises(scoria.RunNotResumable, match="was retried since attempt 1") as info:
        scoria.resume_run(run.run_id, handlers=failing, attempt=1)
    assert info.value.status == "failed"
    with pytest.raises(
        scoria.RunNotResumable, match="has no attempt 5: its step's failed attempt is 2"
    ):
        scoria.resume_run(run.run_id, handlers=failing, attempt=5)
    assert only_step(run.run_id).attempt == 2
    retried = scoria.resume_run(run.run_id, handlers={"work": succeed}, attempt=2)
    assert retried.status == "completed"
    # An approved pause is no failed attempt to retry.
    approved = paused_run()
    scoria.approve_run(approved, decided_by="ops")
    with pytest.raises(scoria.RunNotResumable, match="attempt= retries only a failed run"):
        scoria.resume_run(approved, handlers={"work": succeed}, attempt=1)
    assert scoria.get_run(approved).status == "waiting_for_approval"


def test_resuming_a_running_run_says_where_its_step_is(runtime: Scoria) -> None:
    """A running run is not resumed: the error says whether its step is executing, queued
    for a worker, or left for dispatch()."""
    refusals: list[str] = []

    def resumes_itself(step: scoria.StepView, run: scoria.RunSummary) -> dict[str, str]:
        with pytest.raises(scoria.RunNotResumable) as refused:
            scoria.resume_run(run.run_id)
        refusals.append(refused.value.message)
        return {}

    assert start({"work": resumes_itself}).status == "completed"
    assert refusals and "its step 'work' is executing (its lease held until" in refusals[0]
    runtime.handler("queued", executor="worker")(succeed)
    queued = scoria.start_run(scoria.identity(IDENTITY), initial_step={"kind": "queued"})
    with pytest.raises(scoria.RunNotResumable, match="its step 'queued' is queued for a worker"):
        scoria.resume_run(queued.run_id)
    left = start()  # no handler known: left for dispatch()
    with pytest.raises(scoria.RunNotResumable, match=r"call dispatch\(\) to execute"):
        scoria.resume_run(left.run_id)


def test_resume_and_retry_record_who_asked() -> None:
    paused = paused_run()
    scoria.approve_run(paused, decided_by="ops")
    scoria.resume_run(paused, handlers={"work": succeed}, requested_by=" alice ")
    resumed = [
        e for e in scoria.get_run_detail(paused).events if e.event_type == "resume_requested"
    ]
    assert [event.payload for event in resumed] == [{"requested_by": "alice"}]
    failed = start({"work": lambda step, run: Fail("transient")})
    assert scoria.resume_run(failed.run_id, requested_by="bob").status == "running"
    detail = scoria.get_run_detail(failed.run_id)
    retry = [event for event in detail.events if event.event_type == "retry_requested"]
    assert [event.payload for event in retry] == [{"attempt": 2, "requested_by": "bob"}]
    # Approving with resume=True asks as the decider.
    fused = paused_run()
    scoria.approve_run(fused, decided_by="carol", resume=True, handlers={"work": succeed})
    resumed = [e for e in scoria.get_run_detail(fused).events if e.event_type == "resume_requested"]
    assert [event.payload for event in resumed] == [{"requested_by": "carol"}]
    # Who asked is checked before anything is written.
    approved = paused_run()
    scoria.approve_run(approved, decided_by="ops")
    for bad in ("", "  ", True, "a\x00b", "x" * 100_000):
        with pytest.raises(scoria.InvalidRunOptions, match="requested_by"):
            scoria.resume_run(approved, handlers={"work": succeed}, requested_by=bad)
    assert scoria.get_run(approved).status == "waiting_for_approval"
    assert "resume_requested" not in event_types(approved)


def test_retry_without_a_handler_requeues_the_step() -> None:
    run = start({"work": lambda step, run: Fail("transient")})
    assert scoria.resume_run(run.run_id).status == "running"
    step = only_step(run.run_id)
    assert (step.status, step.attempt) == ("queued", 2)
    assert scoria.dispatch(run.run_id, handlers={"work": succeed}).status == "completed"


def test_cancel_run_closes_steps_and_approvals() -> None:
    run_id = paused_run()
    cancelled = scoria.cancel_run(run_id, cancelled_by="ops", reason="stale")
    assert cancelled.status == "cancelled"
    detail = scoria.get_run_detail(run_id)
    assert [step.status for step in detail.steps] == ["cancelled"]
    assert [approval.status for approval in detail.approvals] == ["cancelled"]
    assert detail.events[-1].event_type == "run_cancelled"
    assert detail.events[-1].payload == {"cancelled_by": "ops", "reason": "stale"}
    with pytest.raises(scoria.RunNotResumable):
        scoria.cancel_run(run_id, cancelled_by="ops")
    with pytest.raises(scoria.ApprovalAlreadyDecided):
        scoria.approve_run(run_id, decided_by="late")


def test_cancelling_a_failed_run_keeps_its_failed_step() -> None:
    """A failed run is cancelled so that nobody retries it; its step still says why and
    when it failed."""
    run = start({"work": lambda step, run: Fail("card declined")})
    failed = only_step(run.run_id)
    assert scoria.cancel_run(run.run_id, cancelled_by="ops").status == "cancelled"
    step = only_step(run.run_id)
    assert (step.status, step.completed_at) == ("failed", failed.completed_at)
    assert step.error_envelope == failed.error_envelope
    with pytest.raises(scoria.RunNotResumable):
        scoria.resume_run(run.run_id)


def test_a_run_cancelled_while_its_handler_runs_keeps_no_outcome(app: Flask) -> None:
    """The outcome's write finds its step cancelled: nothing of it is written."""
    ran: list[str] = []

    def work(step: scoria.StepView, run: scoria.RunSummary) -> Succeed:
        with app.app_context():
            scoria.cancel_run(run.run_id, cancelled_by="ops")
        ran.append(run.run_id)
        return Succeed({"late": True})

    run = start({"work": work})
    assert run.status == "cancelled"
    assert ran == [run.run_id]
    (step,) = scoria.get_run_detail(run.run_id).steps
    assert (step.status, step.result_envelope) == ("cancelled", None)
    assert event_types(run.run_id)[-1] == "run_cancelled"


def test_tenant_guard() -> None:
    mine = scoria.start_run(scoria.identity(IDENTITY))
    tenantless = scoria.start_run(scoria.identity({"session_id": "session-1"}))
    other = scoria.identity({**IDENTITY, "tenant_id": "tenant-2"})
    unknown = str(uuid.uuid4())
    assert scoria.get_run(mine.run_id, tenant_id="tenant-1").run_id == mine.run_id
    assert scoria.get_run(mine.run_id, identity=scoria.identity(IDENTITY)).run_id == mine.run_id
    calls = [
        lambda run_id, **guard: scoria.get_run(run_id, **guard),
        lambda run_id, **guard: scoria.get_run_detail(run_id, **guard),
        lambda run_id, **guard: scoria.resume_run(run_id, **guard),
        lambda run_id, **guard: scoria.dispatch(run_id, **guard),
        lambda run_id, **guard: scoria.approve_run(run_id, decided_by="x", **guard),
        lambda run_id, **guard: scoria.reject_run(run_id, decided_by="x", **guard),
        lambda run_id, **guard: scoria.cancel_run(run_id, cancelled_by="x", **guard),
    ]
    for call in calls:
        for guard in ({"tenant_id": "tenant-2"}, {"identity": other}):
            with pytest.raises(scoria.RunNotFound) as foreign:
                call(mine.run_id, **guard)
            with pytest.raises(scoria.RunNotFound) as missing:
                call(unknown, **guard)
            assert type(foreign.value) is type(missing.value)
            assert foreign.value.code == missing.value.code == "run_not_found"
            assert foreign.value.message.replace(mine.run_id, unknown) == missing.value.message
    # an identity without a tenant matches only runs without a tenant
    no_tenant = scoria.identity({"session_id": "session-1"})
    assert scoria.get_run(tenantless.run_id, identity=no_tenant).tenant_id is None
    with pytest.raises(scoria.RunNotFound):
        scoria.get_run(mine.run_id, identity=no_tenant)
    # without a guard every run is visible
    assert scoria.get_run(mine.run_id).tenant_id == "tenant-1"
    listed = scoria.list_runs_for_session("session-1", tenant_id="tenant-1")
    assert [run.run_id for run in listed] == [mine.run_id]
    listed = scoria.list_runs_for_session("session-1", identity=no_tenant)
    assert [run.run_id for run in listed] == [tenantless.run_id]


@pytest.mark.parametrize("identity", ["tenant-1", b"tenant-1", 7, ["tenant-1"]])
def test_a_guard_identity_that_names_no_ids_is_refused(identity: object) -> None:
    """As a guard it would stand for "no tenant" and find only runs without one."""
    run = start()
    with pytest.raises(scoria.InvalidIdentity, match="tenant_id="):
        scoria.get_run(run.run_id, identity=identity)
    with pytest.raises(scoria.InvalidIdentity):
        scoria.list_runs_for_session("session-1", identity=identity)


def test_list_runs_for_session_newest_first_with_keyset_pages() -> None:
    who = scoria.identity(IDENTITY)
    created = [scoria.start_run(who).run_id for _ in range(7)]
    scoria.start_run(scoria.identity({**IDENTITY, "session_id": "elsewhere"}))
    newest_first = list(reversed(created))
    assert [run.run_id for run in scoria.list_runs_for_session("session-1")] == newest_first
    pages: list[str] = []
    before = None
    while True:
        page = scoria.list_runs_for_session("session-1", limit=3, before=before)
        if not page:
            break
        assert len(page) <= 3
        pages.extend(run.run_id for run in page)
        before = page[-1].run_id
    assert pages == newest_first
    assert scoria.list_runs_for_session("no-such-session") == []
    assert scoria.list_runs_for_session(None) == []
    for limit in (0, 501, "3", True):
        with pytest.raises(scoria.InvalidRunOptions):
            scoria.list_runs_for_session("session-1", limit=limit)  # type: ignore[arg-type]
    with pytest.raises(scoria.RunNotFound):
        scoria.list_runs_for_session("session-1", before="not-a-run")


@pytest.mark.parametrize(
    "run_id",
    [None, "", "nope", "123", 123, 1.5, ["x"], {"id": 1}, "0" * 500, str(uuid.uuid4()), "\x00"],
)
def test_malformed_or_unknown_run_ids_are_run_not_found(run_id: Any) -> None:
    verbs = [
        lambda: scoria.get_run(run_id),
        lambda: scoria.get_run_detail(run_id),
        lambda: scoria.resume_run(run_id),
        lambda: scoria.dispatch(run_id),
        lambda: scoria.approve_run(run_id, decided_by="x"),
        lambda: scoria.reject_run(run_id, decided_by="x"),
        lambda: scoria.cancel_run(run_id, cancelled_by="x"),
    ]
    for verb in verbs:
        with pytest.raises(scoria.RunNotFound):
            verb()


def test_event_sequences_are_contiguous_and_timestamps_utc() -> None:
    run = start({"work": lambda step, run: Fail("first")})
    scoria.resume_run(run.run_id, handlers={"work": wait_for_approval})
    scoria.approve_run(run.run_id, decided_by="reviewer")
    scoria.resume_run(run.run_id, handlers={"work": succeed})
    detail = scoria.get_run_detail(run.run_id)
    assert [event.sequence for event in detail.events] == list(range(1, len(detail.events) + 1))
    assert detail.summary.status == "completed"
    stamps = [
        detail.summary.created_at,
        detail.summary.started_at,
        detail.summary.completed_at,
        detail.summary.updated_at,
        *(event.created_at for event in detail.events),
        *(step.started_at for step in detail.steps),
        *(step.completed_at for step in detail.steps),
        detail.approvals[0].requested_at,
        detail.approvals[0].decided_at,
    ]
    for stamp in stamps:
        assert stamp is not None
        assert stamp.utcoffset() == timedelta(0)
        assert stamp.tzinfo is not None
    assert detail.summary.created_at <= detail.summary.updated_at
    assert abs(detail.summary.created_at - detail.events[0].created_at) < timedelta(seconds=1)
    assert detail.summary.created_at.tzinfo in (UTC, detail.summary.created_at.tzinfo)


def test_runtime_metadata_is_stored() -> None:
    run = start(runtime={"metadata": {"payload": {"prompt": "hi"}}})
    assert scoria.get_run(run.run_id).metadata == {"payload": {"prompt": "hi"}}
    for bad in ({"metadata": {"x": object()}}, {"other": 1}, "text"):
        with pytest.raises(scoria.InvalidRunOptions):
            start(runtime=bad)


@pytest.mark.parametrize(
    "initial_step",
    [
        {},
        {"kind": ""},
        {"kind": "work", "status": "running"},
        {"kind": "work", "sequence": 0},
        {"kind": "work", "extra": 1},
        "work",
    ],
)
def test_malformed_initial_step_is_invalid_run_options(initial_step: Any) -> None:
    with pytest.raises(scoria.InvalidRunOptions):
        scoria.start_run(scoria.identity(IDENTITY), initial_step=initial_step)


def test_init_app_twice_raises(app: Flask) -> None:
    with pytest.raises(RuntimeError, match="already registered"):
        Scoria().init_app(app)


def test_facade_without_scoria_raises_a_helpful_error() -> None:
    bare = Flask("bare")
    with bare.app_context(), pytest.raises(RuntimeError, match=r"Scoria\(app\)"):
        scoria.get_run(str(uuid.uuid4()))


@pytest.mark.parametrize("unreachable", ["sqlite-missing-dir", "postgres-closed-port"])
def test_unreachable_database_is_a_storage_error(unreachable: str, tmp_path: Path) -> None:
    if unreachable == "sqlite-missing-dir":
        uri = f"sqlite:///{tmp_path / 'missing' / 'dir' / 'scoria.sqlite3'}"
    else:
        uri = "postgresql+psycopg://postgres@127.0.0.1:1/test?connect_timeout=2"
    broken = create_test_app(uri, tmp_path / "instance")
    with broken.app_context():
        calls = [
            lambda: scoria.start_run(scoria.identity(IDENTITY)),
            lambda: scoria.get_run(str(uuid.uuid4())),
            lambda: scoria.list_runs_for_session("session-1"),
        ]
        for call in calls:
            with pytest.raises(scoria.StorageError) as info:
                call()
            assert info.value.code == "storage_unavailable"
            assert not isinstance(info.value, sa.exc.SQLAlchemyError)
    broken.extensions["scoria"].storage(broken).engine.dispose()


def ask_twice(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    """Ask to publish; once approved, ask to notify; then finish."""
    if step.approval is None:
        return scoria.WaitForApproval("publish")
    if step.approval.tool_name == "publish":
        return scoria.WaitForApproval("notify")
    return Succeed({"done": True})


def test_a_decision_bound_to_an_approval_never_decides_a_later_one() -> None:
    run_id = start({"work": ask_twice}).run_id
    (first,) = scoria.get_run_detail(run_id).approvals
    scoria.approve_run(run_id, decided_by="ops-1", approval_id=first.id)
    scoria.resume_run(run_id, handlers={"work": ask_twice})
    second = scoria.get_run_detail(run_id).approvals[-1]
    assert (second.tool_name, second.status) == ("notify", "pending")

    for decide in (scoria.approve_run, scoria.reject_run):
        with pytest.raises(scoria.ApprovalAlreadyDecided) as lost:
            decide(run_id, decided_by="ops-2", approval_id=first.id)
        assert (lost.value.approval_id, lost.value.decided_by) == (first.id, "ops-1")
    assert scoria.get_run_detail(run_id).approvals[-1].status == "pending"

    rejected = scoria.reject_run(run_id, decided_by="ops-2", approval_id=second.id)
    assert rejected.status == "rejected"


@pytest.mark.parametrize("approval_id", [str(uuid.uuid4()), "not-an-id", "x" * 100])
def test_a_decision_bound_to_an_unknown_approval_changes_nothing(approval_id: str) -> None:
    run_id = paused_run()
    with pytest.raises(scoria.NoPendingApproval) as missing:
        scoria.approve_run(run_id, decided_by="ops", approval_id=approval_id)
    assert missing.value.approval_id == approval_id
    assert scoria.get_run_detail(run_id).approvals[0].status == "pending"
    assert event_types(run_id)[-1] == "waiting_for_approval"


@pytest.mark.parametrize("approval_id", [7, b"id", ["id"], {"id": 1}])
def test_an_approval_id_must_be_a_string(approval_id: Any) -> None:
    run_id = paused_run()
    with pytest.raises(scoria.InvalidRunOptions, match="approval_id"):
        scoria.approve_run(run_id, decided_by="ops", approval_id=approval_id)
    assert scoria.get_run_detail(run_id).approvals[0].status == "pending"


def test_an_approval_of_another_run_cannot_be_decided_through_this_one() -> None:
    mine, theirs = paused_run(), paused_run()
    (their_approval,) = scoria.get_run_detail(theirs).approvals
    with pytest.raises(scoria.NoPendingApproval):
        scoria.approve_run(mine, decided_by="ops", approval_id=their_approval.id)
    assert scoria.get_run_detail(theirs).approvals[0].status == "pending"


def raise_with(text: str) -> Any:
    def handler(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        raise ValueError(text)

    return handler


@pytest.mark.parametrize("text", ["bad \x00 input", "bad \ud800 input"])
def test_an_exception_text_postgres_cannot_store_still_fails_the_step(text: str) -> None:
    run = start({"work": raise_with(text)})
    assert run.status == "failed"
    error = only_step(run.run_id).error_envelope
    assert error is not None and error["type"] == "ValueError"
    assert error["message"].startswith("bad ") and error["message"].endswith(" input")


@pytest.mark.parametrize(
    "outcome",
    [
        scoria.WaitForApproval("send\x00email"),
        scoria.WaitForApproval("send_email", reason="why\x00"),
        scoria.WaitForApproval("send_email", reason="why \udc80"),
    ],
)
def test_an_approval_request_postgres_cannot_store_fails_the_step(outcome: Any) -> None:
    run = start({"work": lambda step, run: outcome})
    assert run.status == "failed"
    error = only_step(run.run_id).error_envelope
    assert error is not None and error["type"] == "invalid_handler_result"
    assert scoria.get_run_detail(run.run_id).approvals == []


@pytest.fixture
def capped(database_uri: str, tmp_path: Path) -> Iterator[Flask]:
    """An app whose steps may store 1,000 bytes in a result, error or approval."""
    app = create_test_app(database_uri, tmp_path / "capped", SCORIA_RESULT_MAX_BYTES=1000)
    yield app
    app.extensions["scoria"].storage(app).engine.dispose()


@pytest.mark.parametrize(
    "outcome",
    [
        Succeed({"text": "x" * 1000}),
        {"text": "x" * 1000},
        scoria.WaitForApproval("send_email", {"body": "x" * 1000}),
        scoria.WaitForApproval("send_email", reason="x" * 1000),
        Fail({"detail": "x" * 1000}),
    ],
)
def test_an_outcome_over_the_size_limit_fails_its_step_at_once(capped: Flask, outcome: Any) -> None:
    with capped.app_context():
        run = start({"work": lambda step, run: outcome})
        assert run.status == "failed"
        step = only_step(run.run_id)
        assert scoria.get_run_detail(run.run_id).approvals == []
    assert step.status == "failed"
    error = step.error_envelope
    assert error is not None and error["type"] == "invalid_handler_result"
    assert "the limit is 1000 (SCORIA_RESULT_MAX_BYTES)" in error["message"]


def test_an_exception_over_the_size_limit_keeps_its_error_and_its_retry(capped: Flask) -> None:
    """An exception's record (its traceback up to 8 KiB) is bounded already."""
    attempts: list[int] = []

    def flaky(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        attempts.append(step.attempt)
        if step.attempt == 1:
            raise RuntimeError("x" * 1500)
        return {"done": True}

    capped.extensions["scoria"].handler("work", retry=scoria.Retry(attempts=2, delay=0))(flaky)
    with capped.app_context():
        run = start()
        assert run.status == "completed"
        events = [event.event_type for event in scoria.get_run_detail(run.run_id).events]
    assert attempts == [1, 2]
    assert "retry_scheduled" in events


def test_an_outcome_at_the_size_limit_is_stored(capped: Flask) -> None:
    # {"t":"..."} is 8 bytes around the text.
    result = {"t": "x" * 992}
    with capped.app_context():
        run = start({"work": lambda step, run: result})
        assert run.status == "completed"
        assert only_step(run.run_id).result_envelope == result


def test_edited_arguments_over_the_size_limit_are_refused_and_nothing_is_decided(
    capped: Flask,
) -> None:
    ask = scoria.WaitForApproval("send_email", {"body": "hi"}, editable=True)
    with capped.app_context():
        run = start({"work": lambda step, run: ask})
        with pytest.raises(scoria.InvalidRunOptions, match="SCORIA_RESULT_MAX_BYTES"):
            scoria.approve_run(run.run_id, decided_by="ops", arguments={"body": "x" * 1000})
        assert scoria.get_run_detail(run.run_id).approvals[0].status == "pending"


@pytest.mark.parametrize("tags", [["ok\x00"], ["\ud800"]])
def test_capability_tags_postgres_cannot_store_are_refused(tags: list[str]) -> None:
    with pytest.raises(scoria.InvalidHandoff) as refused:
        scoria.start_handoff_run(
            scoria.identity(IDENTITY),
            "critic",
            root_role_id="writer",
            delegated_kind="review",
            handoff_input={},
            projected_context={},
            capability_tags=tags,
        )
    assert refused.value.code == "invalid_capability_tags"
    assert scoria.list_runs_for_session("session-1") == []


def test_paging_a_session_keeps_runs_created_in_the_same_instant(app: Flask) -> None:
    run_ids = [start().run_id for _ in range(4)]
    engine = app.extensions["scoria"].storage(app).engine
    with engine.begin() as conn:
        conn.execute(sa.update(runs).values(created_at=datetime.now(UTC)))
    everything = [run.run_id for run in scoria.list_runs_for_session("session-1")]
    assert sorted(everything, reverse=True) == everything == sorted(run_ids, reverse=True)
    paged: list[str] = []
    while page := scoria.list_runs_for_session("session-1", limit=1, before=(paged or [None])[-1]):
        paged += [run.run_id for run in page]
    assert paged == everything


def test_a_malformed_approval_id_on_another_tenants_run_looks_like_an_unknown_run() -> None:
    run_id = paused_run()
    for target in (run_id, str(uuid.uuid4())):
        with pytest.raises(scoria.RunNotFound):
            scoria.approve_run(target, decided_by="ops", approval_id="nope", tenant_id="other")


def test_the_identitys_metadata_never_overwrites_the_runs() -> None:
    tagged = {**IDENTITY, "metadata": {"channel": "web"}}
    run = scoria.start_run(tagged, runtime={"metadata": {"payload": 1}})
    assert scoria.get_run(run.run_id).metadata == {"payload": 1, "identity": {"channel": "web"}}
    with pytest.raises(scoria.InvalidRunOptions, match="'identity' key"):
        scoria.start_run(tagged, runtime={"metadata": {"identity": "mine"}})
    # Without metadata of its own, the identity leaves the key to the run.
    plain = scoria.start_run(IDENTITY, runtime={"metadata": {"identity": "mine"}})
    assert scoria.get_run(plain.run_id).metadata == {"identity": "mine"}


def test_sizes_are_counted_in_utf8(app: Flask) -> None:
    cap = app.config["SCORIA_MAX_METADATA_BYTES"]
    # Two bytes each in UTF-8 (six as a JSON escape): fits, at about half the cap.
    accented = "é" * (cap // 4)
    run = start(runtime={"metadata": {"text": accented}})
    assert scoria.get_run(run.run_id).metadata == {"text": accented}
    with pytest.raises(scoria.InvalidRunOptions, match="SCORIA_MAX_METADATA_BYTES"):
        start(runtime={"metadata": {"text": "é" * (cap // 2)}})


def test_an_initial_input_is_capped_like_a_next_steps(app: Flask) -> None:
    cap = app.config["SCORIA_HANDOFF_MAX_BYTES"]

    def start_with(text: str) -> scoria.RunSummary:
        step = {"kind": "work", "input": {"text": text}}
        return scoria.start_run(IDENTITY, initial_step=step)

    with pytest.raises(scoria.InvalidRunOptions, match="SCORIA_HANDOFF_MAX_BYTES"):
        start_with("x" * cap)
    assert scoria.list_runs_for_session("session-1") == []
    assert start_with("x" * (cap - 20)).status == "running"


def test_a_malformed_approval_id_is_shown_escaped() -> None:
    run_id = paused_run()
    with pytest.raises(scoria.NoPendingApproval) as info:
        scoria.approve_run(run_id, decided_by="ops", approval_id="\ud800" + "x" * 200)
    message = info.value.message
    assert len(message) < 200 and "\\ud800" in message
    message.encode("utf-8")  # printable, loggable


@pytest.mark.parametrize("metadata", [[], "", 0, False])
def test_runtime_metadata_must_be_a_dict(metadata: Any) -> None:
    with pytest.raises(scoria.InvalidRunOptions, match="runtime metadata"):
        start(runtime={"metadata": metadata})
    assert scoria.list_runs_for_session("session-1") == []


def test_a_step_sequence_leaves_room_for_its_handoffs() -> None:
    with pytest.raises(scoria.InvalidRunOptions, match="sequence"):
        scoria.start_run(
            scoria.identity(IDENTITY), initial_step={"kind": "work", "sequence": 2**31 - 1}
        )
    delegate = lambda step, run: scoria.Handoff("critic", "review")  # noqa: E731
    run = scoria.start_run(
        scoria.identity(IDENTITY),
        initial_step={"kind": "work", "sequence": 1_000_000},
        handlers={"work": delegate, "review": succeed},
    )
    assert [step.sequence for step in scoria.get_run_detail(run.run_id).steps] == [
        1_000_000,
        1_000_001,
    ]


@pytest.mark.parametrize("field", ["handoff_input", "projected_context"])
def test_a_handoff_outcome_with_a_non_dict_payload_fails_its_step(field: str) -> None:
    delegate = lambda step, run: scoria.Handoff("critic", "review", **{field: []})  # noqa: E731
    run = start({"work": delegate})
    assert run.status == "failed"
    error = only_step(run.run_id).error_envelope
    assert error is not None and error["type"] == "invalid_handoff"


def test_listing_a_session_notices_an_expired_lease(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = start().run_id  # its step waits, queued, for a handler
    engine = app.extensions["scoria"].storage(app).engine
    with engine.begin() as conn:  # as a process that claimed the step and died leaves it
        conn.execute(
            sa.update(steps)
            .where(steps.c.run_id == uuid.UUID(run_id))
            .values(
                status="running",
                lease_token="dead-process",
                lease_expires_at=datetime.now(UTC) - timedelta(minutes=1),
            )
        )
    (listed,) = scoria.list_runs_for_session("session-1")
    assert (listed.run_id, listed.status) == (run_id, "failed")
    assert "lease_expired" in event_types(run_id)
    (lost,) = [e for e in scoria.get_run_detail(run_id).events if e.event_type == "lease_expired"]
    assert lost.payload is not None
    assert datetime.fromisoformat(lost.payload["lease_expired_at"]) < lost.created_at
    (record,) = [each for each in caplog.records if "lost its lease" in each.getMessage()]
    assert record.levelname == "WARNING" and run_id in record.getMessage()


def test_a_run_no_operator_could_see_is_logged(
    app: Flask, runtime: Scoria, caplog: pytest.LogCaptureFixture
) -> None:
    with app.app_context():
        scoria.start_run({"actor_id": "a"})
        assert "without a tenant_id" not in caplog.text  # no operator pages set up
        runtime.operator_scope(lambda: {"tenant_id": "acme", "actor_id": "ops"})
        untenanted = scoria.start_run({"actor_id": "a"})
        scoria.start_run({"actor_id": "a", "tenant_id": "acme"})
    warnings = [r for r in caplog.records if "without a tenant_id" in r.getMessage()]
    assert [r.levelname for r in warnings] == ["WARNING"]
    assert untenanted.run_id in warnings[0].getMessage()


async def ask_then_answer(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    await asyncio.sleep(0)
    if step.approval is None:
        return WaitForApproval("reply", {"to": "alice"})
    return Succeed({"replied_to": step.approval.arguments["to"]})


async def broken(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    await asyncio.sleep(0)
    raise LookupError("no such model")


def test_an_async_handler_runs_to_its_end() -> None:
    """An ``async def`` handler runs to its end in an event loop of its own."""
    handlers = {"work": ask_then_answer}
    run = start(handlers)
    assert run.status == "waiting_for_approval"
    scoria.approve_run(run.run_id, decided_by="ops")
    done = scoria.resume_run(run.run_id, handlers=handlers)
    assert done.status == "completed"
    assert only_step(run.run_id).result_envelope == {"replied_to": "alice"}
    failed = start({"work": broken})
    assert failed.status == "failed"
    error = only_step(failed.run_id).error_envelope
    assert error is not None
    assert (error["type"], error["message"]) == ("LookupError", "no such model")


def test_an_async_handler_runs_where_the_caller_runs_an_event_loop(app: Flask) -> None:
    """Called from async code (an async view), the handler gets a thread of its own,
    with the app's context."""

    async def reply(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        await asyncio.sleep(0)
        return Succeed({"app": current_app.name, "thread": threading.current_thread().name})

    async def view() -> scoria.RunSummary:
        with app.app_context():
            return start({"work": reply})

    run = asyncio.run(view())
    assert run.status == "completed"
    result = only_step(run.run_id).result_envelope
    assert result is not None and result["app"] == app.name
    assert result["thread"].startswith("scoria-async-handler")
