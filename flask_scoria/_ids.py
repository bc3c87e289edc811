"""Ids: time-ordered UUIDs, reading them, and the text an id given by a host may hold."""

from __future__ import annotations

import os
import threading
import time
import unicodedata
import uuid

_lock = threading.Lock()
_last = (0, 0)


def uuid7() -> uuid.UUID:
    """A UUIDv7 whose order follows creation time, strictly within a process."""
    global _last
    with _lock:
        millis = time.time_ns() // 1_000_000
        last_millis, counter = _last
        if millis <= last_millis:
            millis, counter = last_millis, counter + 1
            if counter > 0xFFF:
                millis, counter = millis + 1, 0
        else:
            counter = int.from_bytes(os.urandom(2), "big") & 0x3FF
        _last = (millis, counter)
    tail = int.from_bytes(os.urandom(8), "big") & 0x3FFFFFFFFFFFFFFF
    value = (millis << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | tail
    return uuid.UUID(int=value)


def parse_uuid(value: object) -> uuid.UUID | None:
    """The UUID ``value`` names, or ``None`` when it is not one."""
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


#: Unicode categories no id may hold: control characters, lone surrogates (no database
#: stores them), and line and paragraph separators.
_NOT_IN_IDS = frozenset({"Cc", "Cs", "Zl", "Zp"})


def is_id_text(text: str) -> bool:
    """Whether ``text`` may be an id: spaces of any script (a no-break space in a company's
    name) and joiners (in an emoji, in Persian) may, control characters may not."""
    return text.isprintable() or not any(unicodedata.category(char) in _NOT_IN_IDS for char in text)
