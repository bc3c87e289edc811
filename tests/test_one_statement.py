"""Approvals decided, and approved steps claimed, as one statement on PostgreSQL.

The statement must write what the general transaction writes: the same rows,
events and signals. Each scenario runs twice on one database, once each way
(a storage without pipeline mode decides every transition as a transaction),
and the two histories are compared.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _helpers import IDENTITY, ask_then_work, edit_then_send
from conftest import create_test_app
from flask import Flask

import flask_scoria as scoria
from flask_scoria import WaitForApproval
from flask_scoria.runtime import one_statement
from flask_scoria.state import app_state

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)

SIGNALS = (scoria.approval_decided, scoria.run_resumed, scoria.run_completed, scoria.run_paused)


@pytest.fixture
def app(database_uri: str, tmp_path: Path) -> Iterator[Flask]:
    app = create_test_app(database_uri, tmp_path / "instance")
    app.extensions["scoria"].handler("approval")(ask_then_work)
    app.extensions["scoria"].handler("email")(edit_then_send)
    app.extensions["scoria"].handler("elsewhere", executor="worker")(ask_then_work)
    yield app
    app.extensions["scoria"].storage(app).engine.dispose()


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each attempt of a one-statement transition wrote it."""
    attempts: list[bool] = []
    write = one_statement._write

    def observed(*args: Any) -> one_statement.Written | None:
        result = write(*args)
        attempts.append(result is not None)
        return result

    monkeypatch.setattr(one_statement, "_write", observed)
    return attempts


def approve(run_id: str) -> None:
    scoria.approve_run(run_id, decided_by="operator", note="fine")


def approve_then_resume(run_id: str) -> None:
    approve(run_id)
    scoria.resume_run(run_id)


def approve_and_resume(run_id: str) -> None:
    scoria.approve_run(run_id, decided_by="operator", resume=True)


def approve_by_id_and_resume(run_id: str) -> None:
    (pending,) = scoria.get_run_detail(run_id).approvals
    scoria.approve_run(run_id, decided_by="operator", approval_id=pending.id, resume=True)


def edit_and_resume(run_id: str) -> None:
    scoria.approve_run(
        run_id, decided_by="operator", arguments={"to": "team@example.com"}, resume=True
    )


SCENARIOS: dict[str, tuple[str, Callable[[str], None]]] = {
    "approve": ("approval", approve),
    "approve, then resume": ("approval", approve_then_resume),
    "approve and resume": ("approval", approve_and_resume),
    "approve by id and resume": ("approval", approve_by_id_and_resume),
    "edit and resume": ("email", edit_and_resume),
}


def history(app: Flask, run_id: str) -> dict[str, Any]:
    """Every stored row of the run, its ids and times replaced by what they stand for."""
    engine = app_state(app).storage.engine
    labels: dict[str, str] = {run_id: "run"}
    with engine.connect() as conn:
        rows = {
            table: [
                dict(row._mapping)
                for row in conn.execute(
                    sa.text(f"SELECT * FROM {table} WHERE {column} = :run ORDER BY {order}"),
                    {"run": uuid.UUID(run_id)},
                )
            ]
            for table, column, order in (
                ("scoria_runs", "id", "id"),
                ("scoria_steps", "run_id", "sequence"),
                ("scoria_approvals", "run_id", "requested_at"),
                ("scoria_events", "run_id", "sequence"),
            )
        }
    for table in ("scoria_steps", "scoria_approvals"):
        for index, row in enumerate(rows[table]):
            labels[str(row["id"])] = f"{table}[{index}]"

    def plain(value: Any) -> Any:
        if isinstance(value, uuid.UUID | str) and str(value) in labels:
            return labels[str(value)]
        if isinstance(value, datetime.datetime):
            return "a time"
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    def row_of(row: dict[str, Any]) -> dict[str, Any]:
        return {
            key: (value is not None if key in ("lease_token", "idempotency_key") else plain(value))
            for key, value in row.items()
        }

    return {table: [row_of(row) for row in table_rows] for table, table_rows in rows.items()}


