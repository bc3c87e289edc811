"""Validation of the JSON payloads flask-scoria stores."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from .errors import short_repr

ErrorFactory = Callable[[str], Exception]
#: A JSON object, as flask-scoria stores it: str keys, plain JSON values.
JSONObject = dict[str, Any]

#: Nesting deeper than this is refused for any stored payload.
MAX_DEPTH = 64
#: From here on ``repr`` writes floats in exponent form and every float is an integer.
INTEGRAL_FLOATS = 1e16
#: The most digits of a stored integer: Python's default limit for turning an int
#: into text and back, which every process that reads the payload must manage.
MAX_INT_DIGITS = 4300
_INT_BOUND = 10**MAX_INT_DIGITS


def json_copy(value: object, *, what: str, error: ErrorFactory) -> Any:
    """Return a plain-JSON deep copy of ``value`` or raise ``error``.

    Accepted: ``dict`` with ``str`` keys, ``list``/``tuple``, ``str``, ``int``
    of at most :data:`MAX_INT_DIGITS` digits, finite ``float``, ``bool`` and
    ``None``. Strings may not contain NUL or lone surrogates, which
    PostgreSQL cannot store. Floats of 1e16 and more become the ``int`` they
    equal, which reads back alike on every backend.
    """
    return _copy(value, what, error, 0)


def json_object(value: object, *, what: str, error: ErrorFactory) -> JSONObject:
    """Like :func:`json_copy`, but ``value`` must be a mapping."""
    if not isinstance(value, Mapping):
        raise error(f"{what} must be a dict, not {type(value).__name__}.")
    result: JSONObject = _copy(value, what, error, 0)
    return result


def _copy(value: object, what: str, error: ErrorFactory, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise error(f"{what} is nested deeper than {MAX_DEPTH} levels.")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -_INT_BOUND < value < _INT_BOUND:
            raise error(f"{what} contains an integer of more than {MAX_INT_DIGITS} digits.")
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
        copied: JSONObject = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise error(f"{what} has a non-string key {short_repr(key)}.")
            copied[_check_text(key, what, error)] = _copy(item, what, error, depth + 1)
        return copied
    if isinstance(value, list | tuple):
        return [_copy(item, what, error, depth + 1) for item in value]
    raise error(f"{what} contains a {type(value).__name__}, which is not JSON.")


def _check_text(text: str, what: str, error: ErrorFactory) -> str:
    if "\x00" in text:
        raise error(f"{what} contains a NUL character.")
    if not _encodes(text):
        raise error(f"{what} contains a lone surrogate character.")
    return text


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_storable_text(text: str) -> bool:
    """Whether every backend can store ``text``: no NUL, no lone surrogate."""
    return "\x00" not in text and _encodes(text)


def serialized_size(value: object) -> int:
    """The bytes of ``value`` as compact JSON in UTF-8, the measure of every size cap."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return len(text.encode("utf-8", "surrogatepass"))


def oversized(value: object, cap: int, what: str, key: str) -> str | None:
    """Why ``value`` is refused: more than ``cap`` bytes serialized, the limit of the
    config ``key``; ``None`` if it fits."""
    size = serialized_size(value)
    if size <= cap:
        return None
    return f"{what} is {size} bytes serialized; the limit is {cap} ({key})."


def storable_text(text: str) -> str:
    """``text`` with what PostgreSQL cannot store (NUL, lone surrogates) replaced."""
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def check_text(text: str, *, what: str, error: ErrorFactory) -> str:
    """``text``, or ``error`` if it holds what PostgreSQL cannot store."""
    return _check_text(text, what, error)
