"""The verifier lanes of ``flask scoria verify``.

Each lane runs the seed guide's checklist with the host app's configuration
and handlers against a throwaway SQLite database, after checking that the
host's own database carries the newest ``scoria_*`` revision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from flask import Flask
from sqlalchemy.exc import SQLAlchemyError

from . import schema
from .errors import ApprovalPending, InvalidHandoff, ScoriaError, StorageError
from .identity import Identity, identity
from .runtime import (
    approve_run,
    get_run,
    get_run_detail,
    list_runs,
    list_runs_for_session,
    resume_run,
    start_handoff_run,
    start_run,
)
from .state import app_state

VERIFY_ACTOR = "scoria-verify"
VERIFY_TENANT = "scoria-verify"
VERIFY_PROMPT = "flask scoria verify: draft a release note"
VERIFY_DRAFT = "The release follows the data retention policy."


class CheckFailed(Exception):
    """A check failed; the checks after it cannot run."""


@dataclasses.dataclass(frozen=True)
class Check:
    """The outcome (PASS, FAIL or SKIP) of one checklist step."""

    name: str
    outcome: str
    detail: str


@dataclasses.dataclass
class Checklist:
    """The checks of one verify lane, in the order they ran."""

    checks: list[Check] = dataclasses.field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(check.outcome == "FAIL" for check in self.checks)

    def record(self, name: str, ok: bool, detail: str) -> bool:
        """Record ``name`` as PASS or FAIL and go on; return ``ok``."""
        self.checks.append(Check(name, "PASS" if ok else "FAIL", detail))
        return ok

    def expect(self, name: str, ok: bool, detail: str) -> None:
        """Record ``name`` as PASS, or as FAIL and stop the lane."""
        if not self.record(name, ok, detail):
            raise CheckFailed(name)

    def skip(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, "SKIP", detail))


@contextlib.contextmanager
def throwaway_app(host: Flask) -> Iterator[Flask]:
    """A copy of ``host``'s config and handlers on a fresh, migrated SQLite file.

    Its operator scope grants the verifier's own tenant, so the operator pages
    can be read without the host's sign-in. Every step runs in the call that
    reaches it (the inline executor), with the handler's retry and timeout:
    the checks read what the handler did, and no worker serves the copy.
    """
    host_state = app_state(host)
    with tempfile.TemporaryDirectory(prefix="scoria-verify-") as tmp:
        app = Flask(host.import_name, root_path=host.root_path, instance_path=tmp)
        app.config.update(host.config)
        app.config.update(
            SCORIA_DATABASE_URI="sqlite:///" + os.path.join(tmp, "verify.sqlite3"),
            SCORIA_ENGINE_OPTIONS={},
            SCORIA_EXECUTOR="inline",
            SECRET_KEY=host.config.get("SECRET_KEY") or secrets.token_hex(16),
        )
        type(host_state.extension)().init_app(app)
        registry = app_state(app).registry
        registry.handlers.update(host_state.registry.handlers)
        registry.policies.update(
            (kind, dataclasses.replace(policy, executor="inline"))
            for kind, policy in host_state.registry.policies.items()
        )
        registry.operator_scope = lambda: {
            "tenant_id": VERIFY_TENANT,
            "actor_id": VERIFY_ACTOR,
        }
        engine = app_state(app).storage.engine
        try:
            schema.upgrade(engine)
            yield app
        finally:
            engine.dispose()


def _verify_identity() -> Identity:
    return identity(
        {
            "actor_id": VERIFY_ACTOR,
            "tenant_id": VERIFY_TENANT,
            "session_id": f"scoria-verify-{uuid.uuid4().hex[:12]}",
            "metadata": {"channel": "verify"},
        }
    )


def _operator_page(app: Flask, run_id: str) -> tuple[str, int, str]:
    path = f"{app_state(app).settings.url_prefix}/workflows/{run_id}"
    response = app.test_client().get(path)
    return path, response.status_code, response.get_data(as_text=True)


def _require_handler(app: Flask, kind: str, out: Checklist) -> bool:
    registered = sorted(app_state(app).registry.handlers)
    hint = (
        ""
        if kind in registered
        else f"; register one with @runtime.handler({kind!r}), or name yours with --kind"
    )
    return out.record(
        f"handler for {kind!r} registered", kind in registered, f"found {registered}{hint}"
    )


def _require_migrated(host: Flask, out: Checklist) -> bool:
    """The host's database carries the newest ``scoria_*`` revision, and its tables are
    that revision's (a revision recorded without being run, by a stamp, is not)."""
    engine = app_state(host).storage.engine
    try:
        revision = schema.current_revision(engine)
        differing = schema.differences(engine) if revision == schema.head_revision() else []
    except (SQLAlchemyError, StorageError) as exc:
        detail = str(exc).splitlines()[0]
        return out.record("0. app database migrated", False, f"{type(exc).__name__}: {detail}")
    head = schema.head_revision()
    if revision != head:
        hint = "; run: flask scoria db upgrade"
    elif differing:
        hint = f"; but {len(differing)} difference(s) from its models: see flask scoria db check"
    else:
        hint = ""
    return out.record(
        "0. app database migrated",
        revision == head and not differing,
        f"scoria tables at {revision or 'no revision'}, newest {head}{hint}",
    )


