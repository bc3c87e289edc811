"""The documentation runs: its Python blocks, its ``flask`` commands, and Sphinx with -W."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

import flask_scoria
from flask_scoria import errors, handoff
from flask_scoria.extension import DEFAULTS

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
EXECUTED_PAGES = ("flask-runtime-example.md", "quickstart.md")


def blocks(page: str) -> list[tuple[str, str]]:
    """The fenced blocks of a page as (language, code), in order."""
    return FENCE.findall((DOCS / page).read_text())


def run_flask_command(line: str, namespace: dict[str, Any]) -> None:
    """Run a ``flask [--app X] ...`` line with the page's ``app`` and check it passes."""
    words = shlex.split(line)[1:]
    if words[:1] == ["--app"]:
        words = words[2:]
    app: Flask = namespace["app"]
    result = app.test_cli_runner().invoke(args=words)
    assert result.exit_code == 0, f"{line}\n{result.output}"


@pytest.mark.parametrize("page", EXECUTED_PAGES)
def test_page_runs_in_order(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("docs_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = vars(module)
    ran = 0
    try:
        for language, code in blocks(page):
            if language == "python":
                exec(compile(code, f"{page}:block{ran}", "exec"), namespace)
                ran += 1
            elif language == "bash":
                for line in code.splitlines():
                    if line.startswith("flask "):
                        run_flask_command(line, namespace)
    finally:
        app = namespace.get("app")
        if isinstance(app, Flask) and "scoria" in app.extensions:
            app.extensions["scoria"].storage(app).engine.dispose()
    assert ran >= 2


def test_configuration_page_names_every_key_and_default() -> None:
    page = (DOCS / "configuration.md").read_text()
    for key, default in DEFAULTS.items():
        assert f"`{key}`" in page
        assert f"`{default!r}`" in page, key


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
    source = Path(handoff.__file__).read_text()
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
    rules = (*handoff.UNSAFE_NAMES, *handoff.UNSAFE_SUFFIXES, *handoff.UNSAFE_PREFIXES)
    assert [rule for rule in rules if f"`{rule}`" not in page] == []
