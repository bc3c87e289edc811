"""Each flow of the guide through the assistant's pages, on a real SQLite file."""

from __future__ import annotations

import re

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

import flask_scoria as scoria
from examples.assistant import views
from examples.assistant.extensions import db


def post(client: FlaskClient, url: str, **form: str) -> TestResponse:
    with client.session_transaction() as session:
        token = session.setdefault("csrf", "test-token")
    return client.post(url, data={"csrf_token": token, **form})


def sign_in(client: FlaskClient, user_id: str) -> None:
    assert post(client, "/login", user_id=user_id).status_code == 302


def ask(client: FlaskClient, prompt: str) -> str:
    response = post(client, "/assistant/runs", prompt=prompt)
    assert response.status_code == 302
    match = re.fullmatch(r"/assistant/runs/([0-9a-f-]{36})", response.location)
    assert match, response.location
    return match.group(1)


def session_value(client: FlaskClient, key: str) -> str:
    with client.session_transaction() as session:
        return str(session[key])


def test_pages_need_a_sign_in(client: FlaskClient) -> None:
    assert client.get("/").location == "/login"
    page = client.get("/login").get_data(as_text=True)
    for user_id in ("alice", "bob", "ops", "zoe", "gus"):
        assert f'value="{user_id}"' in page


def test_sign_in_puts_actor_tenant_and_a_conversation_in_the_session(
    client: FlaskClient,
) -> None:
    sign_in(client, "alice")
    with client.session_transaction() as session:
        assert (session["actor_id"], session["tenant_id"]) == ("alice", "acme")
        assert session["assistant_session_id"].startswith("conv-")
    assert post(client, "/login", user_id="mallory").status_code == 400


def test_forms_need_the_csrf_token(client: FlaskClient) -> None:
    sign_in(client, "alice")
    assert client.post("/assistant/runs", data={"prompt": "hi"}).status_code == 400


def test_start_pauses_for_approval_with_the_prompt_in_metadata(
    app: Flask, client: FlaskClient
) -> None:
    sign_in(client, "alice")
    run_id = ask(client, "How do I rotate the <b>keys</b>?")
    assert session_value(client, "last_scoria_run_id") == run_id
    with app.app_context():
        run = scoria.get_run(run_id)
    assert run.status == "waiting_for_approval"
    assert (run.actor_id, run.tenant_id) == ("alice", "acme")
    assert run.session_id == session_value(client, "assistant_session_id")
    assert run.metadata["payload"] == {"prompt": "How do I rotate the <b>keys</b>?"}
    page = client.get(f"/assistant/runs/{run_id}").get_data(as_text=True)
    assert 'data-status="waiting_for_approval"' in page
    assert "Waiting for an operator to approve <code>draft_answer</code>" in page
    assert "/scoria/workflows/" not in page  # members are no operators
    assert "&lt;b&gt;keys&lt;/b&gt;" in page and "<b>keys</b>" not in page


def test_resume_after_approval_keeps_the_run_id(app: Flask, client: FlaskClient) -> None:
    sign_in(client, "alice")
    run_id = ask(client, "Summarise the launch plan")
    response = post(client, f"/assistant/runs/{run_id}/resume")
    assert response.location == f"/assistant/runs/{run_id}"
    assert "still waits for an operator" in client.get(response.location).get_data(as_text=True)
    with app.app_context():
        scoria.approve_run(run_id, decided_by="ops")
    page = client.get(f"/assistant/runs/{run_id}").get_data(as_text=True)
    assert 'id="resume"' in page
    post(client, f"/assistant/runs/{run_id}/resume")
    with app.app_context():
        run = scoria.get_run(run_id)
        detail = scoria.get_run_detail(run_id)
    assert run.status == "completed"
    assert [step.status for step in detail.steps] == ["completed"]
    page = client.get(f"/assistant/runs/{run_id}").get_data(as_text=True)
    assert "[stand-in assistant] Draft answer to: &#39;Summarise the launch plan&#39;" in page
    post(client, f"/assistant/runs/{run_id}/resume")
    assert "Nothing to resume: the run is completed" in client.get("/").get_data(as_text=True)


