"""Approval round-trips of flask-scoria next to LangGraph and DBOS, and under concurrent clients.

Each peer does the approval round-trip of ``approval_roundtrip.py`` with its own
documented API:

- LangGraph: a one-node graph whose node calls ``interrupt()``, compiled with a
  checkpointer (``SqliteSaver`` on a WAL file, ``PostgresSaver``); ``invoke`` runs it
  until it pauses, ``invoke(Command(resume=...))`` resumes it to the end.
- DBOS: a workflow that publishes its status with ``DBOS.set_event`` and waits for the
  approval with ``DBOS.recv``; the caller starts it, waits for the status with
  ``DBOS.get_event``, sends the approval with ``DBOS.send`` and waits for the result.

They run interleaved with flask-scoria (approving, then resuming; and approving with
``resume=True``), the raw floor and the hand-written CRUDs of ``approval_roundtrip.py``
(without and with the approval), in batches, ``--repeats`` times; the figures are
medians. Then, on PostgreSQL, both flask-scoria flows, the CRUD and the raw floor run
with 1, 4 and 16 concurrent client threads. Needs the ``bench`` dependency group::

    python bench/peers.py [--runs 200] [--repeats 3] [--backend sqlite|postgresql|all]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypedDict

import psycopg
import sqlalchemy as sa
from approval_roundtrip import (
    ApprovalCrudFlow,
    CrudFlow,
    RawFlow,
    ScoriaFlow,
    fresh_database,
    interleave,
)
from dbos import DBOS, DBOSConfig
from langgraph.checkpoint.postgres import PostgresSaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt
from psycopg.rows import dict_row

#: DBOS wakes waiters (``recv``, ``get_event``) by polling the database on SQLite, and by
#: LISTEN/NOTIFY coalesced over an interval on PostgreSQL. Both default to intervals
#: (1 s, 10 ms) longer than a whole round-trip here; the bench sets both to DBOS's
#: minimum, 1 ms, so that DBOS is measured doing work rather than sleeping.
DBOS_WAKE_SECONDS = 0.001
CONCURRENCY = (1, 4, 16)
#: flask-scoria approving with ``approve_run(..., resume=True)``.
FUSED = "flask-scoria, resume=True"


def psycopg_url(uri: str) -> str:
    return sa.make_url(uri).set(drivername="postgresql").render_as_string(hide_password=False)


class GraphState(TypedDict):
    env: str
    published: bool


def publish_node(state: GraphState) -> dict[str, Any]:
    """Ask for approval; once resumed with the decision, do the work."""
    decision = interrupt({"action": "publish", "env": state["env"], "reason": "bench"})
    return {"published": bool(decision["approved"])}


class LangGraphFlow:
    """Round-trips through a checkpointed graph: invoke until ``interrupt``, then resume."""

    def __init__(self, uri: str) -> None:
        if uri.startswith("sqlite"):
            self.conn: Any = sqlite3.connect(
                uri.removeprefix("sqlite:///"), check_same_thread=False
            )
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            saver: Any = SqliteSaver(self.conn)
        else:
            # The connection settings PostgresSaver.from_conn_string uses.
            self.conn = psycopg.connect(
                psycopg_url(uri), autocommit=True, prepare_threshold=0, row_factory=dict_row
            )
            saver = PostgresSaver(self.conn)
        saver.setup()
        builder = StateGraph(GraphState)
        builder.add_node("publish", publish_node)
        builder.add_edge(START, "publish")
        builder.add_edge("publish", END)
        self.graph = builder.compile(checkpointer=saver)
        self.seconds = 0.0

    def run(self, runs: int) -> None:
        began = time.perf_counter()
        for _ in range(runs):
            config: Any = {"configurable": {"thread_id": uuid.uuid4().hex}}
            # "sync": every checkpoint is written before the graph goes on, as
            # flask-scoria commits each transition before it returns.
            paused = self.graph.invoke(
                {"env": "prod", "published": False}, config, durability="sync"
            )
            assert "__interrupt__" in paused, paused
            done = self.graph.invoke(
                Command(resume={"approved": True, "by": "operator"}), config, durability="sync"
            )
            assert done["published"] is True, done
        self.seconds += time.perf_counter() - began

    def close(self) -> None:
        self.conn.close()


@DBOS.workflow()
def dbos_approval(env: str) -> dict[str, Any]:
    """Publish that the workflow waits, wait for the decision, then do the work."""
    DBOS.set_event("status", "waiting_for_approval")
    decision = DBOS.recv("approval", timeout_seconds=60)
    if not decision or not decision["approved"]:
        return {"published": False, "env": env}
    return {"published": True, "env": env}


class DBOSFlow:
    """Round-trips through a DBOS workflow: start, see it wait, send the approval, result.

    DBOS is launched for each batch and destroyed after it, outside the timed part: its
    background threads (the notification listener and notifier, waking every
    ``DBOS_WAKE_SECONDS``) would otherwise run while the other flows are timed.
    """

    def __init__(self, uri: str) -> None:
        if uri.startswith("sqlite"):
            # DBOS leaves SQLite in its rollback journal; give it WAL like the others
            # (the mode is stored in the file; synchronous stays at SQLite's FULL).
            sqlite3.connect(uri.removeprefix("sqlite:///")).execute(
                "PRAGMA journal_mode=WAL"
            ).connection.close()
        self.config: DBOSConfig = {
            "name": "scoria-bench",
            "system_database_url": uri,
            "notification_listener_polling_interval_sec": DBOS_WAKE_SECONDS,
            "notification_coalesce_sec": DBOS_WAKE_SECONDS,
            "log_level": "WARNING",
        }
        self.seconds = 0.0

    def run(self, runs: int) -> None:
        DBOS(config=self.config)
        DBOS.launch()
        try:
            self._roundtrips(2)  # warm-up after launch: pool, executor threads
            began = time.perf_counter()
            self._roundtrips(runs)
            self.seconds += time.perf_counter() - began
        finally:
            DBOS.destroy()

    def _roundtrips(self, runs: int) -> None:
        for _ in range(runs):
            handle = DBOS.start_workflow(dbos_approval, "prod")
            workflow_id = handle.get_workflow_id()
            status = DBOS.get_event(workflow_id, "status", timeout_seconds=60)
            assert status == "waiting_for_approval", status
            DBOS.send(workflow_id, {"approved": True, "by": "operator"}, topic="approval")
            result = handle.get_result()
            assert result["published"] is True, result

    def close(self) -> None:
        pass


def median_rates(flows: dict[str, Any], runs: int, repeats: int) -> dict[str, list[float]]:
    """Round-trips/s of each flow in each repeat, all flows interleaved in batches."""
    for flow in flows.values():
        flow.run(10)  # warm-up: imports, connections, caches
    rates: dict[str, list[float]] = {name: [] for name in flows}
    for _ in range(repeats):
        before = {name: flow.seconds for name, flow in flows.items()}
        interleave(list(flows.values()), runs)
        for name, flow in flows.items():
            rates[name].append(runs / (flow.seconds - before[name]))
    return rates


def measure_peers(backend: str, runs: int, repeats: int, workdir: Path) -> dict[str, list[float]]:
    uri, cleanup = fresh_database(backend, workdir)

    def sibling(name: str) -> str:
        """On SQLite each flow gets a file of its own next to flask-scoria's."""
        return uri.replace(".sqlite3", f"-{name}.sqlite3") if backend == "sqlite" else uri

    flows: dict[str, Any] = {}
    try:
        flows["flask-scoria"] = ScoriaFlow(uri)
        flows[FUSED] = ScoriaFlow(uri, fused=True)
        flows["raw floor"] = RawFlow(sibling("baseline"))
        flows["CRUD"] = CrudFlow(sibling("baseline"))
        flows["CRUD with approval"] = ApprovalCrudFlow(sibling("baseline"))
        flows["LangGraph"] = LangGraphFlow(sibling("langgraph"))
        flows["DBOS"] = DBOSFlow(sibling("dbos"))
        return median_rates(flows, runs, repeats)
    finally:
        for flow in reversed(flows.values()):
            flow.close()
        cleanup()


