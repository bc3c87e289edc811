"""Chaos: gunicorn workers killed with SIGKILL and database connections terminated under load.

A bounded load (threads doing start / approve / resume / read over HTTP on
127.0.0.1) runs against ``chaos_app`` served by 3 gunicorn workers on
PostgreSQL, while rounds of ``kill -9`` hit the workers and rounds of
``pg_terminate_backend`` hit the app's connections. Afterwards the database
must hold the invariants of the contract. Needs PostgreSQL and gunicorn:
skipped without them (with the reason), failed under
``SCORIA_REQUIRE_POSTGRES=1``.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import REQUIRE_POSTGRES, throwaway_postgres_database

from flask_scoria import schema

pytestmark = pytest.mark.chaos

LOAD_SECONDS = 25.0
LOAD_THREADS = 4
WORKERS = 3
KILL_EVERY = 4.0
TERMINATE_EVERY = 2.5
TESTS = Path(__file__).resolve().parent


def require_gunicorn() -> None:
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        message = "gunicorn is not installed (pip install gunicorn): the chaos test needs it"
        if REQUIRE_POSTGRES:
            pytest.fail(message + " (SCORIA_REQUIRE_POSTGRES=1)")
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def children(pid: int) -> list[int]:
    """The ids of the processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@dataclass
class Tally:
    """What the load and the chaos did, counted across threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: Counter[str] = field(default_factory=Counter)
    acknowledged: set[str] = field(default_factory=set)
    kills: int = 0
    terminated: int = 0
    termination_rounds: int = 0

    def count(self, what: str) -> None:
        with self.lock:
            self.requests[what] += 1


def call(port: int, method: str, path: str) -> tuple[int, dict[str, Any]]:
    """One HTTP request; status 0 when the connection broke (a killed worker)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body.startswith(b"{") else {}
    except (OSError, http.client.HTTPException):
        return 0, {}
    finally:
        conn.close()


def load(port: int, tally: Tally, stop: threading.Event, seed: int) -> None:
    """Start runs, approve and resume them (sometimes twice, racing), and read them."""
    rng = random.Random(seed)
    mine: list[str] = []
    while not stop.is_set():
        action = rng.choice(("start", "start", "approve", "resume", "read"))
        if action == "start" or not mine:
            status, body = call(port, "POST", "/runs")
            tally.count(f"start {status}")
            if status == 201:
                with tally.lock:
                    tally.acknowledged.add(body["run_id"])
                mine.append(body["run_id"])
            continue
        run_id = rng.choice(mine[-20:])
        method = "GET" if action == "read" else "POST"
        path = f"/runs/{run_id}" if action == "read" else f"/runs/{run_id}/{action}"
        status, _ = call(port, method, path)
        tally.count(f"{action} {status}")


def chaos(master: int, admin: sa.Engine, tally: Tally, stop: threading.Event) -> None:
    """Rounds of SIGKILL on one gunicorn worker and of pg_terminate_backend on every
    connection of the app, until ``stop``."""
    next_kill = time.monotonic() + KILL_EVERY / 2
    next_terminate = time.monotonic() + TERMINATE_EVERY
    while not stop.wait(0.1):
        now = time.monotonic()
        if now >= next_kill:
            workers = children(master)
            if workers:
                os.kill(random.choice(workers), signal.SIGKILL)
                tally.kills += 1
            next_kill = now + KILL_EVERY
        if now >= next_terminate:
            with admin.connect() as conn:
                tally.terminated += len(
                    conn.exec_driver_sql(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    ).all()
                )
            tally.termination_rounds += 1
            next_terminate = now + TERMINATE_EVERY


