"""Searching the runs list: run id prefix, creation date range, prompt text."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import create_test_app
from flask import Flask
from flask.testing import FlaskClient
from test_operator import TENANT, generic_plan, operator_app, ops, query_plan, recorded_queries

import flask_scoria as scoria
from flask_scoria.runtime import RunFilters, list_runs, reads, tables

__all__ = ["operator_app", "ops"]  # fixtures


def start(prompt: str, tenant: str = TENANT) -> str:
    return scoria.start_run(
        {"tenant_id": tenant, "session_id": "s"},
        runtime={"metadata": {"payload": {"prompt": prompt}}},
    ).run_id


def shown(client: FlaskClient, query: str) -> str:
    response = client.get(f"/scoria/workflows?{query}")
    assert response.status_code == 200, response.text
    return response.text


def test_search_by_prompt_id_prefix_and_dates(operator_app: Flask, ops: FlaskClient) -> None:
    with operator_app.app_context():
        trains = start("What does the policy say about TRAINS?")
        hotels = start("Hotel limits in Berlin, 100% sure?")
        other = start("trains for another tenant", tenant="globex")
    assert trains in shown(ops, "prompt=trains") and hotels not in shown(ops, "prompt=trains")
    assert other not in shown(ops, "prompt=trains")
    # LIKE wildcards in the text are literal
    assert hotels in shown(ops, "prompt=100%25") and trains not in shown(ops, "prompt=100%25")

    by_id = shown(ops, f"id={trains[:8]}{trains[9:13]}")
    assert trains in by_id
    assert trains in shown(ops, f"id={trains}") and hotels not in shown(ops, f"id={trains}")
    assert trains not in shown(ops, "id=not-hex") and hotels not in shown(ops, "id=not-hex")
    # Whitespace is stripped before dashes are dropped: what is left is no prefix.
    assert ops.get("/scoria/workflows?id=ab%0A-").status_code == 200
    assert trains not in shown(ops, "id=ab%0A-")
    assert ops.get(f"/scoria/workflows?after=1.{trains.replace('-', '')}%0A").status_code == 400

    today = datetime.now(UTC).date()
    assert trains in shown(ops, f"from={today}&until={today}")
    assert trains not in shown(ops, f"until={today - timedelta(days=1)}")
    assert trains not in shown(ops, f"from={today + timedelta(days=1)}")
    assert ops.get("/scoria/workflows?from=yesterday").status_code == 400
    # The day after the last one a date can name.
    assert ops.get("/scoria/workflows?until=9999-12-31").status_code == 400


def test_the_prompt_search_matches_only_what_redaction_shows(
    database_uri: str, tmp_path: Path
) -> None:
    app = create_test_app(database_uri, tmp_path / "i", SCORIA_REDACT_KEYS=["ssn"])
    app.extensions["scoria"].operator_scope(lambda: {"tenant_id": TENANT, "actor_id": "ops"})
    client = app.test_client()
    with app.app_context():
        leaky = start("reach me at postgresql://u:hunter2@db/prod about the invoice")
        secret = scoria.start_run(
            {"tenant_id": TENANT},
            runtime={"metadata": {"payload": {"prompt": "mine", "ssn": "123-45-6789"}}},
        ).run_id
        hidden = scoria.start_run(
            {"tenant_id": TENANT},
            runtime={"metadata": {"payload": {"ssn": "1", "prompt": "ok"}}},
        ).run_id
    assert leaky in shown(client, "prompt=invoice")
    for guess in ("hunter2", "u:hunter", "123-45"):
        assert leaky not in shown(client, f"prompt={guess}")
        assert secret not in shown(client, f"prompt={guess}")
    assert secret in shown(client, "prompt=mine") and hidden in shown(client, "prompt=ok")
    app.extensions["scoria"].storage(app).engine.dispose()


def test_runs_whose_match_redaction_hides_do_not_hide_older_matches(
    operator_app: Flask, ops: FlaskClient
) -> None:
    with operator_app.app_context():
        older = start("deploy to prod")
        for _ in range(reads.PAGE_SIZE + 1):
            start("connect to postgresql://u:prod@db/app")
    assert older in shown(ops, "prompt=prod")


def test_a_prompt_search_reads_the_prompt_not_the_whole_metadata(
    operator_app: Flask, ops: FlaskClient
) -> None:
    with operator_app.app_context():
        heavy = scoria.start_run(
            {"tenant_id": TENANT},
            runtime={"metadata": {"payload": {"prompt": "Heavy trains"}, "blob": "b" * 200_000}},
        ).run_id
        plain = start("plain trains")
    with recorded_queries(operator_app.extensions["scoria"], operator_app) as statements:
        page = shown(ops, "prompt=trains")
    assert heavy in page and plain in page
    listed = [sql for sql, _ in statements if "scoria_runs.created_at DESC" in sql]
    column = re.compile(r"(SELECT|,)\s*scoria_runs\.metadata\s*(,|FROM\b)")
    whole = [sql for sql in listed if column.search(sql)]
    assert listed and not whole, whole


def test_a_search_too_long_for_the_database_is_a_400(ops: FlaskClient) -> None:
    response = ops.get("/scoria/workflows?prompt=" + "é" * 25_001)
    assert response.status_code == 400 and "1000 characters" in response.text
    assert ops.get("/scoria/workflows?prompt=" + "%25" * 1000).status_code == 200


def test_the_prompt_search_reads_a_bounded_number_of_runs(
    operator_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = operator_app.extensions["scoria"].storage(operator_app).engine
    with operator_app.app_context():
        oldest = start("needle in the oldest run")
        newer = [start("hay") for _ in range(3)]
        with engine.begin() as conn:  # the oldest run falls out of a 3-run scan window
            conn.execute(
                sa.update(tables.runs)
                .where(tables.runs.c.id == sa.bindparam("b_id"))
                .values(created_at=datetime(2000, 1, 1, tzinfo=UTC)),
                {"b_id": uuid.UUID(oldest)},
            )
        everything = list_runs(RunFilters(prompt_contains="needle"), tenant=TENANT).rows
        assert [run.run_id for run in everything] == [oldest]
        monkeypatch.setattr(reads, "PROMPT_SCAN", len(newer))
        assert list_runs(RunFilters(prompt_contains="needle"), tenant=TENANT).rows == []
        hay = list_runs(RunFilters(prompt_contains="hay"), tenant=TENANT).rows
        assert sorted(run.run_id for run in hay) == sorted(newer)


@pytest.mark.own_database
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_prompt_search_plan_stops_at_the_newest_runs(
    operator_app: Flask, ops: FlaskClient
) -> None:
    """Also in a plan made for any search: one that matches nothing does not read the
    tenant's runs beyond the newest ones."""
    runtime = operator_app.extensions["scoria"]
    engine = runtime.storage(operator_app).engine
    with engine.begin() as conn:  # a tenant with many runs, for the planner's statistics
        conn.exec_driver_sql(
            "INSERT INTO scoria_runs (id, tenant_id, root_role_id, status, version,"
            " last_event_sequence, last_step_sequence, created_at, updated_at, metadata)"
            " SELECT gen_random_uuid(), %(tenant)s, 'executor', 'completed', 1, 1, 1,"
            ' now() - i * interval \'1 minute\', now(), \'{"payload": {"prompt": "hay"}}\''
            " FROM generate_series(1, 5000) i",
            {"tenant": TENANT},
        )
        conn.exec_driver_sql("ANALYZE scoria_runs")
    with recorded_queries(runtime, operator_app) as statements:
        shown(ops, "prompt=needle")
    [(statement, parameters)] = [(sql, params) for sql, params in statements if "LIKE" in sql]
    plan = generic_plan(engine, statement, parameters)
    assert "Seq Scan" not in plan, plan
    assert re.search(r"Index Cond: \([^|]*created_at >= ", plan), plan


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_long_run_id_prefix_is_found_by_the_key(operator_app: Flask, ops: FlaskClient) -> None:
    """A plan made without statistics: a pasted run id (or its first eight digits) looks
    its runs up by their key, not through all the tenant's runs; a short prefix, which
    may match hours of runs, walks them in page order."""
    runtime = operator_app.extensions["scoria"]
    engine = runtime.storage(operator_app).engine
    with operator_app.app_context():
        run_id = start("trains")
    for prefix, by_key in ((run_id, True), (run_id[:8], True), (run_id[:6], False)):
        with recorded_queries(runtime, operator_app) as statements:
            assert run_id[-8:] in shown(ops, f"id={prefix}&actor=&session=s")
        [(statement, parameters)] = [
            (sql, params) for sql, params in statements if "ORDER BY" in sql and "id >=" in sql
        ]
        plan = query_plan(engine, statement, parameters).split(" | ")[0]
        assert ("(id>? AND id<?)" in plan) is by_key, (prefix, plan)
