"""Validation of the JSON payloads flask-scoria stores."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ScoriaError

ErrorFactory = Callable[[str], ScoriaError]

#: Nesting deeper than this is refused for any stored payload.
MAX_DEPTH = 64
#: From here on ``repr`` writes floats in exponent form and every float is an integer.
INTEGRAL_FLOATS = 1e16


def json_copy(value: Any, *, what: str, error: ErrorFactory) -> Any:
    """Return a plain-JSON deep copy of ``value`` or raise ``error``.

    Accepted: ``dict`` with ``str`` keys, ``list``/``tuple``, ``str``, ``int``,
    finite ``float``, ``bool`` and ``None``. Strings may not contain NUL or
    lone surrogates, which PostgreSQL cannot store. Floats of 1e16 and more
    become the ``int`` they equal, which reads back alike on every backend.
    """
    return _copy(value, what, error, 0)


def json_object(value: Any, *, what: str, error: ErrorFactory) -> dict[str, Any]:
    """Like :func:`json_copy`, but ``value`` must be a mapping."""
    if not isinstance(value, Mapping):
        raise error(f"{what} must be a dict, not {type(value).__name__}.")
    result: dict[str, Any] = _copy(value, what, error, 0)
    return result


def _copy(value: Any, what: str, error: ErrorFactory, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise error(f"{what} is nested deeper than {MAX_DEPTH} levels.")
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise error(f"{what} contains {value!r}, which is not valid JSON.")
        if abs(value) >= INTEGRAL_FLOATS:
            # PostgreSQL's jsonb reads 1e+16 back as an int rounded to 17 digits; the exact
            # int the float equals reads back the same on every backend.
            return int(value)
        return value
    if isinstance(value, str):
        return _check_text(value, what, error)
    if isinstance(value, Mapping):
        copied: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise error(f"{what} has a non-string key {key!r}.")
            copied[_check_text(key, what, error)] = _copy(item, what, error, depth + 1)
        return copied
    if isinstance(value, list | tuple):
        return [_copy(item, what, error, depth + 1) for item in value]
    raise error(f"{what} contains a {type(value).__name__}, which is not JSON.")


def _check_text(text: str, what: str, error: ErrorFactory) -> str:
    if "\x00" in text:
        raise error(f"{what} contains a NUL character.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{what} contains a lone surrogate character.") from None
    return text


def storable_text(text: str) -> str:
    """``text`` with what PostgreSQL cannot store (NUL, lone surrogates) replaced."""
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def check_text(text: str, *, what: str, error: ErrorFactory) -> str:
    """``text``, or ``error`` if it holds what PostgreSQL cannot store."""
    return _check_text(text, what, error)
