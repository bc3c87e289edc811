"""The operator pages in a real Chromium: what an operator sees and clicks.

The app is served by pytest-flask's ``live_server`` (a child process) from a
SQLite file that the test writes to as well. Screenshots land in
``test-artifacts/screenshots/``. Without Chromium these tests skip, unless
``SCORIA_REQUIRE_BROWSER=1`` (set by CI) makes that a failure.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import create_test_app
from flask import Flask
from test_operator_run_page import flaky, grow, review

import flask_scoria as scoria
from flask_scoria import Handoff, Succeed, WaitForApproval, schema

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"
TENANT = "acme"
#: Where the lists are tables (1280, 1180), cards on a wide screen (1024), on a phone (390).
WIDTHS = {"desktop": 1280, "small-desktop": 1180, "laptop": 1024, "phone": 390}
LONG_NOTE = "checked-with-finance-" * 12
PROMPT = "Book https://travel.example/" + "a" * 90 + " for the Q3 offsite " * 20


def review_then_send(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    if step.approval is None:
        return WaitForApproval(
            "send_email",
            {
                "to": "finance@example.com",
                "subject": "Q3 travel summary",
                "smtp_password": "x",
                "body": "Dear finance team, please find the Q3 travel summary attached. " * 3,
            },
            reason="Outbound email leaves the company; a person confirms the recipient.",
        )
    return Succeed({"message_id": "<20240601.1@example.com>", "delivered": True})


def publish(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    """Ask with arguments an inbox row shows whole."""
    if step.approval is None:
        return WaitForApproval("publish_post", {"channel": "#travel", "title": "Q3 rail policy"})
    return Succeed({"published": True})


#: Arguments a row shows whole, one of them a long text that wraps on several lines.
REFUND = {
    "amount": "1500 EUR",
    "callback_url": "https://payments.example.com/refunds/confirm?order=123456&amount=1500&c=EUR",
    "to": "billing@example.com",
}


def refund(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    if step.approval is None:
        return WaitForApproval("refund", REFUND)
    return Succeed({"refunded": True})


def delegate(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    return Handoff(
        "critic",
        "review",
        handoff_input={"draft": "Trains are reimbursed in second class on trips under 4 hours."},
        projected_context={
            "policy_section": "4.2 Rail travel",
            "audience": "employees",
            "tone": "plain, cite the section; " * 6,
            "max_tokens": 400,
        },
        capability_tags=["read-only", "policy"],
    )


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    """An operator app on a SQLite file, for ``live_server`` to serve."""
    uri = f"sqlite:///{tmp_path / 'scoria.sqlite3'}"
    engine = sa.create_engine(uri)
    schema.upgrade(engine)
    engine.dispose()
    app = create_test_app(uri, tmp_path / "instance")
    app.config["SCORIA_HOME_URL"] = "/"
    runtime = app.extensions["scoria"]
    runtime.operator_scope(lambda: {"tenant_id": TENANT, "actor_id": "ops-oncall"})
    runtime.handler("send")(review_then_send)
    runtime.handler("publish")(publish)
    runtime.handler("refund")(refund)
    runtime.handler("delegate")(delegate)
    runtime.handler("review")(review)
    runtime.handler("flaky")(flaky)
    yield app
    runtime.storage(app).engine.dispose()


@pytest.fixture
def base(live_server: Any) -> str:
    """The URL the live server answers on."""
    return str(live_server.url())


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = ""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        reason = f"playwright is not installed: {exc}"
    if not reason and not os.path.exists(CHROMIUM):
        reason = f"no Chromium at {CHROMIUM}"
    if reason:
        if os.environ.get("SCORIA_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (SCORIA_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[..., Any]]:
    """Open a tab of a given width, colour scheme and time zone; console errors fail."""
    contexts: list[Any] = []
    errors: list[str] = []

    def open_(
        width: int = 1280,
        scheme: str = "light",
        timezone: str = "UTC",
        *,
        javascript: bool = True,
        failed_loads: bool = False,
    ) -> Any:
        context = browser.new_context(
            viewport={"width": width, "height": 860},
            color_scheme=scheme,
            timezone_id=timezone,
            java_script_enabled=javascript,
        )
        contexts.append(context)
        page = context.new_page()

        def console(message: Any) -> None:
            expected = failed_loads and message.text.startswith("Failed to load resource")
            if message.type == "error" and not expected:
                errors.append(message.text)

        page.on("console", console)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        return page

    yield open_
    for context in contexts:
        context.close()
    assert errors == []


def start(
    app: Flask, kind: str | None, session_id: str = "chat-7f3a", actor: str = "alice", **kw: Any
) -> str:
    who = scoria.identity({"actor_id": actor, "tenant_id": TENANT, "session_id": session_id})
    with app.app_context():
        step = None if kind is None else {"kind": kind}
        return scoria.start_run(who, initial_step=step, **kw).run_id


def shoot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def fits(page: Any) -> None:
    """Nothing is wider than the window: no sideways scrolling."""
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= page.evaluate("window.innerWidth"), page.url


def row_of(page: Any, run_id: str) -> Any:
    """The list row that links to the run ``run_id``."""
    return page.locator("tr", has=page.locator(f'a[href="/scoria/workflows/{run_id}"]'))


def test_approve_in_the_browser(app: Flask, base: str, open_page: Callable[..., Any]) -> None:
    start(app, None)
    run_id = start(app, "send")
    page = open_page()

    page.goto(f"{base}/scoria/approvals")
    assert page.locator("#pending-count").inner_text() == "1"
    page.click("text=Review")
    badge = page.locator("#run-status [data-status]")
    assert badge.get_attribute("data-status") == "waiting_for_approval"
    assert page.locator("#pending-approval").is_visible()
    assert "[REDACTED]" in page.locator("#pending-approval pre").inner_text()
    shoot(page, "run-waiting")

    page.fill("#pending-approval form:first-of-type input[name=note]", LONG_NOTE)
    page.click("text=Approve and resume")
    page.wait_for_selector('#run-status [data-status="completed"]')
    assert "step_completed" in page.locator("#timeline").inner_text()
    assert LONG_NOTE[:40] in page.locator("#decisions").inner_text()
    assert page.locator("#pending-count").inner_text() == "0"
    shoot(page, "run-completed")

    page.goto(f"{base}/scoria/workflows")
    link = page.locator(f'a[href="/scoria/workflows/{run_id}"]')
    assert link.inner_text() == f"…{run_id[-8:]}"
    assert link.locator("[title]").get_attribute("title") == run_id
    assert page.locator("a.home").get_attribute("href") == "/"


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_the_keyboard_skips_to_the_content(
    app: Flask, base: str, open_page: Callable[..., Any], scheme: str
) -> None:
    run_id = start(app, "send")
    page = open_page(scheme=scheme)
    page.goto(f"{base}/scoria/workflows/{run_id}")
    skip = page.locator("a.skip")
    assert skip.bounding_box()["y"] < 0  # out of sight until the keyboard reaches it
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    assert skip.bounding_box()["y"] >= 0 and skip.inner_text() == "Skip to the content"
    shoot(page, f"skip-link-{scheme}")
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "content"
    page.keyboard.press("Tab")  # the next stop is in the page's content, past the top bar
    assert page.evaluate("document.getElementById('content').contains(document.activeElement)")


def test_decide_in_the_inbox(app: Flask, base: str, open_page: Callable[..., Any]) -> None:
    first, second = start(app, "publish"), start(app, "send")
    page = open_page()
    page.goto(f"{base}/scoria/approvals")
    assert page.locator("#pending-count").inner_text() == "2"
    # An email whose body the row cuts is approved from its run's page, where it is whole.
    long = row_of(page, second)
    assert "[REDACTED]" in long.inner_text() and "Q3 travel summary" in long.inner_text()
    assert long.locator("button", has_text="Approve").count() == 0
    assert long.locator("a", has_text="Review to approve").is_visible()
    shoot(page, "inbox")
    row = row_of(page, first)
    row.locator("button", has_text="Approve").click()
    page.wait_for_url(f"{base}/scoria/approvals")
    assert f"Run …{first[-8:]}: Approved. The run is now completed." in page.inner_text("main")
    assert page.locator("#pending-count").inner_text() == "1"
    # Rejecting in one click asks first; a dismissed question rejects nothing.
    asked: list[str] = []

    def answer(dialog: Any) -> None:
        asked.append(dialog.message)
        if len(asked) > 1:
            dialog.accept()
        else:
            dialog.dismiss()

    page.on("dialog", answer)
    row_of(page, second).locator("button", has_text="Reject").click()
    assert page.locator("#pending-count").inner_text() == "1"
    row_of(page, second).locator("button", has_text="Reject").click()
    page.wait_for_url(f"{base}/scoria/approvals")
    assert len(asked) == 2 and asked[0].startswith("Reject ")
    assert "Rejected. The run is now rejected." in page.inner_text("main")
    assert "Nothing is waiting for a decision." in page.inner_text("main")
    with app.app_context():
        assert scoria.get_run(first).status == "completed"
        assert scoria.get_run(second).status == "rejected"


def test_the_inbox_says_when_approvals_arrive_or_go(
    app: Flask, base: str, open_page: Callable[..., Any]
) -> None:
    first = start(app, "publish")
    page = open_page()
    page.goto(f"{base}/scoria/approvals")
    live = page.locator("[data-inbox-live]")
    assert not live.is_visible()
    start(app, "publish")
    page.locator("#pending-count", has_text="2").wait_for(timeout=15_000)
    live.filter(has_text="changed since this page loaded").wait_for(timeout=5_000)
    # The rows stay as they were until the operator reloads.
    assert page.locator("tbody tr").count() == 1
    shoot(page, "inbox-changed")
    live.locator("a", has_text="reload to see them").click()
    page.wait_for_url(f"{base}/scoria/approvals")
    assert page.locator("tbody tr").count() == 2 and not live.is_visible()
    with app.app_context():
        scoria.reject_run(first, decided_by="a-colleague")
    live.filter(has_text="changed since this page loaded").wait_for(timeout=15_000)
    assert page.locator("#pending-count").inner_text() == "1"


@pytest.mark.parametrize("width", [1280, 390])
def test_an_inbox_row_offering_approve_shows_every_argument_uncut(
    app: Flask, base: str, open_page: Callable[..., Any], width: int
) -> None:
    run_id = start(app, "refund")
    page = open_page(width=width)
    page.goto(f"{base}/scoria/approvals")
    row = row_of(page, run_id)
    assert row.locator("button", has_text="Approve").is_visible()
    values = row.locator(".preview dd")
    assert values.all_inner_texts() == [REFUND[key] for key in sorted(REFUND)]
    for value in values.all():
        assert value.evaluate("e => e.scrollHeight <= e.clientHeight"), value.inner_text()
    shoot(page, f"inbox-whole-{width}")


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("size", list(WIDTHS))
def test_pages_fit_the_screen_in_both_schemes(
    app: Flask, base: str, open_page: Callable[..., Any], size: str, scheme: str
) -> None:
    waiting = start(
        app,
        "send",
        session_id="chat-with-a-rather-long-session-identifier-0042",
        actor="serviceaccount" + "x" * 60,
        runtime={"metadata": {"payload": {"prompt": PROMPT}}},
    )
    handed = start(app, "delegate", session_id="chat-91b2")
    done = start(app, "send")
    with app.app_context():
        scoria.approve_run(done, decided_by="ops-oncall", note=LONG_NOTE)
        scoria.resume_run(done)
    page = open_page(WIDTHS[size], scheme, "Asia/Kolkata")
    background = "rgb(15, 18, 25)" if scheme == "dark" else "rgb(245, 246, 248)"
    for name, path in [
        ("runs", "/scoria/workflows"),
        ("session", "/scoria/sessions/chat-with-a-rather-long-session-identifier-0042"),
        ("inbox", "/scoria/approvals"),
        ("run-waiting", f"/scoria/workflows/{waiting}"),
        ("run-completed", f"/scoria/workflows/{done}"),
        ("run-handoff", f"/scoria/workflows/{handed}"),
    ]:
        page.goto(base + path)
        assert page.evaluate("getComputedStyle(document.body).backgroundColor") == background
        fits(page)
        shoot(page, f"{name}-{size}-{scheme}")


def test_times_are_shown_in_the_viewers_time_zone(
    app: Flask, base: str, open_page: Callable[..., Any]
) -> None:
    run_id = start(app, "send")
    with app.app_context():
        created = scoria.get_run(run_id).created_at
    kolkata = created + timedelta(hours=5, minutes=30)
    page = open_page(timezone="Asia/Kolkata")
    page.goto(f"{base}/scoria/workflows/{run_id}")
    shown = page.locator(".facts time").first
    assert shown.locator("[data-local]").inner_text() == (
        kolkata.strftime("%Y-%m-%d %H:%M:%S") + " +05:30"
    )
    assert shown.get_attribute("title") == created.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert shown.locator("[data-relative]").inner_text().endswith(" ago")

    plain = open_page(timezone="Asia/Kolkata", javascript=False)
    plain.goto(f"{base}/scoria/workflows/{run_id}")
    text = plain.locator(".facts time [data-local]").first.inner_text()
    assert text == created.strftime("%Y-%m-%d %H:%M:%S UTC")


def test_the_page_refreshes_when_the_run_moves(
    app: Flask, base: str, open_page: Callable[..., Any]
) -> None:
    run_id = start(app, "send")
    page = open_page()
    page.goto(f"{base}/scoria/workflows/{run_id}")
    with app.app_context():
        scoria.approve_run(run_id, decided_by="someone-on-the-cli")
        scoria.resume_run(run_id)
    page.wait_for_selector('#run-status [data-status="completed"]', timeout=10_000)
    assert page.locator("button.copy").first.is_visible()


def test_copy_works_where_the_clipboard_api_does_not(
    app: Flask, base: str, open_page: Callable[..., Any]
) -> None:
    """Served over plain HTTP from another host, a page has no ``navigator.clipboard``."""
    run_id = start(app, "send")
    page = open_page()
    page.add_init_script(
        "Object.defineProperty(navigator, 'clipboard', {value: undefined});"
        "document.addEventListener('copy', e => { const f = e.target;"
        " window.copied = f.value.substring(f.selectionStart, f.selectionEnd); });"
    )
    page.goto(f"{base}/scoria/workflows/{run_id}")
    button = page.locator("h1 button.copy")
    label = button.get_attribute("aria-label")
    button.click()
    assert button.inner_text() == "copied" and button.get_attribute("aria-label") == "copied"
    assert page.evaluate("window.copied") == run_id
    # A second click while it says "copied" still gives the button its own label back.
    button.click()
    page.locator("h1 button.copy", has_text="copy").filter(has_not_text="copied").wait_for()
    assert label and button.get_attribute("aria-label") == label


def test_a_note_being_typed_is_kept_when_the_run_moves(
    app: Flask, base: str, open_page: Callable[..., Any]
) -> None:
    run_id = start(app, "send")
    page = open_page()
    page.goto(f"{base}/scoria/workflows/{run_id}")
    note = "#pending-approval form:first-of-type input[name=note]"
    page.fill(note, "half a thought about the recipient")
    with app.app_context():
        scoria.cancel_run(run_id, cancelled_by="a-colleague")
    live = page.locator("[data-live]")
    live.filter(has_text="this run changed").wait_for(timeout=10_000)
    assert page.input_value(note) == "half a thought about the recipient"
    shoot(page, "run-changed-while-typing")
    page.reload()
    assert page.locator("#run-status [data-status]").get_attribute("data-status") == "cancelled"


def test_an_opened_panel_or_a_selection_is_kept_when_the_run_moves(
    app: Flask, base: str, open_page: Callable[..., Any]
) -> None:
    opened, selected = start(app, "send"), start(app, "send")
    page = open_page()
    page.goto(f"{base}/scoria/workflows/{opened}")
    payload = page.locator("#timeline details").first
    payload.locator("summary").click()
    with app.app_context():
        scoria.cancel_run(opened, cancelled_by="a-colleague")
    live = page.locator("[data-live]")
    live.filter(has_text="this run changed").wait_for(timeout=10_000)
    assert payload.get_attribute("open") is not None
    assert "what you typed" not in live.inner_text()
    shoot(page, "run-changed-while-reading")

    page.goto(f"{base}/scoria/workflows/{selected}")
    page.evaluate(
        "getSelection().selectAllChildren(document.querySelector('#pending-approval pre'))"
    )
    with app.app_context():
        scoria.cancel_run(selected, cancelled_by="a-colleague")
    live.filter(has_text="this run changed").wait_for(timeout=10_000)
    assert "finance@example.com" in page.evaluate("getSelection().toString()")


def test_the_poller_stops_when_the_run_is_gone(
    app: Flask, base: str, open_page: Callable[..., Any]
) -> None:
    run_id = start(app, "send")
    page = open_page(failed_loads=True)
    polls: list[int] = []
    page.on(
        "response",
        lambda response: f"{run_id}/status.json" in response.url and polls.append(response.status),
    )
    page.goto(f"{base}/scoria/workflows/{run_id}")
    engine = app.extensions["scoria"].storage(app).engine
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE scoria_runs SET tenant_id = 'globex'"))
    live = page.locator("[data-live]")
    live.filter(has_text="stopped refreshing").wait_for(timeout=10_000)
    assert "no longer available" in live.inner_text()
    page.wait_for_timeout(5_000)
    assert polls == [404]


def test_handoff_evidence_in_the_browser(
    app: Flask, base: str, open_page: Callable[..., Any]
) -> None:
    run_id = start(app, "delegate", session_id="chat-91b2")
    page = open_page()
    page.goto(f"{base}/scoria/workflows/{run_id}#delegated-evidence")
    section = page.locator("#delegated-evidence")
    assert "critic" in section.inner_text()
    assert not section.locator("details pre").first.is_visible()
    section.locator("summary", has_text="View full context").click()
    assert section.locator("details pre").first.is_visible()
    shoot(page, "run-handoff-open")
    page.goto(f"{base}/scoria/sessions/chat-91b2")
    fits(page)
    shoot(page, "session")


def test_edit_the_arguments_and_approve(
    app: Flask, base: str, open_page: Callable[..., Any]
) -> None:
    run_id = start(app, "review")
    page = open_page(failed_loads=True)  # the refused form answers 422
    page.goto(f"{base}/scoria/workflows/{run_id}")
    field = page.locator("#pending-approval textarea[name=arguments]")
    assert '"smtp_password": "[REDACTED]"' in field.input_value()
    assert "EXPIRES\nin " in page.locator("#pending-approval .facts").inner_text()
    field.fill('{"to": "ceo@example.com", "subject": "Q3"')
    page.click("text=Approve and resume")
    error = page.locator("#pending-approval .field-error")
    assert "not valid JSON" in error.inner_text()
    assert field.input_value() == '{"to": "ceo@example.com", "subject": "Q3"'
    shoot(page, "run-arguments-refused")
    field.fill('{"to": "ceo@example.com", "subject": "Q3", "smtp_password": "[REDACTED]"}')
    page.click("text=Approve and resume")
    page.wait_for_selector('#run-status [data-status="completed"]')
    compare = page.locator("#decisions .compare").inner_text()
    assert "team@example.com" in compare and "ceo@example.com" in compare
    shoot(page, "run-arguments-edited")
    with app.app_context():
        edited = scoria.get_run_detail(run_id).approvals[0].edited_arguments
    assert edited is not None and edited["smtp_password"] == "hunter2"
    narrow = open_page(WIDTHS["phone"])
    narrow.goto(f"{base}/scoria/workflows/{run_id}")
    fits(narrow)
    shoot(narrow, "run-arguments-edited-phone")


def test_cancel_a_running_run(app: Flask, base: str, open_page: Callable[..., Any]) -> None:
    run_id = start(app, "not-registered-here")
    page = open_page()
    page.goto(f"{base}/scoria/workflows/{run_id}")
    assert page.locator("#run-status [data-status]").get_attribute("data-status") == "running"
    assert not page.locator("#run-actions input[name=reason]").is_visible()  # folded away
    page.click("text=Cancel this run…")
    page.fill("#run-actions input[name=reason]", "started by mistake")
    shoot(page, "run-running")
    page.click("text=Cancel run")
    page.wait_for_selector('#run-status [data-status="cancelled"]')
    assert "Cancelled. The run is now cancelled." in page.inner_text("main")
    assert page.locator("#run-actions").count() == 0
    with app.app_context():
        last = scoria.get_run_detail(run_id).events[-1]
    assert (last.event_type, last.payload) == (
        "run_cancelled",
        {"cancelled_by": "ops-oncall", "reason": "started by mistake"},
    )
    shoot(page, "run-cancelled")


def test_the_runs_filters_fold_away_on_a_phone(
    app: Flask, base: str, open_page: Callable[..., Any]
) -> None:
    start(app, "send")
    phone = open_page(WIDTHS["phone"])
    phone.goto(f"{base}/scoria/workflows")
    toggle, status = phone.locator(".filters-toggle"), phone.locator("select[name=status]")
    assert toggle.get_attribute("aria-expanded") == "false" and not status.is_visible()
    # A run is in the first screen, not below the filters.
    assert phone.locator("table.list tbody tr").first.bounding_box()["y"] < 390  # type: ignore[index]
    toggle.click()
    assert toggle.get_attribute("aria-expanded") == "true" and status.is_visible()
    status.select_option("completed")
    phone.click("#run-filters button[type=submit]")
    phone.wait_for_url("**status=completed**")
    assert toggle.inner_text() == "Filters (1 in use)" and status.is_visible()
    shoot(phone, "runs-phone-filtered")
    for wide in (open_page(WIDTHS["laptop"]), open_page(WIDTHS["phone"], javascript=False)):
        wide.goto(f"{base}/scoria/workflows")
        assert wide.locator("select[name=status]").is_visible()
        assert not wide.locator(".filters-toggle").is_visible()


def test_retry_a_failed_run(app: Flask, base: str, open_page: Callable[..., Any]) -> None:
    run_id = start(app, "flaky")
    for width, name in ((WIDTHS["phone"], "phone"), (WIDTHS["desktop"], "desktop")):
        page = open_page(width)
        page.goto(f"{base}/scoria/workflows/{run_id}")
        fits(page)
        shoot(page, f"run-failed-{name}")
        failed = page.locator(".run-header .facts div", has_text="Failed").inner_text()
        assert "#1 flaky: RuntimeError the mail server hung up" in failed
    error = page.locator("#steps details", has_text="Error").first
    trace = error.locator("details.traceback")
    assert not trace.locator("pre").is_visible()
    trace.locator("summary").click()
    assert "RuntimeError(<boom>)" in trace.locator("pre").inner_text()
    assert "sk-live-1" not in page.content()
    shoot(page, "run-failed-traceback")
    # One click runs the handler again: the browser asks first.
    asked: list[str] = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept()))
    page.click("text=Retry failed step")
    page.wait_for_selector('#run-status [data-status="completed"]')
    assert asked == [
        "Retry the failed step? The handler registered for flaky runs again, as attempt 2."
    ]
    assert "Retried. The run is now completed." in page.inner_text("main")
    # The failed first attempt stays told on the step, though its error is gone.
    page.click("#steps summary:has-text('Attempt history')")
    history = page.locator('[data-attempt-event="step_failed"]').inner_text()
    assert history.startswith("Attempt 1 failed") and "the mail server hung up" in history
    shoot(page, "run-retried")


@pytest.mark.parametrize("size", list(WIDTHS))
def test_a_long_run_stays_readable(
    app: Flask, base: str, open_page: Callable[..., Any], size: str
) -> None:
    run_id = start(app, "delegate")
    grow(app, run_id, steps=300, events=3000, handoffs=120)
    page = open_page(WIDTHS[size])
    page.goto(f"{base}/scoria/workflows/{run_id}")
    fits(page)
    assert page.locator("#workflow-timeline .event").count() == 25
    assert page.locator("#delegated-evidence .handoff").count() == 10
    shoot(page, f"run-long-{size}")
    for section in ("steps", "delegated-evidence", "timeline"):
        page.locator(f"#{section}").scroll_into_view_if_needed()
        page.evaluate(f"document.getElementById('{section}').scrollIntoView()")
        page.screenshot(path=str(SHOTS / f"run-long-{size}-{section}.png"))
    newest = int(page.locator("#workflow-timeline .event .seq").last.inner_text())
    page.click("text=older events")
    page.wait_for_url("**events_before=*")
    page.locator("text=Newest events").wait_for()
    shown = page.locator("#workflow-timeline .event .seq").all_inner_texts()
    assert [int(seq) for seq in shown] == list(range(newest - 49, newest - 24))
    assert page.locator("text=Newest events").is_visible()
    fits(page)
