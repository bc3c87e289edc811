"""The small app ``test_chaos.py`` serves with gunicorn: start, approve, resume, read.

Its database comes from ``CHAOS_DATABASE_URI``. The ``work`` handler asks for
approval, then, once approved, records one side effect per execution in
``chaos_effects`` (on a connection of its own), so that the test can count
them per step and attempt.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import psycopg
from flask import Flask, jsonify

import flask_scoria as scoria
from flask_scoria import Scoria, WaitForApproval

LEASE_SECONDS = 2.0


def record_effect(step: scoria.StepView) -> None:
    url = os.environ["CHAOS_DATABASE_URI"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            "INSERT INTO chaos_effects (step_id, attempt, pid) VALUES (%s, %s, %s)",
            (step.idempotency_key, step.attempt, os.getpid()),
        )


def work(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    if step.approval is None:
        return WaitForApproval("publish", {"run": run.run_id})
    time.sleep(random.uniform(0, 0.05))  # widen the window between the work and its outcome
    record_effect(step)
    return {"done": True, "attempt": step.attempt}


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="chaos",
        SCORIA_DATABASE_URI=os.environ["CHAOS_DATABASE_URI"],
        SCORIA_STEP_LEASE_SECONDS=LEASE_SECONDS,
        SCORIA_CONNECT_TIMEOUT=5,
        SCORIA_STATEMENT_TIMEOUT=10,
    )
    runtime = Scoria(app)
    runtime.handler("work")(work)

    @app.errorhandler(scoria.ScoriaError)
    def scoria_error(exc: scoria.ScoriaError) -> Any:
        status = 503 if isinstance(exc, scoria.StorageError) else 409
        run_id = getattr(exc, "run_id", None)
        return jsonify(code=exc.code, run_id=run_id if isinstance(run_id, str) else None), status

    @app.post("/runs")
    def start() -> Any:
        run = scoria.start_run(
            {"actor_id": "load", "tenant_id": "chaos", "session_id": "chaos"},
            initial_step={"kind": "work"},
        )
        return jsonify(run_id=run.run_id, status=run.status), 201

    @app.post("/runs/<run_id>/approve")
    def approve(run_id: str) -> Any:
        run = scoria.approve_run(run_id, decided_by=f"pid-{os.getpid()}")
        return jsonify(run_id=run.run_id, status=run.status)

    @app.post("/runs/<run_id>/resume")
    def resume(run_id: str) -> Any:
        run = scoria.resume_run(run_id)
        return jsonify(run_id=run.run_id, status=run.status)

    @app.get("/runs/<run_id>")
    def read(run_id: str) -> Any:
        run = scoria.get_run(run_id)
        return jsonify(run_id=run.run_id, status=run.status)

    return app