def test_same_session_fresh_run_and_the_session_timeline(app: Flask, client: FlaskClient) -> None:
    sign_in(client, "alice")
    first = ask(client, "first question")
    second = ask(client, "second question")
    assert first != second
    with app.app_context():
        runs = scoria.list_runs_for_session(session_value(client, "assistant_session_id"))
    assert [run.run_id for run in runs] == [second, first]
    assert len({run.session_id for run in runs}) == 1
    page = client.get("/").get_data(as_text=True)
    assert page.index(second) < page.index(first)
    assert "first question" in page and "(last)" in page
    post(client, "/conversations")
    assert session_value(client, "assistant_session_id") != runs[0].session_id
    assert first not in client.get("/").get_data(as_text=True)


def test_policy_draft_branches_to_a_bounded_review(app: Flask, client: FlaskClient) -> None:
    sign_in(client, "alice")
    draft = "Refunds follow the travel policy: 30 days."
    response = post(client, "/assistant/drafts", draft_answer=draft)
    handoff_run_id = session_value(client, "last_scoria_handoff_run_id")
    assert response.location == f"/assistant/runs/{handoff_run_id}"
    root_run_id = session_value(client, "last_scoria_run_id")
    assert root_run_id != handoff_run_id
    with app.app_context():
        detail = scoria.get_run_detail(handoff_run_id)
    assert detail.summary.root_role_id == "planner"
    assert detail.summary.session_id == session_value(client, "assistant_session_id")
    (delegated,) = detail.delegated_handoffs
    assert (delegated.delegated_role_id, delegated.delegated_kind) == ("critic", "review")
    assert delegated.child_status == "completed"
    assert delegated.projected_context == {
        "task": "policy-and-accuracy review",
        "draft_answer": draft,
    }
    page = client.get(response.location).get_data(as_text=True)
    assert "cite the policy section" in page


def test_draft_without_policy_is_a_plain_turn(app: Flask, client: FlaskClient) -> None:
    sign_in(client, "alice")
    response = post(client, "/assistant/drafts", draft_answer="All good.")
    run_id = session_value(client, "last_scoria_run_id")
    assert response.location == f"/assistant/runs/{run_id}"
    with app.app_context():
        detail = scoria.get_run_detail(run_id)
    assert detail.summary.status == "completed" and not detail.delegated_handoffs
    with client.session_transaction() as session:
        assert "last_scoria_handoff_run_id" not in session


def test_answer_page_offers_the_review_for_policy_answers(app: Flask, client: FlaskClient) -> None:
    sign_in(client, "alice")
    run_id = ask(client, "What does the expense policy say?")
    with app.app_context():
        scoria.approve_run(run_id, decided_by="ops")
        scoria.resume_run(run_id)
    page = client.get(f"/assistant/runs/{run_id}").get_data(as_text=True)
    assert "gets a bounded policy review" in page


def test_another_tenant_sees_not_found(client: FlaskClient) -> None:
    sign_in(client, "alice")
    run_id = ask(client, "private question")
    sign_in(client, "zoe")
    response = client.get(f"/assistant/runs/{run_id}")
    assert response.status_code == 404
    assert "Run not found" in response.get_data(as_text=True)
    assert client.get("/assistant/runs/not-a-run").status_code == 404
    assert post(client, f"/assistant/runs/{run_id}/resume").status_code == 404


@pytest.mark.parametrize(
    ("user_id", "scope"),
    [("ops", {"tenant_id": "acme", "actor_id": "ops"}), ("alice", None), (None, None)],
)
def test_operator_scope_follows_the_signed_in_role(
    app: Flask, client: FlaskClient, user_id: str | None, scope: dict[str, str] | None
) -> None:
    if user_id:
        sign_in(client, user_id)
    with client:
        client.get("/login")
        assert views.operator_scope() == scope


def test_autogenerate_ignores_the_scoria_tables(app: Flask) -> None:
    with app.app_context(), db.engine.connect() as conn:
        hidden = MigrationContext.configure(conn, opts={"include_name": scoria.include_name})
        assert compare_metadata(hidden, db.metadata) == []
        naive = MigrationContext.configure(conn)
        dropped = {diff[1].name for diff in compare_metadata(naive, db.metadata)}
    assert "scoria_runs" in dropped


def test_the_sqlite_database_runs_in_wal_mode(app: Flask) -> None:
    with app.app_context(), db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
