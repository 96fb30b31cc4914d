"""The few collectives a ZO step needs: a packed all-reduce of scalars, and rank-0 printing."""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import torch
import torch.distributed as dist


class Comm:
    """Scalar collectives over a process group; a no-op single-process world when none is set up."""

    def __init__(self, group=None, device: torch.device | str | None = None, distributed: bool | None = None):
        """``distributed=False`` forces a single-process Comm (e.g. for sums over replicated data)."""
        self.group = group
        initialized = dist.is_available() and dist.is_initialized()
        self.distributed = initialized if distributed is None else (distributed and initialized)
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        if device is None:
            nccl = self.distributed and dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.device = torch.device(device)

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Sum each value over ranks: one collective for the whole list, in float64."""
        if not self.distributed:
            return [float(v) for v in values]
        packed = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        return packed.tolist()

    def all_reduce_tensors_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum each tensor over ranks, in place: one collective over their concatenation (first-order
        baselines' gradients)."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    def assert_same(self, value, what: str) -> None:
        """Debug check: every rank holds the same picklable value."""
        if not self.distributed:
            return
        values = [None] * self.world_size
        dist.all_gather_object(values, pickle.dumps(value), group=self.group)
        if len(set(values)) != 1:
            raise RuntimeError(f"{what} differs across ranks: {[pickle.loads(v) for v in values]}")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def print0(*args, **kwargs) -> None:
    """print on global rank 0 only."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)
