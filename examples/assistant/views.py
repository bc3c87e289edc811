"""The assistant's pages: sign-in, the conversation, one run, review and resume.

Each view follows the guide: identity from the session, then the
``flask_scoria`` facade; the exact ``run_id`` is kept in the session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import wraps
from typing import Any, NamedTuple

from flask import (
    Blueprint,
    abort,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.exceptions import BadRequest
from werkzeug.wrappers import Response

import flask_scoria as scoria

from .extensions import db, runtime
from .handlers import ANSWER_STEPS
from .models import Conversation, User

bp = Blueprint("assistant", __name__)

#: The longest question a member can ask, and the longest draft answer, in characters.
PROMPT_LIMIT = 2000
DRAFT_LIMIT = 5000
#: The longest ask-form key accepted; the form gets a shorter one when it is shown.
FORM_KEY_LIMIT = 64
#: What the member's run page calls each kind of step.
STEP_NAMES = {
    "draft": "The assistant drafts the answer",
    "approval": "An operator approves it",
    "send": "The answer is sent to you",
    "review": "The critic reviews the draft",
}


# -- who is signed in ------------------------------------------------------------


@bp.before_app_request
def load_user() -> None:
    actor_id = session.get("actor_id")
    g.current_user = db.session.get(User, actor_id) if actor_id else None


def is_operator() -> bool:
    """Whether the signed-in user may open the operator pages."""
    user: User | None = g.get("current_user")
    return user is not None and user.role == "operator"


@runtime.operator_scope
def operator_scope() -> dict[str, str] | None:
    """Operator pages are open to signed-in users with the operator role, in their tenant."""
    if not is_operator():
        return None
    return {"tenant_id": g.current_user.tenant_id, "actor_id": g.current_user.id}


def login_required(view: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if g.current_user is None:
            return redirect(url_for("assistant.login"))
        return view(*args, **kwargs)

    return wrapped


def current_identity() -> scoria.Identity:
    """The request's identity: the signed-in user, their tenant, the conversation."""
    return scoria.identity(
        {
            "actor_id": session["actor_id"],
            "tenant_id": session["tenant_id"],
            "session_id": session["assistant_session_id"],
            "metadata": {"channel": "web"},
        }
    )


# -- CSRF for the app's own forms -------------------------------------------------


@bp.app_context_processor
def template_helpers() -> dict[str, Any]:
    return {
        "csrf_token": csrf_token,
        "operator_url": operator_url,
        "is_operator": is_operator,
        "prompt_limit": PROMPT_LIMIT,
    }


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return str(session["csrf"])


@bp.before_request
def check_csrf() -> None:
    if request.method == "POST":
        sent = request.form.get("csrf_token", "")
        expected = str(session.get("csrf", ""))
        if not sent or not hmac.compare_digest(sent.encode(), expected.encode()):
            raise FormExpired()


class FormExpired(BadRequest):
    """A form came without this session's CSRF token: stale, or from another site."""

    description = (
        "This form was opened before you signed in or out, or on another site, so it was not"
        " sent. Go back, reload the page and submit it again."
    )


def operator_url(run_id: str) -> str:
    """The operator evidence page of one run."""
    return f"{runtime.settings().url_prefix}/workflows/{run_id}"


# -- sign-in ----------------------------------------------------------------------


@bp.get("/login")
def login() -> str:
    users = db.session.scalars(db.select(User).order_by(User.tenant_id, User.id)).all()
    return render_template("assistant/login.html", users=users)


@bp.post("/login")
def login_post() -> Response:
    user = db.session.get(User, request.form.get("user_id", ""))
    if user is None:
        abort(400, "Pick a user from the list.")
    session.clear()
    session.update(actor_id=user.id, tenant_id=user.tenant_id)
    latest = db.session.scalars(
        db.select(Conversation)
        .where(Conversation.user_id == user.id)
        .order_by(Conversation.created_at.desc())
        .limit(1)
    ).first()
    if latest is None:
        _open_conversation(user)
    else:  # signing in again goes on where the member left off
        session["assistant_session_id"] = latest.id
    return redirect(url_for("assistant.conversation"))


@bp.post("/logout")
def logout() -> Response:
    session.clear()
    return redirect(url_for("assistant.login"))


def _open_conversation(user: User) -> None:
    conversation = Conversation.start(user)
    db.session.commit()
    session["assistant_session_id"] = conversation.id


# -- the conversation -----------------------------------------------------------


@bp.get("/")
@login_required
def conversation() -> str:
    """The conversation page: its timeline of runs, newest first, and the prompt form."""
    who = current_identity()
    runs = scoria.list_runs_for_session(who.session_id, identity=who)
    return render_template(
        "assistant/conversation.html",
        conversation=db.session.get(Conversation, who.session_id),
        runs=runs,
        last_run_id=session.get("last_scoria_run_id"),
        form_key=secrets.token_urlsafe(16),
    )


@bp.post("/conversations")
@login_required
def new_conversation() -> Response:
    _open_conversation(g.current_user)
    flash("New conversation: its turns share a new session_id.")
    return redirect(url_for("assistant.conversation"))


