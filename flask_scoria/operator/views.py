"""The operator pages: HTTP only; reads and writes go through the runtime."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, ServiceUnavailable
from werkzeug.wrappers import Response as BaseResponse

from .. import runtime
from .._json import storable_text
from ..errors import (
    ApprovalAlreadyDecided,
    NoPendingApproval,
    RunNotFound,
    ScoriaError,
    StorageError,
)
from ..readback import Event, RunSummary, Step
from ..state import app_state
from ..statuses import ApprovalStatus, EventType, RunStatus, StepStatus
from . import actions, present
from .access import (
    OperatorScope,
    check_csrf,
    csrf_token,
    current_scope,
    require_scope,
    security_headers,
)

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
#: The navigation counts pending approvals up to this many, then shows ``99+``.
_NAV_COUNT_LIMIT = 99
#: The run page shows this many of a run's latest steps, events and approvals...
_SHOWN = 25
#: ... and this many handoffs: each is a card of its own.
_HANDOFFS_SHOWN = 10
#: What a decision form sends as ``return_to`` to come back to the inbox.
_INBOX = "approvals"
#: The longest text a prompt search takes (SQLite refuses patterns of 50,000 bytes).
_PROMPT_SEARCH_CHARS = 1000
#: How many pages a prompt search reads on while redaction leaves none of their runs.
_SEARCH_PAGES = 5


def _redact_keys() -> frozenset[str]:
    return frozenset(app_state().settings.redact_keys)


@bp.context_processor
def _page_helpers() -> dict[str, Any]:
    state = app_state()
    extra = _redact_keys()
    now = datetime.now(UTC)
    return {
        "csrf_token": csrf_token,
        "scope": g.get("_scoria_scope"),
        "pretty": partial(present.pretty, extra=extra),
        "editable": partial(present.editable, extra=extra),
        "failed_attempts": partial(present.failed_attempts, extra=extra),
        "masked": present.masked,
        "visible": present.visible,
        "preview": partial(present.preview, extra=extra),
        "previewed_whole": partial(present.previewed_whole, extra=extra),
        "prompt": partial(present.prompt, extra=extra),
        "session_url": _session_url,
        "split_traceback": partial(present.split_traceback, extra=extra),
        "split_event_traceback": partial(present.split_event_traceback, extra=extra),
        "event_gist": partial(present.event_gist, extra=extra),
        "error_gist": partial(present.error_gist, extra=extra),
        "is_past": lambda moment: moment is not None and present.utc(moment) <= now,
        "absolute_time": present.absolute_time,
        "iso_time": present.iso_time,
        "relative_time": partial(present.relative_time, now=now),
        "duration": partial(present.duration, now=now),
        "registered_kinds": frozenset(state.registry.handlers),
        "worker_kinds": runtime.queued_kinds(),
        "RunStatus": RunStatus,
        "StepStatus": StepStatus,
        "ApprovalStatus": ApprovalStatus,
        "page_url": _page_url,
        "pending_count": _pending_count,
        "home_url": _home_url(),
        "AWAITING_RESUME": AWAITING_RESUME,
    }


#: The runs list's ``status`` filter for approved runs waiting for ``resume_run``.
AWAITING_RESUME = "awaiting_resume"


def _pending_count() -> str | None:
    """How many approvals wait for the operator's tenant, as the navigation shows it."""
    scope = g.get("_scoria_scope")
    if scope is None:
        return None
    try:
        waiting = runtime.count_pending_approvals(scope.tenant_id, up_to=_NAV_COUNT_LIMIT + 1)
    except StorageError:
        # The page that explains the storage error must still render.
        return None
    return f"{_NAV_COUNT_LIMIT}+" if waiting > _NAV_COUNT_LIMIT else str(waiting)


def _home_url() -> str | None:
    """``SCORIA_HOME_URL``, the host app's page the navigation links back to, if usable.

    Only a path or an http(s) URL is linked, never another scheme, nor one with
    whitespace or control characters, which browsers drop from a URL
    (``/\t/evil.example`` would lead off the site). A path is the app's own, under the
    root the app is served at (a ``SCRIPT_NAME`` mount, ``X-Forwarded-Prefix``), as the
    other links are.
    """
    url = current_app.config.get("SCORIA_HOME_URL")
    if not isinstance(url, str) or any(char.isspace() or not char.isprintable() for char in url):
        return None
    if url.startswith(("https://", "http://")):
        return url
    if url[:1] == "/" and url[1:2] not in ("/", "\\"):
        return request.script_root + url
    return None


