"""The app that the worker and Celery processes of the background tests run.

Configured from the environment, so that ``flask --app _background`` and
``celery -A _celeryapp`` build the same app as the test that starts them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from _helpers import block_then_count, blocking_handler, counting_handler, counting_once_approved
from conftest import create_test_app
from flask import Flask

from flask_scoria import Next, Retry, RunSummary, StepView


def in_a_task(step: StepView, run: RunSummary) -> Next:
    """Go on with a step of ``in_another_task``, saying which Celery task ran this one."""
    from celery import current_task

    return Next("in_another_task", {"first_task": current_task.request.id})


def in_another_task(step: StepView, run: RunSummary) -> dict[str, Any]:
    """Say which Celery task ran this step, and which ran the one before."""
    from celery import current_task

    return {"first_task": step.input["first_task"], "task": current_task.request.id}


def timed_then_inline(step: StepView, run: RunSummary) -> Next:
    """A step with a timeout of one second, going on with a longer ``inline`` one."""
    from celery import current_task

    return Next("slow_inline", {"first_task": current_task.request.id})


def slow_inline(step: StepView, run: RunSummary) -> dict[str, Any]:
    """Take longer than the step before may, then say which Celery task ran this one."""
    from celery import current_task

    time.sleep(2.5)
    return {"first_task": step.input["first_task"], "task": current_task.request.id}


def to_a_gate(step: StepView, run: RunSummary) -> Next:
    """Go on, a second later, with a step of the ``inline`` kind ``gate``."""
    return Next("gate", delay=1)


def gate(step: StepView, run: RunSummary) -> dict[str, Any]:
    """Say which Celery task ran this step."""
    from celery import current_task

    return {"task": current_task.request.id}


def to_a_flaky_gate(step: StepView, run: RunSummary) -> Next:
    """Go on at once with a step of the ``inline`` kind ``flaky_gate``."""
    return Next("flaky_gate")


def flaky_gate(step: StepView, run: RunSummary) -> dict[str, Any]:
    """Fail the first attempt; the retry says which Celery task ran it."""
    from celery import current_task

    if step.attempt == 1:
        raise ConnectionError("the model timed out")
    return {"task": current_task.request.id, "attempt": step.attempt}


def sleepy(step: StepView, run: RunSummary) -> None:
    """Sleep past the kind's timeout of one second."""
    time.sleep(10)


def noop(step: StepView, run: RunSummary) -> None:
    return None


def export_spans_to(path: str) -> None:
    """Record this process's spans as JSON lines in ``path`` (OpenTelemetry's SDK)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class JSONLines(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            with open(path, "a") as out:
                for span in spans:
                    out.write(json.dumps(_span_record(span)) + "\n")
            return SpanExportResult.SUCCESS

    def _span_record(span: ReadableSpan) -> dict[str, Any]:
        context, parent = span.get_span_context(), span.parent
        return {
            "name": span.name,
            "trace_id": f"{context.trace_id:032x}",
            "parent_id": None if parent is None else f"{parent.span_id:016x}",
            "attributes": dict(span.attributes or {}),
            "pid": os.getpid(),
        }

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JSONLines()))
    trace.set_tracer_provider(provider)


def celery_init_app(app: Flask) -> Any:
    """Flask's documented way to build a Celery app for a Flask app."""
    from celery import Celery, Task

    class FlaskTask(Task):  # type: ignore[misc]
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def create_app(database_uri: str | None = None, **config: Any) -> Flask:
    """The test app: handlers ``count``, ``block`` (retried once), ``approved``, ``noop``,
    ``block_then_count``, the two steps ``in_a_task`` and ``in_another_task``,
    ``sleepy`` (with a timeout), and ``timed_then_inline`` (with a timeout) leading to
    ``slow_inline`` (executor ``inline``)."""
    env = os.environ
    broker = config.pop("broker", env.get("SCORIA_TEST_BROKER"))
    settings = {
        "SCORIA_EXECUTOR": env.get("SCORIA_TEST_EXECUTOR", "worker"),
        "SCORIA_STEP_LEASE_SECONDS": float(env.get("SCORIA_TEST_LEASE", "300")),
        **config,
    }
    if broker:
        settings["CELERY"] = {
            "broker_url": broker,
            "task_ignore_result": True,
            "worker_prefetch_multiplier": 1,
            "broker_connection_retry_on_startup": True,
            "task_default_queue": env.get("SCORIA_TEST_QUEUE", "celery"),
        }
    app = create_test_app(
        database_uri or env["SCORIA_TEST_DATABASE"],
        Path(env.get("SCORIA_TEST_INSTANCE", "instance")).resolve(),
        **settings,
    )
    runtime = app.extensions["scoria"]
    runtime.handler("count")(counting_handler)
    runtime.handler("block", retry=Retry(attempts=2, delay=0))(blocking_handler)
    runtime.handler("approved")(counting_once_approved)
    runtime.handler("noop")(noop)
    runtime.handler("block_then_count")(block_then_count)
    runtime.handler("in_a_task")(in_a_task)
    runtime.handler("in_another_task")(in_another_task)
    runtime.handler("sleepy", timeout=1.0)(sleepy)
    runtime.handler("timed_then_inline", timeout=1.0)(timed_then_inline)
    runtime.handler("slow_inline", executor="inline")(slow_inline)
    runtime.handler("to_a_gate")(to_a_gate)
    runtime.handler("gate", executor="inline")(gate)
    runtime.handler("to_a_flaky_gate")(to_a_flaky_gate)
    retry_later = Retry(attempts=2, delay=6, jitter=False)  # past the call's wait
    runtime.handler("flaky_gate", executor="inline", retry=retry_later)(flaky_gate)
    if broker:
        celery_init_app(app)
    if env.get("SCORIA_TEST_SPANS"):
        export_spans_to(env["SCORIA_TEST_SPANS"])
    return app
