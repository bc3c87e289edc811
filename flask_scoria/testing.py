"""pytest fixtures for apps that use flask-scoria.

Installed with flask-scoria, pytest loads them by itself (entry point
``pytest11``); where plugin autoloading is off, add
``pytest_plugins = ["flask_scoria.testing"]`` to your ``conftest.py``. They
follow pytest-flask's convention and work with or without it: your own
``app`` fixture builds the app under test, these add a throwaway database and
an operator's test client. Every name starts with ``scoria_``, so nothing
clashes with your ``app``, ``client`` or pytest-flask's fixtures.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, request
from flask.testing import FlaskClient
from sqlalchemy import create_engine

from . import schema
from .state import app_state

#: The WSGI environ key that marks the requests of ``scoria_operator_client``.
_OPERATOR_MARK = "flask_scoria.testing.operator"


@pytest.fixture
def scoria_database_uri(tmp_path: Path) -> str:
    """The URL of a fresh SQLite database with the newest ``scoria_*`` tables.

    Give it to your app as ``SCORIA_DATABASE_URI``, or, with
    ``Scoria(app, db=db)``, as ``SQLALCHEMY_DATABASE_URI`` and create your own
    tables next to them. The file lives in the test's ``tmp_path``.
    """
    uri = f"sqlite:///{tmp_path / 'scoria-test.sqlite3'}"
    engine = create_engine(uri)
    try:
        schema.upgrade(engine)
    finally:
        engine.dispose()
    return uri


@pytest.fixture
def scoria_operator_scope() -> Mapping[str, Any]:
    """The operator ``scoria_operator_client`` acts as; override it to pick a tenant."""
    return {"tenant_id": "tenant-1", "actor_id": "operator-1"}


@pytest.fixture
def scoria_operator_client(
    app: Flask, scoria_operator_scope: Mapping[str, Any], monkeypatch: pytest.MonkeyPatch
) -> FlaskClient:
    """A test client of ``app`` that the operator pages let in as ``scoria_operator_scope``.

    Requests of this client get that scope; every other request still goes
    through the app's own ``@runtime.operator_scope`` resolver, so the
    ``client`` next to it stays whoever your app says it is. Forms on the
    operator pages still need the page's CSRF token, as in a browser.
    """
    scope = dict(scoria_operator_scope)
    registry = app_state(app).registry
    own = registry.operator_scope

    def resolver() -> Mapping[str, Any] | None:
        if request.environ.get(_OPERATOR_MARK):
            return scope
        return own() if own is not None else None

    monkeypatch.setattr(registry, "operator_scope", resolver)
    client = app.test_client()
    client.environ_base[_OPERATOR_MARK] = "1"
    return client
