"""The example's own tables: users and their conversations.

A conversation's ``id`` is the flask-scoria ``session_id`` of its turns.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import DateTime, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from .extensions import db

#: The demo's sign-in list: (id, name, tenant, role). No passwords.
DEMO_USERS = (
    ("alice", "Alice", "acme", "member"),
    ("bob", "Bob", "acme", "member"),
    ("ops", "Olga (operator)", "acme", "operator"),
    ("zoe", "Zoe", "globex", "member"),
    ("gus", "Gus (operator)", "globex", "operator"),
)


class User(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(120))
    tenant_id: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(32))


class Conversation(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), ForeignKey("users.id"))
    tenant_id: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(String(200))
    last_run_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    @classmethod
    def start(cls, user: User) -> Conversation:
        """A new, empty conversation of ``user``, added to the session."""
        conversation = cls(
            id=f"conv-{uuid.uuid4().hex[:16]}",
            user_id=user.id,
            tenant_id=user.tenant_id,
            title="New conversation",
            created_at=datetime.now(UTC),
        )
        db.session.add(conversation)
        return conversation


def seed_demo_users() -> None:
    """Insert the demo users that are missing."""
    for user_id, name, tenant_id, role in DEMO_USERS:
        if db.session.get(User, user_id) is None:
            db.session.add(User(id=user_id, name=name, tenant_id=tenant_id, role=role))
    db.session.commit()