@bp.post("/assistant/runs")
@login_required
def create_run() -> Response:
    """Controller-triggered start: the answer is drafted, then waits for approval.

    A second submit of the same form (a double click, a reload) gets the first
    run back instead of starting another.
    """
    prompt = request.form.get("prompt", "").strip()
    if not prompt:
        flash("Type a question first.")
        return redirect(url_for("assistant.conversation"))
    if len(prompt) > PROMPT_LIMIT:
        flash(
            f"Your question is {len(prompt)} characters long; the limit is {PROMPT_LIMIT}."
            " Shorten it and ask again."
        )
        return redirect(url_for("assistant.conversation"))
    if "\x00" in prompt:
        flash("Your question holds a NUL character, which cannot be stored. Ask it without.")
        return redirect(url_for("assistant.conversation"))
    started = scoria.start_run(
        current_identity(),
        root_role_id="executor",
        initial_step={"sequence": 1, "kind": ANSWER_STEPS[0], "role_id": "executor"},
        runtime={"metadata": {"payload": {"prompt": prompt}}},
        idempotency_key=_start_key(prompt),
    )
    _remember_turn(started.run_id, title=prompt)
    session["last_scoria_run_id"] = started.run_id
    return redirect(url_for("assistant.show_run", run_id=started.run_id))


def _start_key(prompt: str) -> str:
    """The start's idempotency key: this member, this conversation, this form, this
    question.

    The form's hidden ``form_key`` is made when the form is shown, so a double
    submit carries the same one. The question's digest is part of the key, so
    that a form shown again by the Back button starts a new run for a new
    question; the conversation is, so that an old form sent again in a new
    conversation asks there, instead of bringing back the old conversation's run.
    """
    form_key = request.form.get("form_key", "")
    if not 0 < len(form_key) <= FORM_KEY_LIMIT:
        raise BadRequest("The form has no valid key. Reload the page and ask again.")
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:16]
    conversation = session["assistant_session_id"]
    return f"ask:{session['actor_id']}:{conversation}:{form_key}:{digest}"


#: How much of a question titles and lists show.
TITLE_LENGTH = 80


@bp.app_template_filter("shorten")
def shorten(text: str, length: int = TITLE_LENGTH) -> str:
    """``text`` on one line, cut to ``length`` characters with an ellipsis."""
    line = " ".join(text.split())
    return line if len(line) <= length else line[: length - 1].rstrip() + "…"


def _remember_turn(run_id: str, *, title: str) -> None:
    conversation = db.session.get(Conversation, session["assistant_session_id"])
    if conversation is not None:
        if conversation.last_run_id is None:
            conversation.title = shorten(title, TITLE_LENGTH)
        conversation.last_run_id = run_id
        db.session.commit()


@bp.get("/assistant/runs/<run_id>")
@login_required
def show_run(run_id: str) -> str:
    """One run, read back through the facade with the user's tenant as guard."""
    detail = scoria.get_run_detail(run_id, tenant_id=session["tenant_id"])
    _members_own(detail.summary)
    sent = _result_with(detail, "answer")
    return render_template(
        "assistant/run.html",
        detail=detail,
        run=detail.summary,
        prompt=detail.summary.metadata.get("payload", {}).get("prompt"),
        progress=_progress(detail),
        sent=sent,
        edited=any(
            a.status == "approved" and a.edited_arguments is not None for a in detail.approvals
        ),
        review=_result_with(detail, "review").get("review"),
        pending=[a for a in detail.approvals if a.status == "pending"],
        rejected=[a for a in detail.approvals if a.status == "rejected"],
        expired=_expired(detail),
        failure=_failure(detail),
        resumable=_resumable(detail),
        needs_review="answer" in sent and needs_bounded_review(str(sent["answer"])),
        final=detail.summary.status.finished,
    )


@bp.get("/assistant/runs/<run_id>/status.json")
@login_required
def run_status(run_id: str) -> dict[str, Any]:
    """What the run page polls: it reloads when ``updated_at`` moves."""
    run = _members_own(scoria.get_run(run_id, tenant_id=session["tenant_id"]))
    return {
        "run_id": run.run_id,
        "status": run.status,
        "updated_at": run.updated_at.isoformat(),
        "final": run.status.finished,
    }


def _members_own(run: scoria.RunSummary) -> scoria.RunSummary:
    """``run`` if the signed-in user started it, or is an operator (of its tenant: the
    tenant guard keeps other tenants out). A colleague's questions stay private: another
    member's run is not found, as another tenant's is."""
    if run.actor_id != g.current_user.id and not is_operator():
        raise scoria.RunNotFound(run.run_id)
    return run


def _result_with(detail: scoria.RunDetail, key: str) -> Mapping[str, Any]:
    """The result of the run's first step whose result has ``key``; empty if none has."""
    for step in detail.steps:
        result = step.result_envelope or {}
        if result.get(key) is not None:
            return result
    return {}