#: The query arguments a page link carries over: the runs list's filters.
_FILTER_ARGS = ("status", "session", "actor", "role", "id", "from", "until", "prompt")


def _page_url(after: str | None) -> str:
    """This page's URL with the same filters, starting after ``after``."""
    args: dict[str, Any] = {
        name: request.args[name] for name in _FILTER_ARGS if request.args.get(name)
    }
    args.update(request.view_args or {}, after=after)
    return url_for(request.endpoint or "scoria.runs", **args)


def _session_url(session_id: str) -> str:
    """The link to a session's page, or to the runs list filtered by the session when
    its id holds empty, ``.`` or ``..`` segments, which a browser or the router would
    resolve into another address."""
    if any(part in ("", ".", "..") for part in session_id.split("/")):
        return url_for("scoria.runs", session=session_id)
    return url_for("scoria.session_runs", session_id=session_id)


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
        run_id_prefix=_arg("id"),
        created_from=_day("from"),
        created_until=_day("until", after=True),
        prompt_contains=_arg("prompt"),
    )
    searched = filters.prompt_contains
    if searched is not None and len(searched) > _PROMPT_SEARCH_CHARS:
        abort(400, description=f"Search a prompt for {_PROMPT_SEARCH_CHARS} characters at most.")
    tenant = current_scope().tenant_id
    if searched is None:
        page = runtime.list_runs(
            filters, tenant=tenant, after=_cursor(), metadata=False, notice=True
        )
    else:
        page = _prompts_shown_with(filters, tenant, searched)
    awaiting = _awaiting_resume(page, every=awaiting_resume)
    return render_template("scoria/runs.html", page=page, filters=filters, awaiting=awaiting)


@bp.get("/sessions/<path:session_id>")
def session_runs(session_id: str) -> str:
    """One host session's runs as a timeline, newest first."""
    filters = runtime.RunFilters(session_id=session_id)
    tenant = current_scope().tenant_id
    page = runtime.list_runs(filters, tenant=tenant, after=_cursor(), metadata=False, notice=True)
    # Shown, and linked, without what no stored id holds (a NUL): it matches no run anyway.
    shown = storable_text(session_id)
    awaiting = _awaiting_resume(page)
    return render_template("scoria/session.html", page=page, session_id=shown, awaiting=awaiting)


def _prompts_shown_with(
    filters: runtime.RunFilters, tenant: str, text: str
) -> runtime.Page[RunSummary]:
    """A page of the runs whose prompt holds ``text`` as the operator sees it, redacted.

    The database searches the stored prompts: what redaction hides must not match, or
    a search would tell it one guess at a time. A page may then hold fewer runs; one
    left with none reads on, a few pages at most, so that older matches stay in reach.
    """
    extra = _redact_keys()
    needle = text.lower()
    after = _cursor()
    for _ in range(_SEARCH_PAGES):
        page = runtime.list_runs(
            filters, tenant=tenant, after=after, metadata="prompt", notice=True
        )
        rows = [run for run in page.rows if needle in present.searched_prompt(run.metadata, extra)]
        if rows or page.next_cursor is None:
            break
        after = runtime.Cursor.decode(page.next_cursor)
    return runtime.Page(rows, page.next_cursor)


def _awaiting_resume(page: runtime.Page[RunSummary], *, every: bool = False) -> frozenset[str]:
    """The runs of ``page`` approved and waiting for ``resume_run`` (``every`` waiting one)."""
    waiting = [run.run_id for run in page.rows if run.status == RunStatus.WAITING_FOR_APPROVAL]
    if every:
        return frozenset(waiting)
    return runtime.runs_awaiting_resume(waiting, tenant=current_scope().tenant_id)


@bp.get("/approvals")
def approvals() -> str:
    """The tenant's approvals waiting for a decision."""
    page = runtime.pending_approvals(current_scope().tenant_id, _cursor())
    return render_template("scoria/approvals.html", page=page)


@bp.get("/approvals/status.json")
def approvals_status() -> Response:
    """What every operator page polls: the navigation's count of approvals waiting, and
    the newest of them, by which the inbox tells that it changed."""
    newest = runtime.pending_approvals(current_scope().tenant_id, limit=1).rows
    return jsonify(waiting=_pending_count(), newest=str(newest[0].approval.id) if newest else None)


@bp.get("/workflows/<run_id>")
def run(run_id: str) -> str:
    """One run: its latest steps, events and handoffs, older ones a page at a time."""
    return _run_page(run_id)


