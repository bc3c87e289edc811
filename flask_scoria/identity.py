"""Normalization of the actor, tenant and session a run belongs to."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import flask

from ._ids import is_id_text
from ._json import json_object
from .errors import InvalidIdentity, safe_str

#: Longest id flask-scoria stores.
MAX_ID_LENGTH = 255

_ACTOR_ALIASES = ("actor", "current_user", "user")
_TENANT_ALIASES = ("tenant", "current_tenant")


@dataclass(frozen=True)
class Identity:
    """Who a run belongs to: actor, tenant and the host's session.

    ``session_id`` groups the turns of one conversation; it never names a run.
    """

    actor_id: str | None = None
    tenant_id: str | None = None
    session_id: str | None = None
    #: Left out of its hash (a dict has none): an identity can key a dict or a cache.
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @classmethod
    def from_session(cls, session: object) -> Identity:
        """Read ``actor_id``, ``tenant_id`` and ``session_id`` keys of a session."""
        if not isinstance(session, Mapping):
            return cls()
        return cls(
            actor_id=normalize_id(session.get("actor_id"), "actor_id"),
            tenant_id=normalize_id(session.get("tenant_id"), "tenant_id"),
            session_id=normalize_id(session.get("session_id"), "session_id"),
        )

    @classmethod
    def from_g(cls, g: object) -> Identity:
        """Read the actor, tenant and session id a request stored on ``g``.

        The actor is ``g.current_user``, ``g.user``, ``g.actor`` or, on
        :data:`flask.g`, the user Flask-Login loads for the request; the tenant
        ``g.current_tenant`` or ``g.tenant``; the session ``g.session_id``.
        """
        read = partial(_attribute, g)
        # Flask-Login keeps the loaded user on g._login_user.
        actor = _first_present(read, ("current_user", "user", "actor", "_login_user"))
        if actor is None and g is flask.g:
            actor = _flask_login_user()
        tenant = _first_present(read, ("current_tenant", "tenant"))
        return cls(
            actor_id=_id_of(actor, "actor"),
            tenant_id=_id_of(tenant, "tenant"),
            session_id=normalize_id(_attribute(g, "session_id"), "session_id"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the identity as a plain dict."""
        return {
            "actor_id": self.actor_id,
            "tenant_id": self.tenant_id,
            "session_id": self.session_id,
            "metadata": dict(self.metadata),
        }


def identity_from_session(session: object = None) -> Identity:
    """The identity in a session's ``actor_id``, ``tenant_id`` and ``session_id`` keys.

    ``session`` defaults to the current request's :data:`flask.session`, so a
    view can call ``identity_from_session()``. The same as
    :meth:`Identity.from_session`.
    """
    if session is None:
        if not flask.has_request_context():
            raise RuntimeError(
                "identity_from_session() reads flask.session, which needs a request context;"
                " call it in a view or pass the session: identity_from_session(session)."
            )
        session = flask.session
    return Identity.from_session(session)


def identity_from_g(g: object = None) -> Identity:
    """The identity a request stored on ``g`` (see :meth:`Identity.from_g`).

    ``g`` defaults to the current app context's :data:`flask.g`.
    """
    if g is None:
        if not flask.has_app_context():
            raise RuntimeError(
                "identity_from_g() reads flask.g, which needs an application context;"
                " call it in a view or pass the object: identity_from_g(g)."
            )
        g = flask.g
    return Identity.from_g(g)


#: Values that carry no ids: :func:`identity` reads each as the empty identity.
_NO_IDS: tuple[type, ...] = (str, bytes, int, float, list, tuple)


def carries_no_ids(value: object) -> bool:
    """Whether ``value`` is a string, a number or a list, which name no ids (a named
    tuple's fields do)."""
    return isinstance(value, _NO_IDS) and not hasattr(type(value), "_fields")


