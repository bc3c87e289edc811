"""Blinker signals sent after a run's state is committed.

The sender is the Flask app; receivers get ``run``, the
:class:`~flask_scoria.RunSummary` after the change, and for
``approval_decided`` and ``handoff_created`` also ``approval`` or ``handoff``.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

run_started = _signals.signal("scoria.run-started")
run_paused = _signals.signal("scoria.run-paused")
approval_decided = _signals.signal("scoria.approval-decided")
run_resumed = _signals.signal("scoria.run-resumed")
run_completed = _signals.signal("scoria.run-completed")
run_failed = _signals.signal("scoria.run-failed")
handoff_created = _signals.signal("scoria.handoff-created")
