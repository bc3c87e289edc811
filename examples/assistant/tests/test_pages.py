"""What members and operators see: live run pages, limits, rejections, errors, valid HTML."""

from __future__ import annotations

import re
import time

import html5lib
import pytest
from flask import Flask
from flask.testing import FlaskClient

import flask_scoria as scoria
from examples.assistant.models import DEMO_USERS
from examples.assistant.tests.test_flows import ask, post, sign_in
from examples.assistant.views import DRAFT_LIMIT, PROMPT_LIMIT, shorten


def page(client: FlaskClient, url: str, status: int = 200) -> str:
    response = client.get(url)
    assert response.status_code == status, url
    text = response.get_data(as_text=True)
    response.close()
    return text


def assert_valid_html(text: str) -> None:
    """Parse as a browser does, failing on any parse error of the HTML standard."""
    html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(text)
    assert text.startswith("<!doctype html>")
    ids = re.findall(r'\sid="([^"]+)"', text)
    assert len(ids) == len(set(ids)), ids


def run_count(app: Flask) -> int:
    with app.app_context(), app.extensions["scoria"].storage().engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM scoria_runs").scalar_one())


def test_every_demo_tenant_has_an_operator() -> None:
    tenants = {tenant for _, _, tenant, _ in DEMO_USERS}
    operators = {tenant for _, _, tenant, role in DEMO_USERS if role == "operator"}
    assert tenants == operators == {"acme", "globex"}


def test_the_globex_operator_sees_globex_runs(client: FlaskClient) -> None:
    sign_in(client, "zoe")
    run_id = ask(client, "A globex question")
    sign_in(client, "gus")
    operator_page = page(client, f"/scoria/workflows/{run_id}")
    assert "A globex question" in operator_page
    assert '<a class="home" href="/">Back to the app</a>' in operator_page


def test_the_operator_link_is_for_operators(client: FlaskClient) -> None:
    sign_in(client, "alice")
    run_id = ask(client, "Who sees the link?")
    member = page(client, f"/assistant/runs/{run_id}")
    assert 'id="operator-link"' not in member and "/scoria/" not in member
    sign_in(client, "ops")
    operator = page(client, f"/assistant/runs/{run_id}")
    assert f'id="operator-link" href="/scoria/workflows/{run_id}"' in operator
    assert 'href="/scoria/approvals"' in operator


def test_the_run_page_polls_its_status_until_the_run_is_final(
    app: Flask, client: FlaskClient
) -> None:
    sign_in(client, "alice")
    run_id = ask(client, "Poll me")
    waiting = page(client, f"/assistant/runs/{run_id}")
    assert f'data-poll-url="/assistant/runs/{run_id}/status.json"' in waiting
    assert '<script src="/static/run-status.js"></script>' in waiting
    status = client.get(f"/assistant/runs/{run_id}/status.json").json
    assert status is not None
    assert (status["run_id"], status["status"], status["final"]) == (
        run_id,
        "waiting_for_approval",
        False,
    )
    assert f'data-updated-at="{status["updated_at"]}"' in waiting
    with app.app_context():
        scoria.approve_run(run_id, decided_by="ops")
        scoria.resume_run(run_id)
    moved = client.get(f"/assistant/runs/{run_id}/status.json").json
    assert moved is not None and moved["updated_at"] != status["updated_at"]
    assert (moved["status"], moved["final"]) == ("completed", True)
    done = page(client, f"/assistant/runs/{run_id}")
    assert "data-poll-url" not in done and "run-status.js" not in done
    assert page(client, "/static/run-status.js").count("status.dataset.pollUrl") == 2


def test_the_status_of_another_tenants_run_is_not_found(client: FlaskClient) -> None:
    sign_in(client, "alice")
    run_id = ask(client, "Mine")
    sign_in(client, "zoe")
    page(client, f"/assistant/runs/{run_id}/status.json", 404)


def test_the_member_sees_why_an_operator_rejected(app: Flask, client: FlaskClient) -> None:
    sign_in(client, "alice")
    run_id = ask(client, "May I <publish> this?")
    with app.app_context():
        scoria.reject_run(run_id, decided_by="ops", reason="Ask legal <first>.")
    text = page(client, f"/assistant/runs/{run_id}")
    assert 'data-status="rejected"' in text
    assert '<q id="rejection-reason">Ask legal &lt;first&gt;.</q>' in text
    assert "data-poll-url" not in text
    assert_valid_html(text)
    other = ask(client, "Another one")
    with app.app_context():
        scoria.reject_run(other, decided_by="ops")
    assert "rejected the drafted answer without giving a reason" in page(
        client, f"/assistant/runs/{other}"
    )


