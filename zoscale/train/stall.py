"""A run that stopped learning says so: a step whose projected gradient is exactly 0 (the two
perturbed losses are equal to the last bit), or whose loss equals the previous step's to the last
bit (on another batch), changed nothing. A large lr that saturates the model (every loss ln V)
does that forever; the run warns after a few such steps and stops past a limit."""

from __future__ import annotations

WARN_AFTER = 10


class StalledRun(RuntimeError):
    """The run stopped learning (the message is one line)."""


class StallWatch:
    def __init__(self, limit: int, count: int = 0, same_values: bool = True):
        """``limit``: consecutive stalled steps that stop the run (0: never); ``count``: the
        consecutive stalled steps so far (a resumed run's); ``same_values``: whether a loss equal
        to the last step's counts (not for measured objectives, an accuracy of 0.75 recurs)."""
        self.limit, self.count, self.same_values = limit, count, same_values
        self.last_loss: float | None = None

    def observe(self, result) -> str | None:
        """Count a step's result; a warning line (once a streak reaches WARN_AFTER), or raises
        StalledRun past the limit."""
        flat = all(g == 0.0 for g in result.projected_grads) or (self.same_values and result.loss == self.last_loss)
        stalled = flat and not result.skipped
        self.last_loss = result.loss
        self.count = self.count + 1 if stalled else 0
        what = (f"{self.count} consecutive steps up to step {result.step} changed nothing (a projected gradient "
                f"of exactly 0, or the same loss {result.loss:.6g} to the last bit)")
        if self.limit and self.count >= self.limit:
            raise StalledRun(f"the run stopped learning: {what}: an lr that saturated the model, an eps the "
                             f"weights' dtype cannot resolve, or (a measured objective) an eps too small to change "
                             f"any answer (max_stalled_steps=0 turns this check off)")
        if self.count == WARN_AFTER:
            return f"warning: {what}; the run stops after {self.limit}" if self.limit else f"warning: {what}"
        return None
