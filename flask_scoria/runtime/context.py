"""What one runtime call needs of the current app, found through its state."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, current_app

from ..state import app_state
from ..storage import Storage
from .handlers import HandlerRegistry
from .leases import LeaseKeeper


@dataclass(frozen=True)
class RuntimeContext:
    """What one call needs of the current app's flask-scoria state."""

    app: Flask
    storage: Storage
    registry: HandlerRegistry
    keeper: LeaseKeeper
    handoff_max_bytes: int
    handoff_max_depth: int
    max_steps: int
    #: Whether operator pages are set up; they show only runs of the operator's tenant.
    has_operators: bool
    max_metadata_bytes: int
    #: The largest result, error or approval arguments a step may store, serialized.
    result_max_bytes: int
    inline_retry_wait: float


def context() -> RuntimeContext:
    """The runtime context of the current app."""
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    state = app_state(app)
    return RuntimeContext(
        app=app,
        storage=state.storage,
        registry=HandlerRegistry(
            state.registry.handlers, state.registry.policies, state.settings.executor
        ),
        keeper=state.keeper,
        handoff_max_bytes=state.settings.handoff_max_bytes,
        handoff_max_depth=state.settings.handoff_max_depth,
        max_steps=state.settings.max_steps,
        has_operators=state.registry.operator_scope is not None,
        max_metadata_bytes=state.settings.max_metadata_bytes,
        result_max_bytes=state.settings.result_max_bytes,
        inline_retry_wait=state.settings.inline_retry_wait,
    )


def queued_kinds() -> frozenset[str]:
    """The current app's registered kinds whose steps a worker or Celery executes."""
    return context().registry.queued_kinds()
