"""Finding the handler of a step's kind, calling it, and checking what it returned."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import math
import threading
import traceback
from asyncio import CancelledError
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from werkzeug.utils import import_string

from .._json import ErrorFactory, check_text, json_copy, json_object, storable_text
from ..errors import InvalidRunOptions, ScoriaError, safe_str, short_repr
from ..outcomes import Fail, HandlerResult, Handoff, Next, Outcome, Succeed, WaitForApproval
from ..policy import DEFAULT_POLICY, MAX_SECONDS, HandlerPolicy
from ..readback import RunSummary, StepView
from .arguments import MAX_KIND, require_name

log = logging.getLogger("flask_scoria")

#: A step handler; an async one returns a coroutine, run to its end.
Handler = Callable[[StepView, RunSummary], HandlerResult | Coroutine[Any, Any, HandlerResult]]

#: The most of a traceback an error envelope keeps, in bytes (its last frames).
TRACEBACK_BYTES = 8 * 1024


def load_handler(value: object, kind: str) -> Handler:
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
    return value


class HandlerRegistry(Mapping[str, Handler]):
    """An app's registered handlers with their policies and its default executor."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        policies: Mapping[str, HandlerPolicy],
        executor: str,
    ) -> None:
        self._handlers = handlers
        self._policies = policies
        self.executor = executor

    def __getitem__(self, kind: str) -> Handler:
        return self._handlers[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self._handlers)

    def __len__(self) -> int:
        return len(self._handlers)

    def policy(self, kind: str) -> HandlerPolicy:
        """The policy of ``kind``, its executor resolved to the app's default if unset."""
        policy = self._policies.get(kind, DEFAULT_POLICY)
        return policy if policy.executor else replace(policy, executor=self.executor)

    def queued_kinds(self) -> frozenset[str]:
        """The registered kinds whose steps wait in the queue for a worker or Celery."""
        return frozenset(kind for kind in self._handlers if self.policy(kind).executor != "inline")

    def timeouts(self) -> dict[str, float]:
        """The timeout of every registered kind that has one."""
        return {
            kind: policy.timeout
            for kind, policy in self._policies.items()
            if policy.timeout is not None and kind in self._handlers
        }


class Handlers:
    """Resolves a step kind: per-call handlers first, then the registry.

    ``local``: run every step here, whatever its executor (a worker executing
    queued steps). Once ``stopping()`` is true, no step is claimed to run here
    any more: a worker shutting down leaves the next steps queued. ``elsewhere``:
    the executor the steps of ``inline`` kinds with a handler are sent to instead;
    ``later``: the one their steps due later are sent to (a Celery task, which no
    one calls again, cannot leave them for the next call).
    """

    def __init__(
        self,
        per_call: object,
        registry: HandlerRegistry,
        *,
        local: bool = False,
        stopping: Callable[[], bool] | None = None,
        elsewhere: str | None = None,
        later: str | None = None,
    ) -> None:
        self.local = local
        self.stopping = stopping
        self.elsewhere = elsewhere
        self.later = later
        if per_call is None:
            per_call = {}
        if not isinstance(per_call, Mapping):
            raise InvalidRunOptions(
                "handlers must be a dict mapping step kinds to handlers, not"
                f" {type(per_call).__name__}."
            )
        self._per_call: dict[str, Handler] = {}
        for kind, handler in per_call.items():
            # As a step's kind is read: stripped, printable, MAX_KIND characters at most.
            name = require_name(kind, "A handlers key", error=InvalidRunOptions, limit=MAX_KIND)
            self._per_call[name] = load_handler(handler, name)
        self._registry = registry

    def get(self, kind: str) -> Handler | None:
        """The handler for ``kind``, or ``None`` when none is known."""
        return self._per_call.get(kind) or self._registry.get(kind)

    def policy(self, kind: str, *, due: bool = True) -> HandlerPolicy:
        """Where and how steps of ``kind`` run (those due later, unless ``due``).

        A per-call handler runs inline, with the retries and timeout its kind has
        in the registry (one attempt, no timeout, for a kind not registered): those
        that every other process reading the run applies to the step.
        """
        if kind in self._per_call:
            # Run in the call that passes them: no other process can import them.
            policy = replace(self._registry.policy(kind), executor="inline")
        else:
            policy = self._registry.policy(kind)
        instead = self.elsewhere if due else self.later or self.elsewhere
        if instead is None or policy.executor != "inline" or self.get(kind) is None:
            return policy
        return replace(policy, executor=instead)

    def runs_here(self, kind: str, *, due: bool = True) -> bool:
        """Whether a step of ``kind`` (due later, unless ``due``) is executed by this
        process once claimed."""
        if self.stopping is not None and self.stopping():
            return False
        return self.local or self.policy(kind, due=due).executor == "inline"

    def kinds_run_here(self) -> list[str]:
        """The kinds with a handler whose steps this process executes once claimed."""
        return sorted(kind for kind in {*self._per_call, *self._registry} if self.runs_here(kind))


