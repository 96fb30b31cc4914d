"""Zeroth-order optimizers; each registers itself by name in ``REGISTRY``."""

from zoscale.optim import mezo  # noqa: F401  (registers "mezo")
from zoscale.optim.base import REGISTRY, StepResult, ZOConfig, ZOOptimizer

__all__ = ["REGISTRY", "StepResult", "ZOConfig", "ZOOptimizer"]
