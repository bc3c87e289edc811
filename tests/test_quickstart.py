"""The README's and the quickstart page's app, as a reader runs it.

A wheel of the package goes into a fresh virtualenv; the pages' blocks are
written to files verbatim; their ``flask`` commands run there, the real
``flask run`` server included, and the test signs in, asks, and approves over
HTTP as a person would in a browser.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_docs import DOCS, README, ROOT, blocks, python_blocks

from examples.assistant.tests.http_client import Browser, free_port

PAGES = {"README.md": README, "quickstart.md": DOCS / "quickstart.md"}


def run(*command: object) -> None:
    """Run ``command``; on failure, show what it printed."""
    done = subprocess.run([str(word) for word in command], capture_output=True, text=True)
    assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with a wheel of this checkout installed, and nothing else."""
    where = tmp_path_factory.mktemp("quickstart")
    run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", where, ROOT)
    (wheel,) = where.glob("*.whl")
    env = where / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", env)
    run(sys.executable, "-m", "pip", "--python", env / "bin" / "python", "install", "-q", wheel)
    return env / "bin"


def install_lines(page: Path) -> list[str]:
    """The page's ``pip install`` lines, without comments."""
    return [
        line.split("#")[0].strip()
        for language, code in blocks(page)
        if language == "bash"
        for line in code.splitlines()
        if line.startswith("pip install")
    ]


def flask_commands(page: Path) -> list[list[str]]:
    """The page's ``flask ...`` lines, as words, in order."""
    return [
        shlex.split(line, comments=True)
        for language, code in blocks(page)
        if language == "bash"
        for line in code.splitlines()
        if line.startswith("flask ")
    ]


@pytest.fixture
def server(request: pytest.FixtureRequest, venv: Path, tmp_path: Path) -> Iterator[str]:
    """The page's ``app.py`` served by its own ``flask run`` line; yields the base URL."""
    page = PAGES[request.param]
    (app_py,) = [code for code in python_blocks(page) if code.startswith("# app.py\n")]
    (tmp_path / "app.py").write_text(app_py)
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLASK_")}
    env.update(PATH=f"{venv}{os.pathsep}{env['PATH']}", PYTHONPATH="", PYTHONDONTWRITEBYTECODE="1")
    commands = flask_commands(page)
    (serve,) = [words for words in commands if words[-1] == "run"]
    for words in commands[: commands.index(serve)]:
        done = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{words}\n{done.stdout}{done.stderr}"
    port = free_port()
    served = subprocess.Popen(
        [*serve, "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(base + "/", timeout=1).close()
                break
            except urllib.error.URLError:
                if served.poll() is not None or time.monotonic() > deadline:
                    served.kill()
                    pytest.fail(f"flask run did not serve:\n{served.communicate()[0]}")
                time.sleep(0.1)
        yield base
    finally:
        served.terminate()
        served.communicate(timeout=10)


def test_the_pages_install_from_the_checkout() -> None:
    for page in PAGES.values():
        assert "pip install ." in install_lines(page), page.name
        assert "pip install Flask-Scoria" in page.read_text(), page.name
        assert "pip install flask-scoria\n" not in page.read_text().lower(), page.name


@pytest.mark.parametrize("server", sorted(PAGES), indirect=True)
def test_sign_in_ask_and_approve_over_http(server: str, venv: Path) -> None:
    person = Browser(server)
    person.get("/")
    person.post("/assistant", prompt="Before signing in")
    assert person.url == f"{server}/"
    person.post("/sign-in")
    person.post("/assistant", prompt="Ship the release notes")
    run_id = person.url.rsplit("/", 1)[1]
    assert person.url == f"{server}/scoria/workflows/{run_id}"
    assert 'data-status="waiting_for_approval"' in person.page
    assert "Ship the release notes" in person.page

    person.post(f"/scoria/workflows/{run_id}/approve")
    assert person.url == f"{server}/scoria/workflows/{run_id}"
    assert 'data-status="completed"' in person.page

    read_back = json.loads(person.get(f"/assistant/runs/{run_id}"))
    assert read_back == {"run_id": run_id, "status": "completed", "session_id": "chat-1"}
    assert run_id in person.get("/scoria/sessions/chat-1")

    # A run the visitor cannot see is a 404 from the page's error handler, not a 500.
    unknown = "00000000-0000-4000-8000-000000000000"
    for who, path in [
        (person, f"/assistant/runs/{unknown}"),
        (person, "/assistant/runs/not-a-run"),
        (Browser(server), f"/assistant/runs/{run_id}"),  # signed out
    ]:
        with pytest.raises(urllib.error.HTTPError) as answer:
            who.get(path)
        assert answer.value.code == 404, path
        assert json.loads(answer.value.read())["error"] == "run_not_found", path


def test_the_installed_wheel_brings_the_pytest_plugin(venv: Path, tmp_path: Path) -> None:
    """The testing guide's suite passes with the plugin found through its entry point."""
    needs = ["pytest", "pytest-flask", "flask-sqlalchemy"]
    run(sys.executable, "-m", "pip", "--python", venv / "python", "install", "-q", *needs)
    for code in python_blocks(DOCS / "testing.md"):
        (tmp_path / code.splitlines()[0].removeprefix("# ")).write_text(code)
    env = {**os.environ, "PYTHONPATH": "", "PYTEST_ADDOPTS": ""}
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    result = subprocess.run(
        [venv / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout
