"""Time-ordered ids."""

from __future__ import annotations

import os
import threading
import time
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
