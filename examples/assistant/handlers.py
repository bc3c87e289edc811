"""Step handlers of the assistant, registered on the app's ``Scoria`` instance.

They read only what the run carries (its metadata, the step's projected
context), so ``flask scoria dispatch``, ``resume`` and ``verify`` can run them
outside a request.
"""

from __future__ import annotations

from flask_scoria import RunSummary, StepView, Succeed, WaitForApproval

from . import model_client
from .extensions import runtime


@runtime.handler("approval")
def answer(step: StepView, run: RunSummary) -> Succeed | WaitForApproval:
    """Ask an operator to approve the prompt, then draft the answer."""
    prompt = str(run.metadata.get("payload", {}).get("prompt", ""))
    if step.approval is None:
        return WaitForApproval(
            "draft_answer",
            {"prompt": prompt},
            reason="Every answer is approved by an operator before it is drafted.",
        )
    return Succeed({"answer": model_client.complete("draft", prompt)})


@runtime.handler("review")
def review(step: StepView, run: RunSummary) -> Succeed:
    """The critic's bounded review of a draft answer."""
    context = step.projected_context or {}
    draft = str(context.get("draft_answer", ""))
    return Succeed({"review": model_client.complete("review", draft), "task": context.get("task")})
