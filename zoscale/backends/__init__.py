"""Backends turn a model into what the optimizers see: local shards, a Comm for losses and a Comm
for sums over parameter elements. Sharding stays here, never in the optimizers or the loop."""

from __future__ import annotations

from zoscale.backends.local import DDPBackend, LocalBackend
from zoscale.config import ConfigError

BACKENDS = {"local": LocalBackend, "ddp": DDPBackend}


def get(name: str):
    if name not in BACKENDS:
        raise ConfigError(f"backend: {name!r} is not available yet; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]()
