"""``python -m examples.assistant.demo`` as a real server, driven over HTTP."""

from __future__ import annotations

import html
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.assistant.tests.http_client import Browser, free_port

ROOT = Path(__file__).resolve().parents[3]


def start_demo(port: int, tmp_path: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PORT": str(port),
        "ASSISTANT_SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'demo.sqlite3'}",
        "ASSISTANT_SECRET_KEY": "demo-test",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "examples.assistant.demo"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    server = start_demo(port, tmp_path)
    base = f"http://127.0.0.1:{port}"
    assert server.stdout
    try:
        banner = [server.stdout.readline()]
        while banner[-1] and "Ctrl+C" not in banner[-1]:
            banner.append(server.stdout.readline())
        text = "".join(banner)
        assert text.startswith(f"flask-scoria example assistant: {base}/\n"), text
        assert "sign in as alice" in text
        # Printed only once the port is bound: the first request needs no retry.
        urllib.request.urlopen(base + "/login", timeout=10).close()
        yield base
    finally:
        server.terminate()
        server.communicate(timeout=10)


def test_a_busy_port_is_reported_with_the_way_out(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_demo(port, tmp_path)
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 1
    assert f"Port {port} on 127.0.0.1 is already in use" in output
    assert f"make demo PORT={port + 1}" in output
    assert "http://" not in output


def test_the_whole_flow_over_http(demo: str, tmp_path: Path) -> None:
    alice = Browser(demo)
    alice.get("/")
    assert alice.url.endswith("/login")
    alice.post("/login", user_id="alice")
    session_id = re.search(r'id="session-id">([^<]+)<', alice.page)
    assert session_id

    alice.post("/assistant/runs", prompt="What does the travel policy say about trains?")
    run_id = alice.url.rsplit("/", 1)[1]
    assert 'data-status="waiting_for_approval"' in alice.page
    assert "/scoria/workflows/" not in alice.page
    assert 'data-poll-url="/assistant/runs/' in alice.page

    ops = Browser(demo)
    ops.get("/login")
    ops.post("/login", user_id="ops")
    ops.get(f"/assistant/runs/{run_id}")
    assert f'href="/scoria/workflows/{run_id}"' in ops.page
    approve_as_operator(ops, run_id)

    polled = json.loads(alice.get(f"/assistant/runs/{run_id}/status.json"))
    assert (polled["status"], polled["final"]) == ("completed", True)
    alice.get(f"/assistant/runs/{run_id}")
    assert 'data-status="completed"' in alice.page
    answer = re.search(r'<blockquote id="answer">([^<]+)</blockquote>', alice.page)
    assert answer and "[stand-in assistant]" in answer.group(1)

    alice.get("/")
    alice.post("/assistant/runs", prompt="And buses?")
    second = alice.url.rsplit("/", 1)[1]
    assert second != run_id
    assert f"session <code>{session_id.group(1)}</code>" in alice.page
    alice.get("/")
    assert alice.page.index(second) < alice.page.index(run_id)

    alice.get(f"/assistant/runs/{run_id}")
    assert "gets a bounded policy review" in alice.page
    alice.post("/assistant/drafts", draft_answer=html.unescape(answer.group(1)))
    handoff = alice.url.rsplit("/", 1)[1]
    assert handoff not in (run_id, second)
    assert "Delegated to <code>critic</code> (review), child step completed" in alice.page
    assert "cite the policy section" in alice.page


def approve_as_operator(ops: Browser, run_id: str) -> None:
    """Approve on the operator page, which also resumes the run."""
    ops.get(f"/scoria/workflows/{run_id}")
    assert run_id in ops.page
    action = re.search(r'<form[^>]+action="([^"]*approve[^"]*)"', ops.page)
    assert action, "no Approve form on the operator page"
    ops.post(html.unescape(action.group(1)))
    assert 'data-status="completed"' in ops.page
