"""First-order baselines: backpropagation with torch's AdamW and SGD on the same trainable
parameters, data order, schedule and evaluations as the ZO optimizers, so that `zoscale compare`
puts fine-tuning's result beside every ZO row (the MeZO paper's FT column).

A step is a forward and a backward over the batch (``Objective.gradient``), counted as three
forward passes. Data-parallel ranks (ddp) sum their gradients and counts in one all-reduce each,
so every rank applies the same update to its whole parameters; sharded backends (fsdp, deepspeed)
hold no whole parameters to take gradients of here and are refused before anything is built.
``projected_grad`` reports the gradient's norm (the run's health check reads it).

The optimizers' moment buffers are ShardBuffers over the parameters, so checkpoints save and
resume them like ConMeZO's momentum. Weight decay follows the ZO rule: matrices only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zoscale.engine import ShardBuffer
from zoscale.optim.base import StepResult, ZOConfig, ZOOptimizer, _check, register


@dataclass
class FirstOrderConfig(ZOConfig):
    """lr, weight_decay, the schedule and seed as for the ZO optimizers (eps, distribution and stream
    are unused)."""

    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    adam_eps: float = 1e-8  # AdamW
    momentum: float = 0.0  # SGD

    def __post_init__(self):
        super().__post_init__()
        _check(all(0.0 <= b < 1.0 for b in self.betas) and len(self.betas) == 2, "betas",
               f"must be two numbers in [0, 1), got {self.betas}")
        _check(self.adam_eps > 0, "adam_eps", f"must be > 0, got {self.adam_eps}")
        _check(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum}")


class FirstOrder(ZOOptimizer):
    Config = FirstOrderConfig
    needs = ("gradient",)
    run_properties = ()
    buffers: tuple[str, ...] = ()  # the torch optimizer's per-parameter state that checkpoints keep

    def __init__(self, shards, config: FirstOrderConfig, comm=None, shard_comm=None, phase=None):
        super().__init__(shards, config, comm, shard_comm, phase)
        if any(s.parameter is None or s.offset or s.numel != s.global_numel for s in self.shards):
            raise ValueError(f"{self.name}: backpropagation needs whole parameters (backend local or ddp)")
        if self.engine.has_master:
            raise ValueError(f"{self.name}: master weights are the ZO engine's; the torch optimizer updates the "
                             f"parameters themselves")
        self.params = [s.parameter for s in self.shards]
        decayed = [p for s, p in zip(self.shards, self.params) if s.weight_decay]
        others = [p for s, p in zip(self.shards, self.params) if not s.weight_decay]
        groups = [{"params": decayed, "weight_decay": config.weight_decay}, {"params": others, "weight_decay": 0.0}]
        self.torch_optimizer = self.make(groups, config)
        for p in self.params:  # the state made now, laid out like the shards (torch makes it lazily otherwise)
            self.torch_optimizer.state[p] = self.initial_state(p)

    @staticmethod
    def make(groups, config):
        raise NotImplementedError

    @staticmethod
    def initial_state(p: torch.Tensor) -> dict:
        raise NotImplementedError

    @classmethod
    def forward_passes(cls, config, step: int, full_batches: float) -> float:
        return 3.0  # a forward and a backward, the backward counted as two forwards

    @classmethod
    def buffer_bytes(cls, config, parameter_bytes: int) -> int:
        return (len(cls.buffers) + 1) * parameter_bytes  # the state, and the gradient

    def _step(self, objective) -> StepResult:
        gradient = self.objective(objective).gradient
        step, lr = self.step_count, self.lr_at(self.step_count)
        for p in self.params:
            p.grad = None
        total, count = gradient()
        grads = [p.grad for p in self.params if p.grad is not None]  # the same parameters on every rank
        self.comm.all_reduce_tensors_(grads)
        total, count = self.comm.all_reduce_sum([total, count])
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)) / count
        skipped = not (math.isfinite(total) and math.isfinite(norm))
        if not skipped:
            for g in grads:
                g.div_(count)  # the gradient of the global mean loss
            for group in self.torch_optimizer.param_groups:
                group["lr"] = lr
            self.torch_optimizer.step()
        for p in self.params:
            p.grad = None
        self.step_count += 1
        return StepResult(step=step, loss=total / count, projected_grad=norm, projected_grads=(norm,), lr=lr,
                          skipped=skipped)

    def shard_buffers(self) -> dict[str, ShardBuffer]:
        state = self.torch_optimizer.state
        return {**super().shard_buffers(), **{k: ShardBuffer([state[p][k] for p in self.params]) for k in self.buffers}}

    def state_dict(self, buffers: bool = True) -> dict:
        state = super().state_dict(buffers)
        state["torch_step"] = float(self.torch_optimizer.state[self.params[0]].get("step", 0.0))  # every parameter's
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for p in self.params:
            if "step" in self.torch_optimizer.state[p]:
                self.torch_optimizer.state[p]["step"].fill_(state["torch_step"])


@register("adamw")
class AdamW(FirstOrder):
    buffers = ("exp_avg", "exp_avg_sq")

    @staticmethod
    def make(groups, config):
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.adam_eps)

    @staticmethod
    def initial_state(p: torch.Tensor) -> dict:
        return {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


@register("sgd")
class SGD(FirstOrder):
    buffers = ("momentum_buffer",)

    @staticmethod
    def make(groups, config):
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)

    @staticmethod
    def initial_state(p: torch.Tensor) -> dict:
        # zeros give the first step's buffer torch would make (a copy of the gradient): momentum * 0 + grad
        return {"momentum_buffer": torch.zeros_like(p)}
