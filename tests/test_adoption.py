"""The seed guide's verification checklist, steps 1 to 6, as one flow."""

from __future__ import annotations

import pytest
from flask import Flask

import flask_scoria as scoria
from flask_scoria import Succeed, WaitForApproval

pytestmark = pytest.mark.adoption


def wait_for_approval(step: scoria.StepView, run: scoria.RunSummary) -> WaitForApproval:
    return WaitForApproval("publish", {"env": "prod"}, reason="Need approval")


def succeed(step: scoria.StepView, run: scoria.RunSummary) -> Succeed:
    return Succeed({"step_id": step.id, "status": "ok"})


def operator_page(app: Flask, run_id: str) -> str:
    """The run's operator evidence page, as an operator of the run's tenant sees it."""
    response = app.test_client().get(f"/scoria/workflows/{run_id}")
    assert response.status_code == 200
    return response.get_data(as_text=True)


def test_identity_start_inspect_resume(app: Flask) -> None:
    app.extensions["scoria"].operator_scope(
        lambda: {"tenant_id": "public-tenant", "actor_id": "decision-maker"}
    )
    with app.app_context():
        identity = scoria.identity(
            {
                "actor_id": "public-actor",
                "tenant_id": "public-tenant",
                "session_id": "shared-session",
                "metadata": {"channel": "web"},
            }
        )
        # 1. start through the facade, with the prompt in runtime metadata
        started = scoria.start_run(
            identity,
            root_role_id="executor",
            initial_step={"sequence": 1, "kind": "approval", "role_id": "executor"},
            runtime={"metadata": {"payload": {"prompt": "Draft the release note"}}},
            handlers={"approval": wait_for_approval},
        )
        # 2. the stored run_id is the exact handle
        run_id = started.run_id
        assert started.session_id == "shared-session"
        # 3. read it back
        summary = scoria.get_run(run_id)
        assert summary.run_id == run_id
        assert summary.status == "waiting_for_approval"
        assert summary.awaiting_approval is True
        assert summary.metadata["payload"] == {"prompt": "Draft the release note"}
        # 4. the operator evidence page shows the same run
        page = operator_page(app, run_id)
        assert run_id in page
        assert 'data-status="waiting_for_approval"' in page
        assert 'href="/scoria/sessions/shared-session"' in page
        assert "publish" in page and "Need approval" in page
        # 5. approve, then resume the same run
        with pytest.raises(scoria.ApprovalPending):
            scoria.resume_run(run_id, handlers={"approval": succeed})
        scoria.approve_run(run_id, decided_by="decision-maker")
        resumed = scoria.resume_run(run_id, handlers={"approval": succeed})
        assert resumed.run_id == run_id
        assert resumed.status == "completed"
        assert 'data-status="completed"' in operator_page(app, run_id)
        detail = scoria.get_run_detail(run_id)
        assert [event.event_type for event in detail.events] == [
            "run_started",
            "step_started",
            "waiting_for_approval",
            "approval_decided",
            "resume_requested",
            "step_started",
            "step_completed",
            "run_completed",
        ]
        assert detail.approvals[0].decided_by == "decision-maker"
        assert detail.steps[0].result_envelope == {"step_id": detail.steps[0].id, "status": "ok"}
        # 6. same session, fresh run
        next_run = scoria.start_run(identity, root_role_id="executor")
        assert next_run.session_id == started.session_id
        assert next_run.run_id != run_id
        assert next_run.status == "completed"
        listed = scoria.list_runs_for_session("shared-session")
        assert [run.run_id for run in listed] == [next_run.run_id, run_id]
