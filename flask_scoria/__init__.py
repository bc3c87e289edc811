"""Durable, inspectable AI runs for Flask apps.

Adopt in the order ``identity -> start -> inspect -> resume``::

    import flask_scoria as scoria

    who = scoria.identity({"actor_id": user.id, "tenant_id": org.id, "session_id": sid})
    run = scoria.start_run(who, initial_step={"kind": "approval"})
    scoria.get_run(run.run_id)  # waiting_for_approval, if the handler asked
    scoria.approve_run(run.run_id, decided_by="ops-1")
    scoria.resume_run(run.run_id)
"""

from .errors import ApprovalAlreadyDecided as ApprovalAlreadyDecided
from .errors import ApprovalPending as ApprovalPending
from .errors import InvalidDecision as InvalidDecision
from .errors import InvalidHandoff as InvalidHandoff
from .errors import InvalidIdentity as InvalidIdentity
from .errors import InvalidRunOptions as InvalidRunOptions
from .errors import NoPendingApproval as NoPendingApproval
from .errors import RunNotFound as RunNotFound
from .errors import RunNotResumable as RunNotResumable
from .errors import ScoriaError as ScoriaError
from .errors import StorageError as StorageError
from .extension import Scoria as Scoria
from .identity import Identity as Identity
from .identity import identity as identity
from .identity import identity_from_g as identity_from_g
from .identity import identity_from_session as identity_from_session
from .outcomes import Fail as Fail
from .outcomes import Handoff as Handoff
from .outcomes import Next as Next
from .outcomes import Succeed as Succeed
from .outcomes import WaitForApproval as WaitForApproval
from .policy import Retry as Retry
from .readback import Approval as Approval
from .readback import DelegatedHandoff as DelegatedHandoff
from .readback import Event as Event
from .readback import HandoffRecord as HandoffRecord
from .readback import RunDetail as RunDetail
from .readback import RunSummary as RunSummary
from .readback import Step as Step
from .readback import StepView as StepView
from .runtime import approve_run as approve_run
from .runtime import cancel_run as cancel_run
from .runtime import dispatch as dispatch
from .runtime import dispatch_queued as dispatch_queued
from .runtime import get_run as get_run
from .runtime import get_run_detail as get_run_detail
from .runtime import list_runs_for_session as list_runs_for_session
from .runtime import prune_runs as prune_runs
from .runtime import reject_run as reject_run
from .runtime import resume_run as resume_run
from .runtime import start_handoff_run as start_handoff_run
from .runtime import start_run as start_run
from .schema import include_name as include_name
from .signals import approval_decided as approval_decided
from .signals import handoff_created as handoff_created
from .signals import run_completed as run_completed
from .signals import run_failed as run_failed
from .signals import run_paused as run_paused
from .signals import run_resumed as run_resumed
from .signals import run_started as run_started
from .statuses import ApprovalStatus as ApprovalStatus
from .statuses import EventType as EventType
from .statuses import RunStatus as RunStatus
from .statuses import StepStatus as StepStatus
