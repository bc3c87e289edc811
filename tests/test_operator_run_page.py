"""The run page's forms (edited arguments, cancel, retry) and its bounds on long runs."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from html import unescape as html_unescape
from pathlib import Path
from typing import Any

import pytest
from conftest import create_test_app
from flask import Flask
from flask.testing import FlaskClient
from markupsafe import escape
from test_operator import TENANT, csrf, page, run_status, start

import flask_scoria as scoria
from flask_scoria import Fail, Scoria, Succeed, WaitForApproval
from flask_scoria.operator.present import event_gist
from flask_scoria.runtime import tables

REQUESTED = {"to": "team@example.com", "subject": "Q3", "smtp_password": "hunter2"}


def review(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    if step.approval is None:
        return WaitForApproval("send_email", REQUESTED, editable=True, expires_in=3600)
    edited = step.approval.edited_arguments
    return Succeed({"sent": step.approval.arguments if edited is None else edited})


def fixed(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    if step.approval is None:
        return WaitForApproval("publish", {"env": "prod"})
    return Succeed({"published": True})


def flaky(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    """Fail the first attempt with a traceback; succeed on a retry."""
    if step.attempt == 1:
        return Fail(
            {
                "type": "RuntimeError",
                "message": "the mail server hung up",
                "api_key": "sk-live-1",
                "traceback": 'File "app.py", line 3, in send\n  raise RuntimeError(<boom>)',
            }
        )
    return Succeed({"attempt": step.attempt})


def slow(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    return Succeed({})


@pytest.fixture
def ops(app: Flask, runtime: Scoria) -> FlaskClient:
    """A client signed in as operator ``ops`` of tenant ``acme``, with handlers."""
    runtime.operator_scope(lambda: {"tenant_id": TENANT, "actor_id": "ops"})
    for kind, handler in (("review", review), ("fixed", fixed), ("flaky", flaky)):
        runtime.handler(kind)(handler)
    return app.test_client()


def run_page(client: FlaskClient, run_id: str, query: str = "") -> str:
    return page(client, f"/scoria/workflows/{run_id}{query}")


def approve_with(client: FlaskClient, run_id: str, **form: str) -> Any:
    html = run_page(client, run_id)
    found = re.search(r'name="approval_id" value="([^"]+)"', html)
    assert found
    data = {"csrf_token": csrf(html), "approval_id": found.group(1), **form}
    return client.post(f"/scoria/workflows/{run_id}/approve", data=data)


def detail(app: Flask, run_id: str) -> scoria.RunDetail:
    with app.app_context():
        return scoria.get_run_detail(run_id)


def test_editable_arguments_are_prefilled_redacted_and_approved_as_edited(
    app: Flask, ops: FlaskClient
) -> None:
    run_id = start(app, kind="review")
    html = run_page(ops, run_id)
    field = re.search(r"<textarea[^>]*name=\"arguments\"[^>]*>(.*?)</textarea>", html, re.S)
    assert field, "an editable approval has a JSON field"
    assert "hunter2" not in html
    assert "&#34;smtp_password&#34;: &#34;[REDACTED]&#34;" in field.group(1)
    assert "Expires" in html and 'class="expires"' in html

    edited = '{"to": "ceo@example.com", "subject": "Q3", "smtp_password": "[REDACTED]"}'
    response = approve_with(ops, run_id, arguments=edited)
    assert response.status_code == 303
    approval = detail(app, run_id).approvals[0]
    assert approval.edited_arguments == {**REQUESTED, "to": "ceo@example.com"}
    assert run_status(app, run_id) == "completed"
    after = run_page(ops, run_id)
    compare = after.split('class="compare"')[1].split("</li>")[0]
    assert "Requested arguments" in compare and "Approved with edited arguments" in compare
    assert "team@example.com" in compare and "ceo@example.com" in compare
    assert "hunter2" not in after


def test_a_password_masked_in_a_url_keeps_its_requested_value(app: Flask, ops: FlaskClient) -> None:
    dsn = "postgresql://app:s3cret@db.internal/prod"

    def connect(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        if step.approval is None:
            return WaitForApproval("migrate", {"dsn": dsn, "schema": "v1"}, editable=True)
        return Succeed({"used": (step.approval.edited_arguments or {}).get("dsn")})

    run_id = start(app, kind="connect", handlers={"connect": connect})
    html = run_page(ops, run_id)
    assert "s3cret" not in html
    edited = json.dumps({"dsn": "postgresql://app:[REDACTED]@db.internal/prod", "schema": "v2"})
    assert approve_with(ops, run_id, arguments=edited).status_code == 303
    assert detail(app, run_id).approvals[0].edited_arguments == {"dsn": dsn, "schema": "v2"}
    # A password the operator did replace is the operator's.
    run_id = start(app, kind="connect", handlers={"connect": connect})
    other = "postgresql://app:rotated@db.internal/prod"
    assert approve_with(ops, run_id, arguments=json.dumps({"dsn": other})).status_code == 303
    assert detail(app, run_id).approvals[0].edited_arguments == {"dsn": other}


@pytest.mark.parametrize(
    "edited",
    [
        # A recipient added: the list's length changed, so no item keeps its secret
        # (though the requested arguments hold the text [REDACTED] elsewhere).
        {
            "to": [{"to": "a@example.com", "api_key": "[REDACTED]"}, {"to": "b@example.com"}],
            "subject": "Logs [REDACTED] by policy",
        },
        # A secret moved to a key of another name.
        {"to": [{"to": "a@example.com", "token": "[REDACTED]"}]},
        # A URL whose host changed, its password still masked.
        {
            "to": [{"to": "a@example.com", "api_key": "[REDACTED]"}],
            "smtp": "smtp://bot:[REDACTED]@mx2",
        },
    ],
)
def test_a_hidden_value_out_of_its_place_is_refused(
    app: Flask, ops: FlaskClient, edited: dict[str, Any]
) -> None:
    requested = {
        "to": [{"to": "a@example.com", "api_key": "K-1"}],
        "smtp": "smtp://bot:pw@mx1",
        "subject": "Logs [REDACTED] by policy",
    }

    def send(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        if step.approval is None:
            return WaitForApproval("send", requested, editable=True)
        return Succeed({"sent": step.approval.edited_arguments})

    run_id = start(app, kind="send", handlers={"send": send})
    response = approve_with(ops, run_id, arguments=json.dumps(edited))
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert "stands for a hidden value" in html and "Nothing was decided." in html
    assert "K-1" not in html and "pw@" not in html
    assert detail(app, run_id).approvals[0].status == "pending"
    # In its place, it is kept; in prose, the text is the operator's.
    kept = {
        "to": [{"to": "c@example.com", "api_key": "[REDACTED]"}],
        "smtp": "smtp://bot:[REDACTED]@mx1",
        "subject": "Your card [REDACTED] was replaced",
    }
    assert approve_with(ops, run_id, arguments=json.dumps(kept)).status_code == 303
    assert detail(app, run_id).approvals[0].edited_arguments == {
        "to": [{"to": "c@example.com", "api_key": "K-1"}],
        "smtp": "smtp://bot:pw@mx1",
        "subject": "Your card [REDACTED] was replaced",
    }


def test_arguments_too_long_to_edit_are_approved_as_requested(app: Flask, ops: FlaskClient) -> None:
    requested = {"body": "x" * 20_000}

    def long(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        if step.approval is None:
            return WaitForApproval("send", requested, editable=True)
        return Succeed({"length": len(step.approval.arguments["body"])})

    run_id = start(app, kind="long", handlers={"long": long})
    html = run_page(ops, run_id)
    assert 'name="arguments"' not in html
    assert "too long to edit on this page" in html
    response = approve_with(ops, run_id)
    assert response.status_code == 303
    approval = detail(app, run_id).approvals[0]
    assert (approval.status, approval.edited_arguments) == ("approved", None)


def test_each_step_shows_its_input_and_its_times(app: Flask, ops: FlaskClient) -> None:
    handlers = {
        "plan": lambda step, run: scoria.Next("write", {"topic": "<q3 & travel>"}),
        "write": lambda step, run: Succeed({"words": 3}),
    }
    run_id = start(app, kind="plan", handlers=handlers)
    html = run_page(ops, run_id)
    first, second = html.split('class="step depth-0"')[1:3]
    assert "<summary>Input</summary>" not in first  # the first step was given nothing
    given = second.split("<summary>Input</summary>")[1].split("</details>")[0]
    assert "&lt;q3 &amp; travel&gt;" in given
    for step in (first, second):
        times = step.split('class="step-times muted">')[1].split("</p>")[0]
        assert times.startswith("Started <time") and "· ended <time" in times and "· took" in times


def test_a_step_queued_for_a_worker_says_nothing_runs_it_yet(app: Flask, ops: FlaskClient) -> None:
    app.extensions["scoria"].handler("later", executor="worker")(slow)
    run_id = start(app, kind="later")
    html = run_page(ops, run_id)
    assert 'data-status="queued"' in html
    assert "Queued, not running yet: it runs when a worker" in html


def test_a_step_queued_for_the_apps_own_calls_says_what_runs_it(
    app: Flask, ops: FlaskClient
) -> None:
    """An inline kind's delayed step runs when the app dispatches the run, or a worker
    finds it due: nothing sends it anywhere."""
    runtime = app.extensions["scoria"]
    runtime.handler("plan")(lambda step, run: scoria.Next("later_inline", delay=3600))
    runtime.handler("later_inline")(slow)
    run_id = start(app, kind="plan")
    html = run_page(ops, run_id)
    assert "Queued: steps of <code>later_inline</code> run within the app itself" in html
    assert f"flask scoria dispatch {run_id}</code>), or a <code>flask scoria worker" in html


def test_unchanged_arguments_are_not_an_edit(app: Flask, ops: FlaskClient) -> None:
    run_id = start(app, kind="review")
    html = run_page(ops, run_id)
    text = re.search(r'name="arguments"[^>]*>(.*?)</textarea>', html, re.S)
    assert text
    unescaped = text.group(1).replace("&#34;", '"')
    assert approve_with(ops, run_id, arguments=unescaped).status_code == 303
    assert detail(app, run_id).approvals[0].edited_arguments is None


def test_a_second_tab_approving_other_arguments_is_told_they_were_not_taken(
    app: Flask, ops: FlaskClient
) -> None:
    run_id = start(app, kind="review")
    html = run_page(ops, run_id)
    found = re.search(r'name="approval_id" value="([^"]+)"', html)
    assert found
    form = {"csrf_token": csrf(html), "approval_id": found.group(1)}
    url = f"/scoria/workflows/{run_id}/approve"
    as_requested = json.dumps({**REQUESTED, "smtp_password": "[REDACTED]"})
    assert ops.post(url, data={**form, "arguments": as_requested}).status_code == 303
    # The same form again is the same decision: no error.
    again = ops.post(url, data={**form, "arguments": as_requested}, follow_redirects=True)
    assert "Approved. The run is now completed." in again.get_data(as_text=True)

    edited = json.dumps({**REQUESTED, "to": "boss@example.com", "smtp_password": "[REDACTED]"})
    for changed in ({"arguments": edited}, {"arguments": as_requested, "note": "checked"}):
        other = ops.post(url, data={**form, **changed}, follow_redirects=True)
        said = html_unescape(other.get_data(as_text=True))
        assert "already approved by 'ops'" in said and "Approved." not in said
    approval = detail(app, run_id).approvals[0]
    assert (approval.edited_arguments, approval.note) == (None, None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"to": <script>', "not valid JSON"),
        ('["a list"]', "must be a JSON object"),
        # Deeper than the JSON parser recurses, and deeper than a stored payload may be.
        ('{"a":' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than 64 levels"),
        ('{"a":' + "[" * 70 + "]" * 70 + "}", "nested deeper than 64 levels"),
    ],
)
def test_bad_arguments_are_shown_in_the_form_and_nothing_is_decided(
    app: Flask, ops: FlaskClient, text: str, message: str
) -> None:
    run_id = start(app, kind="review")
    response = approve_with(ops, run_id, arguments=text)
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert message in html and "Nothing was decided." in html
    assert 'aria-invalid="true"' in html
    assert f">{escape(text)}</textarea>" in html
    assert "<script>" not in html
    assert detail(app, run_id).approvals[0].status == "pending"


def test_edited_arguments_over_the_size_limit_are_shown_in_the_form(
    database_uri: str, tmp_path: Path
) -> None:
    app = create_test_app(database_uri, tmp_path / "small", SCORIA_RESULT_MAX_BYTES=100)
    runtime = app.extensions["scoria"]
    runtime.operator_scope(lambda: {"tenant_id": TENANT, "actor_id": "ops"})
    runtime.handler("review")(review)
    run_id = start(app, kind="review")
    text = json.dumps({"body": "x" * 200})
    response = approve_with(app.test_client(), run_id, arguments=text)
    assert response.status_code == 422
    assert "the limit is 100 (SCORIA_RESULT_MAX_BYTES)" in response.text
    assert f">{escape(text)}</textarea>" in response.text
    assert detail(app, run_id).approvals[0].status == "pending"
    runtime.storage(app).engine.dispose()


def test_a_refused_form_keeps_the_note_and_takes_the_focus(app: Flask, ops: FlaskClient) -> None:
    run_id = start(app, kind="review")
    response = approve_with(ops, run_id, arguments="not json", note="my careful note")
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert 'value="my careful note"' in html
    assert re.search(r'<textarea[^>]*aria-invalid="true"[^>]*autofocus', html)
    # Its reload, when the run moves, goes to the run page, not to the form's address.
    assert f'data-run-url="/scoria/workflows/{run_id}"' in html


def bidi(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    """An approval whose text would read reversed past a right-to-left override."""
    return WaitForApproval(
        "send\u202eliam",
        {"to": "moc.live\u202e@x", "\u2067key": 1, "site": "pay\u200bpal.com\ufeff"},
        reason="pay \u202e01$",
    )


def test_direction_controls_and_invisible_characters_are_shown_as_escapes(
    app: Flask, ops: FlaskClient
) -> None:
    run_id = start(app, kind="bidi", handlers={"bidi": bidi})
    for html in (run_page(ops, run_id), page(ops, "/scoria/approvals")):
        assert not re.search("[\u202a-\u202e\u2066-\u2069\u200b\ufeff]", html)
        assert "send\\u202eliam" in html
        assert "pay \\u202e01$" in html
        assert "pay\\u200bpal.com\\ufeff" in html
    assert "moc.live\\u202e@x" in run_page(ops, run_id)
    with app.app_context():
        scoria.approve_run(run_id, decided_by="\u202enimda")
    html = run_page(ops, run_id)
    assert "Approved, waiting to resume" in html
    assert "\u202e" not in html and "\\u202enimda" in html


def test_joiners_that_spell_words_are_shown_as_written(app: Flask, ops: FlaskClient) -> None:
    # "Hello, I want to cancel order 123?" in Persian: "want" is spelled with a ZWNJ.
    asked = "سلام، می\u200cخواهم سفارش 123 را لغو کنم؟"  # noqa: RUF001

    def persian(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        return WaitForApproval("cancel_order", {"note": "👩\u200d💻 لغو"}, reason=asked)

    run_id = start(
        app,
        kind="persian",
        handlers={"persian": persian},
        runtime={"metadata": {"payload": {"prompt": asked + "\u200f"}}},
    )
    html = run_page(ops, run_id)
    assert f'<span class="clamp" dir="auto">{asked}\\u200f</span>' in html
    assert f'<dd dir="auto">{asked}</dd>' in html
    assert "👩\u200d💻 لغو" in html and "\\u200c" not in html and "\\u200d" not in html
    assert f'<span class="clamp" dir="auto">{asked}</span>' in page(ops, "/scoria/approvals")


def test_hidden_characters_in_the_form_come_back_as_they_were(app: Flask, ops: FlaskClient) -> None:
    requested = {"to": "pay\u200bpal.com", "note": "ok\U000e0049\U000e0047\U000e004e"}

    def smuggle(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        if step.approval is None:
            return WaitForApproval("send", requested, editable=True)
        return Succeed({})

    run_id = start(app, kind="smuggle", handlers={"smuggle": smuggle})
    html = run_page(ops, run_id)
    assert "ok\\udb40\\udc49\\udb40\\udc47\\udb40\\udc4e" in html
    assert not re.search("[\u200b\U000e0000-\U000e007f]", html)
    field = re.search(r'name="arguments"[^>]*>(.*?)</textarea>', html, re.S)
    assert field and json.loads(html_unescape(field.group(1))) == requested
    assert approve_with(ops, run_id, arguments=html_unescape(field.group(1))).status_code == 303
    assert detail(app, run_id).approvals[0].edited_arguments is None


def test_the_inbox_names_what_each_button_decides(app: Flask, ops: FlaskClient) -> None:
    run_id = start(app, kind="fixed")
    html = page(ops, "/scoria/approvals")
    what = f"publish for run …{run_id[-8:]}"
    for action in ("Approve", "Reject", "Review"):
        assert f'aria-label="{action} {what}"' in html


def test_editing_a_fixed_approval_is_refused_with_the_reason(app: Flask, ops: FlaskClient) -> None:
    run_id = start(app, kind="fixed")
    assert 'name="arguments"' not in run_page(ops, run_id)
    response = approve_with(ops, run_id, arguments='{"env": "staging"}')
    assert response.status_code == 303
    assert "is not editable" in page(ops, response.location)
    assert detail(app, run_id).approvals[0].status == "pending"


def test_expired_approvals_say_so(app: Flask, ops: FlaskClient) -> None:
    run_id = start(app, kind="review")
    form = page_form(ops, run_id, {})
    found = re.search(r'name="approval_id" value="([^"]+)"', run_page(ops, run_id))
    assert found
    engine = app.extensions["scoria"].storage(app).engine
    past = datetime.now(UTC) - timedelta(minutes=5)
    with engine.begin() as conn:
        conn.execute(tables.approvals.update().values(expires_at=past))
    # Approved from a page opened before it expired: told so, in words, on the run page.
    late = ops.post(
        f"/scoria/workflows/{run_id}/approve",
        data={**form, "approval_id": found.group(1), "return_to": "approvals"},
    )
    assert late.location == f"/scoria/workflows/{run_id}"
    told = html_unescape(page(ops, late.location))
    assert "This approval expired before anyone decided it" in told
    inbox = page(ops, "/scoria/approvals")  # nobody can decide it any more
    assert run_id not in inbox and "Nothing is waiting for a decision." in inbox
    html = run_page(ops, run_id)
    assert 'data-status="expired"' in html and "expired undecided" in html
    assert "Ask for approval again" in html and "Retry failed step" not in html
    assert post(ops, run_id, "retry").status_code == 303  # the handler asks again
    (line,) = re.findall(r'data-attempt-event="step_failed">(.*?)</li>', run_page(ops, run_id))
    assert line.startswith("Attempt 1 waited out its approval") and "approval_expired" in line


@pytest.mark.parametrize("action", ["approve", "reject"])
def test_deciding_an_expired_approval_the_run_asked_again_points_to_the_newer(
    app: Flask, ops: FlaskClient, action: str
) -> None:
    run_id = start(app, kind="review")
    stale = run_page(ops, run_id)
    found = re.search(r'name="approval_id" value="([^"]+)"', stale)
    assert found
    engine = app.extensions["scoria"].storage(app).engine
    with engine.begin() as conn:
        past = datetime.now(UTC) - timedelta(minutes=5)
        conn.execute(tables.approvals.update().values(expires_at=past))
    with app.app_context():
        assert scoria.resume_run(run_id).status == "waiting_for_approval"  # it asks again
    form = {"csrf_token": csrf(stale), "approval_id": found.group(1), "return_to": "approvals"}
    response = ops.post(f"/scoria/workflows/{run_id}/{action}", data=form)
    assert response.location == f"/scoria/workflows/{run_id}"
    told = html_unescape(page(ops, response.location))
    flashed = told.split('class="flash')[1].split("</")[0]
    assert "The approval you decided had expired, so nothing was decided." in flashed
    assert "its newer approval, on this page, waits for a decision" in flashed
    assert "failed" not in flashed and "approval again" not in flashed
    newer = re.search(r'name="approval_id" value="([^"]+)"', told)
    assert newer and newer.group(1) != found.group(1)
    statuses = [approval.status for approval in detail(app, run_id).approvals]
    assert sorted(statuses) == ["expired", "pending"]


def test_arguments_edited_to_another_json_type_are_an_edit(app: Flask, ops: FlaskClient) -> None:
    def toggle(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        if step.approval is None:
            return WaitForApproval("configure", {"enabled": 1, "limit": 10}, editable=True)
        return Succeed({})

    app.extensions["scoria"].handler("toggle")(toggle)
    run_id = start(app, kind="toggle")
    url = f"/scoria/workflows/{run_id}/approve"
    # Equal in Python (True == 1, 10.0 == 10), not as JSON: the operator's edit is taken.
    edited = '{"enabled": true, "limit": 10.0}'
    form = page_form(ops, run_id, {"arguments": edited})
    found = re.search(r'name="approval_id" value="([^"]+)"', run_page(ops, run_id))
    assert found
    assert ops.post(url, data={**form, "approval_id": found.group(1)}).status_code == 303
    approval = detail(app, run_id).approvals[0]
    assert approval.edited_arguments == {"enabled": True, "limit": 10.0}
    assert json.dumps(approval.edited_arguments, sort_keys=True) == edited
    # Sent again, it is the same decision, not one whose edits were not taken.
    again = ops.post(url, data={**form, "approval_id": found.group(1)}, follow_redirects=True)
    assert "Approved. The run is now completed." in again.get_data(as_text=True)


def test_the_attempt_history_shows_errors_redacted(app: Flask, ops: FlaskClient) -> None:
    dsn = "postgresql://app:TYPEPW@db/prod"

    def leaky(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        return Fail({"type": dsn, "message": f"could not reach {dsn}"})

    app.extensions["scoria"].handler("leaky")(leaky)
    run_id = start(app, kind="leaky")
    assert post(ops, run_id, "retry").status_code == 303
    html = run_page(ops, run_id)
    lines = re.findall(r'data-attempt-event="step_failed">(.*?)</li>', html, re.S)
    assert len(lines) == 2 and all("postgresql://app:[REDACTED]@db/prod" in line for line in lines)
    assert "TYPEPW" not in html


def test_a_handoff_card_says_what_its_child_step_did(app: Flask, ops: FlaskClient) -> None:
    def hand(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        if step.kind in ("hand", "hand_bad"):
            draft = {"draft": "Trains, second class", "api_key": "sk-in"}
            return scoria.Handoff("critic", step.kind + "_judge", handoff_input=draft)
        if step.kind == "hand_bad_judge":
            return Fail({"type": "ValueError", "message": "no postgresql://a:JUDGEPW@db/x"})
        return Succeed({"verdict": "approve", "token": "sk-out"})

    for kind in ("hand", "hand_judge", "hand_bad", "hand_bad_judge"):
        app.extensions["scoria"].handler(kind)(hand)
    html = run_page(ops, start(app, kind="hand"))
    card = html.split('<article class="handoff">')[1].split("</article>")[0]
    outcome = card.split("<h3>Outcome</h3>")[1].split("<h3>")[0]
    assert '<dt>verdict</dt><dd dir="auto">approve</dd>' in outcome
    assert '<dt>token</dt><dd dir="auto">[REDACTED]</dd>' in outcome and "sk-out" not in html
    given = card.split("<h3>Handoff input preview</h3>")[1].split("<h3>")[0]
    assert '<dt>draft</dt><dd dir="auto">Trains, second class</dd>' in given
    assert '<dt>api_key</dt><dd dir="auto">[REDACTED]</dd>' in given and "sk-in" not in html

    card = run_page(ops, start(app, kind="hand_bad")).split('<article class="handoff">')[1]
    outcome = card.split("<h3>Outcome</h3>")[1].split("<h3>")[0]
    assert 'data-status="failed"' in outcome and "<code>ValueError</code>" in outcome
    assert "no postgresql://a:[REDACTED]@db/x" in outcome and "JUDGEPW" not in card


def test_each_failed_attempt_keeps_its_traceback(app: Flask, ops: FlaskClient) -> None:
    run_id = start(app, kind="flaky")
    assert post(ops, run_id, "retry").status_code == 303
    (line,) = re.findall(
        r'data-attempt-event="step_failed">(.*?)</li>', run_page(ops, run_id), re.S
    )
    trace = line.split('<details class="traceback"><summary>Traceback</summary>')[1]
    assert "raise RuntimeError(&lt;boom&gt;)" in trace


def test_shown_text_writes_out_its_direction_controls(app: Flask, ops: FlaskClient) -> None:
    def two_asks(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        if step.approval is None:
            return WaitForApproval("first")
        return WaitForApproval("sec\u202eond") if step.attempt == 1 else Succeed()

    def delegate(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        return scoria.Handoff("critic", "review", capability_tags=["ta\u202eg"])

    app.extensions["scoria"].handler("two_asks")(two_asks)
    run_id = start(app, kind="two_asks")
    response = approve_with(ops, run_id)
    assert response.status_code == 303
    told = page(ops, response.location)
    assert "sec\\u202eond" in told and "\u202e" not in told
    app.extensions["scoria"].handler("delegate")(delegate)
    tagged = run_page(ops, start(app, kind="delegate"))
    assert "ta\\u202eg" in tagged and "\u202e" not in tagged


@pytest.mark.parametrize("session_id", ["../../../account/delete", "a//b", "tail/", "./x"])
def test_a_session_whose_id_a_browser_would_resolve_links_to_the_filtered_list(
    app: Flask, ops: FlaskClient, session_id: str
) -> None:
    with app.app_context():
        who = {"actor_id": "alice", "tenant_id": TENANT, "session_id": session_id}
        run_id = scoria.start_run(who, initial_step={"kind": "fixed"}).run_id
    html = run_page(ops, run_id)
    (link,) = re.findall(r'<dt>Session</dt><dd><a class="mono" href="([^"]+)"', html)
    assert link.startswith("/scoria/workflows?session=")
    assert run_id in page(ops, html_unescape(link))
    # An id without such segments keeps its own page.
    plain = start(app, kind="fixed")
    assert 'href="/scoria/sessions/sess-1"' in run_page(ops, plain)


def post(client: FlaskClient, run_id: str, action: str, **form: str) -> Any:
    """Send the run page's form of ``action``, with its hidden fields."""
    return client.post(f"/scoria/workflows/{run_id}/{action}", data=page_form(client, run_id, form))


