"""Where a step runs and what happens when it fails: executors, :class:`Retry`, timeouts."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

#: Where queued steps run: in the calling process, in ``flask scoria worker``, in Celery.
Executor = Literal["inline", "worker", "celery"]
EXECUTORS: tuple[Executor, ...] = ("inline", "worker", "celery")

#: The longest delay, timeout or expiry anything may ask for: ten years.
MAX_SECONDS = 10 * 365 * 24 * 3600.0


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, not {value!r}.")
    return float(value)


def _seconds(value: object, name: str, *, allow_zero: bool = False) -> float:
    """``value``, positive (or zero, if allowed) and at most :data:`MAX_SECONDS`."""
    seconds = _number(value, name)
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'zero or more' if allow_zero else 'positive'}.")
    if seconds > MAX_SECONDS:
        raise ValueError(f"{name} must be at most {MAX_SECONDS:.0f} seconds (ten years).")
    return seconds


@dataclass(frozen=True)
class Retry:
    """How often a step is tried, and how long to wait between tries.

    An attempt that raises, times out or loses its lease is retried while
    fewer than ``attempts`` were made, after ``min(max_delay, delay *
    backoff ** (attempt - 1))`` seconds (``jitter``: up to 10% less).
    ``Fail(...)`` is never retried. The default, one attempt, retries nothing.
    """

    attempts: int = 1
    delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 300.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ValueError(f"Retry attempts must be an int, not {self.attempts!r}.")
        if self.attempts < 1:
            raise ValueError("Retry attempts must be 1 or more.")
        _seconds(self.delay, "Retry delay", allow_zero=True)
        _seconds(self.max_delay, "Retry max_delay", allow_zero=True)
        if _number(self.backoff, "Retry backoff") < 1:
            raise ValueError("Retry backoff must be 1 or more.")

    def delay_after(self, attempt: int) -> timedelta:
        """How long to wait before the attempt after ``attempt``."""
        exponent = min(attempt - 1, 1000)
        try:
            seconds = min(self.max_delay, self.delay * self.backoff**exponent)
        except OverflowError:
            seconds = self.max_delay
        if self.jitter:
            seconds *= 1 - random.uniform(0, 0.1)
        return timedelta(seconds=seconds)


@dataclass(frozen=True)
class HandlerPolicy:
    """The executor (``None``: the app's ``SCORIA_EXECUTOR``), retry and timeout of a kind."""

    executor: str | None = None
    retry: Retry = field(default_factory=Retry)
    timeout: float | None = None

    def __post_init__(self) -> None:
        if self.executor is not None and self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, not {self.executor!r}.")
        if not isinstance(self.retry, Retry):
            raise ValueError(f"retry must be a flask_scoria.Retry, not {self.retry!r}.")
        if self.timeout is not None:
            _seconds(self.timeout, "timeout")


#: What a per-call handler, or a kind registered without options, gets.
DEFAULT_POLICY = HandlerPolicy()
