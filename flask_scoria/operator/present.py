"""Turning read models into what the pages show: redacted JSON, previews, trees, times.

Pure functions, no HTTP and no SQL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from .._json import MAX_DEPTH, json_object, oversized
from ..errors import InvalidRunOptions
from ..readback import Event, Step
from ..redaction import is_display_secret, is_unsafe_key, mask_passwords, normalize_key
from ..statuses import EventType

REDACTED = "[REDACTED]"
PREVIEW_KEYS = 3
PREVIEW_BYTES = 80
#: The longest JSON value or traceback a page shows in full.
VALUE_CHARS = 16_384


# Refused in a handoff, but how every error envelope names its text: an operator needs it.
_EVIDENCE_KEYS = frozenset({"message"})


@lru_cache(maxsize=4096)
def is_secret_key(key: str, extra: frozenset[str] = frozenset()) -> bool:
    """Whether the value under ``key`` is hidden.

    Hidden are the keys a handoff refuses (credentials, transcripts, raw
    session state) except ``message``, the text of every error envelope, more
    credential names a handoff may carry (``pwd``, ``secret_key``,
    ``proxy_authorization``, ...), and ``extra`` names, normalized, matched as
    a whole name or as a ``_name`` suffix.
    """
    name = normalize_key(key)
    if is_unsafe_key(key) and name not in _EVIDENCE_KEYS:
        return True
    if is_display_secret(key):
        return True
    return any(name == word or name.endswith(f"_{word}") for word in extra)


def redact(value: Any, extra: frozenset[str] = frozenset()) -> Any:
    """A copy of a JSON value with secret-looking keys' values replaced, at any depth,
    and the passwords of URLs and connection strings in its texts masked."""
    if isinstance(value, Mapping):
        return {
            key: REDACTED if is_secret_key(str(key), extra) else redact(item, extra)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item, extra) for item in value]
    if isinstance(value, str):
        return mask_passwords(value, REDACTED)
    return value


#: Characters that reorder the text around them (embeddings, overrides, isolates, marks):
#: in a tool call they could show an approver ``moc.live@x`` for what reads ``x@evil.com``;
#: and characters that take no room (the zero-width space, the word joiner, the byte order
#: mark, the soft hyphen, fillers, deprecated format controls), which make
#: ``pay\u200bpal.com`` read as the real one, and the tag characters that carry text no
#: one sees (a way to smuggle instructions into a model's tool call). The zero-width
#: non-joiner and joiner (U+200C, U+200D) stay: Persian, Urdu, Indic scripts and emoji
#: sequences spell words with them.
_HIDDEN = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u180e\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064"
    "\u2066-\u206f\u3164\ufeff\uffa0\U000e0000-\U000e007f\U000e0100-\U000e01ef]"
)


def visible(text: str) -> str:
    """``text`` with its direction controls and invisible characters written out as
    ``\\u202e`` escapes (as a surrogate pair beyond U+FFFF, as JSON writes it)."""
    return _HIDDEN.sub(lambda found: _escape(found.group()), text)


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def masked(text: str | None) -> str | None:
    """Free text (a reason, a note) with the passwords of URLs and connection strings masked
    and its bidirectional controls visible."""
    return None if text is None else visible(mask_passwords(text, REDACTED))


def prompt(metadata: Mapping[str, Any], extra: frozenset[str] = frozenset()) -> str | None:
    """The run's prompt, ``metadata["payload"]["prompt"]`` (as the runs list searches
    it), redacted, its first ``VALUE_CHARS`` characters; ``None`` if it has no text there."""
    text = _redacted_prompt(metadata, extra)
    if not text.strip():
        return None
    return visible(text[:VALUE_CHARS])


def searched_prompt(metadata: Mapping[str, Any], extra: frozenset[str] = frozenset()) -> str:
    """The whole redacted prompt in lower case, as the runs list's search matches it."""
    return _redacted_prompt(metadata, extra).lower()


def _redacted_prompt(metadata: Mapping[str, Any], extra: frozenset[str]) -> str:
    """The prompt as :func:`redact` leaves it in ``metadata``, ``""`` if there is none.

    Only its path is redacted, not the whole metadata: a search does this for each
    run it reads.
    """
    payload = metadata.get("payload")
    text = payload.get("prompt") if isinstance(payload, Mapping) else None
    if not isinstance(text, str):
        return ""
    shown = redact({"payload": {"prompt": text}}, extra)["payload"]
    return str(shown["prompt"]) if isinstance(shown, Mapping) else ""


