"""Approval round-trips per second, against the raw-driver floor measured in the same run.

One round-trip: start a run with an approval step -> it pauses -> approve ->
resume -> the step completes. The floor does the same two committed
transactions per round-trip that an approval flow minimally needs (create, then
finish) with plain ``sqlite3`` / ``psycopg``.

Usage::

    python bench/approval_roundtrip.py [--runs 500] [--backend sqlite|postgresql|all]

Figures worth comparing are the ratios printed at the end, measured in one run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

import flask_scoria as scoria
from flask_scoria import Scoria, schema

POSTGRES_URL = os.environ.get(
    "SCORIA_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
#: The ``synchronous`` level of every flow's SQLite connections; ``--no-flushes`` sets it
#: to ``OFF`` here, where the processes it spawns find it too. Unset, the CRUD keeps
#: SQLite's own default, as a hand-written app does.
SQLITE_SYNCHRONOUS = "SCORIA_BENCH_SQLITE_SYNCHRONOUS"
#: How many interleaved batches the round-trips are split into.
BATCHES = 10
#: Round-trips of each flow whose commits are counted, untimed.
COUNTED = 20
#: Bursts of round-trips, ``VACUUM`` after each, until the tables' growth settles.
SETTLING_BURSTS = 3
#: How a write statement starts.
WRITES = ("INSERT", "UPDATE", "DELETE", "WITH")
TABLES = ("scoria_runs", "scoria_steps", "scoria_approvals", "scoria_events", "scoria_handoffs")


def approval_step(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    """Ask for approval once; once approved, do the work."""
    if step.approval is not None and step.approval.status == "approved":
        return {"published": True}
    return scoria.WaitForApproval("publish", {"env": "prod"}, reason="bench")


def make_app(uri: str, engine_options: dict[str, Any] | None = None) -> Flask:
    app = Flask("bench", instance_path=tempfile.mkdtemp())
    app.config.update(
        SCORIA_DATABASE_URI=uri,
        SCORIA_SQLITE_SYNCHRONOUS=os.environ.get(SQLITE_SYNCHRONOUS, "FULL"),
    )
    if engine_options:
        app.config["SCORIA_ENGINE_OPTIONS"] = engine_options
    runtime = Scoria(app)
    runtime.handler("approval")(approval_step)
    return app


@dataclass
class Timings:
    start: list[float]
    resume: list[float]
    seconds: float
    commits: int


class ScoriaFlow:
    """Round-trips through the facade on one app, in as many batches as asked.

    ``fused`` approves with ``approve_run(resume=True)`` instead of approving,
    then calling ``resume_run``.
    """

    def __init__(
        self,
        uri: str,
        engine_options: dict[str, Any] | None = None,
        *,
        fused: bool = False,
        counting: bool = False,
    ) -> None:
        self.fused = fused
        self.app = make_app(uri, engine_options)
        self.engine = self.app.extensions["scoria"].storage(self.app).engine
        self.who = scoria.identity({"actor_id": "bench", "tenant_id": "t", "session_id": "s"})
        self.timings = Timings([], [], 0.0, 0)
        self.counting = counting
        if not counting:
            return
        # Counting costs the flow time the baselines do not spend: a flow counts, or is
        # timed. SQLAlchemy commits on SQLite; on PostgreSQL a COMMIT is a statement,
        # and a change that is one statement commits on its own.
        sa.event.listen(self.engine, "commit", self._count)
        if self.engine.dialect.name == "postgresql":
            self.engine.dispose()
            sa.event.listen(self.engine, "connect", self._count_commit_statements)

    def _count(self, *_: Any) -> None:
        self.timings.commits += 1

    def _count_commit_statements(self, dbapi_connection: Any, _record: Any) -> None:
        """Count each ``COMMIT``, and each write outside ``BEGIN``: a transaction of its own."""
        count = self._count
        in_transaction = [False]

        class Counting(dbapi_connection.cursor_factory):  # type: ignore[misc]
            def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
                text = str(query).lstrip().upper()
                if text.startswith("BEGIN"):
                    in_transaction[0] = True
                elif text in ("COMMIT", "ROLLBACK"):
                    in_transaction[0] = False
                    if text == "COMMIT":
                        count()
                elif text.startswith(WRITES) and not in_transaction[0]:
                    count()
                return super().execute(query, *args, **kwargs)

        dbapi_connection.cursor_factory = Counting

    @property
    def seconds(self) -> float:
        return self.timings.seconds

    def run(self, runs: int) -> None:
        timings = self.timings
        began = time.perf_counter()
        with self.app.app_context():
            for _ in range(runs):
                t0 = time.perf_counter()
                run = scoria.start_run(self.who, initial_step={"kind": "approval"})
                t1 = time.perf_counter()
                if self.fused:
                    t2 = t1
                    done = scoria.approve_run(run.run_id, decided_by="operator", resume=True)
                else:
                    scoria.approve_run(run.run_id, decided_by="operator")
                    t2 = time.perf_counter()
                    done = scoria.resume_run(run.run_id)
                t3 = time.perf_counter()
                assert done.status == "completed", done.status
                timings.start.append(t1 - t0)
                timings.resume.append(t3 - t2)
        timings.seconds += time.perf_counter() - began

    def close(self) -> None:
        if self.counting:
            sa.event.remove(self.engine, "commit", self._count)
        self.engine.dispose()


def scoria_roundtrips(uri: str, runs: int, *, fused: bool = False) -> Timings:
    """Do ``runs`` round-trips through the facade in this process, counting commits."""
    flow = ScoriaFlow(uri, fused=fused, counting=True)
    try:
        flow.run(runs)
    finally:
        flow.close()
    return flow.timings


def _scoria_worker(uri: str, runs: int, ready: Any, start: Any, finished: Any) -> None:
    """Warm up (imports, pool, caches), wait for the start, then time ``runs`` round-trips."""
    flow = ScoriaFlow(uri)
    try:
        flow.run(5)
        ready.put(True)
        start.wait()
        flow.run(runs)
        finished.put(time.monotonic())
    finally:
        flow.close()


class RawFlow:
    """The floor: two committed transactions per round-trip with the plain driver."""

    def __init__(self, uri: str) -> None:
        self.sqlite = uri.startswith("sqlite")
        if self.sqlite:
            self.conn: Any = sqlite3.connect(uri.removeprefix("sqlite:///"), isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            level = os.environ.get(SQLITE_SYNCHRONOUS, "FULL")
            self.conn.execute(f"PRAGMA synchronous={level}")
            param = "?"
        else:
            import psycopg

            self.conn = psycopg.connect(
                sa.make_url(uri).set(drivername="postgresql").render_as_string(False)
            )
            param = "%s"
        self.conn.execute("CREATE TABLE IF NOT EXISTS raw_runs (id TEXT PRIMARY KEY, status TEXT)")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS raw_steps (id TEXT PRIMARY KEY, run_id TEXT, status TEXT)"
        )
        self._commit()
        self.create = [
            f"INSERT INTO raw_runs VALUES ({param}, 'waiting')",
            f"INSERT INTO raw_steps VALUES ({param}, {param}, 'waiting')",
        ]
        self.finish = [
            f"UPDATE raw_runs SET status='completed' WHERE id={param}",
            f"UPDATE raw_steps SET status='completed' WHERE id={param}",
        ]
        self.seconds = 0.0

    def run(self, runs: int) -> None:
        began = time.perf_counter()
        for _ in range(runs):
            run_id, step_id = str(uuid.uuid4()), str(uuid.uuid4())
            self._tx([(self.create[0], (run_id,)), (self.create[1], (step_id, run_id))])
            self._tx([(self.finish[0], (run_id,)), (self.finish[1], (step_id,))])
        self.seconds += time.perf_counter() - began

    def _tx(self, statements: list[tuple[str, tuple[str, ...]]]) -> None:
        if self.sqlite:
            self.conn.execute("BEGIN IMMEDIATE")
        for sql, args in statements:
            self.conn.execute(sql, args)
        if self.sqlite:
            self.conn.execute("COMMIT")
        else:
            self.conn.commit()

    def _commit(self) -> None:
        if not self.sqlite:
            self.conn.commit()

    def close(self, drop: bool = True) -> None:
        """Close the connection; ``drop=False`` leaves the tables to another flow's close."""
        if drop:
            self.conn.execute("DROP TABLE raw_steps")
            self.conn.execute("DROP TABLE raw_runs")
            self._commit()
        self.conn.close()


