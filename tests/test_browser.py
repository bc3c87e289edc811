"""The operator pages in a real Chromium: what an operator sees and clicks.

Screenshots land in ``test-artifacts/screenshots/``. Without Chromium these
tests skip, unless ``SCORIA_REQUIRE_BROWSER=1`` (set by CI) makes that a failure.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import create_test_app
from flask import Flask
from werkzeug.serving import make_server

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


def review_then_send(step: scoria.StepView, run: scoria.RunSummary) -> Any:
    if step.approval is None:
        return WaitForApproval(
            "send_email",
            {"to": "finance@example.com", "subject": "Q3 travel summary", "smtp_password": "x"},
            reason="Outbound email leaves the company; a person confirms the recipient.",
        )
    return Succeed({"message_id": "<20240601.1@example.com>", "delivered": True})


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
def browser_page() -> Iterator[Any]:
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
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        yield page
        browser.close()


@pytest.fixture
def live_app(tmp_path: Path) -> Iterator[tuple[Flask, str]]:
    uri = f"sqlite:///{tmp_path / 'scoria.sqlite3'}"
    engine = sa.create_engine(uri)
    schema.upgrade(engine)
    engine.dispose()
    app = create_test_app(uri, tmp_path / "instance")
    runtime = app.extensions["scoria"]
    runtime.operator_scope(lambda: {"tenant_id": TENANT, "actor_id": "ops-oncall"})
    runtime.handler("send")(review_then_send)
    runtime.handler("delegate")(delegate)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(5)
    runtime.storage(app).engine.dispose()


def start(app: Flask, kind: str | None, session_id: str = "chat-7f3a", **kw: Any) -> str:
    who = scoria.identity({"actor_id": "alice", "tenant_id": TENANT, "session_id": session_id})
    with app.app_context():
        step = None if kind is None else {"kind": kind}
        return scoria.start_run(who, initial_step=step, **kw).run_id


def test_approve_in_the_browser(browser_page: Any, live_app: tuple[Flask, str]) -> None:
    app, base = live_app
    SHOTS.mkdir(parents=True, exist_ok=True)
    start(app, None)
    run_id = start(
        app, "send", runtime={"metadata": {"payload": {"prompt": "Send the Q3 summary"}}}
    )
    page = browser_page
    errors: list[str] = []
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))

    page.goto(f"{base}/scoria/approvals")
    page.screenshot(path=str(SHOTS / "approvals-inbox.png"), full_page=True)
    page.click("text=Review")
    badge = page.locator("#run-status [data-status]")
    assert badge.get_attribute("data-status") == "waiting_for_approval"
    assert page.locator("#pending-approval").is_visible()
    assert "[REDACTED]" in page.locator("#pending-approval pre").inner_text()
    page.screenshot(path=str(SHOTS / "run-waiting.png"), full_page=True)

    page.fill("#pending-approval form:first-of-type input[name=note]", "Recipient checked")
    page.click("text=Approve and resume")
    page.wait_for_selector('#run-status [data-status="completed"]')
    assert "step_completed" in page.locator("#timeline").inner_text()
    assert "Recipient checked" in page.locator("#decisions").inner_text()
    page.screenshot(path=str(SHOTS / "run-completed.png"), full_page=True)

    page.goto(f"{base}/scoria/workflows")
    assert page.locator(f'a[href="/scoria/workflows/{run_id}"]').count() == 1
    page.screenshot(path=str(SHOTS / "runs-list.png"), full_page=True)
    assert errors == []


def test_the_page_refreshes_when_the_run_moves(
    browser_page: Any, live_app: tuple[Flask, str]
) -> None:
    app, base = live_app
    run_id = start(app, "send")
    page = browser_page
    page.goto(f"{base}/scoria/workflows/{run_id}")
    with app.app_context():
        scoria.approve_run(run_id, decided_by="someone-on-the-cli")
        scoria.resume_run(run_id)
    page.wait_for_selector('#run-status [data-status="completed"]', timeout=10_000)
    assert page.locator("button.copy").first.is_visible()


def test_handoff_evidence_in_the_browser(browser_page: Any, live_app: tuple[Flask, str]) -> None:
    app, base = live_app
    SHOTS.mkdir(parents=True, exist_ok=True)
    run_id = start(app, "delegate", session_id="chat-91b2")
    page = browser_page
    page.goto(f"{base}/scoria/workflows/{run_id}#delegated-evidence")
    section = page.locator("#delegated-evidence")
    assert "critic" in section.inner_text()
    assert not section.locator("details pre").first.is_visible()
    section.locator("summary", has_text="View full context").click()
    assert section.locator("details pre").first.is_visible()
    page.screenshot(path=str(SHOTS / "run-handoff.png"), full_page=True)
    page.goto(f"{base}/scoria/sessions/chat-91b2")
    page.screenshot(path=str(SHOTS / "session.png"), full_page=True)
