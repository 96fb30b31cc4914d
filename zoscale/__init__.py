"""zoscale: zeroth-order finetuning of sharded language models."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zoscale.engine import Comm, PerturbationEngine, Shard, local_shards, print0
from zoscale.optim import REGISTRY, StepResult, ZOConfig, ZOOptimizer
from zoscale.optim import optimizer_config as _optimizer_config

__version__ = "0.1.0"


def optimizer_config(name: str, **options) -> ZOConfig:
    """The registered optimizer ``name``'s config dataclass from its options (a ``ConfigError``, a
    ValueError, names the unknown optimizer, option or bad value)."""
    return _optimizer_config(name, options)


def build_optimizer(name: str, model_or_shards: torch.nn.Module | Sequence[Shard], *, comm: Comm | None = None,
                    shard_comm: Comm | None = None, master_dtype: torch.dtype | None = None, phase=None,
                    **config) -> ZOOptimizer:
    """Build a registered ZO optimizer over a model's trainable parameters (one whole shard each,
    so parameter sums need no reduction) or over shards that a backend produced (parameter sums are
    reduced over ``shard_comm``; by default over ``comm`` unless every rank's shards are whole
    parameters, i.e. replicas). ``config`` holds the optimizer's fields (a ``ConfigError``, a
    ValueError, names a bad one). ``phase(name)``: a context around each pass (memory profiling)."""
    cfg = _optimizer_config(name, config)
    if isinstance(model_or_shards, torch.nn.Module):
        shards = local_shards(model_or_shards, master_dtype=master_dtype)
    else:
        shards = list(model_or_shards)
    return REGISTRY[name](shards, cfg, comm, shard_comm, phase)


__all__ = ["Comm", "PerturbationEngine", "Shard", "StepResult", "ZOOptimizer", "build_optimizer",
           "local_shards", "optimizer_config", "print0"]
