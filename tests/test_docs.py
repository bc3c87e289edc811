"""The documentation runs: its Python blocks, its ``flask`` commands, and Sphinx with -W."""

from __future__ import annotations

import os
import re
import shlex
import sqlite3
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

import flask_scoria
from flask_scoria import errors, redaction, schema
from flask_scoria.config import DEFAULTS
from flask_scoria.runtime import handoffs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\S*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
OPENING = re.compile(r"^(?:```|~~~|:::)", re.MULTILINE)
EXECUTED_PAGES = ("flask-runtime-example.md", "quickstart.md")
PYTHON = {"python", "py", "python3", "pycon"}


def blocks(path: Path) -> list[tuple[str, str]]:
    """The fenced blocks of a Markdown file as (language, code), in order.

    Every fence must be a plain triple-backtick block that this pattern reads,
    so that no code block escapes the checks below.
    """
    text = path.read_text()
    found = FENCE.findall(text)
    assert 2 * len(found) == len(OPENING.findall(text)), f"{path.name}: unreadable fence"
    return found


def python_blocks(path: Path) -> list[str]:
    """The Python blocks of a file; Python is only ever fenced as ``python``."""
    found = blocks(path)
    odd = [language for language, _ in found if language.lower() in PYTHON - {"python"}]
    assert odd == [], f"{path.name}: fence Python as 'python'"
    return [code for language, code in found if language == "python"]


