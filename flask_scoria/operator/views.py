"""The operator pages: HTTP only; reads and writes go through the runtime."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial
from typing import Any

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.exceptions import HTTPException, ServiceUnavailable
from werkzeug.wrappers import Response as BaseResponse

from .. import runtime
from ..errors import RunNotFound, ScoriaError, StorageError
from ..state import app_state
from ..statuses import ApprovalStatus, RunStatus, StepStatus
from . import actions, present
from .access import check_csrf, csrf_token, current_scope, require_scope, security_headers

bp = Blueprint(
    "scoria",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)
bp.before_request(require_scope)
bp.after_app_request(security_headers)

_NOTE_LIMIT = 2000


@bp.context_processor
def _page_helpers() -> dict[str, Any]:
    state = app_state()
    extra = frozenset(state.settings.redact_keys)
    now = datetime.now(UTC)
    return {
        "csrf_token": csrf_token,
        "scope": g.get("_scoria_scope"),
        "pretty": partial(present.pretty, extra=extra),
        "preview": partial(present.preview, extra=extra),
        "absolute_time": present.absolute_time,
        "relative_time": partial(present.relative_time, now=now),
        "duration": partial(present.duration, now=now),
        "registered_kinds": frozenset(state.registry.handlers),
        "RunStatus": RunStatus,
        "StepStatus": StepStatus,
        "ApprovalStatus": ApprovalStatus,
        "page_url": _page_url,
        "AWAITING_RESUME": AWAITING_RESUME,
    }


#: The runs list's ``status`` filter for approved runs waiting for ``resume_run``.
AWAITING_RESUME = "awaiting_resume"
#: The query arguments a page link carries over: the runs list's filters.
_FILTER_ARGS = ("status", "session", "actor", "role")


def _page_url(after: str | None) -> str:
    """This page's URL with the same filters, starting after ``after``."""
    args: dict[str, Any] = {
        name: request.args[name] for name in _FILTER_ARGS if request.args.get(name)
    }
    args.update(request.view_args or {}, after=after)
    return url_for(request.endpoint or "scoria.runs", **args)


@bp.get("/")
def index() -> BaseResponse:
    """The runs list is the operator's home."""
    return redirect(url_for("scoria.runs"))


@bp.get("/workflows")
def runs() -> str:
    """The tenant's runs, newest first, filtered and paginated."""
    status = _arg("status")
    awaiting_resume = status == AWAITING_RESUME
    if status is not None and status not in tuple(RunStatus) and not awaiting_resume:
        abort(400, description=f"There is no run status {status!r}; pick one from the list.")
    filters = runtime.RunFilters(
        status=None if awaiting_resume else status,
        session_id=_arg("session"),
        actor_id=_arg("actor"),
        root_role_id=_arg("role"),
        awaiting_resume=awaiting_resume,
    )
    tenant = current_scope().tenant_id
    page = runtime.list_runs(filters, tenant=tenant, after=_cursor(), metadata=False)
    return render_template("scoria/runs.html", page=page, filters=filters)


@bp.get("/sessions/<path:session_id>")
def session_runs(session_id: str) -> str:
    """One host session's runs as a timeline, newest first."""
    filters = runtime.RunFilters(session_id=session_id)
    tenant = current_scope().tenant_id
    page = runtime.list_runs(filters, tenant=tenant, after=_cursor(), metadata=False)
    return render_template("scoria/session.html", page=page, session_id=session_id)


@bp.get("/approvals")
def approvals() -> str:
    """The tenant's approvals waiting for a decision."""
    page = runtime.pending_approvals(current_scope().tenant_id, _cursor())
    return render_template("scoria/approvals.html", page=page)


@bp.get("/workflows/<run_id>")
def run(run_id: str) -> str:
    """Everything recorded for one run."""
    detail = runtime.get_run_detail(run_id, tenant_id=current_scope().tenant_id)
    return render_template(
        "scoria/run.html",
        detail=detail,
        run=detail.summary,
        tree=present.step_tree(detail.steps),
        pending=[item for item in detail.approvals if item.status == ApprovalStatus.PENDING],
        decided=[item for item in detail.approvals if item.status != ApprovalStatus.PENDING],
        kinds={step.id: step.kind for step in detail.steps},
    )


@bp.get("/workflows/<run_id>/status.json")
def run_status(run_id: str) -> Response:
    """What the run page polls to know when to reload."""
    summary = runtime.run_status(run_id, tenant_id=current_scope().tenant_id)
    return jsonify(
        run_id=summary.run_id,
        status=summary.status,
        updated_at=summary.updated_at.isoformat(),
        terminal=summary.status.finished,
    )


@bp.post("/workflows/<run_id>/approve")
def approve(run_id: str) -> BaseResponse:
    """Approve the pending approval as the operator (and resume when possible)."""
    check_csrf()
    return _decide(run_id, actions.approve, "Approved.")


@bp.post("/workflows/<run_id>/reject")
def reject(run_id: str) -> BaseResponse:
    """Reject the pending approval as the operator."""
    check_csrf()
    return _decide(run_id, actions.reject, "Rejected.")


def _decide(run_id: str, action: Any, done: str) -> BaseResponse:
    approval_id = request.form.get("approval_id", "").strip()
    if not approval_id:
        abort(400, description="The form names no approval. Reload the page and decide again.")
    text = request.form.get("note", "").strip()[:_NOTE_LIMIT] or None
    try:
        summary = action(run_id, current_scope(), approval_id, text)
    except RunNotFound:
        raise
    except ScoriaError as exc:
        flash(exc.message, "error")
    else:
        if summary.status == RunStatus.WAITING_FOR_APPROVAL:
            flash(f"{done} The run continues when your app calls resume_run.", "ok")
        else:
            flash(f"{done} The run is now {summary.status.replace('_', ' ')}.", "ok")
    return redirect(url_for("scoria.run", run_id=run_id), code=303)


@bp.errorhandler(RunNotFound)
def _run_not_found(_exc: RunNotFound) -> tuple[str, int]:
    return render_template("scoria/not_found.html"), 404


@bp.errorhandler(StorageError)
def _storage_error(exc: StorageError) -> tuple[str, int]:
    # The message may name the database's host, port, user and name: the log has it.
    current_app.logger.error("flask-scoria operator page: %s", exc.message)
    description = "The flask-scoria database is unavailable. " + (
        exc.hint or "The app's log has the details."
    )
    return render_template("scoria/error.html", error=ServiceUnavailable(description)), 503


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> tuple[str, int]:
    status = exc.code or 500
    if status == 404:
        return render_template("scoria/not_found.html"), 404
    if status == 403:
        return render_template("scoria/forbidden.html"), 403
    return render_template("scoria/error.html", error=exc), status


def _arg(name: str) -> str | None:
    return request.args.get(name, "").strip() or None


def _cursor() -> runtime.Cursor | None:
    text = request.args.get("after")
    if not text:
        return None
    cursor = runtime.Cursor.decode(text)
    if cursor is None:
        abort(400, description="The page link is malformed; start again from the first page.")
    return cursor
