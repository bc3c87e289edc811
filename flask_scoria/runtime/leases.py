"""Keeping the leases of running steps alive while their handlers run."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from sqlalchemy import update

from ..errors import StorageError
from ..statuses import StepStatus
from ..storage import Storage
from .tables import steps

log = logging.getLogger("flask_scoria")


class LeaseKeeper:
    """Renews the leases of running steps from one background thread.

    A step claimed by this process keeps its lease while its handler runs;
    only a dead process lets the lease expire. A step with a timeout is not
    renewed past its deadline.
    """

    def __init__(self, lease_seconds: float) -> None:
        self.lease = timedelta(seconds=lease_seconds)
        self._interval = max(lease_seconds / 3, 0.05)
        self._held: dict[str, tuple[Storage, uuid.UUID, datetime | None]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def expiry(self, now: datetime) -> datetime:
        """When a lease taken at ``now`` expires."""
        return now + self.lease

    @contextmanager
    def hold(
        self, storage: Storage, step_id: uuid.UUID, token: str, deadline: datetime | None = None
    ) -> Iterator[None]:
        """Keep the lease of ``step_id`` alive for the block, or until ``deadline``."""
        with self._lock:
            self._held[token] = (storage, step_id, deadline)
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
            now = datetime.now(UTC)
            for token, (storage, step_id, deadline) in held:
                if deadline is None or now < deadline:
                    self._renew(storage, step_id, token)

    def _renew(self, storage: Storage, step_id: uuid.UUID, token: str) -> None:
        """Extend the lease; a dropped connection is tried again on a fresh one at once."""
        tries = 0
        while True:
            tries += 1
            try:
                with storage.write(pipeline=True) as conn:
                    conn.execute(
                        update(steps)
                        .where(
                            steps.c.id == step_id,
                            steps.c.lease_token == token,
                            steps.c.status == StepStatus.RUNNING,
                        )
                        .values(lease_expires_at=self.expiry(datetime.now(UTC)))
                    )
                return
            except StorageError as exc:
                if storage.retry_after(exc, tries):
                    continue
                log.warning("Could not renew the lease of step %s: %s", step_id, exc.message)
                return
            except Exception:  # the keeper must outlive any one failed renewal
                log.warning("Could not renew the lease of step %s.", step_id, exc_info=True)
                return
