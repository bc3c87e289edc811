"""``flask scoria verify``: every failing prerequisite at once, a custom payload, tenants."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import create_test_app
from flask import Flask

import flask_scoria as scoria
from flask_scoria import Scoria, Succeed, WaitForApproval, schema
from flask_scoria.verify import parse_payload, run_lane


def operator_scope() -> dict[str, str]:
    return {"tenant_id": "t-1", "actor_id": "ops"}


def publish(step: scoria.StepView, run: scoria.RunSummary) -> Succeed | WaitForApproval:
    """A handler that reads a payload key other than ``prompt``."""
    title = run.metadata["payload"]["title"]
    if step.approval is None:
        return WaitForApproval("publish", {"title": title})
    return Succeed({"published": title})


def host(tmp_path: Path, *, migrated: bool = True, **config: Any) -> Flask:
    uri = f"sqlite:///{tmp_path / 'host.sqlite3'}"
    if migrated:
        engine = sa.create_engine(uri)
        schema.upgrade(engine)
        engine.dispose()
    return create_test_app(uri, tmp_path / "instance", **config)


def outcomes(app: Flask, lane: str = "adoption", **options: Any) -> dict[str, str]:
    try:
        report = run_lane(app, lane, options.pop("kind", None), **options)
    finally:
        app.extensions["scoria"].storage(app).engine.dispose()
    return {check.name: check.outcome for check in report.checks}


def test_every_failing_prerequisite_is_reported_in_one_run(tmp_path: Path) -> None:
    app = host(tmp_path, migrated=False)
    app.config["SECRET_KEY"] = None
    found = outcomes(app)
    assert found == {
        "0. app database migrated": "FAIL",
        "0a. SECRET_KEY set": "FAIL",
        "0b. operator scope registered": "FAIL",
        "handler for 'approval' registered": "FAIL",
    }


def test_a_database_stamped_ahead_of_its_tables_is_not_migrated(tmp_path: Path) -> None:
    """A revision recorded without being run (a stamp): the tables are an older one's."""
    uri = f"sqlite:///{tmp_path / 'host.sqlite3'}"
    engine = sa.create_engine(uri)
    schema.upgrade(engine, "scoria_0002")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"UPDATE scoria_alembic_version SET version_num = '{schema.head_revision()}'"
        )
    engine.dispose()
    app = create_test_app(uri, tmp_path / "instance")
    report = run_lane(app, "adoption", None)
    app.extensions["scoria"].storage(app).engine.dispose()
    (check,) = [check for check in report.checks if check.name == "0. app database migrated"]
    assert check.outcome == "FAIL" and "see flask scoria db check" in check.detail


def test_the_lane_still_runs_when_only_the_host_setup_fails(tmp_path: Path) -> None:
    app = host(tmp_path, migrated=False)
    app.extensions["scoria"].handler("approval")(publish)
    found = outcomes(app, payload={"title": "Release notes"})
    assert found["0. app database migrated"] == "FAIL"
    assert found["0b. operator scope registered"] == "FAIL"
    assert found["5. resume_run after approval"] == "PASS"
    assert found["6. same session, fresh run"] == "PASS"


def test_a_payload_reaches_a_handler_that_reads_other_keys(tmp_path: Path) -> None:
    app = host(tmp_path)
    runtime = app.extensions["scoria"]
    runtime.operator_scope(operator_scope)
    runtime.handler("publish")(publish)
    without = run_lane(app, "adoption", "publish")
    assert without.failures == 1
    assert (without.checks[-1].name, without.checks[-1].outcome) == ("1. start_run", "FAIL")
    assert set(outcomes(app, kind="publish", payload={"title": "Notes"}).values()) == {"PASS"}


def test_the_handoff_lane_takes_a_payload_too(tmp_path: Path) -> None:
    app = host(tmp_path)
    runtime = app.extensions["scoria"]
    runtime.operator_scope(operator_scope)
    seen: list[Any] = []

    @runtime.handler("review")
    def review(step: scoria.StepView, run: scoria.RunSummary) -> Succeed:
        seen.append(run.metadata.get("payload"))
        return Succeed({"verdict": "ok"})

    assert set(outcomes(app, "runtime-to-handoff", payload={"draft": "x"}).values()) == {"PASS"}
    assert seen == [{"draft": "x"}]


def test_the_handoff_lane_fails_when_the_apps_handler_fails_the_child(tmp_path: Path) -> None:
    app = host(tmp_path)
    runtime = app.extensions["scoria"]
    runtime.operator_scope(operator_scope)

    @runtime.handler("review")
    def review(step: scoria.StepView, run: scoria.RunSummary) -> Succeed:
        raise RuntimeError("the review model is down")

    found = outcomes(app, "runtime-to-handoff")
    assert found["4. get_run_detail returns delegated_handoffs"] == "FAIL"


@pytest.mark.parametrize(
    ("tenants", "outcome", "detail"),
    [
        ((), "PASS", "no runs in the app's database yet"),
        (("t-1", "t-1"), "PASS", "the newest 2 run(s) all have a tenant_id"),
        (("t-1", None), "FAIL", "1 of the newest 2 run(s) have no tenant_id"),
    ],
)
def test_the_app_runs_must_carry_a_tenant(
    tmp_path: Path, tenants: tuple[str | None, ...], outcome: str, detail: str
) -> None:
    app = host(tmp_path)
    runtime = app.extensions["scoria"]
    runtime.operator_scope(operator_scope)
    runtime.handler("approval")(publish)
    with app.app_context():
        for tenant in tenants:
            scoria.start_run({"actor_id": "u-1", "tenant_id": tenant, "session_id": "s-1"})
    try:
        report = run_lane(app, "adoption", None, {"title": "Notes"})
    finally:
        runtime.storage(app).engine.dispose()
    (check,) = [check for check in report.checks if check.name == "0c. runs carry a tenant"]
    assert check.outcome == outcome
    assert detail in check.detail


def test_a_payload_option_is_a_json_object() -> None:
    assert parse_payload('{"title": "Notes", "tags": ["a"]}') == {"title": "Notes", "tags": ["a"]}
    with pytest.raises(ValueError, match="--payload is not JSON"):
        parse_payload("{title: Notes}")
    with pytest.raises(ValueError, match="--payload must be a JSON object, not list"):
        parse_payload("[1]")


def test_the_payload_option_reaches_the_handler(tmp_path: Path) -> None:
    app = Flask("payload_app", instance_path=str(tmp_path / "instance"))
    app.config.update(SECRET_KEY="s", SCORIA_DATABASE_URI=f"sqlite:///{tmp_path / 'app.sqlite3'}")
    runtime = Scoria(app)
    runtime.operator_scope(lambda: None)
    seen: list[object] = []

    @runtime.handler("publish")
    def publish(step: scoria.StepView, run: scoria.RunSummary) -> scoria.Succeed:
        seen.append(run.metadata["payload"]["title"])
        return scoria.Succeed()

    runner = app.test_cli_runner()
    assert runner.invoke(args=["scoria", "db", "upgrade"]).exit_code == 0
    bad = runner.invoke(args=["scoria", "verify", "--kind", "publish", "--payload", "[1]"])
    assert bad.exit_code == 2 and "--payload" in bad.output
    args = ["scoria", "verify", "--kind", "publish", "--payload", '{"title": "Release 2.1"}']
    result = runner.invoke(args=args)
    assert "Release 2.1" in seen, result.output
