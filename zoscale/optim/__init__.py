"""Zeroth-order optimizers; each registers itself by name in ``REGISTRY``."""

from zoscale.optim import conmezo, mezo, pseuzo, svrg  # noqa: F401  (each registers itself)
from zoscale.optim.base import REGISTRY, StepResult, ZOConfig, ZOOptimizer

__all__ = ["REGISTRY", "StepResult", "ZOConfig", "ZOOptimizer"]
