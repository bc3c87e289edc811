"""Calling step handlers and keeping their leases alive."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import update
from werkzeug.utils import import_string

from ._json import check_text, json_copy, json_object, storable_text
from .errors import InvalidRunOptions, ScoriaError
from .models import steps
from .outcomes import Fail, Handoff, Outcome, Succeed, WaitForApproval
from .readback import RunSummary, StepView
from .storage import Storage

log = logging.getLogger("flask_scoria")

Handler = Callable[[StepView, RunSummary], Any]


def load_handler(value: Any, kind: str) -> Handler:
    """Return a callable handler, importing ``"module:function"`` strings."""
    if isinstance(value, str):
        try:
            value = import_string(value)
        except Exception as exc:
            raise InvalidRunOptions(
                f"Handler {value!r} for kind {kind!r} cannot be imported: {exc}"
            ) from None
    if not callable(value):
        raise InvalidRunOptions(
            f"Handler for kind {kind!r} must be callable or a 'module:function'"
            f" string, not {type(value).__name__}."
        )
    return value  # type: ignore[no-any-return]


class Handlers:
    """Resolves a step kind: per-call handlers first, then the registry."""

    def __init__(self, per_call: Any, registry: Mapping[str, Handler]) -> None:
        if per_call is None:
            per_call = {}
        if not isinstance(per_call, Mapping):
            raise InvalidRunOptions(
                "handlers must be a dict mapping step kinds to handlers, not"
                f" {type(per_call).__name__}."
            )
        self._per_call: dict[str, Handler] = {}
        for kind, handler in per_call.items():
            if not isinstance(kind, str) or not kind:
                raise InvalidRunOptions(f"handler kinds must be strings, not {kind!r}.")
            self._per_call[kind] = load_handler(handler, kind)
        self._registry = registry

    def get(self, kind: str) -> Handler | None:
        """The handler for ``kind``, or ``None`` when none is known."""
        return self._per_call.get(kind) or self._registry.get(kind)


def _invalid(message: str) -> Fail:
    return Fail({"type": "invalid_handler_result", "message": message})


class _BadResult(ScoriaError):
    pass


def run_handler(handler: Handler, step: StepView, run: RunSummary) -> Outcome:
    """Call ``handler`` and turn whatever happens into a storable outcome."""
    try:
        value = handler(step, run)
    except Exception as exc:
        log.exception("Handler for step %s (kind %r) raised.", step.id, step.kind)
        return Fail({"type": type(exc).__name__, "message": storable_text(str(exc)[:2000])})
    try:
        return _normalize(value)
    except _BadResult as exc:
        return _invalid(exc.message)


def _normalize(value: Any) -> Outcome:
    if value is None or isinstance(value, Mapping):
        value = Succeed(value)
    if isinstance(value, Succeed):
        result = value.result
        if result is not None and not isinstance(result, Mapping):
            result = {"result": result}
        return Succeed(json_copy(result, what="handler result", error=_BadResult))
    if isinstance(value, WaitForApproval):
        tool = value.tool_name
        if not isinstance(tool, str) or not tool.strip() or len(tool) > 255:
            raise _BadResult("WaitForApproval needs a tool_name of 1 to 255 characters.")
        check_text(tool, what="WaitForApproval tool_name", error=_BadResult)
        if value.reason is not None:
            if not isinstance(value.reason, str):
                raise _BadResult("WaitForApproval reason must be a string.")
            check_text(value.reason, what="WaitForApproval reason", error=_BadResult)
        arguments = (
            None
            if value.arguments is None
            else json_object(value.arguments, what="approval arguments", error=_BadResult)
        )
        return WaitForApproval(tool.strip(), arguments, value.reason)
    if isinstance(value, Fail):
        error = value.error
        if not isinstance(error, Mapping):
            error = {"message": error if isinstance(error, str) else repr(error)}
        return Fail(json_object(error, what="handler error", error=_BadResult))
    if isinstance(value, Handoff):
        return value
    raise _BadResult(
        f"Handler returned a {type(value).__name__}; return Succeed, WaitForApproval,"
        " Fail, Handoff, a dict or None."
    )


class LeaseKeeper:
    """Renews the leases of running steps from one background thread.

    A step claimed by this process keeps its lease while its handler runs;
    only a dead process lets the lease expire.
    """

    def __init__(self, lease_seconds: float) -> None:
        self.lease = timedelta(seconds=lease_seconds)
        self._interval = max(lease_seconds / 3, 0.05)
        self._held: dict[str, tuple[Storage, uuid.UUID]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def expiry(self, now: datetime) -> datetime:
        """When a lease taken at ``now`` expires."""
        return now + self.lease

    @contextmanager
    def hold(self, storage: Storage, step_id: uuid.UUID, token: str) -> Iterator[None]:
        """Keep the lease of ``step_id`` alive for the duration of the block."""
        with self._lock:
            self._held[token] = (storage, step_id)
            self._ensure_thread()
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(token, None)

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="scoria-lease-keeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self._interval)
            with self._lock:
                held = list(self._held.items())
            for token, (storage, step_id) in held:
                self._renew(storage, step_id, token)

    def _renew(self, storage: Storage, step_id: uuid.UUID, token: str) -> None:
        try:
            with storage.write() as conn:
                conn.execute(
                    update(steps)
                    .where(
                        steps.c.id == step_id,
                        steps.c.lease_token == token,
                        steps.c.status == "running",
                    )
                    .values(lease_expires_at=self.expiry(datetime.now(UTC)))
                )
        except Exception:  # the keeper must outlive any one failed renewal
            log.warning("Could not renew the lease of step %s.", step_id, exc_info=True)
