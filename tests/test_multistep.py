"""Multi-step runs (Next) and richer decisions: editable and expiring approvals,
approve-and-resume, idempotent starts."""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _helpers import IDENTITY, counting_handler, edit_then_send, executions, row_counts
from conftest import create_test_app
from flask import Flask
from test_concurrency import paused_run, race_across_processes, race_threads

import flask_scoria as scoria
from flask_scoria import Handoff, Next, Succeed, WaitForApproval
from flask_scoria.runtime import transaction


def start(handlers: dict[str, Any], kind: str = "plan", **options: Any) -> scoria.RunSummary:
    return scoria.start_run(
        scoria.identity(IDENTITY), initial_step={"kind": kind}, handlers=handlers, **options
    )


@pytest.mark.parametrize("moved_on", [Next("act"), Handoff("critic", "review")])
def test_a_decision_after_the_run_moved_on_hears_who_decided(
    app_ctx: None, moved_on: Next | Handoff
) -> None:
    """The run's current step has no approval any more; the one decided is still named."""

    def gate(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        return WaitForApproval("send") if step.approval is None else moved_on

    handlers = {"plan": gate}
    run_id = start(handlers).run_id
    scoria.approve_run(run_id, decided_by="alice", resume=True, handlers=handlers)
    assert scoria.get_run(run_id).status == "running"
    for decide in (scoria.approve_run, scoria.reject_run):
        with pytest.raises(scoria.ApprovalAlreadyDecided) as refused:
            decide(run_id, decided_by="bob")
        assert (refused.value.decided_by, refused.value.decision) == ("alice", "approved")
    assert scoria.get_run(run_id).status == "running"


def test_a_three_step_run_passes_input_from_step_to_step(app_ctx: None) -> None:
    seen: list[tuple[int, str, dict[str, Any], str]] = []

    def record(step: scoria.StepView) -> None:
        seen.append((step.sequence, step.kind, dict(step.input), step.role_id))

    def plan(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        record(step)
        return Next("search", {"query": "rail policy"}, role_id="researcher")

    def search(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        record(step)
        return Next("answer", {"hits": [step.input["query"], "4.2"]})

    def answer(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        record(step)
        return Succeed({"answer": f"see {step.input['hits'][1]}"})

    run = start({"plan": plan, "search": search, "answer": answer})

    assert run.status == "completed"
    assert seen == [
        (1, "plan", {}, "executor"),
        (2, "search", {"query": "rail policy"}, "researcher"),
        (3, "answer", {"hits": ["rail policy", "4.2"]}, "researcher"),
    ]
    detail = scoria.get_run_detail(run.run_id)
    assert [step.sequence for step in detail.steps] == [1, 2, 3]
    assert {step.status for step in detail.steps} == {"completed"}
    assert detail.steps[2].result_envelope == {"answer": "see 4.2"}
    assert detail.steps[0].result_envelope == {
        "next_step_id": detail.steps[1].id,
        "next_kind": "search",
    }
    assert [event.event_type for event in detail.events].count("step_completed") == 3


def test_a_handler_changing_the_run_metadata_changes_nothing_else(app_ctx: None) -> None:
    seen: list[dict[str, Any]] = []

    def plan(step: scoria.StepView, run: scoria.RunSummary) -> Next:
        run.metadata["flag"] = "set by plan"
        run.metadata["payload"]["prompt"] = "changed"
        return Next("answer")

    def answer(step: scoria.StepView, run: scoria.RunSummary) -> Succeed:
        seen.append(run.metadata)
        return Succeed({})

    metadata = {"payload": {"prompt": "rail policy"}}
    done = start({"plan": plan, "answer": answer}, runtime={"metadata": metadata})

    assert done.status == "completed"
    assert seen == [metadata] and done.metadata == metadata
    assert scoria.get_run(done.run_id).metadata == metadata


def test_per_call_handler_kinds_are_read_as_step_kinds_are(app_ctx: None) -> None:
    work = {"work ": lambda step, run: Succeed({"ran": step.kind})}
    done = start(work, kind="work ")
    assert done.status == "completed"
    assert scoria.get_run_detail(done.run_id).steps[0].result_envelope == {"ran": "work"}
    for kind in ["", "  ", "k" * 65, "a\nb", 7]:
        with pytest.raises(scoria.InvalidRunOptions, match="handlers key"):
            start({kind: work["work "]}, kind="work")


def test_a_delayed_step_does_not_run_before_its_time(app_ctx: None) -> None:
    ran_at: list[float] = []

    def later(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        ran_at.append(time.time())
        return Succeed()

    handlers = {
        "plan": lambda step, run: Next("later", delay=timedelta(seconds=0.6)),
        "later": later,
    }
    asked = time.time()
    run = start(handlers)
    assert run.status == "running" and ran_at == []
    detail = scoria.get_run_detail(run.run_id)
    queued = detail.steps[1]
    assert queued.status == "queued" and queued.not_before is not None
    assert "step_queued" in [event.event_type for event in detail.events]

    assert scoria.dispatch(run.run_id, handlers=handlers).status == "running"
    assert ran_at == []
    with pytest.raises(scoria.RunNotResumable, match=r"its step 'later' is due at .* from then on"):
        scoria.resume_run(run.run_id, handlers=handlers)
    time.sleep(max(0.0, queued.not_before.timestamp() - time.time()) + 0.05)
    assert scoria.dispatch(run.run_id, handlers=handlers).status == "completed"
    assert ran_at and ran_at[0] >= queued.not_before.timestamp() >= asked + 0.6


@pytest.mark.parametrize(
    "loop",
    [
        Next("plan", {"n": 1}),
        # A handoff to its own kind adds a child step each time, as Next does.
        Handoff("planner", "plan", {"n": 1}),
    ],
)
# The limit counts steps, whatever number the first one has.
@pytest.mark.parametrize("first", [1, 100])
def test_max_steps_stops_a_handler_that_loops_forever(
    database_uri: str, tmp_path: Path, loop: Next | Handoff, first: int
) -> None:
    app = create_test_app(database_uri, tmp_path / "instance", SCORIA_MAX_STEPS=5)
    with app.app_context():
        run = scoria.start_run(
            scoria.identity(IDENTITY),
            initial_step={"kind": "plan", "sequence": first},
            handlers={"plan": lambda step, run: loop},
        )
        detail = scoria.get_run_detail(run.run_id)
    app.extensions["scoria"].storage(app).engine.dispose()
    assert run.status == "failed"
    assert [step.sequence for step in detail.steps] == list(range(first, first + 5))
    assert detail.steps[-1].error_envelope["type"] == "max_steps_exceeded"  # type: ignore[index]


def test_the_handler_sees_the_edited_arguments(app_ctx: None) -> None:
    run = start({"plan": edit_then_send})
    (pending,) = scoria.get_run_detail(run.run_id).approvals
    assert pending.editable and pending.arguments == {"to": "all@example.com"}

    done = scoria.approve_run(
        run.run_id,
        decided_by="ops",
        arguments={"to": "team@example.com"},
        resume=True,
        handlers={"plan": edit_then_send},
    )

    assert done.status == "completed"
    detail = scoria.get_run_detail(run.run_id)
    (approval,) = detail.approvals
    assert approval.arguments == {"to": "all@example.com"}
    assert approval.edited_arguments == {"to": "team@example.com"}
    assert detail.steps[0].result_envelope == {"sent_to": "team@example.com"}


@pytest.mark.parametrize("fused", [False, True])
def test_a_second_approval_requested_by_a_clock_behind_still_gates_the_step(
    app_ctx: None, monkeypatch: pytest.MonkeyPatch, fused: bool
) -> None:
    real = transaction.utcnow

    def two_gates(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        """Ask the manager, then the CFO (from a process whose clock is a minute behind)."""
        if step.approval is None:
            return WaitForApproval("manager_ok")
        if step.approval.tool_name == "manager_ok":
            monkeypatch.setattr(transaction, "utcnow", lambda: real() - timedelta(minutes=1))
            return WaitForApproval("cfo_ok")
        return {"paid_after": step.approval.tool_name}

    handlers = {"pay": two_gates}
    run_id = start(handlers, kind="pay").run_id
    scoria.approve_run(run_id, decided_by="manager", resume=True, handlers=handlers)
    monkeypatch.setattr(transaction, "utcnow", real)
    manager, cfo = scoria.get_run_detail(run_id).approvals
    assert (manager.tool_name, cfo.tool_name, cfo.status) == ("manager_ok", "cfo_ok", "pending")
    assert cfo.requested_at > manager.requested_at

    with pytest.raises(scoria.ApprovalPending):
        scoria.resume_run(run_id, handlers=handlers)
    if fused:
        done = scoria.approve_run(run_id, decided_by="cfo", resume=True, handlers=handlers)
    else:
        scoria.approve_run(run_id, decided_by="cfo")
        done = scoria.resume_run(run_id, handlers=handlers)

    assert done.status == "completed"
    detail = scoria.get_run_detail(run_id)
    decided = [(approval.tool_name, approval.decided_by) for approval in detail.approvals]
    assert decided == [("manager_ok", "manager"), ("cfo_ok", "cfo")]
    assert detail.steps[0].result_envelope == {"paid_after": "cfo_ok"}


def test_an_approval_asked_again_after_expiry_by_a_clock_behind_is_the_one_resumed(
    app_ctx: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = transaction.utcnow
    asked: list[str] = []

    def pay(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        if step.approval is None:
            return WaitForApproval("manager_ok")
        if step.approval.tool_name == "manager_ok":
            asked.append("cfo_ok")
            expires_in = 0.2 if len(asked) == 1 else None
            return WaitForApproval("cfo_ok", {"to": "x"}, editable=True, expires_in=expires_in)
        return {"edited": step.approval.edited_arguments, "by": step.approval.decided_by}

    handlers = {"pay": pay}
    run_id = start(handlers, kind="pay").run_id
    scoria.approve_run(run_id, decided_by="manager", resume=True, handlers=handlers)
    time.sleep(0.3)
    assert scoria.get_run(run_id).status == "failed"  # the CFO's approval expired
    monkeypatch.setattr(transaction, "utcnow", lambda: real() - timedelta(minutes=1))
    assert scoria.resume_run(run_id, handlers=handlers).status == "waiting_for_approval"
    monkeypatch.setattr(transaction, "utcnow", real)
    scoria.approve_run(run_id, decided_by="cfo", arguments={"to": "edited"})

    done = scoria.resume_run(run_id, handlers=handlers)
    assert done.status == "completed"
    result = scoria.get_run_detail(run_id).steps[0].result_envelope
    assert result == {"edited": {"to": "edited"}, "by": "cfo"}


def test_the_next_steps_approval_by_a_clock_behind_is_its_own(
    app_ctx: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = transaction.utcnow

    def plan(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        if step.approval is None:
            return WaitForApproval("plan_ok")
        monkeypatch.setattr(transaction, "utcnow", lambda: real() - timedelta(minutes=1))
        return Next("act")

    def act(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        if step.approval is None:
            return WaitForApproval("act_ok")
        return {"tool": step.approval.tool_name, "by": step.approval.decided_by}

    handlers = {"plan": plan, "act": act}
    run_id = start(handlers).run_id
    scoria.approve_run(run_id, decided_by="planner", resume=True, handlers=handlers)
    monkeypatch.setattr(transaction, "utcnow", real)
    scoria.approve_run(run_id, decided_by="boss")
    with pytest.raises(scoria.ApprovalAlreadyDecided, match="already approved by 'boss'"):
        scoria.approve_run(run_id, decided_by="someone else")

    done = scoria.resume_run(run_id, handlers=handlers)
    assert done.status == "completed"
    assert scoria.get_run_detail(run_id).steps[-1].result_envelope == {
        "tool": "act_ok",
        "by": "boss",
    }


def test_editing_a_non_editable_approval_writes_nothing(app: Flask, app_ctx: None) -> None:
    run = start({"plan": lambda step, run: WaitForApproval("send_email", {"to": "x"})})
    engine = app.extensions["scoria"].storage(app).engine
    before = row_counts(engine)
    with pytest.raises(scoria.InvalidDecision) as raised:
        scoria.approve_run(run.run_id, decided_by="ops", arguments={"to": "y"})
    assert raised.value.code == "invalid_decision"
    assert row_counts(engine) == before
    (approval,) = scoria.get_run_detail(run.run_id).approvals
    assert approval.status == "pending" and approval.edited_arguments is None
    with pytest.raises(scoria.InvalidRunOptions):
        scoria.approve_run(run.run_id, decided_by="ops", arguments=["not", "a", "dict"])  # type: ignore[arg-type]


def test_an_expired_approval_fails_the_run_and_resume_asks_again(app_ctx: None) -> None:
    asked: list[int] = []

    def ask(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        if step.approval is None:
            asked.append(step.attempt)
            return WaitForApproval("publish", {"v": 1}, expires_in=0.3)
        return Succeed()

    run = start({"plan": ask})
    (pending,) = scoria.get_run_detail(run.run_id).approvals
    assert pending.expires_at is not None
    assert pending.expires_at - pending.requested_at == timedelta(seconds=0.3)
    time.sleep(0.4)

    read = scoria.get_run(run.run_id)
    assert read.status == "failed"
    detail = scoria.get_run_detail(run.run_id)
    assert detail.approvals[0].status == "expired"
    assert detail.steps[0].error_envelope["type"] == "approval_expired"  # type: ignore[index]
    assert "approval_expired" in [event.event_type for event in detail.events]
    with pytest.raises(scoria.NoPendingApproval, match="its latest approval expired undecided"):
        scoria.approve_run(run.run_id, decided_by="ops")
    named = detail.approvals[0].id
    with pytest.raises(scoria.NoPendingApproval, match=f"approval {named} expired undecided"):
        scoria.reject_run(run.run_id, decided_by="ops", approval_id=named)

    again = scoria.resume_run(run.run_id, handlers={"plan": ask})
    assert again.status == "waiting_for_approval"
    assert asked == [1, 2]
    approvals = scoria.get_run_detail(run.run_id).approvals
    assert [approval.status for approval in approvals] == ["expired", "pending"]
    # A decision on the expired one, from a page opened before, names the new one.
    with pytest.raises(scoria.NoPendingApproval, match="waits for a decision") as stale:
        scoria.approve_run(run.run_id, decided_by="ops", approval_id=named)
    assert (stale.value.expired, stale.value.pending_id) == (True, approvals[1].id)
    assert scoria.get_run(run.run_id).status == "waiting_for_approval"


def test_deciding_an_expired_approval_before_any_read_records_the_expiry(app_ctx: None) -> None:
    run = start({"plan": lambda step, run: WaitForApproval("publish", expires_in=0.2)})
    time.sleep(0.3)
    with pytest.raises(scoria.NoPendingApproval, match="expired undecided; resume_run asks"):
        scoria.approve_run(run.run_id, decided_by="ops", resume=True)
    detail = scoria.get_run_detail(run.run_id)
    assert detail.summary.status == "failed"
    assert detail.approvals[0].status == "expired" and detail.approvals[0].decided_by is None


def test_dispatch_answers_as_a_read_does_for_an_expired_approval(app_ctx: None) -> None:
    run = start({"plan": lambda step, run: WaitForApproval("publish", expires_in=0.2)})
    time.sleep(0.3)
    assert scoria.dispatch(run.run_id).status == "failed"
    detail = scoria.get_run_detail(run.run_id)
    assert detail.summary.status == "failed" and detail.approvals[0].status == "expired"


def test_approve_and_resume_in_one_call(app_ctx: None, tmp_path: Path) -> None:
    counter = tmp_path / "executions"

    def ask_then_count(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        if step.approval is None:
            return WaitForApproval("publish")
        return counting_handler(step, run)

    run = start({"plan": ask_then_count}, runtime={"metadata": {"counter": str(counter)}})
    done = scoria.approve_run(
        run.run_id, decided_by="ops", resume=True, handlers={"plan": ask_then_count}
    )
    assert (done.run_id, done.status) == (run.run_id, "completed")
    assert len(executions(counter)) == 1
    events = [event.event_type for event in scoria.get_run_detail(run.run_id).events]
    assert events[-5:] == [
        "approval_decided",
        "resume_requested",
        "step_started",
        "step_completed",
        "run_completed",
    ]


def assert_one_approve_and_resume(app: Flask, run_id: str, counter: Path, results: Any) -> None:
    codes = Counter(code for _, code, _ in results)
    assert codes["ok"] == 1, results
    assert set(codes) <= {
        "ok",
        "approval_already_decided",
        "approval_pending",
        "run_not_resumable",
    }, results
    assert len(executions(counter)) == 1
    with app.app_context():
        detail = scoria.get_run_detail(run_id)
    assert detail.summary.status == "completed"
    assert [approval.status for approval in detail.approvals] == ["approved"]
    events = [event.event_type for event in detail.events]
    assert events.count("approval_decided") == 1 and events.count("resume_requested") == 1


def test_approve_and_resume_races_with_resume_in_threads(app: Flask, tmp_path: Path) -> None:
    counter = tmp_path / "executions"
    run_id = paused_run(app, counter)
    results = race_threads(app, run_id, lambda i: ("approve_and_resume", "resume")[i % 2])
    assert_one_approve_and_resume(app, run_id, counter, results)


def test_idempotent_start_races_in_threads(app: Flask, tmp_path: Path) -> None:
    key = str(tmp_path / "keyed-executions")
    results = race_threads(app, key, lambda i: "start_keyed")
    assert_one_keyed_run(app, key, results)


def assert_one_keyed_run(app: Flask, key: str, results: Any) -> None:
    assert {code for _, code, _ in results} == {"ok"}, results
    run_ids = {detail.split()[1] for _, _, detail in results}
    assert len(run_ids) == 1
    assert len(executions(Path(key))) == 1
    with app.app_context():
        session_runs = scoria.list_runs_for_session(IDENTITY["session_id"])
    (run,) = [run for run in session_runs if run.idempotency_key == key]
    assert run.run_id in run_ids


def test_approve_and_resume_and_keyed_starts_race_across_processes(
    app: Flask, database_uri: str, tmp_path: Path
) -> None:
    counter = tmp_path / "resume-executions"
    key = str(tmp_path / "keyed-executions")
    races = [("approve_and_resume", paused_run(app, counter)), ("start_keyed", key)]
    by_race = race_across_processes(database_uri, tmp_path, races)
    assert_one_approve_and_resume(app, races[0][1], counter, by_race[0])
    assert_one_keyed_run(app, key, by_race[1])


def test_a_start_whose_earlier_keyed_run_is_pruned_meanwhile_writes_its_own(app: Flask) -> None:
    """Between the start that finds the key taken and its look for that run, the run
    ended and was pruned: the key is free, and the start writes its run after all."""
    engine = app.extensions["scoria"].storage(app).engine
    connections = Counter[str]()
    earlier: list[scoria.RunSummary] = []

    def start_keyed() -> scoria.RunSummary:
        return scoria.start_run(IDENTITY, idempotency_key="order-7")

    @sa.event.listens_for(engine, "checkout")
    def meanwhile(*_: Any) -> None:
        if connections["armed"] != 1:
            return
        connections["armed"] = 0
        connections["taken"] += 1
        # The start looks for the key (1), writes (2), finds the key taken, looks again (3).
        if connections["taken"] == 2:  # another start takes the key first
            earlier.append(start_keyed())
        elif connections["taken"] == 3:  # that run has ended, and is pruned
            assert scoria.prune_runs(older_than=timedelta(microseconds=1)) == 1
        connections["armed"] = 1

    with app.app_context():
        connections["armed"] = 1
        started = start_keyed()
        connections["armed"] = 0
        assert connections["taken"] == 4  # the start wrote again
        assert started.run_id != earlier[0].run_id
        assert started.status == "completed"
        assert start_keyed() == started
        with pytest.raises(scoria.RunNotFound):
            scoria.get_run(earlier[0].run_id)
    sa.event.remove(engine, "checkout", meanwhile)


def test_the_same_key_in_two_tenants_makes_two_runs(app_ctx: None) -> None:
    def start_as(tenant: str | None) -> scoria.RunSummary:
        return scoria.start_run(
            {"tenant_id": tenant, "session_id": "s"}, idempotency_key="order-42"
        )

    acme, globex, nobody = start_as("acme"), start_as("globex"), start_as(None)
    assert len({acme.run_id, globex.run_id, nobody.run_id}) == 3
    assert start_as("acme") == acme
    assert start_as(None) == nobody
    with pytest.raises(scoria.InvalidRunOptions):
        scoria.start_run({"tenant_id": "acme"}, idempotency_key="")
    with pytest.raises(scoria.InvalidRunOptions):
        scoria.start_run({"tenant_id": "acme"}, idempotency_key="x" * 256)


def test_a_keyed_handoff_start_is_idempotent_too(app_ctx: None) -> None:
    def start_review() -> scoria.RunSummary:
        return scoria.start_handoff_run(
            scoria.identity(IDENTITY),
            "critic",
            root_role_id="planner",
            delegated_kind="review",
            handoff_input={"brief": "check"},
            projected_context={"draft_answer": "ok"},
            idempotency_key="review-7",
        )

    first, second = start_review(), start_review()
    assert first.run_id == second.run_id
    assert len(scoria.list_runs_for_session(IDENTITY["session_id"])) == 1


def test_operators_cancel_from_the_cli(app: Flask, app_ctx: None) -> None:
    run = start({"plan": lambda step, run: WaitForApproval("publish")})
    runner = app.test_cli_runner()
    result = runner.invoke(args=["scoria", "cancel", run.run_id, "--by", "ops", "--reason", "dup"])
    assert result.exit_code == 0, result.output
    assert "cancelled" in result.output
    detail = scoria.get_run_detail(run.run_id)
    assert detail.summary.status == "cancelled"
    assert detail.approvals[0].status == "cancelled"
    again = runner.invoke(args=["scoria", "cancel", run.run_id, "--by", "ops"])
    assert again.exit_code == 1 and "run_not_resumable" in again.output


def test_a_database_holds_no_half_written_keyed_start(app: Flask, app_ctx: None) -> None:
    first = scoria.start_run(scoria.identity(IDENTITY), idempotency_key="k-1")
    engine = app.extensions["scoria"].storage(app).engine
    before = row_counts(engine)
    assert scoria.start_run(scoria.identity(IDENTITY), idempotency_key="k-1") == first
    assert row_counts(engine) == before
    with engine.connect() as conn:
        keyed = conn.execute(
            sa.text("SELECT count(*) FROM scoria_runs WHERE idempotency_key = 'k-1'")
        )
        assert keyed.scalar_one() == 1


def test_the_initial_step_can_carry_input(app_ctx: None) -> None:
    run = scoria.start_run(
        scoria.identity(IDENTITY),
        initial_step={"kind": "echo", "input": {"topic": "rail"}},
        handlers={"echo": lambda step, run: Succeed(dict(step.input))},
    )
    assert scoria.get_run_detail(run.run_id).steps[0].result_envelope == {"topic": "rail"}
    with pytest.raises(scoria.InvalidRunOptions):
        scoria.start_run(IDENTITY, initial_step={"kind": "echo", "input": ["not", "a", "dict"]})