def _require_operator_setup(host: Flask, out: Checklist) -> None:
    """The host's operator pages can work: sessions have a key, someone is an operator."""
    out.record(
        "0a. SECRET_KEY set",
        bool(host.secret_key),
        "the operator pages keep sign-in and form tokens in the session"
        + ("" if host.secret_key else "; set SECRET_KEY in the app's config"),
    )
    resolver = app_state(host).registry.operator_scope
    out.record(
        "0b. operator scope registered",
        resolver is not None,
        "who may open the operator pages, for which tenant"
        + ("" if resolver else "; register one with @runtime.operator_scope"),
    )


#: How many of the app's newest runs the tenant check reads.
TENANT_SAMPLE = 100


def _require_tenants(host: Flask, out: Checklist) -> None:
    """The app's newest runs carry a tenant; without one no operator ever sees a run."""
    name = "0c. runs carry a tenant"
    try:
        with host.app_context():
            tenants = [run.tenant_id for run in list_runs(limit=TENANT_SAMPLE).rows]
    except ScoriaError:
        out.skip(name, "the app's database cannot be read yet")
        return
    missing = sum(tenant is None for tenant in tenants)
    if not tenants:
        detail = "no runs in the app's database yet"
    elif missing:
        detail = (
            f"{missing} of the newest {len(tenants)} run(s) have no tenant_id, so no operator"
            " can see them; give the identity a tenant (session['tenant_id'], g.tenant, ...)"
        )
    else:
        detail = f"the newest {len(tenants)} run(s) all have a tenant_id"
    out.record(name, not missing, detail)


def verify_adoption(
    app: Flask, kind: str, out: Checklist, payload: Mapping[str, object] | None = None
) -> None:
    """The seed guide's checklist: identity -> start -> inspect -> resume -> fresh run.

    ``payload`` is the run's ``runtime["metadata"]["payload"]``; by default
    ``{"prompt": ...}``.
    """
    if payload is None:
        payload = {"prompt": VERIFY_PROMPT}
    who = _verify_identity()
    started = start_run(
        who,
        root_role_id="executor",
        initial_step={"sequence": 1, "kind": kind, "role_id": "executor"},
        runtime={"metadata": {"payload": payload}},
    )
    out.expect(
        "1. start_run", started.status != "failed", f"run {started.run_id} is {started.status}"
    )
    run_id = started.run_id
    summary = get_run(run_id)
    out.expect(
        "2. run_id is the durable handle",
        summary.run_id == run_id and summary.session_id == who.session_id,
        f"get_run({run_id[:8]}...) returns the same run in session {summary.session_id}",
    )
    out.expect(
        "3. get_run reads it back",
        summary.metadata.get("payload") == payload,
        f"status {summary.status}, payload kept in runtime metadata",
    )
    path, status, body = _operator_page(app, run_id)
    out.expect(
        "4. operator evidence page", status == 200 and run_id in body, f"GET {path} -> {status}"
    )
    if summary.status != "waiting_for_approval":
        out.skip("5. resume_run after approval", f"the {kind!r} handler did not pause")
    else:
        try:
            resume_run(run_id)
            early = "resumed without an approval"
        except ApprovalPending:
            early = ""
        out.expect("5a. resume_run waits for the decision", not early, early or "ApprovalPending")
        approve_run(run_id, decided_by=VERIFY_ACTOR)
        resumed = resume_run(run_id)
        out.expect(
            "5. resume_run after approval",
            resumed.run_id == run_id and resumed.status != "failed",
            f"same run_id, now {resumed.status}",
        )
    fresh = start_run(who, root_role_id="executor")
    listed = [run.run_id for run in list_runs_for_session(who.session_id)]
    out.expect(
        "6. same session, fresh run",
        fresh.session_id == who.session_id
        and fresh.run_id != run_id
        and listed == [fresh.run_id, run_id],
        f"session {who.session_id} lists 2 runs, newest first",
    )