def pretty(value: object, extra: frozenset[str] = frozenset()) -> str:
    """Indented JSON of a redacted value, cut after ``VALUE_CHARS`` characters, its
    hidden characters visible (as the JSON escapes they are)."""
    text = _shown(value, extra)
    if len(text) <= VALUE_CHARS:
        return text
    return f"{text[:VALUE_CHARS]}\n… cut: {len(text):,} characters in all"


def editable(value: object, extra: frozenset[str] = frozenset()) -> str | None:
    """The JSON an operator edits, as :func:`pretty` shows it but never cut: ``None`` when
    it is longer than ``VALUE_CHARS`` characters (cut, it would not parse)."""
    text = _shown(value, extra)
    return text if len(text) <= VALUE_CHARS else None


def _shown(value: object, extra: frozenset[str]) -> str:
    return visible(json.dumps(redact(value, extra), indent=2, ensure_ascii=False, default=str))


def split_traceback(
    envelope: Mapping[str, Any], extra: frozenset[str] = frozenset()
) -> tuple[dict[str, Any], str | None]:
    """A redacted error envelope without its ``traceback``, and that text if it is one."""
    shown = redact(envelope, extra)
    return shown, _pop_traceback(shown)


def split_event_traceback(
    payload: Any, extra: frozenset[str] = frozenset()
) -> tuple[Any, str | None]:
    """An event's redacted payload without the traceback of the error it records (its own,
    or its ``error``'s), and that text if there is one."""
    shown = redact(payload, extra)
    if not isinstance(shown, dict):
        return shown, None
    error = shown.get("error")
    holder = error if "traceback" not in shown and isinstance(error, dict) else shown
    return shown, _pop_traceback(holder)


def _pop_traceback(shown: dict[str, Any]) -> str | None:
    """Take the text ``traceback`` out of a redacted ``shown``, cut after ``VALUE_CHARS``."""
    trace = shown.get("traceback")
    if not isinstance(trace, str):
        return None
    del shown["traceback"]
    return trace[:VALUE_CHARS]


class ArgumentsError(ValueError):
    """Edited approval arguments that are not a JSON object; the message says why."""


