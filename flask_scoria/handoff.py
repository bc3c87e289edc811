"""Validation of bounded handoffs.

A handoff gives a child step a narrow, host-chosen ``projected_context``.
Keys that look like transcripts, provider or socket state, headers, cookies
or credentials are refused at any depth, and both payloads are capped in size.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from ._json import ErrorFactory, check_text, json_copy
from .errors import InvalidHandoff

UNSAFE_NAMES = frozenset(
    {
        "transcript",
        "transcripts",
        "messages",
        "message_history",
        "history",
        "chat_history",
        "conversation_history",
        "provider_session",
        "provider_state",
        "runtime_state",
        "session",
        "session_state",
        "socket",
        "socket_state",
        "assigns",
        "private",
        "cookies",
        "headers",
        "secrets",
        "message",
        "cookie",
        "header",
        "secret",
        "token",
        "password",
        "passwd",
        "api_key",
        "apikey",
        "authorization",
        "credentials",
        "private_key",
        "access_token",
        "refresh_token",
    }
)
UNSAFE_SUFFIXES = (
    "_transcript",
    "_history",
    "_messages",
    "_cookies",
    "_headers",
    "_secrets",
    "_provider_session",
    "_socket",
    "_token",
    "_secret",
    "_password",
    "_api_key",
    "_cookie",
    "_header",
    "_credentials",
)
UNSAFE_PREFIXES = ("provider_session_", "socket_")

_ACRONYM_BOUNDARY = re.compile(r"([A-Z]+)([A-Z][a-z])")
_CAMEL_BOUNDARY = re.compile(r"([a-z0-9])([A-Z])")
_NON_ALNUM = re.compile(r"[^0-9A-Za-z]+")


@dataclass(frozen=True)
class HandoffSpec:
    """A validated handoff, ready to be written."""

    delegated_role_id: str
    delegated_kind: str
    handoff_input: dict[str, Any]
    projected_context: dict[str, Any]
    capability_tags: list[str]


def normalize_key(key: str) -> str:
    """``requestHeaders``, ``Request-Headers`` -> ``request_headers``."""
    key = _ACRONYM_BOUNDARY.sub(r"\1_\2", key)
    key = _CAMEL_BOUNDARY.sub(r"\1_\2", key)
    return _NON_ALNUM.sub("_", key).strip("_").lower()


def is_unsafe_key(key: str) -> bool:
    """Whether a context key names data that must not cross a handoff."""
    name = normalize_key(key)
    return (
        name in UNSAFE_NAMES or name.endswith(UNSAFE_SUFFIXES) or name.startswith(UNSAFE_PREFIXES)
    )


def validate_handoff(
    *,
    delegated_role_id: Any,
    delegated_kind: Any,
    handoff_input: Any,
    projected_context: Any,
    capability_tags: Any,
    max_bytes: int,
    max_depth: int,
) -> HandoffSpec:
    """Check every part of a handoff; raise :class:`InvalidHandoff` on the first flaw."""
    role = require_name(
        delegated_role_id,
        "delegated_role_id",
        error=partial(InvalidHandoff, "invalid_delegated_role_id"),
    )
    kind = require_name(
        delegated_kind,
        "delegated_kind",
        error=partial(InvalidHandoff, "invalid_delegated_kind"),
        limit=64,
    )
    payload = _payload(handoff_input, "handoff_input", "invalid_handoff_input")
    _cap_size(payload, "handoff_input", max_bytes)
    context = _payload(projected_context, "projected_context", "invalid_projected_context")
    _check_depth(context, max_depth)
    _check_keys(context, "")
    _cap_size(context, "projected_context", max_bytes)
    return HandoffSpec(role, kind, payload, context, _tags(capability_tags))


def require_name(value: Any, what: str, *, error: ErrorFactory, limit: int = 255) -> str:
    """``value`` as a stripped, printable, non-blank name of at most ``limit`` characters.

    Anything else raises ``error`` with a message naming ``what``.
    """
    if not isinstance(value, str) or not value.strip():
        raise error(f"{what} must be a non-empty string.")
    text = value.strip()
    if len(text) > limit or not text.isprintable():
        raise error(f"{what} must be printable and at most {limit} characters long.")
    return text


def _payload(value: Any, what: str, code: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidHandoff(code, f"{what} must be a dict, not {type(value).__name__}.")
    copied: dict[str, Any] = json_copy(
        value, what=what, error=lambda message: InvalidHandoff(code, message)
    )
    return copied


def _cap_size(value: dict[str, Any], what: str, max_bytes: int) -> None:
    size = len(json.dumps(value, separators=(",", ":")).encode())
    if size > max_bytes:
        raise InvalidHandoff(
            f"{what}_too_large",
            f"{what} is {size} bytes serialized; the limit is {max_bytes}"
            " (SCORIA_HANDOFF_MAX_BYTES).",
        )


def _check_depth(value: Any, max_depth: int, depth: int = 1) -> None:
    if isinstance(value, dict | list):
        if depth > max_depth:
            raise InvalidHandoff(
                "projected_context_too_deep",
                f"projected_context is nested deeper than {max_depth} levels"
                " (SCORIA_HANDOFF_MAX_DEPTH).",
            )
        items = value.values() if isinstance(value, dict) else value
        for item in items:
            _check_depth(item, max_depth, depth + 1)


def _check_keys(value: Any, path: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if is_unsafe_key(key):
                raise InvalidHandoff(
                    "unsafe_projected_context",
                    f"projected_context key {where!r} looks like transcript, session"
                    " or credential data; pass only the narrow context the child"
                    " needs.",
                    path=where,
                )
            _check_keys(item, where)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_keys(item, f"{path}[{index}]")


def _tags(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(
        isinstance(tag, str) and tag.strip() and len(tag) <= 64 for tag in value
    ):
        raise InvalidHandoff(
            "invalid_capability_tags",
            "capability_tags must be a list of non-empty strings of at most 64 characters.",
        )
    invalid = partial(InvalidHandoff, "invalid_capability_tags")
    return [check_text(tag.strip(), what="capability_tags", error=invalid) for tag in value]
