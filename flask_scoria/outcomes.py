"""What a step handler returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Succeed:
    """The step is done. A non-dict ``result`` is stored as ``{"result": value}``."""

    result: Any = None


@dataclass(frozen=True)
class WaitForApproval:
    """Pause the step and its run until an operator decides on ``tool_name``."""

    tool_name: str
    arguments: Mapping[str, Any] | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Fail:
    """The step failed. A str ``error`` is stored as ``{"message": error}``."""

    error: Any


@dataclass(frozen=True)
class Handoff:
    """Delegate bounded work to a new child step of the same run."""

    delegated_role_id: str
    delegated_kind: str
    handoff_input: Mapping[str, Any] | None = None
    projected_context: Mapping[str, Any] | None = None
    capability_tags: Sequence[str] = field(default_factory=tuple)


Outcome = Succeed | WaitForApproval | Fail | Handoff