def parse_arguments(text: str, max_bytes: int) -> dict[str, Any]:
    """The JSON object an operator typed as an approval's arguments, checked as every
    stored payload is (its depth, its integers, its text, at most ``max_bytes``)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ArgumentsError(f"This is not valid JSON: {exc}.") from None
    except RecursionError:
        raise ArgumentsError(f"The JSON is nested deeper than {MAX_DEPTH} levels.") from None
    if not isinstance(value, dict):
        raise ArgumentsError('The arguments must be a JSON object, {"name": value, ...}.')
    try:
        arguments = json_object(value, what="The JSON", error=InvalidRunOptions)
    except InvalidRunOptions as exc:
        raise ArgumentsError(exc.message) from None
    too_large = oversized(arguments, max_bytes, "The JSON", "SCORIA_RESULT_MAX_BYTES")
    if too_large is not None:
        raise ArgumentsError(too_large)
    return arguments


def unredact(edited: Any, requested: Any, extra: frozenset[str] = frozenset()) -> Any:
    """``edited`` with each ``[REDACTED]`` left under a secret key, and each text whose
    password is still masked, back to its requested value.

    The form shows secrets redacted; an operator who does not touch one keeps it.
    Raises :class:`ArgumentsError` for a ``[REDACTED]`` that stands for a hidden value
    (a whole value, or a password in a text) where no requested value is behind it:
    moved to another key, or in a list whose length changed. The tool would be given
    the placeholder instead of the secret.
    """
    if isinstance(edited, str):
        if isinstance(requested, str) and edited == mask_passwords(requested, REDACTED):
            return requested
        if edited != requested and _hides_a_value(edited):
            raise ArgumentsError(
                f"{REDACTED} stands for a hidden value, which is kept only in its own place"
                " (the same key, in a list of the same length). Type the value itself there,"
                " or leave that part as it was requested."
            )
        return edited
    if isinstance(edited, list):
        same = isinstance(requested, list | tuple) and len(requested) == len(edited)
        return [
            unredact(item, requested[index] if same else None, extra)
            for index, item in enumerate(edited)
        ]
    if not isinstance(edited, dict):
        return edited
    asked = requested if isinstance(requested, Mapping) else {}
    restored = {}
    for key, value in edited.items():
        if value == REDACTED and key in asked and is_secret_key(key, extra):
            restored[key] = asked[key]
        else:
            restored[key] = unredact(value, asked.get(key), extra)
    return restored


def _hides_a_value(text: str) -> bool:
    """Whether ``[REDACTED]`` stands in ``text`` for a hidden value: the whole text, or
    where the password of a URL or a connection string is masked."""
    if REDACTED not in text:
        return False
    return text == REDACTED or mask_passwords(text.replace(REDACTED, "x"), REDACTED) == text


#: The payload keys that say who asked for an event and why, of the events the runtime
#: writes them in (a handler's own error, in another event, may hold any key).
_GIST_KEYS: dict[str, tuple[str | None, str | None]] = {
    EventType.APPROVAL_DECIDED: ("decided_by", None),
    EventType.RESUME_REQUESTED: ("requested_by", None),
    EventType.RETRY_REQUESTED: ("requested_by", None),
    EventType.RUN_CANCELLED: ("cancelled_by", "reason"),
    EventType.RUN_REJECTED: (None, "reason"),
}
#: The longest reason a timeline row shows; the whole one is in the payload below it.
GIST_BYTES = 300


def event_gist(
    event_type: str, payload: Any, extra: frozenset[str] = frozenset()
) -> tuple[str | None, str | None]:
    """Who asked for an event and why, as its redacted payload says; ``None`` where it
    does not say, or where the event is not one that records it."""
    who_key, why_key = _GIST_KEYS.get(event_type, (None, None))
    if not isinstance(payload, Mapping) or (who_key, why_key) == (None, None):
        return None, None
    shown = redact(payload, extra)
    who = shown.get(who_key) if who_key else None
    why = shown.get(why_key) if why_key else None
    return (
        who if isinstance(who, str) else None,
        truncate(why, GIST_BYTES) if isinstance(why, str) and why.strip() else None,
    )


#: The longest error message a run's header or a handoff's outcome shows; the step has it whole.
ERROR_BYTES = 200


def error_gist(envelope: Any, extra: frozenset[str] = frozenset()) -> tuple[str | None, str | None]:
    """An error envelope's ``type`` and the start of its ``message``, redacted, their hidden
    characters visible; ``None`` for either that it does not hold as text."""
    if not isinstance(envelope, Mapping):
        return None, None
    shown = redact({"type": envelope.get("type"), "message": envelope.get("message")}, extra)
    kind, message = shown["type"], shown["message"]
    return (
        visible(kind) if isinstance(kind, str) and kind.strip() else None,
        visible(truncate(message, ERROR_BYTES))
        if isinstance(message, str) and message.strip()
        else None,
    )


def truncate(text: str, limit: int = PREVIEW_BYTES) -> str:
    """``text`` if it fits in ``limit`` UTF-8 bytes, else its head and ``...``."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode(errors="ignore") + "..."


