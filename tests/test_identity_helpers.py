"""``identity_from_session`` and ``identity_from_g``: the request's identity by default."""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace

import flask_login
import pytest
from flask import Flask, g, session

import flask_scoria as scoria
from flask_scoria import Identity


def test_helpers_read_the_current_request_by_default() -> None:
    app = Flask(__name__)
    app.secret_key = "test"
    with app.test_request_context():
        session.update(actor_id="u-1", tenant_id="acme", session_id="chat-1")
        g.current_user = SimpleNamespace(id=7)
        g.tenant = {"id": "globex"}
        g.session_id = "chat-2"
        assert scoria.identity_from_session() == Identity("u-1", "acme", "chat-1")
        assert scoria.identity_from_g() == Identity("7", "globex", "chat-2")
        assert scoria.identity_from_session() == Identity.from_session(session)
        assert scoria.identity_from_g() == Identity.from_g(g)


def test_helpers_read_what_they_are_given() -> None:
    given = {"actor_id": "a", "tenant_id": "t", "session_id": "s"}
    assert scoria.identity_from_session(given) == Identity("a", "t", "s")
    assert scoria.identity_from_g(SimpleNamespace(actor="a")) == Identity(actor_id="a")


def test_outside_a_request_the_default_needs_one() -> None:
    with pytest.raises(RuntimeError, match="needs a request context"):
        scoria.identity_from_session()
    with pytest.raises(RuntimeError, match="needs an application context"):
        scoria.identity_from_g()


def test_a_user_row_of_flasks_tutorial_names_the_actor() -> None:
    """Flask's tutorial keeps ``g.user = db.execute(...).fetchone()``: an sqlite3.Row."""
    db = sqlite3.connect(":memory:")
    db.row_factory = sqlite3.Row
    row = db.execute("SELECT 7 AS id, 'ada' AS username").fetchone()
    nameless = db.execute("SELECT 'ada' AS username").fetchone()
    db.close()
    assert scoria.identity_from_g(SimpleNamespace(user=row, tenant=row)) == Identity("7", "7")
    assert scoria.identity({"user": row}).actor_id == "7"
    assert scoria.identity_from_g(SimpleNamespace(user=nameless)) == Identity()


def test_the_user_flask_login_loads_is_read_before_anything_asked_for_it() -> None:
    """Flask-Login loads the request's user on first use of ``current_user``."""
    app = Flask(__name__)
    app.secret_key = "test"
    manager = flask_login.LoginManager(app)
    users = {"user-42": User("user-42")}
    manager.user_loader(users.get)

    @app.post("/sign-in")
    def sign_in() -> str:
        flask_login.login_user(users["user-42"])
        return "signed in"

    @app.get("/who")
    def who() -> dict[str, str | None]:
        return {"actor": scoria.identity_from_g().actor_id}

    client = app.test_client()
    assert client.get("/who").json == {"actor": None}  # anonymous: no id
    client.post("/sign-in")
    assert client.get("/who").json == {"actor": "user-42"}
    with app.test_request_context():
        assert scoria.identity_from_g(SimpleNamespace()) == Identity()  # not flask.g


class User(flask_login.UserMixin):
    def __init__(self, id: str) -> None:
        self.id = id
