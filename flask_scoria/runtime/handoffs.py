"""Bounded handoffs: validating them, and recording them in a run.

A handoff gives a child step a narrow, host-chosen ``projected_context``.
Keys that look like transcripts, provider or socket state, headers, cookies
or credentials are refused at any depth, and both payloads are capped in size.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from .. import signals
from .._ids import uuid7
from .._json import JSONObject, check_text, json_copy, oversized
from ..errors import InvalidHandoff
from ..redaction import is_unsafe_key
from ..statuses import EventType
from .arguments import MAX_KIND, require_name
from .steps import new_step_row
from .tables import Row
from .transaction import RunChange


@dataclass(frozen=True)
class HandoffSpec:
    """A validated handoff, ready to be written."""

    delegated_role_id: str
    delegated_kind: str
    handoff_input: JSONObject
    projected_context: JSONObject
    capability_tags: list[str]


def validate_handoff(
    *,
    delegated_role_id: object,
    delegated_kind: object,
    handoff_input: object,
    projected_context: object,
    capability_tags: object,
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
        limit=MAX_KIND,
    )
    payload = _payload(handoff_input, "handoff_input", "invalid_handoff_input")
    _cap_size(payload, "handoff_input", max_bytes)
    if isinstance(projected_context, Mapping):
        # Before the copy, which refuses any payload past 64 levels as invalid.
        _check_depth(projected_context, max_depth)
    context = _payload(projected_context, "projected_context", "invalid_projected_context")
    _check_keys(context, "")
    _cap_size(context, "projected_context", max_bytes)
    return HandoffSpec(role, kind, payload, context, _tags(capability_tags))


def _payload(value: object, what: str, code: str) -> JSONObject:
    if not isinstance(value, Mapping):
        raise InvalidHandoff(code, f"{what} must be a dict, not {type(value).__name__}.")
    copied: JSONObject = json_copy(
        value, what=what, error=lambda message: InvalidHandoff(code, message)
    )
    return copied


def _cap_size(value: JSONObject, what: str, max_bytes: int) -> None:
    too_large = oversized(value, max_bytes, what, "SCORIA_HANDOFF_MAX_BYTES")
    if too_large is not None:
        raise InvalidHandoff(f"{what}_too_large", too_large)


def _check_depth(value: object, max_depth: int, depth: int = 1) -> None:
    if isinstance(value, Mapping | list | tuple):
        if depth > max_depth:
            raise InvalidHandoff(
                "projected_context_too_deep",
                f"projected_context is nested deeper than {max_depth} levels"
                " (SCORIA_HANDOFF_MAX_DEPTH).",
            )
        items = value.values() if isinstance(value, Mapping) else value
        for item in items:
            _check_depth(item, max_depth, depth + 1)


def _check_keys(value: object, path: str) -> None:
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


#: The most capability tags one handoff may carry.
MAX_CAPABILITY_TAGS = 32


def _tags(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, Sequence)
        or len(value) > MAX_CAPABILITY_TAGS
        or not all(isinstance(tag, str) and tag.strip() and len(tag) <= 64 for tag in value)
    ):
        raise InvalidHandoff(
            "invalid_capability_tags",
            f"capability_tags must be a string or a list of at most {MAX_CAPABILITY_TAGS}"
            " non-empty strings of at most 64 characters.",
        )
    invalid = partial(InvalidHandoff, "invalid_capability_tags")
    return [check_text(tag.strip(), what="capability_tags", error=invalid) for tag in value]


def record_handoff(
    change: RunChange, parent_step_id: uuid.UUID, spec: HandoffSpec
) -> tuple[Row, Row]:
    """Add a handoff's queued child step and its record to the run, with their events.

    Returns the child step and the result envelope of the parent step, which
    the caller completes.
    """
    child = new_step_row(
        change.run_id,
        sequence=change.step_sequence() + 1,
        kind=spec.delegated_kind,
        role_id=spec.delegated_role_id,
        parent_step_id=parent_step_id,
        handoff_input=spec.handoff_input,
        projected_context=spec.projected_context,
    )
    handoff = {
        "id": uuid7(),
        "run_id": change.run_id,
        "parent_step_id": parent_step_id,
        "child_step_id": child["id"],
        "delegated_role_id": spec.delegated_role_id,
        "delegated_kind": spec.delegated_kind,
        "capability_tags": spec.capability_tags,
        "handoff_input": spec.handoff_input,
        "projected_context": spec.projected_context,
        "created_at": change.now,
    }
    change.add_step(child)
    change.add_handoff(handoff)
    payload = {
        "handoff_id": str(handoff["id"]),
        "child_step_id": str(child["id"]),
        "delegated_role_id": spec.delegated_role_id,
        "delegated_kind": spec.delegated_kind,
    }
    change.event(EventType.STEP_COMPLETED, parent_step_id)
    change.event(EventType.HANDOFF_CREATED, parent_step_id, payload)
    change.signal(signals.handoff_created, handoff=payload)
    result = {"handoff_id": payload["handoff_id"], "delegated_role_id": spec.delegated_role_id}
    return child, result