def verify_runtime_to_handoff(
    app: Flask, kind: str, out: Checklist, payload: Mapping[str, object] | None = None
) -> None:
    """The bounded review branch: same identity, a new run, curated delegated evidence.

    ``payload``, if given, is the handoff run's ``runtime["metadata"]["payload"]``.
    """
    who = _verify_identity()
    root = start_run(who, root_role_id="executor")
    out.expect("1. root run in the session", root.status == "completed", f"run {root.run_id}")
    options: dict[str, Any] = {
        "root_role_id": "planner",
        "delegated_kind": kind,
        "handoff_input": {"brief": "Review the draft answer for policy and accuracy"},
    }
    if payload is not None:
        options["runtime"] = {"metadata": {"payload": payload}}
    try:
        start_handoff_run(
            who, "critic", projected_context={"chat_history": [VERIFY_DRAFT]}, **options
        )
        code = "accepted"
    except InvalidHandoff as exc:
        code = exc.code
    written = len(list_runs_for_session(who.session_id))
    out.expect(
        "2. unsafe projected context is rejected",
        code == "unsafe_projected_context" and written == 1,
        f"{code}, nothing written",
    )
    context = {"task": "policy-and-accuracy review", "draft_answer": VERIFY_DRAFT}
    handoff = start_handoff_run(who, "critic", projected_context=context, **options)
    out.expect(
        "3. start_handoff_run branches from the same lane",
        handoff.run_id != root.run_id and handoff.session_id == root.session_id,
        f"new run {handoff.run_id} in session {handoff.session_id}",
    )
    delegated = get_run_detail(handoff.run_id).delegated_handoffs
    entry = delegated[0] if len(delegated) == 1 else None
    registered = kind in app_state(app).registry.handlers
    out.expect(
        "4. get_run_detail returns delegated_handoffs",
        entry is not None
        and (entry.delegated_role_id, entry.delegated_kind) == ("critic", kind)
        and entry.projected_context == context
        # The app's own handler for the kind ran the child: it must not have failed.
        and not (registered and entry.child_status == "failed"),
        f"{len(delegated)} handoff(s); child {entry.child_status if entry else '-'}"
        + ("" if registered else f" (no handler for {kind!r}: the child waits for one)"),
    )
    path, status, body = _operator_page(app, handoff.run_id)
    out.expect(
        "5. operator page shows Delegated Evidence",
        status == 200 and 'id="delegated-evidence"' in body and "critic" in body,
        f"GET {path} -> {status}",
    )


Lane = Callable[[Flask, str, Checklist, Mapping[str, object] | None], None]

#: Each lane's default step kind, its steps, and whether they need that kind's handler.
LANES: dict[str, tuple[str, Lane, bool]] = {
    "adoption": ("approval", verify_adoption, True),
    "runtime-to-handoff": ("review", verify_runtime_to_handoff, False),
}


def parse_payload(text: str) -> dict[str, Any]:
    """The ``--payload`` option: a JSON object, or a ValueError that says what is wrong."""
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--payload is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"--payload must be a JSON object, not {type(payload).__name__}")
    return payload


def run_lane(
    host: Flask, lane: str, kind: str | None, payload: Mapping[str, object] | None = None
) -> Checklist:
    """Check ``host``'s prerequisites, then run ``lane`` in a throwaway copy.

    Every prerequisite is checked and reported, failing or not; the lane runs
    unless the handler it needs is missing. ``payload`` replaces the lane's
    default run payload.
    """
    default_kind, steps, needs_handler = LANES[lane]
    kind = kind or default_kind
    out = Checklist()
    if _require_migrated(host, out):
        _require_tenants(host, out)
    _require_operator_setup(host, out)
    if needs_handler and not _require_handler(host, kind, out):
        return out
    try:
        with throwaway_app(host) as app, app.app_context():
            steps(app, kind, out, payload)
    except CheckFailed:
        pass
    except (ScoriaError, SQLAlchemyError) as exc:
        out.checks.append(Check("error", "FAIL", f"{type(exc).__name__}: {exc}"))
    return out
