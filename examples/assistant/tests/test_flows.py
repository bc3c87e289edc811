"""Each flow of the guide through the assistant's pages, on a real SQLite file."""

from __future__ import annotations

import re
import time
import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

import flask_scoria as scoria
from examples.assistant import mailer, views
from examples.assistant.extensions import db


def post(client: FlaskClient, url: str, **form: str) -> TestResponse:
    with client.session_transaction() as session:
        token = session.setdefault("csrf", "test-token")
    return client.post(url, data={"csrf_token": token, **form})


def sign_in(client: FlaskClient, user_id: str) -> None:
    assert post(client, "/login", user_id=user_id).status_code == 302


def ask(client: FlaskClient, prompt: str, form_key: str | None = None) -> str:
    """Submit the ask form, shown afresh unless ``form_key`` names the form shown before."""
    form_key = form_key or uuid.uuid4().hex
    response = post(client, "/assistant/runs", prompt=prompt, form_key=form_key)
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


def test_the_draft_waits_for_an_editable_expiring_approval(app: Flask, client: FlaskClient) -> None:
    sign_in(client, "alice")
    run_id = ask(client, "How do I rotate the <b>keys</b>?")
    assert session_value(client, "last_scoria_run_id") == run_id
    with app.app_context():
        run = scoria.get_run(run_id)
        detail = scoria.get_run_detail(run_id)
    assert run.status == "waiting_for_approval"
    assert (run.actor_id, run.tenant_id) == ("alice", "acme")
    assert run.session_id == session_value(client, "assistant_session_id")
    assert run.metadata["payload"] == {"prompt": "How do I rotate the <b>keys</b>?"}
    assert [(s.kind, s.status) for s in detail.steps] == [
        ("draft", "completed"),
        ("approval", "waiting_for_approval"),
    ]
    (approval,) = detail.approvals
    assert (approval.tool_name, approval.editable) == ("send_answer", True)
    assert approval.arguments == detail.steps[1].input
    assert approval.arguments is not None and approval.arguments["to"] == "alice"
    assert approval.arguments["answer"].startswith("[stand-in assistant] Draft answer to:")
    assert approval.expires_at is not None
    expires_in = (approval.expires_at - approval.requested_at).total_seconds()
    assert expires_in == app.config["APPROVAL_EXPIRES_IN"] == 3600
    page = client.get(f"/assistant/runs/{run_id}").get_data(as_text=True)
    assert 'data-status="waiting_for_approval"' in page
    assert "Waiting for an operator to approve <code>send_answer</code>" in page
    assert f'<time id="expires-at" datetime="{approval.expires_at.isoformat()}">' in page
    assert "/scoria/workflows/" not in page  # members are no operators
    assert "&lt;b&gt;keys&lt;/b&gt;" in page and "<b>keys</b>" not in page
    assert approval.arguments["answer"][:20] not in page  # not sent yet: not shown
    steps = re.findall(r'data-status="([^"]+)">', page.split('id="steps"')[1])
    assert steps == ["completed", "waiting_for_approval", "to do"]


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
    assert [(s.kind, s.status) for s in detail.steps] == [
        ("draft", "completed"),
        ("approval", "completed"),
        ("send", "completed"),
    ]
    page = client.get(f"/assistant/runs/{run_id}").get_data(as_text=True)
    assert "[stand-in assistant] Draft answer to: &#39;Summarise the launch plan&#39;" in page
    assert "Sent to <code>alice</code> as message <code>msg-" in page
    assert "edited the draft" not in page
    post(client, f"/assistant/runs/{run_id}/resume")
    assert "Nothing to resume: the run is completed" in client.get("/").get_data(as_text=True)


def test_the_operator_edits_the_answer_that_is_sent(app: Flask, client: FlaskClient) -> None:
    sign_in(client, "alice")
    run_id = ask(client, "When is the launch?")
    edited = {"to": "alice", "answer": "Launch is on <Monday>."}
    with app.app_context():
        done = scoria.approve_run(run_id, decided_by="ops", arguments=edited, resume=True)
        detail = scoria.get_run_detail(run_id)
    assert done.status == "completed"
    (approval,) = detail.approvals
    assert approval.edited_arguments == edited and approval.arguments != edited
    send = detail.steps[-1]
    assert (send.kind, send.input) == ("send", edited)
    message_id = (send.result_envelope or {})["message_id"]
    assert mailer.outbox[send.idempotency_key] == mailer.Message(
        message_id, "alice", edited["answer"]
    )
    page = client.get(f"/assistant/runs/{run_id}").get_data(as_text=True)
    assert '<blockquote id="answer">Launch is on &lt;Monday&gt;.</blockquote>' in page
    assert "an operator edited the draft before approving it" in page


