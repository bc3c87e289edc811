"""Render time of the operator pages as the runs table grows.

Bulk-loads N runs with plain INSERTs (90% in the operator's tenant; N/100
sessions and actors, 1 in 13 failed, 1 in 50 with a second root role, so every
filtered page is full at any N), adds one run with an approval pause through
the facade, then times GET of that run's page, the runs list, its second page,
the list filtered by each column, a session page and the approvals inbox with
the Flask test client. Prints the median per page and the large/small ratio.
Run by hand:

    .venv/bin/python bench/operator_pages.py                 # 10k and 1M, both backends
    .venv/bin/python bench/operator_pages.py --sizes 10000 100000 --backends sqlite
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask

import flask_scoria as scoria
from flask_scoria import Scoria, Succeed, WaitForApproval, schema
from flask_scoria.runtime.tables import runs

POSTGRES_URL = os.environ.get(
    "SCORIA_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
TENANT = "bench"
CHUNK = 20_000
REPEAT = 30


def ask(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    if step.approval is None:
        return WaitForApproval("publish", {"env": "prod"}, reason="bench")
    return Succeed({"ok": True})


def time_ordered_id(moment: datetime) -> uuid.UUID:
    millis = int(moment.timestamp() * 1000)
    tail = int.from_bytes(os.urandom(10), "big") & ((1 << 80) - 1)
    value = (millis << 80) | tail
    value = (value & ~(0xF << 76)) | (0x7 << 76)
    value = (value & ~(0b11 << 62)) | (0b10 << 62)
    return uuid.UUID(int=value)


def load_runs(engine: sa.Engine, count: int) -> float:
    """Insert ``count`` finished runs, oldest first; return the seconds it took."""
    began = time.perf_counter()
    start = datetime.now(UTC) - timedelta(days=30)
    groups = max(count // 100, 1)
    done = 0
    while done < count:
        rows = []
        for index in range(done, min(done + CHUNK, count)):
            moment = start + timedelta(milliseconds=index)
            tenant = TENANT if index % 10 else f"other-{index % 7}"
            rows.append(
                {
                    "id": time_ordered_id(moment),
                    "session_id": f"s-{index % groups}",
                    "actor_id": f"user-{index % groups}",
                    "tenant_id": tenant,
                    "root_role_id": "reviewer" if index % 50 == 7 else "executor",
                    "status": "completed" if index % 13 else "failed",
                    "version": 3,
                    "last_event_sequence": 0,
                    "last_step_sequence": 0,
                    "current_step_id": None,
                    "metadata": {"payload": {"prompt": f"question {index}"}},
                    "created_at": moment,
                    "started_at": moment,
                    "completed_at": moment + timedelta(milliseconds=400),
                    "updated_at": moment + timedelta(milliseconds=400),
                }
            )
        with engine.begin() as conn:
            conn.execute(runs.insert(), rows)
        done += len(rows)
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    return time.perf_counter() - began


def timed(client: Any, url: str) -> float:
    for _ in range(3):
        assert client.get(url).status_code == 200, url
    samples = []
    for _ in range(REPEAT):
        began = time.perf_counter()
        response = client.get(url)
        samples.append(time.perf_counter() - began)
        assert response.status_code == 200, url
    return statistics.median(samples) * 1000


def next_page(client: Any, query: str) -> str:
    first = client.get(f"/scoria/workflows{query}").get_data(as_text=True)
    return str(first.split('rel="next" href="')[1].split('"')[0].replace("&amp;", "&"))


def measure(uri: str, size: int, workdir: Path) -> dict[str, float]:
    engine = sa.create_engine(uri)
    schema.upgrade(engine)
    loaded = load_runs(engine, size)
    engine.dispose()
    app = Flask("bench", instance_path=str(workdir / "instance"))
    app.config.update(SECRET_KEY="bench", SCORIA_DATABASE_URI=uri)
    runtime = Scoria(app)
    runtime.operator_scope(lambda: {"tenant_id": TENANT, "actor_id": "ops"})
    with app.app_context():
        who = scoria.identity({"tenant_id": TENANT, "session_id": "s-1", "actor_id": "ops"})
        run_id = scoria.start_run(who, initial_step={"kind": "x"}, handlers={"x": ask}).run_id
    client = app.test_client()
    after = next_page(client, "")
    day = (datetime.now(UTC) - timedelta(days=30)).date()
    figures = {
        "run page": timed(client, f"/scoria/workflows/{run_id}"),
        "runs list": timed(client, "/scoria/workflows"),
        "runs list, page 2": timed(client, after),
        "runs list, by actor": timed(client, "/scoria/workflows?actor=user-7"),
        "runs list, by status": timed(client, "/scoria/workflows?status=failed"),
        "runs list, by role": timed(client, "/scoria/workflows?role=reviewer"),
        "by status, page 2": timed(client, next_page(client, "?status=failed")),
        "by actor and session": timed(client, "/scoria/workflows?actor=user-7&session=s-7"),
        "search: prompt": timed(client, "/scoria/workflows?prompt=question+77"),
        "search: run id prefix": timed(client, f"/scoria/workflows?id={run_id[:6]}"),
        "search: one day": timed(client, f"/scoria/workflows?from={day}&until={day}"),
        "session page": timed(client, "/scoria/sessions/s-1"),
        "approvals inbox": timed(client, "/scoria/approvals"),
    }
    runtime.storage(app).engine.dispose()
    print(f"  loaded {size:,} runs in {loaded:.1f} s", file=sys.stderr)
    return figures


def backend_uri(backend: str, workdir: Path, size: int) -> tuple[str, Any]:
    if backend == "sqlite":
        return f"sqlite:///{workdir / f'bench-{size}.sqlite3'}", None
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"scoria_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    url = sa.make_url(POSTGRES_URL).set(database=name)
    return url.render_as_string(hide_password=False), drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[10_000, 1_000_000])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    args = parser.parse_args()
    small, large = args.sizes
    for backend in args.backends:
        results = {}
        for size in (small, large):
            with tempfile.TemporaryDirectory() as tmp:
                uri, cleanup = backend_uri(backend, Path(tmp), size)
                try:
                    results[size] = measure(uri, size, Path(tmp))
                finally:
                    if cleanup:
                        cleanup()
        print(f"\n{backend}: median ms per request ({REPEAT} requests)")
        print(f"  {'page':<22}{small:>12,}{large:>12,}{'ratio':>8}")
        for page in results[small]:
            a, b = results[small][page], results[large][page]
            print(f"  {page:<22}{a:>12.2f}{b:>12.2f}{b / a:>8.2f}")


if __name__ == "__main__":
    main()
