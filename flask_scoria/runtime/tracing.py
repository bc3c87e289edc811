"""OpenTelemetry spans of step executions, when ``opentelemetry`` is installed.

A step queued for another process keeps the W3C trace context of the span
that queued it (``scoria_steps.trace_context``); the process that executes
the step restores it, so the step's ``scoria.step`` span joins the trace of
the request that queued it. Without ``opentelemetry`` every function here
does nothing; so does a step with no trace to join while no tracer provider
is set, whose span would record nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from types import ModuleType
from typing import Any

SPAN_NAME = "scoria.step"


@cache
def _otel() -> tuple[ModuleType, ModuleType] | None:
    """``opentelemetry``'s ``propagate`` and ``trace``, imported on first use, if installed."""
    try:
        from opentelemetry import propagate, trace
    except ImportError:  # the "otel" extra is not installed
        return None
    return propagate, trace


def carrier() -> dict[str, str] | None:
    """The current trace context as W3C headers, or ``None`` outside a recorded span."""
    otel = _otel()
    if otel is None:
        return None
    propagate, trace = otel
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers or None


def _no_provider(trace: Any) -> bool:
    """Whether no tracer provider is set yet: every span would be a no-op."""
    return isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


class StepSpan:
    """The span of one step execution; ``status`` is written when it ends."""

    def __init__(self, span: Any) -> None:
        self._span = span

    def status(self, status: str) -> None:
        """Record the step status the execution ended with."""
        if self._span is not None:
            self._span.set_attribute("scoria.step.status", status)


@contextmanager
def step_span(
    headers: Mapping[str, str] | None, run_id: str, kind: str, attempt: int
) -> Iterator[StepSpan]:
    """A ``scoria.step`` span, child of the current span (the request or task executing
    the step), else of ``headers``' context (that of the span that queued it)."""
    otel = _otel()
    if otel is None or (not headers and _no_provider(otel[1])):
        yield StepSpan(None)
        return
    propagate, trace = otel
    current = trace.get_current_span().get_span_context().is_valid
    parent = propagate.extract(dict(headers)) if headers and not current else None
    tracer = trace.get_tracer("flask_scoria")
    attributes: dict[str, str | int] = {
        "scoria.run_id": run_id,
        "scoria.step.kind": kind,
        "scoria.step.attempt": attempt,
    }
    with tracer.start_as_current_span(SPAN_NAME, context=parent, attributes=attributes) as span:
        yield StepSpan(span)
