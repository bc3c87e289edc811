"""The operator evidence pages, through the Flask test client, on both backends."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import create_test_app
from flask import Flask, session
from flask.testing import FlaskClient
from flask_wtf.csrf import CSRFProtect
from markupsafe import escape

import flask_scoria as scoria
from flask_scoria import Handoff, Scoria, Succeed, WaitForApproval, redaction
from flask_scoria.runtime import Cursor, runs_awaiting_resume

TENANT = "acme"


def ask_then_publish(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    if step.approval is None:
        return WaitForApproval("publish", {"env": "prod"}, reason="Publishing needs a human")
    return Succeed({"published": True})


def chain(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    """Delegate to itself until ``depth`` reaches ``levels``: many steps, events, handoffs."""
    given = step.handoff_input or {}
    depth = int(given.get("depth", 0))
    if depth >= int(run.metadata.get("levels", 0)):
        return Succeed({"depth": depth})
    return Handoff("executor", "chain", handoff_input={"depth": depth + 1})


def from_session() -> Any:
    return session.get("operator")


@pytest.fixture
def operator_app(app: Flask, runtime: Scoria) -> Flask:
    runtime.operator_scope(from_session)
    runtime.handler("approval")(ask_then_publish)
    runtime.handler("chain")(chain)
    return app


@pytest.fixture
def ops(operator_app: Flask) -> FlaskClient:
    """A client signed in as operator ``ops`` of tenant ``acme``."""
    client = operator_app.test_client()
    sign_in(client, {"tenant_id": TENANT, "actor_id": "ops"})
    return client


def sign_in(client: FlaskClient, scope: Any) -> None:
    with client.session_transaction() as stored:
        stored["operator"] = scope


def start(
    app: Flask, *, tenant: str | None = TENANT, kind: str | None = "approval", **kw: Any
) -> str:
    who = scoria.identity({"actor_id": "alice", "tenant_id": tenant, "session_id": "sess-1"})
    step = None if kind is None else {"kind": kind}
    with app.app_context():
        return scoria.start_run(who, initial_step=step, **kw).run_id


def page(client: FlaskClient, url: str, status: int = 200) -> str:
    response = client.get(url)
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    return response.get_data(as_text=True)


def csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no form with a CSRF token on the page"
    return found.group(1)


def approval_id(html: str) -> str:
    found = re.search(r'name="approval_id" value="([^"]+)"', html)
    assert found, "no decision form on the page"
    return found.group(1)


def post_form(client: FlaskClient, run_id: str, action: str, **form: str) -> str:
    html = page(client, f"/scoria/workflows/{run_id}")
    response = client.post(
        f"/scoria/workflows/{run_id}/{action}",
        data={"csrf_token": csrf(html), "approval_id": approval_id(html), **form},
    )
    assert response.status_code == 303
    assert response.location == f"/scoria/workflows/{run_id}"
    return page(client, response.location)


def run_status(app: Flask, run_id: str) -> str:
    with app.app_context():
        return scoria.get_run(run_id).status


def test_started_run_is_visible_at_its_url(operator_app: Flask, ops: FlaskClient) -> None:
    run_id = start(operator_app)
    html = page(ops, f"/scoria/workflows/{run_id}")
    assert run_id in html
    assert 'data-status="waiting_for_approval"' in html
    assert "Publishing needs a human" in html
    assert 'href="/scoria/sessions/sess-1"' in html
    assert f'action="/scoria/workflows/{run_id}/approve"' in html
    assert "Approve and resume" in html
    assert html.count('id="delegated-evidence"') == 1
    assert "No work was handed to another role in this run." in html
    assert re.search(r'data-event-type="waiting_for_approval"', html)


def test_approve_on_the_page_resumes_with_the_registered_handler(
    operator_app: Flask, ops: FlaskClient
) -> None:
    run_id = start(operator_app)
    html = post_form(ops, run_id, "approve", note="ship it")
    assert 'data-status="completed"' in html
    assert 'data-event-type="step_completed"' in html
    assert 'data-event-type="run_completed"' in html
    assert "ship it" in html
    assert "by <code>ops</code>" in html
    assert "Approved. The run is now completed." in html
    with operator_app.app_context():
        detail = scoria.get_run_detail(run_id)
    assert detail.approvals[0].decided_by == "ops"
    assert detail.approvals[0].note == "ship it"
    assert detail.steps[0].result_envelope == {"published": True}


def test_approve_without_a_registered_handler_waits_for_the_host(
    operator_app: Flask, ops: FlaskClient
) -> None:
    run_id = start(operator_app, kind="manual", handlers={"manual": ask_then_publish})
    first = page(ops, f"/scoria/workflows/{run_id}")
    assert "No handler is registered for <code>manual</code>" in first
    html = post_form(ops, run_id, "approve")
    assert "Approved. The run waits, approved, and continues when the app resumes it." in html
    assert 'id="run-status"><span class="badge badge-waiting_for_approval"' in html
    assert 'data-status="approved"' in html
    with operator_app.app_context():
        resumed = scoria.resume_run(run_id, handlers={"manual": ask_then_publish})
    assert resumed.status == "completed"


def test_reject_on_the_page(operator_app: Flask, ops: FlaskClient) -> None:
    run_id = start(operator_app)
    shown = page(ops, f"/scoria/workflows/{run_id}")
    token, decision_for = csrf(shown), approval_id(shown)
    html = post_form(ops, run_id, "reject", note="not today")
    assert 'data-status="rejected"' in html
    assert "not today" in html
    assert 'data-event-type="run_rejected"' in html
    assert "action=" not in html.split('id="decisions"')[0].split("</header>")[1]
    again = ops.post(
        f"/scoria/workflows/{run_id}/approve",
        data={"csrf_token": token, "approval_id": decision_for},
    )
    assert "already" in page(ops, again.location).lower()
    assert run_status(operator_app, run_id) == "rejected"


def two_gates(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    """Ask to publish, then, once that is approved, ask to notify the customers."""
    if step.approval is None:
        return WaitForApproval("publish", {"env": "prod"})
    if step.approval.tool_name == "publish":
        return WaitForApproval("notify_customers", {"audience": "everyone"})
    return Succeed({"notified": True})


def test_a_stale_page_cannot_decide_a_later_approval(
    operator_app: Flask, runtime: Scoria, ops: FlaskClient
) -> None:
    runtime.handler("gates")(two_gates)
    run_id = start(operator_app, kind="gates")
    stale = page(ops, f"/scoria/workflows/{run_id}")
    post_form(ops, run_id, "approve")  # a colleague approves "publish"; "notify" is asked
    with operator_app.app_context():
        pending = scoria.get_run_detail(run_id).approvals[-1]
    assert (pending.tool_name, pending.status) == ("notify_customers", "pending")

    stale_form = {"csrf_token": csrf(stale), "approval_id": approval_id(stale)}
    response = ops.post(f"/scoria/workflows/{run_id}/reject", data=stale_form)
    assert "already approved by &#39;ops&#39;" in page(ops, response.location)
    # The same approval again, as its decider: that decision stands, nothing else is decided.
    response = ops.post(f"/scoria/workflows/{run_id}/approve", data=stale_form)
    again = page(ops, response.location)
    assert "flash-error" not in again
    assert "Approved. The run now waits for another approval: notify_customers." in again
    with operator_app.app_context():
        detail = scoria.get_run_detail(run_id)
    assert detail.summary.status == "waiting_for_approval"
    assert [(a.tool_name, a.status) for a in detail.approvals] == [
        ("publish", "approved"),
        ("notify_customers", "pending"),
    ]


def test_a_decision_without_its_approval_id_is_refused(
    operator_app: Flask, ops: FlaskClient
) -> None:
    run_id = start(operator_app)
    token = csrf(page(ops, f"/scoria/workflows/{run_id}"))
    for action in ("approve", "reject"):
        response = ops.post(f"/scoria/workflows/{run_id}/{action}", data={"csrf_token": token})
        assert response.status_code == 400
        assert "Reload the page" in response.get_data(as_text=True)
    assert run_status(operator_app, run_id) == "waiting_for_approval"


def test_handoff_run_shows_its_delegated_evidence(operator_app: Flask, ops: FlaskClient) -> None:
    who = scoria.identity({"actor_id": "alice", "tenant_id": TENANT})
    with operator_app.app_context():
        run_id = scoria.start_handoff_run(
            who,
            "critic",
            root_role_id="writer",
            delegated_kind="review",
            handoff_input={"draft": "Trains are fine."},
            projected_context={
                "zeta": "last",
                "policy": "p" * 120,
                "audience": "staff",
                "budget": 3,
            },
            capability_tags=["read-only"],
        ).run_id
    html = page(ops, f"/scoria/workflows/{run_id}")
    section = html.split('id="delegated-evidence"')[1].split("</section>")[0]
    assert html.count('id="delegated-evidence"') == 1
    assert "No work was handed to another role" not in section
    assert 'href="#delegated-evidence">Inspect Delegated Evidence' in html
    assert "<strong>writer</strong> → <strong>critic</strong>" in section
    assert "<code>review</code>" in section
    assert 'data-status="queued"' in section
    preview = section.split("<h3>Projected context preview</h3>")[1].split("</dl>")[0]
    assert re.findall(r"<dt>(\w+)</dt>", preview) == ["audience", "budget", "policy"]
    assert "p" * 77 + "..." in preview and "p" * 78 not in preview
    assert '<p class="more">1 more in the full context below</p>' in section  # zeta
    assert "Trains are fine." in section and "read-only" in section
    assert "no handler is registered for <code>review</code>" in html


def test_a_handoff_without_a_child_says_child_step_pending(
    operator_app: Flask, ops: FlaskClient, runtime: Scoria
) -> None:
    engine = runtime.storage(operator_app).engine
    run_id = start(operator_app, kind="chain", runtime={"metadata": {"levels": 1}})
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE scoria_handoffs SET child_step_id = NULL"))
    html = page(ops, f"/scoria/workflows/{run_id}")
    section = html.split('id="delegated-evidence"')[1].split("</section>")[0]
    assert "child step pending" in section
    assert "has not produced a child step yet" in section


def test_other_tenants_unknown_and_malformed_ids_look_the_same(
    operator_app: Flask, ops: FlaskClient
) -> None:
    theirs = start(operator_app, tenant="globex")
    untenanted = start(operator_app, tenant=None)
    urls = [
        f"/scoria/workflows/{theirs}",
        f"/scoria/workflows/{untenanted}",
        "/scoria/workflows/01900000-0000-7000-8000-000000000000",
        "/scoria/workflows/not-a-run",
        "/scoria/workflows/%27%3B--",
    ]
    bodies = {page(ops, url, 404) for url in urls}
    assert len(bodies) == 1
    assert theirs not in bodies.pop()
    polled = {page(ops, f"{url}/status.json", 404) for url in urls}
    assert len(polled) == 1
    assert theirs not in polled.pop()
    own = page(ops, f"/scoria/workflows/{start(operator_app)}")
    form = {"csrf_token": csrf(own), "approval_id": approval_id(own)}
    for action in ("approve", "reject"):
        response = ops.post(f"/scoria/workflows/{theirs}/{action}", data=form)
        assert response.status_code == 404
    assert run_status(operator_app, theirs) == "waiting_for_approval"
    assert theirs not in page(ops, "/scoria/workflows")
    assert theirs not in page(ops, "/scoria/approvals")
    assert theirs not in page(ops, "/scoria/sessions/sess-1")


@pytest.mark.parametrize(
    "scope", [None, {"tenant_id": "  ", "actor_id": "ops"}, {"actor_id": "ops"}, "acme"]
)
def test_no_scope_is_forbidden(operator_app: Flask, scope: Any) -> None:
    run_id = start(operator_app)
    client = operator_app.test_client()
    sign_in(client, scope)
    for url in ("/scoria/workflows", f"/scoria/workflows/{run_id}", "/scoria/approvals"):
        html = page(client, url, 403)
        assert "@runtime.operator_scope" in html
        assert run_id not in html
    assert client.post(f"/scoria/workflows/{run_id}/approve").status_code == 403
    assert run_status(operator_app, run_id) == "waiting_for_approval"


def test_without_a_resolver_every_page_is_forbidden(app: Flask, client: FlaskClient) -> None:
    run_id = start(app, kind=None)
    assert "@runtime.operator_scope" in page(client, "/scoria/workflows", 403)
    page(client, f"/scoria/workflows/{run_id}", 403)
    page(client, f"/scoria/workflows/{run_id}/status.json", 403)


def test_a_post_without_a_valid_csrf_token_changes_nothing(
    operator_app: Flask, ops: FlaskClient
) -> None:
    run_id = start(operator_app)
    page(ops, f"/scoria/workflows/{run_id}")
    other = operator_app.test_client()
    sign_in(other, {"tenant_id": TENANT, "actor_id": "mallory"})
    foreign = csrf(page(other, f"/scoria/workflows/{run_id}"))
    for data in ({}, {"csrf_token": ""}, {"csrf_token": "forged"}, {"csrf_token": foreign}):
        for action in ("approve", "reject"):
            response = ops.post(f"/scoria/workflows/{run_id}/{action}", data=data)
            assert response.status_code == 400
            assert "security token" in response.get_data(as_text=True)
    assert ops.get(f"/scoria/workflows/{run_id}/approve").status_code == 303  # to the run page
    with operator_app.app_context():
        detail = scoria.get_run_detail(run_id)
    assert detail.summary.status == "waiting_for_approval"
    assert [approval.status for approval in detail.approvals] == ["pending"]


def test_payloads_render_inert(operator_app: Flask, ops: FlaskClient) -> None:
    hostile = {"note": "<script>alert(1)</script>", "html": '"><img src=x onerror=alert(2)>'}

    def ask(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        return WaitForApproval("<b>tool</b>", hostile, reason="<i>why</i>")

    who = scoria.identity({"actor_id": '"><svg onload=x>', "tenant_id": TENANT, "session_id": "s"})
    with operator_app.app_context():
        run_id = scoria.start_run(
            who, initial_step={"kind": "x"}, handlers={"x": ask}, runtime={"metadata": hostile}
        ).run_id
    for html in (page(ops, f"/scoria/workflows/{run_id}"), page(ops, "/scoria/approvals")):
        assert "<script>alert" not in html
        assert "<img src=x" not in html
        assert "<svg" not in html and "<b>tool" not in html and "<i>why" not in html
        assert "&lt;b&gt;tool&lt;/b&gt;" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page(ops, f"/scoria/workflows/{run_id}")


def test_secret_values_never_reach_the_page(database_uri: str, tmp_path: Path) -> None:
    app = create_test_app(database_uri, tmp_path / "i", SCORIA_REDACT_KEYS=["SSN"])
    runtime: Scoria = app.extensions["scoria"]
    runtime.operator_scope(from_session)
    secrets = {
        "password": "hunter2-pw",
        "nested": [{"apiKey": "sk-live-1"}, {"X-Auth-Token": "tok-2"}],
        "ssn": "078-05-1120",
        "customerSsn": "219-09-9999",
        "messages": [{"role": "user", "content": "my card is 4111-1111"}],
        "chat_history": ["earlier turn with a phone number 555-0100"],
        "session": {"user_id": "raw-session-state"},
        "session_id": "chat-visible",
        "db_password": "pw-3",
        "Authorization": "Bearer abc-4",
        "max_tokens": 256,
    }

    def ask(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        if step.approval is None:
            return WaitForApproval("login", secrets)
        return Succeed(secrets)

    who = scoria.identity({"tenant_id": TENANT})
    with app.app_context():
        run_id = scoria.start_run(
            who, initial_step={"kind": "x"}, handlers={"x": ask}, runtime={"metadata": secrets}
        ).run_id
        scoria.approve_run(run_id, decided_by="ops")
        scoria.resume_run(run_id, handlers={"x": ask})
    client = app.test_client()
    sign_in(client, {"tenant_id": TENANT, "actor_id": "ops"})
    html = page(client, f"/scoria/workflows/{run_id}")
    hidden = ("hunter2-pw", "sk-live-1", "tok-2", "078-05-1120", "219-09-9999", "pw-3", "abc-4")
    hidden += ("4111-1111", "555-0100", "raw-session-state")
    for value in hidden:
        assert value not in html
    assert "&#34;messages&#34;: &#34;[REDACTED]&#34;" in html
    assert "&#34;session_id&#34;: &#34;chat-visible&#34;" in html
    assert "&#34;password&#34;: &#34;[REDACTED]&#34;" in html
    assert "&#34;apiKey&#34;: &#34;[REDACTED]&#34;" in html
    assert "&#34;max_tokens&#34;: 256" in html
    app.extensions["scoria"].storage(app).engine.dispose()


def test_pagination_is_stable_under_inserts(operator_app: Flask, ops: FlaskClient) -> None:
    older = [start(operator_app, kind=None) for _ in range(53)]
    first = page(ops, "/scoria/workflows")
    shown = re.findall(r'href="/scoria/workflows/([0-9a-f-]{36})"', first)
    assert shown == older[::-1][:50]
    next_url = re.search(r'rel="next" href="([^"]+)"', first)
    assert next_url
    newer = [start(operator_app, kind=None) for _ in range(4)]
    second = page(ops, next_url.group(1).replace("&amp;", "&"))
    rest = re.findall(r'href="/scoria/workflows/([0-9a-f-]{36})"', second)
    assert rest == older[::-1][50:]
    assert 'rel="next"' not in second and "End of the list." in second
    assert set(newer).isdisjoint(rest)
    assert (
        re.findall(r'href="/scoria/workflows/([0-9a-f-]{36})"', page(ops, "/scoria/workflows"))[:4]
        == newer[::-1]
    )
    page(ops, "/scoria/workflows?after=garbage", 400)


def test_filters_and_session_page(operator_app: Flask, ops: FlaskClient) -> None:
    waiting = start(operator_app)
    done = start(operator_app, kind=None)
    with operator_app.app_context():
        other_session = scoria.start_run(
            scoria.identity({"actor_id": "bob", "tenant_id": TENANT, "session_id": "sess-2"}),
            root_role_id="planner",
        ).run_id
    ids = re.compile(r'href="/scoria/workflows/([0-9a-f-]{36})"')
    assert ids.findall(page(ops, "/scoria/workflows?status=waiting_for_approval")) == [waiting]
    assert ids.findall(page(ops, "/scoria/workflows?actor=bob")) == [other_session]
    assert ids.findall(page(ops, "/scoria/workflows?role=planner")) == [other_session]
    assert ids.findall(page(ops, "/scoria/workflows?session=sess-1&status=completed")) == [done]
    assert ids.findall(page(ops, "/scoria/sessions/sess-1")) == [done, waiting]
    assert "No runs recorded" in page(ops, "/scoria/sessions/nobody")
    nul = page(ops, "/scoria/sessions/sess%00-1")
    assert "No runs recorded" in nul and "\x00" not in nul and "sess\ufffd-1" in nul
    inbox = page(ops, "/scoria/approvals")
    assert ids.findall(inbox) == [waiting]
    assert "<code>publish</code>" in inbox


def test_status_json_follows_the_run(operator_app: Flask, ops: FlaskClient) -> None:
    run_id = start(operator_app)
    before = ops.get(f"/scoria/workflows/{run_id}/status.json").get_json()
    assert before["status"] == "waiting_for_approval" and before["terminal"] is False
    html = page(ops, f"/scoria/workflows/{run_id}")
    assert f'data-updated-at="{before["updated_at"]}"' in html
    with operator_app.app_context():
        scoria.approve_run(run_id, decided_by="someone-else")
    after = ops.get(f"/scoria/workflows/{run_id}/status.json").get_json()
    assert after["status"] == "waiting_for_approval"
    assert after["updated_at"] != before["updated_at"]
    assert "data-poll-url" not in page(ops, f"/scoria/workflows/{start(operator_app, kind=None)}")


def test_security_headers(operator_app: Flask, ops: FlaskClient) -> None:
    run_id = start(operator_app)
    anonymous = operator_app.test_client()
    responses = [
        ops.get(f"/scoria/workflows/{run_id}"),
        ops.get("/scoria/workflows"),
        ops.get(f"/scoria/workflows/{run_id}/status.json"),
        ops.get("/scoria/workflows/nope"),
        anonymous.get("/scoria/workflows"),
    ]
    for response in responses:
        csp = response.headers["Content-Security-Policy"]
        assert "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp
        assert "script-src 'self'" in csp and "style-src 'self'" in csp
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"]
        assert response.headers["Cache-Control"] == "no-store"
    html = responses[0].get_data(as_text=True)
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert " style=" not in html and "<style" not in html and " on" + "click=" not in html
    static = ops.get("/scoria/static/scoria/operator.css")
    assert static.status_code == 200 and "no-store" not in static.headers.get("Cache-Control", "")
    static.close()


@contextmanager
def recorded_queries(runtime: Scoria, app: Flask) -> Iterator[list[tuple[str, Any]]]:
    """The statements run on the app's engine in the block, with their parameters."""
    statements: list[tuple[str, Any]] = []
    engine = runtime.storage(app).engine

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        statements.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def test_queries_per_page_do_not_grow_with_what_is_shown(
    operator_app: Flask, ops: FlaskClient, runtime: Scoria
) -> None:
    small = start(operator_app, kind="chain", runtime={"metadata": {"levels": 0}})
    big = start(operator_app, kind="chain", runtime={"metadata": {"levels": 12}})
    with operator_app.app_context():
        assert len(scoria.get_run_detail(big).steps) == 13

    def queries(url: str) -> int:
        with recorded_queries(runtime, operator_app) as statements:
            page(ops, url)
        return len(statements)

    assert queries(f"/scoria/workflows/{small}") == queries(f"/scoria/workflows/{big}")
    start(operator_app)
    few_runs, few_waiting = queries("/scoria/workflows"), queries("/scoria/approvals")
    for _ in range(12):
        start(operator_app)
    assert queries("/scoria/workflows") == few_runs
    assert queries("/scoria/approvals") == few_waiting
    assert queries("/scoria/sessions/sess-1") == few_runs
    # The inbox's count, the page, the expiries of its open runs, and which of its runs
    # waiting for approval were approved already.
    assert few_runs <= 4


