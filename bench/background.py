"""Background execution on PostgreSQL: queue-to-start latency, worker and Celery throughput.

Usage::

    python bench/background.py [--runs 1000] [--latency-runs 200] [--rounds 3]

Needs PostgreSQL (``SCORIA_BENCH_POSTGRES_URL``) and, for the Celery figures, Redis
(``SCORIA_BENCH_REDIS_URL``). Each figure is measured in this one run:

- queue-to-start latency: from the call of ``start_run`` (executor ``worker``) to the
  handler starting in a ``flask scoria worker`` process, runs 20 ms apart;
- steps/s of no-op handlers through 1, 2 and 4 worker processes (``--concurrency 4``
  each), from the first step's start to the last step's end, all runs queued beforehand;
- steps/s through Celery (executor ``celery``) against bare Celery tasks and against the
  floor of two committed transactions (a bare task that claims a step with one ``UPDATE``
  and records its outcome with another, in autocommit), all with the same handler body
  (one Redis ``RPUSH`` of the time on a pooled connection), same broker, same worker
  options, all messages queued before the worker starts; in ``--rounds`` rounds, each
  starting with the next of the three.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask

import flask_scoria as scoria
from flask_scoria import Scoria

sys.path.insert(0, str(Path(__file__).resolve().parent))
from databases import database

REDIS_URL = os.environ.get("SCORIA_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
HERE = Path(__file__).resolve().parent
WHO = {"actor_id": "bench", "tenant_id": "bench", "session_id": "bench"}
TABLES = "scoria_handoffs, scoria_events, scoria_approvals, scoria_steps, scoria_runs"


def stamp(step: scoria.StepView, run: scoria.RunSummary) -> dict[str, float]:
    """Record when the handler started."""
    return {"t": time.time()}


def noop(step: scoria.StepView, run: scoria.RunSummary) -> None:
    return None


def push_time() -> None:
    """The handler body shared by the Celery comparison: one RPUSH of the time."""
    _redis().rpush(os.environ["SCORIA_BENCH_LIST"], time.time())


def timed(step: scoria.StepView, run: scoria.RunSummary) -> None:
    push_time()


def floor_step(step_id: str) -> None:
    """The floor: a claim and an outcome, one committed UPDATE each, around the shared body."""
    conn = _postgres()
    token = uuid.uuid4().hex
    conn.execute(
        "UPDATE scoria_steps SET status = 'running', lease_token = %s"
        " WHERE id = %s AND status = 'queued'",
        (token, step_id),
    )
    push_time()
    conn.execute(
        "UPDATE scoria_steps SET status = 'completed', lease_token = NULL"
        " WHERE id = %s AND lease_token = %s",
        (step_id, token),
    )


@cache
def _redis() -> Any:
    """One client per process: its pool keeps the connections open between tasks."""
    import redis

    return redis.Redis.from_url(REDIS_URL)


_connections = threading.local()


def _postgres() -> Any:
    """This thread's psycopg connection to the bench database, in autocommit mode."""
    conn = getattr(_connections, "conn", None)
    if conn is None:
        import psycopg

        url = sa.make_url(os.environ["SCORIA_BENCH_DATABASE"]).set(drivername="postgresql")
        conn = psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)
        _connections.conn = conn
    return conn


def create_app() -> Flask:
    """The bench app, configured from the environment (also in the worker processes)."""
    app = Flask("scoria_bench", instance_path=str(HERE / "instance"))
    app.config["SCORIA_DATABASE_URI"] = os.environ["SCORIA_BENCH_DATABASE"]
    app.config["SCORIA_EXECUTOR"] = os.environ.get("SCORIA_BENCH_EXECUTOR", "worker")
    runtime = Scoria(app)
    runtime.handler("stamp")(stamp)
    runtime.handler("noop")(noop)
    runtime.handler("timed")(timed)
    queue = os.environ.get("SCORIA_BENCH_QUEUE")
    if queue:
        from celery import Celery

        celery_app = Celery(app.name)
        celery_app.conf.update(
            broker_url=REDIS_URL,
            task_ignore_result=True,
            worker_prefetch_multiplier=1,
            task_default_queue=queue,
            broker_connection_retry_on_startup=True,
        )
        celery_app.task(name="bench.bare", ignore_result=True)(push_time)
        celery_app.task(name="bench.floor", ignore_result=True)(floor_step)
        app.extensions["celery"] = celery_app
    return app


@cache
def _worker_app() -> Flask:
    return create_app()


def __getattr__(name: str) -> Any:
    """``celery -A background:celery_app``: the bench app's Celery app, built on access."""
    if name == "celery_app":
        return _worker_app().extensions["celery"]
    raise AttributeError(name)


class Rig:
    """The bench app in this process, and the worker processes it starts."""

    def __init__(self, url: str, **env: str) -> None:
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]),
            "SCORIA_BENCH_DATABASE": url,
            **env,
        }
        os.environ.update(self.env)
        self.app = create_app()
        self.engine = sa.create_engine(url)
        self.processes: list[subprocess.Popen[bytes]] = []
        with self.engine.begin() as conn:
            conn.exec_driver_sql(f"TRUNCATE {TABLES}")

    def start(self, *command: str) -> None:
        self.processes.append(
            subprocess.Popen(
                [sys.executable, "-m", *command],
                cwd=HERE,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=open(os.environ.get("SCORIA_BENCH_LOG", os.devnull), "ab"),  # noqa: SIM115
            )
        )

    def queue_runs(self, kind: str, count: int) -> list[scoria.RunSummary]:
        with self.app.app_context():
            return [scoria.start_run(WHO, initial_step={"kind": kind}) for _ in range(count)]

    def completed(self) -> int:
        with self.engine.connect() as conn:
            query = "SELECT count(*) FROM scoria_runs WHERE status = 'completed'"
            return int(conn.exec_driver_sql(query).scalar_one())

    def step_span(self) -> float:
        with self.engine.connect() as conn:
            first, last = conn.exec_driver_sql(
                "SELECT min(started_at), max(completed_at) FROM scoria_steps"
            ).one()
        return float((last - first).total_seconds())

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            process.wait(timeout=60)
        self.processes = []
        self.app.extensions["scoria"].storage(self.app).engine.dispose()
        self.engine.dispose()


