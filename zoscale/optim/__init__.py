"""Zeroth-order optimizers, and first-order baselines beside them; each registers itself by name in
``REGISTRY``, in the order imported here (MeZO, the baseline the others are measured against, first)."""

# ruff: noqa: I001 (the import order is the registry's)
from zoscale.optim import mezo, conmezo, svrg, pseuzo, first_order  # noqa: F401  (each registers itself)
from zoscale.optim.base import REGISTRY, Objective, StepResult, ZOConfig, ZOOptimizer, optimizer_config

__all__ = ["REGISTRY", "Objective", "StepResult", "ZOConfig", "ZOOptimizer", "optimizer_config"]