def test_an_edit_without_an_answer_sends_nothing(app: Flask, client: FlaskClient) -> None:
    sign_in(client, "alice")
    run_id = ask(client, "Anything?")
    with app.app_context():
        done = scoria.approve_run(run_id, decided_by="ops", arguments={"to": "alice"}, resume=True)
        detail = scoria.get_run_detail(run_id)
    assert done.status == "failed"
    assert (detail.steps[-1].error_envelope or {})["type"] == "invalid_answer"
    assert detail.steps[-1].idempotency_key not in mailer.outbox
    # Resuming would send the same unusable answer again: the member is told to ask again.
    page = client.get(f"/assistant/runs/{run_id}").get_data(as_text=True)
    assert "The run failed: The approved arguments need a &#39;to&#39; and a non-empty" in page
    assert 'id="resume"' not in page and "Ask again in the" in page


def test_an_edit_to_empty_arguments_is_kept_not_replaced_by_the_draft(
    app: Flask, client: FlaskClient
) -> None:
    sign_in(client, "alice")
    run_id = ask(client, "Anything else?")
    with app.app_context():
        done = scoria.approve_run(run_id, decided_by="ops", arguments={}, resume=True)
        detail = scoria.get_run_detail(run_id)
    (approval,) = detail.approvals
    assert approval.edited_arguments == {} and approval.arguments
    # The handler got the empty edit, not the draft: only the member it pins is added.
    send = detail.steps[-1]
    assert (send.kind, send.input) == ("send", {"to": "alice"})
    assert done.status == "failed"
    assert (send.error_envelope or {})["type"] == "invalid_answer"
    assert send.idempotency_key not in mailer.outbox


def test_an_edit_cannot_send_the_answer_to_someone_else(app: Flask, client: FlaskClient) -> None:
    sign_in(client, "alice")
    run_id = ask(client, "My salary?")
    edited = {"to": "bob", "answer": "It is confidential."}
    with app.app_context():
        scoria.approve_run(run_id, decided_by="ops", arguments=edited, resume=True)
        sent = scoria.get_run_detail(run_id).steps[-1].result_envelope or {}
    assert (sent["sent_to"], sent["answer"]) == ("alice", "It is confidential.")


def test_signing_in_again_goes_on_with_the_last_conversation(client: FlaskClient) -> None:
    sign_in(client, "alice")
    conversation = session_value(client, "assistant_session_id")
    run_id = ask(client, "Where was I?")
    sign_in(client, "ops")
    assert session_value(client, "assistant_session_id") != conversation
    sign_in(client, "alice")
    assert session_value(client, "assistant_session_id") == conversation
    assert run_id in client.get("/").get_data(as_text=True)


def test_the_stand_in_sender_sends_once_per_key() -> None:
    key = uuid.uuid4().hex
    first = mailer.send(to="alice", text="Hello", idempotency_key=key)
    assert mailer.send(to="alice", text="Hello", idempotency_key=key) == first
    assert mailer.send(to="alice", text="Hello", idempotency_key=key + "x") != first


def test_a_double_submit_starts_one_run(app: Flask, client: FlaskClient) -> None:
    sign_in(client, "alice")
    form_key = uuid.uuid4().hex
    first = ask(client, "Order 40 chairs", form_key)
    assert ask(client, "Order 40 chairs", form_key) == first
    with app.app_context():
        (run,) = scoria.list_runs_for_session(session_value(client, "assistant_session_id"))
    assert run.run_id == first and run.idempotency_key and form_key in run.idempotency_key
    # The same form with another question (shown again by Back), or a new form: new runs.
    assert ask(client, "Order 41 chairs", form_key) != first
    assert ask(client, "Order 40 chairs") != first
    sign_in(client, "bob")
    assert ask(client, "Order 40 chairs", form_key) != first


def test_an_old_form_sent_in_a_new_conversation_asks_there(app: Flask, client: FlaskClient) -> None:
    sign_in(client, "alice")
    form_key = uuid.uuid4().hex
    first = ask(client, "Order 40 chairs", form_key)
    assert post(client, "/conversations").status_code == 302
    again = ask(client, "Order 40 chairs", form_key)  # the Back button, a stale tab
    assert again != first
    with app.app_context():
        run = scoria.get_run(again)
    assert run.session_id == session_value(client, "assistant_session_id")


