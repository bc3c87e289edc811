"""The assistant's language model: a deterministic STAND-IN, not a real model.

Everything the example asks of a model goes through :func:`complete`. It
answers from fixed templates, offline, so that the demo and its tests are
repeatable. To use a real model, replace the body of :func:`complete` with a
call to your provider's client; nothing else in the example changes.
"""

from __future__ import annotations

STAND_IN_LABEL = "[stand-in assistant]"


def complete(task: str, text: str) -> str:
    """Return the model's text for ``task`` ("draft" or "review") on ``text``."""
    if task == "draft":
        return (
            f"{STAND_IN_LABEL} Draft answer to: {text.strip()!r}. First, restate the"
            " request; second, list the steps to take; third, name who signs it off."
        )
    if task == "review":
        if "policy" in text.lower():
            return (
                f"{STAND_IN_LABEL} The draft mentions a policy: cite the policy section"
                " by name and check the dates against the current version."
            )
        return f"{STAND_IN_LABEL} No policy claims found; the draft reads accurately."
    raise ValueError(f"unknown task {task!r}")
