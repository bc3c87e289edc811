"""Key names that mark data as private: refused in handoffs, redacted on pages.

A key is compared in its normalized form (``requestHeaders`` and
``Request-Headers`` are both ``request_headers``): as a whole name, or by a
suffix or prefix. The pages hide more than a handoff refuses: the names and
suffixes of :data:`DISPLAY_SECRET_NAMES` and :data:`DISPLAY_SECRET_SUFFIXES`
are credentials too, but a handoff may carry them, as its contract says.
"""

from __future__ import annotations

import re
import unicodedata

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
    "_apikey",
    "_cookie",
    "_header",
    "_credentials",
)
UNSAFE_PREFIXES = ("provider_session_", "socket_")

#: Whole names whose values the pages hide, besides those a handoff refuses.
DISPLAY_SECRET_NAMES = frozenset(
    {
        "auth",
        "bearer",
        "credential",
        "jwt",
        "passphrase",
        "passwords",
        "pwd",
        "tokens",
        "api_keys",
        "access_key",
        "secret_key",
        "signing_key",
        "encryption_key",
        "private_keys",
    }
)
#: Suffixes whose values the pages hide, besides those a handoff refuses. Not
#: ``_tokens``: ``max_tokens`` and ``prompt_tokens`` are counts.
DISPLAY_SECRET_SUFFIXES = (
    "_auth",
    "_authorization",
    "_bearer",
    "_credential",
    "_jwt",
    "_passphrase",
    "_passwords",
    "_pwd",
    "_api_keys",
    "_access_key",
    "_secret_key",
    "_signing_key",
    "_encryption_key",
    "_private_key",
)

#: Where an acronym ends and a word begins (``HTTP|Server``): zero-width, so that a long
#: run of capitals is read once, not once from each of its letters.
_ACRONYM_BOUNDARY = re.compile(r"(?<=[A-Z])(?=[A-Z][a-z])")
_CAMEL_BOUNDARY = re.compile(r"([a-z0-9])([A-Z])")
_NON_ALNUM = re.compile(r"[^0-9A-Za-z]+")


def normalize_key(key: str) -> str:
    """``requestHeaders``, ``Request-Headers`` -> ``request_headers``; letters of other
    widths and forms (full-width ones) are read as the letters they stand for."""
    if not key.isascii():
        key = unicodedata.normalize("NFKC", key)
    key = _ACRONYM_BOUNDARY.sub("_", key)
    key = _CAMEL_BOUNDARY.sub(r"\1_\2", key)
    return _NON_ALNUM.sub("_", key).strip("_").lower()


def is_unsafe_key(key: str) -> bool:
    """Whether a context key names data that must not cross a handoff."""
    name = normalize_key(key)
    return (
        name in UNSAFE_NAMES or name.endswith(UNSAFE_SUFFIXES) or name.startswith(UNSAFE_PREFIXES)
    )


def is_display_secret(key: str) -> bool:
    """Whether a key names a credential that a handoff may carry but no page shows."""
    name = normalize_key(key)
    return name in DISPLAY_SECRET_NAMES or name.endswith(DISPLAY_SECRET_SUFFIXES)


#: A scheme starts where the character before cannot be part of one: a text of scheme
#: characters (``a.a.a.``) is then read once, not once from each of its letters.
_URL_PASSWORD = re.compile(
    r"((?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://[^:/?#@\s]*:)[^@/?#\s]+(@)", re.IGNORECASE
)
_DSN_PASSWORD = re.compile(r"(\b(?:password|pwd)\s*=\s*)('[^']*'|[^\s;&]+)", re.IGNORECASE)


def mask_passwords(text: str, mask: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL in it, and
    of every ``password=...`` of a connection string, replaced by ``mask``."""
    text = _URL_PASSWORD.sub(rf"\g<1>{mask}\g<2>", text)
    return _DSN_PASSWORD.sub(rf"\g<1>{mask}", text)
