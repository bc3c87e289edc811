"""The ``SCORIA_*`` configuration keys: their defaults, and reading them once."""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Flask
from sqlalchemy import URL, make_url
from sqlalchemy.exc import ArgumentError

from ._json import MAX_DEPTH
from .policy import EXECUTORS, MAX_SECONDS
from .redaction import normalize_key

#: Every configuration key flask-scoria reads, with its default.
DEFAULTS: Mapping[str, Any] = {
    "SCORIA_DATABASE_URI": None,
    "SCORIA_ENGINE_OPTIONS": {},
    "SCORIA_SQLITE_SYNCHRONOUS": "FULL",
    "SCORIA_SQLITE_BUSY_TIMEOUT": 30.0,
    "SCORIA_URL_PREFIX": "/scoria",
    "SCORIA_HOME_URL": None,
    "SCORIA_STEP_LEASE_SECONDS": 300.0,
    "SCORIA_HANDOFF_MAX_BYTES": 64 * 1024,
    "SCORIA_HANDOFF_MAX_DEPTH": 16,
    "SCORIA_MAX_STEPS": 1000,
    "SCORIA_REDACT_KEYS": (),
    "SCORIA_CONNECT_TIMEOUT": 10.0,
    "SCORIA_STATEMENT_TIMEOUT": 30.0,
    "SCORIA_RECONNECT_ATTEMPTS": 3,
    "SCORIA_MAX_METADATA_BYTES": 256 * 1024,
    "SCORIA_RESULT_MAX_BYTES": 16 * 1024 * 1024,
    "SCORIA_EXECUTOR": "inline",
    "SCORIA_INLINE_RETRY_WAIT": 5.0,
}

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
#: A path of one or more segments of unreserved characters: "/scoria", "/admin/runs".
_URL_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~-]+)+/?")
#: The longest timeout the drivers take: PostgreSQL's statement timeout and SQLite's are
#: milliseconds in a 32-bit int (about 24.8 days); libpq's connect timeout, whole seconds,
#: gets the same bound.
_MAX_TIMEOUT = (2**31 - 1) / 1000
#: The keys of flask-scoria's own engine, which a host's ``db`` engine ignores.
OWN_ENGINE_KEYS = (
    "SCORIA_DATABASE_URI",
    "SCORIA_ENGINE_OPTIONS",
    "SCORIA_SQLITE_SYNCHRONOUS",
    "SCORIA_SQLITE_BUSY_TIMEOUT",
    "SCORIA_CONNECT_TIMEOUT",
    "SCORIA_STATEMENT_TIMEOUT",
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
    max_steps: int
    redact_keys: tuple[str, ...]
    connect_timeout: float
    statement_timeout: float
    reconnect_attempts: int
    max_metadata_bytes: int
    result_max_bytes: int
    executor: str
    inline_retry_wait: float


def read_settings(app: Flask, *, own_engine: bool = True) -> Settings:
    """Read and check the app's ``SCORIA_*`` keys, filling in defaults.

    With ``own_engine``, the instance folder that a relative SQLite path names
    is created, for the engine to open its file there.
    """
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
    uri = _database_uri(app, config["SCORIA_DATABASE_URI"], create_folder=own_engine)
    synchronous = str(config["SCORIA_SQLITE_SYNCHRONOUS"]).upper()
    if synchronous not in _SYNCHRONOUS:
        raise ValueError(
            f"SCORIA_SQLITE_SYNCHRONOUS must be one of {_SYNCHRONOUS},"
            f" not {config['SCORIA_SQLITE_SYNCHRONOUS']!r}."
        )
    prefix = config["SCORIA_URL_PREFIX"]
    # Segments of a path's own characters: "//host" would be a URL of another host, "?" or
    # "#" would end the path, and "<x>" would be a route variable.
    if not isinstance(prefix, str) or not _URL_PREFIX.fullmatch(prefix):
        raise ValueError(f"SCORIA_URL_PREFIX must be a path such as '/scoria', not {prefix!r}.")
    lease = _number(config, "SCORIA_STEP_LEASE_SECONDS", float, maximum=MAX_SECONDS)
    max_bytes = _number(config, "SCORIA_HANDOFF_MAX_BYTES", int)
    max_depth = _number(config, "SCORIA_HANDOFF_MAX_DEPTH", int, maximum=MAX_DEPTH)
    max_steps = _number(config, "SCORIA_MAX_STEPS", int)
    busy_timeout = _number(
        config, "SCORIA_SQLITE_BUSY_TIMEOUT", float, allow_zero=True, maximum=_MAX_TIMEOUT
    )
    executor = config["SCORIA_EXECUTOR"]
    if executor not in EXECUTORS:
        raise ValueError(f"SCORIA_EXECUTOR must be one of {EXECUTORS}, not {executor!r}.")
    retry_wait = _number(
        config, "SCORIA_INLINE_RETRY_WAIT", float, allow_zero=True, maximum=MAX_SECONDS
    )
    engine_options = config["SCORIA_ENGINE_OPTIONS"]
    if not isinstance(engine_options, Mapping) or not isinstance(
        engine_options.get("connect_args", {}), Mapping
    ):
        raise ValueError(
            "SCORIA_ENGINE_OPTIONS must be a dict of create_engine() keyword arguments"
            f" (its connect_args a dict too), not {engine_options!r}."
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
        max_steps=max_steps,
        redact_keys=_redact_keys(config["SCORIA_REDACT_KEYS"]),
        connect_timeout=_number(config, "SCORIA_CONNECT_TIMEOUT", float, maximum=_MAX_TIMEOUT),
        statement_timeout=_number(
            config, "SCORIA_STATEMENT_TIMEOUT", float, allow_zero=True, maximum=_MAX_TIMEOUT
        ),
        reconnect_attempts=_number(config, "SCORIA_RECONNECT_ATTEMPTS", int, allow_zero=True),
        max_metadata_bytes=_number(config, "SCORIA_MAX_METADATA_BYTES", int),
        result_max_bytes=_number(config, "SCORIA_RESULT_MAX_BYTES", int),
        executor=executor,
        inline_retry_wait=retry_wait,
    )


def _database_uri(app: Flask, uri: object, *, create_folder: bool) -> str:
    """The URL of the own engine; a relative SQLite path is in the instance folder,
    which ``create_folder`` creates."""
    if uri is None:
        uri = "sqlite:///scoria.sqlite3"
    try:
        if not isinstance(uri, str | URL):
            raise ArgumentError(uri)
        url = make_url(uri)
    except ArgumentError:
        raise ValueError(f"SCORIA_DATABASE_URI is not a database URL: {uri!r}.") from None
    path = url.database or ""
    as_given = path in ("", ":memory:") or path.startswith("file:") or os.path.isabs(path)
    if url.get_backend_name() == "sqlite" and not as_given:
        if create_folder:
            os.makedirs(app.instance_path, exist_ok=True)
        url = url.set(database=os.path.join(app.instance_path, path))
    return url.render_as_string(hide_password=False)


def _number(
    config: Mapping[str, Any],
    key: str,
    kind: type,
    *,
    allow_zero: bool = False,
    maximum: float | None = None,
) -> Any:
    """``config[key]`` as a positive ``kind`` (or zero, if allowed) up to ``maximum``,
    or a ValueError naming it."""
    value = config[key]
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is not None and number != value and not isinstance(value, str):
        number = None  # 1.5 is no int
    in_range = (
        number is not None
        and (isinstance(number, int) or math.isfinite(number))
        and (number > 0 or (allow_zero and number == 0))
        and (maximum is None or number <= maximum)
    )
    if isinstance(value, bool) or not in_range:
        what = "a whole number" if kind is int else "a number"
        least = "of zero or more" if allow_zero else "above zero"
        most = "" if maximum is None else f", at most {maximum}"
        raise ValueError(f"{key} must be {what} {least}{most}, not {value!r}.")
    return number


def _redact_keys(value: object) -> tuple[str, ...]:
    """Key names from a list, or from one comma-separated string (as env config gives)."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple | set | frozenset) or not all(
        isinstance(name, str) for name in names
    ):
        raise ValueError(f"SCORIA_REDACT_KEYS must be a list of key names, not {value!r}.")
    return tuple(normalize_key(name.strip()) for name in names if name.strip())