class Progress(NamedTuple):
    """One row of the run page's steps: a step of the run, or one still to come."""

    sequence: int | None
    name: str
    role_id: str
    status: str
    attempt: int


def _progress(detail: scoria.RunDetail) -> list[Progress]:
    """The run's steps and, while a question is on its way, the steps still to come."""
    rows = [
        Progress(
            step.sequence,
            STEP_NAMES.get(step.kind, step.kind),
            step.role_id,
            step.status,
            step.attempt,
        )
        for step in detail.steps
    ]
    kinds = tuple(step.kind for step in detail.steps)
    if not detail.summary.status.finished and kinds == ANSWER_STEPS[: len(kinds)]:
        rows += [
            Progress(None, STEP_NAMES[kind], "", "to do", 0) for kind in ANSWER_STEPS[len(kinds) :]
        ]
    return rows


def _expired(detail: scoria.RunDetail) -> scoria.Approval | None:
    """The approval whose expiry failed the run, if that is why it failed."""
    last = detail.approvals[-1] if detail.approvals else None
    if detail.summary.status == "failed" and last is not None and last.status == "expired":
        return last
    return None


@bp.app_template_filter("utc")
def utc(moment: datetime) -> str:
    """A moment as the run page shows it, in UTC."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _failure(detail: scoria.RunDetail) -> Mapping[str, Any] | None:
    """The error of the step that failed the run, if it failed."""
    if detail.summary.status != "failed":
        return None
    failed = [step for step in detail.steps if step.status == "failed" and step.error_envelope]
    return failed[-1].error_envelope if failed else None


#: Failures that resuming would only repeat: the approved answer itself was unusable.
FINAL_FAILURES = frozenset({"invalid_answer"})


def _resumable(detail: scoria.RunDetail) -> bool:
    status = detail.summary.status
    if status == "failed":
        return (_failure(detail) or {}).get("type") not in FINAL_FAILURES
    return status == "waiting_for_approval" and detail.approvals[-1].status == "approved"


@bp.post("/assistant/runs/<run_id>/resume")
@login_required
def resume(run_id: str) -> Response:
    """Resume after approval, by the exact run_id; the run keeps its id."""
    _members_own(scoria.get_run(run_id, tenant_id=session["tenant_id"]))
    try:
        scoria.resume_run(run_id, tenant_id=session["tenant_id"])
    except scoria.ApprovalPending:
        flash("This run still waits for an operator's approval.")
    except scoria.RunNotResumable as exc:
        flash(f"Nothing to resume: the run is {exc.status}.")
    return redirect(url_for("assistant.show_run", run_id=run_id))


# -- bounded review ----------------------------------------------------------------


def needs_bounded_review(draft_answer: str) -> bool:
    """The app's escalation policy: drafts that mention a policy get reviewed."""
    return "policy" in draft_answer.lower()


@bp.post("/assistant/drafts")
@login_required
def submit_draft() -> Response:
    """Record the draft as a turn; branch to a bounded review when it needs one."""
    draft_answer = request.form.get("draft_answer", "").strip()
    if not draft_answer:
        abort(400, "The draft answer is empty.")
    # Checked before the turn is recorded, so a refused draft leaves no run behind.
    if len(draft_answer) > DRAFT_LIMIT:
        abort(400, f"The draft answer is longer than {DRAFT_LIMIT} characters.")
    if "\x00" in draft_answer:
        abort(400, "The draft answer holds a NUL character, which cannot be stored.")
    identity = current_identity()
    started = scoria.start_run(identity, root_role_id="executor")
    session["last_scoria_run_id"] = started.run_id
    if not needs_bounded_review(draft_answer):
        return redirect(url_for("assistant.show_run", run_id=started.run_id))
    handoff_run = scoria.start_handoff_run(
        identity,
        "critic",
        root_role_id="planner",
        delegated_kind="review",
        handoff_input={"brief": "Review the draft answer for policy and accuracy"},
        projected_context={"task": "policy-and-accuracy review", "draft_answer": draft_answer},
    )
    session["last_scoria_handoff_run_id"] = handoff_run.run_id
    _remember_turn(handoff_run.run_id, title=draft_answer)
    return redirect(url_for("assistant.show_run", run_id=handoff_run.run_id))


# -- errors --------------------------------------------------------------------------


@bp.errorhandler(BadRequest)
def bad_request(exc: BadRequest) -> tuple[str, int]:
    title = "The form expired" if isinstance(exc, FormExpired) else "That did not work"
    return render_template("assistant/error.html", title=title, message=exc.description), 400


@bp.errorhandler(scoria.RunNotFound)
def run_not_found(exc: scoria.RunNotFound) -> tuple[str, int]:
    page = render_template(
        "assistant/error.html", title="Run not found", message=exc.message, code=exc.code
    )
    return page, 404


@bp.errorhandler(scoria.ScoriaError)
def scoria_error(exc: scoria.ScoriaError) -> tuple[str, int]:
    page = render_template(
        "assistant/error.html", title="That did not work", message=exc.message, code=exc.code
    )
    return page, 409
