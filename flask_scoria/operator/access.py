"""Who may see the operator pages, CSRF tokens for their forms, and response headers."""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, abort, current_app, g, request, session
from itsdangerous import BadSignature, URLSafeTimedSerializer

from ..errors import InvalidIdentity
from ..identity import Identity, normalize_id
from ..state import app_state

log = logging.getLogger("flask_scoria")

_SESSION_KEY = "_scoria_csrf"
_CSRF_MAX_AGE = 12 * 3600

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class OperatorScope:
    """The tenant an operator may inspect, and who decides approvals."""

    tenant_id: str
    actor_id: str | None


def resolve_scope() -> OperatorScope | None:
    """Ask the host's ``@runtime.operator_scope`` resolver; ``None`` denies."""
    resolver = app_state().registry.operator_scope
    if resolver is None:
        return None
    granted = resolver()
    if granted is None:
        return None
    if isinstance(granted, Identity):
        granted = {"tenant_id": granted.tenant_id, "actor_id": granted.actor_id}
    if not isinstance(granted, Mapping):
        log.warning(
            "The operator scope resolver returned a %s; return a mapping such as"
            " {'tenant_id': ..., 'actor_id': ...}, an Identity, or None.",
            type(granted).__name__,
        )
        return None
    try:
        tenant = normalize_id(granted.get("tenant_id"), "tenant_id")
        actor = normalize_id(granted.get("actor_id"), "actor_id")
    except InvalidIdentity:
        return None
    return None if tenant is None else OperatorScope(tenant, actor)


def require_scope() -> None:
    """``before_request``: deny unless the resolver grants a tenant (and sessions work)."""
    if request.endpoint == "scoria.static":
        return
    if not current_app.secret_key:
        abort(
            500,
            description="The operator pages keep their sign-in and form tokens in the session,"
            " which needs the app's SECRET_KEY. Set it in the app's config.",
        )
    scope = resolve_scope()
    if scope is None:
        abort(403)
    g._scoria_scope = scope


def current_scope() -> OperatorScope:
    """The scope ``require_scope`` granted for this request."""
    scope: OperatorScope = g._scoria_scope
    return scope


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.secret_key or "", salt="scoria-operator-csrf")


def csrf_token() -> str:
    """A signed token bound to this operator's session, for hidden form fields."""
    if _SESSION_KEY not in session:
        session[_SESSION_KEY] = secrets.token_urlsafe(32)
    return _serializer().dumps(session[_SESSION_KEY])


def check_csrf() -> None:
    """Reject a POST whose ``csrf_token`` does not match the session's."""
    expected = session.get(_SESSION_KEY)
    sent = request.form.get("csrf_token", "")
    try:
        value: Any = _serializer().loads(sent, max_age=_CSRF_MAX_AGE)
    except BadSignature:
        value = None
    if not (
        isinstance(expected, str)
        and isinstance(value, str)
        and hmac.compare_digest(expected, value)
    ):
        abort(400, description="The form's security token is missing or expired. Reload the page.")


def leave_to_own_csrf_check(app: Flask, blueprint: Blueprint) -> None:
    """Exempt ``blueprint`` from Flask-WTF's app-wide ``CSRFProtect``, if the app has it.

    ``CSRFProtect`` rejects every POST that lacks its own token; the operator
    forms carry this module's, checked by :func:`check_csrf`. Whether the host
    sets up ``CSRFProtect`` before or after flask-scoria, the blueprint is
    exempted before its first check.
    """

    def exempt() -> None:
        protect = app.extensions.get("csrf")
        if protect is not None:
            protect.exempt(blueprint)

    if "csrf" in app.extensions:
        exempt()
    else:  # set up later: its check runs after this
        app.before_request(exempt)


def security_headers(response: Response) -> Response:
    """``after_app_request``: a strict CSP, no framing, no caching of evidence.

    On every response under the pages' prefix, also those no view answered
    (an unknown path's 404, a wrong method's 405).
    """
    prefix = app_state().settings.url_prefix
    if request.path != prefix and not request.path.startswith(prefix + "/"):
        return response
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "same-origin")
    if request.endpoint != "scoria.static":
        headers["Cache-Control"] = "no-store"
    return response