class CrudFlow:
    """A hand-written Flask-SQLAlchemy CRUD flow: no events, no compare-and-set, no leases."""

    #: How its tables' names start, so that two CRUD flows can share a database.
    table_prefix = "crud"

    def __init__(self, uri: str, engine_options: dict[str, Any] | None = None) -> None:
        self.app = Flask("crud", instance_path=tempfile.mkdtemp())
        self.app.config["SQLALCHEMY_DATABASE_URI"] = uri
        if engine_options:
            self.app.config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options
        self.db = db = SQLAlchemy(self.app)
        self.define_models()
        with self.app.app_context():
            level = os.environ.get(SQLITE_SYNCHRONOUS)
            if level and db.engine.dialect.name == "sqlite":

                def set_level(dbapi_connection: Any, _record: Any) -> None:
                    dbapi_connection.execute(f"PRAGMA synchronous={level}")

                sa.event.listen(db.engine, "connect", set_level)
            db.create_all()
        self.seconds = 0.0

    def define_models(self) -> None:
        db, prefix = self.db, self.table_prefix

        class CrudRun(db.Model):  # type: ignore[name-defined,misc]
            __tablename__ = f"{prefix}_run"
            id: Mapped[str] = mapped_column(primary_key=True)
            status: Mapped[str]

        class CrudStep(db.Model):  # type: ignore[name-defined,misc]
            __tablename__ = f"{prefix}_step"
            id: Mapped[str] = mapped_column(primary_key=True)
            run_id: Mapped[str]
            status: Mapped[str]

        self.models = (CrudRun, CrudStep)

    def run(self, runs: int) -> None:
        with self.app.app_context():
            session = self.db.session
            began = time.perf_counter()
            for _ in range(runs):
                self.roundtrip(session)
            self.seconds += time.perf_counter() - began

    def roundtrip(self, session: Any) -> None:
        crud_run, crud_step = self.models
        run = crud_run(id=str(uuid.uuid4()), status="waiting")
        step = crud_step(id=str(uuid.uuid4()), run_id=run.id, status="waiting")
        session.add_all([run, step])
        session.commit()
        run.status = step.status = "completed"
        session.commit()

    def close(self) -> None:
        with self.app.app_context():
            self.db.drop_all()
            self.db.engine.dispose()


