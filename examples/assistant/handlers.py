"""Step handlers of the assistant, registered on the app's ``Scoria`` instance.

A question is one run of three steps: ``draft`` (the model drafts the
answer), ``approval`` (an operator approves it, editing it if need be) and
``send`` (the answer is sent to the member). Each step passes what the next
needs with ``Next(kind, input)``.

They read only what the run carries (its metadata, the step's input and
projected context) and the app's config, so ``flask scoria dispatch``,
``resume`` and ``verify`` can run them outside a request.
"""

from __future__ import annotations

from typing import Any

from flask import current_app

from flask_scoria import Fail, Next, RunSummary, StepView, Succeed, WaitForApproval

from . import mailer, model_client
from .extensions import runtime

#: The steps of a question, in order: each one's handler returns ``Next`` of the next.
ANSWER_STEPS = ("draft", "approval", "send")


@runtime.handler("draft")
def draft(step: StepView, run: RunSummary) -> Next:
    """The model drafts the answer; an operator approves it next."""
    return Next("approval", draft_answer(run))


def draft_answer(run: RunSummary) -> dict[str, Any]:
    """The arguments of ``send_answer``: who gets the answer, and the model's draft of it."""
    prompt = str(run.metadata.get("payload", {}).get("prompt", ""))
    return {"to": run.actor_id, "answer": model_client.complete("draft", prompt)}


@runtime.handler("approval")
def approval(step: StepView, run: RunSummary) -> Next | WaitForApproval:
    """An operator approves the drafted answer, or an edited one, before it is sent.

    Nobody deciding within ``APPROVAL_EXPIRES_IN`` seconds fails the run with
    ``approval_expired``; resuming it asks again. A run may also start at this
    step (as ``flask scoria verify`` does): the answer is then drafted here.
    """
    if step.approval is None:
        return WaitForApproval(
            "send_answer",
            dict(step.input) or draft_answer(run),
            reason="Every answer is approved by an operator before it is sent.",
            editable=True,
            expires_in=current_app.config["APPROVAL_EXPIRES_IN"],
        )
    edited = step.approval.edited_arguments  # None when left as requested; {} is an edit
    approved = dict((step.approval.arguments or {}) if edited is None else edited)
    # An operator may edit the answer, never whom it goes to: the member who asked.
    approved["to"] = run.actor_id
    return Next("send", approved)


@runtime.handler("send")
def send(step: StepView, run: RunSummary) -> Succeed | Fail:
    """Send the approved answer: once, however often the step runs."""
    to, answer = step.input.get("to"), step.input.get("answer")
    if not (isinstance(to, str) and to and isinstance(answer, str) and answer.strip()):
        return Fail(
            {
                "type": "invalid_answer",
                "message": "The approved arguments need a 'to' and a non-empty 'answer';"
                " nothing was sent.",
            }
        )
    message_id = mailer.send(to=to, text=answer, idempotency_key=step.idempotency_key)
    return Succeed({"answer": answer, "sent_to": to, "message_id": message_id})


@runtime.handler("review")
def review(step: StepView, run: RunSummary) -> Succeed:
    """The critic's bounded review of a draft answer."""
    context = step.projected_context or {}
    text = str(context.get("draft_answer", ""))
    return Succeed({"review": model_client.complete("review", text), "task": context.get("task")})
