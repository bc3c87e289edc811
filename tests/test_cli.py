"""The ``flask scoria`` commands, through click's runner on a real database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import create_test_app
from flask import Flask
from flask.testing import FlaskCliRunner

import flask_scoria as scoria
from flask_scoria import Scoria, Succeed, WaitForApproval, schema

UNKNOWN = "00000000-0000-7000-8000-000000000000"


def ask_approval(step: scoria.StepView, run: scoria.RunSummary) -> Succeed | WaitForApproval:
    if step.approval is None:
        return WaitForApproval("publish", {"env": "prod"}, reason="Needs a human")
    return Succeed({"published": True})


def review(step: scoria.StepView, run: scoria.RunSummary) -> Succeed:
    return Succeed({"verdict": "ok"})


@pytest.fixture
def paused(app: Flask, runtime: Scoria) -> str:
    """The id of a run waiting for approval, in session s-1 of tenant t-1."""
    runtime.handler("approval")(ask_approval)
    with app.app_context():
        who = scoria.identity({"actor_id": "a-1", "tenant_id": "t-1", "session_id": "s-1"})
        return scoria.start_run(who, initial_step={"kind": "approval"}).run_id


def invoke(runner: FlaskCliRunner, *args: str) -> tuple[int, str]:
    result = runner.invoke(args=["scoria", *args])
    return result.exit_code, result.output


def test_show_writes_out_control_characters_of_stored_text(
    app: Flask, runtime: Scoria, runner: FlaskCliRunner
) -> None:
    """A reason a model wrote cannot clear, retitle or overwrite the operator's terminal."""
    reason = "ok\x1b[2J\x1b]0;owned\x07\rAPPROVED BY SECURITY"
    runtime.handler("sly")(lambda step, run: WaitForApproval("publish", reason=reason))
    with app.app_context():
        run_id = scoria.start_run(scoria.identity({}), initial_step={"kind": "sly"}).run_id
    code, out = invoke(runner, "show", run_id)
    assert code == 0
    assert not any(char in out for char in "\x1b\x07\r")
    assert "ok\\x1b[2J\\x1b]0;owned\\x07\\x0dAPPROVED BY SECURITY" in out


def test_runs_lists_and_filters(app: Flask, runner: FlaskCliRunner, paused: str) -> None:
    with app.app_context():
        other = scoria.start_run(scoria.identity({"tenant_id": "t-2", "session_id": "s-2"}))
    code, out = invoke(runner, "runs")
    assert code == 0
    assert out.splitlines()[0].split() == [
        "RUN_ID",
        "STATUS",
        "SESSION",
        "ACTOR",
        "TENANT",
        "CREATED",
    ]
    assert out.index(other.run_id) < out.index(paused)
    code, out = invoke(runner, "runs", "--tenant", "t-1")
    assert paused in out and other.run_id not in out
    with app.app_context():
        untenanted = scoria.start_run(scoria.identity({"session_id": "s-3"}))
    code, out = invoke(runner, "runs", "--no-tenant", "--json")
    assert [run["run_id"] for run in json.loads(out)] == [untenanted.run_id]
    code, out = invoke(runner, "runs", "--session", "s-2", "--json")
    assert [run["run_id"] for run in json.loads(out)] == [other.run_id]
    code, out = invoke(runner, "runs", "--status", "waiting_for_approval", "--json")
    assert [run["run_id"] for run in json.loads(out)] == [paused]
    code, out = invoke(runner, "runs", "--limit", "1", "--json")
    assert [run["run_id"] for run in json.loads(out)] == [untenanted.run_id]
    assert invoke(runner, "runs", "--session", "nobody") == (0, "No runs found.\n")


def test_runs_rejects_bad_filters(runner: FlaskCliRunner) -> None:
    code, out = invoke(runner, "runs", "--status", "sleeping")
    assert code == 2 and "'sleeping' is not one of" in out
    code, out = invoke(runner, "runs", "--limit", "0")
    assert code == 2 and "--limit" in out
    # A tenant typed in a terminal that is not UTF-8 (a lone surrogate to Python).
    code, out = invoke(runner, "runs", "--tenant", "caf\udce9")
    assert code == 1 and "[invalid_identity]" in out
    code, out = invoke(runner, "runs", "--tenant", "")
    assert code == 2 and "is blank" in out and "--no-tenant" in out
    code, out = invoke(runner, "runs", "--tenant", "t-1", "--no-tenant")
    assert code == 2 and "not both" in out