class ApprovalCrudFlow(CrudFlow):
    """The CRUD with the approval it skips: the three requests an approval flow has.

    The handler's request asks (run, step and a pending approval), the approver's
    request decides, the resuming request finishes: one commit each, as a Flask
    app whose approver is a person in another request must commit. Still no
    events, compare-and-set or leases.
    """

    table_prefix = "approval_crud"

    def define_models(self) -> None:
        super().define_models()
        db = self.db

        class CrudApproval(db.Model):  # type: ignore[name-defined,misc]
            __tablename__ = f"{self.table_prefix}_approval"
            id: Mapped[str] = mapped_column(primary_key=True)
            run_id: Mapped[str]
            step_id: Mapped[str]
            status: Mapped[str]
            decided_by: Mapped[str | None]

        self.approval_model = CrudApproval

    def roundtrip(self, session: Any) -> None:
        crud_run, crud_step = self.models
        run = crud_run(id=str(uuid.uuid4()), status="waiting_for_approval")
        step = crud_step(id=str(uuid.uuid4()), run_id=run.id, status="waiting")
        approval = self.approval_model(
            id=str(uuid.uuid4()), run_id=run.id, step_id=step.id, status="pending"
        )
        session.add_all([run, step, approval])
        session.commit()
        approval.status, approval.decided_by = "approved", "operator"
        session.commit()
        run.status = step.status = "completed"
        session.commit()


