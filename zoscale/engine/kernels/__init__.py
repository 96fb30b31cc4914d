"""The perturbation kernels: v1.py and v2.py on the device, launch.py plans and dispatches them."""

from zoscale.engine.kernels.launch import Segment, StagedTerms, affine_noise_, available, dot_noise

__all__ = ["Segment", "StagedTerms", "affine_noise_", "available", "dot_noise"]
