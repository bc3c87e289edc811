"""What flask-scoria keeps for each app it is registered on, and how to find it.

``Scoria.init_app`` registers an :class:`AppState` for the app; the engine,
the CLI, the operator pages and ``verify`` look it up here, so that none of
them imports the extension module above them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol
from weakref import WeakKeyDictionary

from flask import Flask, current_app
from sqlalchemy import Engine

from .config import Settings
from .policy import HandlerPolicy
from .storage import Storage

if TYPE_CHECKING:
    from .runtime import Handler, LeaseKeeper

#: Returns ``{"tenant_id": ..., "actor_id": ...}`` for an operator, or ``None``.
OperatorScopeResolver = Callable[[], Mapping[str, object] | None]


@dataclass(eq=False)
class Registry:
    """What one ``Scoria`` instance has registered, shared by every app it is on."""

    handlers: dict[str, Handler] = field(default_factory=dict)
    policies: dict[str, HandlerPolicy] = field(default_factory=dict)
    operator_scope: OperatorScopeResolver | None = None


class Extension(Protocol):
    """What the state needs of the ``Scoria`` instance that registered it."""

    def init_app(self, app: Flask) -> None: ...


class AppState:
    """One app's settings, registry, lease keeper and storage."""

    def __init__(
        self,
        extension: Extension,
        settings: Settings,
        registry: Registry,
        keeper: LeaseKeeper,
        engine: Callable[[], Engine],
    ) -> None:
        self.extension = extension
        self.settings = settings
        self.registry = registry
        self.keeper = keeper
        self._engine = engine
        self._storage: Storage | None = None

    @property
    def storage(self) -> Storage:
        """The app's storage, created on first use (a host ``db`` needs an app context)."""
        if self._storage is None:
            self._storage = Storage(
                self._engine(), reconnect_attempts=self.settings.reconnect_attempts
            )
        return self._storage


_states: WeakKeyDictionary[Flask, AppState] = WeakKeyDictionary()


def register(app: Flask, state: AppState) -> None:
    """Record ``state`` as the flask-scoria state of ``app``."""
    _states[app] = state


def registered_apps() -> list[Flask]:
    """The apps flask-scoria is initialized on, in this process."""
    return list(_states)


def app_state(app: Flask | None = None) -> AppState:
    """The flask-scoria state of ``app`` (default: the current app)."""
    if app is None:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        return _states[app]
    except KeyError:
        raise RuntimeError(
            "flask-scoria is not initialized on this app. Call Scoria(app) or"
            " Scoria().init_app(app) in your app factory."
        ) from None