def wait_until(check: Callable[[], bool], seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.05)


def start_workers(rig: Rig, count: int) -> None:
    for _ in range(count):
        rig.start(
            "flask", "--app", "background:create_app", "scoria", "worker", "--concurrency", "4"
        )


def latency(url: str, runs: int) -> tuple[float, float]:
    """p50 and p99 milliseconds from the start_run call to the handler starting."""
    rig = Rig(url)
    start_workers(rig, 1)
    rig.queue_runs("noop", 1)
    wait_until(lambda: rig.completed() == 1)
    calls = []
    with rig.app.app_context():
        for _ in range(runs):
            calls.append((time.time(), scoria.start_run(WHO, initial_step={"kind": "stamp"})))
            time.sleep(0.02)
        wait_until(lambda: rig.completed() == runs + 1)
        delays = [
            (scoria.get_run_detail(run.run_id).steps[0].result_envelope or {})["t"] - called
            for called, run in calls
        ]
    rig.stop()
    delays.sort()
    return statistics.median(delays) * 1000, delays[int(len(delays) * 0.99) - 1] * 1000


def worker_throughput(url: str, workers: int, runs: int) -> float:
    """Steps/s of no-op handlers through ``workers`` processes."""
    rig = Rig(url)
    rig.queue_runs("noop", runs)
    start_workers(rig, workers)
    wait_until(lambda: rig.completed() == runs)
    span = rig.step_span()
    rig.stop()
    return runs / span


#: What the Celery figures compare: flask-scoria steps, the two-commit floor, bare tasks.
SIDES = ("scoria", "floor", "bare")


def celery_rate(url: str, runs: int, side: str) -> float:
    """Tasks/s of one of :data:`SIDES` through Celery, each running the shared handler body."""
    key = f"scoria-bench-{uuid.uuid4().hex[:8]}"
    rig = Rig(
        url,
        # the floor's steps are queued without a Celery task of their own
        SCORIA_BENCH_EXECUTOR="worker" if side == "floor" else "celery",
        SCORIA_BENCH_QUEUE=f"{key}-queue",
        SCORIA_BENCH_LIST=key,
    )
    celery_app = rig.app.extensions["celery"]
    if side == "bare":
        for _ in range(runs):
            celery_app.send_task("bench.bare")
    elif side == "floor":
        for run in rig.queue_runs("timed", runs):
            celery_app.send_task("bench.floor", args=[run.current_step_id])
    else:
        rig.queue_runs("timed", runs)
    rig.start(
        "celery", "-A", "background:celery_app", "worker", "--pool", "threads",
        "--concurrency", "4", "--without-gossip", "--without-mingle", "--without-heartbeat",
    )  # fmt: skip
    redis = _redis()
    wait_until(lambda: redis.llen(key) == runs)
    times = sorted(float(value) for value in redis.lrange(key, 0, -1))
    redis.delete(key)
    rig.stop()
    return (runs - 1) / (times[-1] - times[0])


def celery_throughput(url: str, runs: int, rounds: int) -> list[dict[str, float]]:
    """The tasks/s of each of :data:`SIDES`, once per round.

    Each round starts with the next side, so that all see the same minutes of a
    noisy machine.
    """
    figures = []
    for number in range(rounds):
        order = SIDES[number % 3 :] + SIDES[: number % 3]
        figures.append({side: celery_rate(url, runs, side) for side in order})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of the Celery figures.")
    parser.add_argument("--celery-only", action="store_true", help="Only the Celery figures.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, database("postgresql", Path(tmp)) as url:
        if not args.celery_only:
            p50, p99 = latency(url, args.latency_runs)
            print(
                f"queue-to-start latency (worker, PostgreSQL): p50 {p50:.1f} ms, p99 {p99:.1f} ms"
            )
            for workers in (1, 2, 4):
                rate = worker_throughput(url, workers, args.runs)
                print(f"no-op steps/s through {workers} worker process(es): {rate:.0f}")
        figures = celery_throughput(url, args.runs, args.rounds)
        for rates in figures:
            print(
                f"Celery on Redis: flask-scoria {rates['scoria']:.0f} steps/s, two-commit floor"
                f" {rates['floor']:.0f}/s, bare Celery {rates['bare']:.0f} tasks/s;"
                f" ratios {rates['scoria'] / rates['bare']:.2f}, floor"
                f" {rates['floor'] / rates['bare']:.2f}"
            )
        ratio = statistics.median(rates["scoria"] / rates["bare"] for rates in figures)
        floor = statistics.median(rates["floor"] / rates["bare"] for rates in figures)
        print(
            f"Celery on Redis, median of {len(figures)} rounds: flask-scoria / bare Celery"
            f" {ratio:.2f}, two-commit floor / bare Celery {floor:.2f}"
        )


if __name__ == "__main__":
    main()