def test_show_prints_steps_approvals_and_timeline(runner: FlaskCliRunner, paused: str) -> None:
    code, out = invoke(runner, "show", paused)
    assert code == 0
    assert f"run_id:         {paused}" in out
    assert "waiting_for_approval" in out
    assert "Steps" in out and "approval" in out
    assert "Approvals" in out and "publish" in out
    assert "Timeline" in out and "run_started" in out
    code, out = invoke(runner, "show", paused, "--json")
    detail = json.loads(out)
    assert detail["summary"]["run_id"] == paused
    assert [event["event_type"] for event in detail["events"]] == [
        "run_started",
        "step_started",
        "waiting_for_approval",
    ]


def test_unknown_or_malformed_run_id_fails_clearly(runner: FlaskCliRunner) -> None:
    for command in ("show", "resume", "dispatch"):
        for run_id in (UNKNOWN, "not-a-run"):
            code, out = invoke(runner, command, run_id)
            assert code == 1, (command, out)
            assert "No run found for run_id" in out and "[run_not_found]" in out
    code, out = invoke(runner, "approve", UNKNOWN, "--by", "ops")
    assert code == 1 and "[run_not_found]" in out


def test_approve_then_resume_completes_the_same_run(
    runner: FlaskCliRunner, paused: str, app: Flask
) -> None:
    code, out = invoke(runner, "resume", paused)
    assert code == 1 and "[approval_pending]" in out
    code, out = invoke(runner, "approve", paused, "--by", "ops", "--note", "fine")
    assert code == 0
    assert f"flask scoria resume {paused}" in out
    code, out = invoke(runner, "approve", paused, "--by", "someone-else")
    assert code == 1 and "already approved by 'ops'" in out
    assert "[approval_already_decided]" in out
    code, out = invoke(runner, "resume", paused, "--by", "ops-cli", "--json")
    assert code == 0
    assert json.loads(out)["run_id"] == paused
    assert json.loads(out)["status"] == "completed"
    code, out = invoke(runner, "resume", paused)
    assert code == 1 and "[run_not_resumable]" in out
    with app.app_context():
        detail = scoria.get_run_detail(paused)
    approval = detail.approvals[0]
    assert (approval.decided_by, approval.note) == ("ops", "fine")
    resumed = [e.payload for e in detail.events if e.event_type == "resume_requested"]
    assert resumed == [{"requested_by": "ops-cli"}]


def test_approve_requires_by(runner: FlaskCliRunner, paused: str) -> None:
    code, out = invoke(runner, "approve", paused)
    assert code == 2 and "Missing option '--by'" in out


def test_reject_ends_the_run(runner: FlaskCliRunner, paused: str, app: Flask) -> None:
    code, out = invoke(runner, "reject", paused, "--by", "ops", "--reason", "not today")
    assert code == 0 and "rejected" in out
    code, out = invoke(runner, "reject", paused, "--by", "ops")
    assert code == 1 and "[approval_already_decided]" in out
    with app.app_context():
        assert scoria.get_run_detail(paused).approvals[0].note == "not today"


def test_approve_only_the_approval_named(app: Flask, runner: FlaskCliRunner, paused: str) -> None:
    with app.app_context():
        (approval,) = scoria.get_run_detail(paused).approvals
    assert approval.id in invoke(runner, "show", paused)[1]
    code, out = invoke(runner, "approve", paused, "--by", "ops", "--approval", UNKNOWN)
    assert code == 1 and f"has no approval {UNKNOWN}" in out and "[no_pending_approval]" in out
    code, out = invoke(runner, "approve", paused, "--by", "ops", "--approval", approval.id)
    assert code == 0
    code, out = invoke(runner, "reject", paused, "--by", "ops", "--approval", approval.id)
    assert code == 1 and "already approved by 'ops'" in out


def test_approve_a_run_without_approval(app: Flask, runner: FlaskCliRunner) -> None:
    with app.app_context():
        done = scoria.start_run(scoria.identity(None)).run_id
    code, out = invoke(runner, "approve", done, "--by", "ops")
    assert code == 1 and "[no_pending_approval]" in out


def test_dispatch_runs_queued_steps_with_registered_handlers(
    app: Flask, runtime: Scoria, runner: FlaskCliRunner
) -> None:
    with app.app_context():
        queued = scoria.start_run(scoria.identity(None), initial_step={"kind": "review"}).run_id
    result = runner.invoke(args=["scoria", "dispatch", queued])
    assert result.exit_code == 0 and "running" in result.stdout
    assert "no handler for kind 'review' in this app" in result.stderr
    runtime.handler("review")(review)
    code, out = invoke(runner, "dispatch", queued, "--json")
    assert code == 0 and json.loads(out)["status"] == "completed"


def test_recover_reports_nothing_to_do(runner: FlaskCliRunner) -> None:
    assert invoke(runner, "recover") == (0, "0 run(s) recovered\n")