def page_form(client: FlaskClient, run_id: str, form: dict[str, str]) -> dict[str, str]:
    html = run_page(client, run_id)
    shown = dict(re.findall(r'name="(csrf_token|attempt)" value="([^"]*)"', html))
    return {**shown, **form}


def test_cancel_a_waiting_run(app: Flask, ops: FlaskClient) -> None:
    run_id = start(app, kind="fixed")
    assert "Cancel run" in run_page(ops, run_id)
    token = csrf(run_page(ops, run_id))
    response = post(ops, run_id, "cancel", reason="customer withdrew")
    assert response.status_code == 303
    assert response.location == f"/scoria/workflows/{run_id}"
    html = page(ops, response.location)
    assert "Cancelled. The run is now cancelled." in html
    # Who cancelled and why: in the run's facts and on its timeline row, not only in a payload.
    facts = html.split('<dl class="facts">')[1].split("</dl>")[0]
    said = '<span class="gist">by <code>ops</code>: <q dir="auto">customer withdrew</q></span>'
    assert f"<dt>Cancelled</dt><dd>{said}" in facts
    row = html.split('data-event-type="run_cancelled"')[1].split("<details>")[0]
    assert 'by <code>ops</code>: <q dir="auto">customer withdrew</q>' in row
    older = run_page(ops, run_id, "?events_before=2")
    assert 'data-event-type="run_cancelled"' not in older and said in older
    assert "Cancel run" not in html and "Retry failed step" not in html
    with app.app_context():
        assert scoria.get_run_detail(run_id).approvals[0].decided_by == "ops"
    again = ops.post(f"/scoria/workflows/{run_id}/cancel", data={"csrf_token": token})
    assert "already ended as cancelled" in page(ops, again.location)


