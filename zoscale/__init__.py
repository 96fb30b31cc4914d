"""zoscale: zeroth-order finetuning of sharded language models."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zoscale.comm import Comm, print0
from zoscale.optim import REGISTRY, StepResult, ZOOptimizer
from zoscale.shards import PerturbationEngine, Shard, local_shards

__version__ = "0.1.0"


def optimizer_config(name: str, **config):
    """The registered optimizer ``name``'s config dataclass from its options (ValueError naming
    the unknown optimizer, option or bad value)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(REGISTRY)}")
    cls = REGISTRY[name]
    fields = set(cls.Config.__dataclass_fields__)
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; valid: {sorted(fields)}")
    return cls.Config(**config)


def build_optimizer(name: str, model_or_shards: torch.nn.Module | Sequence[Shard], *, comm: Comm | None = None,
                    shard_comm: Comm | None = None, master_dtype: torch.dtype | None = None,
                    **config) -> ZOOptimizer:
    """Build a registered ZO optimizer over a model's trainable parameters (one whole shard each,
    so parameter sums need no reduction) or over shards that a backend produced (parameter sums are
    reduced over ``shard_comm``; by default over ``comm`` unless every rank's shards are whole
    parameters, i.e. replicas). ``config`` holds the optimizer's fields."""
    cfg = optimizer_config(name, **config)
    if isinstance(model_or_shards, torch.nn.Module):
        shards = local_shards(model_or_shards, master_dtype=master_dtype)
    else:
        shards = list(model_or_shards)
    return REGISTRY[name](shards, cfg, comm, shard_comm)


__all__ = ["Comm", "PerturbationEngine", "Shard", "StepResult", "ZOOptimizer", "build_optimizer",
           "local_shards", "optimizer_config", "print0"]
