"""Checking the arguments of the facade verbs before anything is written."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from enum import Enum
from typing import Any, Final

from .._ids import is_id_text, parse_uuid
from .._json import ErrorFactory, check_text, json_object, oversized
from ..errors import InvalidIdentity, InvalidRunOptions, RunNotFound
from ..identity import Identity, carries_no_ids, normalize_id
from ..identity import identity as normalize_identity
from ..statuses import StepStatus

MAX_TEXT = 10_000


class Unset(Enum):
    """The type of :data:`UNSET`."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


#: "Not given": a verb called without ``tenant_id=`` applies no tenant guard.
UNSET: Final = Unset.UNSET

#: The tenant a run must belong to (``None``: runs without a tenant), or :data:`UNSET`.
TenantGuard = str | None | Unset


def run_uuid(run_id: object) -> uuid.UUID:
    parsed = parse_uuid(run_id)
    if parsed is None:
        raise RunNotFound(run_id)
    return parsed


#: The largest value of an integer column (PostgreSQL's ``integer``): the bound of a
#: number a caller passes that a statement compares or limits with.
LARGEST_INT = 2**31 - 1
#: The largest first step sequence; handoffs number their steps after it.
MAX_SEQUENCE = 1_000_000


def int_in_range(value: object, name: str, maximum: int | None = None) -> int:
    """``value`` if it is an int from 1 to ``maximum`` (no bound when ``None``)."""
    too_big = maximum is not None and isinstance(value, int) and value > maximum
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or too_big:
        bound = "a positive int" if maximum is None else f"an int from 1 to {maximum}"
        raise InvalidRunOptions(f"{name} must be {bound}.")
    return value


def approval_key(approval_id: object) -> uuid.UUID | str | None:
    """The approval a decision is bound to: its id, the text that names none, or ``None``."""
    if approval_id is None:
        return None
    if not isinstance(approval_id, str | uuid.UUID):
        raise InvalidRunOptions("approval_id must be the id of one of the run's approvals.")
    return parse_uuid(approval_id) or str(approval_id)


def tenant_guard(tenant_id: object, identity: object) -> TenantGuard:
    """The tenant a run must belong to, or ``UNSET`` for no guard.

    An ``identity`` that names no ids at all (a string, a number, a list) is
    refused: as a guard it would quietly stand for "no tenant".
    """
    if identity is not None:
        if carries_no_ids(identity):
            raise InvalidIdentity(
                "identity must be an Identity, a mapping or an object with ids,"
                f" not {type(identity).__name__}; for one tenant, pass tenant_id=."
            )
        from_identity = normalize_identity(identity).tenant_id
        if tenant_id is not UNSET and normalize_id(tenant_id, "tenant_id") != from_identity:
            raise InvalidRunOptions("tenant_id and identity name different tenants.")
        return from_identity
    if tenant_id is UNSET:
        return UNSET
    return normalize_id(tenant_id, "tenant_id")


def optional_text(value: object, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise InvalidRunOptions(f"{name} must be a string of at most {MAX_TEXT} characters.")
    return check_text(value, what=name, error=InvalidRunOptions)


def decider(value: object, name: str) -> str:
    try:
        who = normalize_id(value, name)
    except Exception as exc:
        raise InvalidRunOptions(str(exc)) from None
    if who is None:
        raise InvalidRunOptions(f"{name} must name who acts, as a non-empty string.")
    return who


#: The longest step kind: handlers, ``initial_step``, ``Next`` and handoffs name one.
MAX_KIND = 64


def require_name(value: object, what: str, *, error: ErrorFactory, limit: int = 255) -> str:
    """``value`` as a stripped, printable, non-blank name of at most ``limit`` characters.

    Anything else raises ``error`` with a message naming ``what``.
    """
    if not isinstance(value, str) or not value.strip():
        raise error(f"{what} must be a non-empty string.")
    text = value.strip()
    if len(text) > limit or not text.isprintable():
        raise error(f"{what} must be printable and at most {limit} characters long.")
    return text


def idempotency_name(value: object, error: ErrorFactory) -> str | None:
    """An idempotency key: ``None``, or a string of 1 to 255 characters, without control
    characters or line breaks."""
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 255 or not is_id_text(value):
        raise error(
            "idempotency_key must be a string of 1 to 255 characters, without control"
            " characters or line breaks."
        )
    return value


def role_name(value: object, name: str) -> str:
    return require_name(value, name, error=InvalidRunOptions)


def initial_step_spec(value: object, root_role_id: str, max_bytes: int) -> dict[str, Any] | None:
    """The checked ``initial_step`` of :func:`start_run`; its ``input`` is capped at
    ``max_bytes`` serialized, as a ``Next`` step's is (``SCORIA_HANDOFF_MAX_BYTES``)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidRunOptions("initial_step must be a dict with at least a 'kind'.")
    unknown = set(value) - {"kind", "role_id", "sequence", "status", "input"}
    if unknown:
        raise InvalidRunOptions(f"initial_step has unknown keys: {sorted(map(str, unknown))}.")
    if "kind" not in value:
        raise InvalidRunOptions("initial_step needs a 'kind', which selects its handler.")
    kind = require_name(value["kind"], "initial_step kind", error=InvalidRunOptions, limit=MAX_KIND)
    role_id = role_name(value.get("role_id", root_role_id), "initial_step role_id")
    sequence = int_in_range(value.get("sequence", 1), "initial_step sequence", MAX_SEQUENCE)
    if value.get("status", StepStatus.QUEUED) != StepStatus.QUEUED:
        raise InvalidRunOptions("initial_step status can only be 'queued'.")
    given = value.get("input")
    step_input = None
    if given is not None:
        step_input = json_object(given, what="initial_step input", error=InvalidRunOptions)
        too_large = oversized(
            step_input, max_bytes, "initial_step input", "SCORIA_HANDOFF_MAX_BYTES"
        )
        if too_large is not None:
            raise InvalidRunOptions(too_large)
    return {"kind": kind, "role_id": role_id, "sequence": sequence, "input": step_input}


def run_metadata(runtime: object, ident: Identity, max_bytes: int) -> dict[str, Any]:
    """The metadata to store on a new run: ``runtime["metadata"]``, with the identity's
    under ``"identity"``.

    Larger than ``max_bytes`` serialized, it is refused.
    """
    if runtime is None:
        runtime = {}
    if not isinstance(runtime, Mapping):
        raise InvalidRunOptions("runtime must be a dict such as {'metadata': {...}}.")
    unknown = set(runtime) - {"metadata"}
    if unknown:
        raise InvalidRunOptions(f"runtime has unknown keys: {sorted(map(str, unknown))}.")
    given = runtime.get("metadata")
    metadata = json_object(
        {} if given is None else given, what="runtime metadata", error=InvalidRunOptions
    )
    if ident.metadata:
        if "identity" in metadata:
            raise InvalidRunOptions(
                "runtime metadata has an 'identity' key, where the identity's metadata is"
                " stored: rename the key, or pass the identity without metadata."
            )
        metadata["identity"] = dict(ident.metadata)
    too_large = oversized(metadata, max_bytes, "runtime metadata", "SCORIA_MAX_METADATA_BYTES")
    if too_large is not None:
        raise InvalidRunOptions(too_large + " Store large payloads elsewhere and keep a reference.")
    return metadata
