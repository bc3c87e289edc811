"""Does one tenant's approvals inbox slow down as other tenants' pending approvals grow?

For each N, a fresh database gets N runs of other tenants, each paused on a
pending approval (plain INSERTs), and one paused run of the operator's tenant
through the facade; then, with and without ``ANALYZE``, the inbox is timed
with the Flask test client (as ``operator_pages.py`` does). Run by hand:

    .venv/bin/python bench/inbox_tenants.py                    # SQLite and PostgreSQL
    .venv/bin/python bench/inbox_tenants.py --sizes 0 100000 --backends sqlite
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask

import flask_scoria as scoria
from flask_scoria import Scoria, WaitForApproval
from flask_scoria.runtime.tables import approvals, runs, steps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from databases import database
from operator_pages import time_ordered_id, timed


def ask(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    return WaitForApproval("publish", {"env": "prod"})


def paused_rows(index: int, moment: datetime) -> tuple[dict[str, Any], ...]:
    """A run of another tenant, its step and its pending approval, as rows to insert."""
    run_id, step_id = time_ordered_id(moment), uuid.uuid4()
    tenant = f"other-{index % 5}"
    run = {
        **dict.fromkeys(("completed_at", "idempotency_key")),
        "id": run_id,
        "session_id": "s",
        "actor_id": "a",
        "tenant_id": tenant,
        "root_role_id": "executor",
        "status": "waiting_for_approval",
        "version": 2,
        "last_event_sequence": 0,
        "last_step_sequence": 1,
        "current_step_id": step_id,
        "metadata": {},
        "created_at": moment,
        "started_at": moment,
        "updated_at": moment,
    }
    step = {
        **dict.fromkeys(
            (
                *("parent_step_id", "handoff_input", "projected_context", "result_envelope"),
                *("error_envelope", "lease_token", "lease_expires_at", "completed_at"),
                *("input", "not_before", "trace_context"),
            )
        ),
        "id": step_id,
        "run_id": run_id,
        "sequence": 1,
        "kind": "ask",
        "role_id": "executor",
        "status": "waiting_for_approval",
        "attempt": 1,
        "started_at": moment,
    }
    approval = {
        **dict.fromkeys(
            ("arguments", "reason", "decided_by", "decided_at", "note", "edited_arguments")
        ),
        "id": uuid.uuid4(),
        "run_id": run_id,
        "step_id": step_id,
        "status": "pending",
        "tool_name": "publish",
        "requested_at": moment,
        "editable": False,
        "expires_at": None,
        "tenant_id": tenant,
    }
    return run, step, approval


def inbox_ms(uri: str, others: int, analyze: bool, workdir: Path) -> float:
    engine = sa.create_engine(uri)
    start = datetime.now(UTC) - timedelta(days=1)
    rows = [paused_rows(index, start + timedelta(milliseconds=index)) for index in range(others)]
    if rows:
        with engine.begin() as conn:
            for table, column in zip(
                (runs, steps, approvals), zip(*rows, strict=True), strict=True
            ):
                conn.execute(table.insert(), list(column))
    app = Flask("bench", instance_path=str(workdir))
    app.config.update(SECRET_KEY="bench", SCORIA_DATABASE_URI=uri)
    Scoria(app).operator_scope(lambda: {"tenant_id": "mine", "actor_id": "ops"})
    with app.app_context():
        scoria.start_run({"tenant_id": "mine"}, initial_step={"kind": "ask"}, handlers={"ask": ask})
    if analyze:
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    try:
        return timed(app.test_client(), "/scoria/approvals")
    finally:
        app.extensions["scoria"].storage(app).engine.dispose()
        engine.dispose()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 10_000, 100_000])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            for analyze in (False, True):
                for size in args.sizes:
                    with database(backend, Path(tmp)) as uri:
                        ms = inbox_ms(uri, size, analyze, Path(tmp))
                    print(
                        f"{backend:10} ANALYZE {'yes' if analyze else 'no '}"
                        f"  others' pending {size:>7}: {ms:.2f} ms"
                    )


if __name__ == "__main__":
    main(sys.argv[1:])
