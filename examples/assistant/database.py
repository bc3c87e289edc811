"""Bringing the example's database up to date: its own tables and flask-scoria's."""

from __future__ import annotations

import flask_migrate

from flask_scoria import schema

from . import MIGRATIONS
from .extensions import runtime
from .models import seed_demo_users


def prepare() -> None:
    """Apply both migration histories and add the demo users (inside an app context).

    The same as ``flask db upgrade`` then ``flask scoria db upgrade``: the app's
    revisions live in ``alembic_version``, flask-scoria's in their own table.
    """
    flask_migrate.upgrade(directory=str(MIGRATIONS))
    schema.upgrade(runtime.storage().engine)
    seed_demo_users()
