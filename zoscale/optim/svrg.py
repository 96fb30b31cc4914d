"""MeZO-SVRG (Gautam et al., ICML 2024): MeZO with a control variate from a periodic anchor.

Every ``q`` steps (anchor step):
    g = SPSA over the full batch at theta, kept as (seed_a, pg_a) -- never materialised
    theta_bar <- theta;  theta <- theta - anchor_lr * g
Other steps (minibatch I):
    c = SPSA_I(theta; z) - SPSA_I(theta_bar; z')     z' = z by default (shared direction)
    theta <- theta - lr * (c + g)

Objective: ``loss`` and ``full_loss`` (``step(objective)``, or ``step(closure, full_closure)``).
On anchor steps ``full_loss()`` returns the full-batch loss (the caller evaluates its fixed
training subset, in chunks if it likes; return (loss_sum, count) for an exact mean); on minibatch
steps ``loss()`` is called four times on the same minibatch: at theta +- eps z, then at
theta_bar +- eps z'. ``needs_full_batch(step)`` tells which one a step uses.

Memory: one parameter-sized buffer (theta_bar), held per shard. theta and theta_bar are swapped in
place, a chunk at a time, to evaluate at the anchor. ``shared_direction=False`` draws z' on its own
seed, as the authors' code does; the control variate then no longer shrinks as theta -> theta_bar.
The reference code's other departures (aliased anchor, materialised g, lr annealing) are not
reproduced: see docs/optimizers.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from zoscale.engine import ShardBuffer
from zoscale.optim.base import StepResult, ZOConfig, ZOOptimizer, _check, all_finite, as_objective, register


@dataclass
class MeZOSVRGConfig(ZOConfig):
    lr: float = 1e-6  # eta2, the minibatch step
    anchor_lr: float = 1e-5  # eta1, the full-batch step (scaled by the same schedule as lr)
    q: int = 2  # anchor period
    shared_direction: bool = True

    def __post_init__(self):
        super().__post_init__()
        _check(self.q >= 1, "q", f"must be >= 1, got {self.q}")
        _check(self.anchor_lr >= 0, "anchor_lr", f"must be >= 0, got {self.anchor_lr}")


@register("mezo_svrg")
class MeZOSVRG(ZOOptimizer):
    Config = MeZOSVRGConfig
    needs = ("loss", "full_loss")

    def __init__(self, shards, config: MeZOSVRGConfig, comm=None, shard_comm=None, phase=None):
        super().__init__(shards, config, comm, shard_comm, phase)
        self.anchor = self.engine.new_buffer()
        self.anchor_seed: int | None = None
        self.anchor_pg = 0.0

    @classmethod
    def buffer_bytes(cls, config: MeZOSVRGConfig, parameter_bytes: int) -> int:
        return parameter_bytes  # the anchor, in the parameters' dtype

    @classmethod
    def forward_passes(cls, config: MeZOSVRGConfig, step: int, full_batches: float) -> float:
        """An anchor step evaluates the full sample twice, a minibatch step its batch four times
        (a skipped anchor step is repeated at the next step, which this plan does not foresee)."""
        return 2.0 * full_batches if step % config.q == 0 else 4.0

    def needs_full_batch(self, step: int | None = None) -> bool:
        step = self.step_count if step is None else step
        return self.anchor_seed is None or step % self.config.q == 0

    def _pair(self, seed: int, closure) -> list:
        """Losses at the current parameters +- eps z(seed); leaves them restored."""
        raw = self.evaluate_pairs([{seed: 1.0}], closure)
        self.engine.flush()
        return raw

    def step(self, objective=None, full_closure=None) -> StepResult:
        """Each step calls one of the two losses: the other may be left out."""
        return super().step(objective, full_closure)

    def _step(self, objective=None, full_closure=None) -> StepResult:
        objective = as_objective(objective, "loss")
        closure, full_closure = objective.loss, full_closure or objective.full_loss
        cfg, step = self.config, self.step_count
        lr = self.lr_at(step)
        anchor_lr = cfg.anchor_lr * (lr / cfg.lr if cfg.lr else 1.0)
        decay = lambda rate: 1.0 - rate * cfg.weight_decay  # noqa: E731
        pg = lambda plus, minus: (plus - minus) / (2 * cfg.eps)  # noqa: E731
        seed = self.seed_for(step, 0)
        if self.needs_full_batch(step):
            if full_closure is None:
                raise ValueError(f"MeZO-SVRG step {step} is an anchor step: pass full_closure, or an Objective "
                                 f"with full_loss")
            losses = self.global_means(self._pair(seed, full_closure))
            skipped = not all_finite(losses)
            pgs = (pg(*losses),)
            if not skipped:
                for value, anchor in zip((s.value for s in self.shards), self.anchor.tensors):
                    anchor.copy_(value)
                self.anchor_seed, self.anchor_pg = seed, pgs[0]
                self.engine.update({seed: -anchor_lr * pgs[0]}, decay=decay(anchor_lr))
        else:
            if closure is None:
                raise ValueError(f"MeZO-SVRG step {step} is a minibatch step: pass closure, or an Objective "
                                 f"with loss (the minibatch loss)")
            ref_seed = seed if cfg.shared_direction else self.seed_for(step, 1)
            raw = self._pair(seed, closure)
            self.engine.swap(self.anchor)  # evaluate at theta_bar
            raw += self._pair(ref_seed, closure)
            self.engine.swap(self.anchor)
            losses = self.global_means(raw)
            skipped = not all_finite(losses)
            pgs = (pg(*losses[:2]), pg(*losses[2:]), self.anchor_pg)  # current, reference, anchor
            if not skipped:
                terms: dict[int, float] = {seed: -lr * pgs[0]}
                terms[ref_seed] = terms.get(ref_seed, 0.0) + lr * pgs[1]
                terms[self.anchor_seed] = terms.get(self.anchor_seed, 0.0) - lr * self.anchor_pg
                self.engine.update(terms, decay=decay(lr))
        self.engine.flush()
        self.step_count += 1
        return StepResult(step=step, loss=losses[0], projected_grad=pgs[0], projected_grads=pgs,
                          lr=anchor_lr if len(pgs) == 1 else lr, skipped=skipped)

    def shard_buffers(self) -> dict[str, ShardBuffer]:
        return {**super().shard_buffers(), "anchor": self.anchor}

    def state_dict(self, buffers: bool = True) -> dict:
        return {**super().state_dict(buffers), "anchor_seed": self.anchor_seed, "anchor_pg": self.anchor_pg}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.anchor_seed, self.anchor_pg = state["anchor_seed"], float(state["anchor_pg"])