def identity(value: object = None) -> Identity:
    """Normalize ``value`` into an :class:`Identity`.

    ``value`` may be an ``Identity``, a mapping, any object with attributes
    (a named tuple too), or ``None``; a string, a number or a list carries no
    ids and gives the empty identity. Ids are read from ``actor_id`` / ``tenant_id`` /
    ``session_id``, falling back to the aliases ``actor``, ``current_user``,
    ``user``, ``tenant``, ``current_tenant`` (their ``id``) and ``session``
    (its ``id`` or the string itself). ``metadata`` is a mapping's key, or an
    object's attribute when that is a mapping. Ints and UUIDs become strings, blank
    strings become ``None``. Raises :class:`InvalidIdentity` for values that
    cannot be an id or metadata that is not JSON.
    """
    if isinstance(value, Identity):
        return Identity(
            actor_id=normalize_id(value.actor_id, "actor_id"),
            tenant_id=normalize_id(value.tenant_id, "tenant_id"),
            session_id=normalize_id(value.session_id, "session_id"),
            metadata=_metadata(value.metadata),
        )
    if value is None or carries_no_ids(value):
        return Identity()

    def read(key: str) -> object:
        if isinstance(value, Mapping):
            return _reading(value, key, lambda: value.get(key))
        return _attribute(value, key)

    actor_id = normalize_id(read("actor_id"), "actor_id")
    if actor_id is None:
        actor_id = _id_of(_first_present(read, _ACTOR_ALIASES), "actor")
    tenant_id = normalize_id(read("tenant_id"), "tenant_id")
    if tenant_id is None:
        tenant_id = _id_of(_first_present(read, _TENANT_ALIASES), "tenant")
    session_id = normalize_id(read("session_id"), "session_id")
    if session_id is None:
        session_id = _id_of(read("session"), "session")
    metadata = read("metadata")
    if not isinstance(value, Mapping) and not isinstance(metadata, Mapping):
        # An object's ``metadata`` may mean something else: a SQLAlchemy model's tables.
        metadata = None
    return Identity(
        actor_id=actor_id,
        tenant_id=tenant_id,
        session_id=session_id,
        metadata=_metadata(metadata),
    )


def normalize_id(value: object, name: str) -> str | None:
    """Return ``value`` as a stripped id string, or ``None`` when blank."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidIdentity(f"{name} must be a string or an int, not a bool.")
    if isinstance(value, int) and value.bit_length() > 4 * MAX_ID_LENGTH:
        raise InvalidIdentity(f"{name} is longer than {MAX_ID_LENGTH} characters.")
    if isinstance(value, int | uuid.UUID):
        value = str(value)
    if not isinstance(value, str):
        raise InvalidIdentity(f"{name} must be a string or an int, not {type(value).__name__}.")
    text = value.strip()
    if not text:
        return None
    if len(text) > MAX_ID_LENGTH:
        raise InvalidIdentity(f"{name} is longer than {MAX_ID_LENGTH} characters.")
    if not is_id_text(text):
        raise InvalidIdentity(f"{name} contains control characters or line breaks.")
    return text


def _flask_login_user() -> object:
    """The user Flask-Login loads for this request, in an app that uses it.

    Flask-Login loads it on first use of ``current_user`` only; until then
    ``g._login_user`` is not set.
    """
    if not flask.has_request_context() or not hasattr(flask.current_app, "login_manager"):
        return None
    from flask_login import current_user

    return current_user._get_current_object()


def _id_of(value: object, name: str) -> str | None:
    """The id of an alias value: a plain id, or an object's or a row's ``id``."""
    if value is None:
        return None
    if isinstance(value, str | int | uuid.UUID) and not isinstance(value, bool):
        return normalize_id(value, name)
    if isinstance(value, Mapping):
        return normalize_id(value.get("id"), f"{name}.id")
    if isinstance(value, sqlite3.Row):  # as Flask's tutorial keeps its g.user
        # ``in`` a row looks among its values, not its column names.
        named = "id" in value.keys()  # noqa: SIM118
        return normalize_id(value["id"] if named else None, f"{name}.id")
    if isinstance(value, list | tuple | set | bool | float | bytes):
        raise InvalidIdentity(f"{name} cannot be a {type(value).__name__}.")
    return normalize_id(_attribute(value, "id"), f"{name}.id")


def _first_present(read: Callable[[str], object], keys: tuple[str, ...]) -> object:
    for key in keys:
        found = read(key)
        if found is not None:
            return found
    return None


def _attribute(obj: object, name: str) -> object:
    """``obj.name``, or ``None`` when it has none."""
    return _reading(obj, name, lambda: getattr(obj, name, None))


def _reading(obj: object, name: str, read: Callable[[], object]) -> object:
    """What ``read`` reads of ``obj``; an :class:`InvalidIdentity` if that raises (a
    detached ORM instance's expired column, a property that fails)."""
    try:
        return read()
    except Exception as exc:
        raise InvalidIdentity(
            f"{name} of the {type(obj).__name__} could not be read:"
            f" {type(exc).__name__}: {safe_str(exc, 200)}"
        ) from exc


def _metadata(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    return json_object(value, what="identity metadata", error=InvalidIdentity)
