"""ConMeZO (Behric et al., 2025): directions sampled on a cone around the momentum.

    z_t = sqrt(d) cos(theta) m_t/|m_t| + sin(theta) u_t          u_t ~ N(0, I), from the step seed
    pg_t = [L(x + eps z_t) - L(x - eps z_t)] / (2 eps)
    x   <- x - lr pg_t z_t
    m   <- beta m + (1 - beta) pg_t z_t                         (|m| < 1e-8: z_t = u_t, a MeZO step)

One parameter-sized buffer holds m. A step is three passes over parameters and momentum together,
as MeZO's are over the parameters: the two perturbation passes read m and draw u_t to form
z_t = a m + b u_t where they use it, and the restore+update pass also advances m and sums |m|^2
on the way (the engine's ``advance``). |m| is that sum, reduced over ranks through ``param_sums``
(exact on sharded runs), unless ``norm="predicted"`` (the reference code's formula).
``noise="projected"`` removes u's component along m and rescales it, so that |z| = sqrt(d) and
the angle to m is exactly theta (one more dot product). theta = pi/2 is MeZO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zoscale.engine import ShardBuffer
from zoscale.optim.base import SHAPINGS, StepResult, ZOConfig, ZOOptimizer, _check, all_finite, register, shape

_DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass
class ConMeZOConfig(ZOConfig):
    cone_theta: float = 1.35  # half-angle in radians (OPT scripts 1.35, synthetic 1.30)
    beta: float = 0.99
    beta_warmup: tuple[int, int] | None = None  # reference LLM schedule: (200, 2000) for OPT
    norm: str = "exact"  # exact | predicted
    noise: str = "unprojected"  # unprojected (reference) | projected
    momentum_init: str = "zero"  # zero (synthetic code) | random (LLM code: m_0 = u, |m_0| = sqrt(d))
    buffer_dtype: str = "bfloat16"  # the same quadratic-benchmark results as float32 (docs/optimizers.md)
    shaping: str = "none"  # none | normalize | centered_ranks: over the step's 2 values (base.shape)

    def __post_init__(self):
        super().__post_init__()
        _check(self.shaping in SHAPINGS, "shaping", f"must be one of {list(SHAPINGS)}, got {self.shaping!r}")
        _check(0.0 < self.cone_theta <= math.pi / 2, "cone_theta", f"must be in (0, pi/2], got {self.cone_theta}")
        _check(0.0 <= self.beta <= 1.0, "beta", f"must be in [0, 1], got {self.beta}")
        _check(self.norm in ("exact", "predicted"), "norm", f"must be 'exact' or 'predicted', got {self.norm!r}")
        _check(self.noise in ("unprojected", "projected"), "noise",
               f"must be 'unprojected' or 'projected', got {self.noise!r}")
        _check(not (self.noise == "projected" and self.norm == "predicted"), "noise",
               "'projected' needs norm='exact'")
        _check(self.momentum_init in ("zero", "random"), "momentum_init",
               f"must be 'zero' or 'random', got {self.momentum_init!r}")
        _check(self.buffer_dtype in _DTYPES, "buffer_dtype",
               f"must be one of {list(_DTYPES)}, got {self.buffer_dtype!r}")
        if self.beta_warmup is not None:
            s1, s2 = self.beta_warmup
            _check(0 <= s1 < s2, "beta_warmup", f"must be (S1, S2) with 0 <= S1 < S2, got {self.beta_warmup}")
            self.beta_warmup = (int(s1), int(s2))


@register("conmezo")
class ConMeZO(ZOOptimizer):
    Config = ConMeZOConfig
    run_properties = ("stream", "buffer_dtype")

    @classmethod
    def buffer_bytes(cls, config: ConMeZOConfig, parameter_bytes: int) -> int:
        return getattr(torch, config.buffer_dtype).itemsize  # the momentum

    def __init__(self, shards, config: ConMeZOConfig, comm=None, shard_comm=None, phase=None):
        super().__init__(shards, config, comm, shard_comm, phase)
        self.buffer = self.engine.new_buffer(getattr(torch, config.buffer_dtype))
        self.dim = self.param_sums([sum(s.numel for s in self.shards if s.primary)])[0]
        self.momentum_norm = 0.0  # |m_t|, measured or predicted
        self.initialized = config.momentum_init == "zero"

    # -- the schedule and the cone ------------------------------------------------------------------
    def beta_at(self, step: int) -> float:
        """The reference LLM code's warm-up: 0.1 until S1, a smooth ramp to beta by S2."""
        cfg = self.config
        if cfg.beta_warmup is None:
            return cfg.beta
        s1, s2 = cfg.beta_warmup
        if step <= s1:
            return 0.1
        if step > s2:
            return cfg.beta
        p = ((step - s1) / (s2 - s1)) ** 1.8
        return cfg.beta - (cfg.beta - 0.1) / (1 + 8 * p) ** 3

    @property
    def is_mezo(self) -> bool:
        return math.cos(self.config.cone_theta) < 1e-12

    def _initialize(self) -> None:
        """momentum_init='random': m_0 = u (a seed of its own), with |m_0| measured or taken as sqrt(d)."""
        self.engine.apply(self.shards, self.buffer.tensors, self.buffer.tensors, 0.0, {self.seed_for(0, 1): 1.0})
        exact = self.config.norm == "exact"
        self.momentum_norm = math.sqrt(self.param_sums([self.engine.norm2(self.buffer.tensors)])[0]) if exact \
            else math.sqrt(self.dim)
        self.initialized = True

    def _direction(self, seed: int) -> dict:
        """z_t = a m_t + b u_t as engine terms: the perturbation passes read m and draw u_t."""
        if not self.initialized:
            self._initialize()
        if self.momentum_norm < 1e-8:
            return {seed: 1.0}  # no momentum yet: a plain Gaussian step
        cfg, d, m = self.config, self.dim, self.momentum_norm
        cos, sin = math.cos(cfg.cone_theta), math.sin(cfg.cone_theta)
        if cfg.noise == "unprojected":
            return {self.buffer: math.sqrt(d) * cos / m, seed: sin}
        # z = sqrt(d) cos m/|m| + sqrt(d) sin u_perp/|u_perp|, u_perp = u - <u,m>/|m|^2 m: one more read of m
        um, uu = self.param_sums([self.engine.dot(seed, self.buffer.tensors), self.engine.noise_norm2(seed)])
        coef_u = math.sqrt(d) * sin / math.sqrt(max(uu - um * um / (m * m), 1e-30))
        return {self.buffer: math.sqrt(d) * cos / m - coef_u * um / (m * m), seed: coef_u}

    def _momentum_norm(self, squares: float, seed: int, pg: float, beta: float, direction: dict) -> float:
        """|m_{t+1}|: the pass's sum of squares over every rank, or the reference code's prediction."""
        cfg, d = self.config, self.dim
        if cfg.norm == "exact":
            return math.sqrt(self.param_sums([squares])[0])
        if self.buffer not in direction:  # z = u
            return math.hypot(beta * self.momentum_norm, (1 - beta) * pg * math.sqrt(d))
        parallel = beta * self.momentum_norm + (1 - beta) * pg * math.sqrt(d) * math.cos(cfg.cone_theta)
        return math.hypot(parallel, (1 - beta) * pg * math.sqrt(d) * math.sin(cfg.cone_theta))

    # -- the step -----------------------------------------------------------------------------------
    def _step(self, objective) -> StepResult:
        closure = self.objective(objective).loss
        cfg, step = self.config, self.step_count
        lr, beta, seed = self.lr_at(step), self.beta_at(step), self.seed_for(step, 0)
        direction = {seed: 1.0} if self.is_mezo else self._direction(seed)
        loss_plus, loss_minus = self.global_means(self.evaluate_pairs([direction], closure))
        shaped_plus, shaped_minus = shape([loss_plus, loss_minus], cfg.shaping)
        pg = (shaped_plus - shaped_minus) / (2 * cfg.eps)
        skipped = not all_finite([loss_plus, loss_minus])
        if skipped:  # restore the parameters; the momentum stays
            self.engine.flush()
        else:
            self.engine.update({k: -lr * pg * c for k, c in direction.items()}, decay=1.0 - lr * cfg.weight_decay)
            if self.is_mezo:
                self.engine.flush()  # restore and update in one pass
            else:  # restore, update, and m <- beta m + (1 - beta) pg z in one pass
                gamma = beta + (1 - beta) * pg * direction.get(self.buffer, 0.0)
                squares = self.engine.flush(advance=(self.buffer, gamma, {seed: (1 - beta) * pg * direction[seed]}))
                self.momentum_norm = self._momentum_norm(squares, seed, pg, beta, direction)
        self.step_count += 1
        return StepResult(step=step, loss=loss_plus, projected_grad=pg, projected_grads=(pg,), lr=lr, skipped=skipped)

    # -- state --------------------------------------------------------------------------------------
    def shard_buffers(self) -> dict[str, ShardBuffer]:
        return {**super().shard_buffers(), "momentum": self.buffer}

    def state_dict(self, buffers: bool = True) -> dict:
        return {**super().state_dict(buffers), "momentum_norm": self.momentum_norm, "initialized": self.initialized}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.momentum_norm = float(state["momentum_norm"])
        self.initialized = bool(state["initialized"])