def test_db_current_and_check(runner: FlaskCliRunner) -> None:
    assert invoke(runner, "db", "current") == (0, schema.head_revision() + "\n")
    code, out = invoke(runner, "db", "check")
    assert code == 0 and "up to date" in out


def unmigrated_app(tmp_path: Path) -> Flask:
    return create_test_app(f"sqlite:///{tmp_path / 'empty.sqlite3'}", tmp_path / "instance")


def test_db_commands_on_an_unmigrated_database(tmp_path: Path) -> None:
    runner = unmigrated_app(tmp_path).test_cli_runner()
    assert invoke(runner, "db", "current") == (0, "none (run: flask scoria db upgrade)\n")
    code, out = invoke(runner, "db", "check")
    assert code == 1 and "run: flask scoria db upgrade" in out
    code, out = invoke(runner, "db", "upgrade")
    assert code == 0 and schema.head_revision() in out
    assert invoke(runner, "db", "check")[0] == 0


@pytest.mark.parametrize("command", [("upgrade", "nosuchrev"), ("downgrade", "nosuchrev", "--yes")])
def test_db_commands_name_an_unknown_revision(
    runner: FlaskCliRunner, command: tuple[str, ...]
) -> None:
    result = runner.invoke(args=["scoria", "db", *command])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "'nosuchrev'" in result.output
    assert "Traceback" not in result.output
    assert invoke(runner, "db", "current") == (0, schema.head_revision() + "\n")


def operator_scope() -> dict[str, str]:
    return {"tenant_id": "t-1", "actor_id": "ops"}


@pytest.mark.parametrize(
    ("app_executor", "handler_executor"),
    [("inline", None), ("worker", None), ("celery", None), ("inline", "worker")],
)
def test_verify_adoption_passes_with_the_app_handlers(
    app: Flask,
    runtime: Scoria,
    runner: FlaskCliRunner,
    app_executor: str,
    handler_executor: str | None,
) -> None:
    """Wherever the app runs its steps, the checks run the handler in the call."""
    app.config["SCORIA_EXECUTOR"] = app_executor
    runtime.operator_scope(operator_scope)
    runtime.handler("approval", executor=handler_executor)(ask_approval)
    code, out = invoke(runner, "verify")
    assert code == 0, out
    for step in ("1. start_run", "3. get_run", "4. operator", "5. resume_run", "6. same session"):
        assert f"PASS  {step}" in out
    assert "all checks passed" in out


def test_verify_writes_nothing_to_the_app_database(
    app: Flask, runtime: Scoria, runner: FlaskCliRunner
) -> None:
    runtime.operator_scope(operator_scope)
    runtime.handler("approval")(ask_approval)
    assert invoke(runner, "verify", "--json")[0] == 0
    assert invoke(runner, "runs") == (0, "No runs found.\n")


def test_verify_fails_without_a_handler(runtime: Scoria, runner: FlaskCliRunner) -> None:
    runtime.operator_scope(operator_scope)
    code, out = invoke(runner, "verify", "--json")
    assert code == 1
    report = json.loads(out.split("\nError:")[0])
    assert report["passed"] is False
    assert report["checks"][-1]["outcome"] == "FAIL"
    assert (
        "@runtime.handler('approval'), or name yours with --kind" in report["checks"][-1]["detail"]
    )


def test_verify_fails_when_the_handler_fails(runtime: Scoria, runner: FlaskCliRunner) -> None:
    runtime.operator_scope(operator_scope)

    @runtime.handler("approval")
    def broken(step: scoria.StepView, run: scoria.RunSummary) -> None:
        raise RuntimeError("model unreachable")

    code, out = invoke(runner, "verify")
    assert code == 1
    assert "FAIL  1. start_run" in out and "is failed" in out
    assert "1 check(s) failed" in out


def test_verify_runtime_to_handoff(runtime: Scoria, runner: FlaskCliRunner) -> None:
    runtime.operator_scope(operator_scope)
    runtime.handler("review")(review)
    code, out = invoke(runner, "verify", "runtime-to-handoff")
    assert code == 0, out
    assert "PASS  2. unsafe projected context is rejected" in out
    assert "PASS  4. get_run_detail returns delegated_handoffs: 1 handoff(s)" in out
    assert "child completed" in out
    assert "PASS  5. operator page shows Delegated Evidence" in out


def test_verify_fails_without_an_operator_scope(runtime: Scoria, runner: FlaskCliRunner) -> None:
    runtime.handler("approval")(ask_approval)
    code, out = invoke(runner, "verify")
    assert code == 1
    assert "FAIL  0b. operator scope registered" in out
    assert "register one with @runtime.operator_scope" in out