@pytest.mark.parametrize(
    ("query", "column"),
    [
        ("", "tenant_id"),
        ("?status=waiting_for_approval", "status"),
        ("?actor=alice", "actor_id"),
        ("?role=executor", "root_role_id"),
        ("?session=sess-1", "session_id"),
        # Not the many runs of the tenant in that status, but the actor's or session's.
        ("?status=completed&actor=alice", "actor_id"),
        ("?status=running&session=sess-1", "session_id"),
        ("?status=waiting_for_approval&actor=alice&session=sess-1", None),
    ],
)
def test_runs_list_walks_an_index_in_page_order(
    operator_app: Flask,
    ops: FlaskClient,
    runtime: Scoria,
    backend: str,
    query: str,
    column: str | None,
) -> None:
    """A filter is an index condition, not a check of each run: no scan, no sort."""
    start(operator_app)
    with recorded_queries(runtime, operator_app) as statements:
        page(ops, f"/scoria/workflows{query}")
    [(statement, parameters)] = [
        (sql, params)
        for sql, params in statements
        if "FROM scoria_runs" in sql and "ORDER BY" in sql and "scoria_approvals" not in sql
    ]
    plan = query_plan(runtime.storage(operator_app).engine, statement, parameters)
    if backend == "sqlite":
        assert "SEARCH scoria_runs USING INDEX" in plan, plan
        assert column is None or f"{column}=?" in plan, plan
        assert "TEMP B-TREE" not in plan, plan
    else:
        # On a table this small, PostgreSQL's choice among indexes is a tie;
        # it only has to avoid a scan and a sort.
        assert "Index Scan Backward" in plan and "Seq Scan" not in plan, plan
        assert column is None or "Sort" not in plan, plan
        if column == "status":
            # The index of runs by status leaves out completed runs; a prepared
            # statement's plan, made for any status, still walks it.
            plan = generic_plan(runtime.storage(operator_app).engine, statement, parameters)
            assert "ix_scoria_runs_status_tenant_created" in plan, plan


