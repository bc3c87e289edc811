"""The approvals inbox, the navigation and what every page shows of times and ids.

Driven by pytest-flask: its ``client`` (taken here in place of the conftest's
plain one), its ``config``, and the request context it pushes around each
test, so that ``url_for`` works in the test body.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import pytest_flask.fixtures
from flask import Flask, render_template_string, session, url_for
from flask.testing import FlaskClient

import flask_scoria as scoria
from flask_scoria import Succeed, WaitForApproval, runtime
from flask_scoria.operator import present
from flask_scoria.runtime import tables

TENANT = "acme"
OTHER = "globex"

client = pytest_flask.fixtures.client

ARGUMENTS = {
    "recipient": "finance@example.com",
    "api_key": "sk-live-do-not-show",
    "body": "b" * 200,
    "subject": "Q3 travel summary",
}


#: What an inbox row shows whole: Approve is offered there.
SHORT = {"recipient": "finance@example.com", "subject": "Q3 travel summary"}


def ask(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    if step.approval is None:
        return WaitForApproval("send_email", ARGUMENTS, reason="Leaves the company")
    return Succeed({"sent": True})


def ask_short(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    if step.approval is None:
        return WaitForApproval("send_email", SHORT)
    return Succeed({"sent": True})


@pytest.fixture
def app(app: Flask) -> Flask:
    """The conftest's app with an operator scope kept in the session, and a handler."""
    runtime = app.extensions["scoria"]
    runtime.operator_scope(lambda: session.get("operator"))
    runtime.handler("send")(ask)
    runtime.handler("send_short")(ask_short)
    return app


@pytest.fixture
def ops(client: FlaskClient) -> FlaskClient:
    """pytest-flask's client, signed in as operator ``ops`` of tenant ``acme``."""
    sign_in(client, "ops")
    return client


def sign_in(client: FlaskClient, actor: str, tenant: str = TENANT) -> None:
    with client.session_transaction() as stored:
        stored["operator"] = {"tenant_id": tenant, "actor_id": actor}


def start(app: Flask, tenant: str = TENANT, kind: str | None = "send") -> str:
    who = scoria.identity({"actor_id": "alice", "tenant_id": tenant, "session_id": "sess-1"})
    with app.app_context():
        return scoria.start_run(who, initial_step=None if kind is None else {"kind": kind}).run_id


def html(client: FlaskClient, url: str, status: int = 200) -> str:
    response = client.get(url)
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    return response.get_data(as_text=True)


def pending_count(page: str) -> str | None:
    found = re.search(r'id="pending-count"[^>]*>([^<]*)<', page)
    return None if found is None else found.group(1)


def form_fields(page: str, run_id: str, action: str) -> dict[str, str]:
    """The hidden fields of the form that posts ``action`` for ``run_id``."""
    url = url_for(f"scoria.{action}", run_id=run_id)
    form = page.split(f'action="{url}"')[1].split("</form>")[0]
    return dict(re.findall(r'name="(\w+)" value="([^"]*)"', form))


def flash_of(page: str) -> tuple[str, str]:
    found = re.search(r'class="flash flash-(\w+)"[^>]*>([^<]*)<', page)
    assert found, "no message on the page"
    return found.group(1), found.group(2)


def test_the_nav_counts_this_tenants_pending_approvals(app: Flask, ops: FlaskClient) -> None:
    mine = [start(app), start(app)]
    theirs = start(app, tenant=OTHER)
    start(app, kind=None)
    pages = [
        url_for("scoria.runs"),
        url_for("scoria.approvals"),
        url_for("scoria.run", run_id=mine[0]),
        url_for("scoria.session_runs", session_id="sess-1"),
    ]
    for url in pages:
        assert pending_count(html(ops, url)) == "2", url
    assert pending_count(html(ops, url_for("scoria.run", run_id=theirs), 404)) == "2"
    inbox = html(ops, url_for("scoria.approvals"))
    assert theirs not in inbox and all(run_id in inbox for run_id in mine)

    sign_in(ops, "ops", tenant=OTHER)
    assert pending_count(html(ops, url_for("scoria.approvals"))) == "1"
    with ops.session_transaction() as stored:
        del stored["operator"]
    refused = html(ops, url_for("scoria.approvals"), 403)
    assert pending_count(refused) is None and "acme" not in refused