def _client(call: Callable[[], None], each: int) -> tuple[int, str]:
    """One client thread: ``each`` round-trips, one call each; count the failed ones."""
    errors, first = 0, ""
    for _ in range(each):
        try:
            call()
        except Exception as exc:  # counted and reported, the client goes on
            errors, first = errors + 1, first or repr(exc)
    return errors, first


def measure_concurrency(
    runs: int, repeats: int, levels: Sequence[int], batches: int = 4
) -> dict[tuple[str, int], tuple[list[float], int, str]]:
    """Round-trips/s and failed round-trips with ``levels`` concurrent client threads.

    Every client of flask-scoria and of the CRUD shares one app (and its connection
    pool, sized for the most clients), as the threads of a threaded server do; every
    client of the raw floor has a connection of its own. At each level the three run
    in turn, in interleaved batches.
    """
    uri, cleanup = fresh_database("postgresql", Path(tempfile.gettempdir()))
    pool = {"pool_size": max(levels), "max_overflow": 0}
    scoria_flow = fused_flow = crud = None
    raws: list[RawFlow] = []
    results: dict[tuple[str, int], tuple[list[float], int, str]] = {}
    try:
        scoria_flow, crud = ScoriaFlow(uri, pool), CrudFlow(uri, pool)
        fused_flow = ScoriaFlow(uri, pool, fused=True)
        raws = [RawFlow(uri) for _ in range(max(levels))]
        clients: dict[str, Callable[[int], Callable[[], None]]] = {
            "flask-scoria": lambda _i: partial(scoria_flow.run, 1),
            FUSED: lambda _i: partial(fused_flow.run, 1),
            "CRUD": lambda _i: partial(crud.run, 1),
            "raw floor": lambda i: partial(raws[i].run, 1),
        }
        for level in levels:
            each = max(1, runs // (level * batches))
            with ThreadPoolExecutor(level) as executor:
                calls = {name: [make(i) for i in range(level)] for name, make in clients.items()}
                for name in calls:  # warm-up: threads, pooled connections
                    list(executor.map(_client, calls[name], [2] * level))
                seconds = {name: [0.0] * repeats for name in calls}
                errors = dict.fromkeys(calls, 0)
                firsts = dict.fromkeys(calls, "")
                for repeat in range(repeats):
                    for _ in range(batches):
                        for name, row in calls.items():
                            began = time.perf_counter()
                            outcomes = list(executor.map(_client, row, [each] * level))
                            seconds[name][repeat] += time.perf_counter() - began
                            errors[name] += sum(count for count, _ in outcomes)
                            firsts[name] = firsts[name] or next(
                                (first for _, first in outcomes if first), ""
                            )
                done = each * level * batches
                for name in calls:
                    rates = [done / s for s in seconds[name]]
                    results[name, level] = (rates, errors[name], firsts[name])
    finally:
        for i, raw in enumerate(raws):
            raw.close(drop=i == 0)
        for flow in (scoria_flow, fused_flow, crud):
            if flow is not None:
                flow.close()
        cleanup()
    return results


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}" if value < 10 else f"{value:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="round-trips per flow per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="figures are the median")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "all"), default="all")
    parser.add_argument("--concurrency-runs", type=int, default=400, help="0 skips the series")
    args = parser.parse_args()
    backends = ("sqlite", "postgresql") if args.backend == "all" else (args.backend,)
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            rates = measure_peers(backend, args.runs, args.repeats, Path(tmp))
            medians = {name: statistics.median(values) for name, values in rates.items()}
            print(f"\n{backend}: {args.runs} round-trips x {args.repeats}, median round-trips/s")
            print(
                "| flow | round-trips/s | flask-scoria / flow | resume=True / flow | repeats |"
                "\n|---|---|---|---|---|"
            )
            for name, values in rates.items():
                ratios = [
                    statistics.median(s / v for s, v in zip(rates[ours], values, strict=True))
                    for ours in ("flask-scoria", FUSED)
                ]
                each = " / ".join(_fmt(v) for v in values)
                print(
                    f"| {name} | {_fmt(medians[name])} | {ratios[0]:.2f} | {ratios[1]:.2f}"
                    f" | {each} |"
                )
    if args.concurrency_runs and args.backend in ("postgresql", "all"):
        series = measure_concurrency(args.concurrency_runs, args.repeats, CONCURRENCY)
        print(f"\npostgresql, concurrent client threads, median of {args.repeats}")
        print("| clients | flow | round-trips/s | / raw floor | / CRUD | errors | first error |")
        print("|---|---|---|---|---|---|---|")
        for level in CONCURRENCY:
            floor = statistics.median(series["raw floor", level][0])
            crud = statistics.median(series["CRUD", level][0])
            for name in ("flask-scoria", FUSED, "CRUD", "raw floor"):
                values, errors, first = series[name, level]
                rate = statistics.median(values)
                print(
                    f"| {level} | {name} | {_fmt(rate)} | {rate / floor:.2f} | {rate / crud:.2f}"
                    f" | {errors} | {first[:60]} |"
                )


if __name__ == "__main__":
    main()