def exec_module(path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fresh module namespace for a page's code, registered for the length of a test."""
    module = types.ModuleType("docs_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return vars(module)


def dispose(namespace: dict[str, Any]) -> None:
    """Close the engine of the page's ``app``, if it has one."""
    app = namespace.get("app")
    if isinstance(app, Flask) and "scoria" in app.extensions:
        app.extensions["scoria"].storage(app).engine.dispose()


def run_flask_command(line: str, namespace: dict[str, Any]) -> None:
    """Run a ``flask [--app X] ...`` line with the page's ``app`` and check it passes."""
    words = shlex.split(line, comments=True)[1:]
    if words[:1] == ["--app"]:
        words = words[2:]
    app: Flask = namespace["app"]
    result = app.test_cli_runner().invoke(args=words)
    assert result.exit_code == 0, f"{line}\n{result.output}"


@pytest.mark.parametrize("page", EXECUTED_PAGES)
def test_page_runs_in_order(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace = exec_module(DOCS / page, monkeypatch)
    ran = 0
    try:
        for language, code in blocks(DOCS / page):
            if language == "python":
                exec(compile(code, f"{page}:block{ran}", "exec"), namespace)
                ran += 1
            elif language == "bash":
                for line in code.splitlines():
                    # The server itself runs in test_quickstart.py.
                    if line.startswith("flask ") and not line.endswith(" run"):
                        run_flask_command(line, namespace)
    finally:
        dispose(namespace)
    assert ran == len(python_blocks(DOCS / page)) >= 2


@pytest.mark.parametrize("page", [README, DOCS / "quickstart.md"], ids=lambda page: page.name)
def test_quickstart_app_answers_404_for_a_run_it_cannot_see(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``show_run`` with its error handler: a run the visitor may not read is a 404."""
    monkeypatch.chdir(tmp_path)
    (code,) = [code for code in python_blocks(page) if code.startswith("# app.py\n")]
    namespace = exec_module(page, monkeypatch)
    exec(compile(code, f"{page.name}:app.py", "exec"), namespace)
    try:
        run_flask_command("flask --app app scoria db upgrade", namespace)
        app: Flask = namespace["app"]
        with app.app_context():
            other = flask_scoria.identity({"actor_id": "u-9", "tenant_id": "globex"})
            metadata = {"metadata": {"payload": {"prompt": "Theirs"}}}
            theirs = flask_scoria.start_run(
                other, initial_step={"kind": "approval"}, runtime=metadata
            )
        person = app.test_client()
        person.post("/sign-in")
        mine = person.post("/assistant", data={"prompt": "Mine"}).location.rsplit("/", 1)[1]
        read_back = {"run_id": mine, "status": "waiting_for_approval", "session_id": "chat-1"}
        assert person.get(f"/assistant/runs/{mine}").json == read_back
        for who, run_id in [
            (person, "00000000-0000-4000-8000-000000000000"),  # unknown
            (person, "not-a-run-id"),
            (person, theirs.run_id),  # another tenant's
            (app.test_client(), mine),  # signed out
        ]:
            answer = who.get(f"/assistant/runs/{run_id}")
            assert answer.status_code == 404, run_id
            assert answer.json is not None and answer.json["error"] == "run_not_found", run_id
    finally:
        dispose(namespace)


def test_testing_page_is_a_passing_test_suite(tmp_path: Path) -> None:
    """Each block of the testing guide is a file; pytest and its flask commands pass."""
    page = DOCS / "testing.md"
    for code in python_blocks(page):
        name = code.splitlines()[0].removeprefix("# ")
        (tmp_path / name).write_text(code)
    result = subprocess.run(
        # -p: the plugin's entry point is only there once the package is installed.
        [sys.executable, "-m", "pytest", "-q", "-W", "error", "-p", "flask_scoria.testing"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout
    commands = [
        line
        for language, code in blocks(page)
        if language == "bash"
        for line in code.splitlines()
        if line.startswith("flask ")
    ]
    assert len(commands) == 2
    for line in commands:
        done = subprocess.run(
            [sys.executable, "-m", *shlex.split(line)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
    assert "all checks passed" in done.stdout


@pytest.mark.parametrize("page", sorted(path.name for path in DOCS.glob("*.md")))
def test_python_blocks_compile(page: str) -> None:
    for number, code in enumerate(python_blocks(DOCS / page)):
        compile(code, f"{page}:block{number}", "exec")


def test_readme_links_point_at_files() -> None:
    targets = re.findall(r"\]\(([^)#]+)\)", README.read_text())
    assert targets
    assert [target for target in targets if not (ROOT / target).exists()] == []


def test_configuration_page_names_every_key_and_default() -> None:
    page = (DOCS / "configuration.md").read_text()
    for key, default in DEFAULTS.items():
        assert f"`{key}`" in page
        assert f"`{default!r}`" in page, key


def test_configuration_host_engine_example_sets_the_pragmas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (code,) = python_blocks(DOCS / "configuration.md")
    namespace = exec_module(DOCS / "configuration.md", monkeypatch)
    exec(compile(code, "configuration.md", "exec"), namespace)
    app: Flask = namespace["create_app"]()
    with app.app_context():
        try:
            with namespace["runtime"].storage().engine.connect() as conn:
                pragmas = [
                    conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                    for name in ("journal_mode", "synchronous", "busy_timeout")
                ]
        finally:
            namespace["db"].engine.dispose()
    assert pragmas == ["wal", 2, 30000]


HOST_APP = """
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from flask_scoria import Scoria

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///host.sqlite3"
db = SQLAlchemy(app)
runtime = Scoria(app, db=db)


class Note(db.Model):
    id = db.Column(db.Integer, primary_key=True)

"""


MOUNTED = "## With Flask-Migrate: mount the revisions in your history"
MOVING = "### Moving a database from `flask scoria db` to your history"


def as_written(line: str, folder: Path, **env: str) -> None:
    """Run a documented shell line, as a shell would, on the app ``hostapp`` in ``folder``."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    environment = {**os.environ, "PATH": path, "FLASK_APP": "hostapp", **env}
    result = subprocess.run(
        ["bash", "-c", line], cwd=folder, env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"


def test_migrations_with_flask_migrate_runs_as_written(tmp_path: Path) -> None:
    page = (DOCS / "migrations.md").read_text()
    assert page.index(MOUNTED) < page.index("## Without Flask-Migrate")
    section = page.split(MOUNTED)[1].split("\n## ")[0]
    fenced = FENCE.findall(section)
    code = "\n".join(code for language, code in fenced if language == "python")
    lines = [
        line
        for language, block in fenced
        if language == "bash"
        for line in block.splitlines()
        if line.startswith("flask db ")
    ]
    words = [shlex.split(line, comments=True) for line in lines]
    assert ["flask", "db", "upgrade", "heads"] in words
    assert ["flask", "db", "upgrade", "scoria@head"] in words
    (tmp_path / "hostapp.py").write_text(HOST_APP + code)

    def flask(*args: str, status: int = 0) -> str:
        command = [sys.executable, "-m", "flask", "--app", "hostapp", *args]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
        assert result.returncode == status, f"{args}\n{result.stdout}\n{result.stderr}"
        return result.stdout + result.stderr

    flask("db", "init")
    for line in lines:
        as_written(line, tmp_path)
    flask("db", "upgrade", "heads")
    assert "Multiple head revisions" in flask("db", "upgrade", status=1)

    heads = flask("db", "heads")
    assert f"{schema.head_revision()} (scoria) (head)" in heads and "(app) (head)" in heads
    assert flask("scoria", "db", "current").strip() == schema.head_revision()
    flask("scoria", "db", "check")
    written = "".join(path.read_text() for path in (tmp_path / "migrations").rglob("*.py"))
    assert "create_table('note'" in written and "scoria_" not in written


def test_moving_to_the_flask_migrate_history_runs_as_written(tmp_path: Path) -> None:
    page = (DOCS / "migrations.md").read_text()
    section = page.split(MOVING)[1].split("\n## ")[0]
    fenced = FENCE.findall(section)
    commands = [code.strip() for language, code in fenced if language == "bash"]
    (statement,) = [code for language, code in fenced if language == "sql"]
    mounted = page.split(MOUNTED)[1].split("\n## ")[0]
    mount = "\n".join(code for language, code in FENCE.findall(mounted) if language == "python")
    unmounted = "from flask_migrate import Migrate\nMigrate(app, db)\n"
    (tmp_path / "hostapp.py").write_text(
        HOST_APP
        + "import os\nif os.environ.get('MOUNT'):\n"
        + textwrap.indent(mount, "    ")
        + "\nelse:\n"
        + textwrap.indent(unmounted, "    ")
    )

    def flask(*args: str, mounted: bool = True) -> str:
        env = {**os.environ, "MOUNT": "1" if mounted else ""}
        command = [sys.executable, "-m", "flask", "--app", "hostapp", *args]
        result = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    flask("db", "init", mounted=False)
    flask("db", "migrate", "-m", "first tables", mounted=False)
    flask("db", "upgrade", mounted=False)
    # A database a revision behind: the move records where it is, and the app's own
    # upgrade brings it up to date.
    flask("scoria", "db", "upgrade", "scoria_0005", mounted=False)
    for command in commands:
        as_written(command, tmp_path, MOUNT="1")
    database = next(tmp_path.rglob("*.sqlite3"))
    with sqlite3.connect(database) as conn:
        conn.execute(statement)
    assert flask("scoria", "db", "current").strip() == "scoria_0005"
    flask("db", "upgrade", "heads")
    assert schema.head_revision() in flask("db", "current")
    assert flask("scoria", "db", "current").strip() == schema.head_revision()
    flask("scoria", "db", "check")


def test_errors_page_names_every_error_and_code() -> None:
    page = (DOCS / "errors.md").read_text()
    classes = [
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, errors.ScoriaError)
    ]
    for cls in classes:
        assert f"`{cls.__name__}`" in page
        if "code" in vars(cls):
            assert f"`{cls.code}`" in page
    source = Path(handoffs.__file__).read_text()
    codes = set(re.findall(r'"((?:invalid|unsafe)_\w+)"', source))
    codes |= {f"{what}_too_large" for what in ("handoff_input", "projected_context")}
    codes.add("projected_context_too_deep")
    assert "unsafe_projected_context" in codes
    for code in sorted(codes):
        assert f"`{code}`" in page


def test_api_page_documents_every_public_name() -> None:
    page = (DOCS / "api.md").read_text()
    public = [
        name
        for name, value in vars(flask_scoria).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    ]
    missing = [name for name in public if not re.search(rf"\b{name}\b", page)]
    assert missing == []


def test_sphinx_builds_without_warnings(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(DOCS), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "flask-runtime-example.html").exists()


def test_errors_page_lists_every_unsafe_context_rule() -> None:
    page = (DOCS / "errors.md").read_text()
    rules = (*redaction.UNSAFE_NAMES, *redaction.UNSAFE_SUFFIXES, *redaction.UNSAFE_PREFIXES)
    assert [rule for rule in rules if f"`{rule}`" not in page] == []
