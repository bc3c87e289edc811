"""Celery tasks that execute queued steps: ``pip install "flask-scoria[celery]"``.

Importing this module registers two tasks on every Celery app, including
those created later (Celery's ``shared_task``): ``flask_scoria.run_step``,
which executes one queued step, and ``flask_scoria.recover``, meant for
Celery beat. ``Scoria`` imports it when ``SCORIA_EXECUTOR`` is ``"celery"``
or a handler is registered with ``executor="celery"``. Each task finds the
Flask app whose ``app.extensions["celery"]`` is the task's Celery app (as
Flask's ``celery_init_app`` sets it; keep a reference to that Flask app) and
runs in a fresh app context of it.
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task
from flask import Flask, current_app, has_app_context

from .runtime import RUN_STEP_TASK, execute_step, recover_expired_leases, resend_due_celery_steps
from .state import registered_apps


def flask_app_of(task: Task) -> Flask:
    """The Flask app whose ``extensions["celery"]`` is the Celery app of ``task``.

    Under Flask's ``FlaskTask`` the task already runs in that app's context.
    """
    if has_app_context() and current_app.extensions.get("celery") is task.app:
        return current_app._get_current_object()  # type: ignore[attr-defined,no-any-return]
    for app in registered_apps():
        if app.extensions.get("celery") is task.app:
            return app
    raise RuntimeError(
        "No Flask app with flask-scoria has this Celery app in app.extensions['celery'];"
        " build it with celery_init_app(app) as Flask's documentation shows."
    )


@shared_task(name=RUN_STEP_TASK, bind=True, acks_late=True, ignore_result=True)
def run_step(self: Task, run_id: str, step_id: str) -> str | None:
    """Claim and execute one queued step; a step claimed elsewhere is left alone."""
    with flask_app_of(self).app_context():
        run = execute_step(run_id, step_id)
    return None if run is None else str(run.status)


@shared_task(name="flask_scoria.recover", bind=True, ignore_result=True)
def recover(self: Task, resend_after: float = 60.0) -> dict[str, Any]:
    """Retry or fail steps past their lease or timeout; send due Celery steps again.

    A step queued for Celery whose due time passed more than
    ``resend_after`` seconds ago is sent again (its send may have been lost,
    or its delay was longer than a countdown should be); the task's
    compare-and-set makes a repeated send harmless.
    """
    with flask_app_of(self).app_context():
        recovered = recover_expired_leases()
        resent = resend_due_celery_steps(resend_after)
    return {"recovered": recovered, "resent": resent}
