"""Does the runs list's cost depend on the size of the runs' metadata?

Starts N runs through the facade twice, in two fresh databases: once with a
small metadata, once with a large one (10 MB by default, under a raised
``SCORIA_MAX_METADATA_BYTES``). Then times GET of the runs list, a session
page, the approvals inbox and one run's status poll with the Flask test
client (as ``operator_pages.py`` does: the median of 30, after 3 warm-ups),
in 5 rounds that alternate the two databases, and prints the median of the
rounds and the large/small ratio. Run by hand:

    .venv/bin/python bench/list_metadata.py                    # both backends
    .venv/bin/python bench/list_metadata.py --runs 20 --megabytes 10 --backends sqlite
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flask import Flask

import flask_scoria as scoria
from flask_scoria import Scoria, WaitForApproval

sys.path.insert(0, str(Path(__file__).resolve().parent))
from databases import database
from operator_pages import timed

IDENTITY = {"actor_id": "bench", "tenant_id": "bench", "session_id": "bench-session"}


def ask(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    return WaitForApproval("publish", {"env": "prod"})


def make_app(uri: str, workdir: Path, max_bytes: int) -> Flask:
    app = Flask("bench", instance_path=str(workdir))
    app.config.update(
        SECRET_KEY="bench", SCORIA_DATABASE_URI=uri, SCORIA_MAX_METADATA_BYTES=max_bytes
    )
    runtime = Scoria(app)
    runtime.operator_scope(lambda: {"tenant_id": "bench", "actor_id": "ops"})
    return app


@contextmanager
def loaded(
    backend: str, runs: int, size: int, workdir: Path
) -> Iterator[tuple[Any, dict[str, str]]]:
    """A client of an app with ``runs`` paused runs of ``size`` bytes of metadata each,
    and the pages to time."""
    payload = "m" * size
    with database(backend, workdir) as uri:
        app = make_app(uri, workdir, size + 1024)
        with app.app_context():
            run_ids = [
                scoria.start_run(
                    IDENTITY,
                    initial_step={"kind": "ask"},
                    runtime={"metadata": {"payload": payload}},
                    handlers={"ask": ask},
                ).run_id
                for _ in range(runs)
            ]
        engine = app.extensions["scoria"].storage(app).engine
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM" if backend == "sqlite" else "VACUUM ANALYZE")
        pages = {
            "runs list": "/scoria/workflows",
            "session page": f"/scoria/sessions/{IDENTITY['session_id']}",
            "approvals inbox": "/scoria/approvals",
            "status poll": f"/scoria/workflows/{run_ids[0]}/status.json",
        }
        try:
            yield app.test_client(), pages
        finally:
            engine.dispose()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--megabytes", type=float, default=10.0)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    large = int(args.megabytes * 1024 * 1024)
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            with (
                loaded(backend, args.runs, 100, Path(tmp)) as (small, pages),
                loaded(backend, args.runs, large, Path(tmp)) as (big, big_pages),
            ):
                # Interleaved rounds, so that both sizes see the same minutes of a noisy machine.
                samples: dict[str, tuple[list[float], list[float]]] = {
                    page: ([], []) for page in pages
                }
                for _ in range(args.rounds):
                    for page, (small_ms, large_ms) in samples.items():
                        small_ms.append(timed(small, pages[page]))
                        large_ms.append(timed(big, big_pages[page]))
            print(f"{backend}: {args.runs} runs, 100 B vs {args.megabytes:g} MB of metadata each")
            for page, (small_ms, large_ms) in samples.items():
                small_median = statistics.median(small_ms)
                large_median = statistics.median(large_ms)
                print(
                    f"  {page:16} {small_median:7.2f} ms  {large_median:7.2f} ms"
                    f"  x{large_median / small_median:.2f}"
                )


if __name__ == "__main__":
    main(sys.argv[1:])
