"""Learning-rate schedules as pure functions of the step (so a resumed run needs only the step)."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_at(step: int, *, lr: float, schedule: str = "constant", warmup_steps: int = 0,
          total_steps: int | None = None, min_lr_ratio: float = 0.0) -> float:
    """lr for 0-based ``step``: linear warmup over ``warmup_steps``, then constant, linear decay or
    cosine decay to ``min_lr_ratio * lr`` at ``total_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        factor = 1.0 - progress
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * factor)
