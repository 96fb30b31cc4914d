"""One process (`local`), or replicas on every rank with the batch split across ranks (`ddp`).

Under `ddp` every rank holds whole parameters and applies the same update (same seeds, same
all-reduced losses), so replicas stay identical with no parameter traffic at all: a step costs an
all-reduce of a few scalars. Parameter sums (ConMeZO's norm) need no reduction: each rank has them.
"""

from __future__ import annotations

import torch

from zoscale.backends.base import (
    build_whole,
    check_launch_environment,
    destroy_distributed,
    init_distributed,
    local_device,
)
from zoscale.engine import Comm, local_shards
from zoscale.models import BodyHead


class LocalBackend:
    name = "local"
    sharded = False
    split = BodyHead()  # the base model called directly (no full-vocabulary logits), the head at scored positions

    def setup(self, timeout_s: float) -> tuple[Comm, torch.device]:
        check_launch_environment(self.name)
        return Comm(), local_device()

    def build(self, cfg, vocab_size: int, device):
        return self.prepare(build_whole(cfg, vocab_size, device), device)

    def prepare(self, model, device):
        return model

    def shards(self, model, master_dtype):
        return local_shards(model, master_dtype=master_dtype), Comm(distributed=False)

    def named_groups(self) -> dict:
        return {}

    def teardown(self) -> None:
        pass


class DDPBackend(LocalBackend):
    """Replicas: the local backend's model and shards on every rank of a process group."""

    name = "ddp"

    def setup(self, timeout_s: float) -> tuple[Comm, torch.device]:
        return init_distributed(self.name, timeout_s, alone_too=False)

    def teardown(self) -> None:
        destroy_distributed()