def test_verify_fails_without_a_secret_key(
    app: Flask, runtime: Scoria, runner: FlaskCliRunner
) -> None:
    app.config["SECRET_KEY"] = None
    runtime.operator_scope(operator_scope)
    runtime.handler("approval")(ask_approval)
    code, out = invoke(runner, "verify")
    assert code == 1
    assert "FAIL  0a. SECRET_KEY set" in out and "set SECRET_KEY" in out


def test_verify_fails_on_an_unmigrated_app(tmp_path: Path) -> None:
    app = unmigrated_app(tmp_path)
    app.extensions["scoria"].handler("approval")(ask_approval)
    code, out = invoke(app.test_cli_runner(), "verify")
    assert code == 1
    assert "FAIL  0. app database migrated" in out
    assert "run: flask scoria db upgrade" in out


def test_verify_accepts_scoria_mounted_in_the_host_history(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'host.sqlite3'}"
    engine = sa.create_engine(uri)
    schema.upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ALTER TABLE {schema.VERSION_TABLE} RENAME TO alembic_version")
    engine.dispose()
    app = create_test_app(uri, tmp_path / "instance")
    app.extensions["scoria"].operator_scope(operator_scope)
    app.extensions["scoria"].handler("approval")(ask_approval)
    code, out = invoke(app.test_cli_runner(), "verify")
    assert code == 0, out
    assert f"PASS  0. app database migrated: scoria tables at {schema.head_revision()}" in out
    assert invoke(app.test_cli_runner(), "db", "current") == (0, schema.head_revision() + "\n")
    assert invoke(app.test_cli_runner(), "db", "check")[0] == 0
    for command in ("upgrade", "downgrade"):
        code, out = invoke(app.test_cli_runner(), "db", command)
        assert code == 1 and "recorded in your app's alembic_version" in out
    assert invoke(app.test_cli_runner(), "db", "current")[1] == schema.head_revision() + "\n"


def test_a_file_that_cannot_be_opened_is_named_by_every_command(tmp_path: Path) -> None:
    """A relative SQLite path of SCORIA_DATABASE_URI is read from the instance folder:
    the db commands and the commands on runs name the file there, and what to do."""
    instance = tmp_path / "instance"
    app = create_test_app("sqlite:///data/scoria.sqlite3", instance)
    path = instance / "data" / "scoria.sqlite3"
    runner = app.test_cli_runner()
    said = (
        "Error: The flask-scoria database is unavailable: OperationalError: unable to open"
        f" database file. SQLite cannot open the file {path}: its folder {path.parent} does"
        " not exist. Create the folder, or correct the path in SCORIA_DATABASE_URI"
        " (SQLALCHEMY_DATABASE_URI with Scoria(app, db=db)). [storage_unavailable]\n"
    )
    commands = (["db", "upgrade"], ["db", "downgrade", "--yes"], ["db", "current"])
    for command in (*commands, ["db", "check"], ["runs"], ["show", UNKNOWN]):
        assert invoke(runner, *command) == (1, said), command
    assert not path.parent.exists()
    path.parent.mkdir()
    assert invoke(runner, "db", "upgrade")[0] == 0
    assert invoke(runner, "runs") == (0, "No runs found.\n")
    app.extensions["scoria"].storage(app).engine.dispose()


def test_a_file_in_a_folder_that_cannot_be_opened_says_so(tmp_path: Path) -> None:
    """An absolute path whose folder exists but names a folder: correct the path."""
    app = create_test_app(f"sqlite:///{tmp_path}", tmp_path / "instance")
    for command in (["db", "upgrade"], ["runs"]):
        code, out = invoke(app.test_cli_runner(), *command)
        assert code == 1
        assert f"SQLite cannot open the file {tmp_path}: it is a folder, or it" in out, out
        assert "Correct the path in SCORIA_DATABASE_URI" in out
        assert "working directory" not in out


def example_app(tmp_path: Path, *, migrated: bool) -> Flask:
    from examples.assistant import create_app
    from examples.assistant.database import prepare

    app = create_app(
        {
            "TESTING": True,
            "SECRET_KEY": "test",
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'assistant.sqlite3'}",
        }
    )
    if migrated:
        with app.app_context():
            prepare()
    return app


@pytest.mark.parametrize("lane", ["adoption", "runtime-to-handoff"])
def test_verify_passes_on_the_example_app(tmp_path: Path, lane: str) -> None:
    code, out = invoke(example_app(tmp_path, migrated=True).test_cli_runner(), "verify", lane)
    assert code == 0, out
    assert "FAIL" not in out and "SKIP" not in out


def test_verify_fails_on_the_unmigrated_example_app(tmp_path: Path) -> None:
    code, out = invoke(example_app(tmp_path, migrated=False).test_cli_runner(), "verify")
    assert code == 1
    assert "FAIL  0. app database migrated: scoria tables at no revision" in out
    assert "run: flask scoria db upgrade" in out