def test_retry_a_failed_run_and_see_its_traceback(app: Flask, ops: FlaskClient) -> None:
    run_id = start(app, kind="flaky")
    html = run_page(ops, run_id)
    assert run_status(app, run_id) == "failed"
    error = html.split("<summary>Error</summary>")[1].split("</details>\n")[0]
    assert "the mail server hung up" in error and "sk-live-1" not in html
    assert '<details class="traceback"><summary>Traceback</summary>' in error
    assert "RuntimeError(&lt;boom&gt;)" in error
    assert "&#34;traceback&#34;" not in error
    assert "Retry failed step" in html and "Cancel run" not in html
    header = html.split('class="run-header"')[1].split("</header>")[0]
    failed = re.search(r"<dt>Failed</dt><dd>(.*?)</dd>", header)
    assert failed and re.fullmatch(
        r'Step <a href="#step-[0-9a-f-]{36}">#1 <strong>flaky</strong></a>:'
        r" <code>RuntimeError</code>"
        r' <span class="failure" dir="auto">the mail server hung up</span>',
        failed.group(1),
    )
    confirm = "Retry the failed step? The handler registered for flaky runs again, as attempt 2."
    assert f'data-confirm="{confirm}"' in header
    response = post(ops, run_id, "retry")
    assert response.status_code == 303
    assert "Retried. The run is now completed." in page(ops, response.location)
    assert run_status(app, run_id) == "completed"
    retried = [e for e in detail(app, run_id).events if e.event_type == "retry_requested"]
    assert [event.payload for event in retried] == [{"attempt": 2, "requested_by": "ops"}]