@pytest.fixture
def chaos_database() -> Iterator[str]:
    with throwaway_postgres_database("scoria_chaos") as url:
        require_gunicorn()
        engine = sa.create_engine(url)
        schema.upgrade(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE chaos_effects (step_id uuid NOT NULL, attempt integer NOT NULL,"
                " pid integer NOT NULL, at timestamptz NOT NULL DEFAULT now())"
            )
        engine.dispose()
        yield url


@pytest.fixture
def gunicorn(chaos_database: str, tmp_path: Path) -> Iterator[tuple[int, int]]:
    """gunicorn serving ``chaos_app`` with 3 workers: (its master's pid, its port)."""
    port = free_port()
    env = {
        **os.environ,
        "CHAOS_DATABASE_URI": chaos_database,
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]),
    }
    command = [
        *(sys.executable, "-m", "gunicorn", "--workers", str(WORKERS)),
        *("--bind", f"127.0.0.1:{port}", "--timeout", "30", "--graceful-timeout", "2"),
        *("--log-file", str(tmp_path / "gunicorn.log"), "chaos_app:create_app()"),
    ]
    log = (tmp_path / "gunicorn.out").open("wb")
    server = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while call(port, "GET", "/runs/none")[0] != 409:
            assert server.poll() is None, (tmp_path / "gunicorn.out").read_text()
            assert time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.2)
        yield server.pid, port
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_kill_9_and_terminated_connections_under_load_keep_the_invariants(
    chaos_database: str, gunicorn: tuple[int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    master, port = gunicorn
    tally = Tally()
    stop = threading.Event()
    admin = sa.create_engine(chaos_database, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    threads = [
        threading.Thread(target=load, args=(port, tally, stop, seed))
        for seed in range(LOAD_THREADS)
    ]
    threads.append(threading.Thread(target=chaos, args=(master, admin, tally, stop)))
    for thread in threads:
        thread.start()
    time.sleep(LOAD_SECONDS)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    # Stop serving, so that no process holds a lease any more; let the leases run out.
    os.kill(master, signal.SIGTERM)
    time.sleep(2.5 + 1)
    checked = check_invariants(chaos_database, tally)
    admin.dispose()
    with capsys.disabled():
        requests = dict(sorted(tally.requests.items()))
        print(
            f"\nchaos: {sum(tally.requests.values())} requests {requests},"
            f" {tally.kills} workers killed, {tally.terminated} connections terminated in"
            f" {tally.termination_rounds} rounds, {len(tally.acknowledged)} runs acknowledged;"
            f" {checked}"
        )
    assert tally.kills >= 3 and tally.terminated >= 3
    assert tally.requests["start 201"] >= 10


def check_invariants(url: str, tally: Tally) -> str:
    """Assert the contract's invariants in the database; say what was checked."""
    from conftest import create_test_app

    import flask_scoria as scoria

    app = create_test_app(url, Path("/nonexistent-instance"))
    engine = app.extensions["scoria"].storage(app).engine
    try:
        with app.app_context():
            recovered = scoria.runtime.recover_expired_leases()
        with engine.connect() as conn:
            query = conn.exec_driver_sql
            run_ids = {str(row[0]) for row in query("SELECT id FROM scoria_runs")}
            missing = tally.acknowledged - run_ids
            stuck = query(
                "SELECT r.id, r.status FROM scoria_runs r WHERE r.status = 'running'"
            ).all()
            gaps = query(
                "SELECT r.id FROM scoria_runs r LEFT JOIN scoria_events e ON e.run_id = r.id"
                " GROUP BY r.id, r.last_event_sequence HAVING count(e.sequence)"
                " <> r.last_event_sequence OR coalesce(max(e.sequence), 0) <> r.last_event_sequence"
                " OR coalesce(min(e.sequence), 1) <> 1"
            ).all()
            twice = query(
                "SELECT r.id FROM scoria_runs r WHERE"
                " (SELECT count(*) FROM scoria_events e WHERE e.run_id = r.id"
                "  AND e.event_type = 'approval_decided')"
                " <> (SELECT count(*) FROM scoria_approvals a WHERE a.run_id = r.id"
                "  AND a.status IN ('approved', 'rejected'))"
            ).all()
            repeated = query(
                "SELECT step_id, attempt, count(*) FROM chaos_effects"
                " GROUP BY step_id, attempt HAVING count(*) > 1"
            ).all()
            completed_without_effect = query(
                "SELECT s.id FROM scoria_steps s WHERE s.status = 'completed' AND NOT EXISTS"
                " (SELECT 1 FROM chaos_effects c WHERE c.step_id = s.id)"
            ).all()
            effects = query("SELECT count(*) FROM chaos_effects").scalar_one()
            statuses = dict(query("SELECT status, count(*) FROM scoria_runs GROUP BY status").all())
    finally:
        engine.dispose()
    assert missing == set(), f"acknowledged runs missing: {sorted(missing)[:5]}"
    assert stuck == [], f"runs still running after their leases expired: {stuck[:5]}"
    assert gaps == [], f"runs whose event sequences have gaps: {gaps[:5]}"
    assert twice == [], f"runs with more decisions than decided approvals: {twice[:5]}"
    assert repeated == [], f"side effects repeated within one attempt: {repeated[:5]}"
    assert completed_without_effect == [], completed_without_effect[:5]
    return (
        f"{len(run_ids)} runs {statuses}, {effects} side effects, {len(recovered)} expired"
        " leases recovered; checked: every acknowledged run present, none running past its"
        " lease, gapless event sequences, one decision per decided approval, at most one"
        " side effect per step attempt, a side effect behind every completed step"
    )