@dataclass(frozen=True)
class Raised(Fail):
    """A handler raised: unlike a deliberate :class:`Fail`, retried per its policy."""


def _traceback(exc: BaseException) -> str:
    text = storable_text("".join(traceback.format_exception(exc, limit=-8)))
    data = text.encode("utf-8")
    if len(data) <= TRACEBACK_BYTES:
        return text
    return "..." + data[-(TRACEBACK_BYTES - 3) :].decode("utf-8", "ignore")


def invalid_result(message: str) -> Fail:
    """The failure of a step whose handler returned something that cannot be recorded."""
    return Fail({"type": "invalid_handler_result", "message": message})


class _BadResult(ScoriaError):
    pass


def run_handler(handler: Handler, step: StepView, run: RunSummary) -> Outcome:
    """Call ``handler`` and turn whatever happens into a storable outcome."""
    try:
        value = handler(step, run)
        if inspect.iscoroutine(value):
            value = _awaited(value)
    except BaseException as exc:
        on_main = threading.current_thread() is threading.main_thread()
        if on_main and not isinstance(exc, Exception | CancelledError):
            # The process ending: Ctrl-C, or a server's signal handler (gunicorn's sync
            # workers). Off the main thread no signal arrives: it is the handler's own.
            raise
        log.exception("Handler for step %s (kind %r) raised.", step.id, step.kind)
        return Raised(
            {
                "type": type(exc).__name__,
                "message": storable_text(safe_str(exc, 2000)),
                "traceback": _traceback(exc),
            }
        )
    try:
        return _normalize(value)
    except _BadResult as exc:
        return invalid_result(exc.message)
    except Exception as exc:  # a returned value whose own methods raise when read
        return unreadable(value, exc, step.id)


def _awaited(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """What an async handler's coroutine returns, run to its end in an event loop of
    its own: in this thread, or, where this thread already runs one (an async view),
    in a thread of its own, with this one's context (the app's)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1, thread_name_prefix="scoria-async-handler") as thread:
        return thread.submit(contextvars.copy_context().run, asyncio.run, coroutine).result()


def unreadable(value: object, exc: Exception, step_id: object) -> Fail:
    """The outcome of a handler whose returned ``value`` raised ``exc`` when read; logs it."""
    log.exception("The result of the handler for step %s could not be read.", step_id)
    return invalid_result(
        f"The handler's {type(value).__name__} could not be read:"
        f" {type(exc).__name__}: {storable_text(safe_str(exc, 2000))}"
    )


def _normalize(value: object) -> Outcome:
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
        if not isinstance(value.editable, bool):
            raise _BadResult("WaitForApproval editable must be True or False.")
        return WaitForApproval(
            tool.strip(),
            arguments,
            value.reason,
            editable=value.editable,
            expires_in=_expiry(value.expires_in),
        )
    if isinstance(value, Fail):
        error = value.error
        if not isinstance(error, Mapping):
            error = {"message": error if isinstance(error, str) else short_repr(error, 2000)}
        return Fail(json_object(error, what="handler error", error=_BadResult))
    if isinstance(value, Handoff):
        # The class itself, as for every outcome: a subclass would find no recorder.
        return Handoff(
            value.delegated_role_id,
            value.delegated_kind,
            value.handoff_input,
            value.projected_context,
            value.capability_tags,
        )
    if isinstance(value, Next):
        kind = require_name(value.kind, "Next kind", error=_BadResult, limit=MAX_KIND)
        role = None
        if value.role_id is not None:
            role = require_name(value.role_id, "Next role_id", error=_BadResult)
        given = {} if value.input is None else value.input
        return Next(
            kind,
            json_object(given, what="Next input", error=_BadResult),
            role_id=role,
            delay=seconds(value.delay, "Next delay", _BadResult),
        )
    raise _BadResult(
        f"Handler returned a {type(value).__name__}; return Succeed, WaitForApproval,"
        " Fail, Handoff, Next, a dict or None."
    )


def _expiry(value: object) -> float | None:
    """A ``WaitForApproval``'s ``expires_in`` in seconds: more than zero, or ``None``."""
    expires_in = seconds(value, "WaitForApproval expires_in", _BadResult)
    if expires_in == 0:
        raise _BadResult("WaitForApproval expires_in must be more than 0 seconds, or None.")
    return expires_in


def seconds(value: object, what: str, error: ErrorFactory) -> float | None:
    """``value`` (seconds, or a ``timedelta``) as a number of seconds, zero or more."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise error(f"{what} must be a number of seconds or a timedelta.")
    if not math.isfinite(value) or value < 0 or value > MAX_SECONDS:
        raise error(f"{what} must be from 0 to {MAX_SECONDS:.0f} seconds.")
    return float(value)
