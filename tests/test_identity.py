"""The identity aliases of the facade, and reading identities from a real request."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest
import sqlalchemy as sa
from flask import Flask, g, session
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import flask_scoria as scoria
from flask_scoria import Identity

USER_ID = uuid.UUID("0f0e0d0c-0b0a-4908-8706-050403020100")


@dataclass
class User:
    id: Any


def ids(value: Any) -> tuple[str | None, str | None, str | None]:
    found = scoria.identity(value)
    return found.actor_id, found.tenant_id, found.session_id


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"actor_id": "a", "tenant_id": "t", "session_id": "s"}, ("a", "t", "s")),
        ({"actor": User("a")}, ("a", None, None)),
        ({"current_user": {"id": 7}}, ("7", None, None)),
        ({"user": User(USER_ID)}, (str(USER_ID), None, None)),
        ({"actor": "plain"}, ("plain", None, None)),
        ({"actor_id": None, "user": {"id": "u"}}, ("u", None, None)),
        ({"tenant": User("t")}, (None, "t", None)),
        ({"current_tenant": {"id": 3}}, (None, "3", None)),
        ({"session": User("s")}, (None, None, "s")),
        ({"session": {"id": "s"}}, (None, None, "s")),
        ({"session": "s"}, (None, None, "s")),
        ({"actor_id": 42, "tenant_id": USER_ID, "session_id": 0}, ("42", str(USER_ID), "0")),
        ({"actor_id": "  ", "tenant_id": "", "session_id": "\t"}, (None, None, None)),
        ({"actor_id": "  padded  "}, ("padded", None, None)),
        (SimpleNamespace(actor_id="a", tenant=User("t"), session="s"), ("a", "t", "s")),
        (SimpleNamespace(current_user=User(None)), (None, None, None)),
        (Identity("a", "t", "s"), ("a", "t", "s")),
        (None, (None, None, None)),
        ("just a string", (None, None, None)),
        (42, (None, None, None)),
        ([1, 2], (None, None, None)),
        (object(), (None, None, None)),
        ({"unrelated": "keys"}, (None, None, None)),
    ],
)
def test_aliases(value: Any, expected: tuple[str | None, ...]) -> None:
    assert ids(value) == expected


def test_explicit_ids_win_over_aliases() -> None:
    assert ids({"actor_id": "explicit", "user": User("alias")}) == ("explicit", None, None)
    assert ids({"current_user": User("first"), "user": User("second")}) == ("first", None, None)


def test_an_identity_keys_a_dict_with_or_without_metadata() -> None:
    plain = scoria.identity({"actor_id": "a-1", "tenant_id": "t-1"})
    rich = scoria.identity({"actor_id": "a-1", "tenant_id": "t-1", "metadata": {"plan": "pro"}})
    seen = {plain: "plain", rich: "rich"}
    assert seen[scoria.identity({"actor_id": "a-1", "tenant_id": "t-1"})] == "plain"
    assert plain != rich and len(seen) == 2


def test_metadata_is_a_json_copy() -> None:
    source = {"channel": "web", "tags": ("a", "b")}
    found = scoria.identity({"metadata": source})
    assert found.metadata == {"channel": "web", "tags": ["a", "b"]}
    assert scoria.identity({}).metadata == {}


def test_an_objects_metadata_counts_only_when_it_is_a_mapping() -> None:
    class Base(DeclarativeBase):
        pass

    class Account(Base):
        __tablename__ = "account"
        actor_id: Mapped[str] = mapped_column(primary_key=True)
        tenant_id: Mapped[str]

    # A model's ``metadata`` is its tables' MetaData, no identity metadata.
    found = scoria.identity(Account(actor_id="u-1", tenant_id="acme"))
    assert (found.actor_id, found.tenant_id, found.metadata) == ("u-1", "acme", {})
    tagged = SimpleNamespace(actor_id="u-2", metadata={"channel": "web"})
    assert scoria.identity(tagged).metadata == {"channel": "web"}
    with pytest.raises(scoria.InvalidIdentity):
        scoria.identity(SimpleNamespace(metadata={"when": object()}))


def test_from_g_finds_the_user_flask_login_loaded() -> None:
    found = Identity.from_g(SimpleNamespace(_login_user=SimpleNamespace(id=7), tenant="acme"))
    assert (found.actor_id, found.tenant_id) == ("7", "acme")


def test_a_named_tuple_names_its_ids() -> None:
    who = Who("u-1", "acme")
    assert (scoria.identity(who).actor_id, scoria.identity(who).tenant_id) == ("u-1", "acme")
    assert scoria.identity(("u-1", "acme")) == Identity()


class Who(NamedTuple):
    actor_id: str
    tenant_id: str


class Failing:
    """An object whose ``tenant_id`` raises when read, as a detached ORM instance's
    expired column does."""

    actor_id = "u-1"

    @property
    def tenant_id(self) -> str:
        raise KeyError("not loaded")


def test_an_id_that_raises_when_read_is_an_invalid_identity() -> None:
    """A model instance detached from its session, or any property that fails."""

    class Base(DeclarativeBase):
        pass

    class Account(Base):
        __tablename__ = "account"
        id: Mapped[str] = mapped_column(primary_key=True)

    engine = sa.create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as db:
        db.add(Account(id="u-9"))
        db.commit()
        detached = db.get(Account, "u-9")
        db.commit()  # expires it; leaving the session detaches it
    for value in (Failing(), {"current_user": detached}, SimpleNamespace(user=detached)):
        with pytest.raises(scoria.InvalidIdentity, match="could not be read"):
            scoria.identity(value)
    with pytest.raises(scoria.InvalidIdentity, match="id of the Account could not be read"):
        Identity.from_g(SimpleNamespace(current_user=detached))
    engine.dispose()


@pytest.mark.parametrize(
    "value",
    [
        {"actor_id": {"id": 1}},
        {"tenant_id": ["t"]},
        {"session_id": {"nested": True}},
        {"actor": ["a"]},
        {"tenant": ("t",)},
        {"actor_id": True},
        {"actor_id": 1.5},
        {"actor_id": "x" * 256},
        {"actor_id": "bad\x00id"},
        {"user": {"id": {"deep": 1}}},
        {"metadata": {"when": object()}},
        {"metadata": {"n": float("nan")}},
        {"metadata": "not a dict"},
        {"metadata": {1: "non-string key"}},
        Identity(actor_id=["a"]),  # type: ignore[arg-type]
    ],
)
def test_invalid_identity(value: Any) -> None:
    with pytest.raises(scoria.InvalidIdentity) as info:
        scoria.identity(value)
    assert info.value.code == "invalid_identity"


@pytest.mark.parametrize(
    "text",
    [
        "Société\u00a0Générale",
        "山田\u3000太郎",
        "\U0001f469\u200d\U0001f4bb",
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
    ],
)
def test_ids_in_any_script_are_ids(text: str) -> None:
    """A no-break or ideographic space, a joiner in an emoji or in Persian: ids as given."""
    found = scoria.identity({"actor_id": text, "tenant_id": text, "session_id": text})
    assert (found.actor_id, found.tenant_id, found.session_id) == (text, text, text)


@pytest.mark.parametrize("text", ["a\tb", "a\u2028b", "a\u2029b", "a\x85b", "a\ud800b"])
def test_control_characters_and_line_breaks_are_no_ids(text: str) -> None:
    with pytest.raises(scoria.InvalidIdentity, match="control characters or line breaks"):
        scoria.identity({"session_id": text})


def test_from_session_and_from_g_inside_a_request() -> None:
    app = Flask("identity_app")
    app.secret_key = "identity-secret"

    @app.post("/login")
    def login() -> str:
        session.update(actor_id=11, tenant_id="acme", session_id="conv-1")
        return "ok"

    @app.get("/who")
    def who() -> dict[str, Any]:
        g.current_user = User(11)
        g.tenant = {"id": "acme"}
        g.session_id = session["session_id"]
        return {
            "session": Identity.from_session(session).to_dict(),
            "g": Identity.from_g(g).to_dict(),
        }

    @app.get("/anonymous")
    def anonymous() -> dict[str, Any]:
        return {
            "session": Identity.from_session(session).to_dict(),
            "g": Identity.from_g(g).to_dict(),
        }

    client = app.test_client()
    nobody = {"actor_id": None, "tenant_id": None, "session_id": None, "metadata": {}}
    assert client.get("/anonymous").get_json() == {"session": nobody, "g": nobody}
    client.post("/login")
    expected = {"actor_id": "11", "tenant_id": "acme", "session_id": "conv-1", "metadata": {}}
    assert client.get("/who").get_json() == {"session": expected, "g": expected}


def test_from_g_alias_order() -> None:
    namespace = SimpleNamespace(user=User("u"), actor=User("a"), current_tenant=User("ct"))
    assert Identity.from_g(namespace) == Identity("u", "ct", None)
    namespace.current_user = None
    namespace.user = None
    assert Identity.from_g(namespace).actor_id == "a"


def test_from_session_ignores_what_is_not_a_mapping() -> None:
    assert Identity.from_session(None) == Identity()
    with pytest.raises(scoria.InvalidIdentity):
        Identity.from_session({"actor_id": {"id": 1}})