def query_plan(engine: sa.Engine, statement: str, parameters: Any) -> str:
    """How the database runs ``statement``; on PostgreSQL, not scanning tables if it can."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            return " | ".join(str(row[-1]) for row in rows)
        conn.exec_driver_sql("SET enable_seqscan = off")
        rows = conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)
        return " | ".join(str(row[0]) for row in rows)


def generic_plan(engine: sa.Engine, statement: str, parameters: dict[str, Any]) -> str:
    """PostgreSQL's plan of ``statement`` prepared for any parameters, as a driver may."""
    names: list[str] = []

    def numbered(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    def literal(value: Any) -> str:
        if isinstance(value, list):  # an array's text, which PostgreSQL reads as the type asked
            return "'{" + ",".join(str(item) for item in value) + "}'"
        if isinstance(value, str):  # a StrEnum too
            value = str(value)
        return str(sa.literal(value).compile(engine, compile_kwargs={"literal_binds": True}))

    prepared = re.sub(r"%\((\w+)\)s", numbered, statement)
    arguments = ", ".join(literal(parameters[name]) for name in names)
    with engine.connect() as conn:
        conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        # A name of its own: the rollback that returns the connection to the pool keeps
        # a prepared statement, and a failed EXPLAIN leaves no way to deallocate it.
        name = f"plan_{uuid.uuid4().hex}"
        conn.exec_driver_sql(f"PREPARE {name} AS {prepared}")
        rows = conn.exec_driver_sql(f"EXPLAIN EXECUTE {name}({arguments})").all()
        conn.exec_driver_sql(f"DEALLOCATE {name}")
        return " | ".join(str(row[0]) for row in rows)


def test_inbox_and_handoff_pages_walk_their_own_index(
    operator_app: Flask, ops: FlaskClient, runtime: Scoria
) -> None:
    """The inbox reads only the tenant's pending approvals (and counts them, for the badge
    of every page), a run page only that run's handoffs, each in page order from an index."""
    start(operator_app, tenant="globex")
    start(operator_app)
    chained = start(operator_app, kind="chain", runtime={"metadata": {"levels": 3}})
    for url, table, index, count in (
        (
            "/scoria/approvals",
            "scoria_approvals",
            "ix_scoria_approvals_tenant_pending_requested",
            2,
        ),
        (f"/scoria/workflows/{chained}", "scoria_handoffs", "ix_scoria_handoffs_run_created", 1),
    ):
        with recorded_queries(runtime, operator_app) as statements:
            page(ops, url)
        ordered = [
            (sql, params)
            for sql, params in statements
            if f"FROM {table}" in sql and "ORDER BY" in sql
        ]
        assert len(ordered) == count, ordered
        for statement, parameters in ordered:
            plan = query_plan(runtime.storage(operator_app).engine, statement, parameters)
            assert index in plan and f"SCAN {table} " not in plan, plan
            assert "Seq Scan" not in plan, plan


@pytest.mark.own_database
def test_which_listed_runs_await_resume_is_asked_by_key(
    operator_app: Flask, ops: FlaskClient, runtime: Scoria, backend: str
) -> None:
    """Neither the index of waiting runs nor that of pending approvals serves the question,
    which could walk them whole: each run is found by its key, its approvals by their run."""
    start(operator_app)
    engine = runtime.storage(operator_app).engine
    if backend == "sqlite":  # a plan made without statistics of the tables, for a page of runs
        asked = [str(uuid.uuid4()) for _ in range(50)]
        with recorded_queries(runtime, operator_app) as statements, operator_app.app_context():
            runs_awaiting_resume(asked, tenant=TENANT)
        [(statement, parameters)] = [
            (sql, params)
            for sql, params in statements
            if sql.startswith("SELECT scoria_runs.id \n")
        ]
        plan = query_plan(engine, statement, parameters)
        assert plan.startswith("SEARCH scoria_runs USING "), plan
        assert "(id=?)" in plan.split(" | ")[0], plan
        assert "ix_scoria_runs" not in plan and "ix_scoria_approvals_run (run_id=?)" in plan, plan
        return
    with engine.begin() as conn:  # a tenant with many runs waiting, for the planner's statistics
        conn.exec_driver_sql(
            "INSERT INTO scoria_runs (id, tenant_id, root_role_id, status, version,"
            " last_event_sequence, last_step_sequence, created_at, updated_at, metadata)"
            " SELECT gen_random_uuid(), %(tenant)s, 'executor', 'waiting_for_approval', 1, 1, 1,"
            " now(), now(), '{}' FROM generate_series(1, 5000)",
            {"tenant": TENANT},
        )
        conn.exec_driver_sql(
            "INSERT INTO scoria_approvals (id, run_id, step_id, status, tool_name, requested_at,"
            " editable, tenant_id) SELECT gen_random_uuid(), id, gen_random_uuid(), 'pending',"
            " 'publish', now(), false, tenant_id FROM scoria_runs"
        )
        conn.exec_driver_sql("ANALYZE scoria_runs, scoria_approvals")
    with recorded_queries(runtime, operator_app) as statements:
        page(ops, "/scoria/workflows")
    [(statement, parameters)] = [
        (sql, params) for sql, params in statements if sql.startswith("SELECT scoria_runs.id \n")
    ]
    # Statuses written out would let the planner walk a partial index of them.
    assert "'pending'" not in statement and "'completed'" not in statement, statement
    plan = generic_plan(engine, statement, parameters)
    assert "pk_scoria_runs" in plan and "ix_scoria_approvals_run" in plan, plan
    assert "Seq Scan" not in plan and "pending" not in plan.split("Index Cond")[0], plan


def test_prefix_and_template_overrides(database_uri: str, tmp_path: Path) -> None:
    app = create_test_app(database_uri, tmp_path / "i", SCORIA_URL_PREFIX="/ops/runs/")
    templates = tmp_path / "templates" / "scoria"
    templates.mkdir(parents=True)
    (templates / "base.html").write_text(
        "<!doctype html><title>host</title><p id=host-nav>Host nav</p>"
        "{% block content %}{% endblock %}"
    )
    app.template_folder = str(tmp_path / "templates")
    app.extensions["scoria"].operator_scope(lambda: {"tenant_id": TENANT, "actor_id": "ops"})
    run_id = start(app, kind=None)
    client = app.test_client()
    html = page(client, f"/ops/runs/workflows/{run_id}")
    assert "Host nav" in html and run_id in html
    assert client.get("/scoria/workflows").status_code == 404
    static = client.get("/ops/runs/static/scoria/operator.js")
    assert static.status_code == 200
    static.close()
    app.extensions["scoria"].storage(app).engine.dispose()


def test_an_error_message_is_evidence_not_a_secret(operator_app: Flask, ops: FlaskClient) -> None:
    def broken(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        raise ConnectionError("upstream API returned 502")

    run_id = start(operator_app, kind="flaky", handlers={"flaky": broken})
    html = page(ops, f"/scoria/workflows/{run_id}")
    assert "upstream API returned 502" in html
    assert 'data-status="failed"' in html


@pytest.mark.parametrize(
    "url",
    [
        "/scoria/workflows?_method=PATCH",
        "/scoria/workflows?_external=1&_anchor=x&_scheme=javascript",
        "/scoria/sessions/sess-1?session_id=other",
        "/scoria/approvals?run_id=x",
    ],
)
def test_unknown_query_arguments_stay_out_of_page_links(
    operator_app: Flask, ops: FlaskClient, url: str
) -> None:
    start(operator_app)
    later = Cursor(datetime.now(UTC) + timedelta(days=1), uuid.uuid4()).encode()
    html = page(ops, f"{url}&after={later}")
    assert 'class="pager"' in html
    assert "javascript" not in html and "_method" not in html and "http://" not in html
    assert "session_id=" not in html and "run_id=" not in html


@pytest.mark.parametrize("after", ["99999999999999999999." + "0" * 32, "1.zz", "junk"])
def test_a_malformed_page_cursor_is_a_clear_400(ops: FlaskClient, after: str) -> None:
    response = ops.get(f"/scoria/workflows?after={after}")
    assert response.status_code == 400
    assert "start again from the first page" in response.get_data(as_text=True)


def test_a_session_id_with_slashes_has_its_page(operator_app: Flask, ops: FlaskClient) -> None:
    who = scoria.identity({"actor_id": "alice", "tenant_id": TENANT, "session_id": "chat/42"})
    with operator_app.app_context():
        run_id = scoria.start_run(who).run_id
    assert 'href="/scoria/sessions/chat/42"' in page(ops, f"/scoria/workflows/{run_id}")
    assert run_id in page(ops, "/scoria/sessions/chat/42")


def test_pages_without_a_secret_key_say_what_is_missing(tmp_path: Path) -> None:
    app = create_test_app(f"sqlite:///{tmp_path / 'scoria.sqlite3'}", tmp_path)
    app.config["SECRET_KEY"] = None
    app.extensions["scoria"].operator_scope(lambda: {"tenant_id": TENANT, "actor_id": "ops"})
    response = app.test_client().get("/scoria/workflows")
    assert response.status_code == 500
    assert "SECRET_KEY" in response.get_data(as_text=True)
    app.extensions["scoria"].storage(app).engine.dispose()


def test_an_approval_without_a_handler_here_says_the_app_resumes(
    operator_app: Flask, ops: FlaskClient
) -> None:
    run_id = start(operator_app, kind="manual", handlers={"manual": ask_then_publish})
    html = post_form(ops, run_id, "approve")
    assert "The run waits until the app resumes it" in html and "resume_run" not in html
    assert 'id="awaiting-resume"' in html and f"flask scoria resume {run_id}" in html
    status = html.split('id="run-status">')[1].split("</span>")[0]
    assert ">approved, awaiting resume" in status
    # Its step says the same, not "waiting for approval".
    step = html.split('<div class="step-head">')[1].split("</strong>")[0]
    assert 'data-status="waiting_for_approval">approved, awaiting resume</span>' in step
    assert 'name="approval_id"' not in html
    # Without a registered handler the operator cannot resume it here: the app does.
    assert f"/scoria/workflows/{run_id}/resume" not in html


def test_an_approved_run_left_waiting_can_be_resumed_from_its_page(
    operator_app: Flask, ops: FlaskClient
) -> None:
    run_id, waiting = start(operator_app), start(operator_app)
    with operator_app.app_context():
        scoria.approve_run(run_id, decided_by="ops")  # approved, never resumed
    # The lists tell it from a run still waiting for its decision.
    for url in ("/scoria/workflows", "/scoria/sessions/sess-1"):
        listed = page(ops, url)
        for shown, label in (
            (run_id, "approved, awaiting resume"),
            (waiting, "waiting for approval"),
        ):
            (row,) = [
                item for item in re.split(r"<tr>|<li>", listed) if f"/workflows/{shown}" in item
            ]
            assert f'data-status="waiting_for_approval">{label}</span>' in row, url
    filtered = page(ops, "/scoria/workflows?status=awaiting_resume")
    assert 'data-status="waiting_for_approval">approved, awaiting resume</span>' in filtered
    assert run_id[-8:] in filtered and waiting[-8:] not in filtered
    with operator_app.app_context():
        rejected = start(operator_app)
        scoria.reject_run(rejected, decided_by="ops")
        # Only runs of the tenant, waiting for approval, whose approval was granted.
        elsewhere = start(operator_app, tenant="globex")
        scoria.approve_run(elsewhere, decided_by="ops")
        asked = [run_id, waiting, rejected, elsewhere, str(uuid.uuid4())]
        assert runs_awaiting_resume(asked, tenant=TENANT) == {run_id}
        assert runs_awaiting_resume(asked) == {run_id, elsewhere}
    html = page(ops, f"/scoria/workflows/{run_id}")
    assert f'action="/scoria/workflows/{run_id}/resume"' in html
    forged = ops.post(f"/scoria/workflows/{run_id}/resume", data={"csrf_token": "forged"})
    assert forged.status_code in (400, 403) and run_status(operator_app, run_id) != "completed"
    response = ops.post(f"/scoria/workflows/{run_id}/resume", data={"csrf_token": csrf(html)})
    assert response.status_code == 303
    assert run_status(operator_app, run_id) == "completed"
    assert "Resumed. The run is now completed." in page(ops, response.location)
    with operator_app.app_context():
        events = scoria.get_run_detail(run_id).events
    resumed = [event.payload for event in events if event.event_type == "resume_requested"]
    assert resumed == [{"requested_by": "ops"}]


def test_missing_tables_are_named_on_the_page(tmp_path: Path) -> None:
    app = create_test_app(f"sqlite:///{tmp_path / 'empty.sqlite3'}", tmp_path)
    app.extensions["scoria"].operator_scope(lambda: {"tenant_id": TENANT, "actor_id": "ops"})
    response = app.test_client().get("/scoria/workflows")
    assert response.status_code == 503
    assert "flask scoria db upgrade" in response.get_data(as_text=True)
    with app.app_context(), pytest.raises(scoria.StorageError, match="flask scoria db upgrade"):
        scoria.start_run(None)
    app.extensions["scoria"].storage(app).engine.dispose()


def test_an_unknown_status_filter_is_a_clear_400(ops: FlaskClient) -> None:
    response = ops.get("/scoria/workflows?status=bogus")
    assert response.status_code == 400
    assert "There is no run status &#39;bogus&#39;" in response.get_data(as_text=True)


def test_ids_with_direction_controls_are_shown_written_out(
    operator_app: Flask, ops: FlaskClient
) -> None:
    """An actor id whose right-to-left override would make it read "admin"."""
    with operator_app.app_context():
        run = scoria.start_run(
            {"actor_id": "\u202enimda", "tenant_id": "acme", "session_id": "s\u200b-1"}
        )
    for url in (
        f"/scoria/workflows/{run.run_id}",
        "/scoria/workflows",
        "/scoria/sessions/s%E2%80%8B-1",
    ):
        html = ops.get(url).get_data(as_text=True)
        assert "\u202e" not in html and "\u200b" not in html, url
        assert "\\u202enimda" in html and "s\\u200b-1" in html, url


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgres://app:s3cret@db/prod", "postgres://app:***@db/prod"),
        ("x foo.redis://:pw@h", "x foo.redis://:***@h"),
        ("glued" * 10 + "mysql://u:p@h", "glued" * 10 + "mysql://u:***@h"),
        ("no url here: a:b@c", "no url here: a:b@c"),
        ("a." * 20_000, "a." * 20_000),
    ],
)
def test_url_passwords_are_masked_wherever_the_scheme_starts(text: str, masked: str) -> None:
    assert redaction.mask_passwords(text, "***") == masked


