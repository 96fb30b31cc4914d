"""The ZO engine: perturbations as pure functions of (seed, parameter, element), and the passes
that apply them to whatever pieces of the parameters a rank holds. Only torch and triton here:
nothing of the config, transformers, deepspeed or the training pipeline.

    rng.py       the streams' definition (Philox4x32-10; v1 and v2)
    shard.py     the seam: Shard, ShardBuffer, local_shards
    perturb.py   PerturbationEngine: perturb / update / flush, dot products and norms
    host.py      the passes over host memory (and the CPU's fast generator)
    kernels/     the same passes on a GPU (Triton)
    comm.py      the scalar collectives a step needs
"""

from zoscale.engine.comm import Comm, print0
from zoscale.engine.perturb import Pass, PerturbationEngine
from zoscale.engine.shard import (
                                  Shard,
                                  ShardBuffer,
                                  Storage,
                                  canonical_name,
                                  decays,
                                  local_shards,
                                  offload_compute_device,
                                  resident,
)

__all__ = ["Comm", "Pass", "PerturbationEngine", "Shard", "ShardBuffer", "Storage", "canonical_name", "decays",
           "local_shards", "offload_compute_device", "print0", "resident"]
