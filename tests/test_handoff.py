"""Bounded handoffs: the seed's example, every rejection, and handoffs returned by handlers."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from _helpers import UNSAFE_NAMES, row_counts
from conftest import create_test_app
from flask import Flask

import flask_scoria as scoria
from flask_scoria import Handoff, Scoria, Succeed

IDENTITY = {
    "actor_id": "user-1",
    "tenant_id": "account-1",
    "session_id": "assistant-session",
    "metadata": {"channel": "web"},
}
HANDOFF_INPUT = {"brief": "Review the draft answer for policy and accuracy"}
CONTEXT = {"task": "policy-and-accuracy review", "draft_answer": "Our policy allows refunds."}

pytestmark = pytest.mark.usefixtures("app_ctx")


def review(step: scoria.StepView, run: scoria.RunSummary) -> Succeed:
    return Succeed(
        {"reviewed": step.projected_context["draft_answer"], "role": step.role_id}  # type: ignore[index]
    )


def handoff(**overrides: Any) -> scoria.RunSummary:
    arguments: dict[str, Any] = {
        "root_role_id": "planner",
        "delegated_kind": "review",
        "handoff_input": HANDOFF_INPUT,
        "projected_context": CONTEXT,
    }
    arguments.update(overrides)
    delegated_role_id = arguments.pop("delegated_role_id", "critic")
    return scoria.start_handoff_run(scoria.identity(IDENTITY), delegated_role_id, **arguments)


def assert_seed_evidence(detail: scoria.RunDetail, child_status: str) -> None:
    (delegated,) = detail.delegated_handoffs
    root, child = detail.steps
    assert (root.kind, root.role_id, root.status, root.sequence) == (
        "handoff",
        "planner",
        "completed",
        1,
    )
    assert delegated.parent_step_id == root.id
    assert delegated.parent_step_sequence == 1
    assert delegated.parent_step_kind == "handoff"
    assert delegated.parent_role_id == "planner"
    assert (delegated.delegated_role_id, delegated.delegated_kind) == ("critic", "review")
    assert delegated.child_step_id == child.id
    assert (delegated.child_step_sequence, delegated.child_step_kind) == (2, "review")
    assert delegated.child_role_id == "critic"
    assert delegated.child_status == child_status
    assert delegated.handoff_input == HANDOFF_INPUT
    assert delegated.projected_context == CONTEXT
    assert child.handoff_input == HANDOFF_INPUT
    assert child.projected_context == CONTEXT
    assert child.parent_step_id == root.id
    assert detail.handoffs[0].id == delegated.handoff_id


def test_a_handoff_run_needs_room_for_two_steps(database_uri: str, tmp_path: Path) -> None:
    app = create_test_app(database_uri, tmp_path / "one-step", SCORIA_MAX_STEPS=1)
    with app.app_context():
        with pytest.raises(scoria.InvalidRunOptions, match="SCORIA_MAX_STEPS is 1"):
            handoff()
        assert scoria.list_runs_for_session("assistant-session") == []
    app.extensions["scoria"].storage(app).engine.dispose()


@pytest.mark.runtime_to_handoff
def test_seed_handoff_example_with_review_handler() -> None:
    started = scoria.start_run(scoria.identity(IDENTITY), root_role_id="executor")
    handoff_run = handoff(handlers={"review": review})
    assert handoff_run.session_id == started.session_id == "assistant-session"
    assert handoff_run.run_id != started.run_id
    assert handoff_run.status == "completed"
    detail = scoria.get_run_detail(handoff_run.run_id)
    assert_seed_evidence(detail, "completed")
    assert detail.steps[1].result_envelope == {
        "reviewed": CONTEXT["draft_answer"],
        "role": "critic",
    }
    assert [event.event_type for event in detail.events] == [
        "run_started",
        "step_completed",
        "handoff_created",
        "step_started",
        "step_completed",
        "run_completed",
    ]
    assert scoria.get_run_detail(started.run_id).delegated_handoffs == []
    listed = scoria.list_runs_for_session("assistant-session")
    assert [run.run_id for run in listed] == [handoff_run.run_id, started.run_id]


def delegated_evidence(app: Flask, run_id: str) -> str:
    """The Delegated Evidence section of the run's operator page, for the run's tenant."""
    app.extensions["scoria"].operator_scope(
        lambda: {"tenant_id": IDENTITY["tenant_id"], "actor_id": "ops"}
    )
    page = app.test_client().get(f"/scoria/workflows/{run_id}")
    assert page.status_code == 200
    section = page.get_data(as_text=True).split('id="delegated-evidence"')[1]
    return section.split("</section>")[0]


@pytest.mark.runtime_to_handoff
def test_operator_page_shows_the_same_runs_delegated_evidence(app: Flask) -> None:
    started = scoria.start_run(scoria.identity(IDENTITY), root_role_id="executor")
    handoff_run = handoff(handlers={"review": review})
    section = delegated_evidence(app, handoff_run.run_id)
    assert "Delegated Evidence" in section
    assert "planner" in section and "critic" in section and "review" in section
    assert 'data-status="completed"' in section
    for value in (*CONTEXT.values(), HANDOFF_INPUT["brief"]):
        assert value in section
    assert "No Delegated Handoffs Recorded" in delegated_evidence(app, started.run_id)


@pytest.mark.runtime_to_handoff
def test_seed_handoff_example_without_handler_queues_the_child() -> None:
    handoff_run = handoff()
    assert handoff_run.status == "running"
    assert_seed_evidence(scoria.get_run_detail(handoff_run.run_id), "queued")
    dispatched = scoria.dispatch(handoff_run.run_id, handlers={"review": review})
    assert (dispatched.run_id, dispatched.status) == (handoff_run.run_id, "completed")
    assert_seed_evidence(scoria.get_run_detail(handoff_run.run_id), "completed")


@pytest.mark.runtime_to_handoff
def test_registered_review_handler_runs_the_child(runtime: Scoria) -> None:
    runtime.handler("review")(review)
    assert handoff(capability_tags=["read-only"]).status == "completed"
    (record,) = scoria.list_runs_for_session("assistant-session")
    detail = scoria.get_run_detail(record.run_id)
    assert detail.delegated_handoffs[0].capability_tags == ["read-only"]


def nested(levels: int) -> dict[str, Any]:
    """A dict nested ``levels`` deep: ``nested(2) == {"level": {"level": "leaf"}}``."""
    value: Any = "leaf"
    for _ in range(levels):
        value = {"level": value}
    return value  # type: ignore[no-any-return]


UNSAFE_KEYS = [
    *UNSAFE_NAMES,
    "request_headers",
    "user_transcript",
    "chat_messages",
    "auth_cookies",
    "app_secrets",
    "openai_provider_session",
    "live_socket",
    "github_token",
    "client_secret",
    "db_password",
    "stripe_api_key",
    "x_apikey",
    "\uff54\uff4f\uff4b\uff45\uff4e",  # full-width "token"
    "\uff21\uff30\uff29_\uff2b\uff25\uff39",  # full-width "API_KEY"
    "session_cookie",
    "auth_header",
    "aws_credentials",
    "provider_session_id",
    "socket_id",
    "requestHeaders",
    "conversationHistory",
    "request-headers",
    "API-Key",
    "apiKey",
    "accessToken",
    "Authorization",
    "ProviderSessionId",
    "HTTPHeaders",
]


@pytest.mark.runtime_to_handoff
@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"delegated_role_id": ""}, "invalid_delegated_role_id"),
        ({"delegated_role_id": "   "}, "invalid_delegated_role_id"),
        ({"delegated_role_id": None}, "invalid_delegated_role_id"),
        ({"root_role_id": ""}, "invalid_root_role_id"),
        ({"root_role_id": None}, "invalid_root_role_id"),
        ({"delegated_kind": ""}, "invalid_delegated_kind"),
        ({"delegated_kind": None}, "invalid_delegated_kind"),
        ({"handoff_input": "brief"}, "invalid_handoff_input"),
        ({"handoff_input": None}, "invalid_handoff_input"),
        ({"handoff_input": ["brief"]}, "invalid_handoff_input"),
        ({"projected_context": "context"}, "invalid_projected_context"),
        ({"projected_context": None}, "invalid_projected_context"),
        ({"projected_context": {"when": object()}}, "invalid_projected_context"),
        ({"projected_context": {"transcript": "..."}}, "unsafe_projected_context"),
        ({"projected_context": {"request_headers": {}}}, "unsafe_projected_context"),
        (
            {"projected_context": {"a": {"b": {"conversation_history": []}}}},
            "unsafe_projected_context",
        ),
        ({"projected_context": {"x": {"provider_session": {}}}}, "unsafe_projected_context"),
        ({"projected_context": {"session": {"id": "s"}}}, "unsafe_projected_context"),
        (
            {"projected_context": {"items": [{"ok": 1}, {"transcript": "..."}]}},
            "unsafe_projected_context",
        ),
        ({"projected_context": {"rows": [[{"apiKey": "k"}]]}}, "unsafe_projected_context"),
        ({"handoff_input": {"brief": "x" * 70_000}}, "handoff_input_too_large"),
        ({"projected_context": {"draft": "x" * 70_000}}, "projected_context_too_large"),
        ({"projected_context": nested(17)}, "projected_context_too_deep"),
        ({"projected_context": {"list": [nested(16)]}}, "projected_context_too_deep"),
        ({"projected_context": {"tuple": (nested(80),)}}, "projected_context_too_deep"),
        ({"capability_tags": [f"tag-{n}" for n in range(33)]}, "invalid_capability_tags"),
    ],
)
def test_rejected_handoffs_write_nothing(app: Flask, overrides: dict[str, Any], code: str) -> None:
    engine = app.extensions["scoria"].storage(app).engine
    before = row_counts(engine)
    with pytest.raises(scoria.InvalidHandoff) as info:
        handoff(handlers={"review": review}, **overrides)
    assert info.value.code == code
    assert row_counts(engine) == before
    assert scoria.list_runs_for_session("assistant-session") == []


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_every_unsafe_key_is_rejected(key: str) -> None:
    with pytest.raises(scoria.InvalidHandoff) as info:
        handoff(projected_context={"safe": {"deeper": [{key: "value"}]}})
    assert info.value.code == "unsafe_projected_context"
    assert info.value.path is not None and info.value.path.endswith(key)
    assert scoria.list_runs_for_session("assistant-session") == []


def test_safe_lookalikes_and_caps_at_the_limit_are_accepted() -> None:
    context = {
        "max_tokens": 512,
        "prompt_tokens": 100,
        "session_id": "s-1",
        "draft_answer": "text",
        "tokenizer": "bpe",
        "historyless": True,
        "headline": "News",
        "secretary": "Ann",
        "deep": nested(15),
    }
    tags = [f"{n:02}" + "t" * 62 for n in range(32)]
    run = handoff(projected_context=context, capability_tags=tags)
    (delegated,) = scoria.get_run_detail(run.run_id).delegated_handoffs
    assert (delegated.projected_context, list(delegated.capability_tags)) == (context, tags)
    assert handoff(projected_context=nested(16)).status == "running"


@pytest.mark.runtime_to_handoff
def test_handler_returning_a_handoff_creates_the_child() -> None:
    def plan(step: scoria.StepView, run: scoria.RunSummary) -> Handoff:
        return Handoff("critic", "review", HANDOFF_INPUT, CONTEXT, ("read-only",))

    run = scoria.start_run(
        scoria.identity(IDENTITY),
        root_role_id="planner",
        initial_step={"kind": "plan"},
        handlers={"plan": plan},
    )
    assert run.status == "running"
    detail = scoria.get_run_detail(run.run_id)
    (delegated,) = detail.delegated_handoffs
    assert (delegated.parent_step_kind, delegated.child_status) == ("plan", "queued")
    assert delegated.projected_context == CONTEXT
    assert delegated.capability_tags == ["read-only"]
    done = scoria.dispatch(run.run_id, handlers={"review": review})
    assert done.status == "completed"
    child = scoria.get_run_detail(run.run_id).steps[1]
    assert (child.kind, child.role_id, child.status) == ("review", "critic", "completed")


def test_a_child_whose_kind_runs_elsewhere_is_queued_for_a_worker(runtime: Scoria) -> None:
    """Queued with the time it falls due, as every queued step is, so that a worker that
    registers its kind claims it."""

    def plan(step: scoria.StepView, run: scoria.RunSummary) -> Handoff:
        return Handoff("critic", "review", HANDOFF_INPUT, CONTEXT)

    run = scoria.start_run(
        scoria.identity(IDENTITY), initial_step={"kind": "plan"}, handlers={"plan": plan}
    )
    child = scoria.get_run_detail(run.run_id).steps[1]
    assert (child.kind, child.status) == ("review", "queued")
    assert scoria.get_run(run.run_id).current_step_id == child.id
    runtime.handler("review")(review)
    assert [done.run_id for done in scoria.dispatch_queued()] == [run.run_id]
    assert scoria.get_run(run.run_id).status == "completed"


def test_handler_returning_an_unsafe_handoff_fails_its_step() -> None:
    def leak(step: scoria.StepView, run: scoria.RunSummary) -> Handoff:
        return Handoff("critic", "review", {}, {"chatHistory": ["hi"]})

    run = scoria.start_run(
        scoria.identity(IDENTITY), initial_step={"kind": "plan"}, handlers={"plan": leak}
    )
    assert run.status == "failed"
    detail = scoria.get_run_detail(run.run_id)
    (step,) = detail.steps
    assert step.error_envelope is not None
    assert step.error_envelope["type"] == "invalid_handoff"
    assert step.error_envelope["code"] == "unsafe_projected_context"
    assert detail.handoffs == [] and detail.delegated_handoffs == []


class Unreadable(Mapping[str, Any]):
    """A payload that says it has a key, then raises when walked (a closed backend's view)."""

    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("backend gone")

    def __len__(self) -> int:
        return 1


@pytest.mark.parametrize("field", ["handoff_input", "projected_context"])
def test_a_handoff_whose_payload_cannot_be_read_fails_its_step(field: str) -> None:
    def lazy(step: scoria.StepView, run: scoria.RunSummary) -> Handoff:
        return Handoff("critic", "review", **{field: Unreadable()})  # type: ignore[arg-type]

    run = scoria.start_run(
        scoria.identity(IDENTITY), initial_step={"kind": "plan"}, handlers={"plan": lazy}
    )
    assert run.status == "failed"
    (step,) = scoria.get_run_detail(run.run_id).steps
    assert step.error_envelope == {
        "type": "invalid_handler_result",
        "message": "The handler's Handoff could not be read: RuntimeError: backend gone",
    }


def test_runs_without_handoffs_have_no_delegated_evidence() -> None:
    run = scoria.start_run(
        scoria.identity(IDENTITY),
        initial_step={"kind": "work"},
        handlers={"work": lambda step, run: None},
    )
    detail = scoria.get_run_detail(run.run_id)
    assert detail.delegated_handoffs == []
    assert detail.handoffs == []
