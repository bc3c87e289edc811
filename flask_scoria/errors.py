"""Typed errors raised by flask-scoria.

Every error carries a stable ``code`` so that callers and HTTP layers can
branch on it without parsing messages.
"""

from __future__ import annotations

from typing import Any


class ScoriaError(Exception):
    """Base class of every error flask-scoria raises."""

    code: str = "scoria_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its fields rather than by calling ``__init__`` again, whose
        # arguments differ from class to class: a pickle (a process pool, a task
        # queue) or a copy keeps the type, the message and every field.
        return _unpickled, (type(self), self.args), self.__dict__


class RunNotFound(ScoriaError):
    """No run with that id is visible: unknown, malformed, or another tenant's."""

    code = "run_not_found"

    def __init__(self, run_id: object) -> None:
        super().__init__(f"No run found for run_id {short_repr(run_id)}.")
        #: The id as given, as text.
        self.run_id: str = run_id if isinstance(run_id, str) else safe_str(run_id, 200)


class RunNotResumable(ScoriaError):
    """The run is in a state that the requested transition cannot leave."""

    code = "run_not_resumable"

    def __init__(self, run_id: str, status: str, message: str | None = None) -> None:
        super().__init__(message or f"Run {run_id} cannot be resumed while it is {status!r}.")
        self.run_id = run_id
        self.status = status


class ApprovalPending(ScoriaError):
    """The run waits for an approval that nobody has decided yet."""

    code = "approval_pending"

    def __init__(self, run_id: str, approval_id: str) -> None:
        super().__init__(
            f"Run {run_id} is waiting for approval {approval_id}; approve or reject"
            " it before resuming."
        )
        self.run_id = run_id
        self.approval_id = approval_id


class ApprovalAlreadyDecided(ScoriaError):
    """The approval was decided before this call; ``decided_by`` won."""

    code = "approval_already_decided"

    def __init__(
        self, run_id: str, approval_id: str, decision: str, decided_by: str | None
    ) -> None:
        super().__init__(
            f"Approval {approval_id} of run {run_id} was already {decision} by {decided_by!r}."
        )
        self.run_id = run_id
        self.approval_id = approval_id
        self.decision = decision
        self.decided_by = decided_by


class NoPendingApproval(ScoriaError):
    """The run has no approval to decide."""

    code = "no_pending_approval"

    def __init__(
        self,
        run_id: str,
        approval_id: str | None = None,
        *,
        expired: bool = False,
        pending_id: str | None = None,
    ) -> None:
        shown = approval_id
        if approval_id is not None and not (len(approval_id) <= 80 and approval_id.isprintable()):
            shown = short_repr(approval_id)  # a caller's malformed id, as given
        if expired and pending_id is not None:
            super().__init__(
                f"Run {run_id} has no approval {shown} to decide: it expired undecided, and"
                f" the run asked again: approval {pending_id} waits for a decision."
            )
        elif expired:
            named = "its latest approval" if shown is None else f"approval {shown}"
            super().__init__(
                f"Run {run_id} has no approval to decide: {named} expired undecided;"
                " resume_run asks again."
            )
        elif approval_id is None:
            super().__init__(f"Run {run_id} has no approval to decide.")
        else:
            super().__init__(f"Run {run_id} has no approval {shown}.")
        self.run_id = run_id
        self.approval_id = approval_id
        #: Whether the approval expired before anyone decided it.
        self.expired = expired
        #: The approval the run asked for since, which waits for a decision, if any.
        self.pending_id = pending_id


class InvalidIdentity(ScoriaError):
    """An identity value cannot be used as an id, or its metadata is not JSON."""

    code = "invalid_identity"


class InvalidRunOptions(ScoriaError):
    """An argument of a runtime call is malformed."""

    code = "invalid_run_options"


class InvalidHandoff(ScoriaError):
    """A bounded handoff was rejected before anything was written.

    ``code`` names the rule that failed, for example
    ``"unsafe_projected_context"``; ``path`` points at the offending key when
    there is one.
    """

    def __init__(self, code: str, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.path = path


class InvalidDecision(ScoriaError):
    """A decision that does not fit its approval; nothing is written.

    For example, ``arguments=`` for an approval that is not ``editable``.
    """

    code = "invalid_decision"


class StorageError(ScoriaError):
    """The database could not be reached or stayed locked past its timeout.

    ``run_id`` names the run when it was already committed before the
    failure (``start_run`` wrote the run, then could not record its first
    step's outcome), or may have been (the connection dropped as
    ``start_run`` wrote it): look it up with ``get_run`` instead of starting
    another.
    ``hint`` says what to do about a known cause, without a server's connection
    details (host, port, user, database) that ``message`` may hold; a SQLite
    file it names.
    """

    code = "storage_unavailable"

    def __init__(self, message: str, *, run_id: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.hint = hint


def _unpickled(cls: type[ScoriaError], args: tuple[Any, ...]) -> ScoriaError:
    """An error of ``cls`` with ``args``, before pickle sets its fields."""
    return cls.__new__(cls, *args)


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters; never raises."""
    try:
        text = repr(value)
    except Exception:  # an int too long for text, or a repr that raises
        text = f"<{type(value).__name__} that cannot be shown>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def safe_str(value: object, limit: int) -> str:
    """``str(value)``, cut to ``limit`` characters; never raises."""
    try:
        text = str(value)
    except Exception:
        text = short_repr(value, limit)
    return text[:limit]