def test_the_approvals_status_is_this_tenants(app: Flask, ops: FlaskClient) -> None:
    """What the pages poll: the nav's count and the newest approval, of this tenant only."""
    url = url_for("scoria.approvals_status")
    assert ops.get(url).get_json() == {"waiting": "0", "newest": None}
    first = start(app)
    start(app, tenant=OTHER)
    with app.app_context():
        (mine,) = scoria.get_run_detail(first).approvals
    assert ops.get(url).get_json() == {"waiting": "1", "newest": mine.id}
    later = start(app)
    state = ops.get(url).get_json()
    assert state["waiting"] == "2" and state["newest"] not in (mine.id, None)
    with app.app_context():
        scoria.reject_run(later, decided_by="ops")
    assert ops.get(url).get_json() == {"waiting": "1", "newest": mine.id}
    inbox = html(ops, url_for("scoria.approvals"))
    assert f'data-inbox-newest="{mine.id}"' in inbox and f'data-inbox-url="{url}"' in inbox
    # A later page (here: after the newest row) does not say which row comes first.
    with app.app_context():
        after = runtime.Cursor(mine.requested_at, uuid.UUID(mine.id)).encode()
    assert "data-inbox-newest" not in html(ops, url_for("scoria.approvals", after=after))
    refused = app.test_client().get(url)
    assert refused.status_code == 403 and refused.get_json()["error"] == "Forbidden"
    assert "data-inbox-url" not in refused.get_data(as_text=True)