def test_text_that_cannot_be_stored_is_refused_before_anything_is_written(
    app: Flask, client: FlaskClient
) -> None:
    sign_in(client, "alice")
    conversation = session_value(client, "assistant_session_id")
    asked = post(client, "/assistant/runs", prompt="a\x00b", form_key=uuid.uuid4().hex)
    assert asked.status_code == 302
    assert "NUL character" in client.get(asked.location).get_data(as_text=True)
    drafted = post(client, "/assistant/drafts", draft_answer="policy \x00")
    assert drafted.status_code == 400
    with app.app_context():
        assert scoria.list_runs_for_session(conversation) == []


def test_a_csrf_token_of_any_text_is_a_refused_form(client: FlaskClient) -> None:
    sign_in(client, "alice")
    response = client.post("/logout", data={"csrf_token": "\u00e9t\u00e9"})
    assert response.status_code == 400


@pytest.mark.parametrize("form_key", [None, "", "k" * (views.FORM_KEY_LIMIT + 1)])
def test_the_ask_form_needs_its_key(client: FlaskClient, form_key: str | None) -> None:
    sign_in(client, "alice")
    form = {"prompt": "Keyless"} if form_key is None else {"prompt": "x", "form_key": form_key}
    response = post(client, "/assistant/runs", **form)
    assert response.status_code == 400
    assert "Reload the page and ask again" in response.get_data(as_text=True)


def test_an_expired_approval_is_asked_for_again(app: Flask, client: FlaskClient) -> None:
    app.config["APPROVAL_EXPIRES_IN"] = 0.2
    sign_in(client, "alice")
    run_id = ask(client, "Quick, please")
    time.sleep(0.3)
    polled = client.get(f"/assistant/runs/{run_id}/status.json").json  # the live page reloads
    assert polled is not None and (polled["status"], polled["final"]) == ("failed", True)
    page = client.get(f"/assistant/runs/{run_id}").get_data(as_text=True)
    with app.app_context():
        detail = scoria.get_run_detail(run_id)
    assert detail.summary.status == "failed"
    assert (detail.steps[1].error_envelope or {})["type"] == "approval_expired"
    (expired,) = detail.approvals
    assert expired.status == "expired" and expired.expires_at
    assert 'data-status="failed"' in page and "data-poll-url" not in page
    assert f'<time datetime="{expired.expires_at.isoformat()}">' in page
    assert "Nobody approved the answer by" in page and "so it was not sent" in page
    assert "Ask for approval again" in page
    with app.app_context(), pytest.raises(scoria.NoPendingApproval):
        scoria.approve_run(run_id, decided_by="ops")

    app.config["APPROVAL_EXPIRES_IN"] = 3600
    post(client, f"/assistant/runs/{run_id}/resume")
    page = client.get(f"/assistant/runs/{run_id}").get_data(as_text=True)
    assert 'data-status="waiting_for_approval"' in page and "(attempt 2)" in page
    with app.app_context():
        done = scoria.approve_run(run_id, decided_by="ops", resume=True)
        detail = scoria.get_run_detail(run_id)
    assert (done.run_id, done.status) == (run_id, "completed")
    assert [a.status for a in detail.approvals] == ["expired", "approved"]
    assert [s.kind for s in detail.steps] == ["draft", "approval", "send"]


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
    # The operator reads the member's answer; using it as a draft is the member's.
    sign_in(client, "ops")
    page = client.get(f"/assistant/runs/{run_id}").get_data(as_text=True)
    assert 'id="answer"' in page and 'id="submit-draft"' not in page


def test_another_tenant_sees_not_found(client: FlaskClient) -> None:
    sign_in(client, "alice")
    run_id = ask(client, "private question")
    sign_in(client, "zoe")
    response = client.get(f"/assistant/runs/{run_id}")
    assert response.status_code == 404
    assert "Run not found" in response.get_data(as_text=True)
    assert client.get("/assistant/runs/not-a-run").status_code == 404
    assert post(client, f"/assistant/runs/{run_id}/resume").status_code == 404


def test_a_colleague_in_the_same_tenant_sees_not_found(app: Flask, client: FlaskClient) -> None:
    sign_in(client, "alice")
    run_id = ask(client, "my own question")
    with app.app_context():
        scoria.approve_run(run_id, decided_by="ops")
    sign_in(client, "bob")
    for path in (f"/assistant/runs/{run_id}", f"/assistant/runs/{run_id}/status.json"):
        assert client.get(path).status_code == 404
    assert post(client, f"/assistant/runs/{run_id}/resume").status_code == 404
    with app.app_context():
        assert scoria.get_run(run_id).status == "waiting_for_approval"
    for user in ("alice", "ops"):  # the member who asked, and the tenant's operator
        sign_in(client, user)
        assert client.get(f"/assistant/runs/{run_id}").status_code == 200


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
