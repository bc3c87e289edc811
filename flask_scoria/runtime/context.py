"""What one runtime call needs of the current app, found through its state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Final

from flask import Flask, current_app

from ..state import app_state
from ..storage import Storage
from .leases import LeaseKeeper

if TYPE_CHECKING:
    from .handlers import Handler


class Unset(Enum):
    """The type of :data:`UNSET`."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


#: "Not given": a verb called without ``tenant_id=`` applies no tenant guard.
UNSET: Final = Unset.UNSET

#: The tenant a run must belong to (``None``: runs without a tenant), or :data:`UNSET`.
TenantGuard = str | None | Unset


@dataclass(frozen=True)
class RuntimeContext:
    """What one call needs of the current app's flask-scoria state."""

    app: Flask
    storage: Storage
    registry: Mapping[str, Handler]
    keeper: LeaseKeeper
    handoff_max_bytes: int
    handoff_max_depth: int
    max_steps: int
    #: Whether operator pages are set up; they show only runs of the operator's tenant.
    has_operators: bool
    max_metadata_bytes: int


def context() -> RuntimeContext:
    """The runtime context of the current app."""
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    state = app_state(app)
    return RuntimeContext(
        app=app,
        storage=state.storage,
        registry=state.registry.handlers,
        keeper=state.keeper,
        handoff_max_bytes=state.settings.handoff_max_bytes,
        handoff_max_depth=state.settings.handoff_max_depth,
        max_steps=state.settings.max_steps,
        has_operators=state.registry.operator_scope is not None,
        max_metadata_bytes=state.settings.max_metadata_bytes,
    )
