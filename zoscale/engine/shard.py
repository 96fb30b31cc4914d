"""The shard seam: what a backend hands the optimizers.

A backend turns a model into a list of ``Shard``s: the local piece of each trainable parameter that
the forward reads, with its global offset in the flattened parameter. The optimizers see only
shards (through the perturbation engine) and a ``Comm``; they never learn how the model is
distributed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from zoscale.engine import rng

# Wrapper segments that frameworks insert into parameter names; the stream id must not see them.
_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(module|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)(?=\.)")


def canonical_name(name: str) -> str:
    """The parameter's name as the unwrapped model spells it (DDP, DeepSpeed, compile, FSDP1)."""
    return _WRAPPER_SEGMENTS.sub("", name).lstrip(".")


def decays(name: str, shape: Sequence[int]) -> bool:
    """Weight decay applies to matrices, not to biases and norm weights (MeZO's rule)."""
    return len(shape) >= 2 and "norm" not in name.lower()


@dataclass
class Shard:
    """This rank's piece of one trainable parameter.

    tensor: the view the forward reads (contiguous; written in place)
    offset: global index of its first element in the flattened parameter
    master: optional higher-precision copy that holds the parameter's value when the forward reads
            a half-precision ``tensor``; perturbations are then written from it and never into it
    storage: set when the elements live on NVMe between uses (ZeRO-3 offload): ``tensor`` is then
             valid only inside ``resident()``, and a meta placeholder outside it
    compute_device: the GPU the forward runs on, for a shard held in host memory (CPU or NVMe
             offload): the engine generates its perturbations there, a chunk at a time
    parameter: the Parameter a whole shard views (``local_shards``), whose gradient a first-order
             baseline reads
    primary: False for the copies of a parameter that every rank of a shard group holds whole (small
             parameters kept replicated) on all ranks but the group's first: sums over elements and
             checkpoints count each element once
    """

    name: str
    tensor: torch.Tensor
    offset: int = 0
    global_numel: int | None = None
    weight_decay: bool = True
    master: torch.Tensor | None = None
    storage: Storage | None = field(default=None, repr=False)
    compute_device: torch.device | None = None
    parameter: torch.nn.Parameter | None = field(default=None, repr=False)
    primary: bool = True
    stream: int = field(init=False)

    def __post_init__(self):
        self.name = canonical_name(self.name)
        self.stream = rng.stream_id(self.name)
        if self.global_numel is None:
            self.global_numel = self.offset + self.tensor.numel()
        if not self.tensor.is_contiguous():
            raise ValueError(f"shard {self.name}: the local tensor must be contiguous")
        if self.offset < 0 or self.offset + self.tensor.numel() > self.global_numel:
            raise ValueError(f"shard {self.name}: elements [{self.offset}, {self.offset + self.tensor.numel()})"
                             f" outside the parameter's {self.global_numel}")
        if self.master is not None and self.master.shape != self.tensor.shape:
            raise ValueError(f"shard {self.name}: master and tensor shapes differ")

    @property
    def numel(self) -> int:
        return self.tensor.numel()

    @property
    def value(self) -> torch.Tensor:
        """The tensor that holds the parameter's value: the master if there is one."""
        return self.tensor if self.master is None else self.master


class Storage(Protocol):
    """Elements that are swapped in for use and written back after (ZeRO-3's NVMe offload)."""

    capacity: int  # how many shards may be in memory at once

    def load(self, shards: Sequence[Shard]) -> None:
        """Read the shards' elements in; each ``shard.tensor`` becomes a view of them."""

    def store(self, shards: Sequence[Shard]) -> None:
        """Write the elements back and free their memory."""


def resident(shards: Sequence[Shard]) -> Iterator[list[Shard]]:
    """The shards in batches whose tensors are valid while the batch is in use: all at once when
    every shard is in memory; shards on NVMe a few at a time (read in, then written back when the
    caller moves on). Code that touches shard tensors goes through this."""
    in_memory = [s for s in shards if s.storage is None]
    swapped = [s for s in shards if s.storage is not None]
    if in_memory:
        yield in_memory
    if swapped:
        capacity = swapped[0].storage.capacity
        for i in range(0, len(swapped), capacity):
            batch = swapped[i : i + capacity]
            batch[0].storage.load(batch)
            try:
                yield batch
            finally:
                batch[0].storage.store(batch)


def offload_compute_device(t: torch.Tensor) -> torch.device | None:
    """The GPU the forward runs on, for a shard tensor held in host memory (offload), else None."""
    return torch.device("cuda", torch.cuda.current_device()) if not t.is_cuda and torch.cuda.is_available() else None


def local_shards(model: torch.nn.Module, master_dtype: torch.dtype | None = None) -> list[Shard]:
    """Every trainable parameter as one whole shard (single process, or replicated under DDP).

    With ``master_dtype`` (e.g. float32) each half-precision parameter gets a master copy: the
    forward still computes in half precision, but perturbations never accumulate rounding error."""
    shards = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        master = None
        if master_dtype is not None and p.dtype != master_dtype:
            master = p.detach().to(master_dtype).clone()
        shards.append(Shard(name, p.data, weight_decay=decays(name, p.shape), master=master, parameter=p))
    if not shards:
        raise ValueError("the model has no trainable parameters")
    return shards


class ShardBuffer:
    """A parameter-sized tensor per shard (momentum, anchor copy), laid out exactly like the shards,
    so it is sharded and checkpointed the same way."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = list(tensors)
