"""OpenTelemetry: the span of a step joins the trace of the request that queued it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _background import create_app
from conftest import REDIS_URL, create_test_app, require_service
from flask import Flask
from test_background_celery import CeleryRig
from test_background_worker import WHO, Processes, process_env, stop, wait_for

import flask_scoria as scoria

pytest.importorskip("opentelemetry.sdk")
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """The spans this process records (a tracer provider can be set once per process)."""
    found = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(found))
    trace.set_tracer_provider(provider)
    return found


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    exporter.clear()
    yield exporter
    exporter.clear()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    yield started
    started.stop_all()


def add_start_view(app: Flask, kind: str) -> None:
    @app.post("/start")
    def start() -> dict[str, Any]:
        with trace.get_tracer("host").start_as_current_span("POST /start"):
            run = scoria.start_run(WHO, initial_step={"kind": kind}, runtime={"metadata": {}})
        return {"run_id": run.run_id}


def request_trace(spans: InMemorySpanExporter) -> str:
    (request,) = [span for span in spans.get_finished_spans() if span.name == "POST /start"]
    return f"{request.context.trace_id:032x}"


def step_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [span for span in lines if span["name"] == "scoria.step"]


def test_an_inline_step_span_is_a_child_of_the_request(
    app: Flask, runtime: scoria.Scoria, spans: InMemorySpanExporter
) -> None:
    runtime.handler("noop")(lambda step, run: None)
    add_start_view(app, "noop")
    app.test_client().post("/start")
    (step,) = [span for span in spans.get_finished_spans() if span.name == "scoria.step"]
    (request,) = [span for span in spans.get_finished_spans() if span.name == "POST /start"]
    assert step.parent is not None and step.parent.span_id == request.context.span_id
    assert dict(step.attributes or {}) == {
        "scoria.run_id": dict(step.attributes or {})["scoria.run_id"],
        "scoria.step.kind": "noop",
        "scoria.step.attempt": 1,
        "scoria.step.status": "completed",
    }


def test_the_steps_a_request_executes_are_its_children(
    app: Flask, runtime: scoria.Scoria, spans: InMemorySpanExporter
) -> None:
    """Retried attempts executed inline, and a step resumed in a later request: each is a
    child of the request that executes it, not of an earlier attempt or request."""

    def flaky(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        if step.attempt < 3:
            raise ConnectionError("model unavailable")
        return scoria.WaitForApproval("send") if step.approval is None else None

    runtime.handler("flaky", retry=scoria.Retry(attempts=3, delay=0.01))(flaky)
    tracer = trace.get_tracer("host")
    with app.app_context():
        with tracer.start_as_current_span("request A") as first:
            run = scoria.start_run(WHO, initial_step={"kind": "flaky"})
        with tracer.start_as_current_span("request B") as second:
            scoria.approve_run(run.run_id, decided_by="ops", resume=True)
    steps = [span for span in spans.get_finished_spans() if span.name == "scoria.step"]
    parents = [(span.parent.span_id if span.parent else None) for span in steps]
    a, b = first.get_span_context().span_id, second.get_span_context().span_id
    assert parents == [a, a, a, b]


def test_a_delayed_next_step_is_queued_once_while_a_trace_is_recorded(
    app: Flask, runtime: scoria.Scoria, spans: InMemorySpanExporter
) -> None:
    runtime.handler("first")(lambda step, run: scoria.Next("later", delay=60))
    runtime.handler("later")(lambda step, run: None)
    add_start_view(app, "first")
    run_id = app.test_client().post("/start").get_json()["run_id"]
    with app.app_context():
        detail = scoria.get_run_detail(run_id)
    queued = [event for event in detail.events if event.event_type == "step_queued"]
    assert len(queued) == 1 and queued[0].step_id == detail.steps[-1].id
    assert detail.steps[-1].status == "queued"


def test_each_step_a_worker_executes_in_a_row_continues_the_request_trace(
    database_uri: str, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    app = create_test_app(database_uri, tmp_path / "instance", SCORIA_EXECUTOR="worker")
    runtime = app.extensions["scoria"]
    runtime.handler("chain")(lambda step, run: scoria.Next("quick"))
    runtime.handler("quick")(lambda step, run: None)
    add_start_view(app, "chain")
    app.test_client().post("/start")
    with app.app_context():
        (done,) = scoria.dispatch_queued()  # as a worker: both steps, one after the other
    assert done.status == "completed"
    (request,) = [span for span in spans.get_finished_spans() if span.name == "POST /start"]
    steps = [span for span in spans.get_finished_spans() if span.name == "scoria.step"]
    assert [dict(span.attributes or {})["scoria.step.kind"] for span in steps] == [
        "chain",
        "quick",
    ]
    for span in steps:
        assert span.context.trace_id == request.context.trace_id
        assert span.parent is not None and span.parent.span_id == request.context.span_id
    runtime.storage(app).engine.dispose()


def test_a_worker_process_continues_the_request_trace(
    database_uri: str, tmp_path: Path, processes: Processes, spans: InMemorySpanExporter
) -> None:
    app = create_app(database_uri)
    add_start_view(app, "noop")
    exported = tmp_path / "spans.jsonl"
    env = process_env(database_uri, tmp_path, SCORIA_TEST_SPANS=str(exported))
    worker = processes.worker(env, "--interval", "0.2")
    run_id = app.test_client().post("/start").json["run_id"]  # type: ignore[index]
    wait_for(lambda: bool(step_spans(exported)), 60, "the worker's step span")
    stop(worker)
    (step,) = step_spans(exported)
    assert step["trace_id"] == request_trace(spans)
    assert step["pid"] == worker.pid
    assert step["attributes"]["scoria.run_id"] == run_id
    assert step["attributes"]["scoria.step.status"] == "completed"
    app.extensions["scoria"].storage(app).engine.dispose()


def test_a_celery_task_continues_the_request_trace(
    database_uri: str, tmp_path: Path, processes: Processes, spans: InMemorySpanExporter
) -> None:
    exported = tmp_path / "spans.jsonl"
    rig = CeleryRig(
        database_uri, tmp_path, require_service(REDIS_URL), SCORIA_TEST_SPANS=str(exported)
    )
    add_start_view(rig.app, "noop")
    rig.worker(processes, concurrency=2)
    rig.app.test_client().post("/start")
    wait_for(lambda: bool(step_spans(exported)), 60, "the Celery task's step span")
    (step,) = step_spans(exported)
    assert step["trace_id"] == request_trace(spans)
    assert step["attributes"]["scoria.step.kind"] == "noop"
    rig.close()
