"""The run state machine: start, dispatch, resume, decide, cancel and read back.

This is the engine's one entrance: the facade (``flask_scoria``), the
extension, the CLI, ``verify`` and the operator pages import from here,
never from the modules below it. The public verbs are re-exported on the
package top level.
"""

from .arguments import LARGEST_INT as LARGEST_INT
from .arguments import MAX_KIND as MAX_KIND
from .arguments import UNSET as UNSET
from .arguments import TenantGuard as TenantGuard
from .arguments import require_name as require_name
from .arguments import tenant_guard as tenant_guard
from .context import queued_kinds as queued_kinds
from .executors import RUN_STEP_TASK as RUN_STEP_TASK
from .handlers import Handler as Handler
from .handlers import load_handler as load_handler
from .leases import LeaseKeeper as LeaseKeeper
from .reads import Cursor as Cursor
from .reads import Page as Page
from .reads import PendingApproval as PendingApproval
from .reads import RunFilters as RunFilters
from .reads import RunWindow as RunWindow
from .reads import StepHead as StepHead
from .reads import count_pending_approvals as count_pending_approvals
from .reads import get_approval as get_approval
from .reads import get_run as get_run
from .reads import get_run_detail as get_run_detail
from .reads import get_run_window as get_run_window
from .reads import list_runs as list_runs
from .reads import list_runs_for_session as list_runs_for_session
from .reads import pending_approvals as pending_approvals
from .reads import recover_expired_leases as recover_expired_leases
from .reads import run_status as run_status
from .reads import runs_awaiting_resume as runs_awaiting_resume
from .reads import step_head as step_head
from .retention import prune_runs as prune_runs
from .start import start_handoff_run as start_handoff_run
from .start import start_run as start_run
from .tables import metadata as metadata
from .transitions import approve_run as approve_run
from .transitions import cancel_run as cancel_run
from .transitions import dispatch as dispatch
from .transitions import reject_run as reject_run
from .transitions import resume_run as resume_run
from .worker import dispatch_queued as dispatch_queued
from .worker import execute_step as execute_step
from .worker import resend_due_celery_steps as resend_due_celery_steps
from .worker import run_worker as run_worker
