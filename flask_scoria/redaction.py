"""Key names that mark data as private: refused in handoffs, redacted on pages.

A key is compared in its normalized form (``requestHeaders`` and
``Request-Headers`` are both ``request_headers``): as a whole name, or by a
suffix or prefix.
"""

from __future__ import annotations

import re

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
