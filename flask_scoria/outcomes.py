"""What a step handler returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import timedelta
from typing import Any


@dataclass(frozen=True)
class Succeed:
    """The step is done. A non-dict ``result`` is stored as ``{"result": value}``."""

    result: Any = None


@dataclass(frozen=True)
class WaitForApproval:
    """Pause the step and its run until an operator decides on ``tool_name``.

    With ``editable`` the approver may replace ``arguments`` (the handler reads
    them as ``step.approval.edited_arguments``). With ``expires_in`` (seconds
    or a ``timedelta``) an approval still pending that long after it was
    requested expires, failing the step; ``resume_run`` asks again.
    """

    tool_name: str
    arguments: Mapping[str, Any] | None = None
    reason: str | None = None
    _: KW_ONLY
    editable: bool = False
    expires_in: float | timedelta | None = None


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


@dataclass(frozen=True)
class Next:
    """The step is done; the run goes on with a new step of ``kind``.

    The next step's handler sees ``input`` as ``step.input``. It runs as
    ``role_id`` (default: this step's role), not before ``delay`` (seconds or
    a ``timedelta``) has passed.
    """

    kind: str
    input: Mapping[str, Any] | None = None
    _: KW_ONLY
    role_id: str | None = None
    delay: float | timedelta | None = None


Outcome = Succeed | WaitForApproval | Fail | Handoff | Next
#: What a handler returns: an outcome, a mapping (its result, as ``Succeed``'s) or ``None``.
HandlerResult = Outcome | Mapping[str, Any] | None
