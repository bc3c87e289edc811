"""The assistant's mail sender: a deterministic STAND-IN that delivers nothing.

The ``send`` step hands it the approved answer with the step's
``idempotency_key``, as a real mail or messaging API takes an
``Idempotency-Key``: a step that runs again (its process died after sending,
before the outcome was written) sends the same key, and the provider returns
the first message instead of delivering a second one. This stand-in keeps
that promise in memory. To send for real, replace the body of :func:`send`
with your provider's client call and pass the key along; nothing else in the
example changes.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Message:
    """One delivered message."""

    message_id: str
    to: str
    text: str


#: What the stand-in delivered, by idempotency key.
outbox: dict[str, Message] = {}
_lock = threading.Lock()


def send(*, to: str, text: str, idempotency_key: str) -> str:
    """Deliver ``text`` to ``to`` once per ``idempotency_key``; the message's id."""
    with _lock:
        message = outbox.get(idempotency_key)
        if message is None:
            message = Message(f"msg-{uuid.uuid4().hex[:12]}", to, text)
            outbox[idempotency_key] = message
    return message.message_id