def test_long_prompts_are_refused_with_the_limit(app: Flask, client: FlaskClient) -> None:
    sign_in(client, "alice")
    response = post(client, "/assistant/runs", prompt="x" * (PROMPT_LIMIT + 1))
    assert response.location == "/"
    text = page(client, "/")
    assert f"Your question is {PROMPT_LIMIT + 1} characters long; the limit is" in text
    assert f'maxlength="{PROMPT_LIMIT}"' in text
    assert run_count(app) == 0
    ask(client, "y" * PROMPT_LIMIT)
    assert run_count(app) == 1


def test_long_prompts_are_shortened_in_titles_and_lists(client: FlaskClient) -> None:
    sign_in(client, "alice")
    prompt = "Please summarise " + "the quarterly plan " * 20
    run_id = ask(client, prompt)
    shown = shorten(prompt)
    assert len(shown) == 80 and shown.endswith("…") and shown.startswith("Please summarise")
    conversation = page(client, "/")
    assert f"<h1>{shown}</h1>" in conversation
    assert f"<title>{shown} · flask-scoria example</title>" in conversation
    assert f"<td>{shown}</td>" in conversation
    run = page(client, f"/assistant/runs/{run_id}")
    assert f"<title>{shown} · flask-scoria example</title>" in run
    assert prompt.strip() in run  # the question itself, in full


def test_a_draft_too_long_is_refused_before_anything_is_written(
    app: Flask, client: FlaskClient
) -> None:
    sign_in(client, "alice")
    response = post(client, "/assistant/drafts", draft_answer="policy " * DRAFT_LIMIT)
    assert response.status_code == 400
    assert f"longer than {DRAFT_LIMIT} characters" in response.get_data(as_text=True)
    assert run_count(app) == 0


def test_an_expired_form_gets_a_page_that_says_what_to_do(client: FlaskClient) -> None:
    sign_in(client, "alice")
    response = client.post("/assistant/runs", data={"prompt": "hi", "csrf_token": "stale"})
    assert response.status_code == 400
    text = response.get_data(as_text=True)
    assert "<h1>The form expired</h1>" in text
    assert "reload the page and submit it again" in text
    assert 'href="/"' in text and "<style>" in text
    assert_valid_html(text)


def test_the_favicon_is_linked_and_served(client: FlaskClient) -> None:
    assert 'rel="icon" type="image/svg+xml" href="/static/favicon.svg"' in page(client, "/login")
    response = client.get("/static/favicon.svg")
    assert response.status_code == 200 and response.mimetype == "image/svg+xml"
    response.close()


@pytest.mark.parametrize("user_id", ["alice", "ops"])
def test_every_page_is_valid_html(app: Flask, client: FlaskClient, user_id: str) -> None:
    assert_valid_html(page(client, "/login"))
    sign_in(client, user_id)
    waiting = ask(client, "What does the travel policy say?")
    answered = ask(client, "And the expense policy?")
    edited = ask(client, "And the <hotel> policy?")
    app.config["APPROVAL_EXPIRES_IN"] = 0.1
    expired = ask(client, "Too late?")
    with app.app_context():
        scoria.approve_run(answered, decided_by="ops")
        scoria.resume_run(answered)
        arguments = {"to": user_id, "answer": "Hotels: <see> the policy & ask."}
        scoria.approve_run(edited, decided_by="ops", arguments=arguments, resume=True)
    time.sleep(0.2)
    post(client, "/assistant/drafts", draft_answer="Refunds follow the travel policy.")
    review = str(client.get("/").get_data(as_text=True).count("bounded review"))
    assert review == "1"
    shown = {
        run_id: page(client, f"/assistant/runs/{run_id}")
        for run_id in (waiting, answered, edited, expired)
    }
    for text in shown.values():
        assert_valid_html(text)
    assert 'id="expired"' in shown[expired] and "edited the draft" in shown[edited]
    assert_valid_html(page(client, "/"))
    with client.session_transaction() as session:
        handoff = session["last_scoria_handoff_run_id"]
    assert_valid_html(page(client, f"/assistant/runs/{handoff}"))
    assert_valid_html(page(client, "/assistant/runs/not-a-run", 404))