@pytest.mark.parametrize(
    ("key", "normalized"),
    [
        ("HTTPServer", "http_server"),
        ("myAPIKeyValue", "my_api_key_value"),
        ("AAbCCd", "a_ab_c_cd"),
        ("Request-Headers", "request_headers"),
        ("A" * 20_000, "a" * 20_000),
    ],
)
def test_keys_are_normalized_at_every_word_boundary(key: str, normalized: str) -> None:
    assert redaction.normalize_key(key) == normalized


def test_reasons_and_notes_mask_url_passwords(operator_app: Flask, ops: FlaskClient) -> None:
    def ask_with_reason(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        if step.approval is None:
            return WaitForApproval("migrate", reason="copy from postgres://app:s3cret@db/prod")
        return Succeed()

    run_id = start(operator_app, kind="migrate", handlers={"migrate": ask_with_reason})
    assert "s3cret" not in page(ops, "/scoria/approvals")
    html = page(ops, f"/scoria/workflows/{run_id}")
    assert "s3cret" not in html and "postgres://app:[REDACTED]@db/prod" in html
    note = "done with mysql://root:hunter2@10.0.0.5/x"
    decided = post_form(ops, run_id, "reject", note=note)
    assert "hunter2" not in decided and "mysql://root:[REDACTED]@10.0.0.5/x" in decided


def test_the_run_page_says_what_the_run_was_asked(operator_app: Flask, ops: FlaskClient) -> None:
    asked = {
        "payload": {"prompt": "<b>Book</b> a train to https://u:pw@example.com", "api_key": "k"}
    }
    run_id = start(operator_app, runtime={"metadata": asked})
    html = page(ops, f"/scoria/workflows/{run_id}")
    header = html.split('class="run-header"')[1].split("</header>")[0]
    prompt = header.split("<dt>Prompt</dt>")[1].split("</div>")[0]
    assert "&lt;b&gt;Book&lt;/b&gt; a train to https://u:[REDACTED]@example.com" in prompt
    assert "Whole prompt" not in prompt
    for metadata in ({}, {"payload": {"prompt": ["not", "text"]}}, {"payload": "Book a train"}):
        other = start(operator_app, runtime={"metadata": metadata})
        assert "<dt>Prompt</dt>" not in page(ops, f"/scoria/workflows/{other}")
    # A long prompt is clamped in the facts; its whole text, lines kept, one click away.
    lines = "\n".join(f"line {number} <i>" for number in range(8))
    long = start(operator_app, runtime={"metadata": {"payload": {"prompt": lines}}})
    header = page(ops, f"/scoria/workflows/{long}").split('class="run-header"')[1]
    whole = header.split("<summary>Whole prompt</summary>")[1].split("</details>")[0]
    assert whole == f'<pre class="json" dir="auto">{escape(lines)}</pre>'


@pytest.mark.parametrize("order", ["CSRFProtect first", "CSRFProtect after"])
def test_forms_work_in_an_app_protected_by_flask_wtf(
    database_uri: str, tmp_path: Path, order: str
) -> None:
    """Flask-WTF's ``CSRFProtect`` checks every POST of the app for its own token: the
    operator forms are left to their own check, and the host's views stay protected."""
    app = Flask("protected", instance_path=str(tmp_path / "instance"))
    app.config.update(SECRET_KEY="test-secret", SCORIA_DATABASE_URI=database_uri)
    protect = CSRFProtect()
    if order == "CSRFProtect first":
        protect.init_app(app)
    runtime = Scoria(app)
    if order == "CSRFProtect after":
        protect.init_app(app)
    runtime.operator_scope(from_session)
    runtime.handler("approval")(ask_then_publish)

    @app.post("/host-form")
    def host_form() -> str:
        return "accepted"

    run_id = start(app)
    client = app.test_client()
    sign_in(client, {"tenant_id": TENANT, "actor_id": "ops"})
    html = post_form(client, run_id, "approve")
    assert "completed" in html and run_status(app, run_id) == "completed"
    forged = start(app)
    response = client.post(f"/scoria/workflows/{forged}/reject", data={"csrf_token": "forged"})
    assert response.status_code == 400 and "security token" in response.get_data(as_text=True)
    assert client.post("/host-form").status_code == 400  # Flask-WTF still guards the host
    runtime.storage(app).engine.dispose()


def test_a_scope_may_be_the_operators_identity(
    app: Flask, runtime: Scoria, caplog: pytest.LogCaptureFixture
) -> None:
    """An Identity grants its tenant, as a mapping does; anything else denies, and says
    why in the log. A mapping's other keys (``tenant``, ``user``) grant nothing."""
    runtime.operator_scope(scoria.identity_from_session)
    run_id = start(app, kind=None)
    client = app.test_client()
    with client.session_transaction() as stored:
        stored.update(actor_id="ops", tenant_id=TENANT)
    assert run_id in page(client, "/scoria/workflows")
    runtime.operator_scope(lambda: TENANT)
    page(client, "/scoria/workflows", 403)
    assert "returned a str; return a mapping" in caplog.text
    caplog.clear()
    for aliased in ({"tenant_id": None}, {"tenant": TENANT}, {"tenant_id": "", "tenant": TENANT}):
        runtime.operator_scope(lambda aliased=aliased: aliased)
        page(client, "/scoria/workflows", 403)
    assert caplog.text == ""
    runtime.handler("approval")(ask_then_publish)
    paused = start(app)
    runtime.operator_scope(lambda: {"tenant_id": TENANT, "user": "auditor-7"})
    html = page(client, f"/scoria/workflows/{paused}")
    assert "names nobody to record" in html and "auditor-7" not in html
