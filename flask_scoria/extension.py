"""The ``Scoria`` extension object and its per-app state."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

from flask import Flask, current_app
from sqlalchemy import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from .execution import Handler, LeaseKeeper, load_handler
from .handoff import normalize_key
from .runtime import RuntimeContext
from .storage import Storage, create_standalone_engine

F = TypeVar("F", bound=Callable[..., Any])

#: Every configuration key flask-scoria reads, with its default.
DEFAULTS: Mapping[str, Any] = {
    "SCORIA_DATABASE_URI": None,
    "SCORIA_ENGINE_OPTIONS": {},
    "SCORIA_SQLITE_SYNCHRONOUS": "FULL",
    "SCORIA_SQLITE_BUSY_TIMEOUT": 30.0,
    "SCORIA_URL_PREFIX": "/scoria",
    "SCORIA_STEP_LEASE_SECONDS": 300.0,
    "SCORIA_HANDOFF_MAX_BYTES": 64 * 1024,
    "SCORIA_HANDOFF_MAX_DEPTH": 16,
    "SCORIA_REDACT_KEYS": (),
}

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
#: The keys of flask-scoria's own engine, which a host's ``db`` engine ignores.
_OWN_ENGINE_KEYS = (
    "SCORIA_DATABASE_URI",
    "SCORIA_ENGINE_OPTIONS",
    "SCORIA_SQLITE_SYNCHRONOUS",
    "SCORIA_SQLITE_BUSY_TIMEOUT",
)


@dataclass(frozen=True)
class Settings:
    """The ``SCORIA_*`` configuration of one app, read once by ``init_app``."""

    database_uri: str
    engine_options: Mapping[str, Any]
    sqlite_synchronous: str
    sqlite_busy_timeout: float
    url_prefix: str
    step_lease_seconds: float
    handoff_max_bytes: int
    handoff_max_depth: int
    redact_keys: tuple[str, ...]


def read_settings(app: Flask) -> Settings:
    """Read and check the app's ``SCORIA_*`` keys, filling in defaults."""
    unknown = sorted(key for key in app.config if key.startswith("SCORIA_") and key not in DEFAULTS)
    if unknown:
        warnings.warn(
            f"flask-scoria ignores unknown config keys {unknown}; the keys it reads are"
            f" {sorted(DEFAULTS)}.",
            stacklevel=3,
        )
    for key, value in DEFAULTS.items():
        app.config.setdefault(key, value)
    config = app.config
    uri = _database_uri(app, config["SCORIA_DATABASE_URI"])
    synchronous = str(config["SCORIA_SQLITE_SYNCHRONOUS"]).upper()
    if synchronous not in _SYNCHRONOUS:
        raise ValueError(f"SCORIA_SQLITE_SYNCHRONOUS must be one of {_SYNCHRONOUS}.")
    prefix = config["SCORIA_URL_PREFIX"]
    if not isinstance(prefix, str) or not prefix.startswith("/") or prefix == "/":
        raise ValueError("SCORIA_URL_PREFIX must be a path such as '/scoria'.")
    lease = _number(config, "SCORIA_STEP_LEASE_SECONDS", float)
    max_bytes = _number(config, "SCORIA_HANDOFF_MAX_BYTES", int)
    max_depth = _number(config, "SCORIA_HANDOFF_MAX_DEPTH", int)
    busy_timeout = _number(config, "SCORIA_SQLITE_BUSY_TIMEOUT", float, allow_zero=True)
    engine_options = config["SCORIA_ENGINE_OPTIONS"]
    if not isinstance(engine_options, Mapping):
        raise ValueError(
            "SCORIA_ENGINE_OPTIONS must be a dict of create_engine() keyword arguments,"
            f" not {engine_options!r}."
        )
    return Settings(
        database_uri=uri,
        engine_options=dict(engine_options),
        sqlite_synchronous=synchronous,
        sqlite_busy_timeout=busy_timeout,
        url_prefix=prefix.rstrip("/"),
        step_lease_seconds=lease,
        handoff_max_bytes=max_bytes,
        handoff_max_depth=max_depth,
        redact_keys=_redact_keys(config["SCORIA_REDACT_KEYS"]),
    )


def _database_uri(app: Flask, uri: Any) -> str:
    """The URL of the own engine; a relative SQLite path is in the instance folder."""
    if uri is None:
        uri = "sqlite:///scoria.sqlite3"
    try:
        url = make_url(uri)
    except ArgumentError:
        raise ValueError(f"SCORIA_DATABASE_URI is not a database URL: {uri!r}.") from None
    path = url.database or ""
    as_given = path in ("", ":memory:") or path.startswith("file:") or os.path.isabs(path)
    if url.get_backend_name() == "sqlite" and not as_given:
        os.makedirs(app.instance_path, exist_ok=True)
        url = url.set(database=os.path.join(app.instance_path, path))
    return url.render_as_string(hide_password=False)


def _number(config: Mapping[str, Any], key: str, kind: type, *, allow_zero: bool = False) -> Any:
    """``config[key]`` as a positive ``kind`` (or zero, if allowed), or a ValueError naming it."""
    value = config[key]
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is not None and number != value and not isinstance(value, str):
        number = None  # 1.5 is no int
    low_ok = number is not None and (number > 0 or (allow_zero and number == 0))
    if isinstance(value, bool) or not low_ok:
        least = "zero or more" if allow_zero else "positive"
        raise ValueError(f"{key} must be a {least} number, not {value!r}.")
    return number


