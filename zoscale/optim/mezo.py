"""MeZO (Malladi et al., 2023): two-sided SPSA with in-place, seed-regenerated perturbations.

One step, with n directions at the same theta (n-SPSA, n = 1 by default):

    for each direction j:  theta + eps z_j -> l+_j ;  theta - eps z_j -> l-_j
    one all-reduce of all losses;  optionally shaped (``shaping``);  pg_j = (l+_j - l-_j) / (2 eps)
    theta <- (1 - lr wd) theta - lr/n sum_j pg_j z_j     (wd only on matrices)

The restore (+eps z_n) and the update go out in one pass; with ``defer_update`` they wait for
the next step's first perturbation pass (two passes per step instead of three).

``population``: the replicas (whole copies of the parameters: a rank under ddp, a shard group under
hybrid sharding) share out the n directions, replica g taking directions g, g + R, ... on the
whole batch (split within its shard group only); the losses of all directions go out in the one
all-reduce, each replica filling its own, and every rank applies all n seed terms in one pass. The
same step as n-SPSA in one process, its directions evaluated side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

from zoscale.errors import ConfigError
from zoscale.optim.base import SHAPINGS, StepResult, ZOConfig, ZOOptimizer, _check, all_finite, register, shape


@dataclass
class MeZOConfig(ZOConfig):
    n_directions: int = 1
    defer_update: bool = False
    shaping: str = "none"  # none | normalize | centered_ranks: over the step's 2 n values (base.shape)
    population: bool = False  # the replicas share out the n directions, each on the whole batch

    def __post_init__(self):
        super().__post_init__()
        _check(self.n_directions >= 1, "n_directions", f"must be >= 1, got {self.n_directions}")
        _check(self.shaping in SHAPINGS, "shaping", f"must be one of {list(SHAPINGS)}, got {self.shaping!r}")


@register("mezo")
class MeZO(ZOOptimizer):
    Config = MeZOConfig
    pairs = True

    @classmethod
    def forward_passes(cls, config: MeZOConfig, step: int, full_batches: float) -> float:
        return 2.0 * config.n_directions

    def __init__(self, shards, config: MeZOConfig, comm=None, shard_comm=None, phase=None):
        super().__init__(shards, config, comm, shard_comm, phase)
        groups = self.comm.world_size // self.shard_comm.world_size
        if config.population and config.n_directions % groups:
            raise ConfigError(f"n_directions: {config.n_directions} directions do not share out over the {groups} "
                              f"replicas of a population")
        # the directions this rank evaluates, and the ranks its batch is split over
        self.directions_here = range(self.comm.rank // self.shard_comm.world_size, config.n_directions, groups) \
            if config.population else range(config.n_directions)
        self.batch_comm = self.shard_comm if config.population else self.comm

    def _step(self, objective) -> StepResult:
        objective = self.objective(objective)
        cfg, step = self.config, self.step_count
        lr = self.lr_at(step)
        seeds = [self.seed_for(step, j) for j in range(cfg.n_directions)]
        raw = self.evaluate_pairs([{seeds[j]: 1.0} for j in self.directions_here], objective.loss, objective.pair)
        values = [(0.0, 0.0)] * (2 * cfg.n_directions)  # another group's directions: its ranks fill them
        for i, j in enumerate(self.directions_here):
            values[2 * j : 2 * j + 2] = raw[2 * i : 2 * i + 2]
        losses = self.global_means(values)
        plus = losses[0::2]
        shaped = shape(losses, cfg.shaping)
        pgs = tuple((lp - lm) / (2 * cfg.eps) for lp, lm in zip(shaped[0::2], shaped[1::2]))
        skipped = not all_finite(losses)
        if not skipped:  # else the flush below only restores theta
            n = cfg.n_directions
            self.engine.update({s: -lr * pg / n for s, pg in zip(seeds, pgs)}, decay=1.0 - lr * cfg.weight_decay)
        if skipped or not cfg.defer_update:
            self.engine.flush()
        self.step_count += 1
        return StepResult(step=step, loss=sum(plus) / len(plus), projected_grad=sum(pgs) / len(pgs),
                          projected_grads=pgs, lr=lr, skipped=skipped)