@dataclass(frozen=True)
class ArgumentsForm:
    """Edited approval arguments that were refused, shown again next to the field."""

    approval_id: str
    text: str
    error: str
    #: The note typed with them, kept too.
    note: str = ""


def _kind(run_id: str, step_id: str) -> str | None:
    head = runtime.step_head(run_id, step_id)
    return None if head is None else head.kind


def _run_page(run_id: str, refused: ArgumentsForm | None = None) -> str:
    scope = current_scope()
    window = runtime.get_run_window(
        run_id,
        tenant_id=scope.tenant_id,
        limit=_SHOWN,
        handoff_limit=_HANDOFFS_SHOWN,
        steps_before=_sequence("steps_before"),
        events_before=_sequence("events_before"),
        handoffs_after=_cursor("handoffs_after"),
    )
    pending = [item for item in window.approvals if item.status == ApprovalStatus.PENDING]
    failed = (
        runtime.step_head(run_id, window.summary.current_step_id)
        if window.summary.status == RunStatus.FAILED
        else None
    )
    return render_template(
        "scoria/run.html",
        window=window,
        run=window.summary,
        tree=present.step_tree(window.steps),
        pending=pending,
        decided=[item for item in window.approvals if item.status != ApprovalStatus.PENDING],
        kinds={item.step_id: _kind(run_id, item.step_id) for item in pending},
        failed=failed,
        failed_step=_failed_step(run_id, window) if failed else None,
        refused=refused,
        cancelled=_cancelling(run_id, window),
    )


def _latest(run_id: str, window: runtime.RunWindow, position: str) -> runtime.RunWindow:
    """``window``, or the run's newest one when the page shows an older part of a list
    (``position`` is its query argument)."""
    if not request.args.get(position):
        return window
    return runtime.get_run_window(run_id, tenant_id=current_scope().tenant_id, limit=1)


def _failed_step(run_id: str, window: runtime.RunWindow) -> Step | None:
    """The failed step of a failed run, whose error the page's header tells: among the
    latest steps, read again when the page shows older ones."""
    current = window.summary.current_step_id
    steps = _latest(run_id, window, "steps_before").steps
    return next((step for step in steps if step.id == current), None)


def _cancelling(run_id: str, window: runtime.RunWindow) -> Event | None:
    """The event that cancelled the run, if it was cancelled: the last of its timeline,
    read again when the page shows older events."""
    if window.summary.status != RunStatus.CANCELLED:
        return None
    events = _latest(run_id, window, "events_before").events
    found = [event for event in events if event.event_type == EventType.RUN_CANCELLED]
    return found[-1] if found else None


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
def approve(run_id: str) -> ResponseReturnValue:
    """Approve the pending approval as the operator (and resume when possible).

    An editable approval's form sends its arguments as JSON: a refused text
    is shown again in the form, and nothing is decided.
    """
    check_csrf()
    text = request.form.get("arguments")
    if text is None:
        return _decide(run_id, actions.approve, "approved", "Approved.")
    approval_id = request.form.get("approval_id", "").strip()
    shown = runtime.get_approval(run_id, approval_id, tenant_id=current_scope().tenant_id)
    requested = shown.arguments if shown else None
    try:
        edited = present.parse_arguments(text, app_state().settings.result_max_bytes)
        edited = present.unredact(edited, requested, _redact_keys())
    except present.ArgumentsError as exc:
        form = ArgumentsForm(approval_id, text, str(exc), request.form.get("note", ""))
        return _run_page(run_id, form), 422
    arguments = None if _same_json(edited, requested or {}) else edited
    approve = partial(actions.approve, arguments=arguments)
    return _decide(run_id, approve, "approved", "Approved.", arguments)


@bp.post("/workflows/<run_id>/reject")
def reject(run_id: str) -> BaseResponse:
    """Reject the pending approval as the operator."""
    check_csrf()
    return _decide(run_id, actions.reject, "rejected", "Rejected.")


@bp.post("/workflows/<run_id>/cancel")
def cancel(run_id: str) -> BaseResponse:
    """Cancel, as the operator, a run that has not ended."""
    check_csrf()
    reason = request.form.get("reason", "").strip()[:_NOTE_LIMIT] or None
    return _act(run_id, partial(actions.cancel, reason=reason), "Cancelled.")


