"""The run state machine: start, dispatch, resume, decide, cancel and read back.

The public verbs are re-exported on the package top level (``flask_scoria``).
"""

from .reads import get_run as get_run
from .reads import get_run_detail as get_run_detail
from .reads import list_runs_for_session as list_runs_for_session
from .reads import recover_expired_leases as recover_expired_leases
from .start import start_handoff_run as start_handoff_run
from .start import start_run as start_run
from .transaction import UNSET as UNSET
from .transaction import RuntimeContext as RuntimeContext
from .transitions import approve_run as approve_run
from .transitions import cancel_run as cancel_run
from .transitions import dispatch as dispatch
from .transitions import reject_run as reject_run
from .transitions import resume_run as resume_run
