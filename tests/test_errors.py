"""The typed errors keep their type and fields wherever they travel."""

from __future__ import annotations

import copy
import pickle

import pytest

import flask_scoria as scoria
from flask_scoria.errors import ScoriaError

ERRORS = [
    scoria.RunNotFound("no-such-run"),
    scoria.RunNotResumable("r1", "completed"),
    scoria.ApprovalPending("r1", "a1"),
    scoria.ApprovalAlreadyDecided("r1", "a1", "approved", "reviewer"),
    scoria.NoPendingApproval("r1", "a1", expired=True),
    scoria.InvalidIdentity("actor_id is blank."),
    scoria.InvalidRunOptions("limit must be 1 or more."),
    scoria.InvalidHandoff("unsafe_projected_context", "no secrets", path="token"),
    scoria.InvalidDecision("not editable"),
    scoria.StorageError("down", run_id="r1", hint="start the database"),
]


@pytest.mark.parametrize("error", ERRORS, ids=lambda error: type(error).__name__)
@pytest.mark.parametrize("travel", ["pickle", "copy"])
def test_an_error_keeps_its_type_message_and_fields(error: ScoriaError, travel: str) -> None:
    """A process pool or a task queue pickles what a call raised; the caller branches
    on its type and ``code`` and reads its fields."""
    came_back = pickle.loads(pickle.dumps(error)) if travel == "pickle" else copy.copy(error)
    assert type(came_back) is type(error)
    assert str(came_back) == str(error) and came_back.message == error.message
    assert came_back.code == error.code
    assert vars(came_back) == vars(error)
