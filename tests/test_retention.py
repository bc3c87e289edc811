"""Pruning runs that ended long ago: ``prune_runs`` and ``flask scoria prune``."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from _helpers import ask_then_work, row_counts, succeed, wait_for_approval
from flask import Flask
from flask.testing import FlaskCliRunner
from test_operator import query_plan, recorded_queries

import flask_scoria as scoria
from flask_scoria import InvalidRunOptions, RunNotFound
from flask_scoria.runtime.tables import runs

DAY = timedelta(days=1)


def engine_of(app: Flask) -> sa.Engine:
    return app.extensions["scoria"].storage(app).engine  # type: ignore[no-any-return]


def age(app: Flask, run_id: str, days: float) -> None:
    """Move a run's timestamps ``days`` into the past."""
    then = datetime.now(UTC) - timedelta(days=days)
    values: dict[str, Any] = {"created_at": then}
    with app.app_context():
        if scoria.get_run(run_id).completed_at is not None:
            values["completed_at"] = then
    with engine_of(app).begin() as conn:
        conn.execute(sa.update(runs).where(runs.c.id == uuid.UUID(run_id)).values(**values))


def started(tenant: str = "t-1", **options: Any) -> str:
    who = scoria.identity({"tenant_id": tenant, "session_id": "s-1"})
    return scoria.start_run(who, **options).run_id


@pytest.fixture
def history(app: Flask) -> dict[str, str]:
    """Runs in every state, most of them ended 30 days ago."""
    with app.app_context():
        made = {
            "completed": started(initial_step={"kind": "w"}, handlers={"w": succeed}),
            "failed": started(initial_step={"kind": "w"}, handlers={"w": lambda s, r: 1 / 0}),
            "rejected": started(initial_step={"kind": "w"}, handlers={"w": wait_for_approval}),
            "cancelled": started(initial_step={"kind": "w"}),
            "waiting": started(initial_step={"kind": "w"}, handlers={"w": ask_then_work}),
            "running": started(initial_step={"kind": "w"}),
            "handoff": scoria.start_handoff_run(
                scoria.identity({"session_id": "s-1"}),
                "critic",
                root_role_id="writer",
                delegated_kind="review",
                handoff_input={"draft": "x"},
                projected_context={"task": "review"},
                handlers={"review": succeed},
            ).run_id,
            "recent": started(),
            "other_tenant": started(tenant="t-2"),
        }
        scoria.reject_run(made["rejected"], decided_by="ops")
        scoria.cancel_run(made["cancelled"], cancelled_by="ops")
    for name, run_id in made.items():
        if name != "recent":
            age(app, run_id, 30)
    return made


def visible(app: Flask, run_ids: dict[str, str]) -> set[str]:
    found = set()
    with app.app_context():
        for name, run_id in run_ids.items():
            try:
                scoria.get_run(run_id)
            except RunNotFound:
                continue
            found.add(name)
    return found


def test_prune_deletes_ended_runs_with_everything_recorded_about_them(
    app: Flask, history: dict[str, str]
) -> None:
    with app.app_context():
        assert scoria.prune_runs(older_than=7 * DAY, dry_run=True) == 6
        assert visible(app, history) == set(history)
        assert scoria.prune_runs(older_than=7 * DAY) == 6
    assert visible(app, history) == {"waiting", "running", "recent"}
    counts = row_counts(engine_of(app))
    assert counts["scoria_runs"] == 3
    assert counts["scoria_handoffs"] == 0
    with engine_of(app).connect() as conn:
        for table in ("scoria_steps", "scoria_events", "scoria_approvals"):
            orphans = conn.exec_driver_sql(
                f"SELECT count(*) FROM {table} WHERE run_id NOT IN (SELECT id FROM scoria_runs)"
            ).scalar_one()
            assert orphans == 0, table
    with app.app_context():
        assert scoria.prune_runs(older_than=7 * DAY) == 0


def test_prune_keeps_what_ended_more_recently(app: Flask, history: dict[str, str]) -> None:
    with app.app_context():
        assert scoria.prune_runs(older_than=60 * DAY) == 0
    assert visible(app, history) == set(history)