@bp.post("/workflows/<run_id>/retry")
def retry(run_id: str) -> BaseResponse:
    """Retry, as the operator, the failed step of a ``failed`` run."""
    check_csrf()
    attempt = request.form.get("attempt", type=int)
    if attempt is None:
        abort(400, description="The form names no attempt. Reload the page and retry again.")
    return _act(run_id, partial(actions.retry, attempt=attempt), "Retried.")


@bp.post("/workflows/<run_id>/resume")
def resume(run_id: str) -> BaseResponse:
    """Resume, as the operator, a run whose approval was granted but never resumed."""
    check_csrf()
    return _act(run_id, actions.retry, "Resumed.")


@bp.get("/workflows/<run_id>/<any(approve, reject, cancel, retry, resume):_action>")
def action_page(run_id: str, _action: str) -> BaseResponse:
    """An action's address opened again (a reload after a refused form): the run's page."""
    return redirect(url_for("scoria.run", run_id=run_id), code=303)


@bp.route("/<path:_unknown>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def unknown(_unknown: str) -> ResponseReturnValue:
    """An address under the operator pages that names none: their own "not found" page;
    405 where a page of theirs answers the address, but not this method."""
    if request.method != "GET":
        answered = _methods_answered()
        if answered:
            raise MethodNotAllowed(valid_methods=answered)
    return render_template("scoria/not_found.html", no_page=True), 404


def _methods_answered() -> list[str]:
    """The methods another route answers at this request's address."""
    adapter = current_app.url_map.bind_to_environ(request.environ)
    answered = []
    for method in ("GET", "POST"):
        try:
            endpoint, _ = adapter.match(method=method)
        except HTTPException:
            continue
        if endpoint != request.endpoint:
            answered.append(method)
    return answered


def _act(
    run_id: str, action: Callable[[str, OperatorScope], RunSummary], done: str
) -> BaseResponse:
    """Run an operator action on the run, then go back to its page with the outcome."""
    try:
        summary = action(run_id, current_scope())
    except RunNotFound:
        raise
    except ScoriaError as exc:
        flash(exc.message, "error")
    else:
        flash(f"{done} The run is now {summary.status.replace('_', ' ')}.", "ok")
    return redirect(url_for("scoria.run", run_id=run_id), code=303)


#: What an operator is told who decides an approval that expired meanwhile.
_EXPIRED = (
    "This approval expired before anyone decided it, and the run failed. Ask for approval"
    " again to have it decided anew."
)
#: ... and who decides one that expired while the run has since asked again.
_EXPIRED_ASKED_AGAIN = (
    "The approval you decided had expired, so nothing was decided. The run has asked"
    " again since: its newer approval, on this page, waits for a decision."
)


def _decide(
    run_id: str, action: Any, decision: str, done: str, arguments: object = None
) -> BaseResponse:
    """Decide the approval the form names; ``arguments`` are the edited ones sent."""
    approval_id = request.form.get("approval_id", "").strip()
    if not approval_id:
        abort(400, description="The form names no approval. Reload the page and decide again.")
    text = request.form.get("note", "").strip()[:_NOTE_LIMIT] or None
    scope = current_scope()
    inbox = request.form.get("return_to") == _INBOX
    back = redirect(_inbox_page() if inbox else url_for("scoria.run", run_id=run_id), code=303)
    try:
        summary = action(run_id, scope, approval_id, text)
    except ApprovalAlreadyDecided as exc:
        stored = runtime.get_approval(run_id, approval_id, tenant_id=scope.tenant_id)
        if (
            exc.decided_by != scope.actor_id
            or exc.decision != decision
            or stored is None
            or stored.note != text
            or not _same_json(stored.edited_arguments, arguments)
        ):
            said = f"It was already {exc.decision} by {exc.decided_by!r}: nothing was changed."
            flash(_about_run(run_id, said, inbox), "error")
            return back
        # The same operator sent the same decision again (a double click, a second tab).
        summary = runtime.get_run(run_id, tenant_id=scope.tenant_id)
    except RunNotFound:
        raise
    except ScoriaError as exc:
        if isinstance(exc, NoPendingApproval) and exc.expired:
            # Asked again, or decided anew, on the run's page: where the operator goes next.
            flash(_EXPIRED if exc.pending_id is None else _EXPIRED_ASKED_AGAIN, "error")
            return redirect(url_for("scoria.run", run_id=run_id), code=303)
        flash(exc.message, "error")
        return back
    flash(_outcome(done, summary, inbox), "ok")
    return back


def _same_json(first: object, second: object) -> bool:
    """Whether two values are the same JSON: ``1`` is not ``true``, nor ``10`` ``10.0``,
    as Python's ``==`` would have them."""
    return json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)


