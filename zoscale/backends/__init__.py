"""Backends turn a model into what the optimizers see: local shards, a Comm for losses and a Comm
for sums over parameter elements. Sharding stays here, never in the optimizers or the loop."""

from __future__ import annotations

from zoscale.backends.local import DDPBackend, LocalBackend
from zoscale.errors import ConfigError


def get(name: str, deepspeed_config: str | None = None, fsdp_compute_dtype: str | None = None,
        fsdp_cpu_offload: bool = False, fsdp_shard_size: int | str | None = None,
        zero3_shard_size: int | str | None = None, replicate_small_params: int = 0):
    if name == "local":
        return LocalBackend()
    if name == "ddp":
        return DDPBackend()
    if name == "fsdp":
        from zoscale.backends.fsdp import FSDPBackend

        return FSDPBackend(fsdp_compute_dtype, fsdp_cpu_offload, fsdp_shard_size, replicate_small_params)
    if name == "deepspeed":
        from zoscale.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(deepspeed_config, zero3_shard_size, replicate_small_params)
    raise ConfigError(f"backend: {name!r} is not available; choose one of ['ddp', 'deepspeed', 'fsdp', 'local']")
