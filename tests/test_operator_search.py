"""Searching the runs list: run id prefix, creation date range, prompt text."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from test_operator import TENANT, operator_app, ops

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

    today = datetime.now(UTC).date()
    assert trains in shown(ops, f"from={today}&until={today}")
    assert trains not in shown(ops, f"until={today - timedelta(days=1)}")
    assert trains not in shown(ops, f"from={today + timedelta(days=1)}")
    assert ops.get("/scoria/workflows?from=yesterday").status_code == 400
    # The day after the last one a date can name.
    assert ops.get("/scoria/workflows?until=9999-12-31").status_code == 400


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