def preview(
    context: Mapping[str, Any] | None, extra: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """The first keys of a projected context, sorted, with short values."""
    return [(visible(key), visible(truncate(_text(item)))) for key, item in _first(context, extra)]


def previewed_whole(
    arguments: Mapping[str, Any] | None, extra: frozenset[str] = frozenset()
) -> bool:
    """Whether :func:`preview` shows every key and value of ``arguments`` uncut, as it
    shows them: redacted, their hidden characters escaped."""
    return len(arguments or {}) <= PREVIEW_KEYS and all(
        len(visible(key).encode()) <= PREVIEW_BYTES
        and len(visible(_text(value)).encode()) <= PREVIEW_BYTES
        for key, value in _first(arguments, extra)
    )


def _first(mapping: Mapping[str, Any] | None, extra: frozenset[str]) -> list[tuple[str, Any]]:
    """The first ``PREVIEW_KEYS`` keys of ``mapping``, sorted, with their redacted values,
    their texts cut (:func:`_cut`); the others' values are not looked at, however large."""
    if not mapping:
        return []
    keys = sorted(mapping)[:PREVIEW_KEYS]
    return list(redact({key: _cut(mapping[key]) for key in keys}, extra).items())


def _cut(value: Any) -> Any:
    """``value`` with each text longer than ``VALUE_CHARS`` characters cut there, far past
    what a preview shows. A quote and an ``@`` end a cut text, so that a password that
    the cut splits is still masked, of a URL or quoted in a connection string."""
    if isinstance(value, str):
        return value if len(value) <= VALUE_CHARS else value[:VALUE_CHARS] + "'@"
    if isinstance(value, Mapping):
        return {key: _cut(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_cut(item) for item in value]
    return value


def _text(value: object) -> str:
    """A string as it is, anything else as its JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class StepNode:
    """A step with its depth in the parent/child tree."""

    step: Step
    depth: int


@dataclass(frozen=True)
class FailedAttempt:
    """One failed attempt of a step, and when the next one fell due, if one did."""

    attempt: int
    #: ``step_failed``, ``step_timeout`` or ``lease_expired``.
    how: str
    at: datetime
    error: Mapping[str, Any]
    retry_at: datetime | None = None


#: Events that end an attempt in failure. A handler's failure that is retried has only its
#: ``retry_scheduled``; a timeout or a lost lease has its own event, which that follows.
_ATTEMPT_ENDS = frozenset({EventType.STEP_FAILED, EventType.STEP_TIMEOUT, EventType.LEASE_EXPIRED})
#: Events that begin an attempt, with its number in their payload.
_ATTEMPT_STARTS = frozenset({EventType.STEP_STARTED})


def failed_attempts(
    events: Sequence[Event], attempt: int, extra: frozenset[str] = frozenset()
) -> list[FailedAttempt]:
    """A step's failed attempts, oldest first, from its events in a run's timeline,
    their errors redacted.

    Each failure is numbered by the ``step_started`` event of its attempt; ``attempt``
    (the step's attempt now) numbers one whose start is older than the events given.
    """
    failed: list[FailedAttempt] = []
    current = attempt
    open_end: FailedAttempt | None = None
    for event in events:
        payload = event.payload if isinstance(event.payload, Mapping) else {}
        if event.event_type in _ATTEMPT_STARTS:
            current, open_end = _number(payload.get("attempt"), current), None
        elif event.event_type in _ATTEMPT_ENDS:
            open_end = FailedAttempt(
                current, event.event_type, event.created_at, redact(payload, extra)
            )
            failed.append(open_end)
        elif event.event_type == EventType.RETRY_REQUESTED:
            # An operator's retry names the attempt it starts: the open failure is the one before.
            if open_end is not None:
                number = _number(payload.get("attempt"), open_end.attempt + 1) - 1
                failed[-1] = replace(open_end, attempt=number)
            open_end = None
        elif event.event_type == EventType.RETRY_SCHEDULED:
            number = _number(payload.get("attempt"), current + 1) - 1
            due = _moment(payload.get("not_before"))
            if open_end is not None:  # the retry of the timeout or lost lease just told
                failed[-1] = replace(open_end, attempt=number, retry_at=due)
            else:
                error = payload.get("error")
                shown = redact(error, extra) if isinstance(error, Mapping) else {}
                failed.append(FailedAttempt(number, "step_failed", event.created_at, shown, due))
            open_end = None
    return failed


def _number(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _moment(text: object) -> datetime | None:
    """The time an ISO 8601 text names, or ``None``."""
    try:
        return datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        return None


def step_tree(steps: Sequence[Step]) -> list[StepNode]:
    """Steps in tree order (children under their parent, by sequence) with depths."""
    ids = {step.id for step in steps}
    children: dict[str | None, list[Step]] = {}
    for step in steps:
        parent = step.parent_step_id if step.parent_step_id in ids else None
        children.setdefault(parent, []).append(step)
    ordered: list[StepNode] = []
    stack = [(step, 0) for step in reversed(children.get(None, []))]
    while stack:
        step, depth = stack.pop()
        ordered.append(StepNode(step, depth))
        stack.extend((child, depth + 1) for child in reversed(children.get(step.id, [])))
    return ordered


def utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive time is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def iso_time(moment: datetime) -> str:
    """``2024-06-01T12:00:03.250Z``: the machine-readable UTC time of a ``<time>``."""
    return utc(moment).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def absolute_time(moment: datetime | None) -> str:
    """``2024-06-01 12:00:03 UTC``, or an em dash for no time."""
    return "—" if moment is None else utc(moment).strftime("%Y-%m-%d %H:%M:%S UTC")


def relative_time(moment: datetime | None, now: datetime) -> str:
    """``3 min ago`` for a moment before ``now``, ``in 3 min`` for one after it.

    Less than a second ahead counts as now: clocks of app and database differ a little.
    """
    if moment is None:
        return ""
    seconds = (now - utc(moment)).total_seconds()
    return f"in {span(-seconds)}" if seconds <= -1 else f"{span(seconds)} ago"


def span(seconds: float) -> str:
    """A short human length of time: ``850 ms``, ``42 s``, ``3 min``, ``2 h``, ``4 d``."""
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds // size:.0f} {unit}"
    return f"{seconds:.0f} s"


def duration(start: datetime | None, end: datetime | None, now: datetime) -> str:
    """How long a run took, or has been going on so far."""
    if start is None:
        return "—"
    return span(((end or now) - start).total_seconds()) + ("" if end else " so far")
