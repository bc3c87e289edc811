"""Time and size of one run's operator page as the run grows.

Builds, on a fresh database, a one-step run through the facade, then grows
copies of it with plain INSERTs: 1,000 steps and 10,000 events; 100,000
events; a chain of 10,000 delegated steps (each handing off to the next, with
a 1 KiB projected context). Times GET of each run's page with the Flask test
client (median of the requests, the runs taking turns) and prints its bytes and the ratio to the
one-step run, measured in the same process minutes apart. For comparison it
also times ``get_run_detail`` (which reads everything), what the page read
before it was bounded. Run by hand:

    .venv/bin/python bench/run_page.py                      # SQLite and PostgreSQL
    .venv/bin/python bench/run_page.py --backends sqlite --repeat 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask
from operator_pages import backend_uri

import flask_scoria as scoria
from flask_scoria import Scoria, Succeed, schema
from flask_scoria.runtime import tables

TENANT = "bench"
CHUNK = 5_000
SHAPES = {
    "one step": (0, 0, False),
    "1,000 steps + 10,000 events": (999, 10_000, False),
    "100,000 events": (0, 100_000, False),
    "10,000-step handoff chain": (10_000, 0, True),
}


def done(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    return Succeed({"answer": "42", "tokens": 812})


def chunks(count: int, make: Callable[[int], dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for first in range(0, count, CHUNK):
        yield [make(index) for index in range(first, min(first + CHUNK, count))]


def grow(engine: sa.Engine, run_id: str, steps: int, events: int, chain: bool) -> None:
    """Append ``steps`` steps (each delegated by the one before, if ``chain``) and ``events``."""
    key = uuid.UUID(run_id)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        run = conn.execute(tables.runs.select().where(tables.runs.c.id == key)).one()
        root = conn.execute(tables.steps.select().where(tables.steps.c.run_id == key)).one()
    ids = [root.id, *(uuid.uuid4() for _ in range(steps))]
    first_event = run.last_event_sequence + 1

    def step(index: int) -> dict[str, Any]:
        return {
            "id": ids[index + 1],
            "run_id": key,
            "parent_step_id": ids[index] if chain else None,
            "sequence": index + 2,
            "kind": "work",
            "role_id": "executor",
            "status": "completed",
            "attempt": 1,
            "handoff_input": {"depth": index} if chain else None,
            "result_envelope": {"answer": f"part {index}", "tokens": 812},
            "started_at": now,
            "completed_at": now,
        }

    def event(index: int) -> dict[str, Any]:
        return {
            "run_id": key,
            "sequence": first_event + index,
            "event_type": "step_completed",
            "step_id": ids[index % len(ids)],
            "payload": {"tokens": 812, "latency_ms": 940},
            "created_at": now + timedelta(microseconds=index),
        }

    def handoff(index: int) -> dict[str, Any]:
        return {
            "id": uuid.uuid4(),
            "run_id": key,
            "parent_step_id": ids[index],
            "child_step_id": ids[index + 1],
            "delegated_role_id": "executor",
            "delegated_kind": "work",
            "capability_tags": ["read-only"],
            "handoff_input": {"depth": index},
            "projected_context": {"brief": "c" * 1024, "depth": index},
            "created_at": now + timedelta(microseconds=index),
        }

    with engine.begin() as conn:
        for table, count, make in (
            (tables.steps, steps, step),
            (tables.events, events, event),
            (tables.handoffs, steps if chain else 0, handoff),
        ):
            for rows in chunks(count, make):
                conn.execute(table.insert(), rows)
        conn.execute(
            tables.runs.update()
            .where(tables.runs.c.id == key)
            .values(
                last_step_sequence=steps + 1,
                last_event_sequence=run.last_event_sequence + events,
            )
        )
        conn.exec_driver_sql("ANALYZE")


def median_ms(calls: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """The median time of each call, taking turns so that all see the same minutes."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for turn in range(repeat + 1):
        for name, call in calls.items():
            began = time.perf_counter()
            call()
            if turn:  # the first turn warms up
                samples[name].append(time.perf_counter() - began)
    return {name: statistics.median(times) * 1000 for name, times in samples.items()}


def measure(uri: str, workdir: Path, repeat: int) -> dict[str, tuple[float, int, float]]:
    """For each shape: page ms, page bytes, ``get_run_detail`` ms."""
    engine = sa.create_engine(uri)
    schema.upgrade(engine)
    app = Flask("bench", instance_path=str(workdir / "instance"))
    app.config.update(SECRET_KEY="bench", SCORIA_DATABASE_URI=uri)
    runtime = Scoria(app)
    runtime.operator_scope(lambda: {"tenant_id": TENANT, "actor_id": "ops"})
    who = scoria.identity({"tenant_id": TENANT, "session_id": "s-1", "actor_id": "ops"})
    run_ids = {}
    for shape, (steps, events, chain) in SHAPES.items():
        with app.app_context():
            run_ids[shape] = scoria.start_run(
                who, initial_step={"kind": "work"}, handlers={"work": done}
            ).run_id
        began = time.perf_counter()
        grow(engine, run_ids[shape], steps, events, chain)
        print(f"  {shape}: loaded in {time.perf_counter() - began:.1f} s", file=sys.stderr)
    client = app.test_client()
    urls = {shape: f"/scoria/workflows/{run_id}" for shape, run_id in run_ids.items()}
    sizes = {}
    for shape, url in urls.items():
        response = client.get(url)
        assert response.status_code == 200, url
        sizes[shape] = len(response.data)
    pages = median_ms({shape: partial(client.get, url) for shape, url in urls.items()}, repeat)
    with app.app_context():
        reads = median_ms(
            {shape: partial(scoria.get_run_detail, run_id) for shape, run_id in run_ids.items()},
            3,
        )
    figures = {shape: (pages[shape], sizes[shape], reads[shape]) for shape in run_ids}
    runtime.storage(app).engine.dispose()
    engine.dispose()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    for backend in args.backends:
        with tempfile.TemporaryDirectory() as tmp:
            uri, cleanup = backend_uri(backend, Path(tmp), 0)
            try:
                figures = measure(uri, Path(tmp), args.repeat)
            finally:
                if cleanup:
                    cleanup()
        base_ms, base_bytes, _ = figures["one step"]
        print(f"\n{backend}: run page, median of {args.repeat} requests")
        print(f"  {'run':<30}{'ms':>9}{'ratio':>8}{'bytes':>11}{'get_run_detail ms':>19}")
        for shape, (page_ms, size, detail_ms) in figures.items():
            ratio = page_ms / base_ms
            print(f"  {shape:<30}{page_ms:>9.2f}{ratio:>8.2f}{size:>11,}{detail_ms:>19.1f}")
        print(f"  (one-step page: {base_bytes:,} bytes)")


if __name__ == "__main__":
    main()