def _redact_keys(value: Any) -> tuple[str, ...]:
    """Key names from a list, or from one comma-separated string (as env config gives)."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple | set | frozenset) or not all(
        isinstance(name, str) for name in names
    ):
        raise ValueError(f"SCORIA_REDACT_KEYS must be a list of key names, not {value!r}.")
    return tuple(normalize_key(name.strip()) for name in names if name.strip())


class _AppState:
    def __init__(self, settings: Settings, engine: Engine | None) -> None:
        self.settings = settings
        self.engine = engine
        self.keeper = LeaseKeeper(settings.step_lease_seconds)
        self.storage: Storage | None = None


class Scoria:
    """Durable, inspectable runs for a Flask app.

    ``Scoria(app)`` or ``Scoria()`` then ``init_app(app)``. Standalone it keeps
    its tables in ``SCORIA_DATABASE_URI`` (an SQLite file in the instance
    folder by default); ``Scoria(app, db=db)`` uses a Flask-SQLAlchemy
    ``db``'s engine instead, always with its own short transactions.
    """

    def __init__(self, app: Flask | None = None, *, db: Any = None) -> None:
        self.db = db
        self.handlers: dict[str, Handler] = {}
        self.operator_scope_resolver: Callable[[], Mapping[str, Any] | None] | None = None
        self._states: WeakKeyDictionary[Flask, _AppState] = WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read config, prepare storage, mount the operator pages and the CLI."""
        if "scoria" in app.extensions:
            raise RuntimeError(
                "flask-scoria is already registered on this app. Create one Scoria"
                " instance per app and call init_app once."
            )
        settings = read_settings(app)
        engine = None
        if self.db is None:
            try:
                engine = create_standalone_engine(
                    settings.database_uri,
                    busy_timeout=settings.sqlite_busy_timeout,
                    synchronous=settings.sqlite_synchronous,
                    engine_options=dict(settings.engine_options),
                )
            except (SQLAlchemyError, TypeError) as exc:
                raise ValueError(
                    "SCORIA_DATABASE_URI / SCORIA_ENGINE_OPTIONS cannot make an engine:"
                    f" {type(exc).__name__}: {exc}"
                ) from exc
        else:
            ignored = [key for key in _OWN_ENGINE_KEYS if app.config[key] != DEFAULTS[key]]
            if ignored:
                warnings.warn(
                    f"{ignored} are ignored with Scoria(db=db), which uses the"
                    " Flask-SQLAlchemy engine; configure SQLALCHEMY_* instead.",
                    stacklevel=2,
                )
        self._states[app] = _AppState(settings, engine)
        app.extensions["scoria"] = self

        from .cli import scoria_cli
        from .operator import bp as operator_bp

        app.cli.add_command(scoria_cli)
        app.register_blueprint(operator_bp, url_prefix=settings.url_prefix)

    def handler(self, kind: str) -> Callable[[F], F]:
        """Register the handler for steps of ``kind``.

        A handler is ``fn(step, run)`` returning an outcome; per-call
        ``handlers=`` take precedence over this registry.
        """
        if not isinstance(kind, str) or not kind.strip():
            raise ValueError("A handler kind must be a non-empty string.")

        def decorator(fn: F) -> F:
            self.handlers[kind] = load_handler(fn, kind)
            return fn

        return decorator

    def operator_scope(self, fn: F) -> F:
        """Register the resolver that grants operator access.

        It returns ``{"tenant_id": ..., "actor_id": ...}`` for an operator of
        that tenant, or ``None``; without it every operator page answers 403.
        """
        self.operator_scope_resolver = fn
        return fn

    def settings(self, app: Flask | None = None) -> Settings:
        """The settings ``init_app`` read for ``app`` (default: the current app)."""
        return self._state(app).settings

    def storage(self, app: Flask | None = None) -> Storage:
        """The storage of ``app`` (default: the current app)."""
        state = self._state(app)
        if state.storage is None:
            engine = state.engine if state.engine is not None else self._host_engine()
            state.storage = Storage(engine)
        return state.storage

    def _host_engine(self) -> Engine:
        try:
            engine: Engine = self.db.engine
        except RuntimeError as exc:
            raise RuntimeError(
                "Scoria(db=db) runs on the Flask-SQLAlchemy engine: call db.init_app(app)"
                f" (and use it inside an app context) first. {exc}"
            ) from exc
        return engine

    def _state(self, app: Flask | None) -> _AppState:
        if app is None:
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        try:
            return self._states[app]
        except KeyError:
            raise RuntimeError(
                "This Scoria instance is not initialized on the current app. Call"
                " init_app(app) before using it."
            ) from None

    def __repr__(self) -> str:
        return f"<Scoria handlers={sorted(self.handlers)}>"


def get_extension(app: Flask | None = None) -> Scoria:
    """The ``Scoria`` instance of ``app`` (default: the current app)."""
    if app is None:
        app = current_app._get_current_object()  # type: ignore[attr-defined]
    extension = app.extensions.get("scoria")
    if extension is None:
        raise RuntimeError(
            "flask-scoria is not initialized on this app. Call Scoria(app) or"
            " Scoria().init_app(app) in your app factory."
        )
    return extension  # type: ignore[no-any-return]


def runtime_context() -> RuntimeContext:
    """Everything a runtime call needs from the current app."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    extension = get_extension(app)
    state = extension._state(app)
    return RuntimeContext(
        app=app,
        storage=extension.storage(app),
        registry=extension.handlers,
        keeper=state.keeper,
        handoff_max_bytes=state.settings.handoff_max_bytes,
        handoff_max_depth=state.settings.handoff_max_depth,
    )
