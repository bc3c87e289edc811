"""The example's run page in a real Chromium: it follows the run without a reload by hand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_browser import SHOTS, browser, open_page

from examples.assistant.tests.http_client import Browser
from examples.assistant.tests.test_demo import approve_as_operator, demo

pytestmark = pytest.mark.browser
__all__ = ["browser", "demo", "open_page"]  # fixtures


def test_the_member_sees_the_approval_arrive(
    open_page: Callable[..., Any], demo: str, tmp_path: Path
) -> None:
    page = open_page()  # fails the test on any console error
    page.goto(f"{demo}/login")
    page.click("text=Sign in as alice")
    page.fill("#prompt", "What does the travel policy say about trains?")
    page.click("form[action='/assistant/runs'] button")
    status = page.locator("#run-status")
    assert status.get_attribute("data-status") == "waiting_for_approval"
    assert page.locator("#operator-link").count() == 0
    run_id = page.locator("#run-id").inner_text()

    ops = Browser(demo)
    ops.get("/login")
    ops.post("/login", user_id="ops")
    approve_as_operator(ops, run_id)

    page.wait_for_selector('#run-status[data-status="completed"]', timeout=10_000)
    assert "[stand-in assistant]" in page.locator("#answer").inner_text()
    assert page.locator("#live").count() == 0
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "example-run-completed.png"), full_page=True)