def test_a_retry_form_sent_again_retries_once(app: Flask, ops: FlaskClient) -> None:
    calls: list[int] = []

    def down(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        calls.append(step.attempt)
        return Fail({"type": "Down"})

    app.extensions["scoria"].handler("down")(down)
    run_id = start(app, kind="down")
    form = page_form(ops, run_id, {})
    assert form["attempt"] == "1"
    url = f"/scoria/workflows/{run_id}/retry"
    first = ops.post(url, data=form)
    assert "Retried. The run is now failed." in page(ops, first.location)
    # A double click, a second tab: the attempt that page showed was retried already.
    again = html_unescape(page(ops, ops.post(url, data=form).location))
    assert "was retried since attempt 1 failed: its attempt 2 failed in turn" in again
    assert calls == [1, 2]
    for attempt in ("", "x", "0"):
        sent = ops.post(url, data={**form, "attempt": attempt})
        assert sent.status_code == (303 if attempt == "0" else 400)
    assert calls == [1, 2]


def test_a_failed_step_without_a_registered_handler_offers_no_retry(
    app: Flask, ops: FlaskClient
) -> None:
    failing = {"own": lambda step, run: Fail({"type": "Down"})}
    run_id = start(app, kind="own", handlers=failing)
    assert run_status(app, run_id) == "failed"
    html = run_page(ops, run_id)
    assert "Retry failed step" not in html
    assert "No handler is registered for <code>own</code> in this app" in html
    # Sent anyway (a page from before a deploy removed the handler): refused, as shown.
    form = {"csrf_token": csrf(run_page(ops, start(app, kind="fixed"))), "attempt": "1"}
    response = ops.post(f"/scoria/workflows/{run_id}/retry", data=form)
    assert "No handler is registered in this app" in page(ops, response.location)
    assert run_status(app, run_id) == "failed"


@pytest.mark.parametrize("action", ["cancel", "retry"])
def test_actions_need_the_csrf_token_and_the_tenant(
    app: Flask, ops: FlaskClient, action: str
) -> None:
    run_id = start(app, kind="flaky" if action == "retry" else "fixed")
    before = run_status(app, run_id)
    assert ops.post(f"/scoria/workflows/{run_id}/{action}").status_code == 400
    assert (
        ops.post(f"/scoria/workflows/{run_id}/{action}", data={"csrf_token": "forged"}).status_code
        == 400
    )
    form = page_form(ops, run_id, {})
    other = start(app, kind="flaky" if action == "retry" else "fixed", tenant="globex")
    response = ops.post(f"/scoria/workflows/{other}/{action}", data=form)
    assert response.status_code == 404
    unknown = ops.post(f"/scoria/workflows/{uuid.uuid4()}/{action}", data=form)
    assert unknown.status_code == 404
    # Opened again with GET (a reload of a refused form's answer): the run's page, no action.
    reloaded = ops.get(f"/scoria/workflows/{run_id}/{action}")
    assert (reloaded.status_code, reloaded.location) == (303, f"/scoria/workflows/{run_id}")
    assert run_status(app, run_id) == before
    assert run_status(app, other) == before


def test_actions_without_an_actor_are_refused(app: Flask, runtime: Scoria) -> None:
    runtime.operator_scope(lambda: {"tenant_id": TENANT})
    run_id = start(app, kind="fixed", handlers={"fixed": fixed})
    client = app.test_client()
    html = run_page(client, run_id)
    buttons = re.findall(r'<button type="submit"[^>]*>', html)
    assert len(buttons) == 3 and all(button.endswith(" disabled>") for button in buttons)
    assert html.count("names nobody to record") == 2  # by Cancel, and by Approve / Reject
    assert "no actor" not in html
    response = post(client, run_id, "cancel")
    assert "names no actor_id" in page(client, response.location)
    assert run_status(app, run_id) == "waiting_for_approval"


def grow(app: Flask, run_id: str, *, steps: int, events: int, handoffs: int) -> None:
    """Append ``steps`` child steps (the first ``handoffs`` of them delegated) and events."""
    run_key = uuid.UUID(run_id)
    engine = app.extensions["scoria"].storage(app).engine
    now = datetime.now(UTC)
    with engine.begin() as conn:
        run = conn.execute(tables.runs.select().where(tables.runs.c.id == run_key)).one()
        parent = conn.execute(tables.steps.select().where(tables.steps.c.run_id == run_key)).first()
        assert parent is not None
        step_rows = [
            {
                "id": uuid.uuid4(),
                "run_id": run_key,
                "parent_step_id": parent.id,
                "sequence": run.last_step_sequence + index + 1,
                "kind": "chunk",
                "role_id": "executor",
                "status": "completed",
                "attempt": 1,
                "result_envelope": {"index": index, "text": "x" * 200},
                "completed_at": now,
            }
            for index in range(steps)
        ]
        conn.execute(tables.steps.insert(), step_rows)
        conn.execute(
            tables.events.insert(),
            [
                {
                    "run_id": run_key,
                    "sequence": run.last_event_sequence + index + 1,
                    "event_type": "step_queued",
                    "payload": {"index": index, "note": "y" * 100},
                    "created_at": now,
                }
                for index in range(events)
            ],
        )
        conn.execute(
            tables.handoffs.insert(),
            [
                {
                    "id": uuid.uuid4(),
                    "run_id": run_key,
                    "parent_step_id": parent.id,
                    "child_step_id": child["id"],
                    "delegated_role_id": "critic",
                    "delegated_kind": "chunk",
                    "capability_tags": [],
                    "handoff_input": {"index": index},
                    "projected_context": {"topic": "z" * 300},
                    "created_at": now + timedelta(microseconds=index),
                }
                for index, child in enumerate(step_rows[:handoffs])
            ],
        )
        conn.execute(
            tables.runs.update()
            .where(tables.runs.c.id == run_key)
            .values(
                last_step_sequence=run.last_step_sequence + steps,
                last_event_sequence=run.last_event_sequence + events,
            )
        )


def test_a_long_run_page_is_bounded_and_pages_back(app: Flask, ops: FlaskClient) -> None:
    run_id = start(app, kind="fixed")
    grow(app, run_id, steps=400, events=5000, handoffs=300)
    html = run_page(ops, run_id)
    assert len(html.encode()) < 80_000, len(html.encode())
    assert "25 of 401" in html and "25 of 5003" in html and "10 of 300" in html
    assert html.count('class="event"') == 25
    assert 'data-event-type="step_queued"' in html and "Waiting for approval" in html

    older = re.search(r'href="([^"]*events_before=(\d+)#timeline)"', html)
    assert older and older.group(2) == "4979"
    back = page(ops, older.group(1).replace("&amp;", "&"))
    sequences = [int(seq) for seq in re.findall(r'<span class="seq">(\d+)</span>', back)]
    assert sequences[-25:] == list(range(4954, 4979))
    assert "Newest events" in back

    older_steps = re.search(r'href="([^"]*steps_before=(\d+)#steps)"', html)
    assert older_steps and older_steps.group(2) == "377"
    handoffs = re.search(r'href="([^"]*handoffs_after=[^"#]+#delegated-evidence)"', html)
    assert handoffs
    # The newest handoff's child step, #301, is not among the latest steps: its card links to it.
    assert re.search(r'steps_before=302#step-[0-9a-f-]{36}">see what it did</a>', html)
    second = page(ops, handoffs.group(1).replace("&amp;", "&"))
    shown = second.split('id="delegated-evidence"')[1].split('id="timeline"')[0]
    assert shown.count('class="handoff"') == 10

    first = page(ops, f"/scoria/workflows/{run_id}?events_before=3")
    assert first.count('class="event"') == 2 and "older events" not in first


@pytest.mark.parametrize(
    "query",
    [
        "?events_before=0",
        "?steps_before=x",
        "?events_before=-1",
        "?handoffs_after=junk",
        "?steps_before=²",  # a digit to str.isdigit, none to int()
        "?events_before=٣",  # an Arabic-Indic three
        "?steps_before=" + "9" * 100_000,  # more digits than int() takes
    ],
)
def test_a_malformed_run_page_position_is_a_clear_400(
    app: Flask, ops: FlaskClient, query: str
) -> None:
    run_id = start(app, kind="fixed")
    assert "malformed" in page(ops, f"/scoria/workflows/{run_id}{query}", 400)


def test_the_run_window_read_matches_the_full_detail(app: Flask) -> None:
    run_id = start(app, kind="fixed", handlers={"fixed": fixed})
    grow(app, run_id, steps=30, events=70, handoffs=12)
    with app.app_context():
        full = scoria.get_run_detail(run_id)
        window = scoria.runtime.get_run_window(run_id, limit=500)
        part = scoria.runtime.get_run_window(run_id, limit=10, events_before=20)
    assert list(window.steps) == list(full.steps)
    assert list(window.events) == list(full.events)
    assert list(window.approvals) == list(full.approvals)
    assert list(window.delegated_handoffs) == list(full.delegated_handoffs)
    assert (window.step_count, window.event_count, window.handoff_count) == (31, 73, 12)
    assert [event.sequence for event in part.events] == list(range(10, 20))
    assert part.older_events == 10
    for before in ({"events_before": 2**63}, {"steps_before": 2**31}):
        with app.app_context(), pytest.raises(scoria.InvalidRunOptions, match="from 1 to"):
            scoria.runtime.get_run_window(run_id, **before)


def test_the_run_window_counts_steps_numbered_from_past_one(app: Flask) -> None:
    with app.app_context():
        run = scoria.start_run(
            {"tenant_id": TENANT},
            initial_step={"kind": "one", "sequence": 10},
            handlers={"one": lambda step, run: scoria.Next("two"), "two": lambda s, r: None},
        )
        window = scoria.runtime.get_run_window(run.run_id, limit=1)
        assert (window.step_count, [step.sequence for step in window.steps]) == (2, [11])
        assert window.older_steps == 11
        older = scoria.runtime.get_run_window(run.run_id, limit=1, steps_before=11)
        assert [step.sequence for step in older.steps] == [10] and older.older_steps is None


def test_the_run_window_pages_through_handoffs_with_its_own_cursor(app: Flask) -> None:
    run_id = start(app, kind="fixed", handlers={"fixed": fixed})
    grow(app, run_id, steps=12, events=1, handoffs=12)
    with app.app_context():
        full = scoria.get_run_detail(run_id).delegated_handoffs
        seen: list[scoria.DelegatedHandoff] = []
        after = None
        while True:
            window = scoria.runtime.get_run_window(run_id, handoff_limit=5, handoffs_after=after)
            seen.extend(window.delegated_handoffs)
            if window.older_handoffs is None:
                break
            after = window.older_handoffs
        for junk in ("junk", 7):
            with pytest.raises(scoria.InvalidRunOptions, match="older_handoffs"):
                scoria.runtime.get_run_window(run_id, handoffs_after=junk)  # type: ignore[arg-type]
    assert sorted(handoff.handoff_id for handoff in seen) == sorted(h.handoff_id for h in full)
    assert len(seen) == 12


def test_another_tenants_run_has_no_pages(app: Flask, ops: FlaskClient) -> None:
    run_id = start(app, kind="fixed", tenant="globex", handlers={"fixed": fixed})
    for query in ("", "?events_before=5", "?steps_before=2"):
        assert "Run not found" in page(ops, f"/scoria/workflows/{run_id}{query}", 404)


def test_a_decision_other_than_approved_is_not_said_approved(app: Flask, ops: FlaskClient) -> None:
    rejected, cancelled = start(app, kind="review"), start(app, kind="review")
    found = re.search(r'name="approval_id" value="([^"]+)"', run_page(ops, rejected))
    assert found
    post(ops, rejected, "reject", approval_id=found.group(1))
    post(ops, cancelled, "cancel")
    approved = start(app, kind="review")
    assert approve_with(ops, approved, arguments=json.dumps(REQUESTED)).status_code == 303
    for run_id, decision in ((rejected, "rejected"), (cancelled, "cancelled")):
        decisions = run_page(ops, run_id).split('id="decisions"')[1].split("</section>")[0]
        assert f">{decision}</span>" in decisions
        assert "<summary>Arguments</summary>" in decisions
        assert "approved as requested" not in decisions
    decisions = run_page(ops, approved).split('id="decisions"')[1].split("</section>")[0]
    assert "<summary>Arguments (approved as requested)</summary>" in decisions


def test_an_address_that_names_no_page_has_the_operator_pages_own(ops: FlaskClient) -> None:
    for address in ("/scoria/nothing-here", "/scoria/workflows/a/b/c"):
        html = page(ops, address, status=404)
        assert "Page not found" in html and 'href="/scoria/workflows"' in html
        posted = ops.post(address, data={"csrf_token": "x"})
        assert posted.status_code == 404 and "Page not found" in posted.get_data(as_text=True)
    # An address a page answers, with another method: 405, naming the one it takes.
    deleted = ops.delete("/scoria/workflows")
    assert (deleted.status_code, deleted.headers["Allow"]) == (405, "GET")
    html = page(ops, f"/scoria/workflows/{uuid.uuid4()}", status=404)
    assert "Run not found" in html


@pytest.mark.parametrize(
    ("event_type", "payload", "gist"),
    [
        ("retry_requested", {"requested_by": "ops", "attempt": 2}, ("ops", None)),
        ("approval_decided", {"decided_by": "ops", "decision": "approved"}, ("ops", None)),
        ("run_cancelled", {"cancelled_by": "ops", "reason": "dup"}, ("ops", "dup")),
        ("run_cancelled", {"cancelled_by": "ops", "reason": "  "}, ("ops", None)),
        ("run_rejected", {"reason": "é" * 400}, (None, "é" * 148 + "...")),
        ("resume_requested", {"requested_by": 7}, (None, None)),
        ("resume_requested", None, (None, None)),
        # A handler's own error may hold any key: it names nobody.
        (
            "step_failed",
            {"decided_by": "security-team", "reason": "the CFO said yes"},
            (None, None),
        ),
    ],
)
def test_a_timeline_row_names_who_asked_and_why(
    event_type: str, payload: Any, gist: tuple[Any, Any]
) -> None:
    assert event_gist(event_type, payload) == gist
