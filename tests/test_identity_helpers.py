"""``identity_from_session`` and ``identity_from_g``: the request's identity by default."""

from __future__ import annotations

from types import SimpleNamespace

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