def played(app: Flask, kind: str, scenario: Callable[[str], None]) -> dict[str, Any]:
    """Start a run that pauses, play ``scenario`` on it; its history and signals."""
    signals: list[tuple[str, dict[str, Any]]] = []

    def receiver(sender: Any, *, run: scoria.RunSummary, **extra: Any) -> None:
        signals.append((run.status, extra))

    with app.app_context():
        run = scoria.start_run(IDENTITY, initial_step={"kind": kind})
        for signal in SIGNALS:
            signal.connect(receiver, sender=app)
        try:
            scenario(run.run_id)
        finally:
            for signal in SIGNALS:
                signal.disconnect(receiver, sender=app)
    found = history(app, run.run_id)
    for _, extra in signals:
        if "approval" in extra:
            extra["approval"] = {**extra["approval"], "approval_id": "the approval"}
    return {"rows": found, "signals": signals}


@pytest.mark.parametrize("name", SCENARIOS)
def test_one_statement_writes_what_the_transaction_writes(
    app: Flask, written: list[bool], name: str
) -> None:
    kind, scenario = SCENARIOS[name]
    storage = app_state(app).storage
    assert storage.pipelines, "psycopg on libpq 14+"
    fast = played(app, kind, scenario)
    assert written and all(written), written

    written.clear()
    storage.pipelines = False
    general = played(app, kind, scenario)
    assert written == []

    assert fast == general
    (run,) = fast["rows"]["scoria_runs"]
    assert run["status"] == ("waiting_for_approval" if name == "approve" else "completed")


FALLBACKS = {
    "already decided": (
        "approval",
        lambda run_id: (approve(run_id), approve(run_id)),
        scoria.ApprovalAlreadyDecided,
    ),
    "another tenant's run": (
        "approval",
        lambda run_id: scoria.approve_run(run_id, decided_by="operator", tenant_id="tenant-2"),
        scoria.RunNotFound,
    ),
    "edits on an approval that is not editable": (
        "approval",
        lambda run_id: scoria.approve_run(run_id, decided_by="operator", arguments={"a": 1}),
        scoria.InvalidDecision,
    ),
    "an approval that names another run": (
        "approval",
        lambda run_id: scoria.approve_run(
            run_id, decided_by="operator", approval_id=str(uuid.uuid4())
        ),
        scoria.NoPendingApproval,
    ),
    "a resume before the decision": (
        "approval",
        scoria.resume_run,
        scoria.ApprovalPending,
    ),
}


@pytest.mark.parametrize("name", FALLBACKS)
def test_a_statement_that_writes_nothing_leaves_the_error_to_the_transaction(
    app: Flask, written: list[bool], name: str
) -> None:
    kind, call, error = FALLBACKS[name]
    with app.app_context():
        run = scoria.start_run(IDENTITY, initial_step={"kind": kind})
        before = history(app, run.run_id)
        with pytest.raises(error):
            call(run.run_id)
        assert written[-1] is False
        if name != "already decided":
            assert history(app, run.run_id) == before


def test_a_step_that_runs_elsewhere_is_queued_by_the_transaction(
    app: Flask, written: list[bool]
) -> None:
    with app.app_context():
        run = scoria.start_run(IDENTITY, initial_step={"kind": "elsewhere"})
        (done,) = scoria.dispatch_queued()
        assert done.status == "waiting_for_approval"
        resumed = scoria.approve_run(run.run_id, decided_by="operator", resume=True)
        assert written == [False]
        assert resumed.status == "running"
        assert scoria.get_run_detail(run.run_id).steps[0].status == "queued"
        assert scoria.dispatch_queued()[0].status == "completed"


def test_an_expired_approval_is_recorded_by_the_transaction(
    app: Flask, written: list[bool]
) -> None:
    app.extensions["scoria"].handler("brief")(
        lambda step, run: WaitForApproval("publish", expires_in=0.05)
    )
    with app.app_context():
        run = scoria.start_run(IDENTITY, initial_step={"kind": "brief"})
        deadline = scoria.get_run_detail(run.run_id).approvals[0].expires_at
        assert deadline is not None
        while datetime.datetime.now(datetime.UTC) <= deadline:
            pass
        with pytest.raises(scoria.ScoriaError) as raised:
            scoria.approve_run(run.run_id, decided_by="operator")
        assert written == [False]
        assert raised.value.code == "no_pending_approval"
        assert scoria.get_run_detail(run.run_id).approvals[0].status == "expired"