def test_an_expired_approval_leaves_the_inbox_and_its_run_is_shown_failed(
    app: Flask, ops: FlaskClient
) -> None:
    def brief(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        return WaitForApproval("send_email", {"to": "x"}, expires_in=3600)

    app.extensions["scoria"].handler("brief")(brief)
    waiting, expiring = start(app), start(app, kind="brief")
    assert pending_count(html(ops, url_for("scoria.approvals"))) == "2"
    engine = app.extensions["scoria"].storage(app).engine
    past = datetime.now(UTC) - timedelta(minutes=5)
    with engine.begin() as conn:
        conn.execute(
            tables.approvals.update()
            .where(tables.approvals.c.expires_at.is_not(None))
            .values(expires_at=past)
        )
    inbox = html(ops, url_for("scoria.approvals"))
    assert pending_count(inbox) == "1"
    assert waiting in inbox and expiring not in inbox
    # A plain list reads; the runs page records the expiry it finds, as reading the run would.
    with app.app_context():
        (found,) = [run for run in runtime.list_runs().rows if run.run_id == expiring]
        assert found.status == "waiting_for_approval"
    waiting_only = html(ops, url_for("scoria.runs", status="waiting_for_approval"))
    assert waiting in waiting_only and expiring not in waiting_only  # it no longer matches
    listed = html(ops, url_for("scoria.runs"))
    row = listed.split(f'title="{expiring}"')[1].split("</tr>")[0]
    assert 'data-status="failed"' in row
    with app.app_context():
        events = scoria.get_run_detail(expiring).events
    (expired,) = [event for event in events if event.event_type == "approval_expired"]
    assert expired.payload is not None
    assert datetime.fromisoformat(expired.payload["expired_at"]) == past


def test_a_list_that_records_an_expiry_keeps_metadata_out(app: Flask) -> None:
    def brief(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        return WaitForApproval("send_email", {"to": "x"}, expires_in=3600)

    who = scoria.identity({"actor_id": "a", "tenant_id": TENANT, "session_id": "s"})
    with app.app_context():
        run_id = scoria.start_run(
            who, initial_step={"kind": "x"}, handlers={"x": brief}, runtime={"metadata": {"k": 1}}
        ).run_id
    engine = app.extensions["scoria"].storage(app).engine
    with engine.begin() as conn:
        conn.execute(tables.approvals.update().values(expires_at=datetime.now(UTC) - timedelta(1)))
    with app.app_context():
        (run,) = runtime.list_runs(tenant=TENANT, metadata=False, notice=True).rows
        assert (run.run_id, run.status, run.metadata) == (run_id, "failed", {})
        assert scoria.get_run(run_id).metadata == {"k": 1}


def test_an_inbox_row_previews_redacted_arguments(app: Flask, ops: FlaskClient) -> None:
    run_id = start(app)
    inbox = html(ops, url_for("scoria.approvals"))
    row = inbox.split("<tbody>")[1].split("</tr>")[0]
    # Cut at three lines, as a row that cannot show them whole may be.
    preview = row.split('class="preview compact clamped"')[1].split("</dl>")[0]
    assert re.findall(r"<dt>(\w+)</dt>", preview) == ["api_key", "body", "recipient"]
    assert "[REDACTED]" in preview and "sk-live-do-not-show" not in inbox
    assert "b" * 77 + "..." in preview and "b" * 78 not in preview
    assert "1 more" in row
    assert "Leaves the company" in row
    assert f'title="{run_id}">…{run_id[-8:]}</span>' in row
    assert "ago" in row and "expires" not in row
    # Arguments the row cannot show whole are approved from the run's page.
    assert url_for("scoria.approve", run_id=run_id) not in row
    assert f'href="/scoria/workflows/{run_id}#pending-approval"' in row
    assert ">Review to approve</a>" in row
    fields = form_fields(row, run_id, "reject")
    assert set(fields) == {"csrf_token", "approval_id", "return_to"}
    assert fields["return_to"] == "approvals"


@pytest.mark.parametrize(
    "arguments, whole",
    [
        ({}, True),
        (SHORT, True),
        ({**SHORT, "cc": "a@example.com"}, True),
        ({**SHORT, "cc": "a@example.com", "bcc": "b@example.com"}, False),
        ({"body": "b" * 80}, True),
        ({"body": "b" * 81}, False),
        ({"body": "é" * 41}, False),
        ({"k" * 81: 1}, False),
        ({"n": list(range(30))}, False),
        # As shown: a masked password, a redacted key and escaped hidden characters are longer.
        ({"url": "postgres://u:p@db.example.com/" + "x" * 45}, False),
        ({"cfg": {"password": "x", "host": "h" * 50}}, False),
        ({"note": "\u200b" * 20}, False),
        ({"ssn": "x" * 70}, True),
    ],
)
def test_only_arguments_shown_whole_are_approved_from_the_inbox(
    arguments: dict[str, Any], whole: bool
) -> None:
    assert present.previewed_whole(arguments) is whole
    shown = present.preview(arguments)
    assert (len(shown) == len(arguments) and not any(v.endswith("...") for _, v in shown)) or (
        not whole
    )
    # A key the app redacts is shown as [REDACTED], whole.
    assert present.previewed_whole({"ssn": "x" * 90}, extra=frozenset({"ssn"}))


def test_a_row_looks_only_at_the_arguments_it_previews(monkeypatch: pytest.MonkeyPatch) -> None:
    arguments = {f"doc_{n:05}": {"text": "lorem", "api_key": "k"} for n in range(10_000)}
    looked_at: list[str] = []
    secret = present.is_secret_key

    def counting(key: str, extra: frozenset[str] = frozenset()) -> bool:
        looked_at.append(key)
        return secret(key, extra)

    monkeypatch.setattr(present, "is_secret_key", counting)
    shown = present.preview(arguments)
    assert [key for key, _ in shown] == ["doc_00000", "doc_00001", "doc_00002"]
    assert all('"api_key": "[REDACTED]"' in value for _, value in shown)
    assert not present.previewed_whole(arguments)
    assert len(looked_at) <= 9


def test_a_row_reads_only_the_head_of_a_long_text(monkeypatch: pytest.MonkeyPatch) -> None:
    split = "postgresql://u:" + "p" * 20_000 + "@db/prod"
    quoted = "host=db password='" + "correct horse " * 2_000 + "'"
    arguments = {"body": "lorem " * 1_000_000, "dsn": split, "list": ["x" * 10**6], "q": quoted}
    masked: list[int] = []
    mask = present.mask_passwords

    def measuring(text: str, replacement: str) -> str:
        masked.append(len(text))
        return mask(text, replacement)

    monkeypatch.setattr(present, "mask_passwords", measuring)
    shown = dict(present.preview(arguments))
    assert not present.previewed_whole(arguments)
    assert shown["body"].startswith("lorem lorem") and shown["body"].endswith("...")
    # Cut inside its password, the URL is still masked.
    assert shown["dsn"].startswith("postgresql://u:[REDACTED]") and "ppp" not in shown["dsn"]
    assert "horse" not in present.preview({"q": quoted})[0][1]
    assert max(masked) <= present.VALUE_CHARS + 2


def test_decide_from_the_inbox(app: Flask, ops: FlaskClient) -> None:
    approved, rejected = start(app, kind="send_short"), start(app, kind="send_short")
    theirs = start(app, tenant=OTHER, kind="send_short")
    inbox = html(ops, url_for("scoria.approvals"))
    for run_id, action, said in [
        (approved, "approve", "Approved. The run is now completed."),
        (rejected, "reject", "Rejected. The run is now rejected."),
    ]:
        fields = form_fields(inbox, run_id, action)
        response = ops.post(url_for(f"scoria.{action}", run_id=run_id), data=fields)
        assert response.status_code == 303
        assert response.location == url_for("scoria.approvals")
        assert flash_of(html(ops, response.location)) == ("ok", f"Run …{run_id[-8:]}: {said}")

    fields = form_fields(inbox, approved, "approve")
    response = ops.post(url_for("scoria.approve", run_id=theirs), data=fields)
    assert response.status_code == 404
    after = html(ops, url_for("scoria.approvals"))
    assert pending_count(after) == "0" and "Nothing is waiting for a decision." in after
    with app.app_context():
        assert scoria.get_run(approved).status == "completed"
        assert scoria.get_run(rejected).status == "rejected"
        assert scoria.get_run(theirs).status == "waiting_for_approval"


def test_a_decision_on_a_later_inbox_page_comes_back_to_that_page(
    app: Flask, ops: FlaskClient
) -> None:
    older, newer = start(app, kind="send_short"), start(app, kind="send_short")
    with app.app_context():
        (approval,) = scoria.get_run_detail(newer).approvals
        after = runtime.Cursor(approval.requested_at, uuid.UUID(approval.id)).encode()
    later_page = html(ops, url_for("scoria.approvals", after=after))
    fields = form_fields(later_page, older, "reject")
    assert fields["after"] == after
    response = ops.post(url_for("scoria.reject", run_id=older), data=fields)
    assert response.location == url_for("scoria.approvals", after=after)
    # That page is empty now: it says so, and leads to the first, which is not.
    emptied = html(ops, response.location)
    assert "Nothing more on this page." in emptied and "Nothing is waiting" not in emptied
    assert f'<a href="{url_for("scoria.approvals")}">← Newest</a>' in emptied
    # A cursor that does not read is dropped: the first page.
    fields = form_fields(html(ops, url_for("scoria.approvals")), newer, "approve")
    response = ops.post(url_for("scoria.approve", run_id=newer), data={**fields, "after": "x"})
    assert response.location == url_for("scoria.approvals")


def test_sending_the_same_decision_twice_is_not_an_error(app: Flask, ops: FlaskClient) -> None:
    run_id = start(app)
    page = html(ops, url_for("scoria.run", run_id=run_id))
    fields = form_fields(page, run_id, "approve")
    url = url_for("scoria.approve", run_id=run_id)
    first = ops.post(url, data=fields)
    assert flash_of(html(ops, first.location)) == ("ok", "Approved. The run is now completed.")
    twice = ops.post(url, data=fields)
    assert flash_of(html(ops, twice.location)) == ("ok", "Approved. The run is now completed.")

    rejected_instead = ops.post(url_for("scoria.reject", run_id=run_id), data=fields)
    kind, text = flash_of(html(ops, rejected_instead.location))
    assert kind == "error" and "already approved by &#39;ops&#39;" in text

    sign_in(ops, "mallory")
    colleague = ops.post(url, data=fields)
    kind, text = flash_of(html(ops, colleague.location))
    assert kind == "error" and "already approved by &#39;ops&#39;" in text


def test_times_are_utc_in_the_markup(app: Flask, ops: FlaskClient) -> None:
    run_id = start(app)
    with app.app_context():
        created = scoria.get_run(run_id).created_at
    page = html(ops, url_for("scoria.run", run_id=run_id))
    utc = created.astimezone(UTC)
    machine = utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    human = utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert f'<time datetime="{machine}" title="{human}">' in page
    assert f'<span class="abs" data-local>{human}</span>' in page
    assert not re.search(r'<time datetime="[^"]*\+00:00"', page)


def test_short_ids_tell_runs_of_the_same_moment_apart(app: Flask, ops: FlaskClient) -> None:
    runs = [start(app, kind=None) for _ in range(20)]
    assert len({run_id[:8] for run_id in runs}) < len(runs)
    page = html(ops, url_for("scoria.runs"))
    shown = re.findall(r'<span class="mono short-id" title="([0-9a-f-]{36})">…([0-9a-f]{8})<', page)
    assert sorted(full for full, _ in shown) == sorted(runs)
    assert all(full.endswith(tail) for full, tail in shown)
    assert len({tail for _, tail in shown}) == len(runs)


@pytest.mark.parametrize(
    ("value", "linked"),
    [
        (None, None),
        ("https://host.example/dashboard", "https://host.example/dashboard"),
        ("/dashboard?tab=runs&x=1", "/dashboard?tab=runs&amp;x=1"),
        ("javascript:alert(1)", None),
        ("//elsewhere.example", None),
        ("/\\elsewhere.example", None),
        # Browsers drop tabs and line breaks from a URL: //evil.example.
        ("/\t/evil.example/steal", None),
        ("/\n/evil.example", None),
        ("/", "/"),
    ],
)
def test_a_link_back_to_the_host_app(
    ops: FlaskClient, config: Any, value: str | None, linked: str | None
) -> None:
    # Set after init_app, which warns about SCORIA_* keys it does not know.
    config["SCORIA_HOME_URL"] = value
    page = html(ops, url_for("scoria.runs"))
    if linked is None:
        assert 'class="home"' not in page
    else:
        assert f'<a class="home" href="{linked}">Back to the app</a>' in page


@pytest.mark.parametrize(
    ("value", "linked"),
    [("/dashboard", "/myapp/dashboard"), ("https://host.example/", "https://host.example/")],
)
def test_the_link_back_keeps_the_root_the_app_is_served_at(
    ops: FlaskClient, config: Any, value: str, linked: str
) -> None:
    config["SCORIA_HOME_URL"] = value
    response = ops.get("/scoria/workflows", environ_overrides={"SCRIPT_NAME": "/myapp"})
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert 'href="/myapp/scoria/approvals"' in page  # as every other link
    assert f'<a class="home" href="{linked}">Back to the app</a>' in page


def test_status_json_answers_json_errors(app: Flask, ops: FlaskClient) -> None:
    theirs = start(app, tenant=OTHER)
    for run_id in (theirs, "not-a-run"):
        response = ops.get(url_for("scoria.run_status", run_id=run_id))
        assert response.status_code == 404
        assert response.mimetype == "application/json"
        assert response.get_json() == {
            "error": "Not Found",
            "status": 404,
            "message": "No such run for your tenant.",
        }
    anonymous = app.test_client()
    response = anonymous.get(url_for("scoria.run_status", run_id=theirs))
    assert response.status_code == 403
    assert response.get_json()["error"] == "Forbidden"


def test_the_empty_delegated_evidence_says_so_and_is_not_linked(
    app: Flask, ops: FlaskClient
) -> None:
    page = html(ops, url_for("scoria.run", run_id=start(app)))
    section = page.split('id="delegated-evidence"')[1].split("</section>")[0]
    assert "No work was handed to another role in this run." in section
    assert "Handoff(" not in section and "start_handoff_run" not in section
    assert 'href="#delegated-evidence"' not in page


@dataclass(frozen=True)
class ExpiringApproval:
    expires_at: datetime | None


def test_an_expiry_shows_only_when_recorded(app: Flask) -> None:
    template = '{% from "scoria/macros.html" import expiry with context %}{{ expiry(item) }}'
    later = datetime.now(UTC) + timedelta(hours=2, minutes=1)
    with app.test_request_context(url_for("scoria.approvals")):
        shown = render_template_string(template, item=ExpiringApproval(later))
        unset = render_template_string(template, item=ExpiringApproval(None))
        absent = render_template_string(template, item=object())
    assert shown.startswith('<span class="expires">expires <time datetime=')
    assert ">in 2 h<" in shown
    assert unset == absent == ""


def test_relative_times_run_both_ways() -> None:
    now = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    assert present.relative_time(now - timedelta(minutes=3), now) == "3 min ago"
    assert present.relative_time(now + timedelta(minutes=3), now) == "in 3 min"
    assert present.relative_time(now + timedelta(milliseconds=300), now) == "0 ms ago"
    assert present.iso_time(datetime(2024, 6, 1, 12, 0, 3)) == "2024-06-01T12:00:03.000Z"
    kolkata = datetime(2024, 6, 1, 17, 30, 3, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    assert present.iso_time(kolkata) == "2024-06-01T12:00:03.000Z"
    assert present.absolute_time(kolkata) == "2024-06-01 12:00:03 UTC"