def split(total: int, parts: int) -> list[int]:
    """``total`` cut into ``parts`` near-equal whole numbers (the first ones one larger)."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def interleave(flows: Sequence[Any], runs: int, batches: int = BATCHES) -> list[float]:
    """Do ``runs`` round-trips with each flow, in interleaved batches.

    Each flow has ``run(n)``; batching them in turn lets every flow see the same
    minutes of a noisy machine, so the ratios of one call are comparable. The
    order turns by one flow each batch, so that no flow always follows the same
    one (and meets the work it left the database, a WAL flush or a vacuum).
    Returns the CPU seconds this process spent in each flow (the database
    server's not included): what is left of a flow's time is spent waiting for
    the database.
    """
    cpu = [0.0] * len(flows)
    for turn, batch in enumerate(split(runs, batches)):
        for offset in range(len(flows)):
            index = (turn + offset) % len(flows)
            began = time.process_time()
            flows[index].run(batch)
            cpu[index] += time.process_time() - began
    return cpu


def fresh_database(backend: str, workdir: Path, *, flushes: bool = True) -> tuple[str, Any]:
    """Create an empty, migrated database; return its URL and a cleanup function.

    Without ``flushes`` a PostgreSQL database commits without waiting for its WAL
    to reach the disk (``synchronous_commit = off``), for every flow alike: what
    the figures would be on a disk whose flushes cost nothing. (SQLite's level is
    set on each connection, see :data:`SQLITE_SYNCHRONOUS`.)
    """
    if backend == "sqlite":
        uri = f"sqlite:///{workdir / f'bench-{uuid.uuid4().hex[:6]}.sqlite3'}"
        engine = sa.create_engine(uri)
        schema.upgrade(engine)
        engine.dispose()
        return uri, lambda: None
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"scoria_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        if not flushes:
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    uri = sa.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    engine = sa.create_engine(uri)
    schema.upgrade(engine)
    engine.dispose()

    def drop() -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    return uri, drop


def pg_bytes(uri: str, *, full: bool = True) -> tuple[int, ...]:
    """Size of the ``scoria_*`` tables after ``VACUUM``, then at rest after ``VACUUM FULL``.

    Every transition updates the run row and its status is indexed, so a burst of
    round-trips leaves dead index entries whose pages ``VACUUM`` frees for reuse but
    does not return; ``VACUUM FULL`` rewrites what the completed runs keep. Without
    ``full``, only the first.
    """
    engine = sa.create_engine(uri, isolation_level="AUTOCOMMIT")
    sizes = []
    with engine.connect() as conn:
        for command in ("VACUUM", "VACUUM FULL")[: 2 if full else 1]:
            conn.exec_driver_sql(command)
            sizes.append(
                sum(
                    conn.exec_driver_sql(f"SELECT pg_total_relation_size('{t}')").scalar_one()
                    for t in TABLES
                )
            )
    engine.dispose()
    return tuple(int(size) for size in sizes)


def sqlite_bytes(uri: str, *, full: bool = True) -> tuple[int, ...]:
    """Size of the file after a WAL checkpoint, then (with ``full``) after ``VACUUM``."""
    path = uri.removeprefix("sqlite:///")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    sizes = [Path(path).stat().st_size]
    if full:
        conn.execute("VACUUM")
        sizes.append(Path(path).stat().st_size)
    conn.close()
    return tuple(sizes)


def settled_bytes_per_run(uri: str, runs: int, size: Callable[..., tuple[int, ...]]) -> float:
    """Bytes per run that the last of a few bursts of ``runs`` round-trips adds.

    Each burst is followed by ``VACUUM``. A burst's transient index entries (a
    run's status and lease while it runs) leave pages that ``VACUUM`` empties
    and later bursts fill again, as autovacuum lets a running database do;
    PostgreSQL recycles an emptied index page only at a later ``VACUUM``. The
    last burst shows how the tables grow per completed run once they settled.
    """
    sizes = []
    for _ in range(SETTLING_BURSTS):
        scoria_roundtrips(uri, runs)
        sizes.append(size(uri, full=False)[0])
    return (sizes[-1] - sizes[-2]) / runs


def measure(backend: str, runs: int, workdir: Path, *, flushes: bool = True) -> dict[str, float]:
    uri, cleanup = fresh_database(backend, workdir, flushes=flushes)
    size = sqlite_bytes if backend == "sqlite" else pg_bytes
    try:
        # Warm-up (imports, pools, caches), which counts the commits of each flow.
        commits = scoria_roundtrips(uri, COUNTED).commits / COUNTED
        fused_commits = scoria_roundtrips(uri, COUNTED, fused=True).commits / COUNTED
        # On SQLite the baselines get a file of their own next to it, so that the tables
        # they drop leave no free pages in the file whose size is measured.
        baseline = uri.replace(".sqlite3", "-baseline.sqlite3")
        flow, fused = ScoriaFlow(uri), ScoriaFlow(uri, fused=True)
        raw, crud = RawFlow(baseline), CrudFlow(baseline)
        approval_crud = ApprovalCrudFlow(baseline)
        try:
            cpu = interleave((flow, fused, raw, crud, approval_crud), runs)
        finally:
            for each in (flow, fused, raw, crud, approval_crud):
                each.close()
        timings = flow.timings
        # The sizes are measured after the timed flows, with a burst of their own: a
        # VACUUM before them would leave PostgreSQL's planner the statistics of near-empty
        # tables, whose plans (sequential scans) the timed flows would keep as the
        # tables grow, until autovacuum analyzes them again.
        # The burst starts from the tables as VACUUM FULL rewrote them.
        compact = size(uri)[-1]
        scoria_roundtrips(uri, runs)
        after = size(uri)
        per_run_bytes = (after[0] - compact) / runs
        at_rest_bytes = (after[1] - compact) / runs
        settled_bytes = settled_bytes_per_run(uri, runs, size)
        raw_seconds, crud_seconds = raw.seconds, crud.seconds

        # Two processes share the round-trips; the clock starts once both are warm.
        context = multiprocessing.get_context("spawn")
        ready, finished, start = context.Queue(), context.Queue(), context.Event()
        half = runs // 2
        workers = [
            context.Process(target=_scoria_worker, args=(uri, half, ready, start, finished))
            for _ in range(2)
        ]
        for worker in workers:
            worker.start()
        for _ in workers:
            ready.get(timeout=120)
        began = time.monotonic()
        start.set()
        for worker in workers:
            worker.join()
        ends = [finished.get(timeout=5) for worker in workers if worker.exitcode == 0]
        two_process_seconds = max(ends, default=began) - began
        failures = sum(1 for worker in workers if worker.exitcode != 0)
    finally:
        cleanup()
    return {
        "roundtrips_per_s": runs / timings.seconds,
        "fused_roundtrips_per_s": runs / fused.timings.seconds,
        "raw_floor_per_s": runs / raw_seconds,
        "crud_per_s": runs / crud_seconds,
        "approval_crud_per_s": runs / approval_crud.seconds,
        "two_process_per_s": (2 * half) / two_process_seconds if two_process_seconds else 0.0,
        "two_process_failures": failures,
        "client_cpu_ms": cpu[0] / runs * 1000,
        "fused_client_cpu_ms": cpu[1] / runs * 1000,
        "raw_floor_client_cpu_ms": cpu[2] / runs * 1000,
        "crud_client_cpu_ms": cpu[3] / runs * 1000,
        "approval_crud_client_cpu_ms": cpu[4] / runs * 1000,
        "commits_per_roundtrip": commits,
        "fused_commits_per_roundtrip": fused_commits,
        "start_p50_ms": statistics.median(timings.start) * 1000,
        "start_p99_ms": _p99(timings.start) * 1000,
        "resume_p50_ms": statistics.median(timings.resume) * 1000,
        "resume_p99_ms": _p99(timings.resume) * 1000,
        "bytes_per_run": per_run_bytes,
        "bytes_per_run_at_rest": at_rest_bytes,
        "bytes_per_run_settled": settled_bytes,
    }


def _p99(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.99) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "all"), default="all")
    parser.add_argument(
        "--no-flushes",
        action="store_true",
        help="every flow commits without waiting for the disk: PostgreSQL's "
        "synchronous_commit = off, SQLite's synchronous = OFF (a diagnosis)",
    )
    args = parser.parse_args()
    if args.no_flushes:
        os.environ[SQLITE_SYNCHRONOUS] = "OFF"
    backends = ("sqlite", "postgresql") if args.backend == "all" else (args.backend,)
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            result = measure(backend, args.runs, Path(tmp), flushes=not args.no_flushes)
            print(f"\n{backend} ({args.runs} round-trips)")
            for key, value in result.items():
                print(f"  {key:24} {value:10.2f}")
            ratios = {
                "ratio to raw floor": result["roundtrips_per_s"] / result["raw_floor_per_s"],
                "ratio to CRUD": result["roundtrips_per_s"] / result["crud_per_s"],
                "fused to raw floor": result["fused_roundtrips_per_s"] / result["raw_floor_per_s"],
                "fused to CRUD": result["fused_roundtrips_per_s"] / result["crud_per_s"],
                "CRUD to raw floor": result["crud_per_s"] / result["raw_floor_per_s"],
                "ratio to CRUD with approval": (
                    result["roundtrips_per_s"] / result["approval_crud_per_s"]
                ),
                "fused to CRUD with approval": (
                    result["fused_roundtrips_per_s"] / result["approval_crud_per_s"]
                ),
                "client CPU / CRUD's": result["client_cpu_ms"] / result["crud_client_cpu_ms"],
                "fused client CPU / CRUD's": (
                    result["fused_client_cpu_ms"] / result["crud_client_cpu_ms"]
                ),
                "2 processes / 1": result["two_process_per_s"] / result["roundtrips_per_s"],
            }
            for key, value in ratios.items():
                print(f"  {key:24} {value:10.2f}")


if __name__ == "__main__":
    main()