def test_prune_one_tenant_in_small_batches(app: Flask, history: dict[str, str]) -> None:
    with app.app_context():
        assert scoria.prune_runs(older_than=DAY, tenant_id="t-2", batch_size=1) == 1
        assert "other_tenant" not in visible(app, history)
        assert scoria.prune_runs(older_than=DAY, tenant_id=None) == 1  # the handoff's
        assert scoria.prune_runs(older_than=DAY, tenant_id="t-1", batch_size=2) == 4
    assert visible(app, history) == {"waiting", "running", "recent"}


@pytest.mark.parametrize(
    "options",
    [
        {"older_than": 0},
        {"older_than": -DAY},
        {"older_than": timedelta(0)},
        {"older_than": DAY, "batch_size": 0},
        {"older_than": DAY, "batch_size": True},
        # More than any database integer holds.
        {"older_than": DAY, "batch_size": 2**63},
        {"older_than": DAY, "tenant_id": {"id": 1}},
        # Blank ids stand for "no tenant" elsewhere: here they would prune those runs.
        {"older_than": DAY, "tenant_id": ""},
        {"older_than": DAY, "tenant_id": "  "},
        # Each run of a batch is a bound parameter; PostgreSQL takes 65,535.
        {"older_than": DAY, "batch_size": 70_000},
        # Read as "delete" were it read as a truth value.
        {"older_than": DAY, "dry_run": "no"},
    ],
)
def test_prune_refuses_bad_options(app: Flask, options: dict[str, Any]) -> None:
    with app.app_context():
        scoria.start_run(None)
        before = row_counts(engine_of(app))
        with pytest.raises(scoria.ScoriaError) as raised:
            scoria.prune_runs(**options)
        assert not isinstance(raised.value, scoria.StorageError)
    assert row_counts(engine_of(app)) == before


def test_prune_refuses_a_number_of_days() -> None:
    with pytest.raises(InvalidRunOptions, match="timedelta"):
        scoria.prune_runs(older_than=30)  # type: ignore[arg-type]


def test_prune_command(app: Flask, history: dict[str, str], runner: FlaskCliRunner) -> None:
    result = runner.invoke(args=["scoria", "prune", "--days", "7", "--dry-run"])
    assert (result.exit_code, result.output) == (
        0,
        "would delete 6 run(s) that ended more than 7 day(s) ago\n",
    )
    result = runner.invoke(args=["scoria", "prune", "--days", "7", "--tenant", "t-2"])
    assert result.output == "deleted 1 run(s) that ended more than 7 day(s) ago\n"
    assert visible(app, history) == set(history) - {"other_tenant"}
    result = runner.invoke(args=["scoria", "prune", "--days", "7", "--no-tenant"])
    assert result.output == "deleted 1 run(s) that ended more than 7 day(s) ago\n"
    assert visible(app, history) == set(history) - {"other_tenant", "handoff"}
    for days in ("0", "nan", "inf", "1e10"):
        result = runner.invoke(args=["scoria", "prune", "--days", days])
        assert result.exit_code == 2 and "--days" in result.output, days
    result = runner.invoke(args=["scoria", "prune", "--days", "7", "--tenant", "t", "--no-tenant"])
    assert result.exit_code == 2 and "not both" in result.output
    result = runner.invoke(args=["scoria", "prune", "--days", "0.001", "--tenant", " "])
    assert result.exit_code == 2 and "--no-tenant" in result.output
    assert visible(app, history) == set(history) - {"other_tenant", "handoff"}


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_tenants_prune_walks_its_runs_created_before_the_cutoff(app: Flask) -> None:
    """A plan made without statistics of the tables, as SQLite's are until ``ANALYZE``:
    each batch, taken under the write lock, does not walk every ended run of the tenant."""
    with app.app_context():
        started()
    with recorded_queries(app.extensions["scoria"], app) as statements, app.app_context():
        scoria.prune_runs(older_than=DAY, tenant_id="t-1")
    [(statement, parameters)] = [
        (sql, params) for sql, params in statements if sql.startswith("SELECT scoria_runs.id")
    ]
    plan = query_plan(engine_of(app), statement, parameters)
    assert "tenant_id=? AND created_at<?" in plan and "TEMP B-TREE" not in plan, plan


def test_prune_refuses_a_cutoff_before_the_calendar(app: Flask) -> None:
    with app.app_context(), pytest.raises(InvalidRunOptions, match="year 1"):
        scoria.prune_runs(older_than=timedelta(days=800_000))