def _outcome(done: str, summary: RunSummary, inbox: bool) -> str:
    """What the operator is told after deciding; the inbox also names the run."""
    if summary.status != RunStatus.WAITING_FOR_APPROVAL:
        text = f"{done} The run is now {summary.status.replace('_', ' ')}."
    else:
        window = runtime.get_run_window(
            summary.run_id, tenant_id=current_scope().tenant_id, limit=1
        )
        pending = ApprovalStatus.PENDING
        asked = [item.tool_name for item in window.approvals if item.status == pending]
        if asked:
            text = f"{done} The run now waits for another approval: {asked[-1]}."
        else:
            text = f"{done} The run waits, approved, and continues when the app resumes it."
    return _about_run(summary.run_id, text, inbox)


def _about_run(run_id: str, text: str, inbox: bool) -> str:
    """``text`` as a message; the inbox's also names the run, by the tail of its id."""
    return f"Run …{run_id[-8:]}: {text}" if inbox else text


@bp.errorhandler(RunNotFound)
def _run_not_found(_exc: RunNotFound) -> ResponseReturnValue:
    return _error_page(NotFound())


@bp.errorhandler(StorageError)
def _storage_error(exc: StorageError) -> ResponseReturnValue:
    # The message may name the database's host, port, user and name: the log has it.
    current_app.logger.error("flask-scoria operator page: %s", exc.message)
    description = "The flask-scoria database is unavailable. " + (
        exc.hint or "The app's log has the details."
    )
    return _error_page(ServiceUnavailable(description))


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> ResponseReturnValue:
    return _error_page(exc)


def _error_page(exc: HTTPException) -> ResponseReturnValue:
    """The error as a page, or as JSON for a ``status.json``, whose poller reads no HTML.

    A 404 says the same whatever the reason, so that another tenant's run
    cannot be told apart from an unknown one.
    """
    status = exc.code or 500
    if request.endpoint in ("scoria.run_status", "scoria.approvals_status"):
        return _json_error(status, exc)
    if status == 404:
        return render_template("scoria/not_found.html"), 404
    if status == 403:
        g.pop("_scoria_scope", None)  # a refused request shows no tenant, nor its counts
        return render_template("scoria/forbidden.html"), 403
    # Its headers besides the type (a 405's Allow) go with the page.
    headers = [(name, value) for name, value in exc.get_headers() if name != "Content-Type"]
    return render_template("scoria/error.html", error=exc), status, headers


def _json_error(status: int, exc: HTTPException) -> ResponseReturnValue:
    if status == 404:
        message = "No such run for your tenant."
    elif status == 403:
        message = "Operator access required: the app's @runtime.operator_scope granted none."
    else:
        message = exc.description or exc.name
    return jsonify(error=exc.name, status=status, message=message), status


def _arg(name: str) -> str | None:
    return request.args.get(name, "").strip() or None


def _day(name: str, *, after: bool = False) -> datetime | None:
    """A ``YYYY-MM-DD`` argument as the start of that UTC day (of the next one ``after``)."""
    text = _arg(name)
    if text is None:
        return None
    try:
        day = datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
        return day + timedelta(days=1) if after else day
    except (ValueError, OverflowError):
        abort(400, description=f"{name!r} must be a date such as 2026-12-01.")


def _inbox_page() -> str:
    """The inbox page a decision was made on: the form's ``after`` cursor, if it reads."""
    after = request.form.get("after", "")
    kept = after if after and runtime.Cursor.decode(after) is not None else None
    return url_for("scoria.approvals", after=kept)


def _cursor(name: str = "after") -> runtime.Cursor | None:
    text = request.args.get(name)
    if not text:
        return None
    cursor = runtime.Cursor.decode(text)
    if cursor is None:
        abort(400, description="The page link is malformed; start again from the first page.")
    return cursor


def _sequence(name: str) -> int | None:
    """A ``?steps_before=`` / ``?events_before=`` position: a positive sequence number."""
    text = request.args.get(name)
    if not text:
        return None
    largest = runtime.LARGEST_INT
    # Its length first: int() refuses a text of thousands of digits with a ValueError.
    well_formed = text.isascii() and text.isdigit() and len(text) <= len(str(largest))
    if not well_formed or not 0 < int(text) <= largest:
        abort(400, description="The page link is malformed; start again from the newest.")
    return int(text)
