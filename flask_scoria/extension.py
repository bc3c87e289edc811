"""The ``Scoria`` extension object."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from functools import partial
from types import MappingProxyType
from typing import Any, Protocol, TypeVar, cast, overload
from weakref import ref

from flask import Flask
from sqlalchemy import Engine
from sqlalchemy.exc import NoSuchModuleError, SQLAlchemyError

from .config import DEFAULTS, OWN_ENGINE_KEYS, Settings, read_settings
from .policy import Executor, HandlerPolicy, Retry
from .runtime import MAX_KIND, Handler, LeaseKeeper, load_handler, require_name
from .state import AppState, OperatorScopeResolver, Registry, app_state, register
from .storage import Storage, create_standalone_engine

H = TypeVar("H", bound=Handler)
R = TypeVar("R", bound=OperatorScopeResolver)


class Registers(Protocol):
    """What :meth:`Scoria.handler` returns: it registers a handler, or a
    ``"module:function"`` string naming one, and returns it unchanged."""

    @overload
    def __call__(self, fn: H, /) -> H: ...
    @overload
    def __call__(self, fn: str, /) -> str: ...


class Scoria:
    """Durable, inspectable runs for a Flask app.

    ``Scoria(app)`` or ``Scoria()`` then ``init_app(app)``. Standalone it keeps
    its tables in ``SCORIA_DATABASE_URI`` (an SQLite file in the instance
    folder by default); ``Scoria(app, db=db)`` uses a Flask-SQLAlchemy
    ``db``'s engine instead, always with its own short transactions.
    """

    def __init__(self, app: Flask | None = None, *, db: Any = None) -> None:
        self.db = db
        self._registry = Registry()
        if app is not None:
            self.init_app(app)

    @property
    def handlers(self) -> Mapping[str, Handler]:
        """The registered step handlers, by kind (read-only: register with :meth:`handler`)."""
        return MappingProxyType(self._registry.handlers)

    @property
    def operator_scope_resolver(self) -> OperatorScopeResolver | None:
        """The function registered with :meth:`operator_scope`, if any."""
        return self._registry.operator_scope

    def init_app(self, app: Flask) -> None:
        """Read config, prepare storage, mount the operator pages and the CLI."""
        if "scoria" in app.extensions:
            raise RuntimeError(
                "flask-scoria is already registered on this app. Create one Scoria"
                " instance per app and call init_app once."
            )
        settings = read_settings(app, own_engine=self.db is None)
        engine = self._own_engine(settings) if self.db is None else None
        if self.db is not None:
            ignored = [key for key in OWN_ENGINE_KEYS if app.config[key] != DEFAULTS[key]]
            if ignored:
                warnings.warn(
                    f"{ignored} are ignored with Scoria(db=db), which uses the"
                    " Flask-SQLAlchemy engine; configure SQLALCHEMY_* instead.",
                    stacklevel=2,
                )
        keeper = LeaseKeeper(settings.step_lease_seconds)
        source = partial(self._host_engine, ref(app)) if engine is None else (lambda: engine)
        register(app, AppState(self, settings, self._registry, keeper, source))
        app.extensions["scoria"] = self

        from .cli import scoria_cli
        from .operator import bp as operator_bp
        from .operator.access import leave_to_own_csrf_check

        app.cli.add_command(scoria_cli)
        app.register_blueprint(operator_bp, url_prefix=settings.url_prefix)
        leave_to_own_csrf_check(app, operator_bp)
        if settings.executor == "celery":
            _register_celery_tasks()

    @staticmethod
    def _own_engine(settings: Settings) -> Engine:
        try:
            return create_standalone_engine(
                settings.database_uri,
                busy_timeout=settings.sqlite_busy_timeout,
                synchronous=settings.sqlite_synchronous,
                engine_options=dict(settings.engine_options),
                connect_timeout=settings.connect_timeout,
                statement_timeout=settings.statement_timeout,
            )
        except (SQLAlchemyError, TypeError, ImportError) as exc:
            # ImportError: the URL's driver is not installed; NoSuchModuleError: its
            # scheme names no dialect (``postgres://``, which SQLAlchemy does not take).
            postgres = str(settings.database_uri).startswith("postgres")
            hint = (
                " (for PostgreSQL: the postgres extra installs psycopg, pip install"
                " '.[postgres]' in a checkout of flask-scoria, and a postgresql+psycopg:// URL)"
                if postgres and isinstance(exc, ImportError | NoSuchModuleError)
                else ""
            )
            raise ValueError(
                "SCORIA_DATABASE_URI / SCORIA_ENGINE_OPTIONS cannot make an engine:"
                f" {type(exc).__name__}: {exc}{hint}"
            ) from exc

    def handler(
        self,
        kind: str,
        *,
        executor: Executor | None = None,
        retry: Retry | None = None,
        timeout: float | None = None,
    ) -> Registers:
        """Register the handler for steps of ``kind``.

        A handler is ``fn(step, run)`` returning an outcome; per-call
        ``handlers=`` take precedence over this registry. ``executor``
        (``"inline"``, ``"worker"`` or ``"celery"``) overrides
        ``SCORIA_EXECUTOR`` for this kind; ``retry`` is its :class:`Retry`
        policy; ``timeout`` fails an attempt still running after that many
        seconds.
        """
        if callable(kind):  # @runtime.handler, without the kind
            raise ValueError(
                f'runtime.handler takes the step kind: write @runtime.handler("kind") above'
                f" {getattr(kind, '__name__', 'the handler')}."
            )
        # As start_run, Next and Handoff read a kind.
        kind = require_name(kind, "A handler kind", error=ValueError, limit=MAX_KIND)
        policy = HandlerPolicy(executor, Retry() if retry is None else retry, timeout)
        if executor == "celery":
            _register_celery_tasks()

        def decorator(fn: Any) -> Any:
            handler = load_handler(fn, kind)
            registered = self._registry.handlers.get(kind)
            if registered is not None and _defined_at(registered) != _defined_at(handler):
                # Its paused runs would resume in the other function's code.
                raise ValueError(
                    f"Steps of kind {kind!r} already have a handler, {_named(registered)};"
                    f" {_named(handler)} cannot take them over. Register each kind once."
                )
            self._registry.handlers[kind] = handler
            self._registry.policies[kind] = policy
            return fn

        return cast(Registers, decorator)

    def operator_scope(self, fn: R) -> R:
        """Register the resolver that grants operator access.

        It returns ``{"tenant_id": ..., "actor_id": ...}`` for an operator of
        that tenant, or ``None``; without it every operator page answers 403.
        """
        self._registry.operator_scope = fn
        return fn

    def settings(self, app: Flask | None = None) -> Settings:
        """The settings ``init_app`` read for ``app`` (default: the current app)."""
        return self._state(app).settings

    def storage(self, app: Flask | None = None) -> Storage:
        """The storage of ``app`` (default: the current app)."""
        return self._state(app).storage

    def _host_engine(self, app: ref[Flask]) -> Engine:
        """The Flask-SQLAlchemy engine of ``app``, whichever app's context is current."""
        try:
            with cast(Flask, app()).app_context():
                engine: Engine = self.db.engine
        except RuntimeError as exc:
            raise RuntimeError(
                "Scoria(db=db) runs on the Flask-SQLAlchemy engine: call db.init_app(app)"
                f" (and use it inside an app context) first. {exc}"
            ) from exc
        return engine

    def _state(self, app: Flask | None) -> AppState:
        state = app_state(app)
        if state.extension is not self:
            raise RuntimeError(
                "This Scoria instance is not initialized on the current app. Call"
                " init_app(app) before using it."
            )
        return state

    def __repr__(self) -> str:
        return f"<Scoria handlers={sorted(self.handlers)}>"


def _defined_at(handler: Any) -> object:
    """What stays the same when the code defining ``handler`` runs again (a module
    imported twice, an app factory called twice): a function's place in its source
    (a method's, a partial's with its arguments), or the class of another callable."""
    if inspect.ismethod(handler):
        return _defined_at(handler.__func__)
    if isinstance(handler, partial):
        return _defined_at(handler.func), handler.args, handler.keywords
    if inspect.isfunction(handler):
        return handler.__module__, handler.__qualname__, handler.__code__.co_firstlineno
    return type(handler)


def _named(handler: Any) -> str:
    function = handler.__func__ if inspect.ismethod(handler) else handler
    if inspect.isfunction(function):
        return f"{function.__module__}.{function.__qualname__}"
    return repr(handler)


def _register_celery_tasks() -> None:
    """Import the Celery tasks, which registers them, or say how to install Celery."""
    try:
        from . import celery_tasks  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "celery":
            raise
        raise ImportError(
            'The "celery" executor needs Celery: pip install "flask-scoria[celery]".'
        ) from exc
